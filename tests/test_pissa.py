"""PiSSA factors: the convention, and reconstruction up to the output dtype's rounding only."""

from __future__ import annotations

import pytest
import torch

from pissa_svd import pissa_factors, svd_lowrank


def _w(out=96, inp=160, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(out, inp, generator=g) / inp**0.5).to(dtype)


def rounding_bound(W_res, W, A, B, s, residual_dtype):
    """Elementwise bound on |W_res + s B A - W| (fp64): half an ulp of the stored residual (at
    least half the subnormal spacing, which is fp16's below 6e-5) plus fp32 accumulation error
    of the residual computation."""
    eps_res, tiny = torch.finfo(residual_dtype).eps, torch.finfo(residual_dtype).tiny
    eps32 = torch.finfo(torch.float32).eps
    r = A.shape[0]
    acc = (W.abs() + s * (B.abs() @ A.abs())) * (r + 2) * eps32
    half_ulp = (0.5 * eps_res * W_res.abs() * (1 + eps_res)).clamp_min(0.5 * tiny * eps_res)
    return half_ulp + acc


@pytest.mark.parametrize(
    ("dtype", "adapter", "residual"),
    [
        (torch.float32, torch.float32, torch.float32),
        (torch.bfloat16, torch.bfloat16, torch.bfloat16),
        (torch.float16, torch.float16, torch.float16),
        (torch.bfloat16, torch.bfloat16, torch.float32),  # only "as stored" gets this exact
    ],
)
@pytest.mark.parametrize("scaling", [1.0, 2.0])
def test_reconstruction_within_rounding(dtype, adapter, residual, scaling):
    W = _w(dtype=dtype)
    A, B, W_res = pissa_factors(
        W, 16, scaling=scaling, adapter_dtype=adapter, residual_dtype=residual
    )
    assert A.shape == (16, 160) and B.shape == (96, 16) and W_res.shape == W.shape
    assert (A.dtype, B.dtype, W_res.dtype) == (adapter, adapter, residual)
    W64, R64, A64, B64 = (x.double() for x in (W, W_res, A, B))
    err = (R64 + scaling * B64 @ A64 - W64).abs()
    assert (err <= rounding_bound(R64, W64, A64, B64, scaling, residual)).all()


@pytest.mark.parametrize(
    ("scaling", "dtype", "match"),
    [
        (1e-300, torch.float16, "overflows"),
        (1e14, torch.float16, r"underflows \(100% of its values below the normal range"),
        (1e9, torch.float16, r"underflows \(.* relative error"),  # subnormals only
        (1e36, torch.float32, r"its product B @ A has entries near \d"),
        (1e36, torch.bfloat16, r"its product B @ A"),
    ],
)
def test_scaling_out_of_the_adapter_dtype_range_is_refused(scaling, dtype, match):
    """An adapter at an absurd scaling would be all inf, or zeros and subnormals (a model
    still exact through the residual, but an adapter with nothing in it); fp32 factors can be
    in range while their product is not, and the residual W - s B A would be wrong."""
    with pytest.raises(ValueError, match=match):
        pissa_factors(_w(), 16, scaling=scaling, adapter_dtype=dtype)
    A, B, _ = pissa_factors(_w(), 16, scaling=1e20, adapter_dtype=torch.float32)  # in range
    assert A.abs().max() > 0 and B.abs().max() > 0
    A, B, _ = pissa_factors(_w(), 16, scaling=1e3, adapter_dtype=torch.float16)  # in range
    assert A.abs().max() > 0 and B.abs().max() > 0
    Z = torch.zeros(96, 160)  # S = 0: nothing to keep, nothing refused
    A, B, W_res = pissa_factors(Z, 16, scaling=1e14, adapter_dtype=torch.float16)
    assert not A.any() and not B.any() and not W_res.any()


def test_residual_from_unrounded_factors_would_fail_the_bound():
    """The bound above is tight enough to catch PEFT's order (residual before rounding A, B)."""
    W = _w()
    U, S, Vh = svd_lowrank(W, 16)
    root = S.sqrt()
    A32, B32 = root[:, None] * Vh, U * root
    W_res = W - B32 @ A32  # computed before rounding
    A, B = A32.bfloat16().double(), B32.bfloat16().double()
    err = (W_res.double() + B @ A - W.double()).abs()
    assert (err > rounding_bound(W_res.double(), W.double(), A, B, 1.0, torch.float32)).any()


def test_convention_and_principal_subspace():
    W = _w(dtype=torch.float64)
    A, B, W_res = pissa_factors(W, 8, method="exact")
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    torch.testing.assert_close(B @ A, (U[:, :8] * S[:8]) @ Vh[:8])
    # A = sqrt(S) Vh and B = U sqrt(S): equal row/column norms sqrt(S).
    torch.testing.assert_close(A.norm(dim=1), S[:8].sqrt())
    torch.testing.assert_close(B.norm(dim=0), S[:8].sqrt())
    torch.testing.assert_close(torch.linalg.svdvals(W_res)[:4], S[8:12])


def test_fan_in_fan_out_keeps_stored_layout():
    W = _w(dtype=torch.float64)  # (out, in)
    A, B, R = pissa_factors(W, 8, method="exact")
    At, Bt, Rt = pissa_factors(W.T.contiguous(), 8, method="exact", fan_in_fan_out=True)
    assert Rt.shape == W.T.shape
    torch.testing.assert_close(Rt, R.T)
    torch.testing.assert_close(Bt @ At, B @ A)


def test_batched_factors():
    Ws = torch.stack([_w(seed=i) for i in range(3)])
    A, B, R = pissa_factors(Ws, 4, method="exact")
    assert A.shape == (3, 4, 160) and B.shape == (3, 96, 4)
    torch.testing.assert_close(R + B @ A, Ws, atol=1e-5, rtol=0)


@pytest.mark.parametrize("padded", [False, True], ids=["contiguous", "padded"])
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
@pytest.mark.parametrize("block", [7, 1 << 20])  # many blocks (last one short) or one
def test_subtract_adapter_rounds_into_out_with_exact_norms(
    monkeypatch, fan_in_fan_out, block, padded
):
    from pissa_svd import pissa

    monkeypatch.setattr(pissa, "BLOCK_ELEMENTS", block * 160)  # rows per block: 7 or all
    g = torch.Generator().manual_seed(4)
    W = torch.randn(3, 96, 160, generator=g)  # a batch of 3, (out, in)
    A = torch.randn(3, 8, 160, generator=g).bfloat16()
    B = torch.randn(3, 96, 8, generator=g).bfloat16()
    stored = W.mT.contiguous() if fan_in_fan_out else W.clone()
    if padded:  # rows 16 elements apart more than their length, as padded_empty makes them
        stored = torch.empty(*stored.shape[:-1], stored.shape[-1] + 16)[..., : stored.shape[-1]]
        stored.copy_(W.mT if fan_in_fan_out else W)
        assert not stored.is_contiguous()
    out = [torch.empty(stored.shape[1:], dtype=torch.bfloat16) for _ in range(3)]
    sumsq = pissa.subtract_adapter_(
        stored, A, B, scaling=0.5, fan_in_fan_out=fan_in_fan_out, out=out
    )
    ref = W - 0.5 * B.float() @ A.float()  # the same fp32 GEMM, whole
    ref = ref.mT if fan_in_fan_out else ref
    torch.testing.assert_close(stored, ref, rtol=0, atol=1e-5)
    for i in range(3):
        assert torch.equal(out[i], stored[i].bfloat16())
    exact = ref.double().square().sum((-2, -1))
    assert sumsq.dtype == torch.float64 and sumsq.shape == (3,)
    torch.testing.assert_close(sumsq, exact, rtol=1e-6, atol=0)


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_residual_is_contiguous_like_the_weight(fan_in_fan_out):
    """Rows of 8 KB are where working copies get padded; the returned residual must not be
    (safetensors refuses to save a non-contiguous tensor)."""
    from safetensors.torch import load, save

    W = _w(96, 2048)
    A, B, R = pissa_factors(W.T if fan_in_fan_out else W, 8, fan_in_fan_out=fan_in_fan_out)
    assert R.is_contiguous() and R.shape == (W.T if fan_in_fan_out else W).shape
    assert torch.equal(load(save({"r": R}))["r"], R)


def test_subtract_adapter_needs_rows_it_can_update_in_place():
    from pissa_svd.pissa import subtract_adapter_

    A, B = torch.ones(2, 8), torch.ones(6, 2)
    for W in (torch.zeros(8, 6).mT, torch.zeros(6, 16)[:, ::2]):  # column-major; strided rows
        with pytest.raises(ValueError, match="contiguous rows"):
            subtract_adapter_(W, A, B, scaling=1.0)
    W = torch.zeros(6, 10)[:, :8]  # padded rows are fine, and updated in place
    subtract_adapter_(W, A, B, scaling=1.0)
    assert torch.equal(W, torch.full((6, 8), -2.0))


def test_block_norms_are_accurate_where_one_fp32_reduction_is_not():
    from pissa_svd.pissa import frobenius, sum_squares

    g = torch.Generator().manual_seed(5)
    X = torch.randn(2048, 5632, generator=g) * 0.02 + 0.01  # a mean keeps the error one-sided
    exact = float(X.double().square().sum())
    assert abs(float(sum_squares(X)) / exact - 1) < 1e-6
    assert abs(frobenius(X) / exact**0.5 - 1) < 1e-6
    batch = X[:1536].view(3, 512, 5632)  # one sum per matrix of a batch
    per_matrix = batch.double().square().sum((-2, -1))
    assert sum_squares(batch).shape == (3,)
    torch.testing.assert_close(sum_squares(batch), per_matrix, rtol=1e-6, atol=0)


def test_residual_that_overflows_its_dtype_is_refused():
    W = torch.full((32, 48), 60000.0)
    W[torch.arange(32), torch.arange(32)] = -60000.0
    with pytest.raises(ValueError, match="residual does not fit in torch.float16"):
        pissa_factors(W.half(), 1)
    A, B, W_res = pissa_factors(W.half(), 1, residual_dtype=torch.float32)
    assert torch.isfinite(W_res).all() and W_res.abs().max() > 65504


def test_library_takes_parameters_and_names_bad_values():
    """A model's nn.Parameter (requires grad) is the natural input: it is read, not
    differentiated. NaN/inf weights and a non-finite scaling are ValueErrors that say so."""
    from pissa_svd.quant import fake_quantize, qpissa_factors

    W = torch.nn.Parameter(_w())
    A, B, W_res = pissa_factors(W, 4)
    ref = pissa_factors(W.detach().clone(), 4)
    assert all(torch.equal(x, y) for x, y in zip((A, B, W_res), ref, strict=True))
    assert not (A.requires_grad or B.requires_grad or W_res.requires_grad)
    assert not svd_lowrank(W, 4)[0].requires_grad
    assert not qpissa_factors(W, 4, iters=1).W_res.requires_grad
    assert not fake_quantize(W, "int8").requires_grad and not fake_quantize(W, "nf4").requires_grad
    for bad in (float("nan"), float("inf")):
        X = _w()
        X[3, 5] = bad
        with pytest.raises(ValueError, match="W holds NaN or inf values"):
            pissa_factors(X, 4)
    for scaling in (float("inf"), float("nan")):
        with pytest.raises(ValueError, match="finite number > 0"):
            pissa_factors(_w(), 4, scaling=scaling)
    with pytest.raises(ValueError, match="rank must be an int"):
        svd_lowrank(_w(), True)


def test_bad_library_arguments_are_value_errors_that_say_what():
    W = _w()
    U, S, Vh = svd_lowrank(W, 6)
    cases = [
        (dict(svd=(U, S, Vh)), r"svd's U must have shape \(96, 4\) .* at rank 4, got \(96, 6\)"),
        (dict(svd=(U[:, :4], S[:4], Vh[:4].mT)), r"svd's Vh must have shape \(4, 160\)"),
        (dict(svd=(U[:, :4], -S[:4], Vh[:4])), "S must be finite and >= 0"),
        (dict(svd=(U[:, :4], S[:4])), r"svd must be a tuple \(U, S, Vh\)"),
        (dict(adapter_dtype=torch.int8), "adapter_dtype must be torch.bfloat16"),
        (dict(residual_dtype="fp16"), "residual_dtype must be torch.bfloat16.*got 'fp16'"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            pissa_factors(W, 4, **kwargs)
    with pytest.raises(ValueError, match="upcast fp8"):
        pissa_factors(W.to(torch.float8_e4m3fn), 4)
    bad = W.clone()
    bad[3, 5] = float("nan")
    with pytest.raises(ValueError, match="W holds NaN or inf values"):  # svd given: no SVD of W
        pissa_factors(bad, 4, svd=(U[:, :4], S[:4], Vh[:4]))
    A, B, _ = pissa_factors(W, 4, svd=(U[:, :4], S[:4], Vh[:4]))  # a wider SVD, cut to r
    assert A.shape == (4, 160) and B.shape == (96, 4)
