"""Will PEFT attach an adapter to every target once transformers has loaded the model?

A checkpoint's tensor names are not always the module names of the model transformers builds
from it. transformers 5 fuses the per-expert weights of mixture-of-experts models
(``experts.3.w1``, ``experts.3.gate_proj``, ...) into one 3-D parameter per layer, and PEFT maps
per-expert adapters onto it only for the families it knows (Mixtral, Qwen3-MoE, OLMoE, ... in
PEFT 0.21, but not Qwen2-MoE). Where it does not, PEFT drops those adapters *silently*: the
residual model then lacks their principal components and step 0 is not the original model.

:func:`check` builds the model on the meta device (no weights, seconds even for 405B), lets
PEFT inject a LoRA for the planned targets exactly as ``PeftModel.from_pretrained`` would, and
compares how many weight elements the injected layers wrap with how many the targets hold.
It needs transformers and PEFT; without them, or for a model transformers cannot build from
its config.json alone, it says why it did not run.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .targets import task_type

# Per-expert weights: the names transformers 5 fuses on loading.
EXPERT = re.compile(r"\.experts\.\d+\.")


@dataclass(frozen=True)
class Result:
    ok: bool | None  # None: not checked (see reason)
    reason: str  # what was checked, or why not
    missing: tuple[str, ...] = ()  # target modules PEFT gives no adapter


def needed(modules: list[str]) -> bool:
    """Only targets that transformers may fuse on loading need the check."""
    return any(EXPERT.search(m + ".") for m in modules)


def check(folder: Path, config: dict, targets: dict[str, int], rank: int) -> Result:
    """Inject a rank-``rank`` LoRA for ``targets`` (module -> out*in) into a meta-device model.

    ``folder`` holds ``config.json`` (``config`` is its parsed content).
    """
    try:
        import peft
        import transformers
    except ImportError as exc:
        return Result(None, f"not checked: {exc.name} is not installed")
    versions = f"transformers {transformers.__version__}, PEFT {peft.__version__}"
    if "auto_map" in config:
        return Result(None, f"not checked: the model needs remote code ({versions})")
    try:
        model = _meta_model(folder, config, transformers)
    except Exception as exc:  # any failure to build the model only means we cannot tell
        return Result(None, f"not checked: {versions} cannot build it ({type(exc).__name__})")
    lora = peft.LoraConfig(
        r=rank, lora_alpha=rank, target_modules=sorted(targets), init_lora_weights=False
    )
    try:
        with _quiet(transformers), torch.device("meta"):  # LoRA weights on meta too
            wrapped = peft.get_peft_model(model, lora, low_cpu_mem_usage=True)
    except ValueError as exc:  # PEFT refuses the targets outright
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        culprits = tuple(m for m in sorted(targets) if EXPERT.search(m + ".")) or tuple(targets)
        return Result(False, f"{versions} would refuse the adapter ({first})", culprits)
    except Exception as exc:  # PEFT failed on the meta model: that says nothing of loading
        return Result(None, f"not checked: PEFT {peft.__version__} failed ({type(exc).__name__})")
    adapted: set[str] = set()
    covered = 0
    for name, module in wrapped.base_model.model.named_modules():
        if not isinstance(module, peft.tuners.lora.LoraLayer):
            continue
        if isinstance(module, peft.tuners.lora.ParamWrapper):
            covered += module.get_param().numel()
        else:
            adapted.add(name)
            weight = getattr(module.get_base_layer(), "weight", None)
            covered += weight.numel() if weight is not None else 0
    if covered >= sum(targets.values()):
        return Result(True, f"every target gets its adapter in {versions}")
    missing = tuple(m for m in sorted(targets) if m not in adapted)
    reason = (
        f"{versions} would silently give {len(missing)} target(s) no adapter, so the model "
        "would not start from its original weights"
    )
    return Result(False, reason, missing)


def model_class(config: dict):
    """The transformers class that loads a checkpoint with this config.json: the one named in
    ``architectures`` (LlamaForCausalLM, GPT2LMHeadModel, BertModel, ...), else
    AutoModelForCausalLM for a causal LM, else AutoModel."""
    import transformers

    for arch in config.get("architectures") or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    if task_type(config) == "CAUSAL_LM":
        return transformers.AutoModelForCausalLM
    return transformers.AutoModel


def _meta_model(folder: Path, config: dict, transformers) -> torch.nn.Module:
    with _quiet(transformers):
        cfg = transformers.AutoConfig.from_pretrained(str(folder))
        cls = model_class(config)
        auto = cls in (transformers.AutoModel, transformers.AutoModelForCausalLM)
        with torch.device("meta"):
            return cls.from_config(cfg) if auto else cls._from_config(cfg)


@contextlib.contextmanager
def _quiet(transformers):
    """Silence transformers' and PEFT's log lines and warnings for the check only."""
    logging = transformers.utils.logging
    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.set_verbosity(level)
