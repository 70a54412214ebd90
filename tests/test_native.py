"""The compiled engine (csrc/) against the torch path: same sketch, same answer.

These run whenever the extension is built, which the README's install does; with
PISSA_SVD_NO_EXT=1 they are skipped and say so. CUDA cases skip cleanly without a GPU.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from pissa_svd import linalg, native
from pissa_svd.linalg import svd_lowrank

from .test_linalg import excess_error, known

NO_EXT = os.environ.get("PISSA_SVD_NO_EXT") == "1"
pytestmark = pytest.mark.skipif(NO_EXT, reason="PISSA_SVD_NO_EXT=1: extension not built")
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
METHODS = ["halko", "krylov", "krylov2", "krylov3", "exact"]
SHAPES = [(300, 700), (700, 300), (400, 400)]


def test_cpu_module_is_built_and_loads():
    ok, what = native.available("cpu")
    assert ok, what  # the README's install builds it; a failure here is a build break


def principal_cosines(U1, U2):
    """Cosines of the principal angles between two orthonormal bases (1 = same subspace)."""
    return torch.linalg.svdvals(U1.mT.double() @ U2.double())


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_native_matches_torch(method, shape, dtype):
    W, s = known(*shape, decay=1.0, seed=1)
    W = W.to(dtype)
    r = 24
    t = svd_lowrank(W, r, niter=2, method=method, seed=5, backend="torch")
    n = svd_lowrank(W, r, niter=2, method=method, seed=5, backend="native")
    tol = 2e-4 if dtype == torch.float32 else 1e-9
    for a, b in zip(t, n, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype == dtype
    torch.testing.assert_close(n[1], t[1], rtol=tol, atol=tol * float(s[0]))
    # Same sketch, so the same subspace to working precision (the top singular vectors are well
    # separated here), and the same approximation error.
    assert principal_cosines(t[0], n[0]).min() > 1 - 10 * tol
    assert principal_cosines(t[2].mT, n[2].mT).min() > 1 - 10 * tol
    assert abs(excess_error(W.double(), s, *n) - excess_error(W.double(), s, *t)) < 1e-3
    eye = torch.eye(r, dtype=dtype)
    torch.testing.assert_close(n[0].mT @ n[0], eye, rtol=0, atol=50 * tol)
    torch.testing.assert_close(n[2] @ n[2].mT, eye, rtol=0, atol=50 * tol)


@pytest.mark.parametrize("method", METHODS)
def test_native_batched_equals_looped_and_is_deterministic(method):
    W = torch.stack([known(200, 320, seed=i)[0].float() for i in range(3)])
    seeds = [11, 12, 13]
    U, S, Vh = svd_lowrank(W, 16, method=method, seed=seeds, backend="native")
    for i in range(3):
        u, s, vh = svd_lowrank(W[i], 16, method=method, seed=seeds[i], backend="native")
        torch.testing.assert_close(S[i], s, rtol=1e-5, atol=1e-6)
        assert principal_cosines(U[i], u).min() > 1 - 1e-4
    again = svd_lowrank(W, 16, method=method, seed=seeds, backend="native")
    for a, b in zip((U, S, Vh), again, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("method", METHODS)
def test_native_rank_deficient_zero_full_rank_and_bf16(method):
    W, _ = known(120, 200, rank=5, seed=2)
    batch = torch.stack([W.float(), torch.zeros(120, 200)])
    if method != "exact":  # LAPACK's SVD needs no help; CholeskyQR fails on a zero block
        *_, redo = native.svd(batch, 12, 1, method, torch.randn(2, 200, 20))
        assert 1 in redo  # ... so it is redone on the torch path (the rank-5 one may be too)
    U, S, Vh = svd_lowrank(batch, 12, niter=1, method=method, backend="native")
    for x in (U, S, Vh):
        assert torch.isfinite(x).all()
    assert torch.all(S[1] == 0) and torch.all(S[0, 5:] < 1e-5)
    eye = torch.eye(12)
    torch.testing.assert_close(U[0].mT @ U[0], eye, rtol=0, atol=1e-4)  # orthonormal anyway
    U, S, Vh = svd_lowrank(W.bfloat16(), 120, method=method, backend="native")  # rank == min
    assert S.dtype == torch.float32 and U.shape == (120, 120) and torch.isfinite(U).all()


def call(W, omega, U, S, Vh, rank=4, niter=1, method="halko"):
    return native.module("cpu").svd(W, omega, U, S, Vh, rank, niter, method)


def good(b=2, m=20, n=30, r=4, width=8, dtype=torch.float32):
    return [
        torch.randn(b, m, n, dtype=dtype),
        torch.randn(b, max(m, n), width, dtype=dtype),
        torch.empty(b, m, r, dtype=dtype),
        torch.empty(b, r, dtype=dtype),
        torch.empty(b, r, n, dtype=dtype),
    ]


def test_native_validates_arguments_by_name():
    assert call(*good()) == [0, 0]
    args = good()
    args[2] = torch.empty(2, 20, 5)
    with pytest.raises(ValueError, match="^U: dimension 2 is 5, expected 4"):
        call(*args)
    args = good()
    args[1] = args[1].double()
    with pytest.raises(ValueError, match="^omega: expected float32"):
        call(*args)
    args = good()
    args[0] = args[0].mT.contiguous().mT
    with pytest.raises(ValueError, match="^W: must be contiguous"):
        call(*args)
    with pytest.raises(ValueError, match="^rank: must be in"):
        call(*good(), rank=0)
    with pytest.raises(ValueError, match="^method:"):
        call(*good(), method="lanczos")
    with pytest.raises(TypeError, match="^S: expected a tensor with __dlpack__"):
        call(*good()[:3], [1.0, 2.0], good()[4])


def test_lean_import_and_named_error_without_extension():
    """Importing pissa_svd loads no native module and touches no CUDA; asking for the native
    backend when it is disabled names the reason."""
    code = (
        "import sys, torch, pissa_svd\n"
        "assert 'pissa_svd._native' not in sys.modules\n"
        "assert 'pissa_svd._native_cuda' not in sys.modules\n"
        "assert not torch.cuda.is_initialized()\n"
        "W = torch.randn(40, 30)\n"
        "pissa_svd.svd_lowrank(W, 4)  # auto works without the extension\n"
        "try:\n"
        "    pissa_svd.svd_lowrank(W, 4, backend='native')\n"
        "except RuntimeError as e:\n"
        "    print(type(e).__name__, e)\n"
    )
    env = {**os.environ, "PISSA_SVD_NO_EXT": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "NativeUnavailable" in out.stdout and "PISSA_SVD_NO_EXT=1" in out.stdout


def test_gesvdr_needs_cuda():
    with pytest.raises(ValueError, match="gesvdr"):
        svd_lowrank(torch.randn(50, 40), 4, method="gesvdr")


@CUDA
@pytest.mark.parametrize("method", [*METHODS, "gesvdr"])
def test_cuda_native_matches_torch(method):
    assert native.available("cuda")[0], native.available("cuda")[1]
    W, s = known(600, 1000, decay=1.0, seed=3)
    W = torch.stack([W, W.flip(0)]).float().cuda()
    r = 32
    t = svd_lowrank(
        W,
        r,
        niter=4,
        method="exact" if method == "gesvdr" else method,
        seed=[1, 2],
        backend="torch",
    )
    n = svd_lowrank(W, r, niter=4, method=method, seed=[1, 2], backend="native")
    # gesvdr is one block with its own (unseeded) sketch, compared with the exact SVD: on this
    # spectrum (s_i = 1/i, a 3% gap at the rank) a one-block sketch gets the trailing vectors
    # of the top 32 only roughly (cosines down to 0.996 for 1 in 10 matrices on a CPU) and
    # the values within 0.2%; the leading 16 converge.
    k, rtol = (16, 5e-3) if method == "gesvdr" else (r, 1e-3)
    torch.testing.assert_close(n[1], t[1], rtol=rtol, atol=1e-4)
    for i in range(2):
        assert principal_cosines(t[0][i][:, :k], n[0][i][:, :k]).min() > 1 - 1e-3


@CUDA
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(1, 600, 1000), (2, 600, 1000), (2, 1000, 600)])
@pytest.mark.parametrize("method", [*METHODS, "gesvdr"])
def test_cuda_engine_itself_passes_its_checks(method, shape, dtype):
    """The CUDA engine's own results, without the torch path's redo of flagged matrices
    (svd_lowrank would hide a broken engine): every status 0 and every check passed, for
    one matrix (SYRK Gram) and a batch (batched GEMM Gram), tall and wide (the flip)."""
    b, m, n = shape
    # s_i = i^-0.5: the CPU engine passes its checks on these for every method (on s_i = 1/i,
    # fp32 CholeskyQR fails for halko/krylov2/krylov3 on CPU too, and the torch path redoes
    # them, by design).
    W = torch.stack([known(m, n, decay=0.5, seed=i)[0] for i in range(b)]).to("cuda", dtype)
    r, p = 24, 8
    omega = None
    if method != "gesvdr" and method != "exact":
        omega = linalg._gaussian(list(range(b)), max(m, n), r + p, W)
    U, S, Vh, bad = native.svd(W.contiguous(), r, 4, method, omega, p)
    assert bad == [], f"{method} {shape} {dtype}: matrices {bad} failed the engine's checks"
    ref = torch.linalg.svdvals(W.double())[:, :r]
    loose = method in ("halko", "gesvdr")  # one block: ~1% on this flat spectrum
    torch.testing.assert_close(S.double(), ref, rtol=3e-2 if loose else 3e-3, atol=0)


@CUDA
@pytest.mark.parametrize("method", ["krylov2", "krylov3"])
def test_cuda_bf16_sketch_is_as_accurate(method):
    """The bf16 sketch on a GPU (bf16 GEMMs with fp32 output, linalg._bf16_matmul_f32): as
    close to the fp32 sketch's error as on a CPU."""
    from .test_linalg import llm_like

    W, s = llm_like(640, 900)
    W, s = W.cuda(), s.cuda()
    # Summed over 8 sketches: one sketch's ratio varies (krylov2 up to 1.57 in 24 seeds on a
    # CPU; groups of 4 seeds at most 1.20).
    full = half = 0.0
    for seed in range(5, 13):
        full += excess_error(W.double(), s, *svd_lowrank(W, 32, method=method, seed=seed))
        low = svd_lowrank(W, 32, method=method, seed=seed, sketch_dtype=torch.bfloat16)
        half += excess_error(W.double(), s, *low)
    assert 0 <= half <= full * (1.3 if method == "krylov2" else 1.05) + 1e-6


@CUDA
def test_cuda_engine_on_an_llm_shape():
    """Four 4096 x 11008 fp32 weights (LLaMA-2-7B's MLP) in one call: no matrix flagged."""
    g = torch.Generator(device="cuda").manual_seed(0)
    W = torch.randn(4, 4096, 11008, device="cuda", generator=g)
    W[:, :, :64] *= 50  # a dominant block, as real weights have
    omega = linalg._gaussian([0, 1, 2, 3], 11008, 64, W)
    U, S, Vh, bad = native.svd(W, 64, 4, "krylov2", omega, 0)
    assert bad == []
    assert torch.isfinite(S).all()


@CUDA
def test_cuda_native_runs_on_the_current_stream():
    W = torch.randn(4, 512, 768, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())  # W is made on the default stream
    with torch.cuda.stream(stream):
        U, S, Vh = svd_lowrank(W, 16, backend="native", seed=[0, 1, 2, 3])
    stream.synchronize()
    ref = svd_lowrank(W, 16, backend="torch", seed=[0, 1, 2, 3])
    torch.testing.assert_close(S, ref[1], rtol=1e-3, atol=1e-3)


@pytest.mark.slow
def test_native_error_on_real_smollm2_weights(smollm2):
    """Real weights, all 7 projection types of two layers: the native engine's excess error is
    the torch path's within 20% (same sketch: they should agree far closer than that)."""
    from .test_decompose import load_state

    state = load_state(smollm2)
    names = [
        n
        for n in state
        if n.startswith(("model.layers.0.", "model.layers.15.")) and n.endswith("proj.weight")
    ]
    assert len(names) == 14
    for name in names:
        W = state[name].double()
        s = torch.linalg.svdvals(W)
        for method in ("halko", "krylov"):
            t = svd_lowrank(W.float(), 32, method=method, seed=7, backend="torch")
            n = svd_lowrank(W.float(), 32, method=method, seed=7, backend="native")
            et, en = excess_error(W, s, *t), excess_error(W, s, *n)
            assert abs(en - et) <= 0.2 * et + 1e-6, (name, method, et, en)


# --- fused conversion with the sum of squares (native.copy_rows) ---------------------------


def special_values(rows: int, cols: int, seed: int) -> torch.Tensor:
    """fp32 (rows, cols) over many magnitudes, starting with infinities, NaN, the largest finite
    value, subnormals, signed zeros and exact bf16 rounding ties."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g) * torch.logspace(-40, 38, cols)
    special = [float("inf"), -float("inf"), float("nan"), 3.4028235e38, 1e-45, -0.0, 0.0]
    ties = [1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 1 + 2**-9, 2**-126 * (1 + 2**-8)]
    values = torch.tensor(special + ties)
    x.view(-1)[: len(values)] = values  # needs rows * cols >= 12
    return x


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bits where b is not NaN, NaN where it is."""
    nan = torch.isnan(b)
    ints = {2: torch.int16, 4: torch.int32}[a.element_size()]
    return torch.equal(a.view(ints)[~nan], b.view(ints)[~nan]) and bool(torch.isnan(a[nan]).all())


@pytest.mark.parametrize("cols", [1, 7, 8, 77, 2048])
def test_copy_rows_writes_the_bits_copy_writes(cols):
    x = special_values(16, cols, seed=cols)
    rounded = torch.empty(16, cols, dtype=torch.bfloat16)
    assert native.copy_rows(rounded, x) is not None
    assert same_bits(rounded, x.to(torch.bfloat16))  # round to nearest, ties to even
    wide = linalg.padded_empty((16, cols), torch.float32)  # padded rows, as decompose's
    assert native.copy_rows(wide, rounded) is not None
    assert same_bits(wide, rounded.float())
    again = torch.empty(16, cols)
    assert native.copy_rows(again, wide) is not None and same_bits(again, wide)


@pytest.mark.parametrize("pair", ["widen", "round", "copy"])
def test_copy_rows_sums_squares_exactly_whatever_the_threads(pair):
    """The sum of squares of the fp32 side is accumulated in fp64 (torch's row norms drift by
    ~1e-7 to 1e-6 relative at these sizes) and has the same bits on 1, 2 or 3 threads."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(1500, 2100, generator=g)  # 3M elements: up to 3 threads
    src = {"widen": x.to(torch.bfloat16), "round": x, "copy": x}[pair]
    dst = torch.empty_like(x, dtype=torch.float32 if pair != "round" else torch.bfloat16)
    fp32 = src.float() if pair == "widen" else x
    exact = float(fp32.double().square().sum())
    fused = native.module("cpu").copy_rows
    sums = {t: fused(src, dst, t) for t in (1, 2, 3)}
    assert sums[1] == sums[2] == sums[3]
    assert abs(sums[1] / exact - 1) < 1e-13
    assert torch.equal(dst, src.to(dst.dtype))


def test_copy_rows_declines_what_it_does_not_fuse():
    """None (the caller then uses torch) for other dtypes, layouts and shapes."""
    x = torch.randn(6, 8)
    assert native.copy_rows(torch.empty(6, 8, dtype=torch.float16), x) is None
    assert native.copy_rows(torch.empty(6, 8, dtype=torch.float64), x) is None
    assert native.copy_rows(torch.empty(8, 6).mT, x) is None  # column-major destination
    assert native.copy_rows(torch.empty(6, 8), torch.randn(6, 10)[:, :8]) is not None  # padded
    assert native.copy_rows(torch.empty(6, 4), x[:, ::2]) is None  # strided columns
    assert native.copy_rows(torch.empty(2, 6, 8), x.expand(2, 6, 8)) is None
    assert native.copy_rows(torch.empty(6, 9), x) is None


def test_rows_contiguous_is_the_layout_blas_and_the_loops_take():
    x = torch.zeros(3, 6, 10)
    assert native.rows_contiguous(x) and native.rows_contiguous(x[:, :, :8])  # padded rows
    assert not native.rows_contiguous(x.mT)  # column-major
    assert not native.rows_contiguous(x[:, :, ::2])  # strided columns
    assert not native.rows_contiguous(x.view(-1).as_strided((6, 8), (4, 1)))  # rows overlap
    assert not native.rows_contiguous(torch.zeros(8))
    assert native.rows_contiguous(torch.zeros(1, 8).as_strided((1, 8), (1, 1)))  # one row


def test_copy_rows_validates_arguments_by_name():
    fused = native.module("cpu").copy_rows
    with pytest.raises(ValueError, match="^dst: shape \\(6, 9\\) differs from src's \\(6, 8\\)"):
        fused(torch.randn(6, 8), torch.empty(6, 9))
    with pytest.raises(ValueError, match="^src, dst: supported dtypes"):
        fused(torch.randn(6, 8).half(), torch.empty(6, 8))
    with pytest.raises(ValueError, match="^src: expected 2 dimensions"):
        fused(torch.randn(2, 6, 8), torch.empty(6, 8))
    with pytest.raises(ValueError, match="^dst: rows must be contiguous"):
        fused(torch.randn(6, 8), torch.empty(8, 6).mT)


def test_copy_rows_is_what_the_pipeline_uses_and_changes_no_bit(tmp_path, monkeypatch):
    """decompose widens and rounds through the fused loop, and writes the same bytes as with
    torch's copies; the reported norms agree to torch's accuracy."""
    import json

    from pissa_svd.pipeline import decompose

    from .conftest import save_tiny_llama
    from .test_overlap import _files

    src = save_tiny_llama(tmp_path / "ckpt", torch.bfloat16, num_hidden_layers=2)
    calls = []
    fused = native.copy_rows

    def spy(dst, s):
        got = fused(dst, s)
        calls.append((s.dtype, dst.dtype, got is not None))
        return got

    monkeypatch.setattr(native, "copy_rows", spy)
    decompose(src, tmp_path / "fused", rank=4, quiet=True)
    assert (torch.bfloat16, torch.float32, True) in calls  # widening
    assert (torch.float32, torch.bfloat16, True) in calls  # rounding the residual
    monkeypatch.setattr(native, "copy_rows", lambda dst, s: None)
    decompose(src, tmp_path / "torch", rank=4, quiet=True)
    assert _files(tmp_path / "fused") == _files(tmp_path / "torch")
    reports = [
        json.loads((tmp_path / d / "pissa_report.json").read_text()) for d in ("fused", "torch")
    ]
    for a, b in zip(reports[0]["matrices"], reports[1]["matrices"], strict=True):
        for key in ("weight_norm", "residual_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-5)


def test_bf16_matmul_sums_in_fp32():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(2, 300, 500, generator=g).to(torch.bfloat16)
    B = torch.randn(2, 500, 24, generator=g).to(torch.bfloat16)
    out = torch.empty(2, 300, 24)
    if not native.bf16_matmul(X, B, out):  # no MKL bf16 GEMM in this torch build
        assert native._bf16_gemm_fn() is None
        return
    ref = X.double() @ B.double()  # bf16 products are exact in fp32: only the sums round
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-4)
    # A transposed view (Xᵀ @ Q, as the power iteration runs it), one matrix, padded rows.
    Q = torch.randn(300, 24, generator=g).to(torch.bfloat16)
    outT = torch.empty(500, 40)[:, :24]
    assert native.bf16_matmul(X[0].mT, Q, outT)
    torch.testing.assert_close(outT.double(), X[0].double().mT @ Q.double(), rtol=0, atol=1e-4)
    # Not for it: another dtype, a non-unit column stride in B, mismatched shapes.
    assert not native.bf16_matmul(X.float(), B, out)
    assert not native.bf16_matmul(X, B.mT.contiguous().mT, out)
    assert not native.bf16_matmul(X, B[:, :400], out)
    assert not native.bf16_matmul(X, B, torch.empty(2, 300, 16))


def test_a_module_left_from_an_earlier_build_is_not_loaded_after_a_failed_one(monkeypatch):
    """An editable install survives a failed compile; the .so of a previous build must then not
    run as if it were this source's."""
    monkeypatch.setattr(native, "_loaded", {})
    monkeypatch.setattr(native, "build_info", lambda: {"cpu": "failed: CompileError: ..."})
    ok, why = native.available("cpu")
    assert not ok and "failed to build (failed: CompileError" in why
