"""End to end: decompose real and tiny checkpoints, then load the output with transformers + PEFT."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from pissa_svd import InputError, decompose
from pissa_svd.convert import verify
from pissa_svd.pipeline import ADAPTER_CONFIG, ADAPTER_DIR, ADAPTER_FILE, REPORT_FILE

from .test_pissa import rounding_bound

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def shard_names(ckpt: Path) -> list[str]:
    index = ckpt / "model.safetensors.index.json"
    if index.exists():
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    return [p.name for p in ckpt.glob("*.safetensors")]


def load_state(ckpt: Path) -> dict[str, torch.Tensor]:
    state = {}
    for shard in shard_names(ckpt):
        with safe_open(ckpt / shard, "pt") as f:
            state.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118
    return state


def check_output(src: Path, out: Path, rank: int, alpha: float | None = None) -> dict:
    """Every structural promise of the output, plus W_res + s*B@A == W within rounding (fp64)."""
    assert shard_names(out) == shard_names(src)
    for name in ("config.json", "generation_config.json", "tokenizer.json", "chat_template.jinja"):
        if (src / name).exists():
            assert (out / name).read_bytes() == (src / name).read_bytes(), name
    config = json.loads((out / ADAPTER_DIR / ADAPTER_CONFIG).read_text())
    assert config["peft_type"] == "LORA" and config["r"] == rank
    assert config["init_lora_weights"] is True and config["lora_dropout"] == 0
    scaling = config["lora_alpha"] / rank
    assert scaling == (alpha / rank if alpha else 1.0)
    original, residual = load_state(src), load_state(out)
    adapter = load_state(out / ADAPTER_DIR)
    with safe_open(out / ADAPTER_DIR / ADAPTER_FILE, "pt") as f:
        assert f.metadata() == {"format": "pt"}
    assert original.keys() == residual.keys()
    modules = set(config["target_modules"])
    assert adapter.keys() == {
        f"base_model.model.{m}.lora_{w}.weight" for m in modules for w in "AB"
    }
    if (src / "model.safetensors.index.json").exists():
        index = json.loads((out / "model.safetensors.index.json").read_text())
        total = sum(t.numel() * t.element_size() for t in residual.values())
        assert index["metadata"]["total_size"] == total
    for name, W in original.items():
        R = residual[name]
        assert (R.shape, R.dtype) == (W.shape, W.dtype), name
        module = name.removesuffix(".weight")
        if module not in modules:
            assert torch.equal(W.view(torch.uint8), R.view(torch.uint8)), f"{name} changed"
            continue
        A = adapter[f"base_model.model.{module}.lora_A.weight"].double()
        B = adapter[f"base_model.model.{module}.lora_B.weight"].double()
        W64, R64 = W.double(), R.double()
        if config["fan_in_fan_out"]:
            W64, R64 = W64.T, R64.T
        assert A.shape == (rank, W64.shape[1]) and B.shape == (W64.shape[0], rank)
        err = (R64 + scaling * B @ A - W64).abs()
        bound = rounding_bound(R64, W64, A, B, scaling, R.dtype)
        assert (err <= bound).all(), f"{name}: W_res + s*B@A is off by {float(err.max()):.3g}"
    report = json.loads((out / REPORT_FILE).read_text())
    assert report["totals"]["matrices"] == len(modules)
    row = report["matrices"][0]
    assert len(row["singular_values"]) == rank
    assert row["singular_values"] == sorted(row["singular_values"], reverse=True)
    assert 0 < row["energy_fraction"] <= 1
    for row in report["matrices"]:  # norms from fused, blocked passes, summed in fp64
        W64, R64 = original[row["name"]].double(), residual[row["name"]].double()
        assert row["weight_norm"] == pytest.approx(float(W64.norm()), rel=1e-6), row["name"]
        # Of the residual before its rounding to the stored dtype.
        exact = residual[row["name"]].dtype in (torch.float32, torch.float64)
        rel = 1e-6 if exact else 1e-2
        assert row["residual_norm"] == pytest.approx(float(R64.norm()), rel=rel), row["name"]
    return config


def lm_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


PEFT_DRAWS = 3  # draws of PEFT's unseeded init whose worst error bounds ours


def assert_reload_faithful(src, out, rank, auto_cls, dtype, targets, inputs, fan_in_fan_out=False):
    """Loading OUT reproduces the original outputs at least as well as PEFT's own route.

    Ours: the residual model + our adapter via PeftModel.from_pretrained(is_trainable=True).
    PEFT: its own in-memory init, init_lora_weights="pissa_niter_4", on the original model.
    Weights are loaded in their storage ``dtype`` and the forward runs in fp32, so what is
    compared is how faithfully each route's stored weights reproduce W, not bf16 matmul noise.

    Tolerance: PEFT's own error on the same model and inputs. PEFT's init is unseeded, so its
    error is a distribution, not a number: on all-MiniLM-L6-v2 (fp32) its max error ranged
    7.6e-6 to 2.8e-5 over 8 draws of its sketch, ours 1.1e-5 to 4.5e-5 over 8 seeds, with the
    same mean (3e-7 to 4e-7): rounding noise, whose max over the outputs is an extreme-value
    statistic. So PEFT runs ``PEFT_DRAWS`` times and the bound is the worst it showed: the mean
    |output - original| must not exceed PEFT's, and the max must stay within 2x PEFT's. For fp32
    models both routes are exact up to fp32 rounding, so errors below 32 eps * max|output| are
    noise and pass.
    """
    from peft import LoraConfig, PeftModel, get_peft_model

    def forward(model):
        with torch.no_grad():
            out = model.float()(**inputs)
        return out.logits if hasattr(out, "logits") else out.last_hidden_state

    ref = forward(auto_cls.from_pretrained(src, dtype=dtype))
    res = auto_cls.from_pretrained(out, dtype=dtype)
    ours = PeftModel.from_pretrained(res, out, subfolder=ADAPTER_DIR, is_trainable=True)
    assert sum(p.requires_grad for n, p in ours.named_parameters() if "lora_" in n) > 0
    assert not any(p.requires_grad for n, p in ours.named_parameters() if "lora_" not in n)
    got = forward(ours)
    cfg = LoraConfig(
        r=rank,
        lora_alpha=rank,
        init_lora_weights="pissa_niter_4",
        target_modules=targets,
        lora_dropout=0.0,
        fan_in_fan_out=fan_in_fan_out,
    )
    d_peft = []
    for draw in range(PEFT_DRAWS):
        torch.manual_seed(draw)  # PEFT draws its sketch from the global generator
        peft = forward(get_peft_model(auto_cls.from_pretrained(src, dtype=dtype), cfg))
        d_peft.append((peft - ref).abs())
    d_ours = (got - ref).abs()
    floor = 0.0
    if dtype == torch.float32:
        floor = 32 * torch.finfo(torch.float32).eps * float(ref.abs().max())
    ours = (float(d_ours.max()), float(d_ours.mean()))
    theirs = (max(float(d.max()) for d in d_peft), max(float(d.mean()) for d in d_peft))
    assert ours[1] <= max(theirs[1], floor), f"mean error {ours[1]:.3g} vs PEFT {theirs[1]:.3g}"
    assert ours[0] <= max(2 * theirs[0], floor), f"max error {ours[0]:.3g} vs PEFT {theirs[0]:.3g}"
    return ours, theirs


def test_tiny_llama_fp32(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    assert len(shard_names(tiny_llama)) >= 3
    out = tmp_path / "out"
    report = decompose(tiny_llama, out, rank=8, niter=4, quiet=True)
    config = check_output(tiny_llama, out, 8)
    assert config["task_type"] == "CAUSAL_LM" and config["fan_in_fan_out"] is False
    assert len(config["target_modules"]) == 3 * 7
    assert report["totals"]["matrices"] == 21
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    assert_reload_faithful(
        tiny_llama, out, 8, AutoModelForCausalLM, torch.float32, LLAMA_TARGETS, {"input_ids": ids}
    )


def test_tiny_llama_bf16_custom_alpha_and_dtypes(tiny_llama_bf16, tmp_path):
    out = tmp_path / "out"
    decompose(
        tiny_llama_bf16, out, rank=4, alpha=8, method="krylov", adapter_dtype="fp32", quiet=True
    )
    check_output(tiny_llama_bf16, out, 4, alpha=8)
    adapter = load_state(out / ADAPTER_DIR)
    assert {t.dtype for t in adapter.values()} == {torch.float32}


def test_fp32_residual_of_a_bf16_model_loads_in_fp32(tiny_llama_bf16, tmp_path, monkeypatch):
    """transformers loads in config.json's dtype by default: it must name the residual's, or an
    fp32 residual would come back rounded to bf16. The report's source is an absolute path
    (to-lora points the LoRA's base_model_name_or_path at it, from any working folder)."""
    monkeypatch.chdir(tiny_llama_bf16.parent)
    decompose(tiny_llama_bf16.name, tmp_path / "out", rank=4, residual_dtype="fp32", quiet=True)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert {config.get(k) for k in ("dtype", "torch_dtype") if k in config} == {"float32"}
    assert json.loads((tiny_llama_bf16 / "config.json").read_text()) != config  # source kept
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    q = model.model.layers[0].self_attn.q_proj.weight
    assert q.dtype == torch.float32 and (q != q.bfloat16().float()).any()  # not rounded
    report = json.loads((tmp_path / "out" / "pissa_report.json").read_text())
    assert report["source"] == str(tiny_llama_bf16.resolve())


def test_narrower_residual_dtype_leaves_the_config(tiny_llama, tmp_path):
    """A bf16 residual of an fp32 model: config.json keeps float32, so loading widens the
    residual exactly and the untouched tensors (embeddings, norms) stay fp32."""
    decompose(tiny_llama, tmp_path / "out", rank=4, residual_dtype="bf16", quiet=True)
    assert (tmp_path / "out" / "config.json").read_bytes() == (
        tiny_llama / "config.json"
    ).read_bytes()


@pytest.mark.parametrize("batch_memory", [None, 0])  # batched (bf16 copies) and one at a time
def test_bf16_sketch(tiny_llama_bf16, tmp_path, batch_memory):
    out = tmp_path / "out"
    report = decompose(
        tiny_llama_bf16, out, rank=4, sketch_dtype="bf16", batch_memory=batch_memory, quiet=True
    )
    check_output(tiny_llama_bf16, out, 4)
    assert report["sketch_dtype"] == "bf16"
    assert verify(tiny_llama_bf16, out).passed
    # As much of each weight's energy as the fp32 sketch captures.
    full = decompose(tiny_llama_bf16, tmp_path / "full", rank=4, quiet=True)
    for a, b in zip(report["matrices"], full["matrices"], strict=True):
        assert a["energy_fraction"] >= b["energy_fraction"] * (1 - 1e-3), a["name"]


def test_tiny_gpt2_is_fan_in_fan_out(tiny_gpt2, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    decompose(tiny_gpt2, out, rank=8, quiet=True)
    config = check_output(tiny_gpt2, out, 8)
    assert config["fan_in_fan_out"] is True
    assert {m.rsplit(".", 1)[1] for m in config["target_modules"]} == {"c_attn", "c_proj", "c_fc"}
    ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(0))
    assert_reload_faithful(
        tiny_gpt2,
        out,
        8,
        AutoModelForCausalLM,
        torch.float32,
        ["c_attn", "c_proj", "c_fc"],
        {"input_ids": ids},
        fan_in_fan_out=True,
    )


def _task_model(cls_name: str, tmp_path: Path) -> tuple[Path, type]:
    import transformers

    torch.manual_seed(0)
    cls = getattr(transformers, cls_name)
    small = dict(num_hidden_layers=2, num_attention_heads=4, intermediate_size=96, vocab_size=96)
    if cls_name.startswith("GPT2"):
        config = transformers.GPT2Config(
            n_embd=64, n_layer=2, n_head=4, n_positions=32, vocab_size=96, num_labels=3,
            pad_token_id=0,
        )  # fmt: skip
    elif cls_name.startswith("CLIP"):
        text = dict(hidden_size=64, max_position_embeddings=32, **small)
        vision = dict(hidden_size=64, image_size=32, patch_size=8, **small)
        vision.pop("vocab_size")
        config = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=32)
    else:
        kind = getattr(transformers, cls_name.split("For")[0] + "Config")
        labels = 2 if cls_name.endswith("QuestionAnswering") else 3  # QA: start and end
        config = kind(hidden_size=64, max_position_embeddings=34, num_labels=labels, **small)
    src = tmp_path / "src"
    cls(config).eval().save_pretrained(src)
    return src, cls


@pytest.mark.parametrize(
    "cls_name",
    [
        "BertForSequenceClassification",
        "RobertaForSequenceClassification",
        "BertForTokenClassification",
        "BertForQuestionAnswering",
        "GPT2ForSequenceClassification",
        "CLIPModel",
    ],
)
def test_task_models_load_with_their_heads_and_start_from_the_original(cls_name, tmp_path):
    """PEFT's classification and QA models make their heads trainable copies (modules_to_save)
    and expect them in the adapter: decompose puts them there, as PEFT saves them. A CLIP
    forward rejects PEFT's feature-extraction wrapper, so dual encoders get no task_type."""
    from peft import PeftModel

    src, cls = _task_model(cls_name, tmp_path)
    out = tmp_path / "out"
    decompose(src, out, rank=4, quiet=True)
    config = json.loads((out / ADAPTER_DIR / "adapter_config.json").read_text())
    g = torch.Generator().manual_seed(0)
    inputs = {"input_ids": torch.randint(1, 96, (2, 10), generator=g)}
    if cls_name.startswith("CLIP"):
        inputs["pixel_values"] = torch.randn(2, 3, 32, 32, generator=g)
        assert config["task_type"] is None and config["modules_to_save"] is None
    else:
        assert config["modules_to_save"], config

    def outputs(model):
        with torch.no_grad():
            got = model.eval()(**inputs)
        return got.logits_per_text if cls_name.startswith("CLIP") else (
            got.logits if hasattr(got, "logits") else got.start_logits
        )  # fmt: skip

    want = outputs(cls.from_pretrained(src))
    model = PeftModel.from_pretrained(
        cls.from_pretrained(out), out / ADAPTER_DIR, is_trainable=True
    )
    torch.testing.assert_close(outputs(model), want, rtol=1e-4, atol=1e-5)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n}
    heads = config["modules_to_save"] or []
    assert bool(trainable) == bool(heads) and all(any(h in n for h in heads) for n in trainable)
    assert verify(src, out).passed
    if heads:  # a head is no target: PEFT trains it whole
        with pytest.raises(InputError, match="in the task head, which PEFT's"):
            stored = load_file(out / ADAPTER_DIR / ADAPTER_FILE)
            head = next(h for h in heads if any(f".{h}." in k for k in stored))
            decompose(src, tmp_path / "o2", rank=4, targets=[rf"(^|\.){head}(\.|$)"], quiet=True)
    if heads:  # the head PEFT loads from the adapter is checked against SRC's too
        path = out / ADAPTER_DIR / ADAPTER_FILE
        tensors = load_file(path)
        key = next(k for k in tensors if "lora_" not in k and k.endswith("weight"))
        tensors[key] = torch.zeros_like(tensors[key])
        save_file(tensors, path)
        result = verify(src, out)
        assert not result.passed and [r.name for r in result.failures] == [key]


@pytest.mark.slow
def test_real_minilm(minilm, tmp_path):
    from transformers import AutoModel, AutoTokenizer

    out = tmp_path / "out"
    decompose(minilm, out, rank=16, quiet=True)
    config = check_output(minilm, out, 16)
    assert config["task_type"] == "FEATURE_EXTRACTION"
    assert len(config["target_modules"]) == 6 * 6  # q, k, v, 3 dense per layer; not the pooler
    # sentence-transformers' pooling settings, which modules.json names, come along.
    for side in ("modules.json", "1_Pooling/config.json", "sentence_bert_config.json"):
        assert (out / side).read_bytes() == (minilm / side).read_bytes(), side
    tok = AutoTokenizer.from_pretrained(minilm)
    inputs = dict(
        tok(["PiSSA keeps the principal components.", "Hello"], padding=True, return_tensors="pt")
    )
    assert_reload_faithful(
        minilm, out, 16, AutoModel, torch.float32, ["query", "key", "value", "dense"], inputs
    )
    assert verify(minilm, out).passed


@pytest.mark.slow
def test_real_smollm2_bf16(smollm2, tmp_path):
    from transformers import AutoModelForCausalLM

    assert len(shard_names(smollm2)) >= 3
    out = tmp_path / "out"
    report = decompose(smollm2, out, rank=64, niter=4, quiet=True)
    config = check_output(smollm2, out, 64)
    assert len(config["target_modules"]) == 30 * 7
    assert "lm_head.weight" not in load_state(out)  # tied embeddings stay tied
    assert report["totals"]["matrices"] == 210
    ids = torch.randint(0, 49152, (4, 32), generator=torch.Generator().manual_seed(0))
    assert_reload_faithful(
        smollm2, out, 64, AutoModelForCausalLM, torch.bfloat16, LLAMA_TARGETS, {"input_ids": ids}
    )
    # Real bf16 weights: every residual within its rounding bound, every other tensor identical.
    result = verify(smollm2, out)
    assert result.passed, result.failures[:3]
    assert sum(r.kind == "target" for r in result.rows) == 210


def move_adapters(model, scale: float, generator: torch.Generator) -> None:
    """A stand-in for training: move every LoRA weight by ``scale`` of its mean magnitude."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.add_(scale * p.abs().mean() * torch.randn(p.shape, generator=generator))


def test_peft_converts_our_adapter_to_lora(tiny_llama, tmp_path):
    """PEFT's save_pretrained(path_initial_model_for_weight_conversion=...) accepts our adapter,
    and the rank-2r LoRA it writes reproduces the trained PiSSA model on the ORIGINAL weights."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    decompose(tiny_llama, out, rank=4, quiet=True)
    pissa = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(out), out, subfolder=ADAPTER_DIR, is_trainable=True
    )
    g = torch.Generator().manual_seed(1)
    move_adapters(pissa, 0.05, g)
    ids = torch.randint(0, 256, (2, 12), generator=g)
    trained = lm_logits(pissa, ids)
    lora_dir = tmp_path / "lora"
    pissa.save_pretrained(lora_dir, path_initial_model_for_weight_conversion=str(out / ADAPTER_DIR))
    lora_cfg = json.loads((lora_dir / ADAPTER_CONFIG).read_text())
    assert lora_cfg["r"] == 8  # PEFT doubles the rank: dW = [B' | -B] @ [A' ; A]
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    original = lm_logits(base, ids)
    converted = lm_logits(PeftModel.from_pretrained(base, lora_dir), ids)
    torch.testing.assert_close(converted, trained, atol=1e-4, rtol=1e-4)
    # ... and the "training" really moved the model (so the check above can fail).
    assert float((trained - original).abs().max()) > 1e-3


@pytest.mark.parametrize(
    ("name", "target"),
    [
        ("model.layers.0.self_attn.q_proj.weight", True),
        ("model.layers.0.mlp.down_proj.weight", True),
        ("model.layers.0.block_sparse_moe.experts.3.w2.weight", True),
        ("bert.encoder.layer.0.attention.self.query.weight", True),
        ("bert.encoder.layer.0.attention.output.dense.weight", True),
        ("bert.encoder.layer.0.intermediate.dense.weight", True),
        ("roberta.encoder.layer.0.output.dense.weight", True),
        ("transformer.h.0.self_attention.dense.weight", True),  # Falcon, BLOOM
        ("gpt_neox.layers.0.attention.dense.weight", True),
        ("model.layers.0.self_attn.dense.weight", True),  # Phi-1/2
        ("transformer.h.0.attn.c_attn.weight", True),
        ("model.layers.0.self_attn.W_pack.weight", True),  # Baichuan 2 (remote code)
        ("model.layers.0.attention.wqkv.weight", True),  # InternLM 2 (remote code)
        ("model.layers.0.attention.wo.weight", True),
        ("model.layers.0.feed_forward.w2.weight", True),
        ("transformer.h.0.mlp.w1.weight", True),  # Qwen-1 (remote code)
        ("transformer.encoder.layers.0.mlp.dense_h_to_4h.weight", True),  # ChatGLM
        ("transformer.encoder.layers.0.self_attention.query_key_value.weight", True),
        ("model.visual.blocks.0.attn.qkv.weight", True),  # Qwen2.5-VL's vision tower
        ("model.visual.blocks.0.mlp.linear_fc1.weight", True),  # Qwen3-VL's
        ("model.vision_tower.encoder.layers.0.self_attn.q_proj.linear.weight", True),  # Gemma 4
        ("model.visual.merger.linear_fc1.weight", False),  # the projector between towers
        ("model.multi_modal_projector.linear_1.weight", False),
        ("bert.pooler.dense.weight", False),  # not attention or MLP
        ("cls.predictions.transform.dense.weight", False),
        ("classifier.dense.weight", False),
        ("classifier.out_proj.weight", False),  # RoBERTa / BART classification heads
        ("score.weight", False),
        ("lm_head.weight", False),
        ("model.embed_tokens.weight", False),
        ("model.layers.0.self_attn.q_proj.bias", False),
    ],
)
def test_default_targets(name, target):
    from pissa_svd.targets import select

    assert (select(name, (8, 8)) is not None) == target
    assert select(name, (8,)) is None  # only 2-D weights


@pytest.mark.parametrize(
    ("name", "target"),
    [
        ("gpt_neox.embed_in.weight", False),
        ("model.decoder.embed_positions.weight", False),  # OPT
        ("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", False),  # T5
        ("vision_model.embeddings.position_embedding.weight", False),  # CLIP
        ("text_model.embeddings.token_embedding.weight", False),
        ("lm_head.weight", False),
        ("time_embedding.linear_1.weight", True),  # a Linear inside an embedding block
        ("model.layers.0.mlp.gate_proj.weight", True),
    ],
)
def test_targets_pattern_never_picks_embeddings(name, target):
    """--targets '.' picks any 2-D weight except embeddings and output heads: PEFT wraps
    embeddings as lora.Embedding, which would drop a lora_A/lora_B adapter for them."""
    from pissa_svd.targets import select

    assert (select(name, (8, 8), patterns=["."]) is not None) == target


def test_a_vision_language_config_transformers_cannot_build_is_refused(tmp_path):
    """Such models' layers get other names on loading (tests/test_families.py), which only
    transformers can tell: where it cannot build the model, decompose says so and stops."""
    from safetensors.torch import save_file

    src = tmp_path / "src"
    src.mkdir()
    g = torch.Generator().manual_seed(0)
    name = "language_model.model.layers.0.self_attn.q_proj.weight"
    save_file({name: torch.randn(16, 16, generator=g)}, src / "model.safetensors")
    config = {"architectures": ["LlavaForConditionalGeneration"], "vision_config": {}}
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match="has a vision_config, and transformers cannot build"):
        decompose(src, tmp_path / "out", rank=4, quiet=True)
    assert not (tmp_path / "out").exists()


def test_single_file_and_target_patterns(minilm, tmp_path):
    out = tmp_path / "out"
    report = decompose(
        minilm / "model.safetensors",
        out,
        rank=4,
        targets=[r"attention\.self\.(query|value)$"],
        quiet=True,
    )
    assert report["totals"]["matrices"] == 12
    assert (out / "model.safetensors").is_file()
    assert not (out / "model.safetensors.index.json").exists()
    config = json.loads((out / ADAPTER_DIR / ADAPTER_CONFIG).read_text())
    assert all(m.endswith(("query", "value")) for m in config["target_modules"])


def test_seeded_runs_are_byte_identical(tiny_llama, tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for out, seed in ((a, 0), (b, 0), (c, 1)):
        decompose(tiny_llama, out, rank=8, method="halko", seed=seed, quiet=True)
    fa, fb, fc = (p / ADAPTER_DIR / ADAPTER_FILE for p in (a, b, c))
    assert fa.read_bytes() == fb.read_bytes()
    assert fa.read_bytes() != fc.read_bytes()


def test_batched_equals_one_at_a_time(tiny_llama, tmp_path):
    """Same-shape targets of a shard go through one (b, m, n) call; the result does not depend
    on the batching (same per-tensor sketch), only on floating-point summation order."""
    from pissa_svd.pipeline import Options, make_plan

    plan = make_plan(tiny_llama, tmp_path / "p", Options(rank=8, method="halko"))
    assert max(len(b) for b in plan.batches) >= 2
    for batch in plan.batches:
        assert len({t.batch_key() for t in batch}) == 1
        assert len({t.info.path for t in batch}) == 1  # never across shards
    a, b = tmp_path / "batched", tmp_path / "single"
    ra = decompose(tiny_llama, a, rank=8, method="halko", quiet=True)
    rb = decompose(tiny_llama, b, rank=8, method="halko", batch_memory=0, quiet=True)
    assert max(r["batch"] for r in ra["matrices"]) >= 2
    assert {r["batch"] for r in rb["matrices"]} == {1}
    assert [r["name"] for r in ra["matrices"]] == [r["name"] for r in rb["matrices"]]
    check_output(tiny_llama, a, 8)
    for sub in ("", ADAPTER_DIR):
        sa, sb = load_state(a / sub), load_state(b / sub)
        assert sa.keys() == sb.keys()
        for k in sa:
            torch.testing.assert_close(sa[k], sb[k], rtol=1e-4, atol=1e-5, msg=k)


def test_batch_memory_caps_the_batch(tiny_llama, tmp_path):
    from pissa_svd.pipeline import Options, make_plan

    one = make_plan(tiny_llama, tmp_path / "p", Options(rank=8)).targets[0].work_bytes
    plan = make_plan(tiny_llama, tmp_path / "p", Options(rank=8, batch_memory=2 * one))
    assert max(len(b) for b in plan.batches) == 2
    assert all(len(b) * b[0].work_bytes <= 2 * one or len(b) == 1 for b in plan.batches)


@pytest.mark.skipif(
    os.environ.get("PISSA_SVD_NO_EXT") == "1", reason="PISSA_SVD_NO_EXT=1: extension not built"
)
def test_native_backend_end_to_end(tiny_llama, tmp_path):
    """decompose --backend native: same structural promises, same result as the torch path."""
    a, b = tmp_path / "native", tmp_path / "torch"
    ra = decompose(tiny_llama, a, rank=8, method="halko", backend="native", quiet=True)
    decompose(tiny_llama, b, rank=8, method="halko", backend="torch", quiet=True)
    check_output(tiny_llama, a, 8)
    for ra_row, rb_row in zip(
        ra["matrices"], json.loads((b / REPORT_FILE).read_text())["matrices"], strict=True
    ):
        torch.testing.assert_close(
            torch.tensor(ra_row["singular_values"]),
            torch.tensor(rb_row["singular_values"]),
            rtol=1e-4,
            atol=1e-5,
        )


def test_side_folders_are_copied_without_weights_or_adapters(tiny_llama, tmp_path):
    """sentence-transformers keeps its pooling and normalization settings in subfolders
    (1_Pooling/config.json), which modules.json names: copied, with a module's own weights
    (2_Dense/model.safetensors). Other weights of any format, hidden folders and PEFT adapters
    kept inside the checkpoint folder are not."""
    import shutil

    src = tmp_path / "src"
    shutil.copytree(tiny_llama, src)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {
            "idx": 1,
            "name": "1",
            "path": "1_Pooling",
            "type": "sentence_transformers.models.Pooling",
        },
        {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"},
    ]
    side = {
        "modules.json": json.dumps(modules),
        "1_Pooling/config.json": '{"pooling_mode_mean_tokens": true}',
        "2_Dense/config.json": '{"in_features": 64, "out_features": 32}',
        "2_Normalize/.keep": "",
        "onnx/model.onnx": "weights",
        "onnx/config.json": "{}",
        "run/adapter_config.json": "{}",
        ".git/HEAD": "ref",
    }
    for name, text in side.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_text(text)
    dense = {"linear.weight": torch.randn(32, 64)}  # a module's own weights: the model's
    save_file(dense, src / "2_Dense" / "model.safetensors")
    out = tmp_path / "out"
    decompose(src, out, rank=4, quiet=True)
    copied = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert {"modules.json", "1_Pooling/config.json", "onnx/config.json"} <= copied
    assert (out / "2_Dense" / "model.safetensors").read_bytes() == (
        src / "2_Dense" / "model.safetensors"
    ).read_bytes()
    assert (out / "1_Pooling/config.json").read_text() == side["1_Pooling/config.json"]
    assert not copied & {"onnx/model.onnx", "run/adapter_config.json", ".git/HEAD"}
    assert not copied & {"2_Normalize/.keep"}  # hidden files stay behind
    decompose(src, out, rank=4, quiet=True, overwrite=True)  # its own module weights: ours


@pytest.mark.parametrize("what", ["file", "folder"])
def test_side_files_linked_from_outside_are_refused(tiny_llama, tmp_path, what):
    """A side file or folder that links out of the checkpoint would be copied into OUT (a
    file from anywhere, published with the model) or dropped without a word (a folder):
    refused, as weights that link out are. Links inside the checkpoint are fine."""
    import shutil

    src = tmp_path / "src"
    shutil.copytree(tiny_llama, src)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("not the model's")
    (src / "inside.json").write_text("{}")
    (src / "alias.json").symlink_to(src / "inside.json")
    if what == "file":
        (src / "tokenizer.json").symlink_to(outside / "secret.txt")
    else:
        (src / "1_Pooling").symlink_to(outside)
    with pytest.raises(InputError, match="is a link to .*outside the checkpoint folder"):
        decompose(src, tmp_path / "out", rank=4, quiet=True)
    assert not (tmp_path / "out").exists()
    (src / ("tokenizer.json" if what == "file" else "1_Pooling")).unlink()
    # A folder linking inside is copied under its link name too; one linking above it (a
    # cycle) is not followed.
    (src / "pool").mkdir()
    (src / "pool" / "config.json").write_text('{"x": 1}')
    (src / "1_Pooling").symlink_to(src / "pool")
    (src / "pool" / "up").symlink_to(src)
    (src / "a").mkdir()
    (src / "b").mkdir()
    (src / "a" / "to_b").symlink_to(src / "b")  # a cycle of two links
    (src / "b" / "to_a").symlink_to(src / "a")
    (src / "b" / "x.json").write_text("{}")
    decompose(src, tmp_path / "out", rank=4, quiet=True)
    assert (tmp_path / "out" / "alias.json").read_text() == "{}"
    assert (tmp_path / "out" / "1_Pooling" / "config.json").read_text() == '{"x": 1}'
    assert (tmp_path / "out" / "pool" / "config.json").is_file()
    assert not (tmp_path / "out" / "pool" / "up").exists()
    copied = {p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*")}
    assert {"b/x.json", "a/to_b/x.json"} <= copied and not any("to_a/" in p for p in copied)


def test_library_options_take_python_types_or_say_which_is_wrong(tiny_llama, tmp_path):
    """decompose() from Python: a regex string is one pattern (not its letters), torch dtypes
    and devices stand for their names; other wrong types are an InputError naming the option."""
    from pissa_svd.pipeline import decompose as run

    report = run(
        tiny_llama,
        tmp_path / "o",
        rank=4,
        targets="q_proj",
        exclude="layers\\.0\\.",
        adapter_dtype=torch.bfloat16,
        sketch_dtype=torch.bfloat16,
        device=torch.device("cpu"),
        quiet=True,
    )
    assert report["sketch_dtype"] == "bf16"
    assert {m["name"].split(".")[-2] for m in report["matrices"]} == {"q_proj"}
    assert len(report["matrices"]) == 2  # layers 1 and 2
    adapter = load_file(tmp_path / "o" / "pissa_init" / "adapter_model.safetensors")
    assert {t.dtype for t in adapter.values()} == {torch.bfloat16}
    bad = [
        (dict(rank=True), "--rank must be a positive integer, got True"),
        (dict(rank="4"), "--rank must be a positive integer, got '4'"),
        (dict(rank=4, batch_memory="512M"), "batch_memory must be an integer (bytes"),
        (dict(rank=4, alpha="8"), "alpha must be a number, got '8'"),
        (dict(rank=4, seed="1"), "seed must be an integer, got '1'"),
        (dict(rank=4, targets=[1]), "targets must be a regex string or a list of them"),
        (dict(rank=4, quant_iters=3), "quant_iters is for quantize="),
    ]
    for kwargs, match in bad:
        with pytest.raises(InputError, match=re.escape(match)):
            run(tiny_llama, tmp_path / "bad", quiet=True, **kwargs)
        assert not (tmp_path / "bad").exists()
