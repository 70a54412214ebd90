"""Truncated SVD against matrices with a known spectrum (built in fp64)."""

from __future__ import annotations

import pytest
import torch

from pissa_svd import linalg
from pissa_svd.linalg import (
    _small_svd,
    _small_svd_qr,
    orthonormalize,
    padded_empty,
    padded_nbytes,
    padded_stride,
    svd_lowrank,
    thin_matmul,
)


def known(
    m: int,
    n: int,
    decay: float = 0.5,
    seed: int = 0,
    rank: int | None = None,
    geometric: float | None = None,
):
    """W = U diag(s) V^T with s_i = i^-decay, or e^(-geometric i) (fp64); returns W and s."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    U = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64)).Q
    s = torch.arange(1, k + 1, dtype=torch.float64) ** -decay
    if geometric is not None:
        s = torch.exp(-geometric * torch.arange(k, dtype=torch.float64))
    if rank is not None:
        s[rank:] = 0
    return (U * s) @ V.T, s


def excess_error(W, s, U, S, Vh) -> float:
    """||W - U S Vh||_F / ||W - W_r*||_F - 1 (0 for the optimal rank-r approximation)."""
    r = S.shape[-1]
    approx = (U.double() * S.double().unsqueeze(-2)) @ Vh.double()
    return float(torch.linalg.norm(W - approx) / torch.linalg.norm(s[r:]) - 1)


SHAPES = [(300, 700), (700, 300), (400, 400)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_methods_beat_peft_on_slow_decay(shape):
    W, s = known(*shape)
    r = 32
    U, S, V = torch.svd_lowrank(W.float(), q=r, niter=4)  # PEFT's pissa_niter_4
    peft = excess_error(W, s, U, S, V.mT)
    halko = excess_error(W, s, *svd_lowrank(W.float(), r, method="halko"))
    krylov = excess_error(W, s, *svd_lowrank(W.float(), r, method="krylov"))
    krylov2 = excess_error(W, s, *svd_lowrank(W.float(), r, method="krylov2"))
    auto = excess_error(W, s, *svd_lowrank(W.float(), r))
    exact = excess_error(W, s, *svd_lowrank(W.float(), r, method="exact"))
    assert abs(exact) < 1e-5
    assert 0 <= halko < 0.6 * peft
    assert 0 <= krylov < 0.1 * peft
    # The previous block makes up for oversampling: below halko's error with 16 fewer columns.
    assert 0 <= krylov2 < min(0.5 * peft, halko)
    assert auto == krylov2  # auto runs krylov2 (with its default, no oversampling) here


@pytest.mark.parametrize("seed", [0, 1])
def test_oversampling_wins_on_a_geometric_spectrum(seed):
    """Where each singular value is a fixed fraction of the previous one (here e^-1/20), the
    16 extra columns of halko catch the top r far better than krylov2's previous block; both
    are well ahead of PEFT (in fp64, so that the gap is the methods', not fp32's)."""
    W, s = known(256, 512, seed=seed, geometric=1 / 20)
    r = 8
    torch.manual_seed(seed)
    U, S, V = torch.svd_lowrank(W, q=r, niter=4)
    peft = excess_error(W, s, U, S, V.mT)
    halko = excess_error(W, s, *svd_lowrank(W, r, method="halko", oversample=16, seed=seed))
    krylov2 = excess_error(W, s, *svd_lowrank(W, r, method="krylov2", seed=seed))
    assert halko < 1e-3 * krylov2 and krylov2 < 0.5 * peft


@pytest.mark.parametrize("scale", [1e-25, 1e-9, 4.6e18, 1e30])
@pytest.mark.parametrize("method", ["auto", "halko", "krylov"])
def test_weights_far_from_unit_scale_are_as_accurate(method, scale):
    """The power iteration's Gram matrices hold s_1^4: fp32 overflows for weights of 1e18
    (an error blaming non-finite input) and loses its low bits for tiny ones. Such weights
    are redone scaled by a power of two, so S is the unit-scale S times the scale, to fp32
    rounding, batched, with the bf16 sketch too."""
    W, _ = known(120, 200, decay=1.0)
    W = torch.stack([W, 0.5 * W]).float()
    ref = svd_lowrank(W, 8, method=method, seed=[3, 4])
    got = svd_lowrank((W.double() * scale).float(), 8, method=method, seed=[3, 4])
    torch.testing.assert_close(got[1].double() / scale, ref[1].double(), rtol=2e-5, atol=0)
    overlap = torch.linalg.svdvals(ref[0].mT @ got[0])  # the same subspace
    assert float(overlap.min()) > 1 - 1e-4
    if method != "krylov":
        bf16 = svd_lowrank(
            (W.double() * scale).float(), 8, method=method, sketch_dtype=torch.bfloat16
        )
        assert (
            torch.isfinite(bf16[0]).all()
            and float((bf16[1].double() / scale / ref[1] - 1).abs().max()) < 1e-3
        )


def test_singular_values_and_subspaces_are_accurate():
    W, s = known(500, 800, decay=1.0)
    U, S, Vh = svd_lowrank(W, 16, method="krylov")  # fp64 in, fp64 out
    assert U.dtype == torch.float64
    torch.testing.assert_close(S, s[:16], rtol=1e-8, atol=0)
    eye = torch.eye(16, dtype=torch.float64)
    torch.testing.assert_close(U.T @ U, eye, atol=1e-10, rtol=0)
    torch.testing.assert_close(Vh @ Vh.T, eye, atol=1e-10, rtol=0)


def test_exact_matches_torch():
    W, _ = known(120, 90)
    U, S, Vh = svd_lowrank(W, 10, method="exact")
    U0, S0, Vh0 = torch.linalg.svd(W, full_matrices=False)
    torch.testing.assert_close(S, S0[:10])
    torch.testing.assert_close(U * S @ Vh, (U0[:, :10] * S0[:10]) @ Vh0[:10])


@pytest.mark.parametrize("method", ["halko", "krylov", "krylov2", "krylov3", "exact"])
def test_batched_equals_looped(method):
    Ws = torch.stack([known(200, 150, seed=i)[0] for i in range(3)]).float()
    seeds = [11, 22, 33]
    Ub, Sb, Vb = svd_lowrank(Ws, 8, method=method, seed=seeds)
    for i in range(3):
        U, S, Vh = svd_lowrank(Ws[i], 8, method=method, seed=seeds[i])
        torch.testing.assert_close(Sb[i], S, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(Ub[i] * Sb[i] @ Vb[i], U * S @ Vh, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["halko", "krylov", "krylov2", "krylov3", "exact"])
def test_full_rank_deficient_and_zero(method):
    W, s = known(60, 40)
    U, S, Vh = svd_lowrank(W.float(), 40, method=method)  # rank == min(m, n)
    torch.testing.assert_close(U * S @ Vh, W.float(), atol=1e-5, rtol=0)
    low, _ = known(80, 50, rank=5)
    U, S, Vh = svd_lowrank(low.float(), 20, method=method)
    assert torch.isfinite(U).all() and torch.isfinite(Vh).all()
    torch.testing.assert_close(U * S @ Vh, low.float(), atol=1e-5, rtol=0)
    U, S, Vh = svd_lowrank(torch.zeros(70, 30), 10, method=method)
    assert torch.isfinite(U).all() and torch.isfinite(Vh).all() and float(S.abs().max()) == 0


def test_krylov2_keeps_the_last_two_blocks_of_halkos_iteration():
    """krylov2's basis holds halko's (same sketch, no oversampling on either), so its
    Rayleigh-Ritz can only do better; with one power iteration it is the whole Krylov space."""
    W, s = known(300, 500, decay=0.3)
    for niter in (0, 1, 3):
        halko = excess_error(W, s, *svd_lowrank(W, 20, niter=niter, method="halko", oversample=0))
        two = excess_error(W, s, *svd_lowrank(W, 20, niter=niter, method="krylov2"))
        assert two <= halko + 1e-12
        if niter == 0:
            assert two == pytest.approx(halko, abs=1e-12)  # one block: the same method
    full = svd_lowrank(W, 20, niter=1, method="krylov", oversample=0)
    two = svd_lowrank(W, 20, niter=1, method="krylov2")
    torch.testing.assert_close(two[1], full[1], rtol=1e-10, atol=0)


def test_krylov3_keeps_one_block_more_than_krylov2():
    """krylov3's basis holds krylov2's (same sketch), so its error can only be lower; with two
    power iterations it is the whole Krylov space."""
    W, s = known(400, 600, decay=0.3)
    for niter in (2, 4):
        two = excess_error(W, s, *svd_lowrank(W, 20, niter=niter, method="krylov2"))
        three = excess_error(W, s, *svd_lowrank(W, 20, niter=niter, method="krylov3"))
        assert three <= two + 1e-12
    assert three < 0.8 * two  # and here markedly lower (slow decay, niter 4)
    full = svd_lowrank(W, 20, niter=2, method="krylov", oversample=0)
    three = svd_lowrank(W, 20, niter=2, method="krylov3")
    torch.testing.assert_close(three[1], full[1], rtol=1e-10, atol=0)


def test_default_oversample_per_method():
    from pissa_svd.linalg import default_oversample, resolve_method

    assert default_oversample("auto") == default_oversample("krylov2") == 0
    assert default_oversample("krylov3") == 0
    assert default_oversample("halko") == default_oversample("krylov") == 16
    # A third block where the short side is at least 64 block widths (7B-sized weights at
    # rank 64; the 2048-wide weights of a 1.1B model only from rank 32 down).
    assert resolve_method("auto", 4096, 11008, 64, 0, 4) == "krylov3"
    assert resolve_method("auto", 11008, 4096, 64, 0, 4) == "krylov3"
    assert resolve_method("auto", 2048, 5632, 64, 0, 4) == "krylov2"
    assert resolve_method("auto", 2048, 5632, 32, 0, 4) == "krylov3"
    assert resolve_method("auto", 4096, 11008, 64, 8, 4) == "krylov2"  # wider blocks
    # The two-block basis would span half the smaller side: exact instead.
    assert resolve_method("auto", 256, 2048, 64, 0, 4) == "krylov2"
    assert resolve_method("auto", 128, 2048, 64, 0, 4) == "exact"
    assert resolve_method("krylov2", 100, 90, 45, 0, 4) == "exact"
    assert resolve_method("krylov3", 190, 900, 64, 0, 4) == "exact"  # 3 blocks: 192 columns
    assert resolve_method("krylov3", 200, 900, 64, 0, 4) == "krylov3"


def test_bf16_input_and_seed_determinism():
    W, s = known(256, 384)
    Wb = W.to(torch.bfloat16)
    a = svd_lowrank(Wb, 16, method="halko", seed=3)
    b = svd_lowrank(Wb, 16, method="halko", seed=3)
    c = svd_lowrank(Wb, 16, method="halko", seed=4)
    assert a[0].dtype == torch.float32
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=False))
    assert not torch.equal(a[0], c[0])
    torch.testing.assert_close(a[1], s[:16].float(), rtol=2e-2, atol=0)  # bf16 input noise


def test_padded_rows_are_an_odd_number_of_cache_lines():
    assert padded_stride(2048, 4) == 2064  # 128 lines (8 KB) -> 129
    assert padded_stride(5632, 4) == 5648  # 352 lines -> 353
    assert padded_stride(2048, 2) == 2080  # bf16: 64 lines -> 65
    assert padded_stride(1040, 4) == 1040  # 65 lines already
    assert padded_stride(1030, 4) == 1040  # a partial line rounds up
    assert padded_stride(1000, 4) == 1000  # under a page: left alone
    x = padded_empty((3, 5, 2048), torch.float32)
    assert x.shape == (3, 5, 2048) and x.stride() == (5 * 2064, 2064, 1)
    buf = torch.empty(padded_nbytes((3, 5, 2048), torch.float32), dtype=torch.uint8)
    y = padded_empty((3, 5, 2048), torch.float32, buffer=buf)
    assert y.data_ptr() == buf.data_ptr() and y.stride() == x.stride()
    with pytest.raises(RuntimeError):  # the buffer must be large enough
        padded_empty((3, 6, 2048), torch.float32, buffer=buf)
    assert padded_empty((4, 2048), torch.float32, device="meta").is_contiguous()


def test_working_copy_pads_rows_when_it_casts():
    from pissa_svd.linalg import _working_copy

    f32 = torch.float32
    W = torch.randn(300, 2048)
    assert _working_copy(W, f32) is W  # fp32 is used as it is laid out
    h = _working_copy(W.bfloat16(), f32)  # a cast is a copy anyway: padded rows
    assert h.dtype == f32 and h.stride() == (2064, 1) and torch.equal(h, W.bfloat16().float())
    T = _working_copy(W.T.bfloat16(), f32)  # stored transposed: padded in that orientation
    assert T.shape == (2048, 300) and T.stride() == (1, 2064)
    b = _working_copy(torch.randn(2, 3, 2048).half(), f32)  # batches too
    assert b.stride()[-2:] == (2064, 1)


@pytest.mark.parametrize("method", ["auto", "halko", "exact"])
@pytest.mark.parametrize("stored", ["rows", "transposed"])
def test_padded_rows_give_the_same_factors(method, stored):
    W, s = known(300, 1100)
    W = W.float() if stored == "rows" else W.T.contiguous().float().T
    P = padded_empty(W.shape, W.dtype).copy_(W) if stored == "rows" else None
    if P is None:  # a transposed (column-major) layout, padded
        P = padded_empty(W.T.shape, W.dtype).copy_(W.T).T
    assert not P.is_contiguous() and torch.equal(P, W)
    a = svd_lowrank(W, 24, method=method, seed=1)
    b = svd_lowrank(P, 24, method=method, seed=1)
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    # bf16 input is widened into the padded layout, as stored (rows or transposed)
    c = svd_lowrank(W.bfloat16(), 24, method=method, seed=1)
    d = svd_lowrank(P.bfloat16(), 24, method=method, seed=1)
    assert all(torch.equal(x, y) for x, y in zip(c, d, strict=True))
    assert excess_error(W.double(), s, *c) < 0.2


def test_thin_matmul_writes_into_a_column_slice(monkeypatch):
    # The Krylov basis's products go straight into their block of one wider buffer.
    monkeypatch.setattr(linalg, "ROW_BLOCK", 4)
    g = torch.Generator().manual_seed(1)
    X = padded_empty((13, 40), torch.float64)
    X.copy_(torch.randn(X.shape, generator=g, dtype=torch.float64))
    B = torch.randn(40, 3, generator=g, dtype=torch.float64)
    for A in (X, X[:8], X.T.contiguous().T):  # row blocks, one call (short, column-major)
        wide = torch.full((A.shape[0], 9), 7.0, dtype=torch.float64)
        got = thin_matmul(A, B, wide[:, 3:6])
        assert got.data_ptr() == wide[:, 3:6].data_ptr()
        torch.testing.assert_close(wide[:, 3:6], A @ B, rtol=1e-14, atol=1e-14)
        assert (wide[:, :3] == 7).all() and (wide[:, 6:] == 7).all()


def test_thin_matmul_splits_tall_row_major_products_into_row_blocks(monkeypatch):
    monkeypatch.setattr(linalg, "ROW_BLOCK", 4)  # 13 rows: blocks of 4, 4, 4 and 1
    calls = []
    real = torch.matmul

    def counted(a, b, **kw):
        calls.append(a.shape[-2])
        return real(a, b, **kw)

    monkeypatch.setattr(torch, "matmul", counted)
    g = torch.Generator().manual_seed(0)
    X = padded_empty((2, 13, 40), torch.float64)
    X.copy_(torch.randn(X.shape, generator=g, dtype=torch.float64))
    B = torch.randn(40, 3, generator=g, dtype=torch.float64)
    Y = thin_matmul(X, B)
    assert calls == [4, 4, 4, 1] and Y.shape == (2, 13, 3)
    torch.testing.assert_close(Y, X @ B, rtol=1e-14, atol=1e-14)
    Bb = torch.randn(2, 40, 3, generator=g, dtype=torch.float64)  # one block per member
    torch.testing.assert_close(thin_matmul(X, Bb), X @ Bb, rtol=1e-14, atol=1e-14)
    assert len(calls) == 8
    calls.clear()  # column-major (a transposed view) or short: one product
    torch.testing.assert_close(thin_matmul(X[0].T.contiguous().T, B), X[0] @ B)
    torch.testing.assert_close(thin_matmul(X[:, :8], B), X[:, :8] @ B)
    assert calls == []
    # and the SVD through it gives the factors of one product per pass
    monkeypatch.setattr(torch, "matmul", real)
    W, _ = known(90, 300)
    a = svd_lowrank(W.float().T.contiguous(), 10, seed=3)
    monkeypatch.setattr(linalg, "ROW_BLOCK", 1 << 20)
    b = svd_lowrank(W.float().T.contiguous(), 10, seed=3)
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


def test_orthonormalize_falls_back_on_ill_conditioned_input():
    g = torch.Generator().manual_seed(0)
    Y = torch.randn(500, 20, generator=g)
    Y[:, 10:] = Y[:, :10] * 1.0 + 1e-7 * torch.randn(500, 10, generator=g)  # cond ~ 1e7
    Q = orthonormalize(Y)
    torch.testing.assert_close(Q.T @ Q, torch.eye(20), atol=1e-5, rtol=0)


def test_rayleigh_ritz_gram_route_matches_qr_route_and_falls_back():
    """The fast Rayleigh-Ritz (fp64 eigh of BBᵀ) agrees with the QR route on a well-conditioned
    B, and hands a batch member whose B is rank-deficient to the QR route (orthonormal V)."""
    g = torch.Generator().manual_seed(0)
    W, _ = known(300, 500, decay=2.0)  # s_1 / s_24 = 576: the Gram matrix squares that
    Q = torch.linalg.qr(W.float() @ torch.randn(500, 24, generator=g)).Q
    good = W.float().T @ Q  # Bt = Xᵀ Q, (n, L)
    bad = good.clone()
    bad[:, 12:] = 0  # B of rank 12 < the 16 asked for
    Bt, Qs = torch.stack([good, bad]), torch.stack([Q, Q])
    U, S, Vh = _small_svd(Bt, Qs, 16)
    Uq, Sq, Vhq = _small_svd_qr(Bt, Qs, 16)
    eye = torch.eye(16)
    for i in range(2):
        torch.testing.assert_close(S[i], Sq[i], rtol=1e-5, atol=1e-6 * float(Sq[i, 0]))
        torch.testing.assert_close(Vh[i] @ Vh[i].T, eye, atol=1e-4, rtol=0)
        torch.testing.assert_close(
            U[i] * S[i] @ Vh[i], Uq[i] * Sq[i] @ Vhq[i], atol=1e-5 * float(Sq[i, 0]), rtol=0
        )


def llm_like(m: int, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A bf16 matrix whose spectrum falls off like a real projection's (s_i ~ i^-0.35): most
    of its norm is in the tail beyond rank 32; W is rounded to bf16 and s is its exact
    spectrum (fp64)."""
    W = known(m, n, decay=0.35, seed=seed)[0].to(torch.bfloat16)
    return W, torch.linalg.svdvals(W.double())


@pytest.mark.parametrize("method", ["halko", "krylov", "krylov2", "krylov3"])
def test_bf16_sketch_is_as_accurate_on_a_flat_tail(method):
    W, s = llm_like(640, 900)
    r = 32
    full = excess_error(W.double(), s, *svd_lowrank(W, r, method=method, seed=5))
    low = svd_lowrank(W, r, method=method, seed=5, sketch_dtype=torch.bfloat16)
    assert all(x.dtype == torch.float32 for x in low)
    half = excess_error(W.double(), s, *low)
    # linalg._block_krylov: halko/krylov/krylov3 within 3% of the fp32 sketch's excess
    # error here, krylov2 within 25%; all far below PEFT's (3.5e-3 here).
    assert 0 <= half <= full * (1.3 if method == "krylov2" else 1.05) + 1e-6
    torch.testing.assert_close(low[1], s[:r].float(), rtol=2e-2, atol=0)
    eye = torch.eye(r)
    torch.testing.assert_close(low[0].mT @ low[0], eye, atol=1e-5, rtol=0)
    torch.testing.assert_close(low[2] @ low[2].mT, eye, atol=1e-5, rtol=0)


def test_bf16_sketch_reads_w_as_it_is_and_is_deterministic(monkeypatch):
    W, _ = llm_like(300, 500)
    a = svd_lowrank(W, 16, seed=7, sketch_dtype=torch.bfloat16)
    b = svd_lowrank(W.float(), 16, seed=7, sketch_dtype=torch.bfloat16)  # rounded to bf16: W
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    # Batched ~= looped (oneDNN's batched and single GEMMs may sum in another order).
    Ws = torch.stack([llm_like(300, 500, seed=i)[0] for i in range(3)])
    Ub, Sb, Vb = svd_lowrank(Ws, 16, seed=[1, 2, 3], sketch_dtype=torch.bfloat16)
    U, S, Vh = svd_lowrank(Ws[1], 16, seed=2, sketch_dtype=torch.bfloat16)
    torch.testing.assert_close(Sb[1], S, rtol=1e-5, atol=0)
    torch.testing.assert_close(Ub[1] * Sb[1] @ Vb[1], U * S @ Vh, rtol=1e-4, atol=1e-5)
    # No fp32 working copy of W is made: every pass multiplies the bf16 W itself.
    seen = []
    real = linalg._pass

    def spy(X, B, *args, **kwargs):
        seen.append(X.dtype)
        return real(X, B, *args, **kwargs)

    monkeypatch.setattr(linalg, "_pass", spy)
    monkeypatch.setattr(linalg, "_working_copy", lambda *a: pytest.fail("working copy made"))
    svd_lowrank(W, 16, method="krylov2", niter=3, seed=7, sketch_dtype=torch.bfloat16)
    assert seen == [torch.bfloat16] * (2 * 3 + 2)  # 2q + 2 passes, all in bf16


def test_bf16_sketch_on_exact_low_rank_stays_finite():
    W, _ = known(200, 300, rank=5)
    U, S, Vh = svd_lowrank(W.float(), 20, sketch_dtype=torch.bfloat16, method="krylov2")
    assert torch.isfinite(U).all() and torch.isfinite(S).all() and torch.isfinite(Vh).all()
    # The error floor of a bf16 sketch is ~2^-9 of ||W_r|| (the tail here is 0).
    assert float(torch.linalg.norm(W - (U.double() * S.double()) @ Vh.double())) < 1e-2
    U, S, Vh = svd_lowrank(torch.zeros(60, 40), 8, sketch_dtype=torch.bfloat16)
    assert torch.count_nonzero(S) == 0 and torch.isfinite(U).all()


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((torch.zeros(3), 1), "2-D"),
        ((torch.zeros(4, 4, dtype=torch.int32), 1), "floating point"),
        ((torch.zeros(4, 5), 0), "rank"),
        ((torch.zeros(4, 5), 5), "rank"),
        ((torch.zeros(4, 5, dtype=torch.float8_e4m3fn), 1), "upcast fp8"),
        ((torch.zeros(4, 5, device="meta"), 1), "meta device"),
        ((torch.zeros(4, 5), 1, {"niter": 2.5}), "niter must be an int >= 0, got 2.5"),
        ((torch.zeros(4, 5), 1, {"niter": -1}), "niter must be an int >= 0"),
        ((torch.zeros(4, 5), 1, {"oversample": 1.5}), "oversample must be an int >= 0"),
        ((torch.zeros(4, 5), 1, {"seed": 1.5}), "seed must be an int or one int per matrix"),
        ((torch.zeros(4, 5), 1, {"seed": 2**70}), r"seeds must be ints in \[-2\*\*63"),
        ((torch.zeros(2, 4, 5), 1, {"seed": [1]}), "got 1 seeds for a batch of 2"),
        ((torch.zeros(0, 4, 5), 1), r"W is empty \(shape \(0, 4, 5\)\)"),
        ((torch.zeros(4, 5), 1, {"niter": True}), "niter must be an int >= 0, got True"),
    ],
)
def test_bad_arguments_raise_value_error(args, match):
    *args, kwargs = args if isinstance(args[-1], dict) else (*args, {})
    with pytest.raises(ValueError, match=match):
        svd_lowrank(*args, **kwargs)


def test_seeds_may_be_any_integer_type():
    """numpy and 0-d torch integers are seeds, as are sequences of them; the same ints give
    the same bits."""
    import numpy as np

    W = torch.randn(2, 30, 20, generator=torch.Generator().manual_seed(0))
    ref = svd_lowrank(W, 4, seed=[5, 6])
    for seed in (np.int64(5), torch.tensor(5), [np.int32(5), torch.tensor(6)], (5, 6)):
        assert all(
            torch.equal(a, b) for a, b in zip(svd_lowrank(W, 4, seed=seed), ref, strict=True)
        )


def test_bad_sketch_dtype_raises_value_error():
    with pytest.raises(ValueError, match="sketch_dtype must be None or torch.bfloat16"):
        svd_lowrank(torch.zeros(8, 8), 2, sketch_dtype=torch.float16)
    with pytest.raises(ValueError, match="torch backend"):
        svd_lowrank(torch.zeros(8, 8), 2, sketch_dtype=torch.bfloat16, backend="native")


def test_ieee_matmuls_turns_reduced_precision_off_and_restores_it():
    m = torch.backends.cuda.matmul
    saved = m.allow_tf32, m.allow_bf16_reduced_precision_reduction
    try:
        m.allow_tf32 = m.allow_bf16_reduced_precision_reduction = True  # as a training script may
        with linalg.ieee_matmuls(torch.device("cuda")):
            assert not m.allow_tf32 and not m.allow_bf16_reduced_precision_reduction
        assert m.allow_tf32 and m.allow_bf16_reduced_precision_reduction
        with linalg.ieee_matmuls(torch.device("cpu")):  # nothing to change on a CPU
            assert m.allow_tf32
    finally:
        m.allow_tf32, m.allow_bf16_reduced_precision_reduction = saved
