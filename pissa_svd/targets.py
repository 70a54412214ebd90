"""Which tensors of a checkpoint are adapter targets, and what PEFT needs to know about the model.

One table of module-name patterns serves every model family; there is no per-family code.
A module name is a tensor name without its ``.weight`` suffix, e.g.
``model.layers.0.self_attn.q_proj``.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Family:
    name: str
    pattern: str  # matched with re.search against the module name
    conv1d: bool = False  # may be GPT-2's Conv1D, stored (in, out): see conv1d_layout


# Attention and MLP linear layers of the common architectures.
FAMILIES: tuple[Family, ...] = (
    # (Gemma 4's vision tower wraps each in a clipping module: q_proj.linear, ...)
    Family(
        "llama/mistral/qwen2/gemma/phi3/opt",
        r"(^|\.)(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj"
        r"|qkv_proj|gate_up_proj|out_proj|fc1|fc2)(\.linear)?$",
    ),
    Family("mixtral-experts", r"\.experts\.\d+\.(w1|w2|w3)$"),
    Family(
        "falcon/gpt-neox/bloom/phi",
        r"(^|\.)(query_key_value|dense_h_to_4h|dense_4h_to_h|(self_attention|attention|self_attn)"
        r"\.dense)$",
    ),
    # Only the encoder layers' dense layers: not the pooler's or an MLM head's transform.
    Family(
        "bert/roberta", r"(^|\.)(query|key|value|(attention\.output|intermediate|output)\.dense)$"
    ),
    Family("t5", r"\.\w*Attention\.(q|k|v|o)$|\.DenseReluDense\.(wi|wi_0|wi_1|wo)$"),
    Family("deepseek-mla", r"(^|\.)(q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj)$"),
    Family(
        "distilbert/deberta",
        r"(^|\.)(q_lin|k_lin|v_lin|out_lin|lin1|lin2|query_proj|key_proj|value_proj)$",
    ),
    Family("mpt/modernbert", r"(^|\.)(Wqkv|Wo|Wi)$"),
    Family("gpt-j/codegen", r"(^|\.)(fc_in|fc_out)$"),
    Family("mpnet", r"\.attn\.(q|k|v|o)$"),
    Family("albert", r"(^|\.)(ffn|ffn_output)$"),
    Family("longformer", r"(^|\.)(query|key|value)_global$"),
    Family("wav2vec2/hubert/wavlm", r"\.feed_forward\.(intermediate_dense|output_dense)$"),
    Family("granite-moe-hybrid", r"\.shared_mlp\.(input_linear|output_linear)$"),
    Family("rwkv", r"(^|\.)receptance$|\.attention\.output$"),
    # DeBERTa's fused q/k/v; Mamba, Jamba, Falcon-H1, Nemotron-H mixers; Qwen3-Next's DeltaNet.
    Family("in-proj", r"(^|\.)(in_proj|in_proj_qkvz)$"),
    # Models only their own code loads (trust_remote_code), by the files' names: Baichuan 2's
    # fused W_pack, InternLM 2/2.5's wqkv/wo and feed_forward.w1-w3, Qwen-1's mlp.w1/w2.
    Family(
        "baichuan/internlm2/qwen-1",
        r"(^|\.)W_pack$|\.attention\.(wqkv|wo)$|\.feed_forward\.(w1|w2|w3)$|\.mlp\.(w1|w2)$",
    ),
    # Vision towers: Qwen2/2.5/3-VL's and GLM-4V's blocks (attn.qkv, attn.proj; Qwen3-VL's
    # mlp.linear_fc1/2, not its mergers'), InternViT's attention output (projection_layer).
    Family(
        "vision-blocks",
        r"\.(attn|attention)\.(qkv|proj|projection_layer)$|\.blocks\.\d+\.mlp\.linear_fc[12]$",
    ),
    # GPT-2 (Conv1D), and GPT-BigCode (StarCoder) / Starcoder2 (nn.Linear) name layers alike.
    Family("gpt2/gpt-bigcode/starcoder2", r"(^|\.)(c_attn|c_proj|c_fc)$", conv1d=True),
)

# Layers with more outputs than inputs in every model that has them: q/k/v together, MLP up.
_WIDENING = re.compile(r"(^|\.)(c_attn|c_fc)$")

# Never targets, not even through --targets: PEFT wraps embeddings as lora.Embedding, whose
# adapter keys (lora_embedding_A/B) differ, so a lora_A/B adapter for them would not load; the
# output heads are not attention/MLP weights. Any module named like an embedding counts
# (embed_in, embed_positions, position_embedding, T5's relative_attention_bias, ...).
_EXCLUDE = re.compile(
    r"(^|\.)(embed_tokens|embeddings?|wte|wpe|word_embeddings|position_embeddings"
    r"|token_type_embeddings|lm_head|embed_out|shared)(\.|$)"
    r"|(^|\.)[^.]*(embed|relative_attention_bias)[^.]*$"
)

_TASK_SUFFIXES = (
    ("ForCausalLM", "CAUSAL_LM"),
    ("LMHeadModel", "CAUSAL_LM"),
    ("ForConditionalGeneration", "SEQ_2_SEQ_LM"),
    ("ForSeq2SeqLM", "SEQ_2_SEQ_LM"),
    ("MTModel", "SEQ_2_SEQ_LM"),  # MarianMTModel
    ("ForSequenceClassification", "SEQ_CLS"),
    ("ForTokenClassification", "TOKEN_CLS"),
    ("ForQuestionAnswering", "QUESTION_ANS"),
    ("Model", "FEATURE_EXTRACTION"),
)


# Task heads (classification, QA) are not targets by default, whatever their layers are called
# (RoBERTa's classifier.out_proj would match the attention pattern); --targets can pick them.
_HEADS = re.compile(r"(^|\.)(classifier|score|qa_outputs|pooler)(\.|$)")


@dataclass(frozen=True)
class Match:
    module: str
    transposed: bool


def module_name(tensor_name: str) -> str | None:
    return tensor_name[: -len(".weight")] if tensor_name.endswith(".weight") else None


@dataclass(frozen=True)
class Names:
    """A checkpoint's tensor names and the names its parameters get in memory, where
    transformers renames them on loading (vision-language models keep older names in their
    files: ``language_model.model.layers.0...`` is ``model.language_model.layers.0...``).
    An adapter names modules in memory; the files keep their own names. Built by
    :func:`pissa_svd.loadcheck.loaded_names`; empty (every name its own) for most models."""

    to_memory: dict[str, str] = field(default_factory=dict)  # renamed tensors only
    # the model was built to find the names: it is no common family (loadcheck.KEEP_NAMES)
    mapped: bool = False

    @functools.cached_property
    def to_file(self) -> dict[str, str]:
        return {v: k for k, v in self.to_memory.items()}

    def module(self, tensor: str) -> str | None:
        """The in-memory module whose ``weight`` is the tensor ``tensor`` of the files."""
        return module_name(self.to_memory.get(tensor, tensor))

    def tensor(self, param: str) -> str:
        """The tensor of the files that holds the in-memory parameter ``param``."""
        return self.to_file.get(param, param)


def conv1d_layout(tensors: Iterable[tuple[str, tuple[int, ...]]]) -> bool:
    """Whether a checkpoint's ``c_attn``/``c_proj``/``c_fc`` weights are GPT-2's Conv1D,
    stored (in, out), from its (tensor name, shape) pairs.

    The names do not tell: GPT-2, OpenAI GPT and ImageGPT use Conv1D, GPT-BigCode (StarCoder,
    SantaCoder) and Starcoder2 nn.Linear, stored (out, in). The shapes do: ``c_attn`` (q, k and
    v together) and ``c_fc`` (the MLP's up projection) have more outputs than inputs, so
    Conv1D stores them wider than tall and Linear taller than wide."""
    return any(
        len(shape) == 2 and shape[1] > shape[0]
        for name, shape in tensors
        if (module := module_name(name)) is not None and _WIDENING.search(module)
    )


# PEFT refuses LoRA on modules with these names in Mamba-based models (its kernels read their
# weights directly), so a default target there would make the adapter fail to load.
_MAMBA_TYPES = frozenset({"mamba", "mamba2", "falcon_mamba", "falcon_h1", "nemotron_h"})
_MAMBA_REFUSED = frozenset({"out_proj", "conv1d"})


def not_adaptable(
    module: str, model_type: str | None, attention: set[str]
) -> tuple[str, str] | None:
    """(why, an --exclude regex for it) where a LoRA on the linear layer ``module`` would not
    load or would do nothing, in a model of config ``model_type`` whose torch
    MultiheadAttention modules are ``attention``; None where it works."""
    parent, _, leaf = module.rpartition(".")
    if model_type in _MAMBA_TYPES and leaf in _MAMBA_REFUSED:
        why = f"which PEFT refuses to adapt in {model_type} models (their kernels read it directly)"
        return why, rf"\.{leaf}$"
    if leaf == "out_proj" and parent in attention:
        why = (
            "the output projection of a torch MultiheadAttention, whose forward reads the "
            "weight directly: a LoRA on it would do nothing"
        )
        return why, rf"^{re.escape(module)}$"
    return None


def multihead_attention(names: Iterable[str]) -> set[str]:
    """The torch MultiheadAttention modules of a checkpoint, by their ``in_proj_weight``."""
    return {n.removesuffix(".in_proj_weight") for n in names if n.endswith(".in_proj_weight")}


def never_target(module: str) -> bool:
    """Embeddings and output heads: never adapter targets (see ``_EXCLUDE``)."""
    return bool(_EXCLUDE.search(module))


def select(
    tensor_name: str,
    shape: tuple[int, ...],
    patterns: list[str] | None = None,
    exclude: list[str] | None = None,
    conv1d: bool = False,
    loaded_as: str | None = None,
) -> Match | None:
    """The target decision for one tensor, or None when it is not a target.

    With ``patterns`` (user regexes, ``re.search`` on the module name) any 2-D ``.weight``
    except embeddings may be chosen; its layout is still taken from the family table, so
    GPT-2's ``c_attn`` stays transposed. Without, the family table decides. A module that
    an ``exclude`` regex finds is never a target. ``conv1d``: the checkpoint stores its
    Conv1D-named layers transposed (:func:`conv1d_layout`). ``loaded_as``: the tensor's name
    in memory where transformers renames it (:class:`Names`); the family table and the
    user's regexes may find either name.
    """
    module = module_name(tensor_name)
    if module is None or len(shape) != 2 or never_target(module):
        return None
    either = [module] + [m for m in [module_name(loaded_as or "")] if m and m != module]
    if exclude and any(re.search(p, m) for p in exclude for m in either):
        return None
    family = next((f for f in FAMILIES for m in either if re.search(f.pattern, m)), None)
    transposed = conv1d and family is not None and family.conv1d
    if patterns is None:
        heads = any(_HEADS.search(m) for m in either)
        return Match(module, transposed) if family and not heads else None
    if any(re.search(p, m) for p in patterns for m in either):
        return Match(module, transposed)
    return None


# The heads PEFT's task models add to modules_to_save (PeftModelForSequenceClassification and
# ...TokenClassification add "classifier" and "score", ...QuestionAnswering "qa_outputs"): a
# trainable copy each, whose weights PEFT then expects in the adapter it loads.
TASK_HEADS = {
    "SEQ_CLS": ("classifier", "score"),
    "TOKEN_CLS": ("classifier", "score"),
    "QUESTION_ANS": ("qa_outputs",),
}


def task_heads(task: str | None, names: Iterable[str]) -> tuple[list[str], list[str]]:
    """(the head modules PEFT wraps for ``task``, the tensors of ``names`` inside them).

    PEFT wraps every module whose name ends with a head's name, as a string: DistilBERT's
    ``pre_classifier`` as well as its ``classifier``."""
    heads = TASK_HEADS.get(task or "", ())

    def inside(name: str) -> bool:
        parts = name.split(".")
        return any(".".join(parts[:i]).endswith(heads) for i in range(1, len(parts)))

    return list(heads), [n for n in names if heads and inside(n)]


# An encoder that reads tokens has a token embedding of its own, or shares the decoder's.
_ENCODER_TOKENS = re.compile(r"(^|\.)(shared|encoder\.embed_tokens)\.weight$")
# A model that reads tokens has a token embedding.
_TOKENS = re.compile(
    r"(^|\.)(shared|embed_tokens|word_embeddings|wte|embed_in|tok_embeddings|token_embedding"
    r"|embeddings)\.weight$"
)


def task_type(config: dict | None, names: Iterable[str] = ()) -> str | None:
    """PEFT task_type from config.json's ``architectures`` (None when unknown), given the
    checkpoint's tensor ``names``. None too where PEFT's task model cannot run the model: one
    with several towers, such as CLIP (PEFT's feature-extraction model passes one tower's
    arguments, which a CLIP forward rejects), and a sequence-to-sequence model whose encoder
    reads no tokens (Whisper, Speech2Text, Moonshine: PEFT's model passes ``input_ids`` as
    well as the audio, which their forward rejects), and for the same reason an encoder
    (``...Model``) that reads no tokens (SigLIP's vision model, wav2vec2)."""
    if any(isinstance((config or {}).get(k), dict) for k in ("vision_config", "text_config")):
        return None
    archs = (config or {}).get("architectures") or []
    task = next(
        (t for arch in archs for suffix, t in _TASK_SUFFIXES if arch.endswith(suffix)), None
    )
    names = list(names)
    if task == "SEQ_2_SEQ_LM" and not any(_ENCODER_TOKENS.search(n) for n in names):
        return None
    if task == "FEATURE_EXTRACTION" and not any(_TOKENS.search(n) for n in names):
        return None  # PEFT's model passes input_ids and inputs_embeds to a vision/audio model
    return task
