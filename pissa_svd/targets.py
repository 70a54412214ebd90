"""Which tensors of a checkpoint are adapter targets, and what PEFT needs to know about the model.

One table of module-name patterns serves every model family; there is no per-family code.
A module name is a tensor name without its ``.weight`` suffix, e.g.
``model.layers.0.self_attn.q_proj``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    name: str
    pattern: str  # matched with re.search against the module name
    transposed: bool = False  # weight stored (in, out), as GPT-2's Conv1D does


# Attention and MLP linear layers of the common architectures.
FAMILIES: tuple[Family, ...] = (
    Family(
        "llama/mistral/qwen2/gemma/phi3/opt",
        r"(^|\.)(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj"
        r"|qkv_proj|gate_up_proj|out_proj|fc1|fc2)$",
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
    Family("gpt2", r"(^|\.)(c_attn|c_proj|c_fc)$", transposed=True),
)

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


def never_target(module: str) -> bool:
    """Embeddings and output heads: never adapter targets (see ``_EXCLUDE``)."""
    return bool(_EXCLUDE.search(module))


def select(
    tensor_name: str,
    shape: tuple[int, ...],
    patterns: list[str] | None = None,
    exclude: list[str] | None = None,
) -> Match | None:
    """The target decision for one tensor, or None when it is not a target.

    With ``patterns`` (user regexes, ``re.search`` on the module name) any 2-D ``.weight``
    except embeddings may be chosen; its layout is still taken from the family table, so
    GPT-2's ``c_attn`` stays transposed. Without, the family table decides. A module that
    an ``exclude`` regex finds is never a target.
    """
    module = module_name(tensor_name)
    if module is None or len(shape) != 2 or never_target(module):
        return None
    if exclude and any(re.search(p, module) for p in exclude):
        return None
    family = next((f for f in FAMILIES if re.search(f.pattern, module)), None)
    if patterns is None:
        return Match(module, family.transposed) if family and not _HEADS.search(module) else None
    if any(re.search(p, module) for p in patterns):
        return Match(module, family.transposed if family else False)
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
    """(the head modules PEFT wraps for ``task``, the tensors of ``names`` inside them)."""
    heads = TASK_HEADS.get(task or "", ())
    if not heads:
        return [], []
    inside = re.compile(rf"(^|\.)({'|'.join(heads)})\.")
    return list(heads), [n for n in names if inside.search(n)]


def task_type(config: dict | None) -> str | None:
    """PEFT task_type from config.json's ``architectures`` (None when unknown, and for models
    with several towers, such as CLIP: PEFT's feature-extraction model passes one tower's
    arguments, which a CLIP forward rejects)."""
    if any(isinstance((config or {}).get(k), dict) for k in ("vision_config", "text_config")):
        return None
    archs = (config or {}).get("architectures") or []
    for arch in archs:
        for suffix, task in _TASK_SUFFIXES:
            if arch.endswith(suffix):
                return task
    return None
