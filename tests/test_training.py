"""Training the decompose output: PiSSALinear, both loading routes, fit(), PEFT-format saving.

Numerical checks follow the house rule: the error against an fp64 reference must be no worse
than k times a plain-PyTorch baseline's error (k stated per test), with a floor of 2 fp32 eps
times the output scale (so a baseline that happens to be exact cannot fail the test).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from pissa_svd import decompose, pissa_factors
from pissa_svd.adapter import ADAPTER_FILE
from pissa_svd.errors import InputError
from pissa_svd.pipeline import ADAPTER_CONFIG, ADAPTER_DIR
from pissa_svd.training import (
    PiSSALinear,
    apply_pissa,
    fit,
    load_trainable,
    save_adapter,
)

from .conftest import tiny_llama_model

EPS32 = torch.finfo(torch.float32).eps


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # The models here are tiny: on a shared machine, intra-op threads cost more in contention
    # than they gain (30 training steps measured 6 s with 2 threads, 0.5 s with 1).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def out(tiny_llama, tmp_path_factory):
    """decompose output of the tiny Llama (rank 8, alpha 8, 21 targets). Read-only."""
    path = tmp_path_factory.mktemp("training") / "out"
    decompose(tiny_llama, path, rank=8, niter=4, quiet=True)
    return path


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))


def causal_lm(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.double()


def assert_no_worse(got, ref, baseline, k):
    """max |got - ref| <= k * max |baseline - ref|, or below 2 fp32 eps of the output scale."""
    err = float((got.double() - ref).abs().max())
    base = float((baseline.double() - ref).abs().max())
    floor = 2 * EPS32 * float(ref.abs().max())
    assert err <= max(k * base, floor), f"error {err:.3g} vs baseline {base:.3g} (k={k})"


def lora_names(model) -> set[str]:
    return {n for n, _ in model.named_parameters() if "lora_" in n}


def trainable_names(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


# --- PiSSALinear -------------------------------------------------------------------------------


def make_linear(out_f=48, in_f=40):
    lin = nn.Linear(in_f, out_f)
    with torch.no_grad():
        lin.bias.normal_()
    return lin


def test_pissalinear_fp32_matches_linear_and_trains_only_adapters():
    lin = make_linear()
    A, B, W_res = pissa_factors(lin.weight.detach(), 6, scaling=2.0)
    m = PiSSALinear.from_linear(lin, A, B, 2.0, residual=W_res)
    assert m.lora_A.shape == (6, 40) and m.lora_B.shape == (48, 6)
    assert m.lora_A.dtype == m.lora_B.dtype == torch.float32
    x = torch.randn(3, 5, 40, requires_grad=True)
    y = m(x)
    ref = x.detach().double() @ lin.weight.detach().double().T + lin.bias.detach().double()
    # k=4: W_res and the split product add a few fp32 roundings to nn.Linear's.
    assert_no_worse(y.detach(), ref, lin(x).detach(), k=4)

    y.square().sum().backward()
    assert m.lora_A.grad is not None and m.lora_A.grad.abs().max() > 0
    assert m.lora_B.grad is not None and m.lora_B.grad.abs().max() > 0
    assert m.weight.grad is None and m.bias.grad is None
    assert not m.weight.requires_grad and not m.bias.requires_grad
    assert x.grad is not None and x.grad.abs().max() > 0  # earlier layers still get gradients
    assert {n for n, p in m.named_parameters() if p.requires_grad} == {"lora_A", "lora_B"}


def test_pissalinear_bf16_residual():
    lin = make_linear()
    A, B, W_res = pissa_factors(
        lin.weight.detach(), 6, adapter_dtype=torch.float32, residual_dtype=torch.bfloat16
    )
    m = PiSSALinear.from_linear(lin, A, B, 1.0, residual=W_res)
    assert m.weight.dtype == torch.bfloat16 and m.lora_A.dtype == torch.float32
    x = torch.randn(4, 40)
    y = m(x)
    assert y.dtype == torch.float32
    ref = x.double() @ lin.weight.detach().double().T + lin.bias.detach().double()
    # Baseline: the same layer fully in bf16. Rounding the output to bf16 dominates both errors
    # (the principal part runs in fp32 here); k=2 allows for another rounding realization.
    bf16 = nn.Linear(40, 48).to(torch.bfloat16)
    bf16.load_state_dict(lin.state_dict())
    assert_no_worse(y.detach(), ref, bf16(x.to(torch.bfloat16)).detach(), k=2)
    y.sum().backward()
    assert m.lora_A.grad.dtype == torch.float32 and m.lora_B.grad.abs().max() > 0
    assert m.weight.grad is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_unmerge(dtype):
    lin = make_linear()
    A, B, W_res = pissa_factors(lin.weight.detach(), 6, scaling=0.5, residual_dtype=dtype)
    m = PiSSALinear.from_linear(lin, A, B, 0.5, residual=W_res)
    with torch.no_grad():  # move the adapters off their init, as training would
        m.lora_A.add_(0.1 * torch.randn_like(m.lora_A))
        m.lora_B.add_(0.1 * torch.randn_like(m.lora_B))
    x = torch.randn(4, 40)
    W0 = m.weight.detach().clone()
    with torch.no_grad():
        y = m(x)
        full = W0.double() + 0.5 * m.lora_B.double() @ m.lora_A.double()
        ref = x.double() @ full.T + m.bias.double()
        m.merge()
        merged_w = m.weight.detach().clone()
        y_merged = m(x)
    assert m.merged and merged_w.dtype == dtype
    # Merged and unmerged forwards compute the same function: both within k=4 (fp32) / k=2
    # (bf16, where rounding the output dominates) of a plain nn.Linear in the residual's dtype
    # holding W_res + s*B@A.
    plain = nn.Linear(40, 48).to(dtype)
    with torch.no_grad():
        plain.weight.copy_(full)
        plain.bias.copy_(m.bias)
        base = plain(x.to(dtype))
    k = 4 if dtype == torch.float32 else 2
    assert_no_worse(y, ref, base, k)
    assert_no_worse(y_merged, ref, base, k)

    m.unmerge()
    assert not m.merged
    back = m.weight.detach()
    # One rounding of the sum and one of the difference (plus fp32 rounding inside, for bf16):
    # |back - W0| <= (u + 2 u32) * (|back| + |merged|), u the residual dtype's unit roundoff.
    u = torch.finfo(dtype).eps / 2
    bound = (u + EPS32) * (back.double().abs() + merged_w.double().abs())
    err = (back.double() - W0.double()).abs()
    assert (err <= bound).all(), f"unmerge is off by {float(err.max()):.3g}"

    m.merge(exact=True)
    assert torch.equal(m.weight, merged_w)  # same merge, whatever the mode
    m.unmerge()
    assert torch.equal(m.weight, back)  # bit for bit
    with pytest.raises(RuntimeError, match="not merged"):
        m.unmerge()


def test_fan_in_fan_out_conv1d():
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(48, 40)  # nf=out, nx=in: weight (in, out) = (40, 48)
    with torch.no_grad():
        conv.weight.normal_(0, 0.2)
        conv.bias.normal_()
    A, B, W_res = pissa_factors(conv.weight.detach(), 6, fan_in_fan_out=True)
    assert W_res.shape == (40, 48)
    m = PiSSALinear.from_linear(conv, A, B, 1.0, fan_in_fan_out=True, residual=W_res)
    assert (m.in_features, m.out_features) == (40, 48) and m.lora_A.shape == (6, 40)
    x = torch.randn(2, 3, 40)
    with torch.no_grad():
        y = m(x)
        ref = x.double() @ conv.weight.double() + conv.bias.double()
        assert_no_worse(y, ref, conv(x), k=4)
        m.merge(exact=True)
        assert m.weight.shape == (40, 48)
        assert_no_worse(m(x), ref, conv(x), k=4)
        m.unmerge()
    assert torch.equal(m.weight, W_res)
    m(x).sum().backward()
    assert m.lora_A.grad.abs().max() > 0 and m.weight.grad is None


# --- loading -----------------------------------------------------------------------------------


def test_torch_route_matches_original(tiny_llama, out, ids):
    original = causal_lm(tiny_llama)
    model = apply_pissa(causal_lm(tiny_llama), out)
    config = json.loads((out / ADAPTER_DIR / ADAPTER_CONFIG).read_text())
    layers = [m for m in model.modules() if isinstance(m, PiSSALinear)]
    assert len(layers) == len(config["target_modules"]) == 21
    assert trainable_names(model) == lora_names(model) and len(lora_names(model)) == 2 * 21
    ref = logits(causal_lm(tiny_llama).double(), ids)
    # k=4: the residual split adds a few fp32 roundings to the original fp32 model's.
    assert_no_worse(logits(model, ids), ref, logits(original, ids), k=4)


def test_load_trainable_torch_backend(tiny_llama, out, ids):
    model = load_trainable(out, backend="torch")
    assert model.training
    assert sum(isinstance(m, PiSSALinear) for m in model.modules()) == 21
    assert trainable_names(model) == lora_names(model)
    ref = logits(causal_lm(tiny_llama).double(), ids)
    assert_no_worse(logits(model.eval(), ids), ref, logits(causal_lm(tiny_llama), ids), k=4)


def test_peft_route_matches_original(tiny_llama, out, ids):
    from peft import PeftModel

    model = load_trainable(out, backend="peft")
    assert isinstance(model, PeftModel)
    names = trainable_names(model)
    assert names == lora_names(model) and len(names) == 2 * 21
    ref = logits(causal_lm(tiny_llama).double(), ids)
    assert_no_worse(logits(model.eval(), ids), ref, logits(causal_lm(tiny_llama), ids), k=4)


def test_gpt2_conv1d_torch_route_and_peft_reload(tiny_gpt2, tmp_path):
    from peft import PeftModel

    out = tmp_path / "out"
    decompose(tiny_gpt2, out, rank=8, quiet=True)
    ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(0))
    model = load_trainable(out, backend="torch").eval()
    layers = [m for m in model.modules() if isinstance(m, PiSSALinear)]
    assert len(layers) == 2 * 4 and all(m.fan_in_fan_out for m in layers)  # c_attn, c_proj x2, c_fc
    assert trainable_names(model) == lora_names(model)
    ref = logits(causal_lm(tiny_gpt2).double(), ids)
    assert_no_worse(logits(model, ids), ref, logits(causal_lm(tiny_gpt2), ids), k=4)

    with torch.no_grad():
        for m in layers:
            m.lora_B.add_(0.05 * torch.randn_like(m.lora_B))
    ours = logits(model, ids)
    save_adapter(model, tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG).read_text())
    assert saved["fan_in_fan_out"] is True
    got = logits(PeftModel.from_pretrained(causal_lm(out), tmp_path / "adapter").eval(), ids)
    assert float((got - ours).abs().max()) <= 16 * EPS32 * float(ours.abs().max())


def test_import_stays_lean():
    # transformers and peft are imported inside the functions that need them.
    code = (
        "import sys, pissa_svd.training; "
        "assert not {'transformers', 'peft'} & set(sys.modules), sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


# --- fit ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["torch", "peft"])
def test_fit_trains_adapters_only_and_checkpoints_reload(tiny_llama, out, ids, tmp_path, backend):
    from peft import PeftModel

    model = load_trainable(out, backend=backend)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    batch = {"input_ids": ids, "labels": ids}
    with torch.no_grad():
        initial = float(causal_lm(tiny_llama)(**batch).loss)
    losses = fit(
        model, [batch], steps=30, lr=1e-2, save_every=15, save_dir=tmp_path, progress=False, seed=0
    )
    assert len(losses) == 30
    assert abs(losses[0] - initial) < 1e-4  # PiSSA's init leaves the model unchanged
    assert losses[-1] < 0.85 * losses[0], f"{losses[0]:.3f} -> {losses[-1]:.3f}"
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), f"{n} changed during training"

    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-15", "checkpoint-30"]
    reloaded = PeftModel.from_pretrained(causal_lm(out), tmp_path / "checkpoint-30").eval()
    trained = logits(model.eval(), ids)
    got = logits(reloaded, ids)
    # Same fp32 weights and the same sequence of matmuls: fp32 noise only.
    assert float((got - trained).abs().max()) <= 16 * EPS32 * float(trained.abs().max())
    assert float((trained - logits(causal_lm(tiny_llama), ids)).abs().max()) > 0.1  # it learned


def test_fit_accumulates_and_reports_the_micro_batch_mean(out):
    model = load_trainable(out, backend="torch")
    g = torch.Generator().manual_seed(1)
    i1, i2 = torch.randint(0, 256, (2, 2, 12), generator=g)
    b1, b2 = {"input_ids": i1, "labels": i1}, {"input_ids": i2, "labels": i2}
    with torch.no_grad():
        expected = (float(model(**b1).loss) + float(model(**b2).loss)) / 2
    losses = fit(model, [b1, b2], steps=1, grad_accum=2, progress=False)
    assert losses == [pytest.approx(expected, abs=1e-5)]
    with pytest.raises(InputError, match="ran out after 1 of 4 micro-batches"):
        fit(model, iter([b1]), steps=2, grad_accum=2, progress=False)
    # The usual mistakes, each named: no labels, a tuple batch, a fractional step count.
    for batches, kwargs, match in [
        ([{"input_ids": i1}], {}, "output has no loss: add labels"),
        ([(i1, i1)], {}, "a batch is a tuple: without loss_fn, batches must be dicts"),
        ([b1], {"steps": 1.5}, "must be ints >= 1, got 1.5"),
        ([b1], {"max_grad_norm": -1.0}, "max_grad_norm must be a finite number > 0"),
        ([b1], {"max_grad_norm": float("nan")}, "max_grad_norm must be a finite number > 0"),
        ([b1], {"lr": 0}, "lr must be a finite number > 0"),
        ([b1], {"weight_decay": -0.1}, "weight_decay must be a finite number >= 0"),
        ([b1], {"save_every": "1", "save_dir": "x"}, "save_every must be an int >= 1"),
        ([b1], {"save_every": 1}, "save_every needs a save_dir"),
    ]:
        with pytest.raises(InputError, match=match):
            fit(model, batches, **{"steps": 1, **kwargs}, progress=False)
    # Scalars from numpy or torch are numbers too, as AdamW takes them.
    import numpy as np

    fit(model, [b1], steps=1, lr=torch.tensor(1e-3), max_grad_norm=np.float32(1), progress=False)


@pytest.mark.parametrize("backend", ["torch", "peft"])
def test_fit_saves_the_last_step_and_keeps_earlier_checkpoints(out, ids, tmp_path, backend):
    """A save_dir gets the last step too (with or without save_every); a run whose checkpoint
    folders exist (a previous run's) is refused before its first step, for both backends."""
    model = load_trainable(out, backend=backend)
    batch = {"input_ids": ids, "labels": ids}
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    fit(model, [batch], steps=5, save_every=2, save_dir=tmp_path / "a", progress=False)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [
        "checkpoint-2", "checkpoint-4", "checkpoint-5",
    ]  # fmt: skip
    fit(model, [batch], steps=3, save_dir=tmp_path / "b", progress=False)
    assert [p.name for p in (tmp_path / "b").iterdir()] == ["checkpoint-3"]
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert any(not torch.equal(trained[n], before[n]) for n in before)
    saved = (tmp_path / "a" / "checkpoint-4" / ADAPTER_FILE).read_bytes()
    with pytest.raises(InputError, match="checkpoint-4 already exists"):
        fit(model, [batch], steps=4, save_every=4, save_dir=tmp_path / "a", progress=False)
    assert (tmp_path / "a" / "checkpoint-4" / ADAPTER_FILE).read_bytes() == saved
    for n, p in model.named_parameters():  # refused before any step
        if p.requires_grad:
            assert torch.equal(p, trained[n])


def test_fit_plain_module_with_loss_fn(tmp_path):
    lin = make_linear(8, 16)
    A, B, W_res = pissa_factors(lin.weight.detach(), 2)
    net = nn.Sequential(PiSSALinear.from_linear(lin, A, B, 1.0, residual=W_res))
    x, target = torch.randn(32, 16), torch.randn(32, 8)
    losses = fit(
        net,
        [(x, target)],
        steps=20,
        lr=1e-2,
        loss_fn=lambda model, b: nn.functional.mse_loss(model(b[0]), b[1]),
        save_every=20,
        save_dir=tmp_path,
        progress=False,
    )
    assert losses[-1] < 0.9 * losses[0]
    saved = json.loads((tmp_path / "checkpoint-20" / ADAPTER_CONFIG).read_text())
    assert (saved["r"], saved["lora_alpha"], saved["target_modules"]) == (2, 2, ["0"])


# --- saving ------------------------------------------------------------------------------------


def test_save_adapter_replaces_a_folder_only_when_asked(out, tmp_path):
    """Saving onto an existing adapter (decompose's pissa_init, which to-lora needs) is
    refused unless overwrite=True; an empty folder is fine; nothing is left half-written."""
    model = load_trainable(out, backend="torch")
    taken = tmp_path / "pissa_init"
    taken.mkdir()
    (taken / "adapter_config.json").write_text("{}")
    with pytest.raises(InputError, match="already exists; pass overwrite=True"):
        save_adapter(model, taken)
    assert (taken / "adapter_config.json").read_text() == "{}"
    save_adapter(model, taken, overwrite=True)
    assert json.loads((taken / ADAPTER_CONFIG).read_text())["peft_type"] == "LORA"
    (tmp_path / "empty").mkdir()
    save_adapter(model, tmp_path / "empty")
    assert (tmp_path / "empty" / ADAPTER_CONFIG).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "pissa_init"]


def test_saved_adapter_reloads_in_peft(tiny_llama, out, ids, tmp_path):
    from peft import PeftModel

    model = load_trainable(out, backend="torch").eval()
    with torch.no_grad():  # stand-in for training: adapters that differ from the init
        for m in model.modules():
            if isinstance(m, PiSSALinear):
                m.lora_A.add_(0.05 * torch.randn_like(m.lora_A))
                m.lora_B.add_(0.05 * torch.randn_like(m.lora_B))
    ours = logits(model, ids)
    save_adapter(model, tmp_path / "adapter")
    init = json.loads((out / ADAPTER_DIR / ADAPTER_CONFIG).read_text())
    saved = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG).read_text())
    for key in ("peft_type", "r", "lora_alpha", "target_modules", "fan_in_fan_out", "task_type"):
        assert saved[key] == init[key], key
    reloaded = PeftModel.from_pretrained(causal_lm(out), tmp_path / "adapter").eval()
    got = logits(reloaded, ids)
    assert float((got - ours).abs().max()) <= 16 * EPS32 * float(ours.abs().max())
    assert float((ours - logits(causal_lm(tiny_llama), ids)).abs().max()) > 1e-2  # not the init


# --- errors ------------------------------------------------------------------------------------


def test_errors_name_the_problem(out, tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(InputError, match=r"nope: no such folder"):
        load_trainable(missing)
    with pytest.raises(InputError, match=r"nope: no such folder"):
        apply_pissa(tiny_llama_model(), missing)
    (tmp_path / "bare").mkdir()
    with pytest.raises(InputError, match=r"bare: has no pissa_init/"):
        apply_pissa(tiny_llama_model(), tmp_path / "bare")
    with pytest.raises(InputError, match="backend must be one of"):
        load_trainable(out, backend="jax")

    short = tiny_llama_model(num_hidden_layers=2)
    with pytest.raises(InputError, match=r"targets module 'model\.layers\.2\.mlp\.down_proj'"):
        apply_pissa(short, out)
    assert not any(isinstance(m, PiSSALinear) for m in short.modules())  # left untouched

    with pytest.raises(InputError, match=r"lora_A \(8, 176\).*layer is 64 x 128"):
        apply_pissa(tiny_llama_model(intermediate_size=128), out)
