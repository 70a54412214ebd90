"""Train the output of ``decompose``: frozen residual model + trainable PiSSA adapter.

Two routes to a trainable model, and one small training loop:

- :func:`load_trainable` with ``backend="peft"``: transformers + PEFT, the adapter as PEFT's
  LoRA layers (``PeftModel.from_pretrained(..., subfolder="pissa_init", is_trainable=True)``).
- :func:`apply_pissa`: for any ``nn.Module`` whose submodule names match the checkpoint's tensor
  names; each targeted ``nn.Linear`` (or GPT-2 ``Conv1D``) becomes a :class:`PiSSALinear`.
  :func:`save_adapter` writes the trained adapter in PEFT's format.
- :func:`fit`: AdamW over the trainable parameters, gradient accumulation and clipping,
  periodic adapter checkpoints.

The convention is pissa.py's: W (out, in) = W_res + s * B @ A with A (r, in), B (out, r) and
s = lora_alpha / r; a ``fan_in_fan_out`` residual is stored (in, out), A and B keep their shapes.
transformers and peft are imported inside the functions that need them, never at import time.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .adapter import ADAPTER_FILE, LoraAdapter
from .checkpoint import Checkpoint, read_tensor
from .errors import InputError, read_json
from .loadcheck import checkpoint_names, is_auto_class, model_class
from .output import staged
from .pipeline import ADAPTER_DIR

BACKENDS = ("auto", "peft", "torch")


class PiSSALinear(nn.Module):
    """A linear layer ``y = x @ W_res^T + b + s * (x @ A^T) @ B^T`` with W_res and b frozen.

    Parameters (all on the residual's device):
        weight: W_res, frozen (``requires_grad=False``), any float dtype; (out, in), or (in, out)
            with ``fan_in_fan_out`` (GPT-2's Conv1D layout).
        bias: (out,) frozen, or None.
        lora_A: (r, in) trainable, ``adapter_dtype`` (fp32 by default).
        lora_B: (out, r) trainable, ``adapter_dtype``.

    The frozen matmul runs in the residual's dtype (x is cast to it), the adapter path in the
    adapters' dtype, and the sum is returned in x's dtype, so a bf16 residual with fp32 adapters
    and fp32 activations keeps the adapter's contribution in fp32.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        lora_A: torch.Tensor,
        lora_B: torch.Tensor,
        scaling: float,
        bias: torch.Tensor | None = None,
        *,
        fan_in_fan_out: bool = False,
        adapter_dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        if weight.ndim != 2:
            raise ValueError(f"weight must be 2-D, got shape {tuple(weight.shape)}")
        out_f, in_f = weight.shape[::-1] if fan_in_fan_out else weight.shape
        r = lora_A.shape[0]
        if lora_A.shape != (r, in_f) or lora_B.shape != (out_f, r):
            raise ValueError(
                f"lora_A {tuple(lora_A.shape)} / lora_B {tuple(lora_B.shape)} do not fit a "
                f"{out_f} x {in_f} layer: expected ({r}, {in_f}) / ({out_f}, {r})"
            )
        if bias is not None and bias.shape != (out_f,):
            raise ValueError(f"bias must have shape ({out_f},), got {tuple(bias.shape)}")
        if not scaling > 0:
            raise ValueError(f"scaling must be > 0, got {scaling}")
        dev = weight.device
        self.weight = nn.Parameter(weight.detach(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.lora_A = nn.Parameter(lora_A.detach().to(dev, adapter_dtype, copy=True))
        self.lora_B = nn.Parameter(lora_B.detach().to(dev, adapter_dtype, copy=True))
        self.scaling = float(scaling)
        self.fan_in_fan_out = fan_in_fan_out
        self.in_features, self.out_features, self.r = in_f, out_f, r
        self.merged = False
        # Set by merge(exact=True): the residual as it was before merging.
        self.register_buffer("_unmerged_weight", None, persistent=False)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Module,
        A: torch.Tensor,
        B: torch.Tensor,
        scaling: float,
        fan_in_fan_out: bool = False,
        *,
        residual: torch.Tensor | None = None,
        adapter_dtype: torch.dtype = torch.float32,
    ) -> PiSSALinear:
        """Wrap an ``nn.Linear`` (weight (out, in)) or a GPT-2 ``Conv1D`` (weight (in, out), pass
        ``fan_in_fan_out=True``).

        ``linear.weight`` is taken as the residual W_res unless ``residual`` (same layout and
        shape) is given; ``linear.bias`` is kept. A: (r, in), B: (out, r). The frozen tensors are
        shared with ``linear``, not copied.
        """
        weight = linear.weight if residual is None else residual
        if weight.shape != linear.weight.shape:
            raise ValueError(
                f"residual has shape {tuple(weight.shape)}, the layer's weight "
                f"{tuple(linear.weight.shape)}"
            )
        return cls(
            weight,
            A,
            B,
            scaling,
            getattr(linear, "bias", None),
            fan_in_fan_out=fan_in_fan_out,
            adapter_dtype=adapter_dtype,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., in) any float dtype -> (..., out) in x's dtype."""
        W = self.weight
        bias = None if self.bias is None else self.bias.to(W.dtype)
        y = F.linear(x.to(W.dtype), W.T if self.fan_in_fan_out else W, bias).to(x.dtype)
        if self.merged:
            return y
        h = F.linear(x.to(self.lora_A.dtype), self.lora_A)  # (..., r)
        return y + (F.linear(h, self.lora_B) * self.scaling).to(x.dtype)

    def delta_weight(self) -> torch.Tensor:
        """s * B @ A in the residual's stored layout, fp32 (fp64 for an fp64 residual)."""
        work = torch.promote_types(self.weight.dtype, torch.float32)
        delta = self.scaling * (self.lora_B.detach().to(work) @ self.lora_A.detach().to(work))
        return delta.T if self.fan_in_fan_out else delta

    @torch.no_grad()
    def merge(self, *, exact: bool = False) -> None:
        """Fold s * B @ A into the residual (summed in fp32, rounded to the residual's dtype).

        While merged, forward skips the adapter path, so A and B get no gradients.
        ``unmerge()`` subtracts the same product back, which restores the residual up to one
        rounding of the sum and one of the difference: elementwise within
        ``(u + 2^-23) * (|W_res| + |W_merged|)``, u the unit roundoff of the residual's dtype
        (2^-24 for fp32, 2^-8 for bf16; 2^-23 covers the fp32 sum before rounding to bf16).
        Do not change A or B while merged, or the subtraction no longer matches. With ``exact=True`` the unmerged residual is kept (one more weight
        in memory until unmerge) and restored bit for bit instead.
        """
        if self.merged:
            raise RuntimeError("PiSSALinear is already merged")
        old, delta = self.weight.data, self.delta_weight()
        self.weight.data = (old.to(delta.dtype) + delta).to(old.dtype)
        self._unmerged_weight = old if exact else None
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge`; see there for how exact the round trip is."""
        if not self.merged:
            raise RuntimeError("PiSSALinear is not merged")
        if self._unmerged_weight is not None:
            self.weight.data, self._unmerged_weight = self._unmerged_weight, None
        else:
            W, delta = self.weight.data, self.delta_weight()
            self.weight.data = (W.to(delta.dtype) - delta).to(W.dtype)
        self.merged = False

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
            f"scaling={self.scaling:g}, fan_in_fan_out={self.fan_in_fan_out}, "
            f"residual_dtype={self.weight.dtype}, adapter_dtype={self.lora_A.dtype}, "
            f"merged={self.merged}"
        )


# --- loading ----------------------------------------------------------------------------------


def _is_conv1d(mod: nn.Module) -> bool:
    # transformers' Conv1D, detected by name so that this module never imports transformers.
    return type(mod).__name__ == "Conv1D" and getattr(mod, "weight", None) is not None


def apply_pissa(
    module: nn.Module,
    out_dir: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    adapter_dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """Turn ``module`` into a PiSSA-trainable model, in place, from a ``decompose`` output.

    Every module named in OUT/pissa_init's adapter keys (``base_model.model.<name>.lora_A``)
    is looked up as ``module.get_submodule(<name>)``, so submodule names must match the
    checkpoint's tensor names (as they do for the transformers model it was saved from). Each
    must be an ``nn.Linear`` (or a GPT-2 ``Conv1D`` when the adapter says ``fan_in_fan_out``);
    it is replaced by a :class:`PiSSALinear` holding the residual read from OUT's safetensors
    (on the layer's device, in ``dtype`` or else the layer's current dtype), the layer's bias,
    and trainable A, B in ``adapter_dtype``. Every other parameter is frozen.

    The module may hold the original or the residual weights: non-target tensors are the same
    in both. Everything is checked before the first layer is replaced; problems raise
    :class:`InputError`. The adapter config is kept as ``module.pissa_adapter_config`` for
    :func:`save_adapter`. Returns ``module``.
    """
    out_dir = Path(out_dir)
    _check_out_dir(out_dir)
    adapter = LoraAdapter.load(out_dir / ADAPTER_DIR, what="PiSSA adapter")
    adapter_file = out_dir / ADAPTER_DIR / ADAPTER_FILE
    if adapter.extra:
        raise InputError(
            f"{adapter_file}: holds non-LoRA tensors ({next(iter(adapter.extra))!r}, ...); "
            "use the peft backend for adapters with modules_to_save"
        )
    fan = adapter.fan_in_fan_out
    ck = Checkpoint.open(out_dir)
    infos = {i.name: i for i in ck.tensors()}
    names = checkpoint_names(ck)  # the adapter names modules as loaded, the files may not
    plan = []
    for name in adapter.modules:
        try:
            layer = module.get_submodule(name)
        except AttributeError:
            raise InputError(_missing_module(module, name, adapter_file)) from None
        kind = "Conv1D" if fan else "nn.Linear"
        ok = _is_conv1d(layer) if fan else isinstance(layer, nn.Linear)
        if not ok or isinstance(layer, PiSSALinear):
            raise InputError(
                f"{adapter_file}: targets {name!r}, a {type(layer).__name__}; expected an "
                f"unpatched {kind} (the adapter config says fan_in_fan_out={fan})"
            )
        stored = tuple(layer.weight.shape)
        out_f, in_f = stored[::-1] if fan else stored
        if adapter.stored_shape(name) != stored:
            A, B = adapter.A[name], adapter.B[name]
            raise InputError(
                f"{adapter_file}: {name!r} has lora_A {tuple(A.shape)} / lora_B "
                f"{tuple(B.shape)} but the model's layer is {out_f} x {in_f}; the adapter "
                "belongs to another model"
            )
        info = infos.get(names.tensor(f"{name}.weight"))
        if info is None:
            raise InputError(
                f"{out_dir}: no tensor {names.tensor(f'{name}.weight')} for the adapter's "
                f"target {name!r}; the residual model and pissa_init/ do not belong together"
            )
        if info.shape != stored:
            raise InputError(
                f"{info.path}: tensor {info.name!r} has shape {info.shape} but the model's "
                f"layer weight is {stored}; the model does not match the decomposed checkpoint"
            )
        plan.append((name, layer, info))

    for p in module.parameters():
        p.requires_grad_(False)
    for name, layer, info in plan:
        # One residual in memory at a time: read, wrap, and let the old weight go.
        W = read_tensor(info).to(layer.weight.device, dtype or layer.weight.dtype)
        A, B, s = adapter.A[name], adapter.B[name], adapter.scaling(name)
        new = PiSSALinear.from_linear(layer, A, B, s, fan, residual=W, adapter_dtype=adapter_dtype)
        parent, _, leaf = name.rpartition(".")
        setattr(module.get_submodule(parent) if parent else module, leaf, new)
    module.pissa_adapter_config = dict(adapter.config)
    return module


def _check_out_dir(out_dir: Path) -> None:
    if not out_dir.is_dir():
        raise InputError(
            f"{out_dir}: no such folder; create it with `pissa-svd decompose SRC --rank R "
            f"--out {out_dir}`"
        )
    if not (out_dir / ADAPTER_DIR).is_dir():
        raise InputError(
            f"{out_dir}: has no {ADAPTER_DIR}/ adapter folder; point at the --out folder of "
            "`pissa-svd decompose`"
        )


def _model_class(out_dir: Path, trust_remote_code: bool):
    """The transformers class for ``out_dir``'s config.json (:func:`loadcheck.model_class`)."""
    cfg_path = out_dir / "config.json"
    if not cfg_path.is_file():
        raise InputError(f"{cfg_path}: missing; the residual model needs its config.json")
    config = read_json(cfg_path)
    cls = model_class(config)
    if "auto_map" in config and not trust_remote_code and is_auto_class(cls):
        raise InputError(
            f"{out_dir}: only the model's own code loads it (auto_map in config.json, "
            f"architectures {config.get('architectures')}); pass trust_remote_code=True to run "
            "it, as from_pretrained would"
        )
    return cls


def load_trainable(
    out_dir: str | os.PathLike,
    *,
    backend: str = "auto",
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
) -> nn.Module:
    """Load a ``decompose`` output folder as a model with the residual frozen and A, B trainable.

    The residual model is loaded with the transformers class in config.json's
    ``architectures`` (``dtype`` as in ``from_pretrained``; None keeps transformers' default),
    or, with ``trust_remote_code=True``, the model's own code that decompose copied beside it
    (``auto_map``), as ``from_pretrained(..., trust_remote_code=True)`` loads it. Then:

    - ``backend="peft"``: ``PeftModel.from_pretrained(model, out_dir, subfolder="pissa_init",
      is_trainable=True)``; returns a ``PeftModel`` (adapters fp32, PEFT's default).
    - ``backend="torch"``: :func:`apply_pissa` (no PEFT needed); returns the transformers model
      with :class:`PiSSALinear` layers (adapters fp32).
    - ``backend="auto"``: peft when it can be imported, else torch.

    The model is moved to ``device`` and left in train mode.
    """
    if backend not in BACKENDS:
        raise InputError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    out_dir = Path(out_dir)
    _check_out_dir(out_dir)
    try:
        cls = _model_class(out_dir, trust_remote_code)
    except ImportError:
        raise InputError(
            "load_trainable needs transformers (pip install transformers); for your own "
            "nn.Module use apply_pissa(module, out_dir)"
        ) from None
    if backend == "auto":
        try:
            import peft  # noqa: F401

            backend = "peft"
        except ImportError:
            backend = "torch"
    kwargs = {} if dtype is None else {"dtype": dtype}
    model = cls.from_pretrained(out_dir, trust_remote_code=trust_remote_code, **kwargs)
    if backend == "peft":
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, out_dir, subfolder=ADAPTER_DIR, is_trainable=True)
    else:
        apply_pissa(model, out_dir)
    return model.to(device).train()


# --- saving -----------------------------------------------------------------------------------


def _missing_module(module: nn.Module, name: str, adapter_file: Path) -> str:
    """Why the adapter's module ``name`` is not in ``module``: fused experts (one parameter
    for all experts of a layer, as transformers 5 builds mixture-of-experts models), which
    only PEFT's target_parameters LoRA adapts, or another architecture."""
    # transformers may also rename the container on load (Mixtral's block_sparse_moe -> mlp).
    fused = [
        m
        for n, m in module.named_modules()
        if n.endswith(".experts") and not isinstance(m, nn.ModuleList)
    ]
    if ".experts." in name and fused:
        return (
            f"{adapter_file}: targets expert module {name!r}, but this model fuses its "
            f"experts ({type(fused[0]).__name__}); the torch backend adapts nn.Linear layers "
            "only: use backend='peft', which loads per-expert adapters onto fused experts"
        )
    return (
        f"{adapter_file}: targets module {name!r}, which the model does not have; apply it "
        "to the architecture that was decomposed (submodule names must match its tensor names)"
    )


def save_adapter(
    module: nn.Module,
    save_dir: str | os.PathLike,
    *,
    base_config: dict | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the adapters of a :class:`PiSSALinear`-patched module in PEFT's format.

    ``save_dir/adapter_model.safetensors`` holds ``base_model.model.<name>.lora_A.weight``
    (r, in) and ``.lora_B.weight`` (out, r) for every PiSSALinear, ``<name>`` its path in
    ``module``, in the adapters' dtype. ``save_dir/adapter_config.json`` is ``base_config``
    (default: the one :func:`apply_pissa` loaded) with r, lora_alpha, use_rslora,
    target_modules and fan_in_fan_out set from the layers (one r and scaling for all of them). Load the result on the residual model with
    ``PeftModel.from_pretrained(residual_model, save_dir)``. Returns ``save_dir``.

    The folder is written whole into a temporary sibling and renamed into place. One that
    exists and is not empty (e.g. decompose's ``pissa_init``, which to-lora needs) is only
    replaced with ``overwrite=True``.
    """
    layers = {n: m for n, m in module.named_modules() if isinstance(m, PiSSALinear)}
    if not layers:
        raise InputError("the module has no PiSSALinear layers to save; call apply_pissa first")
    shapes = {(m.r, m.scaling, m.fan_in_fan_out) for m in layers.values()}
    if len(shapes) > 1:
        raise InputError(
            "PEFT's adapter_config holds one r, lora_alpha and fan_in_fan_out, but the "
            f"PiSSALinear layers mix (r, scaling, fan_in_fan_out) = {sorted(shapes)}"
        )
    r, scaling, fan = shapes.pop()
    config = dict(base_config or getattr(module, "pissa_adapter_config", None) or {})
    alpha, rslora = config.get("lora_alpha"), bool(config.get("use_rslora"))
    denom = math.sqrt(r) if rslora else r
    if not (config.get("r") == r and isinstance(alpha, (int, float)) and alpha / denom == scaling):
        # No base config, or one that disagrees with the layers: describe the layers as they are.
        alpha, rslora = scaling * r, False
        alpha = int(alpha) if float(alpha).is_integer() else alpha
    config.update(
        peft_type="LORA",
        r=r,
        lora_alpha=alpha,
        use_rslora=rslora,
        target_modules=sorted(layers),
        fan_in_fan_out=fan,
        rank_pattern={},
        alpha_pattern={},
    )
    for key, default in (
        ("task_type", None),
        ("init_lora_weights", True),
        ("lora_dropout", 0.0),
        ("bias", "none"),
    ):
        config.setdefault(key, default)
    save_dir = Path(save_dir)
    _claim(save_dir, overwrite)
    A = {n: m.lora_A.detach().cpu() for n, m in layers.items()}
    B = {n: m.lora_B.detach().cpu() for n, m in layers.items()}
    with staged(save_dir, overwrite) as tmp:
        LoraAdapter(save_dir, config, A, B).save(tmp)
    return save_dir


def save_checkpoint(
    model: nn.Module, save_dir: str | os.PathLike, *, overwrite: bool = False
) -> Path:
    """The adapter in PEFT format: ``save_pretrained`` for a PeftModel, else :func:`save_adapter`.
    Either way a ``save_dir`` that exists and is not empty is replaced only with ``overwrite``."""
    save_dir = Path(save_dir)
    peft = sys.modules.get("peft")  # a PeftModel implies peft is already imported
    if peft is None or not isinstance(model, peft.PeftModel):
        return save_adapter(model, save_dir, overwrite=overwrite)
    _claim(save_dir, overwrite)
    with staged(save_dir, overwrite) as tmp:
        model.save_pretrained(tmp)
    return save_dir


def _claim(save_dir: Path, overwrite: bool) -> None:
    """Refuse a ``save_dir`` that holds something (unless ``overwrite``); an empty one made for
    the save is removed, so that it is written like a new one."""
    _check_free(save_dir, overwrite)
    if save_dir.is_dir() and not any(save_dir.iterdir()):
        save_dir.rmdir()


def _check_free(save_dir: Path, overwrite: bool) -> None:
    if (
        not overwrite
        and save_dir.exists()
        and not (save_dir.is_dir() and not any(save_dir.iterdir()))
    ):
        raise InputError(
            f"{save_dir} already exists; pass overwrite=True to replace it, or another folder"
        )


# --- training ---------------------------------------------------------------------------------


def _finite_number(x: object) -> bool:
    """A finite real number: int, float, or a numpy / one-element torch scalar (not a bool)."""
    if isinstance(x, (bool, str)) or getattr(x, "dtype", None) in (torch.bool, bool):
        return False
    try:
        return math.isfinite(float(x))
    except (TypeError, ValueError, RuntimeError):
        return False


def _cycle(batches: Iterable, needed: int) -> Iterator:
    """Yield micro-batches, restarting a re-iterable (list, DataLoader) when it runs out."""
    given = 0
    while True:
        before = given
        for b in batches:
            given += 1
            yield b
        if given == before:
            raise InputError(
                f"batches ran out after {given} of {needed} micro-batches; pass a list, a "
                "DataLoader or an endless generator"
            )


def _to(batch, device: torch.device):
    if isinstance(batch, dict):
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    return batch


def _model_loss(model: nn.Module, batch: object) -> torch.Tensor:
    """``model(**batch).loss``, or an InputError saying what the batch lacks."""
    if not isinstance(batch, Mapping):
        raise InputError(
            f"a batch is a {type(batch).__name__}: without loss_fn, batches must be dicts of "
            "tensors for model(**batch) (e.g. input_ids and labels), or pass loss_fn"
        )
    loss = getattr(model(**batch), "loss", None)
    if not isinstance(loss, torch.Tensor):
        raise InputError(
            "the model's output has no loss: add labels to the batches (transformers computes "
            "the loss from them), or pass loss_fn(model, batch)"
        )
    return loss


def fit(
    model: nn.Module,
    batches: Iterable,
    *,
    steps: int,
    lr: float = 2e-4,
    grad_accum: int = 1,
    max_grad_norm: float | None = 1.0,
    weight_decay: float = 0.0,
    loss_fn: Callable[[nn.Module, object], torch.Tensor] | None = None,
    save_every: int | None = None,
    save_dir: str | os.PathLike | None = None,
    seed: int | None = None,
    progress: bool = True,
    log_every: int = 10,
) -> list[float]:
    """Train the parameters that require grad (the adapters) for ``steps`` optimizer steps.

    Each step averages the loss over ``grad_accum`` micro-batches drawn from ``batches``
    (restarted when exhausted, so a one-element list repeats one batch). A micro-batch is a
    dict of tensors, moved to the model's device and passed as ``model(**batch)``, whose output
    has ``.loss`` (transformers style); or anything, when ``loss_fn(model, batch)`` returns the
    scalar loss instead. AdamW (``lr``, ``weight_decay``), gradients clipped to
    ``max_grad_norm`` (None: no clipping), bf16 autocast when the model is on CUDA (fp32 math
    on CPU). With a ``save_dir``, the adapter is written in PEFT format to
    ``save_dir/checkpoint-<step>`` (:func:`save_checkpoint`) every ``save_every`` steps and
    after the last step; a run whose checkpoint folders already exist is refused before its
    first step. ``seed`` seeds torch (dropout).
    The progress bar shows the mean loss of the last ``log_every`` steps.

    Returns the loss of each step (mean over its micro-batches), as floats.
    """
    from tqdm.auto import tqdm

    counts = (steps, grad_accum, log_every)
    if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 1 for c in counts):
        raise InputError(
            f"steps, grad_accum and log_every must be ints >= 1, got {steps!r}, {grad_accum!r}, "
            f"{log_every!r}"
        )
    if save_every is not None and (
        isinstance(save_every, bool) or not isinstance(save_every, int) or save_every < 1
    ):
        raise InputError(f"save_every must be an int >= 1 or None, got {save_every!r}")
    if save_every is not None and save_dir is None:
        raise InputError("save_every needs a save_dir to write the checkpoints into")
    if not (_finite_number(lr) and lr > 0):
        raise InputError(f"lr must be a finite number > 0, got {lr!r}")
    if not (_finite_number(weight_decay) and weight_decay >= 0):
        raise InputError(f"weight_decay must be a finite number >= 0, got {weight_decay!r}")
    if max_grad_norm is not None and not (_finite_number(max_grad_norm) and max_grad_norm > 0):
        raise InputError(
            f"max_grad_norm must be a finite number > 0, or None for no clipping, got "
            f"{max_grad_norm!r}"
        )
    # Checkpoints every save_every steps and after the last one; none may exist yet (a
    # previous run's would be lost), checked before the first step rather than at its save.
    saves: set[int] = set()
    if save_dir is not None:
        saves = set(range(save_every, steps + 1, save_every)) if save_every else set()
        saves.add(steps)
    for step in sorted(saves):
        _check_free(Path(save_dir) / f"checkpoint-{step}", overwrite=False)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise InputError(
            "the model has no trainable parameters; load it with load_trainable or apply_pissa"
        )
    if seed is not None:
        torch.manual_seed(seed)
    device = params[0].device
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device.type == "cuda"
        else contextlib.nullcontext()
    )
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    micro = _cycle(batches, steps * grad_accum)
    was_training = model.training
    model.train()
    losses: list[float] = []
    bar = tqdm(range(1, steps + 1), desc="fit", disable=not progress, dynamic_ncols=True)
    for step in bar:
        total = torch.zeros((), device=device)
        for _ in range(grad_accum):
            batch = _to(next(micro), device)
            with autocast:
                loss = loss_fn(model, batch) if loss_fn is not None else _model_loss(model, batch)
            (loss / grad_accum).backward()
            total += loss.detach().float()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(total) / grad_accum)
        if step % log_every == 0 or step == steps:
            recent = losses[-log_every:]
            bar.set_postfix(loss=f"{sum(recent) / len(recent):.4f}")
        if step in saves:
            save_checkpoint(model, Path(save_dir) / f"checkpoint-{step}")
    bar.close()
    model.train(was_training)
    return losses


__all__ = [
    "BACKENDS",
    "PiSSALinear",
    "apply_pissa",
    "fit",
    "load_trainable",
    "save_adapter",
    "save_checkpoint",
]
