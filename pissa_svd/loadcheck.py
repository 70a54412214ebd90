"""Will PEFT attach an adapter to every target once transformers has loaded the model?

A checkpoint's tensor names are not always the module names of the model transformers builds
from it. transformers 5 fuses the per-expert weights of mixture-of-experts models
(``experts.3.w1``, ``experts.3.gate_proj``, ...) into one 3-D parameter per layer, and PEFT maps
per-expert adapters onto it only for the families it knows (Mixtral, Qwen3-MoE, OLMoE, ... in
PEFT 0.21, but not Qwen2-MoE). Where it does not, PEFT drops those adapters *silently*: the
residual model then lacks their principal components and step 0 is not the original model.

PEFT also rewrites other targets of such models: for GLM-4-MoE, or Qwen3-MoE with dense
layers, it moves every ``gate_proj``/``up_proj``/``down_proj`` target onto the experts, so
the dense layers' and shared experts' adapters are dropped too.

:func:`check` builds the model on the meta device (no weights, seconds even for 405B), lets
PEFT inject a LoRA for the planned targets exactly as ``PeftModel.from_pretrained`` would, and
checks, target by target, that PEFT adapts it. It needs transformers and PEFT; without them,
or for a model transformers cannot build from its config.json alone, it says why it did not
run.
"""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from .adapter import PEFT_PREFIX, peft_key, unwrapped
from .checkpoint import Checkpoint
from .errors import InputError
from .fused import expert_slot, layer_of_container, stacked
from .targets import Names, task_type

# Per-expert weights: the names transformers 5 fuses on loading.
EXPERT = re.compile(r"\.experts\.\d+(\.|$)")


@dataclass(frozen=True)
class Result:
    ok: bool | None  # None: not checked (see reason)
    reason: str  # what was checked, or why not
    missing: tuple[str, ...] = ()  # target modules PEFT gives no adapter
    fused: tuple[str, ...] = ()  # targets that land on a fused expert parameter (3-D)


# config.json keys of mixture-of-experts models (with a positive value).
_MOE_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


def needed(modules: Iterable[str], config: dict | None = None) -> bool:
    """A mixture-of-experts checkpoint needs the check: once transformers fuses its experts,
    PEFT rewrites targets, experts' or not (every ``gate_proj``/``up_proj``/``down_proj`` for
    the families it maps like Qwen2-MoE, an attention gate included). Told by a module that
    names an expert, or, for checkpoints saved with the experts already fused (3-D tensors),
    by the config's expert count."""
    text = (config or {}).get("text_config")
    configs = [c for c in (config, text) if isinstance(c, dict)]
    counts = [c.get(k) for c in configs for k in _MOE_KEYS]
    if any(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in counts):
        return True
    return any(EXPERT.search(m) for m in modules)


def check(
    folder: Path,
    config: dict,
    targets: Iterable[str],
    rank: int,
    shapes: dict[str, tuple[int, int]] | None = None,
) -> Result:
    """Inject a rank-``rank`` LoRA for the ``targets`` (module names, as in the checkpoint)
    into a meta-device model, and see which of them PEFT adapts.

    ``folder`` holds ``config.json`` (``config`` is its parsed content). A target is adapted
    when PEFT wraps the module of that name, or when it is an expert whose fused parameter
    PEFT wraps (:func:`pissa_svd.fused.expert_slot`) together with every other expert of it:
    one LoRA covers all experts of a fused parameter, so an adapter for some of them does not
    load. With ``shapes`` (module -> (out, in) of its update), the planned adapter's keys are
    then loaded into that model as ``PeftModel.from_pretrained`` loads them (meta tensors,
    through PEFT's own conversion of per-expert keys): each must land on a LoRA weight, and
    every LoRA weight must get one.
    """
    try:
        with _quiet_logger("bitsandbytes"):  # PEFT imports it; on import it may warn about
            import peft  # optional kernels, which would break decompose's one-line output
        import transformers
    except ImportError as exc:
        return Result(None, f"not checked: {exc.name} is not installed")
    versions = f"transformers {transformers.__version__}, PEFT {peft.__version__}"
    targets = sorted(targets)
    try:
        model = _meta_model(folder, config, transformers)
    except Exception as exc:  # any failure to build the model only means we cannot tell
        why = "the model needs remote code" if "auto_map" in config else "cannot build it"
        return Result(None, f"not checked: {why} ({versions}; {type(exc).__name__})")
    lora = peft.LoraConfig(r=rank, lora_alpha=rank, target_modules=targets)
    try:
        with _quiet(transformers), torch.device("meta"):  # LoRA weights on meta too
            wrapped = peft.get_peft_model(model, lora, low_cpu_mem_usage=True)
    except ValueError as exc:  # PEFT refuses the targets outright
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        culprits = tuple(m for m in targets if EXPERT.search(m)) or tuple(targets)
        return Result(False, f"{versions} would refuse the adapter ({first[:200]})", culprits)
    except Exception as exc:  # PEFT failed on the meta model: that says nothing of loading
        return Result(None, f"not checked: PEFT {peft.__version__} failed ({type(exc).__name__})")

    adapted: set[str] = set()
    fused: dict[tuple[str, str], int] = {}  # (layer, parameter) -> experts it holds
    for name, module in wrapped.base_model.model.named_modules():
        if isinstance(module, peft.tuners.lora.ParamWrapper):
            param = module.get_param()
            layer = layer_of_container(unwrapped(name))
            fused[(layer, module.parameter_name)] = param.shape[0] if param.ndim == 3 else 1
        elif isinstance(module, peft.tuners.lora.LoraLayer):
            adapted.add(name)
    missing: list[str] = []
    by_param: dict[tuple[str, str], list[str]] = {}
    for m in targets:
        if m in adapted:
            continue
        slot = expert_slot(m)
        if slot is not None and slot[:2] in fused:
            by_param.setdefault(slot[:2], []).append(m)
        else:
            missing.append(m)
    partial = [
        m
        for key, names in by_param.items()
        if len(names) < fused[key] * stacked(key[1])
        for m in names
    ]
    if missing or partial:
        reason = (
            f"{versions} would silently give {len(missing)} target(s) no adapter, so the model "
            "would not start from its original weights"
            if missing
            else f"{versions} adapt all experts of a layer's fused parameter together, and "
            f"{len(partial)} target(s) cover only some of them, so the adapter would not load"
        )
        return Result(
            False, reason, _and_the_rest(folder, config, targets, rank, shapes, missing or partial)
        )
    lost = _lost_on_loading(peft, wrapped, targets, shapes, rank) if shapes else []
    if lost:
        reason = (
            f"{versions} would not load the adapter of {len(lost)} target(s): their saved "
            "keys do not land on the layers it wraps for them (one projection of fused "
            "experts without the other?)"
        )
        return Result(False, reason, tuple(lost))
    fused_targets = tuple(m for names in by_param.values() for m in names)
    return Result(True, f"every target gets its adapter in {versions}", fused=fused_targets)


def _and_the_rest(folder, config, targets, rank, shapes, culprits: list[str]) -> tuple[str, ...]:
    """``culprits`` and whatever the check still refuses among the other targets, so that one
    --exclude leaves out all that PEFT cannot load (a later problem would only show once the
    first is gone)."""
    rest = [t for t in targets if t not in set(culprits)]
    more = (
        check(folder, config, rest, rank, shapes and {m: shapes[m] for m in rest}) if rest else None
    )
    return (*culprits, *(more.missing if more is not None and more.ok is False else ()))


def _lost_on_loading(
    peft, wrapped, targets: list[str], shapes: dict[str, tuple[int, int]], rank: int
) -> list[str]:
    """The targets whose adapter a load of the planned adapter file would lose: its keys
    (``base_model.model.<module>.lora_A.weight``, as decompose writes them) loaded with PEFT's
    ``set_peft_model_state_dict``, which maps per-expert keys onto fused parameters. A key that
    lands nowhere, or a LoRA weight no key fills, is lost; it is traced back to the targets of
    its layer (or the target itself, for an unfused module)."""
    from peft.utils import set_peft_model_state_dict

    state = {}
    for m in targets:
        out_f, in_f = shapes[m]
        state[peft_key(m, "A")] = torch.empty(rank, in_f, device="meta")
        state[peft_key(m, "B")] = torch.empty(out_f, rank, device="meta")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PEFT warns of the keys we are about to list
            result = set_peft_model_state_dict(wrapped, state, low_cpu_mem_usage=True)
    except Exception:  # this PEFT loads differently (or not on meta tensors): cannot tell
        return []
    lora = re.compile(r"\.lora_[AB](\.[^.]+)?\.weight$")
    where = {
        lora.sub("", k).removeprefix(PEFT_PREFIX).removesuffix(".base_layer")
        for k in [*result.unexpected_keys, *(k for k in result.missing_keys if lora.search(k))]
    }
    if not where:
        return []
    layers = {layer_of_container(unwrapped(w)) for w in where if w.endswith(".experts")}
    return [
        m
        for m in targets
        if m in where or ((slot := expert_slot(m)) is not None and slot[0] in layers)
    ]


@contextlib.contextmanager
def _quiet_logger(name: str):
    """Only errors from logger ``name`` (and its children) inside the block."""
    log = logging.getLogger(name)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def model_class(config: dict):
    """The transformers class that loads a checkpoint with this config.json: the one named in
    ``architectures`` (LlamaForCausalLM, GPT2LMHeadModel, BertModel, ...), else the auto class
    whose entry of ``auto_map`` names the model's own code, else AutoModelForCausalLM for a
    causal LM, else AutoModel."""
    import transformers

    for arch in config.get("architectures") or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    auto_map = config.get("auto_map")
    if isinstance(auto_map, dict):
        for arch in config.get("architectures") or []:
            for auto, ref in auto_map.items():
                if (
                    isinstance(ref, str)
                    and ref.endswith(f".{arch}")
                    and auto.startswith("AutoModel")
                ):
                    return getattr(transformers, auto, transformers.AutoModel)
    if task_type(config) == "CAUSAL_LM":
        return transformers.AutoModelForCausalLM
    return transformers.AutoModel


def is_auto_class(cls) -> bool:
    """Whether :func:`model_class` gave one of transformers' auto classes (the config names no
    class transformers has), which build through ``from_config``."""
    return cls.__name__.startswith("AutoModel")


def tied_to_input_embedding(folder: Path, config: dict) -> list[str]:
    """The names of the parameters that share the input embedding's weight, it included (the
    output embedding's too where ``tie_word_embeddings`` ties them), in the model transformers
    builds from ``folder``'s config.json (``config``). Raises what transformers raises where it
    cannot build the model."""
    import transformers

    model = _meta_model(folder, config, transformers)
    weight = model.get_input_embeddings().weight
    return [n for n, p in model.named_parameters(remove_duplicate=False) if p is weight]


# Model types whose layers transformers loads under the checkpoint's own names (it has no
# conversion mapping for them; tests/test_families.py checks this list against the installed
# transformers): decompose need not build the model to name their adapters.
KEEP_NAMES = frozenset((
    "llama", "mistral", "mistral4", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi",
    "phi3", "gpt2", "gpt_neox", "gptj", "bert", "roberta", "xlm-roberta", "distilbert",
    "deberta", "deberta-v2", "t5", "mt5", "umt5", "bart", "mbart", "marian", "whisper",
    "falcon", "bloom", "opt", "starcoder2", "gpt_bigcode", "olmo", "olmo2", "olmo3", "cohere",
    "cohere2", "granite", "stablelm", "smollm3", "mpt", "modernbert", "mpnet", "electra",
    "albert", "exaone4", "gpt_oss", "seed_oss", "apertus", "arcee", "nemotron",
    "hunyuan_v1_dense", "ernie4_5", "glm", "glm4", "helium",
))  # fmt: skip


def loaded_names(folder: Path, config: dict | None, names: Iterable[str]) -> Names:
    """Which of the tensors ``names`` of the checkpoint in ``folder`` transformers renames as it
    loads the model, and to what: found as ``from_pretrained`` finds it, with the model's own
    conversion mapping applied to each name, on a meta-device model. Vision-language models
    keep older names in their files, and so do some text models whose layout changed
    (EXAONE 3, GTE, ...); fusing experts is no renaming (:mod:`pissa_svd.fused` handles it).
    The common families (:data:`KEEP_NAMES`) keep their names and skip the import; any other
    model is built (seconds), and its Names say so (``mapped``), so that decompose also checks
    that PEFT attaches every target (a fused q/k/v that transformers splits, say). Raises
    InputError where transformers cannot tell for a vision-language model."""
    config = config or {}
    vision = isinstance(config.get("vision_config"), dict)
    model_type = config.get("model_type")
    if not vision and (not isinstance(model_type, str) or model_type in KEEP_NAMES):
        return Names()
    try:
        import transformers

        if "auto_map" in config and model_type not in transformers.CONFIG_MAPPING:
            # Only the folder's own code loads it (trust_remote_code), by the files' names:
            # transformers renames the layers of its own model types only.
            return Names()
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, rename_source_key
    except ImportError as exc:
        if not vision:  # transformers 4 (or none) loads a text model by the files' names
            return Names()
        raise InputError(
            f"{folder} has a vision_config: transformers renames such models' layers as it "
            f"loads them, and naming the adapter's modules needs transformers 5 ({exc})"
        ) from None
    try:
        model = _meta_model(folder, config, transformers)
        meta = model.state_dict()
        mapping = get_model_conversion_mapping(model)
    except Exception as exc:
        if not vision:  # as for any model transformers cannot build: names as in the files
            return Names()
        why = next(iter(str(exc).splitlines()), "")
        raise InputError(
            f"{folder} has a vision_config, and transformers cannot build the model from its "
            f"config.json ({type(exc).__name__}: {why}) to tell the names its layers get on "
            "loading, which the adapter must use"
        ) from None
    renamings = [t for t in mapping if isinstance(t, WeightRenaming)]
    converters = [t for t in mapping if not isinstance(t, WeightRenaming)]
    renamed = {}
    for name in names:
        new, converted = rename_source_key(
            name, renamings, converters, model.base_model_prefix, meta
        )
        if new not in meta and name in meta:  # as from_pretrained: the name was right
            new, converted = name, None
        if converted is None and new != name and new in meta:
            renamed[name] = new
    return Names(renamed, mapped=True)


# The common families whose model classes keep linear layers in full precision when loaded in
# 4 or 8 bits (_keep_in_fp32_modules; tests/test_families.py checks this against transformers).
KEEP_FP32 = frozenset({"t5", "mt5", "umt5"})


def kept_in_full_precision(modules: list[str], config: dict) -> list[str]:
    """The ``modules`` (in-memory names) that bitsandbytes' 4-bit and 8-bit loading leaves in
    full precision: the model class's ``_keep_in_fp32_modules`` (T5's ``wo``), matched as
    transformers matches them. [] where transformers is missing or names no such modules;
    the common families outside :data:`KEEP_FP32` need no import to tell."""
    model_type = config.get("model_type")
    if model_type in KEEP_NAMES and model_type not in KEEP_FP32:
        return []
    try:
        from transformers.quantizers.quantizers_utils import should_convert_module

        cls = model_class(config)
    except Exception:  # transformers missing, or too old to have these helpers
        return []
    keys = ("_keep_in_fp32_modules", "_keep_in_fp32_modules_strict")
    patterns = [p for k in keys for p in getattr(cls, k, None) or []]
    return [m for m in modules if patterns and not should_convert_module(m, patterns)]


def checkpoint_names(ck: Checkpoint) -> Names:
    """:func:`loaded_names` for every tensor of ``ck``, with its config.json (if any)."""
    config = ck.read_json("config.json") if "config.json" in ck.extra_files else None
    config = config if isinstance(config, dict) else None
    return loaded_names(ck.root, config, (t.name for t in ck.tensors()))


def _meta_model(folder: Path, config: dict, transformers) -> torch.nn.Module:
    with _quiet(transformers):  # never the folder's own code, and no prompt asking to run it
        cfg = transformers.AutoConfig.from_pretrained(str(folder), trust_remote_code=False)
        cls = model_class(config)
        with torch.device("meta"):
            return cls.from_config(cfg) if is_auto_class(cls) else cls._from_config(cfg)


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
