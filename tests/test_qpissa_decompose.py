"""decompose --quantize (QPiSSA): fixed-point residuals that load in 4 bits as stored."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pissa_svd.quant import fake_quantize

RANK = 8


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(path.glob("*.safetensors")) for k, v in load_file(f).items()}


@pytest.fixture(scope="module")
def qout(tiny_llama, tmp_path_factory) -> Path:
    from pissa_svd import decompose

    out = tmp_path_factory.mktemp("qpissa") / "out"
    decompose(tiny_llama, out, rank=RANK, niter=4, quantize="nf4", quant_iters=3, quiet=True)
    return out


def test_residuals_are_nf4_fixed_points_and_the_report_says_so(tiny_llama, qout, run_cli):
    report = json.loads((qout / "pissa_report.json").read_text())
    assert report["quantize"] == "nf4" and report["quant_iters"] == 3
    rows = report["matrices"]
    assert len(rows) == 21
    for r in rows:
        q = r["quantization"]
        assert len(q["errors"]) == len(q["refit_errors"]) == 3
        assert q["best_error"] == min(q["errors"] + q["refit_errors"])
    # QPiSSA's point: on average the adapter takes a good share of the quantization error.
    mean = sum(r["quantization"]["error_reduction"] for r in rows) / len(rows)
    assert mean > 0.1
    res = _tensors(qout)
    for r in rows:
        R = res[r["name"]]
        assert torch.equal(fake_quantize(R, "nf4"), R), r["name"]
    code, stdout, _ = run_cli("verify", tiny_llama, qout, "--quiet")
    assert code == 0 and "quantization error" in stdout


def test_verify_reads_reports_without_refit_fields(tiny_llama, qout, run_cli, tmp_path):
    """A report from before refitted adapters were scored records the chosen error only in
    ``errors[best_iter - 1]``: verify checks against it, and still catches a wrong one."""
    old = Path(shutil.copytree(qout, tmp_path / "old"))
    report = json.loads((old / "pissa_report.json").read_text())
    for r in report["matrices"]:
        q = r["quantization"]
        q["errors"][q["best_iter"] - 1] = q.pop("best_error")
        del q["refit_errors"], q["best_refit"]
    (old / "pissa_report.json").write_text(json.dumps(report))
    code, stdout, _ = run_cli("verify", tiny_llama, old, "--quiet")
    assert code == 0, stdout
    q = report["matrices"][0]["quantization"]
    q["errors"][q["best_iter"] - 1] *= 1.01
    (old / "pissa_report.json").write_text(json.dumps(report))
    code, stdout, _ = run_cli("verify", tiny_llama, old, "--quiet")
    assert code == 1 and "decompose recorded" in stdout


def test_loads_in_4_bits_with_exactly_the_stored_residual(tiny_llama, qout):
    import bitsandbytes.functional as bnbf  # in the test extra: runs on CPU
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    cfg = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    model = AutoModelForCausalLM.from_pretrained(qout, quantization_config=cfg, device_map="cpu")
    res = _tensors(qout)
    for name, mod in model.named_modules():
        if hasattr(mod, "weight") and hasattr(mod.weight, "quant_state"):
            deq = bnbf.dequantize_4bit(mod.weight.data, mod.weight.quant_state)
            assert torch.equal(deq.to(res[f"{name}.weight"].dtype), res[f"{name}.weight"]), name

    # QPiSSA (4-bit residual + adapter) is closer to the original model than QLoRA (4-bit W).
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(tiny_llama)(input_ids=ids).logits
        qlora = AutoModelForCausalLM.from_pretrained(
            tiny_llama, quantization_config=cfg, device_map="cpu"
        )(input_ids=ids).logits
        peft = PeftModel.from_pretrained(model, qout, subfolder="pissa_init")
        ours = peft(input_ids=ids).logits
    assert float((ours - want).norm()) < float((qlora - want).norm())


def test_int8_residuals_are_fixed_points(tiny_llama, tmp_path):
    from pissa_svd import decompose

    out = tmp_path / "out"
    decompose(tiny_llama, out, rank=RANK, quantize="int8", quant_iters=1, quiet=True)
    res = _tensors(out)
    for r in json.loads((out / "pissa_report.json").read_text())["matrices"]:
        assert torch.equal(fake_quantize(res[r["name"]], "int8"), res[r["name"]]), r["name"]


def test_quantize_bad_input(tiny_llama, run_cli, tmp_path):
    out = tmp_path / "out"
    code, _, err = run_cli("decompose", tiny_llama, "--rank", 4, "--out", out, "--quantize", "fp3")
    assert code == 2 and "--quantize" in err
    code, _, err = run_cli(
        "decompose", tiny_llama, "--rank", 4, "--out", out, "--quantize", "nf4", "--quant-iters", 0
    )
    assert code == 2 and "--quant-iters" in err and not out.exists()
    quantized = Path(shutil.copytree(tiny_llama, tmp_path / "q"))
    cfg = json.loads((quantized / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (quantized / "config.json").write_text(json.dumps(cfg))
    code, _, err = run_cli("decompose", quantized, "--rank", 4, "--out", out, "--quantize", "nf4")
    assert code == 2 and "already quantized" in err and "Traceback" not in err
