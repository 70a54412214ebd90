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

from pissa_svd import native
from pissa_svd.linalg import svd_lowrank

from .test_linalg import excess_error, known

NO_EXT = os.environ.get("PISSA_SVD_NO_EXT") == "1"
pytestmark = pytest.mark.skipif(NO_EXT, reason="PISSA_SVD_NO_EXT=1: extension not built")
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
METHODS = ["halko", "krylov", "krylov2", "exact"]
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
    torch.testing.assert_close(n[1], t[1], rtol=1e-3, atol=1e-4)
    for i in range(2):
        assert principal_cosines(t[0][i], n[0][i]).min() > 1 - 1e-3


@CUDA
def test_cuda_native_runs_on_the_current_stream():
    W = torch.randn(4, 512, 768, device="cuda")
    stream = torch.cuda.Stream()
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
