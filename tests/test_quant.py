"""QPiSSA: NF4/int8 quantizers bit-equal to bitsandbytes, the error metric, the alternation."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from pissa_svd import InputError, pissa_factors
from pissa_svd.pissa import frobenius
from pissa_svd.quant import (
    NF4_CODE,
    error_reduction,
    fake_quantize,
    int8_quantize,
    nf4_dequantize,
    nf4_quantize,
    qpissa_factors,
    quantization_error,
)

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
needs_bnb = pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes is not installed")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _inputs(kind: str, dtype: torch.dtype) -> torch.Tensor:
    """Quantizer inputs; no size is a multiple of 64 except 'normal_64'. Last dims are even
    except in 'odd' (bitsandbytes dequantizes an odd last dim with torch.compile: slow)."""
    g = _gen(KINDS.index(kind))
    if kind == "normal":
        x = torch.randn(257, 94, generator=g) * 0.02  # 24158 values: a 30-value last block
    elif kind == "normal_64":
        x = torch.randn(96, 128, generator=g)
    elif kind == "heavy_tailed":
        # Student-t with 2 degrees of freedom: outliers set absmax, most values land near 0.
        z = torch.randn(131, 78, generator=g)
        chi2 = torch.randn(131, 78, 2, generator=g).square().sum(-1)
        x = z / (chi2 / 2).sqrt()
    elif kind == "zero_blocks":
        x = torch.randn(40, 100, generator=g)
        x[3:9] = 0  # several whole 64-blocks of zeros
        x[-1, 40:] = 0  # and an all-zero last (short) block: 4000 = 62 * 64 + 32
    elif kind == "tiny":
        x = torch.randn(5, 6, generator=g)  # one short block only
    elif kind == "odd":
        x = torch.randn(33, 3, generator=g)
    elif kind == "row_scales":
        x = torch.randn(63, 34, generator=g) * torch.logspace(-4, 2, 63)[:, None]
    else:
        raise AssertionError(kind)
    return x.to(dtype)


KINDS = ["normal", "normal_64", "heavy_tailed", "zero_blocks", "tiny", "row_scales", "odd"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


# --------------------------------------------------------------------------------------------
# NF4 and int8 against bitsandbytes, bit for bit
# --------------------------------------------------------------------------------------------


def _bnb_nf4(x: torch.Tensor, dequantize: bool = True):
    """bitsandbytes' (codes (numel,), absmax, dequantized in x's dtype or None)."""
    import bitsandbytes.functional as F

    packed, state = F.quantize_4bit(x, blocksize=64, quant_type="nf4")
    deq = F.dequantize_4bit(packed, state) if dequantize else None
    p = packed.view(torch.uint8).reshape(-1)
    codes = torch.stack([p >> 4, p & 0xF], dim=1).reshape(-1)[: x.numel()]  # high nibble first
    return codes, state.absmax, deq


@needs_bnb
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_nf4_bit_equal_to_bitsandbytes(kind, dtype):
    x = _inputs(kind, dtype)
    codes, absmax, deq = _bnb_nf4(x, dequantize=kind != "odd")
    my_codes, my_absmax = nf4_quantize(x)
    assert torch.equal(my_codes, codes)
    assert torch.equal(my_absmax, absmax)
    if deq is None:  # the values follow from codes and absmax (test_nf4_matches_its_definition)
        return
    mine = fake_quantize(x, "nf4")
    assert mine.dtype == dtype and mine.shape == x.shape
    assert torch.equal(mine, deq)
    assert torch.equal(nf4_dequantize(my_codes, my_absmax, x.shape, dtype), deq)


@needs_bnb
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_int8_bit_equal_to_bitsandbytes(kind, dtype):
    import bitsandbytes.functional as F

    x = _inputs(kind, dtype)
    # What bitsandbytes' 8-bit layer stores: Int8Params casts the weight to fp16 first.
    CB, SCB, _ = F.int8_vectorwise_quant(x.to(torch.float16))
    q, absmax = int8_quantize(x)
    nonzero = SCB > 0  # bnb's codes in all-zero rows are 0 * inf (undefined); values are 0
    assert torch.equal(q[nonzero], CB[nonzero]) and (q[~nonzero] == 0).all()
    assert torch.equal(absmax, SCB)
    deq = F.int8_vectorwise_dequant(CB, SCB)  # fp32
    assert torch.equal(fake_quantize(x, "int8", dtype=torch.float32), deq)
    assert torch.equal(fake_quantize(x, "int8"), deq.to(dtype))


# --------------------------------------------------------------------------------------------
# The same quantizers against their definitions (independent of bitsandbytes)
# --------------------------------------------------------------------------------------------


def _nf4_by_definition(x: torch.Tensor) -> torch.Tensor:
    """Nearest NF4 code of x / absmax per 64-block (ties to the lower code), times absmax."""
    flat = x.reshape(-1).double()
    code = torch.tensor(NF4_CODE, dtype=torch.float64)
    out = torch.empty_like(flat)
    for start in range(0, flat.numel(), 64):
        block = flat[start : start + 64]
        amax = block.abs().max()
        if amax == 0:
            out[start : start + 64] = 0
            continue
        dist = (block[:, None] / amax - code[None, :]).abs()
        out[start : start + 64] = code[dist.argmin(dim=1)] * amax  # argmin: first = lower
    return out.view(x.shape)


@pytest.mark.parametrize("kind", KINDS)
def test_nf4_matches_its_definition(kind):
    x = _inputs(kind, torch.float32)
    ref = _nf4_by_definition(x)
    # code * absmax is one fp32 rounding away from the exact product.
    torch.testing.assert_close(fake_quantize(x, "nf4").double(), ref, rtol=2**-24, atol=0)


@pytest.mark.parametrize("kind", ["normal", "heavy_tailed", "zero_blocks", "row_scales"])
def test_int8_matches_its_definition(kind):
    x16 = _inputs(kind, torch.float32).half()  # int8 quantizes the fp16 values (Int8Params)
    x = x16.float()
    amax = x.abs().amax(dim=1, keepdim=True).double()
    q_ref = torch.where(amax > 0, torch.round(x.double() * 127 / amax), 0)
    q, absmax = int8_quantize(x)
    assert torch.equal(q.double(), q_ref)
    assert q.abs().max() <= 127 and (q.abs().amax(dim=1)[amax[:, 0] > 0] == 127).all()
    torch.testing.assert_close(
        fake_quantize(x, "int8").double(), q_ref * amax / 127, rtol=4 * 2**-24, atol=0
    )


def test_nf4_ties_go_to_the_lower_code():
    code = torch.tensor(NF4_CODE, dtype=torch.float32)
    mid = (code[:-1] + code[1:]) / 2
    # One block with absmax exactly 1: scaled values are the inputs themselves.
    block = torch.cat([torch.tensor([1.0]), mid, mid.nextafter(torch.tensor(2.0))])
    block = torch.cat([block, torch.zeros(64 - block.numel())])
    codes, absmax = nf4_quantize(block)
    assert absmax.tolist() == [1.0]
    assert codes[1:16].tolist() == list(range(15))  # at a threshold: the lower code
    assert codes[16:31].tolist() == list(range(1, 16))  # one ulp above: the upper code
    if HAS_BNB:
        assert torch.equal(_bnb_nf4(block)[0], codes)


def test_fp32_nf4_values_are_a_fixed_point():
    x = _inputs("heavy_tailed", torch.float32)
    once = fake_quantize(x, "nf4")
    assert not torch.equal(once, x)
    assert torch.equal(fake_quantize(once, "nf4"), once)


def test_fp32_int8_values_are_a_fixed_point_after_the_fp16_cast():
    """fl(fl(127 a) * fp32(1/127)) is often a - 1 ulp in fp32, but the scale a of fp16 values
    is an fp16 number, which that rounds back to: fp32 int8 values re-quantize to themselves.
    Values beyond fp16's range cannot be loaded in 8 bits and are refused."""
    x = torch.randn(512, 48, generator=_gen(11)) * torch.logspace(-3, 1, 512)[:, None]
    once = fake_quantize(x, "int8")
    assert torch.equal(fake_quantize(once, "int8"), once)
    with pytest.raises(InputError, match="beyond fp16's range"):
        fake_quantize(torch.full((2, 4), 7e4), "int8")


# --------------------------------------------------------------------------------------------
# The metric
# --------------------------------------------------------------------------------------------


def test_metric_is_zero_without_an_adapter():
    W = torch.randn(64, 96, generator=_gen(1))
    zeros_A, zeros_B = torch.zeros(4, 96), torch.zeros(64, 4)
    assert error_reduction(W, W, zeros_A, zeros_B) == 0.0


def test_metric_is_one_when_the_adapter_covers_the_rest():
    """W = N + s B A with N exactly representable in NF4: nothing is left to reduce."""
    g = _gen(2)
    N = fake_quantize(torch.randn(64, 96, generator=g), "nf4").double()
    A, B = torch.randn(4, 96, generator=g).double(), torch.randn(64, 4, generator=g).double()
    W = N + 2.0 * B @ A
    assert error_reduction(W, N, A, B, scaling=2.0) > 1 - 1e-12
    assert error_reduction(W, N, A, B, scaling=1.0) < 0.9  # the scaling is applied


def test_metric_equals_the_spectrum_share_loftq_removes():
    """Residual W and adapter = best rank-r fit of E0 = W - deq(Q(W)) (LoftQ, one round):
    the reduction is sum(sigma_1..r(E0)) / sum(sigma(E0)) exactly."""
    W = torch.randn(80, 120, generator=_gen(3)) * 0.05
    E0 = W.double() - fake_quantize(W, "nf4").double()
    U, S, Vh = torch.linalg.svd(E0, full_matrices=False)
    r = 10
    A, B = S[:r, None].sqrt() * Vh[:r], U[:, :r] * S[:r].sqrt()
    expect = (S[:r].sum() / S.sum()).item()
    assert error_reduction(W, W, A, B) == pytest.approx(expect, rel=1e-10)
    fro = 1 - (S[r:].square().sum().sqrt() / S.square().sum().sqrt()).item()
    assert error_reduction(W, W, A, B, norm="fro") == pytest.approx(fro, rel=1e-10)
    assert quantization_error(W, W) == pytest.approx(S.sum().item(), rel=1e-10)


# --------------------------------------------------------------------------------------------
# QPiSSA
# --------------------------------------------------------------------------------------------


def _weight(out=128, inp=192, seed=0, dtype=torch.float32) -> torch.Tensor:
    """A weight with a decaying spectrum and a few large entries, like trained layers."""
    g = _gen(seed)
    U = torch.linalg.qr(torch.randn(out, out, generator=g))[0]
    V = torch.linalg.qr(torch.randn(inp, inp, generator=g))[0]
    k = min(out, inp)
    S = 1.0 / torch.arange(1, k + 1).float() ** 0.6
    W = (U[:, :k] * S) @ V[:, :k].T
    W[torch.rand(out, inp, generator=g) < 0.002] *= 8
    return W.to(dtype)


@pytest.mark.parametrize(("adapter", "scaling"), [(torch.float32, 1.0), (torch.bfloat16, 2.0)])
def test_one_round_is_pissa_with_a_quantized_residual_and_its_refit(adapter, scaling):
    """T = 1: Q_1 is the quantized PiSSA residual; it ships with the PiSSA adapter or with the
    adapter refitted to it (the top-r SVD of W - Q_1), whichever error is smaller."""
    W = _weight()
    A, B, R, info = qpissa_factors(W, 8, iters=1, scaling=scaling, adapter_dtype=adapter)
    A0, B0, R0 = pissa_factors(W, 8, scaling=scaling, adapter_dtype=adapter)
    assert A.dtype == B.dtype == adapter and R.dtype == W.dtype
    # R0 was computed from the stored (rounded) A0, B0; the residual is its NF4 image.
    assert torch.equal(R, fake_quantize(R0, "nf4"))
    A1, B1, res1 = pissa_factors(W - R, 8, scaling=scaling, adapter_dtype=adapter)
    assert info["best_iter"] == 1 and len(info["errors"]) == len(info["refit_errors"]) == 1
    assert info["refit_errors"][0] == frobenius(res1)
    # Refitting the adapter to the quantized residual it ships with can only help here.
    assert info["refit_errors"][0] < info["errors"][0]
    assert info["best_refit"] and info["best_error"] == info["refit_errors"][0]
    assert torch.equal(A, A1) and torch.equal(B, B1)
    fro = error_reduction(W, R, A, B, scaling, norm="fro", dtype=torch.float32)
    assert info["error_reduction"] == pytest.approx(fro, abs=1e-5)
    assert info["error_reduction"] > error_reduction(W, R, A0, B0, scaling, norm="fro")


def _candidates(info: dict) -> list[float]:
    """Every scored pair, in the order computed: round t, then its refit."""
    return [e for pair in zip(info["errors"], info["refit_errors"], strict=True) for e in pair]


@pytest.mark.parametrize("select", ["fro", "nuc"])
def test_best_error_never_increases_with_iterations(select):
    W = _weight(seed=4)
    runs = [qpissa_factors(W, 8, iters=T, select=select).info for T in range(1, 6)]
    best = [min(_candidates(info)) for info in runs]
    for T, info in enumerate(runs, start=1):
        # The candidates do not depend on T.
        assert _candidates(info) == _candidates(runs[-1])[: 2 * T]
        assert info["best_error"] == best[T - 1]
        assert info["error_reduction"] == pytest.approx(1 - best[T - 1] / info["qlora_error"])
    assert all(b1 >= b2 for b1, b2 in zip(best, best[1:], strict=False))
    assert best[-1] < 0.97 * best[0]  # the alternation pays off on this weight
    assert runs[0]["error_reduction"] > 0  # and already one PiSSA round beats QLoRA


def test_the_best_candidate_is_returned_not_the_last():
    """Re-quantizing can make the error go up again (here after round 5 of 6): the returned
    residual and adapter are the best pair's, and score exactly its error."""
    g = _gen(0)
    U = torch.linalg.qr(torch.randn(64, 64, generator=g))[0]
    V = torch.linalg.qr(torch.randn(96, 96, generator=g))[0]
    W = (U * (1.0 / torch.arange(1, 65).float() ** 0.3)) @ V[:, :64].T  # slow decay
    A, B, R, info = qpissa_factors(W, 32, iters=6)
    errors = _candidates(info)
    best = errors.index(min(errors))
    assert best < len(errors) - 1 and min(errors) < errors[-1]
    assert (info["best_iter"], info["best_refit"]) == (best // 2 + 1, best % 2 == 1)
    assert torch.equal(fake_quantize(R, "nf4"), R)
    err = torch.linalg.matrix_norm(W.clone().addmm_(B, A, alpha=-1.0) - R).item()
    assert err == pytest.approx(min(errors), rel=1e-6)


def test_nuclear_selection_reports_the_paper_metric():
    W = _weight(seed=5)
    A, B, R, info = qpissa_factors(W, 8, iters=3, select="nuc")
    assert info["norm"] == "nuc"
    assert info["qlora_error"] == pytest.approx(quantization_error(W, W), rel=1e-5)
    assert info["error_reduction"] == pytest.approx(error_reduction(W, R, A, B), abs=1e-5)


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
@pytest.mark.parametrize(
    ("w_dtype", "residual"),
    [
        (torch.float32, torch.float32),
        (torch.bfloat16, torch.bfloat16),
        (torch.float32, torch.bfloat16),
        (torch.float16, torch.float16),
    ],
)
def test_stored_residual_is_a_fixed_point_of_quantization(scheme, w_dtype, residual):
    """Quantizing the stored residual again yields exactly the same values (and for NF4 the
    same codes and scales), so a quantized model built from it holds what was scored."""
    W = _weight(seed=6, dtype=w_dtype)
    A, B, R, info = qpissa_factors(W, 8, iters=2, scheme=scheme, residual_dtype=residual)
    assert R.dtype == residual
    assert torch.equal(fake_quantize(R, scheme), R)
    if scheme == "nf4" and HAS_BNB:
        assert torch.equal(_bnb_nf4(R)[2], R)  # bitsandbytes agrees, in R's dtype
    if scheme == "int8" and HAS_BNB:  # what an 8-bit layer (Int8Params) loads from R
        import bitsandbytes.functional as F

        CB, SCB, _ = F.int8_vectorwise_quant(R.half())
        assert torch.equal(F.int8_vectorwise_dequant(CB, SCB).to(residual), R)
    # In fp32 deq(Q(W_res)) is stable as is, and so is int8's in fp16 (its scales are fp16
    # numbers); rounded to bf16 (and NF4 to fp16) it needs settling.
    stable = residual == torch.float32 or (scheme == "int8" and residual == torch.float16)
    assert info["settle_rounds"] == (0 if stable else 1)
    # The settled residual is the scored one up to rounding to its dtype (absmax included).
    _, _, R32, _ = qpissa_factors(W, 8, iters=2, scheme=scheme, residual_dtype=torch.float32)
    tol = 2 * torch.finfo(residual).eps * R32.abs().amax()
    assert (R.float() - R32).abs().max() <= tol


def test_plain_rounding_to_bf16_would_not_be_stable():
    """Why the residual is settled: casting deq(Q(W_res)) to bf16 moves every block's absmax,
    so quantizing the cast tensor again gives different values."""
    _, _, R32, _ = qpissa_factors(_weight(seed=7), 8, iters=1, residual_dtype=torch.float32)
    cast = R32.bfloat16()
    assert not torch.equal(fake_quantize(cast, "nf4"), cast)


def test_fan_in_fan_out_quantizes_the_out_in_orientation():
    W = _weight(96, 160, seed=8)  # (out, in)
    Wt = W.T.contiguous()  # Conv1D storage: (in, out)
    A, B, R, info = qpissa_factors(W, 8, iters=3)
    At, Bt, Rt, info_t = qpissa_factors(Wt, 8, iters=3, fan_in_fan_out=True)
    assert Rt.shape == Wt.shape and At.shape == (8, 160) and Bt.shape == (96, 8)
    assert torch.equal(Rt, R.T) and torch.equal(At, A) and torch.equal(Bt, B)
    assert _candidates(info_t) == _candidates(info)
    # Blocks run along "in", as after transformers transposes a Conv1D weight to quantize it.
    assert torch.equal(fake_quantize(Rt.T, "nf4"), Rt.T)
    assert not torch.equal(fake_quantize(Rt, "nf4"), Rt)
    assert error_reduction(Wt, Rt, At, Bt, fan_in_fan_out=True) == pytest.approx(
        error_reduction(W, R, A, B), rel=1e-12
    )


def test_svd_kwargs_reach_the_svd():
    W = _weight(seed=9)
    exact = qpissa_factors(W, 8, iters=2, method="exact")
    other = qpissa_factors(W, 8, iters=2, method="halko", niter=0, oversample=0)
    assert exact.info["errors"][0] < other.info["errors"][0]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"scheme": "fp4"}, "unknown quantization scheme 'fp4'"),
        ({"iters": 0}, "iters must be an int >= 1"),
        ({"iters": 2.0}, "iters must be an int >= 1"),
        ({"iters": True}, "iters must be an int >= 1"),
        ({"select": "spectral"}, "unknown select 'spectral'"),
        ({"scaling": 0.0}, "scaling"),
        ({"residual_dtype": torch.int8}, "residual_dtype is torch.int8"),
    ],
)
def test_bad_options_raise_input_error(kwargs, message):
    with pytest.raises(InputError, match=message):
        qpissa_factors(_weight(16, 24), 4, **kwargs)


@pytest.mark.parametrize(
    ("W", "message"),
    [
        (torch.ones(16, 24, dtype=torch.int32), "W dtype is torch.int32"),
        (torch.ones(16, 24).to(torch.float8_e4m3fn), "upcast fp8"),
        (torch.ones(2, 16, 24), "2-D"),
        (torch.full((16, 24), float("nan")), "inf or NaN"),
    ],
)
def test_bad_weights_raise_input_error(W, message):
    with pytest.raises(InputError, match=message):
        qpissa_factors(W, 4)


def test_fake_quantize_rejects_bad_input():
    with pytest.raises(InputError, match="unknown quantization scheme"):
        fake_quantize(torch.ones(4, 4), "int4")
    for scheme in ("nf4", "int8"):  # an inf would make its block (row) NaN without a word
        with pytest.raises(InputError, match="W has inf or NaN values"):
            fake_quantize(torch.tensor([[1.0, float("inf")], [0.5, 0.25]]), scheme)
    with pytest.raises(InputError, match="float8"):
        fake_quantize(torch.ones(4, 4).to(torch.float8_e5m2), "nf4")
    with pytest.raises(InputError, match="shapes do not match"):
        error_reduction(torch.ones(4, 8), torch.ones(4, 8), torch.ones(2, 4), torch.ones(4, 2))
    W, A, B = torch.ones(4, 8), torch.ones(2, 8), torch.ones(4, 2)
    with pytest.raises(InputError, match="shapes do not match"):  # ranks of A and B differ
        quantization_error(W, W, A[:1], B)
    with pytest.raises(InputError, match="scaling .* must be a finite number > 0, got -1"):
        quantization_error(W, W, A, B, scaling=-1.0)
    with pytest.raises(InputError, match="dtype must be torch.float32 or torch.float64"):
        error_reduction(W, W, A, B, dtype=torch.float16)


def test_fp16_residual_that_overflows_is_a_clear_error():
    W = _weight(16, 64, seed=10) * 1e6  # values beyond fp16's 65504
    with pytest.raises(InputError, match="does not fit in torch.float16"):
        qpissa_factors(W, 4, residual_dtype=torch.float16)


# --------------------------------------------------------------------------------------------
# The compiled NF4 loop (csrc/nf4.h) against the torch path
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", [*KINDS, "ties", "tail", "large", "non_finite"])
def test_compiled_nf4_has_the_torch_paths_bits(kind, monkeypatch):
    from pissa_svd import native, quant

    if kind == "ties":  # scaled values exactly at, and one ulp around, every threshold
        code = torch.tensor(NF4_CODE, dtype=torch.float32)
        mid = (code[:-1] + code[1:]) / 2
        up, down = mid.nextafter(torch.tensor(2.0)), mid.nextafter(torch.tensor(-2.0))
        x = torch.cat([torch.tensor([1.0, -1.0]), mid, up, down, -mid, -up, -down])
        x = torch.cat([x, torch.zeros(128 - x.numel())])
    elif kind == "tail":  # a short last block, divided rather than multiplied by its absmax
        x = torch.randn(64 * 3 + 13, generator=torch.Generator().manual_seed(3)) * 1e-3
    elif kind == "non_finite":  # NaN and inf propagate as in torch, in full and tail blocks
        x = torch.randn(64 * 4 + 5, generator=torch.Generator().manual_seed(5))
        x[[3, 64 + 9, 128 + 1, 256 + 2]] = torch.tensor(
            [float("nan"), float("inf"), -float("inf"), float("nan")]
        )
    elif kind == "large":  # enough blocks for 3 threads (plus a tail)
        x = torch.randn(1000, 333, generator=torch.Generator().manual_seed(4))
    else:
        x = _inputs(kind, torch.float32)
    code, mid = quant._nf4_tables(x.device)
    assert native.has_nf4_fake()  # the install builds it (pissa-svd env)
    compiled = native.nf4_fake(x.reshape(-1), code, mid)
    monkeypatch.setattr(native, "has_nf4_fake", lambda: False)
    reference = quant._nf4_fake(x, torch.float32).nan_to_num(7.0)  # torch; NaN != NaN
    assert torch.equal(compiled.view(x.shape).nan_to_num(7.0), reference)
    monkeypatch.undo()
    for threads in (1, 2, 3):
        with_threads = torch.empty_like(x.reshape(-1))
        native.module("cpu").nf4_fake(
            x.reshape(-1), with_threads, code.tolist(), mid.tolist(), threads
        )
        assert torch.equal(with_threads.view(x.shape).nan_to_num(7.0), reference)


def test_compiled_nf4_takes_parameters_and_leaves_odd_views_to_torch():
    weight = torch.nn.Linear(128, 64).weight  # requires grad: DLPack would refuse it
    assert torch.equal(fake_quantize(weight, "nf4"), fake_quantize(weight.detach(), "nf4"))
    x = torch.randn(256)
    negated = x._neg_view()  # a lazily negated view: its memory holds x
    assert torch.equal(fake_quantize(negated, "nf4"), fake_quantize(-x, "nf4"))


@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_nf4_in_chunks_is_the_whole_matrix_rounded(monkeypatch, compiled, dtype):
    """fake_quantize runs in chunks of whole blocks (the short last block ends the last
    chunk) and rounds each chunk into the result's dtype: the same bits as quantizing the
    whole matrix in fp32 at once and rounding after, with no whole fp32 copy of a bf16 input."""
    from pissa_svd import native, quant

    x = (torch.randn(37, 61, generator=torch.Generator().manual_seed(6)) * 0.02).to(dtype)
    if not compiled:
        monkeypatch.setattr(native, "has_nf4_fake", lambda: False)
    whole = quant._nf4_fake(x.float(), torch.float32).to(dtype)  # 2257 values: one chunk
    monkeypatch.setattr(quant, "_CHUNK", 2 * quant.NF4_BLOCKSIZE)  # 18 chunks, tail in the last
    chunked = fake_quantize(x, "nf4")
    assert chunked.dtype == dtype and chunked.shape == x.shape
    assert torch.equal(chunked, whole)
    assert torch.equal(fake_quantize(x, "nf4", dtype=torch.float32).to(dtype), whole)


@pytest.mark.parametrize("residual", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_reported_error_is_that_of_the_stored_residual(monkeypatch, scheme, residual):
    """A bf16 residual rounds the int8 row scales (and NF4 block scales): what is stored
    scores differently from the chosen candidate (for int8 up to 6.6% worse on a bf16 Llama).
    error_reduction is that of the stored residual. It is measured in row blocks (here of 16
    rows: 100 columns put an NF4 block boundary every 16 rows, and the last block is short),
    which must dequantize as the whole matrix does."""
    from pissa_svd import pissa
    from pissa_svd.quant import qpissa_factors

    monkeypatch.setattr(pissa, "BLOCK_ELEMENTS", 1000)  # 10 rows, rounded to whole NF4 blocks
    g = torch.Generator().manual_seed(11)
    W = torch.randn(97, 100, generator=g) * 0.02  # 9700 values: a 36-value last NF4 block
    f = qpissa_factors(W, 8, scheme=scheme, iters=2, residual_dtype=residual)
    E = W.double() - fake_quantize(f.W_res, scheme, dtype=torch.float32).double()
    E -= f.B.double() @ f.A.double()
    stored = float(torch.linalg.matrix_norm(E))
    info = f.info
    assert info["stored_error"] == pytest.approx(stored, rel=1e-6)
    assert info["error_reduction"] == pytest.approx(1 - stored / info["qlora_error"], rel=1e-6)
    if residual == torch.float32:
        return
    assert info["best_error"] != info["stored_error"]  # the rounded scales do move it
