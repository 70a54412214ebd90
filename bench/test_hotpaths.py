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

from pissa_svd import checkpoint
from pissa_svd.checkpoint import StreamingWriter
from pissa_svd.linalg import _small_svd, _small_svd_qr, orthonormalize, svd_lowrank

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


@pytest.mark.parametrize("method", ["halko", "krylov"])
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


@pytest.mark.parametrize("mode", ["fallocate", "sparse", "direct"])
def test_streaming_write(benchmark, tmp_path, weight, mode, monkeypatch):
    """``fallocate``: the page cache, file allocated up front (sequential pipeline);
    ``sparse``: the same into an ftruncate'd file (the old way); ``direct``: whole pages with
    O_DIRECT from a staging buffer aligned to the file offset (overlapped CPU pipeline).
    Besides the wall time, records the process CPU time per write (``cpu_ms``): a direct
    write's wall time is the disk's, which a background writer hides, its CPU time is not."""
    if mode == "sparse":
        monkeypatch.setattr(checkpoint, "_reserve", lambda fd, size: os.ftruncate(fd, size))
    W = weight[0].bfloat16()
    path = tmp_path / "w.safetensors"
    entries = [("w", "BF16", tuple(W.shape))]
    staged = W
    if mode == "direct":
        with StreamingWriter(path, entries, {"format": "pt"}) as w:
            offset = w.offset("w")
            w.write("w", W)
        buf = torch.empty(W.nbytes + 2 * checkpoint.DIRECT_ALIGN, dtype=torch.uint8)
        staged = checkpoint.direct_view(buf, 0, offset, W.dtype, tuple(W.shape))[0].copy_(W)
    cpu = []

    def write():
        c0 = time.process_time()
        with StreamingWriter(path, entries, {"format": "pt"}, direct=mode == "direct") as w:
            w.write("w", staged)
        cpu.append(time.process_time() - c0)

    benchmark(write)
    benchmark.extra_info["cpu_ms"] = round(1e3 * statistics.median(cpu), 2)
    from safetensors.torch import load_file

    assert torch.equal(load_file(path)["w"], W)
