"""pytest-benchmark timings of the engine's hot paths, each checked for correctness after timing.

Run (not part of the test suite):

    python -m pytest bench/test_hotpaths.py --benchmark-only -p no:cacheprovider

Shapes are one LLM MLP projection (2048 x 5632, fp32, rank 64, niter 4), with a decaying
spectrum so that accuracy differences show.
"""

from __future__ import annotations

import os
import statistics
import time

import pytest
import torch

from pissa_svd import checkpoint, linalg
from pissa_svd.checkpoint import StreamingWriter
from pissa_svd.linalg import _small_svd, _small_svd_qr, orthonormalize, svd_lowrank
from pissa_svd.pissa import adapter_factors, subtract_adapter_

M, N, RANK = 2048, 5632, 64


@pytest.fixture(scope="module")
def weight():
    g = torch.Generator().manual_seed(0)
    U = torch.linalg.qr(torch.randn(M, M, generator=g)).Q
    V = torch.linalg.qr(torch.randn(N, M, generator=g)).Q
    s = torch.arange(1, M + 1, dtype=torch.float32) ** -0.6
    return (U * s) @ V.T, s


def excess(W, s, U, S, Vh) -> float:
    opt = torch.linalg.vector_norm(s[RANK:].double())
    return float(torch.linalg.matrix_norm(W.double() - (U * S) @ Vh) / opt - 1)


@pytest.mark.parametrize("method", ["halko", "krylov", "krylov2"])
def test_svd_lowrank(benchmark, weight, method):
    W, s = weight
    U, S, Vh = benchmark(svd_lowrank, W, RANK, niter=4, method=method)
    U0, S0, V0 = torch.svd_lowrank(W, q=RANK, niter=4)
    assert excess(W, s, U, S, Vh) < excess(W, s, U0, S0, V0.mT)


def test_peft_svd_lowrank(benchmark, weight):
    W, s = weight
    U, S, V = benchmark(torch.svd_lowrank, W, q=RANK, niter=4)
    assert excess(W, s, U, S, V.mT) < 0.05


def test_orthonormalize(benchmark):
    Y = torch.randn(N, RANK + 16, generator=torch.Generator().manual_seed(1))
    Q = benchmark(orthonormalize, Y)
    torch.testing.assert_close(Q.T @ Q, torch.eye(RANK + 16), atol=1e-5, rtol=0)


def test_householder_qr(benchmark):
    Y = torch.randn(N, RANK + 16, generator=torch.Generator().manual_seed(1))
    Q = benchmark(lambda: torch.linalg.qr(Y).Q)
    torch.testing.assert_close(Q.T @ Q, torch.eye(RANK + 16), atol=1e-5, rtol=0)


@pytest.mark.parametrize("route", ["eigh", "qr"])
def test_rayleigh_ritz(benchmark, weight, route):
    """The Rayleigh-Ritz step of krylov niter 4 on this matrix: a 5-block (320-column) basis."""
    W, s = weight
    g = torch.Generator().manual_seed(2)
    Q = torch.linalg.qr(W @ torch.randn(N, 5 * (RANK + 0), generator=g)).Q.unsqueeze(0)
    Bt = W.T @ Q[0]
    fn = _small_svd if route == "eigh" else _small_svd_qr
    U, S, Vh = benchmark(fn, Bt.unsqueeze(0), Q, RANK)
    ref = torch.linalg.svdvals(Bt.double())[:RANK]
    torch.testing.assert_close(S[0].double(), ref, rtol=1e-4, atol=0)
    torch.testing.assert_close(Vh[0] @ Vh[0].T, torch.eye(RANK), atol=1e-4, rtol=0)


WRITES = 40  # tensors per file: 920 MB of bf16, like a shard


@pytest.mark.parametrize("mode", ["fallocate", "sparse", "direct"])
def test_streaming_write(benchmark, tmp_path, weight, mode, monkeypatch):
    """One round writes a fresh file of ``WRITES`` 23 MB bf16 tensors, as decompose fills a
    shard (wall time per round; ``cpu_ms``: CPU time per tensor). ``fallocate``: through the
    page cache, the file allocated up front (the sequential pipeline); ``sparse``: the same
    into an ftruncate'd file (the old way); ``direct``: whole pages with O_DIRECT from a
    staging buffer aligned to each tensor's file offset (the overlapped CPU pipeline). A direct write's wall time is the
    disk's, which the background writer hides; CPU time would be taken from the compute."""
    if mode == "sparse":
        monkeypatch.setattr(checkpoint, "_reserve", lambda fd, size: os.ftruncate(fd, size))
    W = weight[0].bfloat16()
    path = tmp_path / "w.safetensors"
    entries = [(f"w{i}", "BF16", tuple(W.shape)) for i in range(WRITES)]
    buf = torch.empty(WRITES * (W.nbytes + 2 * checkpoint.DIRECT_ALIGN), dtype=torch.uint8)
    cpu = []

    def fresh():
        path.unlink(missing_ok=True)
        os.sync()  # the previous round's dirty pages are not this round's work

    staged = []  # each tensor's view, aligned to its file offset (the same in every round)
    with StreamingWriter(path, entries, {"format": "pt"}) as w:
        pos = 0
        for name, *_ in entries:
            view, pos = checkpoint.direct_view(buf, pos, w.offset(name), W.dtype, W.shape)
            staged.append(view.copy_(W))
            w.write(name, view)

    def write():
        c0 = time.process_time()
        with StreamingWriter(path, entries, {"format": "pt"}, direct=mode == "direct") as w:
            for (name, *_), view in zip(entries, staged, strict=True):
                w.write(name, view)
        cpu.append((time.process_time() - c0) / WRITES)

    benchmark.pedantic(write, setup=fresh, rounds=5, warmup_rounds=1)
    benchmark.extra_info["cpu_ms"] = round(1e3 * statistics.median(cpu), 2)
    benchmark.extra_info["tensors_per_round"] = WRITES
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        for name, *_ in entries:
            assert torch.equal(f.get_tensor(name), W)


LAYER = [
    (2048, 5632, 1),
    (5632, 2048, 2),
    (2048, 2048, 2),
    (256, 2048, 2),
]  # down, gate/up, q/o, k/v


def _power_both_sides(X, omega, niter, rank, depth):
    """The power iteration as it was before: Xᵀ Q_i orthonormalized too (for comparison)."""
    b, m, n = X.shape
    w = omega.shape[-1]
    d = min(depth, niter + 1)
    lead = niter + 1 - d
    Q = orthonormalize(X @ omega, rounds=1 if lead else 2)
    for i in range(lead):
        Z = orthonormalize(X.mT @ Q, rounds=1)
        Q = orthonormalize(X @ Z, rounds=2 if i == lead - 1 else 1)
    K, P = X.new_empty((b, m, d * w)), X.new_empty((b, n, d * w))
    K[..., :w] = Q
    for i in range(1, d):
        Ki, prev = K[..., : i * w], K[..., (i - 1) * w : i * w]
        torch.matmul(X.mT, prev, out=P[..., (i - 1) * w : i * w])
        Y = X @ orthonormalize(P[..., (i - 1) * w : i * w])
        for _ in range(2):
            Y = Y - Ki @ (Ki.mT @ Y)
        K[..., i * w : (i + 1) * w] = orthonormalize(Y)
    torch.matmul(X.mT, K[..., (d - 1) * w :], out=P[..., (d - 1) * w :])
    return _small_svd(P, K, rank)


@pytest.mark.parametrize("orthonormalized", ["short_side", "both_sides"])
def test_layer_svd(benchmark, monkeypatch, orthonormalized):
    """The default SVD (krylov2, niter 4, rank 64) of one layer of the decompose benchmark's
    Llama (hidden 2048, MLP 5632, 4 KV heads): only the Q_i blocks orthonormalized (now), or
    the Xᵀ Q_i products too (before)."""
    if orthonormalized == "both_sides":
        monkeypatch.setattr(linalg, "_block_krylov", _power_both_sides)
    g = torch.Generator().manual_seed(3)
    mats = [(torch.randn(m, n, generator=g) * 0.02, c) for m, n, c in LAYER]

    def layer():
        return [svd_lowrank(W, RANK, niter=4) for W, c in mats for _ in range(c)]

    out = benchmark(layer)
    each = [W for W, c in mats for _ in range(c)]
    for W, (_, S, _) in zip(each, out, strict=True):
        ref = torch.linalg.svdvals(W)[:RANK]
        # Ritz values never exceed the true ones; four iterations get close on noise.
        assert bool((S - ref * (1 + 1e-4)).amax() <= 0) and bool((S - 0.9 * ref).amin() >= 0)


@pytest.mark.parametrize("route", ["fused", "separate"])
def test_residual(benchmark, weight, route):
    """W_res = W - B A in place, rounded to bf16 into an output buffer, and its norm:
    ``subtract_adapter_`` (the GEMM, then rounding and norm block by block, each block read
    from cache for the norm) or the three as whole-matrix passes."""
    W0 = weight[0]
    U, S, Vh = svd_lowrank(W0, RANK, niter=1)
    A, B = adapter_factors(U, S, Vh, scaling=1.0, adapter_dtype=torch.bfloat16)
    W, out = W0.clone(), torch.empty(W0.shape, dtype=torch.bfloat16)

    def fused():
        W.copy_(W0)
        return float(subtract_adapter_(W, A, B, scaling=1.0, out=out))

    def separate():
        W.copy_(W0)
        W.addmm_(B.float(), A.float(), alpha=-1.0)
        out.copy_(W)
        return float(torch.linalg.vector_norm(W)) ** 2  # as the pipeline did

    sumsq = benchmark(fused if route == "fused" else separate)
    ref = W0.double() - B.double() @ A.double()
    assert abs(sumsq / float(ref.square().sum()) - 1) < (1e-5 if route == "fused" else 1e-3)
    torch.testing.assert_close(out.double(), ref, atol=2e-3, rtol=1e-2)


@pytest.mark.parametrize("route", ["mmap_blocked", "pread_separate"])
def test_load(benchmark, tmp_path, weight, route):
    """A bf16 tensor from a (page-cached) file to fp32 with its norm: viewing the file through
    mmap and widening block by block, the norm reading each block from cache (the CPU
    pipeline now), or reading into a buffer, widening, then a norm pass (before)."""
    from safetensors.torch import save_file

    from pissa_svd.pipeline import _widen_

    Wb = weight[0].bfloat16()
    save_file({"w": Wb}, tmp_path / "w.safetensors")
    info = checkpoint.SafetensorsFile.open(tmp_path / "w.safetensors").tensors["w"]
    dst, buf = torch.empty(Wb.shape), torch.empty(info.nbytes, dtype=torch.uint8)

    def mmap_blocked():
        return float(_widen_(dst, checkpoint.map_tensor(info)))

    def pread_separate():
        dst.copy_(checkpoint.read_tensor(info, buf))
        return float(torch.linalg.vector_norm(dst)) ** 2  # as the pipeline did

    sumsq = benchmark(mmap_blocked if route == "mmap_blocked" else pread_separate)
    assert torch.equal(dst, Wb.float())
    ref = float(Wb.double().square().sum())
    assert abs(sumsq / ref - 1) < (1e-5 if route == "mmap_blocked" else 1e-3)
