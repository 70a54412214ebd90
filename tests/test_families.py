"""Default targets across model families: every attention and MLP linear layer is a target, the
adapter loads with PEFT as saved, and step 0 reproduces the original model.

The family table matches module names, so each family here is a tiny random model built by
transformers, checked end to end rather than by its names alone.
"""

from __future__ import annotations

import json
import re

import pytest
import torch

from pissa_svd import InputError, decompose
from pissa_svd.convert import verify
from pissa_svd.pipeline import ADAPTER_DIR
from pissa_svd.targets import conv1d_layout, not_adaptable, task_heads, task_type
from pissa_svd.training import load_trainable

VOCAB = 96


def _build(family: str):
    """(model, the Linear modules that stay out of the adapter, by last name)."""
    import transformers as T

    small = dict(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=96,
    )  # fmt: skip
    s2s = dict(
        vocab_size=VOCAB, d_model=64, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=96,
        decoder_ffn_dim=96, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        decoder_start_token_id=1,
    )  # fmt: skip
    if family == "starcoder2":  # nn.Linear layers named like GPT-2's Conv1D ones
        config = T.Starcoder2Config(num_key_value_heads=2, max_position_embeddings=64, **small)
        return T.Starcoder2ForCausalLM(config), {"lm_head"}
    if family == "gpt_bigcode":  # StarCoder: the same, with multi-query attention
        config = T.GPTBigCodeConfig(
            vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64, multi_query=True
        )
        return T.GPTBigCodeForCausalLM(config), {"lm_head"}
    if family == "t5":  # T5 v1.1 (gated MLP: wi_0, wi_1)
        config = T.T5Config(
            vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=96, num_layers=2, num_heads=4,
            feed_forward_proj="gated-gelu",
        )  # fmt: skip
        return T.T5ForConditionalGeneration(config), {"lm_head"}
    if family == "marian":
        return T.MarianMTModel(T.MarianConfig(max_position_embeddings=32, **s2s)), {"lm_head"}
    if family == "whisper":  # an encoder that reads audio
        config = T.WhisperConfig(
            num_mel_bins=16, max_source_positions=32, max_target_positions=32, **s2s
        )
        return T.WhisperForConditionalGeneration(config), {"proj_out"}
    if family == "distilbert":  # PEFT trains pre_classifier whole too, as it ends in classifier
        config = T.DistilBertConfig(
            vocab_size=VOCAB, dim=64, hidden_dim=96, n_layers=2, n_heads=4, num_labels=3
        )
        return T.DistilBertForSequenceClassification(config), {"pre_classifier", "classifier"}
    if family == "deberta_v2":
        config = T.DebertaV2Config(num_labels=3, max_position_embeddings=64, **small)
        return T.DebertaV2ForSequenceClassification(config), {"pooler.dense", "classifier"}
    if family == "modernbert":
        config = T.ModernBertConfig(
            num_labels=3, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
            eos_token_id=2, cls_token_id=1, sep_token_id=2, **small,
        )  # fmt: skip
        return T.ModernBertForSequenceClassification(config), {"head.dense", "classifier"}
    if family == "gptj":
        config = T.GPTJConfig(
            vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64, rotary_dim=8
        )
        return T.GPTJForCausalLM(config), {"lm_head"}
    if family == "mpt":
        config = T.MptConfig(vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=4, max_seq_len=64)
        return T.MptForCausalLM(config), {"lm_head"}
    if family == "mamba":  # PEFT refuses out_proj here; x_proj and dt_proj are tiny
        config = T.MambaConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2)
        return T.MambaForCausalLM(config), {"lm_head", "x_proj", "dt_proj", "out_proj"}
    if family == "deepseek_v3":  # multi-head latent attention: q_a/q_b, kv_a/kv_b
        config = T.DeepseekV3Config(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
            n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
            first_k_dense_replace=1, q_lora_rank=32, kv_lora_rank=32, qk_rope_head_dim=8,
            qk_nope_head_dim=16, v_head_dim=16, n_group=1, topk_group=1,
            max_position_embeddings=64,
        )  # fmt: skip
        # PEFT moves dense-MLP and shared-expert targets onto the experts: left out.
        return T.AutoModelForCausalLM.from_config(config), {"lm_head", "mlp", "shared_experts"}
    if family == "mpnet":  # all-mpnet-base-v2's architecture: attention.attn.q/k/v/o
        config = T.MPNetConfig(num_labels=3, max_position_embeddings=64, **small)
        return T.MPNetForSequenceClassification(config), {"classifier"}
    if family == "albert":  # one shared layer: attention.query ..., ffn, ffn_output
        config = T.AlbertConfig(embedding_size=32, num_labels=3, **small)
        return T.AlbertForSequenceClassification(config), {
            "embedding_hidden_mapping_in", "pooler", "classifier",
        }  # fmt: skip
    if family == "deberta":  # v1: q, k and v in one in_proj
        config = T.DebertaConfig(num_labels=3, max_position_embeddings=64, **small)
        return T.DebertaForSequenceClassification(config), {"pooler.dense", "classifier"}
    if family == "wav2vec2":  # feed_forward.intermediate_dense / output_dense
        config = T.Wav2Vec2Config(
            conv_dim=(32, 32), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16,
            num_labels=3, **{k: v for k, v in small.items() if k != "vocab_size"},
        )  # fmt: skip
        return T.Wav2Vec2ForSequenceClassification(config), {
            "feature_projection.projection", "projector", "classifier",
        }  # fmt: skip
    if family == "granitemoehybrid":  # Granite 4: Mamba and attention layers, a shared MLP
        config = T.GraniteMoeHybridConfig(
            layer_types=["mamba", "attention"], num_local_experts=4, num_experts_per_tok=2,
            shared_intermediate_size=96, num_key_value_heads=2, mamba_d_state=8,
            mamba_n_heads=8, mamba_d_head=16, mamba_n_groups=1, **small,
        )  # fmt: skip
        return T.AutoModelForCausalLM.from_config(config), {"lm_head"}
    if family == "rwkv":
        config = T.RwkvConfig(
            vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, attention_hidden_size=64,
            intermediate_size=96, context_length=64,
        )  # fmt: skip
        return T.RwkvForCausalLM(config), {"head"}
    if family == "qwen3_next":  # Gated DeltaNet layers (in_proj_qkvz), experts, a shared one
        config = T.Qwen3NextConfig(
            head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
            shared_expert_intermediate_size=32, linear_num_value_heads=4,
            linear_num_key_heads=2, linear_key_head_dim=16, linear_value_head_dim=16,
            layer_types=["linear_attention", "full_attention"], num_key_value_heads=2, **small,
        )  # fmt: skip
        left_out = {"lm_head", "shared_expert", "shared_expert_gate", "in_proj_ba", "gate"}
        return T.AutoModelForCausalLM.from_config(config), left_out
    if family == "jamba":  # Mamba and attention layers, experts every other layer
        config = T.JambaConfig(
            num_experts=4, num_experts_per_tok=2, attn_layer_period=2, attn_layer_offset=1,
            expert_layer_period=2, expert_layer_offset=1, mamba_d_state=8,
            use_mamba_kernels=False, num_key_value_heads=2, **small,
        )  # fmt: skip
        left_out = {"lm_head", "x_proj", "dt_proj", "router"}
        return T.AutoModelForCausalLM.from_config(config), left_out
    if family == "beam":  # experts stored fused (3-D) already: no per-expert names
        config = T.BeamConfig(
            num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
            mlp_layer_types=["dense", "sparse"], num_key_value_heads=2, head_dim=16, n_group=1,
            topk_group=1,
            layer_types=["sliding_attention", "full_attention"], **small,
        )  # fmt: skip
        # PEFT moves every gate/up/down_proj onto the experts, the attention's gate too.
        return T.AutoModelForCausalLM.from_config(config), {"lm_head", "mlp", "gate_proj"}
    if family == "exaone":  # EXAONE 3: transformer.h.N.attn.attention.* in the files
        config = T.ExaoneConfig(num_key_value_heads=2, head_dim=16, **small)
        return T.AutoModelForCausalLM.from_config(config), {"lm_head"}
    if family == "gte":  # a fused qkv_proj (and up_gate_proj) that transformers splits
        config = T.CONFIG_MAPPING["gte"](**small)
        split = {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"}
        return T.AutoModelForMaskedLM.from_config(config), {"lm_head", *split}
    raise KeyError(family)


FAMILIES = [
    "starcoder2", "gpt_bigcode", "t5", "marian", "whisper", "distilbert", "deberta_v2",
    "modernbert", "gptj", "mpt", "mamba", "deepseek_v3", "mpnet", "albert", "deberta",
    "wav2vec2", "granitemoehybrid", "rwkv", "qwen3_next", "jamba", "beam", "exaone", "gte",
]  # fmt: skip
# PEFT does not load every default target of these: decompose refuses, naming an --exclude.
REFUSED = {"deepseek_v3", "qwen3_next", "jamba", "beam", "gte"}
TASKS = {  # what PEFT's model for the saved task_type needs to run the model
    "t5": "SEQ_2_SEQ_LM", "marian": "SEQ_2_SEQ_LM", "whisper": None, "distilbert": "SEQ_CLS",
    "deberta_v2": "SEQ_CLS", "modernbert": "SEQ_CLS", "mpnet": "SEQ_CLS", "albert": "SEQ_CLS",
    "deberta": "SEQ_CLS", "wav2vec2": "SEQ_CLS", "gte": None,
}  # fmt: skip


def _inputs(family: str, model) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (2, 12), generator=g)
    if family == "wav2vec2":
        return {"input_values": torch.randn(2, 4000, generator=g)}
    if family == "whisper":
        return {"input_features": torch.randn(2, 16, 64, generator=g), "decoder_input_ids": ids}
    if model.config.is_encoder_decoder:
        return {"input_ids": ids, "decoder_input_ids": ids[:, :5]}
    return {"input_ids": ids}


@pytest.mark.parametrize("family", FAMILIES)
def test_default_targets_load_in_peft_and_start_from_the_original(family, tmp_path):
    from peft import PeftModel

    torch.manual_seed(0)
    model, left_out = _build(family)
    model = model.float().eval()
    src, out = tmp_path / "src", tmp_path / "out"
    model.save_pretrained(src)
    try:
        decompose(src, out, rank=4, quiet=True)
        assert family not in REFUSED
    except InputError as exc:  # the --exclude the message names makes a model PEFT loads
        assert family in REFUSED, exc
        decompose(src, out, rank=4, exclude=re.findall(r"--exclude '(.+?)'", str(exc)), quiet=True)
    config = json.loads((out / ADAPTER_DIR / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is False  # no Conv1D in any of these
    assert config["task_type"] == TASKS.get(family, "CAUSAL_LM")

    # Every linear layer is a target but the output and task heads (and what PEFT refuses).
    linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    missed = [n for n in linear if n not in config["target_modules"]]
    assert missed and all(any(f".{x}." in f".{n}." for x in left_out) for n in missed), missed

    inputs = _inputs(family, model)
    with torch.no_grad():
        want = model(**inputs).logits
    cls = type(model)
    peft_model = PeftModel.from_pretrained(
        cls.from_pretrained(out), out / ADAPTER_DIR, is_trainable=True
    ).eval()
    with torch.no_grad():
        got = peft_model(**inputs).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert verify(src, out).passed
    experts = any(".experts." in m for m in config["target_modules"])
    if not config["modules_to_save"] and not experts:  # the torch wrapper: no heads, no MoE
        with torch.no_grad():
            got = load_trainable(out, backend="torch").eval()(**inputs).logits
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_the_families_that_keep_their_names_have_no_conversion_mapping():
    """decompose skips importing transformers for these; the installed one must agree."""
    from transformers import CONFIG_MAPPING
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping

    from pissa_svd.loadcheck import KEEP_NAMES

    known = [t for t in sorted(KEEP_NAMES) if t in CONFIG_MAPPING]
    assert len(known) >= 50
    assert [t for t in known if get_checkpoint_conversion_mapping(t) is not None] == []


def test_the_common_families_that_keep_layers_in_fp32_are_known():
    """--quantize asks transformers only for these (and uncommon families) which targets 4-bit
    loading keeps in full precision; the others must keep no linear layer so."""
    import importlib
    import inspect

    import transformers
    from transformers.models.auto.configuration_auto import model_type_to_module_name

    from pissa_svd.loadcheck import KEEP_FP32, KEEP_NAMES

    kept = {}
    for t in sorted(KEEP_NAMES):
        name = model_type_to_module_name(t)
        module = importlib.import_module(f"transformers.models.{name}.modeling_{name}")
        for cls in vars(module).values():
            if inspect.isclass(cls) and issubclass(cls, transformers.PreTrainedModel):
                for key in ("_keep_in_fp32_modules", "_keep_in_fp32_modules_strict"):
                    kept.setdefault(t, set()).update(getattr(cls, key, None) or [])
    norms = {t for t, k in kept.items() if k and all("norm" in p for p in k)}  # gpt-oss: norms
    assert {t for t, k in kept.items() if k} - norms == KEEP_FP32


def test_quantize_refuses_targets_4bit_loading_keeps_in_fp32(tmp_path):
    """bitsandbytes leaves T5's wo in full precision: an NF4 residual there would only add
    error. Refused with the --exclude that leaves it whole; with it, the rest is quantized."""
    import transformers as T

    torch.manual_seed(0)
    src = tmp_path / "src"
    config = T.T5Config(
        vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=96, num_layers=1, num_heads=4,
        feed_forward_proj="gated-gelu",
    )  # fmt: skip
    T.T5ForConditionalGeneration(config).save_pretrained(src)
    with pytest.raises(InputError, match=r"keep .*DenseReluDense\.wo in full precision") as exc:
        decompose(src, tmp_path / "out", rank=4, quantize="nf4", quant_iters=1, quiet=True)
    exclude = re.findall(r"--exclude '(.+?)'", str(exc.value))
    decompose(
        src, tmp_path / "out", rank=4, quantize="nf4", quant_iters=1, exclude=exclude, quiet=True
    )
    adapter = json.loads((tmp_path / "out" / ADAPTER_DIR / "adapter_config.json").read_text())
    assert adapter["target_modules"] and not any(
        m.endswith(".wo") for m in adapter["target_modules"]
    )


def test_conv1d_layout_is_told_from_the_shapes():
    """GPT-2's Conv1D stores (in, out); GPT-BigCode's and Starcoder2's Linear layers of the
    same names store (out, in). c_attn and c_fc widen, so the shapes tell them apart."""
    gpt2 = [("h.0.attn.c_attn.weight", (64, 192)), ("h.0.attn.c_proj.weight", (64, 64))]
    bigcode = [("h.0.attn.c_attn.weight", (96, 64)), ("h.0.mlp.c_fc.weight", (256, 64))]
    starcoder2 = [
        ("layers.0.mlp.c_fc.weight", (176, 64)),
        ("layers.0.mlp.c_proj.weight", (64, 176)),
    ]
    assert conv1d_layout(gpt2) and not conv1d_layout(bigcode) and not conv1d_layout(starcoder2)
    assert not conv1d_layout([("h.0.attn.c_attn.bias", (192,))])


def test_mamba_out_proj_is_refused_when_picked(tmp_path):
    import transformers as T

    assert not_adaptable("backbone.layers.0.mixer.out_proj", "mamba", set())
    assert not not_adaptable("model.layers.0.self_attn.out_proj", "llama", set())
    torch.manual_seed(0)
    T.MambaForCausalLM(
        T.MambaConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=1)
    ).save_pretrained(tmp_path / "src")
    with pytest.raises(
        InputError, match=r"PEFT refuses to adapt in mamba .*--exclude '\\\.out_proj\$'"
    ):
        decompose(tmp_path / "src", tmp_path / "out", rank=4, targets=["proj"], quiet=True)
    assert not (tmp_path / "out").exists()


REMOTE_CONFIG = """
from transformers import PretrainedConfig


class ToyConfig(PretrainedConfig):
    model_type = "toy_remote_vlm"

    def __init__(self, hidden=32, vocab=50, **kwargs):
        self.hidden = hidden
        self.vocab = vocab
        super().__init__(**kwargs)
"""
REMOTE_MODEL = """
import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from .configuration_toy import ToyConfig


class ToyForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = ToyConfig

    def __init__(self, config):
        super().__init__(config)
        h = config.hidden
        self.embed = nn.Embedding(config.vocab, h)
        self.vision_model = nn.ModuleDict({"attn": nn.ModuleDict({"qkv": nn.Linear(h, 3 * h)})})
        self.language_model = nn.ModuleDict({"q_proj": nn.Linear(h, h), "down_proj": nn.Linear(h, h)})
        self.lm_head = nn.Linear(h, config.vocab, bias=False)
        self.post_init()

    def forward(self, input_ids, **kwargs):
        x = self.embed(input_ids)
        x = x + self.vision_model["attn"]["qkv"](x)[..., : x.shape[-1]]
        x = x + self.language_model["down_proj"](torch.tanh(self.language_model["q_proj"](x)))
        return CausalLMOutput(logits=self.lm_head(x))
"""


def test_a_remote_code_vision_language_model_keeps_the_files_names(tmp_path, monkeypatch):
    """A model only its own code loads (``auto_map``, a type transformers lacks: InternVL-Chat,
    MiniCPM-V, ...) loads by the files' names, so the adapter uses them. decompose neither runs
    that code nor stops at transformers' prompt asking whether to run it; the output, which
    carries the code, loads with ``trust_remote_code=True`` and starts from the original."""
    import transformers
    from peft import PeftModel

    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    (src / "configuration_toy.py").write_text(REMOTE_CONFIG)
    (src / "modeling_toy.py").write_text(REMOTE_MODEL)
    config = {
        "model_type": "toy_remote_vlm", "architectures": ["ToyForCausalLM"],
        "vision_config": {"model_type": "toy_vit"}, "auto_map": {
            "AutoConfig": "configuration_toy.ToyConfig",
            "AutoModelForCausalLM": "modeling_toy.ToyForCausalLM",
        },
    }  # fmt: skip
    (src / "config.json").write_text(json.dumps(config))
    auto = transformers.AutoModelForCausalLM
    torch.manual_seed(0)
    model = auto.from_config(
        transformers.AutoConfig.from_pretrained(src, trust_remote_code=True),
        trust_remote_code=True,
    ).eval()
    model.save_pretrained(src)
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    with torch.no_grad():
        want = model(ids).logits

    monkeypatch.setattr("builtins.input", lambda *_: pytest.fail("asked to run the folder's code"))
    decompose(src, out, rank=4, quiet=True)
    adapter = json.loads((out / ADAPTER_DIR / "adapter_config.json").read_text())
    assert sorted(adapter["target_modules"]) == [
        "language_model.down_proj", "language_model.q_proj", "vision_model.attn.qkv",
    ]  # fmt: skip
    assert verify(src, out).passed
    with pytest.raises(InputError, match="trust_remote_code=True"):
        load_trainable(out, backend="torch")

    peft_model = PeftModel.from_pretrained(
        auto.from_pretrained(out, trust_remote_code=True), out, subfolder=ADAPTER_DIR
    )
    ours = load_trainable(out, backend="torch", trust_remote_code=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model.eval()(ids).logits, want, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ours(ids).logits, want, rtol=1e-4, atol=1e-5)


def test_a_multihead_attention_out_proj_is_no_target(tmp_path):
    """torch's MultiheadAttention (SigLIP's pooling head) reads out_proj.weight itself, so a
    LoRA there does nothing: the residual would lack that weight's principal part (the pooled
    output was 48% off). A vision encoder gets no task_type: PEFT's feature-extraction model
    passes it input_ids and inputs_embeds."""
    import transformers as T
    from peft import PeftModel

    torch.manual_seed(0)
    config = T.SiglipVisionConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
        image_size=32, patch_size=8,
    )  # fmt: skip
    model = T.SiglipVisionModel(config).eval()
    src, out = tmp_path / "src", tmp_path / "out"
    model.save_pretrained(src)
    decompose(src, out, rank=4, quiet=True)
    adapter = json.loads((out / ADAPTER_DIR / "adapter_config.json").read_text())
    assert "head.mlp.fc1" in adapter["target_modules"]
    assert "head.attention.out_proj" not in adapter["target_modules"]
    assert adapter["task_type"] is None
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    loaded = PeftModel.from_pretrained(T.SiglipVisionModel.from_pretrained(out), out / ADAPTER_DIR)
    with torch.no_grad():
        want, got = model(pixel_values=x), loaded.eval()(pixel_values=x)
    torch.testing.assert_close(got.pooler_output, want.pooler_output, rtol=1e-4, atol=1e-5)
    with pytest.raises(InputError, match=r"MultiheadAttention.*--exclude '\^head\\.attention"):
        decompose(src, tmp_path / "o2", rank=4, targets=["out_proj"], quiet=True)


def test_task_type_and_heads_follow_peft():
    s2s = {"architectures": ["WhisperForConditionalGeneration"]}
    assert task_type(s2s, ["model.decoder.embed_tokens.weight"]) is None  # audio encoder
    assert task_type(s2s, ["model.shared.weight"]) == "SEQ_2_SEQ_LM"
    assert (
        task_type({"architectures": ["MarianMTModel"]}, ["model.shared.weight"]) == "SEQ_2_SEQ_LM"
    )
    names = [
        "pre_classifier.weight",
        "classifier.weight",
        "distilbert.transformer.layer.0.attention.q_lin.weight",
    ]
    assert task_heads("SEQ_CLS", names)[1] == names[:2]
    assert task_heads("CAUSAL_LM", names)[1] == []


# ---------------------------------------------------------------------------------------------
# Vision-language models: the files keep older names than the layers get in memory


def _vlm(kind: str):
    import transformers as T

    text = dict(
        vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
    )  # fmt: skip
    vision = dict(
        hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
        image_size=32, patch_size=8,
    )  # fmt: skip
    if kind == "gemma3":  # language_model.model.* in the files, model.language_model.* loaded
        config = T.Gemma3Config(
            text_config=text, vision_config=vision, mm_tokens_per_image=4,
            image_token_index=299, boi_token_index=297, eoi_token_index=298,
        )  # fmt: skip
        return T.Gemma3ForConditionalGeneration(config)
    if kind == "gemma4":  # its vision tower's layers are q_proj.linear, ... (clipped inputs)
        config = T.Gemma4Config(
            text_config=dict(
                model_type="gemma4_text", vocab_size_per_layer_input=300,
                hidden_size_per_layer_input=8, **text,
            ),
            vision_config=dict(
                model_type="gemma4_vision", hidden_size=32, intermediate_size=48,
                num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, head_dim=16,
                position_embedding_size=64,
            ),
        )  # fmt: skip
        return T.Gemma4ForConditionalGeneration(config)
    if kind == "llava":
        config = T.LlavaConfig(
            text_config=dict(model_type="llama", **text),
            vision_config=dict(model_type="clip_vision_model", **vision),
            image_token_index=299,
        )
        return T.LlavaForConditionalGeneration(config)
    if kind == "qwen2_5_vl":  # model.layers.* and visual.* in the files
        mrope = {"type": "mrope", "mrope_section": [2, 3, 3]}
        vision = dict(
            depth=1, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64,
            patch_size=8, temporal_patch_size=2, spatial_merge_size=2, window_size=32,
            fullatt_block_indexes=[0],
        )  # fmt: skip
        config = T.Qwen2_5_VLConfig(
            text_config=dict(**text, rope_scaling=mrope), vision_config=vision,
            image_token_id=299, video_token_id=298, vision_start_token_id=297,
        )  # fmt: skip
        return T.Qwen2_5_VLForConditionalGeneration(config)
    raise KeyError(kind)


VLM_LEFT_OUT = {
    # Gemma 3's projector is a bare weight; its SigLIP pooling head is a MultiheadAttention.
    "gemma3": {"lm_head", "model.vision_tower.head.attention.out_proj"},
    "gemma4": {  # and its per-layer input embeddings' projections
        "lm_head", "model.embed_vision.embedding_projection",
        "model.vision_tower.patch_embedder.input_proj", "model.language_model.per_layer_model_projection",
        "model.language_model.layers.N.per_layer_input_gate",
        "model.language_model.layers.N.per_layer_projection",
    },
    "llava": {"lm_head", "model.multi_modal_projector.linear_1", "model.multi_modal_projector.linear_2"},
    "qwen2_5_vl": {"lm_head", "model.visual.merger.mlp.0", "model.visual.merger.mlp.2"},
}  # fmt: skip


@pytest.mark.parametrize("kind", ["gemma3", "gemma4", "llava", "qwen2_5_vl"])
def test_vision_language_adapters_name_the_layers_as_loaded(kind, tmp_path, monkeypatch):
    """transformers renames these models' layers as it loads them, so the adapter uses the
    in-memory names while the residual keeps the files' names; decompose, verify, merge,
    to-lora and --resume all map between the two, and --exclude may use either name."""
    from peft import PeftModel
    from safetensors import safe_open

    from pissa_svd import pipeline
    from pissa_svd.convert import merge, to_lora

    torch.manual_seed(0)
    model = _vlm(kind).float().eval()
    cls, src, out = type(model), tmp_path / "src", tmp_path / "out"
    model.save_pretrained(src)
    with safe_open(src / "model.safetensors", "pt") as f:
        stored = set(f.keys())
    params = dict(model.named_parameters())
    assert any(name not in params for name in stored)  # the files keep the older names

    decompose(src, out, rank=4, quiet=True)
    config = json.loads((out / ADAPTER_DIR / "adapter_config.json").read_text())
    modules = dict(model.named_modules())
    assert config["target_modules"] and all(m in modules for m in config["target_modules"])
    # Every tower's attention and MLP layers are targets; the projector between them is not.
    linear = {n for n, m in modules.items() if isinstance(m, torch.nn.Linear)}
    left_out = {re.sub(r"\.\d+\.", ".N.", n) for n in linear - set(config["target_modules"])}
    assert left_out == VLM_LEFT_OUT[kind]
    with safe_open(out / "model.safetensors", "pt") as f:
        assert set(f.keys()) == stored
    ids = torch.randint(3, 290, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(input_ids=ids).logits
    peft_model = PeftModel.from_pretrained(
        cls.from_pretrained(out), out / ADAPTER_DIR, is_trainable=True
    )
    lora_layers = [n for n, _ in peft_model.named_modules() if n.endswith(".lora_A")]
    assert len(lora_layers) == len(config["target_modules"])
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=ids).logits, want, rtol=1e-4, atol=1e-5)
        ours = load_trainable(out, backend="torch").eval()(input_ids=ids).logits
    torch.testing.assert_close(ours, want, rtol=1e-4, atol=1e-5)
    assert verify(src, out).passed

    # After "training": merge into the residual and to-lora for the original agree with it.
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.add_(0.05 * p.abs().mean() * torch.randn_like(p))
    peft_model.save_pretrained(tmp_path / "trained")
    with torch.no_grad():
        trained = peft_model.eval()(input_ids=ids).logits
    merge(out, tmp_path / "trained", tmp_path / "merged", quiet=True)
    to_lora(out / ADAPTER_DIR, tmp_path / "trained", tmp_path / "lora")
    with torch.no_grad():
        merged = cls.from_pretrained(tmp_path / "merged").eval()(input_ids=ids).logits
        lora = PeftModel.from_pretrained(cls.from_pretrained(src), tmp_path / "lora").eval()
        converted = lora(input_ids=ids).logits
    torch.testing.assert_close(merged, trained, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(converted, trained, rtol=1e-4, atol=1e-5)
    with pytest.raises(InputError, match="count those components twice"):
        merge(src, tmp_path / "trained", tmp_path / "wrong", quiet=True)

    # --exclude by the files' name or by the loaded one leaves out the same vision layers
    # (Gemma 4's files name them as loaded).
    tower = "visual" if kind == "qwen2_5_vl" else "vision_tower"
    stored_tower = f"model.{tower}" if kind == "gemma4" else tower
    kept = []
    for i, regex in enumerate([rf"^{re.escape(stored_tower)}\.", rf"^model\.{tower}\."]):
        decompose(src, tmp_path / f"text{i}", rank=4, exclude=[regex], quiet=True)
        kept.append(json.loads((tmp_path / f"text{i}/pissa_init/adapter_config.json").read_text()))
    assert kept[0]["target_modules"] == kept[1]["target_modules"]
    assert all(tower not in m for m in kept[0]["target_modules"])
    assert len(kept[0]["target_modules"]) < len(config["target_modules"])

    # An interrupted run resumes to the bytes of an uninterrupted one with the same options
    # (one matrix at a time: batched GEMMs may round differently from single ones).
    one = tmp_path / "one_at_a_time"
    decompose(src, one, rank=4, batch_memory=0, quiet=True)
    real, calls = pipeline._decompose_batch, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) > 3:
            raise RuntimeError("injected failure")
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "_decompose_batch", failing)
    with pytest.raises(RuntimeError, match="injected failure"):
        decompose(src, tmp_path / "resumed", rank=4, batch_memory=0, quiet=True)
    monkeypatch.setattr(pipeline, "_decompose_batch", real)
    decompose(src, tmp_path / "resumed", rank=4, batch_memory=0, resume=True, quiet=True)
    for f in [one / "model.safetensors", one / ADAPTER_DIR / "adapter_model.safetensors"]:
        assert (tmp_path / "resumed" / f.relative_to(one)).read_bytes() == f.read_bytes()
