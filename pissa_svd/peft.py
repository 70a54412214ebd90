"""PiSSA initialization of a live PEFT model, computed with pissa-svd's engine.

``initialize(get_peft_model(model, LoraConfig(...)))`` turns every LoRA layer of one adapter into
a PiSSA adapter in place: the adapter gets the top-r singular triplets of the layer's weight and
the base layer keeps the residual (convention in :mod:`pissa_svd.pissa`). It does what PEFT's
``init_lora_weights="pissa_niter_N"`` does, with three differences:

- the SVD is :func:`pissa_svd.svd_lowrank` (``auto``: krylov2, or krylov3 on long short
  sides; 0.17-0.38x PEFT's worst error on real weights in the same passes; batched over
  same-shape weights, with a per-module seed, so results do not depend on grouping or order,
  and match ``pissa-svd decompose`` on the same checkpoint with the same seed);
- the residual is computed from A and B as stored (after rounding to the adapter dtype), so
  ``W_res + s * B @ A == W`` up to the rounding of the residual alone;
- the adapter config keeps ``init_lora_weights=True``, so a saved adapter reloads as is (with
  ``"pissa..."`` PEFT would run an SVD of the residual again on load and subtract it twice).

Import it explicitly (``import pissa_svd.peft``): ``import pissa_svd`` does not load it.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import torch
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora import LoraLayer
from peft.tuners.lora.variants import DoraLinearVariant

try:  # LoRA on nn.Parameters (target_parameters), such as fused MoE experts: PEFT >= 0.17
    from peft.tuners.lora import ParamWrapper
except ImportError:
    ParamWrapper = None
from transformers.pytorch_utils import Conv1D

from .adapter import unwrapped
from .errors import InputError
from .linalg import (
    BACKENDS,
    FLOAT_DTYPES,
    METHODS,
    check_sketch_dtype,
    default_batch_memory,
    default_oversample,
    derive_seed,
    resolve_backend,
    resolve_method,
    svd_lowrank,
)
from .pissa import all_finite, pissa_factors, sum_squares
from .targets import not_adaptable

# Quantized layers and weights, by class name or module prefix: bitsandbytes, GPTQ, AWQ, HQQ,
# EETQ, AQLM, quanto, torchao, ... Matched by name so that the check needs none of them
# installed; PEFT's LoRA wrappers for bitsandbytes reuse the names Linear4bit / Linear8bitLt.
QUANTIZED_CLASSES = frozenset(
    {
        "Linear4bit",
        "Linear8bitLt",
        "Params4bit",
        "Int8Params",
        "QuantLinear",
        "HQQLinear",
        "WQLinear_GEMM",
        "WQLinear_GEMV",
        "EetqLinear",
        "QuantizedLinear",
        "FP8Linear",
    }
)
QUANTIZED_MODULES = (
    "bitsandbytes",
    "auto_gptq",
    "gptqmodel",
    "awq",
    "hqq",
    "eetq",
    "aqlm",
    "optimum.quanto",
    "torchao",
    "compressed_tensors",
)
QUANTIZED_HINT = (
    "decompose at full precision with `pissa-svd decompose`, then quantize the residual"
)


@dataclass
class _Target:
    """One matrix to initialize: a LoRA layer's weight, or one expert of a fused parameter.

    ``name`` is the module's name in the wrapped model (``model.layers.0.self_attn.q_proj``),
    so ``name + ".weight"`` is its checkpoint key; for an expert ``e`` of a ``target_parameters``
    LoRA it is ``<experts module>.<parameter>.<e>`` (``model.layers.0.mlp.experts.down_proj.3``).
    ``A`` (r, in) and ``B`` (out, r) are views of the layer's lora_A/lora_B weights, and
    ``weight`` of the base weight; all three are written in place.
    """

    name: str
    weight: torch.Tensor  # stored layout: (out, in), or (in, out) with fan_in_fan_out
    A: torch.Tensor
    B: torch.Tensor
    rank: int
    scaling: float
    fan_in_fan_out: bool

    @property
    def shape(self) -> tuple[int, int]:
        """(out, in) of the layer's matrix, whatever its stored layout."""
        out, inp = self.weight.shape
        return (inp, out) if self.fan_in_fan_out else (out, inp)


def initialize(
    peft_model: torch.nn.Module,
    *,
    niter: int = 4,
    method: str = "auto",
    oversample: int | None = None,
    seed: int = 0,
    backend: str = "auto",
    adapter_name: str | None = None,
    batch: bool = True,
    sketch_dtype: torch.dtype | None = None,
) -> dict:
    """Re-initialize one LoRA adapter of ``peft_model`` as PiSSA, in place.

    For every LoRA layer of the adapter that wraps an ``nn.Linear`` or a transformers ``Conv1D``
    (with ``fan_in_fan_out``), with W: (out, in) the layer's effective weight:

    - ``lora_A[adapter].weight`` (r, in) <- sqrt(S / s) * Vh, in lora_A's dtype;
    - ``lora_B[adapter].weight`` (out, r) <- U * sqrt(S / s), in lora_B's dtype;
    - ``base_layer.weight`` <- W - s * B @ A, in its stored layout, dtype and device, in place
      (the Parameter object is kept, so optimizers and hooks holding it stay valid);

    where r = ``layer.r[adapter]`` and s = ``layer.scaling[adapter]`` (so ``rank_pattern``,
    ``alpha_pattern`` and rsLoRA are honoured). W is the base weight plus the adapter's current
    contribution s * B @ A, which is zero for a freshly created adapter: the model's output is
    unchanged by this call (up to the rounding of the residual to the base dtype), and calling
    it again re-splits the same W.

    A ``target_parameters`` LoRA (PEFT's ParamWrapper, e.g. on the fused experts that
    transformers 5 builds for Mixtral, Qwen-MoE, OLMoE, ...: ``target_parameters=["gate_up_proj",
    "down_proj"]``) is split expert by expert, all experts of a parameter in one batched call:
    each expert's matrix gets its own top-r triplets, in the rows and columns of lora_A/lora_B
    where PEFT keeps that expert's factors. PEFT's own PiSSA init fails on these layers.

    Embedding, Conv and MultiheadAttention LoRA layers are skipped with one warning and listed
    in the report: they keep the initialization PEFT gave them (with the default
    ``init_lora_weights=True``, a zero product, so the output is still unchanged). PEFT's own
    PiSSA init raises for Embedding and Conv layers.

    Refused with :class:`InputError` (nothing is modified): quantized base layers
    (bitsandbytes, GPTQ, AWQ, ... or any weight that is not a plain bf16/fp16/fp32/fp64
    tensor), weights on the meta device, merged adapters, weights tied to another module,
    any other LoRA adapter in the model (its base weights would change under it), LoRA
    variants other than DoRA, and a rank above min(out, in).

    Args:
        peft_model: a ``PeftModel`` (or ``LoraModel``, or any module holding PEFT LoRA layers).
        niter, method, oversample, seed, backend, sketch_dtype: as
            :func:`pissa_svd.svd_lowrank`; module ``name`` draws its sketch from
            ``derive_seed(name + ".weight", seed)``.
        adapter_name: the adapter to initialize; default: the active adapter.
        batch: decompose same-shape layers together in one batched call (faster; identical
            results up to fp32 rounding), within the budget ``pissa-svd decompose`` uses
            (64 MiB of fp32 matrices on CPU, min(1 GiB, 1/8 of its memory) on a GPU).

    Returns:
        A JSON-serializable report: ``adapter``; ``modules``: per module ``shape`` [out, in],
        ``rank``, ``scaling``, ``method``, ``seed``, ``singular_values`` (top r),
        ``energy_fraction`` (||S_r||^2 / ||W||_F^2), ``folded`` (whether a nonzero adapter was
        folded into W first), ``batch`` (size of its batched call) and ``seconds`` (its share
        of that call); ``skipped``: module -> reason; ``totals``: ``modules``, ``svd_calls``,
        ``seconds``, ``energy_fraction``; ``init_lora_weights_was``: the config value replaced
        by ``True``.
    """
    _check_options(niter, method, oversample, backend)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise InputError(f"seed must be an int, got {seed!r}")
    try:
        check_sketch_dtype(sketch_dtype)
    except ValueError as exc:
        raise InputError(str(exc)) from None
    if sketch_dtype is not None and backend == "native":
        raise InputError("sketch_dtype=torch.bfloat16 runs on the torch backend: backend='torch'")
    start = time.perf_counter()
    name = _resolve_adapter(peft_model, adapter_name)
    targets, skipped = _collect(peft_model, name)
    if skipped:
        warnings.warn(
            f"pissa_svd.peft.initialize: {len(skipped)} LoRA layer(s) of adapter {name!r} are not "
            f"Linear/Conv1D and keep PEFT's default initialization: {', '.join(skipped)}",
            stacklevel=2,
        )
    _check_devices(targets, method, backend)
    for t in targets:  # before any layer is modified: a NaN would surface midway otherwise
        for what, x in (("base weight", t.weight), ("lora_A", t.A), ("lora_B", t.B)):
            if not all_finite(x):
                raise InputError(f"{t.name}: its {what} holds NaN or inf values; nothing changed")
    p = default_oversample(method, oversample)
    rows: dict[str, dict] = {}
    groups = _groups(targets, name, batch)
    for group in groups:
        rows.update(
            _initialize_group(
                group, name, niter, method, oversample, seed, backend, p, sketch_dtype
            )
        )
    prev = _mark_initialized(peft_model, name)

    # Captured energy of the whole adapter: sum of ||S_r||^2 over sum of ||W||_F^2.
    total_w2 = sum(r["_w2"] for r in rows.values())
    captured = sum(r.pop("_w2") * r["energy_fraction"] for r in rows.values())
    return {
        "adapter": name,
        "modules": {t.name: rows[t.name] for t in targets},  # model order
        "skipped": skipped,
        "totals": {
            "modules": len(targets),
            "svd_calls": len(groups),
            "seconds": round(time.perf_counter() - start, 4),
            "energy_fraction": captured / total_w2 if total_w2 > 0 else 0.0,
        },
        "init_lora_weights_was": prev,
    }


def _check_options(niter: int, method: str, oversample: int | None, backend: str) -> None:
    if isinstance(niter, bool) or not isinstance(niter, int) or niter < 0:
        raise InputError(f"niter must be an int >= 0 (power iterations), got {niter!r}")
    if method not in METHODS:
        raise InputError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if oversample is not None and (
        isinstance(oversample, bool) or not isinstance(oversample, int) or oversample < 0
    ):
        raise InputError(f"oversample must be an int >= 0 or None, got {oversample!r}")
    if backend not in BACKENDS:
        raise InputError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")


def _check_devices(targets: list[_Target], method: str, backend: str) -> None:
    """Backend and method errors, raised before any layer is modified rather than midway."""
    for device in {t.weight.device for t in targets}:
        chosen = resolve_backend(backend, device.type)  # NativeUnavailable says why
        if method == "gesvdr" and (device.type != "cuda" or chosen != "native"):
            raise InputError(
                f"method='gesvdr' is cuSOLVER's and the weights are on {device}: move the model "
                "to CUDA with backend='native', or choose another method"
            )


def _resolve_adapter(model: torch.nn.Module, adapter_name: str | None) -> str:
    configs = getattr(model, "peft_config", None)
    if adapter_name is None:
        active = getattr(model, "active_adapters", None)
        if active is None:
            active = ["default"]
        elif callable(active):  # LoraModel/transformers expose it as a method
            active = active()
        active = [active] if isinstance(active, str) else list(active)
        if len(active) != 1:
            raise InputError(
                f"several adapters are active ({', '.join(active)}): pass adapter_name= to "
                "choose the one to initialize"
            )
        adapter_name = active[0]
    if configs is not None:
        if adapter_name not in configs:
            raise InputError(
                f"no adapter named {adapter_name!r} in the model (it has: "
                f"{', '.join(configs) or 'none'}); pass one of those as adapter_name="
            )
        peft_type = getattr(configs[adapter_name], "peft_type", None)
        if str(getattr(peft_type, "value", peft_type)) != "LORA":
            raise InputError(
                f"adapter {adapter_name!r} is {peft_type}, not LoRA; PiSSA initializes LoRA "
                "adapters only"
            )
    return adapter_name


def _collect(model: torch.nn.Module, name: str) -> tuple[list[_Target], dict[str, str]]:
    """The adapter's LoRA Linear layers to initialize, and the skipped ones with the reason.

    Every refusal is raised here, before anything is modified.
    """
    # Names relative to the wrapped transformers model, so that name + ".weight" is the
    # checkpoint key that `pissa-svd decompose` derives the same seed from.
    root = model.get_base_model() if hasattr(model, "get_base_model") else model
    owners: dict[int, list[str]] = {}
    for pname, param in root.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(pname)

    # Another LoRA adapter anywhere in the model, on these layers or on others, sees base
    # weights that PiSSA replaces with this adapter's residuals: its output would change.
    others = {a for layer in root.modules() if isinstance(layer, LoraLayer) for a in layer.r} - {
        name
    }
    if others:
        raise InputError(
            f"the model also holds adapter(s) {', '.join(map(repr, sorted(others)))}; PiSSA "
            f"replaces the base weights under {name!r} with their residuals, which changes what "
            "the others compute; initialize a model that holds one adapter (delete_adapter() "
            "the others first)"
        )
    targets: list[_Target] = []
    skipped: dict[str, str] = {}
    attention = {n for n, m in root.named_modules() if isinstance(m, torch.nn.MultiheadAttention)}
    for mname, layer in root.named_modules():
        # layer.r, not lora_A: Embedding layers keep their factors in lora_embedding_A/B.
        if not isinstance(layer, LoraLayer) or name not in layer.r:
            continue
        base = layer.get_base_layer()
        # A target_parameters LoRA adapts one parameter (fused experts), not base.weight.
        wrapper = ParamWrapper is not None and isinstance(layer, ParamWrapper)
        weight = layer.get_param() if wrapper else getattr(base, "weight", None)
        why = _quantized(layer, base, weight)
        if why is not None:
            raise InputError(
                f"{mname}: the base layer is quantized ({why}); PiSSA needs the full-precision "
                f"weight: {QUANTIZED_HINT}"
            )
        if not wrapper and (
            not isinstance(layer, LoraLinear) or not isinstance(base, torch.nn.Linear | Conv1D)
        ):
            skipped[mname] = f"{type(layer).__name__} LoRA layer over {type(base).__name__}"
            continue
        if refused := not_adaptable(mname, None, attention):
            raise InputError(
                f"{mname}: {refused[0]}, and the residual would lack its principal part; leave "
                "it out of target_modules"
            )
        if name in getattr(layer, "merged_adapters", ()):
            raise InputError(
                f"{mname}: adapter {name!r} is merged into the base weight; call unmerge_adapter() "
                "first"
            )
        if weight.device.type == "meta":
            raise InputError(
                f"{mname}: the base weight is on the meta device; load the model's weights "
                "before initializing"
            )
        if wrapper:
            targets += _expert_targets(mname, layer, name, weight)
            continue
        variant = layer.lora_variant.get(name)
        if variant is not None and not isinstance(variant, DoraLinearVariant):
            raise InputError(
                f"{mname}: adapter {name!r} uses {type(variant).__name__}, whose output is not "
                "base + s * B @ A; PiSSA supports plain LoRA and DoRA only"
            )
        if weight.ndim != 2:
            raise InputError(
                f"{mname}: the base weight has shape {tuple(weight.shape)}, not a matrix (sharded "
                "by DeepSpeed ZeRO-3 or FSDP?); initialize before sharding the model"
            )
        tied = [n for n in owners.get(id(weight), []) if not n.startswith(f"{mname}.")]
        if tied:
            raise InputError(
                f"{mname}: its weight is tied to {tied[0]}, which the residual would overwrite "
                "too; untie the weights or leave this module out of target_modules"
            )
        t = _Target(
            name=mname,
            weight=weight,
            A=layer.lora_A[name].weight,
            B=layer.lora_B[name].weight,
            rank=int(layer.r[name]),
            scaling=float(layer.scaling[name]),
            fan_in_fan_out=bool(layer.fan_in_fan_out),
        )
        out, inp = t.shape
        a_shape = tuple(layer.lora_A[name].weight.shape)
        b_shape = tuple(layer.lora_B[name].weight.shape)
        if a_shape != (t.rank, inp) or b_shape != (out, t.rank):
            raise InputError(
                f"{mname}: base weight {tuple(weight.shape)} does not match lora_A {a_shape} / "
                f"lora_B {b_shape} with fan_in_fan_out={t.fan_in_fan_out}; set fan_in_fan_out "
                "to the layer's stored layout"
            )
        if t.rank > min(out, inp):
            raise InputError(
                f"{mname}: r={t.rank} exceeds min(out, in) = {min(out, inp)}; lower r for this "
                "module (rank_pattern)"
            )
        targets.append(t)
    if not targets:
        raise InputError(
            f"adapter {name!r} has no LoRA layer over nn.Linear, Conv1D or a parameter to "
            "initialize; check target_modules and target_parameters"
        )
    return targets, skipped


def _expert_targets(mname: str, layer, name: str, param: torch.Tensor) -> list[_Target]:
    """One target per expert of a ``target_parameters`` LoRA (PEFT's ParamWrapper), whose
    parameter ``param`` passed _collect's checks.

    The parameter is (E, out, in), or (E, in, out) where the experts module says
    ``is_transposed``, or a plain (out, in) matrix (E = 1). PEFT keeps expert e's factors at
    rows [e r, (e + 1) r) of lora_A and columns e, e + E, ... of lora_B.
    """
    where = f"{mname} ({layer.parameter_name})"
    if param.ndim not in (2, 3):
        raise InputError(
            f"{where}: the parameter has shape {tuple(param.shape)}, not a (stack of) matrices "
            "(sharded by DeepSpeed ZeRO-3 or FSDP?); initialize before sharding the model"
        )
    experts = param.unsqueeze(0) if param.ndim == 2 else param
    E, r = experts.shape[0], int(layer.r[name])
    transposed = param.ndim == 3 and bool(getattr(layer.get_base_layer(), "is_transposed", False))
    A = layer.lora_A[name].weight
    B = layer.lora_B[name].weight
    out, inp = experts.shape[1:][::-1] if transposed else experts.shape[1:]
    if tuple(A.shape) != (E * r, inp) or tuple(B.shape) != (out, r * E):
        raise InputError(
            f"{where}: parameter {tuple(param.shape)} does not match lora_A {tuple(A.shape)} / "
            f"lora_B {tuple(B.shape)} for {E} expert(s) of rank {r}"
        )
    if r > min(out, inp):
        raise InputError(
            f"{where}: r={r} exceeds min(out, in) = {min(out, inp)}; lower r for this "
            "parameter (rank_pattern)"
        )
    A3, B3 = A.view(E, r, inp), B.view(out, r, E)
    base = f"{unwrapped(mname)}.{layer.parameter_name}"  # the parameter, not the nesting
    return [
        _Target(
            name=base if param.ndim == 2 else f"{base}.{e}",
            weight=experts[e],
            A=A3[e],
            B=B3[:, :, e],
            rank=r,
            scaling=float(layer.scaling[name]),
            fan_in_fan_out=transposed,
        )
        for e in range(E)
    ]


def _quantized(layer: torch.nn.Module, base: torch.nn.Module, weight: object) -> str | None:
    """Why the base weight is not a plain floating tensor PiSSA can split, or None if it is."""
    if getattr(layer, "quantization_backend", None) is not None:
        return type(layer.quantization_backend).__name__
    for obj in (layer, base, weight):
        cls = type(obj)
        if cls.__name__ in QUANTIZED_CLASSES:
            return f"{cls.__module__}.{cls.__name__}"
        if any(
            cls.__module__ == m or cls.__module__.startswith(m + ".") for m in QUANTIZED_MODULES
        ):
            return f"{cls.__module__}.{cls.__name__}"
    if not isinstance(weight, torch.Tensor):
        # Layers without a weight (e.g. MultiheadAttention) are not quantized, just skipped.
        return None
    if type(weight.data) is not torch.Tensor:  # tensor subclasses: torchao, DTensor, ...
        return f"{type(weight.data).__name__} weight"
    if weight.dtype not in FLOAT_DTYPES:  # int8/uint8 packs, fp8
        return f"{weight.dtype} weight"
    return None


def _groups(targets: list[_Target], name: str, batch: bool) -> list[list[_Target]]:
    """Batches of targets that can share one svd_lowrank / pissa_factors call.

    Members agree on (out, in), rank, scaling, layout, device and dtypes; a batch holds at most
    the byte budget of fp32 (out, in) matrices, and at least one.
    """
    by_key: dict[tuple, list[_Target]] = {}
    for t in targets:
        key = (
            t.shape,
            t.rank,
            t.scaling,
            t.fan_in_fan_out,
            t.weight.device,
            t.weight.dtype,
            t.A.dtype,
        )
        by_key.setdefault(key, []).append(t)
    groups = []
    budgets: dict[torch.device, int] = {}
    for key, members in by_key.items():
        device = key[4]
        if device not in budgets:
            budgets[device] = default_batch_memory(device) if batch else 0
        out, inp = key[0]
        itemsize = 8 if key[5] == torch.float64 else 4  # the working dtype, fp64 or fp32
        size = max(1, budgets[device] // (out * inp * itemsize))
        groups += [members[i : i + size] for i in range(0, len(members), size)]
    return groups


@torch.no_grad()
def _initialize_group(
    group: list[_Target],
    name: str,
    niter: int,
    method: str,
    oversample: int | None,
    seed: int,
    backend: str,
    p: int,
    sketch_dtype: torch.dtype | None = None,
) -> dict[str, dict]:
    """Split every member's W (out, in) in one batched SVD and write A, B and W_res back.

    Returns the report rows, by module name.
    """
    start = time.perf_counter()
    t0 = group[0]
    out, inp = t0.shape
    device = t0.weight.device
    work = torch.float64 if t0.weight.dtype == torch.float64 else torch.float32
    # One (b, out, in) working buffer serves the fold, the SVD and, in place, the residual.
    W = torch.empty((len(group), out, inp), dtype=work, device=device)
    folded = []
    for i, t in enumerate(group):
        W[i].copy_(t.weight.mT if t.fan_in_fan_out else t.weight)
        A, B = t.A, t.B
        # A fresh adapter has B == 0; anything else is already part of the model's output, so
        # it goes into W to keep that output unchanged.
        nonzero = bool(B.any()) and bool(A.any())
        if nonzero:
            W[i].addmm_(B.to(device, work), A.to(device, work), alpha=t.scaling)
        folded.append(nonzero)
    w2 = sum_squares(W).cpu()  # ||W_i||_F^2, before the SVD overwrites W
    seeds = [derive_seed(f"{t.name}.weight", seed) for t in group]
    U, S, Vh = svd_lowrank(
        W,
        t0.rank,
        niter=niter,
        oversample=oversample,
        method=method,
        seed=seeds,
        backend=backend,
        sketch_dtype=sketch_dtype,
    )
    adapter_dtype = t0.A.dtype
    A, B, W_res = pissa_factors(
        W,
        t0.rank,
        scaling=t0.scaling,
        adapter_dtype=adapter_dtype,
        residual_dtype=t0.weight.dtype,
        svd=(U, S, Vh),
        inplace=True,
    )
    for i, t in enumerate(group):
        t.A.copy_(A[i])
        t.B.copy_(B[i])
        t.weight.copy_(W_res[i].mT if t.fan_in_fan_out else W_res[i])
    seconds = (time.perf_counter() - start) / len(group)

    resolved = resolve_method(method, out, inp, t0.rank, p, niter)
    S = S.double().cpu()
    rows = {}
    for i, t in enumerate(group):
        captured = float((S[i] ** 2).sum())
        rows[t.name] = {
            "shape": [out, inp],
            "rank": t.rank,
            "scaling": t.scaling,
            "method": resolved,
            "seed": seeds[i],
            "singular_values": [round(float(x), 6) for x in S[i]],
            "energy_fraction": captured / float(w2[i]) if w2[i] > 0 else 0.0,
            "folded": folded[i],
            "batch": len(group),
            "seconds": round(seconds, 4),
            "_w2": float(w2[i]),  # for the weighted total; removed before returning
        }
    return rows


def _mark_initialized(model: torch.nn.Module, name: str) -> object:
    """Set the adapter config's ``init_lora_weights`` to True; return the previous value.

    With a "pissa..." (or "olora", "corda", ...) value, PEFT would re-run that initialization on
    the residual when the saved adapter is loaded, mutating the base weights a second time.
    """
    configs = getattr(model, "peft_config", None)
    if configs is None or name not in configs:
        return None
    prev = configs[name].init_lora_weights
    configs[name].init_lora_weights = True
    return prev
