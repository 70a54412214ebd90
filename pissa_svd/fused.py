"""PEFT's fused layout of mixture-of-experts adapters, mapped onto the checkpoint's experts.

Checkpoints name each expert's weights (``layers.0.block_sparse_moe.experts.3.w1``,
``layers.0.mlp.experts.3.gate_proj``); transformers 5 stacks them on loading into two 3-D
parameters per layer, ``experts.gate_up_proj`` (E, gate + up, hidden) and ``experts.down_proj``
(E, hidden, intermediate). PEFT maps per-expert adapters onto them, trains one LoRA per
parameter (its ``ParamWrapper``), and saves that:

- the adapter module is the experts container, with ``.base_layer`` for the inner of the
  two nested wrappers (``layers.0.mlp.experts.base_layer``, ``layers.0.mlp.experts``); the
  config lists ``target_parameters`` and has rank/alpha patterns for ``gate_up_proj``;
- lora_A is (E * R, in) with expert e's rows at ``[e R, (e + 1) R)``; lora_B is (out, R * E)
  with expert e's columns at ``e, e + E, e + 2E, ...``: expert e's update is
  ``s * B.reshape(out, R, E)[:, :, e] @ A.reshape(E, R, in)[e]``;
- for ``gate_up_proj`` its rows stack gate over up, and a per-expert adapter maps onto it as
  A = [A_gate ; A_up], B = blockdiag(B_gate, B_up) (rank 2r).

:func:`fused_params` finds such modules in an adapter and names, for each expert, the
checkpoint modules whose rows it stacks, from the shapes of those modules: which parameter a
module is follows from its shapes (gate_up's input is hidden and its output gate + up; down's
input is the intermediate size and its output hidden), not from the nesting order.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from functools import cached_property

import torch

from .adapter import LoraAdapter, fused_container
from .errors import InputError

# A checkpoint's per-expert projection: (layer).experts.(e).(proj)
_EXPERT = re.compile(
    r"^(?P<layer>.+)\.experts\.(?P<e>\d+)\.(?P<proj>w1|w2|w3|gate_proj|up_proj|down_proj)$"
)
_ROLE = {"w1": "gate", "gate_proj": "gate", "w3": "up", "up_proj": "up"}
_ROLE.update({"w2": "down", "down_proj": "down"})
# transformers' fused parameter -> the per-expert projections stacked in its rows, in order.
_PARAMS = {"gate_up_proj": ("gate", "up"), "down_proj": ("down",)}


@dataclass(frozen=True)
class FusedParam:
    """One LoRA on a fused expert parameter, and where its rows live in the files (``parts``
    and ``rows`` are empty when it is not mapped to a checkpoint's modules)."""

    module: str  # the adapter's module key, e.g. model.layers.0.mlp.experts.base_layer
    param: str  # gate_up_proj | down_proj
    experts: int
    rank: int  # per expert
    scaling: float
    parts: tuple[tuple[str, ...], ...] = ()  # per expert: the checkpoint modules, top to bottom
    rows: tuple[int, ...] = ()  # out features of each part (gate, up) or (down,)

    def split(self, A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """PEFT's flat (E R, in) / (out, R E) -> per expert A (E, R, in), B (E, out, R)."""
        E = self.experts
        return A.reshape(E, -1, A.shape[-1]), B.reshape(B.shape[0], -1, E).permute(2, 0, 1)

    def join(self, A3: torch.Tensor, B3: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inverse of :meth:`split`."""
        E, out_f, R = B3.shape
        return A3.reshape(E * R, A3.shape[-1]), B3.permute(1, 2, 0).reshape(out_f, R * E)

    def from_experts(self, per_expert: LoraAdapter) -> tuple[torch.Tensor, torch.Tensor, float]:
        """A per-expert adapter's update in this layout: A (E, R0, in), B (E, out, R0), s.

        Its parts are stacked as PEFT maps them: A = [A_gate ; A_up], B = blockdiag(B_gate,
        B_up). Their scalings must agree (they do for any one config without patterns)."""
        scalings = {per_expert.scaling(m) for ms in self.parts for m in ms}
        if len(scalings) > 1:
            raise InputError(
                f"{per_expert.root}: the experts stacked in {self.module}'s {self.param} have "
                f"different LoRA scalings {sorted(scalings)}; they cannot share one fused adapter"
            )
        A = torch.stack([torch.cat([per_expert.A[m] for m in ms]) for ms in self.parts])
        B = torch.stack([torch.block_diag(*[per_expert.B[m] for m in ms]) for ms in self.parts])
        return A, B, scalings.pop()

    def delta(self, A: torch.Tensor, B: torch.Tensor, name: str, dtype: torch.dtype):
        """``s * B_e @ A_e``'s rows that update checkpoint module ``name`` (out, in)."""
        e, j = self.index[name]
        top, n = sum(self.rows[:j]), self.rows[j]
        A_e = A.reshape(self.experts, -1, A.shape[-1])[e]
        B_e = B.reshape(B.shape[0], -1, self.experts)[top : top + n, :, e]
        return (self.scaling * B_e.to(dtype)) @ A_e.to(dtype)

    @cached_property
    def index(self) -> dict[str, tuple[int, int]]:
        """checkpoint module -> (expert, part)."""
        return {m: (e, j) for e, names in enumerate(self.parts) for j, m in enumerate(names)}


def fused_params(
    adapter: LoraAdapter, shapes: dict[str, tuple[int, int]], where: str
) -> dict[str, FusedParam]:
    """The adapter's fused-expert modules, keyed by module, mapped onto ``shapes``' modules.

    ``shapes``: (out, in) of every module of the model the adapter belongs to, as its
    checkpoint names them (a checkpoint's 2-D weights, or a per-expert adapter's modules);
    ``where`` names that model in errors.
    """
    layers: dict[str, dict[str, dict[int, str]]] = {}
    for name in shapes:
        m = _EXPERT.match(name)
        if m is not None:
            roles = layers.setdefault(_layer_key(m["layer"]), {})
            roles.setdefault(_ROLE[m["proj"]], {})[int(m["e"])] = name
    found: dict[str, FusedParam] = {}
    for module in adapter.modules:
        container = fused_container(adapter.config, module)
        if container is None:
            continue
        roles = layers.get(layer_of_container(container), {})
        A, B = adapter.A[module], adapter.B[module]
        for param, stacked in _PARAMS.items():
            parts = _parts(roles, stacked)
            if parts and _fits(parts, shapes, A, B):
                found[module] = _param(adapter, module, container, param, parts, shapes, A)
                break
        else:
            layer = layer_of_container(container)
            if not roles:
                why = f"{where} has no per-expert weights in {layer} (experts stored fused?)"
            elif gap := _gap(roles):
                why = f"{where} lacks {gap} in {layer}"
            else:
                why = f"they match no experts of {where} in shape"
            raise InputError(
                f"{adapter.root}: {module} adapts fused experts ({tuple(A.shape)} lora_A, "
                f"{tuple(B.shape)} lora_B), but {why}; the adapter belongs to a different model"
            )
    return found


def _gap(roles: dict[str, dict[int, str]]) -> str | None:
    """A missing per-expert weight of a layer, e.g. "expert 1's down projection"."""
    n = max(max(e) for e in roles.values()) + 1
    for role in ("gate", "up", "down"):
        for e in range(n):
            if e not in roles.get(role, {}):
                return f"expert {e}'s {role} projection"
    return None


def expert_slot(module: str) -> tuple[str, str, int] | None:
    """Where a checkpoint's per-expert module lands once transformers fuses the experts:
    (layer key, fused parameter, expert), e.g. ``model.layers.3.block_sparse_moe.experts.5.w3``
    -> ("model.layers.3", "gate_up_proj", 5); None for any other module."""
    m = _EXPERT.match(module)
    if m is None:
        return None
    role = _ROLE[m["proj"]]
    param = next(p for p, stacked in _PARAMS.items() if role in stacked)
    return _layer_key(m["layer"]), param, int(m["e"])


def stacked(param: str) -> int:
    """How many per-expert projections a fused parameter stacks (gate_up_proj: 2)."""
    return len(_PARAMS[param])


def layer_of_container(container: str) -> str:
    """The layer key of a fused experts container (``model.layers.3.mlp.experts``)."""
    return _layer_key(container.removesuffix(".experts"))


def _layer_key(prefix: str) -> str:
    """The layer a name belongs to: its prefix through the last number (model.layers.7)."""
    parts = prefix.split(".")
    last = max((i for i, p in enumerate(parts) if p.isdigit()), default=len(parts) - 1)
    return ".".join(parts[: last + 1])


def _parts(roles: dict[str, dict[int, str]], stacked: tuple[str, ...]) -> list[tuple[str, ...]]:
    experts = [roles.get(role, {}) for role in stacked]
    n = len(experts[0])
    if n == 0 or any(sorted(e) != list(range(n)) for e in experts):
        return []
    return [tuple(e[i] for e in experts) for i in range(n)]


def _fits(parts, shapes, A: torch.Tensor, B: torch.Tensor) -> bool:
    in_f, out_f = A.shape[1], B.shape[0]
    if A.shape[0] != B.shape[1] or A.shape[0] % len(parts):
        return False
    for names in parts:
        if sum(shapes[m][0] for m in names) != out_f or any(shapes[m][1] != in_f for m in names):
            return False
    return True


def _param(adapter, module, container, param, parts, shapes, A) -> FusedParam:
    rank = A.shape[0] // len(parts)
    key = f"{container}.{param}"  # PEFT matches rank/alpha patterns against the parameter
    expected = adapter.config_rank(key)
    if expected is not None and expected != rank:
        raise InputError(
            f"{adapter.root}: {module} ({param}) has {A.shape[0]} lora_A rows, which is not "
            f"{len(parts)} experts (as in its model) x r={expected} (adapter_config.json); the "
            "adapter belongs to a model with another number of experts"
        )
    return FusedParam(
        module=module,
        param=param,
        experts=len(parts),
        rank=rank,
        scaling=adapter.scaling_at(key, rank),
        parts=tuple(parts),
        rows=tuple(shapes[m][0] for m in parts[0]),
    )


def unmapped_params(adapter: LoraAdapter) -> dict[str, FusedParam]:
    """The fused-expert modules of an adapter made on the fused model itself (``initialize``
    on a ``target_parameters`` LoRA), with no per-expert names to map them to.

    The expert count E is the one the config's rank patterns allow: each module's lora_A has
    E * r rows for the r of the parameter it adapts. Which of a container's modules adapts
    which parameter need not be known, only that every assignment that fits gives the same E
    and the same rank and scaling per module; otherwise the adapter is refused.
    """
    config = adapter.config
    leaves = [str(t).rpartition(".")[2] for t in config.get("target_parameters") or []]
    containers: dict[str, list[str]] = {}
    for m in adapter.modules:
        if (c := fused_container(config, m)) is not None:
            containers.setdefault(c, []).append(m)
    found: dict[str, FusedParam] = {}
    for c, modules in containers.items():
        rows = [adapter.A[m].shape[0] for m in modules]
        fits = {}
        for params in itertools.permutations(leaves, len(modules)):
            if not _plausible(adapter, dict(zip(params, modules, strict=True))):
                continue
            ranks = [adapter.config_rank(f"{c}.{p}") for p in params]
            if any(r is None or n % r for r, n in zip(ranks, rows, strict=True)):
                continue
            experts = {n // r for r, n in zip(ranks, rows, strict=True)}
            if len(experts) == 1:
                scalings = [
                    adapter.scaling_at(f"{c}.{p}", r) for p, r in zip(params, ranks, strict=True)
                ]
                fits[(experts.pop(), *zip(ranks, scalings, strict=True))] = params
        if len(fits) != 1:
            raise InputError(
                f"{adapter.root}: cannot tell how many experts {c} has from the shapes of "
                f"{', '.join(modules)} and the rank patterns in adapter_config.json"
            )
        (E, *per_module), params = next(iter(fits.items()))
        for m, p, (r, scaling) in zip(modules, params, per_module, strict=True):
            found[m] = FusedParam(module=m, param=p, experts=E, rank=r, scaling=scaling)
    return found


def _plausible(adapter: LoraAdapter, module_of: dict[str, str]) -> bool:
    """Shapes that rule out an assignment of parameters to modules: gate_up_proj maps hidden
    to 2 x intermediate, down_proj intermediate back to hidden."""
    gu, down = module_of.get("gate_up_proj"), module_of.get("down_proj")
    if gu is None or down is None:
        return True
    A_gu, B_gu, A_d, B_d = adapter.A[gu], adapter.B[gu], adapter.A[down], adapter.B[down]
    return A_gu.shape[1] == B_d.shape[0] and B_gu.shape[0] == 2 * A_d.shape[1]
