"""decompose --quantize (QPiSSA): fixed-point residuals that load in 4 bits as stored."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pissa_svd.quant import fake_quantize, nf4_dequantize, nf4_quantize

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


def test_verify_reads_reports_without_refit_fields(
    tiny_llama, qout, run_cli, tmp_path, monkeypatch
):
    """A report from before refitted adapters were scored records the chosen error only in
    ``errors[best_iter - 1]``: verify checks against it, and still catches a wrong one."""
    from pissa_svd import convert

    monkeypatch.setattr(convert, "_CHUNK_ELEMENTS", 1000)  # blocks of rows, the sums whole
    old = Path(shutil.copytree(qout, tmp_path / "old"))
    report = json.loads((old / "pissa_report.json").read_text())
    assert report.pop("error_sums") == "per row, in fp64"  # older reports summed in fp32
    for r in report["matrices"]:
        q = r["quantization"]
        q["errors"][q["best_iter"] - 1] = q.pop("best_error")
        del q["refit_errors"], q["best_refit"], q["stored_error"]
    (old / "pissa_report.json").write_text(json.dumps(report))
    code, stdout, _ = run_cli("verify", tiny_llama, old, "--quiet")
    assert code == 0, stdout
    q = report["matrices"][0]["quantization"]
    q["errors"][q["best_iter"] - 1] *= 1.01
    (old / "pissa_report.json").write_text(json.dumps(report))
    code, stdout, _ = run_cli("verify", tiny_llama, old, "--quiet")
    assert code == 1 and "decompose recorded" in stdout


def _generic_bnb_kernels(model):
    """bitsandbytes' AVX512-BF16 CPU inference path repacks each 4-bit weight on its first
    forward and needs out_features % 32 == 0 (the tiny model has 176-wide MLPs): use its
    generic CPU kernels instead, as on CPUs without AVX512-BF16."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


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
            data, state = mod.weight.data, mod.weight.quant_state
            if getattr(state, "packing_format_for_cpu", False):
                # On CPUs with AVX512-BF16, bitsandbytes repacks the codes for its own GEMM
                # after loading; undo that (as its state_dict saving does) to read them.
                data, state = bnbf._convert_weight_packed_for_cpu_inverse(data, state)
            # What bitsandbytes stored (two codes per byte, high nibble first, and the fp32
            # absmax per block of 64) is exactly our quantization of the stored residual,
            # whose dequantization is that residual, bit for bit. (Its own AVX512 CPU
            # dequantize kernel misreads blocks that straddle rows, e.g. 176 columns, so
            # the codes are compared rather than its dequantized output.)
            stored = res[f"{name}.weight"]
            codes, absmax = nf4_quantize(stored)
            packed = data.view(torch.uint8).flatten()
            bnb_codes = torch.stack([packed >> 4, packed & 15], dim=-1).flatten()
            assert torch.equal(bnb_codes[: codes.numel()], codes), name
            assert torch.equal(state.absmax.float(), absmax), name
            assert state.blocksize == 64
            deq = nf4_dequantize(codes, absmax, stored.shape, stored.dtype)
            assert torch.equal(deq, stored), name

    # QPiSSA (4-bit residual + adapter) is closer to the original model than QLoRA (4-bit W).
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(tiny_llama)(input_ids=ids).logits
        qlora = _generic_bnb_kernels(
            AutoModelForCausalLM.from_pretrained(
                tiny_llama, quantization_config=cfg, device_map="cpu"
            )
        )(input_ids=ids).logits
        peft = PeftModel.from_pretrained(_generic_bnb_kernels(model), qout, subfolder="pissa_init")
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


# ------------------------------------------------------------------------------------------
# verify: the orientation and dtypes decompose quantized in


def _rewrite(folder: Path, name: str, fn) -> None:
    """Replace tensor ``name`` by fn(tensor) in whichever safetensors file of ``folder`` has it."""
    from safetensors.torch import save_file

    for f in sorted(folder.glob("*.safetensors")):
        tensors = load_file(f)
        if name in tensors:
            tensors[name] = fn(tensors[name]).contiguous()
            save_file(tensors, f, metadata={"format": "pt"})
            return
    raise KeyError(name)


def _verify_catches_tampering(src: Path, good: Path, name: str, run_cli, tmp_path) -> None:
    """Two wrong outputs fail: a residual doubled (still a fixed point: scales and codes
    double exactly) and an adapter whose B is 10% larger (the error, nearly orthogonal to
    s B@A, moves only to second order in a change of the adapter: 1% moves it ~0.2%)."""
    module = name.removesuffix(".weight")
    for what, folder, key in [
        ("residual", None, name),
        ("adapter", "pissa_init", f"base_model.model.{module}.lora_B.weight"),
    ]:
        bad = Path(shutil.copytree(good, tmp_path / f"bad_{what}"))
        factor = 2.0 if what == "residual" else 1.1
        _rewrite(bad / folder if folder else bad, key, lambda t, f=factor: (t * f).to(t.dtype))
        code, stdout, _ = run_cli("verify", src, bad, "--quiet")
        says = (f"worst {name}: quantization error", f"worst {name}: a quantization block is off")
        assert code == 1 and any(x in stdout for x in says), (what, stdout)


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_verify_catches_a_block_changed_in_a_large_residual(scheme, run_cli, tmp_path):
    """One number per matrix (the recorded error) misses a block or two of a large matrix:
    two swapped or one zeroed NF4 block of 64 values (a swapped pair of int8 rows) keep the
    residual a fixed point and move its error by less than the tolerance. Each quantization
    block's own error against its scale catches them."""
    from safetensors.torch import save_file

    from pissa_svd import decompose

    g = torch.Generator().manual_seed(0)
    n = 1024
    W = (torch.randn(n, 16, generator=g) @ torch.randn(16, n, generator=g) * 0.05) * 0.02
    W += torch.randn(n, n, generator=g) * 0.02
    (tmp_path / "src").mkdir()
    name = "model.layers.0.self_attn.q_proj.weight"
    save_file({name: W.contiguous()}, tmp_path / "src" / "model.safetensors")
    good = tmp_path / "good"
    decompose(tmp_path / "src", good, rank=8, quantize=scheme, quant_iters=1, quiet=True)
    assert run_cli("verify", tmp_path / "src", good, "--quiet")[0] == 0

    def swap(t):
        t = t.clone()
        flat = t.view(-1)
        size = 64 if scheme == "nf4" else n
        a, b = 100 * size, 9000 * size if scheme == "nf4" else 700 * size
        flat[a : a + size], flat[b : b + size] = (
            flat[b : b + size].clone(),
            flat[a : a + size].clone(),
        )
        return t

    def zero(t):
        t = t.clone()
        t.view(-1)[64 * 500 : 64 * 501] = 0
        return t

    for how, fn in (("swapped", swap), ("zeroed", zero)):
        bad = Path(shutil.copytree(good, tmp_path / how))
        _rewrite(bad, name, fn)
        code, stdout, _ = run_cli("verify", tmp_path / "src", bad, "--quiet")
        assert code == 1 and "a quantization block is off by" in stdout, (how, stdout)


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_verify_quantized_conv1d_in_the_orientation_bitsandbytes_quantizes(
    scheme, tiny_gpt2, run_cli, tmp_path, monkeypatch
):
    """GPT-2's Conv1D weights are stored (in, out); transformers transposes them before
    bitsandbytes quantizes them, and decompose quantized them so: verify checks the fixed
    point and the error in that (out, in) orientation, here in blocks of a few rows."""
    from pissa_svd import convert, decompose

    monkeypatch.setattr(convert, "_CHUNK_ELEMENTS", 1000)

    out = tmp_path / "out"
    decompose(tiny_gpt2, out, rank=4, niter=4, quantize=scheme, quant_iters=2, quiet=True)
    name = "transformer.h.0.attn.c_attn.weight"
    R = _tensors(out)[name]
    assert torch.equal(fake_quantize(R.mT.contiguous(), scheme), R.mT)
    code, stdout, _ = run_cli("verify", tiny_gpt2, out, "--quiet")
    assert code == 0 and "PASS: 8 adapted tensors" in stdout, stdout
    _verify_catches_tampering(tiny_gpt2, out, name, run_cli, tmp_path)
    bad = Path(shutil.copytree(out, tmp_path / "bad_fixed_point"))
    _rewrite(bad, name, lambda t: t * 1.01)
    code, stdout, _ = run_cli("verify", tiny_gpt2, bad, "--quiet")
    assert code == 1 and f"worst {name}: not a {scheme} fixed point" in stdout, stdout


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
@pytest.mark.parametrize("residual_dtype", [None, "bf16"])
def test_verify_quantized_residual_rounded_to_16_bits(
    scheme, residual_dtype, tiny_llama, tiny_llama_bf16, run_cli, tmp_path, monkeypatch
):
    """In bf16 the stored residual's scales are the scored ones rounded (quant._settle), so
    its error is not exactly the recorded one; verify allows for that rounding only. Verify
    goes in row blocks that start on a quantization block: down_proj's 176 columns put an NF4
    block boundary every 4 rows, and 1000 values give blocks of 4 rows (5 would not do)."""
    from pissa_svd import convert, decompose

    monkeypatch.setattr(convert, "_CHUNK_ELEMENTS", 1000)

    src = tiny_llama if residual_dtype else tiny_llama_bf16
    out = tmp_path / "out"
    decompose(
        src,
        out,
        rank=RANK,
        niter=4,
        quantize=scheme,
        quant_iters=2,
        residual_dtype=residual_dtype,
        quiet=True,
    )
    code, stdout, _ = run_cli("verify", src, out, "--quiet")
    assert code == 0 and "PASS: 21 adapted tensors" in stdout, stdout
    _verify_catches_tampering(src, out, "model.layers.1.self_attn.o_proj.weight", run_cli, tmp_path)


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_verify_passes_a_matrix_the_adapter_captures_whole(tiny_llama, run_cli, tmp_path, scheme):
    """Rank 32 = min(32, 64) for k_proj/v_proj: the adapter holds all of W, the quantization
    error is ~1e-8 of ||W|| and the recomputed one differs from the recorded one by fp32
    rounding alone. A 0.1% relative slack alone failed these; tampering still fails."""
    from pissa_svd.pipeline import decompose

    out = tmp_path / "out"
    decompose(tiny_llama, out, rank=32, quantize=scheme, quant_iters=1, quiet=True)
    code, _, err = run_cli("verify", tiny_llama, out)
    assert code == 0, err
    from safetensors.torch import save_file

    src = {k: v for f in Path(tiny_llama).glob("*.safetensors") for k, v in load_file(f).items()}
    shard = next(f for f in out.glob("*.safetensors") if "v_proj" in str(load_file(f).keys()))
    tensors = load_file(shard)
    name = next(k for k in tensors if k.endswith("v_proj.weight"))
    changed = tensors[name] + 0.01 * src[name]  # a residual off by 1% of W, requantized
    tensors[name] = fake_quantize(changed, scheme)
    save_file(tensors, shard, metadata={"format": "pt"})
    code, out_text, _ = run_cli("verify", tiny_llama, out)
    assert code == 1 and "FAIL" in out_text


def test_verify_checks_the_recorded_error_of_the_stored_residual(tiny_llama, qout, tmp_path):
    """The report records the stored residual's own error (stored_error), so verify needs no
    allowance for rounded scales: a 1% larger lora_B, which only moves the error to second
    order, fails, as does a wrong record."""
    from safetensors.torch import save_file

    from pissa_svd.convert import verify

    assert verify(tiny_llama, qout, quiet=True).passed
    changed = Path(shutil.copytree(qout, tmp_path / "changed"))
    path = changed / "pissa_init" / "adapter_model.safetensors"
    adapter = load_file(path)
    key = next(k for k in adapter if "layers.0.self_attn.q_proj.lora_B" in k)
    adapter[key] = adapter[key] * 1.01
    save_file(adapter, path, metadata={"format": "pt"})
    result = verify(tiny_llama, changed, quiet=True)
    assert not result.passed and "q_proj" in result.worst().name


def test_to_lora_of_a_qpissa_init_says_what_it_gives(qout, run_cli, tmp_path):
    init = qout / "pissa_init"
    copy = shutil.copytree(init, tmp_path / "copy")  # an untrained copy: a zero LoRA, warned
    code, stdout, err = run_cli(
        "to-lora", "--init", init, "--trained", copy, "--out", tmp_path / "lora"
    )
    assert code == 0 and "the LoRA is zero" in err, err
    assert "The residual was nf4-quantized (QPiSSA), the original is not" in stdout


@pytest.mark.parametrize(
    ("change", "says"),
    [
        (lambda path: path.write_text("{not json"), "is not a readable decompose report"),
        (
            lambda path: _edit_records(path, lambda q: q.pop("stored_error")),
            "incomplete or corrupt",
        ),
        (lambda path: _edit_records(path, lambda q: q.update(stored_error="abc")), "corrupt"),
        (lambda path: _edit_records(path, lambda q: q.update(scheme="nf3")), "corrupt"),
    ],
)
def test_verify_with_a_broken_report_is_bad_input(
    tiny_llama, qout, run_cli, tmp_path, change, says
):
    """The report says how a QPiSSA residual is checked: a broken one is one line, exit 2."""
    broken = Path(shutil.copytree(qout, tmp_path / "broken"))
    change(broken / "pissa_report.json")
    code, _, err = run_cli("verify", tiny_llama, broken, "--quiet")
    assert code == 2 and says in err and "Traceback" not in err, err


def _edit_records(path: Path, fn) -> None:
    """Apply ``fn`` to every quantization record of the report at ``path``; the popped
    stored_error leaves records with neither errors nor best_error."""
    report = json.loads(path.read_text())
    for r in report["matrices"]:
        q = r["quantization"]
        fn(q)
        q.pop("best_error", None), q.pop("errors", None)
    path.write_text(json.dumps(report))


def test_verify_without_the_report_says_the_residual_is_quantized(
    tiny_llama, qout, run_cli, tmp_path
):
    """Without its report a QPiSSA output fails the plain check; the failure says why."""
    bare = Path(shutil.copytree(qout, tmp_path / "bare"))
    (bare / "pissa_report.json").unlink()
    code, stdout, _ = run_cli("verify", tiny_llama, bare, "--quiet")
    assert code == 1 and "is an nf4 fixed point" in stdout and "pissa_report.json" in stdout
    code, stdout, _ = run_cli("verify", tiny_llama, qout, "--quiet")
    assert code == 0 and "fixed point:" not in stdout


def test_int8_residuals_load_in_8_bits_as_stored(tiny_llama, run_cli, tmp_path):
    """bitsandbytes' 8-bit layer casts a weight to fp16 before quantizing it; the int8
    residual is a fixed point of exactly that, in fp32 as in fp16, so it loads as stored."""
    for dtype in ("fp32", "fp16"):
        out = tmp_path / dtype
        args = ["decompose", tiny_llama, "--rank", "4", "--quantize", "int8", "--quant-iters", "1"]
        code, _, err = run_cli(*args, "--out", out, "--residual-dtype", dtype, "--quiet")
        assert code == 0, err
        for name, R in _tensors(out).items():
            if name.endswith("proj.weight"):
                assert torch.equal(fake_quantize(R.half(), "int8", dtype=R.dtype), R), name
        code, stdout, _ = run_cli("verify", tiny_llama, out, "--quiet")
        assert code == 0, stdout


def test_verify_fails_a_quantized_residual_with_inf(tiny_llama, qout, run_cli, tmp_path):
    """A non-finite value in a QPiSSA residual is a failed check (exit 1), not bad input."""
    bad = Path(shutil.copytree(qout, tmp_path / "bad"))
    name = "model.layers.0.self_attn.o_proj.weight"
    _rewrite(bad, name, lambda t: t.index_fill(0, torch.tensor([0]), float("inf")))
    code, stdout, _ = run_cli("verify", tiny_llama, bad, "--quiet")
    assert code == 1 and f"worst {name}: non-finite values in the residual" in stdout, stdout
