"""PEFT LoRA adapters on disk: read, check, write. No math beyond the LoRA scaling.

An adapter folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` (or the older
``adapter_model.bin``) with keys ``base_model.model.<module>.lora_A.weight`` (r, in) and
``base_model.model.<module>.lora_B.weight`` (out, r). Its update to the weight of ``<module>``
is ``s * B @ A`` in the (out, in) layout (transposed for ``fan_in_fan_out`` layers, GPT-2's
Conv1D), with ``s = lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with ``use_rslora``.
Adapters are small (rank x (in + out) per module), so they are loaded whole.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoint import Checkpoint, read_tensor
from .errors import InputError, read_json
from .output import guarded, write_json

ADAPTER_FILE = "adapter_model.safetensors"
ADAPTER_BIN = "adapter_model.bin"
ADAPTER_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<which>[AB])\.weight$")
_UNSUPPORTED = ("lora_embedding_", "lora_magnitude_vector")


def peft_key(module: str, which: str) -> str:
    """The PEFT state-dict key of ``module``'s ``lora_A``/``lora_B`` weight (which: "A"/"B")."""
    return f"{PEFT_PREFIX}{module}.lora_{which}.weight"


@dataclass
class LoraAdapter:
    """A PEFT LoRA adapter: config plus, per module, A (r, in) and B (out, r).

    ``extra`` keeps any non-LoRA tensors (``modules_to_save`` copies) unchanged.
    """

    root: Path
    config: dict
    A: dict[str, torch.Tensor]
    B: dict[str, torch.Tensor]
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | Path, what: str = "adapter") -> LoraAdapter:
        """Read and check an adapter folder; ``what`` names it in error messages."""
        root = Path(path)
        if not root.is_dir():
            raise InputError(f"{what} {root}: no such folder; pass a PEFT adapter folder")
        config = _read_config(root, what)
        tensors = _read_tensors(root, what)
        A: dict[str, torch.Tensor] = {}
        B: dict[str, torch.Tensor] = {}
        extra: dict[str, torch.Tensor] = {}
        for key, t in tensors.items():
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise InputError(
                    f"{what} {root}: {key!r} holds NaN or inf values (training diverged?); "
                    "use a checkpoint saved before it did"
                )
            if any(u in key for u in _UNSUPPORTED):
                raise InputError(
                    f"{what} {root}: {key!r} is an embedding or DoRA weight; only LoRA on "
                    "linear layers is supported"
                )
            m = _LORA_KEY.match(key)
            if m is None:
                extra[key] = t
                continue
            if t.ndim != 2 or not t.is_floating_point():
                raise InputError(f"{what} {root}: {key!r} must be a 2-D float tensor")
            (A if m["which"] == "A" else B)[m["module"]] = t
        if not A:
            raise InputError(f"{what} {root}: no lora_A/lora_B weights in the adapter file")
        for module in sorted(A):
            if not targeted(config, module):
                raise InputError(
                    f"{what} {root}: holds weights for {module}, which {ADAPTER_CONFIG}'s "
                    f"{_target_setting(config, module)} does not cover, so PEFT would not load "
                    "them; fix the config or remove those weights"
                )
        for module in sorted(set(A) ^ set(B)):
            has = "lora_A" if module in A else "lora_B"
            raise InputError(f"{what} {root}: module {module} has {has} but not its partner")
        for module in A:
            if A[module].shape[0] != B[module].shape[1]:
                raise InputError(
                    f"{what} {root}: {module}: lora_A {tuple(A[module].shape)} and lora_B "
                    f"{tuple(B[module].shape)} disagree on the rank"
                )
        adapter = cls(root, config, A, B, extra)
        for module in A:
            if fused_container(config, module) is not None:
                continue  # E experts' ranks in one module: fused.fused_params checks it
            expected = adapter.config_rank(module)
            if expected is not None and expected != adapter.rank(module):
                raise InputError(
                    f"{what} {root}: {module} has rank {adapter.rank(module)} but "
                    f"{ADAPTER_CONFIG} says r={expected}; the adapter is inconsistent"
                )
        return adapter

    @property
    def modules(self) -> list[str]:
        return sorted(self.A)

    @property
    def fan_in_fan_out(self) -> bool:
        return bool(self.config.get("fan_in_fan_out", False))

    def rank(self, module: str) -> int:
        return int(self.A[module].shape[0])

    def shape(self, module: str) -> tuple[int, int]:
        """(out, in) of the weight this module's update applies to."""
        return int(self.B[module].shape[0]), int(self.A[module].shape[1])

    def stored_shape(self, module: str) -> tuple[int, int]:
        """The weight's shape as stored: (out, in), or (in, out) for ``fan_in_fan_out``."""
        out_f, in_f = self.shape(module)
        return (in_f, out_f) if self.fan_in_fan_out else (out_f, in_f)

    def config_rank(self, module: str) -> int | None:
        """The rank adapter_config.json gives ``module`` (or a fused parameter), if any."""
        r = pattern_value(self.config.get("rank_pattern") or {}, module, self.config.get("r"))
        return None if r is None else int(r)

    def scaling(self, module: str) -> float:
        """s in ``W + s * B @ A``, exactly as PEFT computes it."""
        return self.scaling_at(module, self.rank(module))

    def scaling_at(self, name: str, rank: int) -> float:
        """PEFT's s = alpha / rank (alpha / sqrt(rank) with rsLoRA), alpha looked up for
        ``name`` in alpha_pattern: a module, or a fused parameter (:mod:`pissa_svd.fused`)."""
        alpha = self.config.get("lora_alpha", self.config.get("r", rank))
        alpha = pattern_value(self.config.get("alpha_pattern") or {}, name, alpha)
        return float(alpha) / (math.sqrt(rank) if self.config.get("use_rslora") else rank)

    def delta(self, module: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """s * B @ A in the (out, in) layout, computed in ``dtype``."""
        B, A = self.B[module].to(dtype), self.A[module].to(dtype)
        return (B * self.scaling(module)) @ A

    def stored_delta(self, module: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """:meth:`delta` in the weight's stored layout (transposed for ``fan_in_fan_out``)."""
        d = self.delta(module, dtype)
        return d.mT if self.fan_in_fan_out else d

    def save(self, dest: Path) -> None:
        """Write ``dest/adapter_config.json`` and ``dest/adapter_model.safetensors``."""
        dest.mkdir(parents=True, exist_ok=True)
        tensors = {**self.extra}
        for module in self.modules:
            tensors[peft_key(module, "A")] = self.A[module].contiguous()
            tensors[peft_key(module, "B")] = self.B[module].contiguous()
        write_json(dest / ADAPTER_CONFIG, self.config)
        path = dest / ADAPTER_FILE
        guarded(lambda: _save_safetensors(tensors, path), path)


def _save_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors' ``save_file``, with a file-system error it wraps (its message ends in
    "(os error N)", e.g. 28 for a full disk) raised as that OSError."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path), metadata={"format": "pt"})
    except SafetensorError as exc:
        code = re.search(r"\(os error (\d+)\)", str(exc))
        if code is None:
            raise
        raise OSError(int(code[1]), os.strerror(int(code[1])), str(path)) from None


def fused_container(config: dict, module: str) -> str | None:
    """For PEFT's LoRA of fused expert parameters (``target_parameters``, see
    :mod:`pissa_svd.fused`): the experts container a module key adapts, else None."""
    if not config.get("target_parameters"):
        return None
    container = unwrapped(module)
    return container if container.endswith(".experts") else None


def targeted(config: dict, module: str) -> bool:
    """Whether PEFT puts a LoRA on ``module`` under ``config``, as its
    ``check_target_module_exists`` decides (PEFT does not load an adapter's weights for other
    modules). Fused experts (:func:`fused_container`) are matched against target_parameters,
    as PEFT matches ``<container>.<parameter>``. Without target_modules or target_parameters
    PEFT uses its defaults for the model type, which the adapter does not name: any module."""
    container = fused_container(config, module)
    if container is not None:
        return any(
            _listed([t], f"{container}.{t.rpartition('.')[2]}") for t in config["target_parameters"]
        )
    excluded = config.get("exclude_modules")
    if excluded and _listed(excluded, module):
        return False
    if any(re.match(rf"(^|.*\.){m}($|\..*)", module) for m in config.get("modules_to_save") or []):
        return False  # PEFT never adapts a module it saves whole
    targets = config.get("target_modules")
    if targets is None:
        return not config.get("target_parameters")
    if isinstance(targets, str):
        return targets.lower() == "all-linear" or re.fullmatch(targets, module) is not None
    if module in targets:
        return True  # named in full: layers_to_transform does not apply
    return _listed(targets, module) and _in_layers(config, module)


def _listed(patterns: str | list[str], module: str) -> bool:
    """PEFT's name matching: a string is a regex for the whole name; a list entry matches the
    name or its suffix after a dot."""
    if isinstance(patterns, str):
        return re.fullmatch(patterns, module) is not None
    return any(module == p or module.endswith(f".{p}") for p in patterns)


def _in_layers(config: dict, module: str) -> bool:
    """PEFT's layers_to_transform filter: the first ``<layers_pattern>.<index>.`` of the name
    (any ``<word>.<index>.`` without a pattern) must hold one of the listed layer indexes."""
    layers = config.get("layers_to_transform")
    if layers is None or layers == []:
        return True
    patterns = config.get("layers_pattern") or []
    regexes = [
        rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\."
        for p in ([patterns] if isinstance(patterns, str) else patterns)
    ] or [r".*?\.[^.]*\.(?P<idx>\d+)\."]
    matches = [m for r in regexes if (m := re.match(r, module))]
    if not matches:
        return False
    index = int(matches[0]["idx"])
    return index == layers if isinstance(layers, int) else index in layers


def _target_setting(config: dict, module: str) -> str:
    """The config entries that decided that ``module`` is not adapted, for an error message."""
    if fused_container(config, module) is not None:
        return f"target_parameters {config['target_parameters']!r}"
    keys = ("target_modules", "layers_to_transform", "exclude_modules", "modules_to_save")
    return ", ".join(f"{k} {config[k]!r}" for k in keys if config.get(k) is not None)


def unwrapped(module: str) -> str:
    """A module name without PEFT's trailing ``.base_layer`` (nested wrappers add several)."""
    while module.endswith(".base_layer"):
        module = module.removesuffix(".base_layer")
    return module


def pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern/alpha_pattern lookup: a key matches a module name's suffix."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _read_config(root: Path, what: str) -> dict:
    path = root / ADAPTER_CONFIG
    if not path.is_file():
        hint = (
            f" (the adapter decompose wrote is {root / 'pissa_init'})"
            if (root / "pissa_init" / ADAPTER_CONFIG).is_file()
            else ""
        )
        raise InputError(f"{what} {root}: no {ADAPTER_CONFIG}; pass a PEFT adapter folder{hint}")
    config = read_json(path)
    if not isinstance(config, dict):
        raise InputError(f"{path}: expected a JSON object; pass a PEFT adapter folder")
    if config.get("peft_type", "LORA") != "LORA":
        raise InputError(f"{path}: peft_type is {config['peft_type']!r}; only LORA is supported")
    if config.get("use_dora"):
        raise InputError(f"{path}: use_dora is true; DoRA adapters are not supported, only LoRA")
    _check_numbers(config, path)
    return config


def _positive(value, integer: bool) -> bool:
    kinds = int if integer else (int, float)
    return isinstance(value, kinds) and not isinstance(value, bool) and 0 < value < math.inf


def _check_numbers(config: dict, path: Path) -> None:
    """r and lora_alpha, and their patterns, are what the LoRA scaling is made of."""
    for key, integer in (("r", True), ("lora_alpha", False)):
        if key in config and not _positive(config[key], integer):  # null too: PEFT fails
            raise InputError(f"{path}: {key} must be a positive number, got {config[key]!r}")
    for key, integer in (("rank_pattern", True), ("alpha_pattern", False)):
        patterns = config.get(key) or {}
        if not isinstance(patterns, dict) or not all(
            isinstance(k, str) and _positive(v, integer) for k, v in patterns.items()
        ):
            raise InputError(
                f"{path}: {key} must map module patterns to positive numbers, got {patterns!r}"
            )
    if not isinstance(config.get("target_parameters") or [], list):
        raise InputError(f"{path}: target_parameters must be a list of parameter names")
    _check_patterns(config, path)


def _check_patterns(config: dict, path: Path) -> None:
    """The module-name settings :func:`targeted` reads: a regex string or a list of names."""
    for key in ("target_modules", "exclude_modules", "modules_to_save", "layers_pattern"):
        value = config.get(key)
        if value is None:
            continue
        names = [value] if isinstance(value, str) else value
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise InputError(f"{path}: {key} must be a string or a list of strings, got {value!r}")
        for n in names:
            try:
                re.compile(n)
            except re.error as exc:
                raise InputError(f"{path}: {key} {n!r} is not a valid regex ({exc})") from None
    layers = config.get("layers_to_transform")
    if not (
        layers is None
        or (isinstance(layers, int) and not isinstance(layers, bool))
        or (isinstance(layers, list) and all(isinstance(i, int) for i in layers))
    ):
        raise InputError(f"{path}: layers_to_transform must be a layer index or a list of them")


def _read_tensors(root: Path, what: str) -> dict[str, torch.Tensor]:
    st, pt = root / ADAPTER_FILE, root / ADAPTER_BIN
    if st.is_file():
        ck = Checkpoint.open(st)  # validates the header, offsets and size
        return {t.name: read_tensor(t) for t in ck.tensors()}
    if pt.is_file():
        try:
            with warnings.catch_warnings():  # torch warns on odd pickles: the error says it all
                warnings.simplefilter("ignore")
                state = torch.load(pt, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for a corrupt pickle
            raise InputError(
                f"{pt}: unreadable ({exc.__class__.__name__}: {_pickle_reason(exc)}); save the "
                "adapter with safetensors, or as a state dict of tensors"
            ) from None
        if not isinstance(state, dict):
            raise InputError(f"{pt}: expected a state dict")
        for key, value in state.items():
            if not isinstance(key, str) or not isinstance(value, torch.Tensor):
                raise InputError(
                    f"{pt}: {key!r} is a {type(value).__name__}, not a tensor; expected a state "
                    "dict of tensors"
                )
        return dict(state)
    raise InputError(f"{what} {root}: no {ADAPTER_FILE} or {ADAPTER_BIN}")


def _pickle_reason(exc: Exception) -> str:
    """The first sentence of torch.load's error that names the cause: for a weights-only
    refusal, the line on the blocked global, after a paragraph on torch 2.6's defaults."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [""]
    cause = next((line for line in lines if "GLOBAL" in line), lines[0])
    return cause.removeprefix("WeightsUnpickler error: ").split(". ")[0].rstrip(".")
