"""Mixture-of-experts checkpoints: transformers 5 fuses the experts on loading.

The files name every expert's weight (``experts.3.w1``, ``experts.3.gate_proj``); the model
transformers builds holds one 3-D parameter per layer. PEFT maps per-expert adapters onto it
for some families and silently drops them for others. These tests hold decompose's load check
to what PEFT really does with the installed versions, whatever they are.
"""

from __future__ import annotations

import json
import sys

import peft
import pytest
import torch
import transformers

from pissa_svd import InputError, decompose
from pissa_svd.pipeline import ADAPTER_DIR

from .conftest import TINY_MOE, save_tiny_moe
from .test_decompose import load_state


@pytest.fixture(scope="module", params=sorted(TINY_MOE))
def moe(request, tmp_path_factory):
    family = request.param
    return family, save_tiny_moe(tmp_path_factory.mktemp(family) / "src", family)


def logits(path, ids, adapter=None):
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if adapter is not None:
        model = peft.PeftModel.from_pretrained(model, adapter, is_trainable=True)
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


def expert_tensors(state: dict) -> dict:
    return {k: v for k, v in state.items() if ".experts." in k}


def test_load_check_agrees_with_peft(moe, tmp_path):
    """Decompose refuses the experts exactly when PEFT would not reproduce the model at step 0."""
    family, src = moe
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    unchecked = tmp_path / "unchecked"
    report = decompose(src, unchecked, rank=4, load_check=False, quiet=True)
    assert report["load_check"] is None
    assert any(".experts." in r["name"] for r in report["matrices"])
    reference = logits(src, ids)
    faithful = torch.allclose(
        logits(unchecked, ids, unchecked / ADAPTER_DIR), reference, atol=1e-4, rtol=1e-4
    )

    checked = tmp_path / "checked"
    if faithful:
        report = decompose(src, checked, rank=4, quiet=True)
        assert report["load_check"].startswith("every target gets its adapter in transformers")
        return
    with pytest.raises(InputError) as info:
        decompose(src, checked, rank=4, quiet=True)
    message = str(info.value)
    assert "get no adapter" in message and ".experts." in message
    assert r"--exclude '\.experts\.'" in message and "--no-load-check" in message
    assert not checked.exists()
    # The way out the message offers works: the experts stay whole, step 0 is the model.
    report = decompose(src, checked, rank=4, exclude=[r"\.experts\."], quiet=True)
    assert not any(".experts." in r["name"] for r in report["matrices"])
    assert report["load_check"] is None
    original, residual = expert_tensors(load_state(src)), expert_tensors(load_state(checked))
    assert original.keys() == residual.keys() and original
    assert all(torch.equal(original[k], residual[k]) for k in original)
    torch.testing.assert_close(
        logits(checked, ids, checked / ADAPTER_DIR), reference, atol=1e-4, rtol=1e-4
    )


def test_check_finds_targets_the_model_lacks(tmp_path):
    """A target that no module of the built model answers to is reported, even when other
    targets are fused parameters that PEFT does map."""
    from pissa_svd import loadcheck

    src = save_tiny_moe(tmp_path / "src", "mixtral")
    config = json.loads((src / "config.json").read_text())
    sizes = {
        "model.layers.0.self_attn.q_proj": 64 * 64,
        "model.layers.1.block_sparse_moe.experts.2.w9": 96 * 64,
    }
    result = loadcheck.check(src, config, sizes, rank=4)
    assert result.ok is False
    assert result.missing == ("model.layers.1.block_sparse_moe.experts.2.w9",)
    assert loadcheck.needed(["model.layers.0.mlp.experts.0.gate_proj"])
    assert not loadcheck.needed(["model.layers.0.mlp.shared_expert.gate_proj"])


def test_load_check_result_in_dry_run_and_report(tmp_path, run_cli):
    src = save_tiny_moe(tmp_path / "src", "mixtral")
    code, out, err = run_cli("decompose", src, "--rank", "4", "--out", tmp_path / "o", "--dry-run")
    assert code == 0, err
    assert "  loading      every target gets its adapter in transformers" in out


def test_without_peft_the_check_says_so(tmp_path, monkeypatch):
    src = save_tiny_moe(tmp_path / "src", "mixtral")
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft -> ImportError
    report = decompose(src, tmp_path / "out", rank=4, quiet=True)
    assert report["load_check"] == "not checked: peft is not installed"


def test_remote_code_models_are_not_built(tmp_path):
    src = save_tiny_moe(tmp_path / "src", "qwen2_moe")
    config = json.loads((src / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomMoe"}
    (src / "config.json").write_text(json.dumps(config))
    report = decompose(src, tmp_path / "out", rank=4, quiet=True)
    assert report["load_check"].startswith("not checked: the model needs remote code")


def test_exclude(tiny_llama, tmp_path, run_cli):
    report = decompose(tiny_llama, tmp_path / "a", rank=4, exclude=[r"\.mlp\."], quiet=True)
    names = [r["name"] for r in report["matrices"]]
    assert names and all(".self_attn." in n for n in names)
    report = decompose(
        tiny_llama, tmp_path / "b", rank=4, targets=["proj$"], exclude=["q_proj", "up_"], quiet=True
    )
    leaves = {r["name"].split(".")[-2] for r in report["matrices"]}
    assert leaves == {"k_proj", "v_proj", "o_proj", "gate_proj", "down_proj"}
    code, _, err = run_cli(
        "decompose", tiny_llama, "--rank", "4", "--out", tmp_path / "c", "--exclude", "proj"
    )
    assert code == 2
    assert "the default target patterns without --exclude proj matched no 2-D weight" in err
    code, _, err = run_cli(
        "decompose", tiny_llama, "--rank", "4", "--out", tmp_path / "c", "--exclude", "("
    )
    assert code == 2 and "--exclude pattern '(' is not a valid regex" in err
