"""The overlapped pipeline (background read and write threads): same bytes, same failures."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from pissa_svd import checkpoint, pipeline
from pissa_svd.pipeline import Options, decompose, make_plan

from .conftest import direct_write_spy, save_tiny_llama


def _files(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*.safetensors"))}


@pytest.fixture(scope="module")
def bf16_shards(tmp_path_factory):
    """A bf16 tiny Llama in several shards: batches of 2-4 same-shape matrices per shard."""
    return save_tiny_llama(
        tmp_path_factory.mktemp("ovl") / "ckpt", torch.bfloat16, num_hidden_layers=4
    )


def test_overlap_is_the_default_and_costs_two_buffers(bf16_shards, tmp_path):
    plan = make_plan(bf16_shards, tmp_path / "o", Options(rank=4))
    assert plan.overlap and plan.direct_io  # CPU: direct writes
    seq = make_plan(bf16_shards, tmp_path / "o", Options(rank=4, overlap="off"))
    assert not seq.overlap and not seq.direct_io
    assert plan.working_bytes > seq.working_bytes  # two read and two output buffers


def test_cpu_loads_map_the_page_cache_and_gpu_loads_read(bf16_shards, tmp_path, monkeypatch):
    """A CPU run views each weight in its file (no copy); a GPU run reads the batch into one
    (pinned) scratch buffer. Both give the stored tensors."""
    plan = make_plan(bf16_shards, tmp_path / "o", Options(rank=4))
    batch = max(plan.batches, key=len)
    ref = [checkpoint.read_tensor(t.info) for t in batch]
    scratch = pipeline._Scratch()
    mapped = pipeline._load(plan, batch, scratch, "read0")
    assert all(torch.equal(a, b) for a, b in zip(mapped, ref, strict=True))
    assert "read0" not in scratch._bufs  # nothing was copied into a buffer
    monkeypatch.setattr(pipeline.Plan, "device_kind", property(lambda self: "cuda"))
    read = pipeline._load(plan, batch, scratch, "read0")
    assert all(torch.equal(a, b) for a, b in zip(read, ref, strict=True))
    buf = scratch._bufs["read0"]  # one buffer holds the whole batch, members back to back
    assert buf.numel() == sum(t.info.nbytes for t in batch)
    assert read[-1].data_ptr() == buf.data_ptr() + buf.numel() - batch[-1].info.nbytes


def test_working_buffers_have_padded_rows_and_are_reused():
    scratch = pipeline._Scratch()
    a = scratch.matrices("work", "F32", (2, 8, 2048))
    assert a.shape == (2, 8, 2048) and a.stride() == (8 * 2064, 2064, 1)
    b = scratch.matrices("work", "F32", (3, 4, 2048))  # smaller: the same memory
    assert b.data_ptr() == a.data_ptr() and b.stride(-2) == 2064


def _thp_mode() -> str:
    try:
        modes = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return "none"
    return modes.split("[")[1].split("]")[0] if "[" in modes else "none"


def _mapping_of(addr: int) -> dict[str, str]:
    """The /proc/self/smaps entry (its fields) of the mapping holding ``addr``."""
    entry, inside = {}, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(x, 16) for x in head.split("-"))
            if inside:
                break
            inside = lo <= addr < hi
        elif inside:
            key, _, value = line.partition(":")
            entry[key] = value.strip()
    return entry


def test_scratch_buffers_are_advised_for_huge_pages(monkeypatch):
    scratch = pipeline._Scratch()
    buf = scratch.get("work", 5 << 20)
    assert buf.dtype == torch.uint8 and buf.numel() == 5 << 20
    buf.fill_(7)  # writable, and the mapping lives as long as the tensor
    assert int(buf.sum()) == 7 * (5 << 20)
    if _thp_mode() in ("always", "madvise"):
        # the kernel may back it with 2 MB pages (whether it does depends on free memory)
        assert _mapping_of(buf.data_ptr()).get("THPeligible") == "1"
    small = pipeline.huge_page_buffer(4096)  # under one huge page: a plain allocation
    assert small.numel() == 4096
    # where the platform has no MADV_HUGEPAGE, it is torch.empty
    monkeypatch.delattr(pipeline.mmap, "MADV_HUGEPAGE", raising=False)
    assert pipeline.huge_page_buffer(5 << 20).numel() == 5 << 20


def test_padded_working_rows_write_the_same_bytes(bf16_shards, tmp_path, monkeypatch):
    """The tiny model's rows are too short to be padded by default; force a padding and check
    the SVD sees it and the output does not change by a bit."""
    from pissa_svd import linalg

    plain, padded = tmp_path / "plain", tmp_path / "padded"
    decompose(bf16_shards, plain, rank=4, quiet=True)
    seen = []
    svd = pipeline.svd_lowrank

    def spy(W, *a, **k):
        seen.append(W)
        return svd(W, *a, **k)

    monkeypatch.setattr(linalg, "padded_stride", lambda cols, itemsize: cols + 16)
    monkeypatch.setattr(pipeline, "svd_lowrank", spy)
    decompose(bf16_shards, padded, rank=4, quiet=True)
    assert seen and all(W.stride(-1) == 1 or W.stride(-2) == 1 for W in seen)
    assert all(max(W.stride()[-2:]) == W.shape[-1 if W.stride(-1) == 1 else -2] + 16 for W in seen)
    assert _files(plain) == _files(padded)


@pytest.mark.parametrize("batch_memory", [None, 0])
def test_overlap_writes_the_same_bytes(bf16_shards, tmp_path, batch_memory, monkeypatch):
    """Overlapped on CPU, the residuals' whole pages go to the disk with O_DIRECT, from
    staging buffers aligned to their file offsets: the files are byte-identical."""
    off, on = tmp_path / "off", tmp_path / "on"
    kw = dict(rank=4, batch_memory=batch_memory, quiet=True)
    decompose(bf16_shards, off, overlap="off", **kw)
    assert make_plan(bf16_shards, on, Options(rank=4, overlap="on")).direct_io
    monkeypatch.setattr(checkpoint, "DIRECT_MIN_BYTES", 4096)  # the tiny model's matrices
    direct = direct_write_spy(monkeypatch)
    report = decompose(bf16_shards, on, overlap="on", **kw)
    big = [r for r in report["matrices"] if math.prod(r["shape"]) * 2 >= 3 * 4096]
    assert len(direct) >= len(big) > 0  # every such matrix has >= 1 whole page in the file
    assert len(report["matrices"]) == 28
    if batch_memory is None:
        assert max(r["batch"] for r in report["matrices"]) >= 2
    a, b = _files(off), _files(on)
    assert a.keys() == b.keys() and len(a) >= 3
    for k in a:
        assert a[k] == b[k], k


def test_failure_while_a_write_is_in_flight_keeps_only_written_tensors(
    bf16_shards, tmp_path, monkeypatch
):
    """Batch 4's SVD fails while batch 3 is being written: the error surfaces, the journal
    holds exactly the batches whose bytes are in place, and --resume (which re-reads and
    checks them) completes them to the bytes of an uninterrupted run. Written directly."""
    monkeypatch.setattr(checkpoint, "DIRECT_MIN_BYTES", 4096)
    direct = direct_write_spy(monkeypatch)
    real, calls = pipeline.svd_lowrank, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("injected failure")
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "svd_lowrank", failing)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="injected failure"):
        decompose(bf16_shards, out, rank=4, overlap="on", batch_memory=0, quiet=True)
    assert not out.exists()
    journal = tmp_path / ".out.partial" / ".pissa_progress" / "rank-0.jsonl"
    assert journal.read_text().count("\n") == 3  # batches 1-3, one matrix each
    assert direct  # the journaled tensors went to the disk with O_DIRECT

    monkeypatch.setattr(pipeline, "svd_lowrank", real)
    report = decompose(
        bf16_shards, out, rank=4, overlap="on", batch_memory=0, resume=True, quiet=True
    )
    assert report["totals"]["resumed"] == 3
    clean = tmp_path / "clean"
    decompose(bf16_shards, clean, rank=4, overlap="off", batch_memory=0, quiet=True)
    assert _files(clean) == _files(out)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_overlap_matches_sequential_and_verifies(bf16_shards, tmp_path):
    """On a GPU the default overlaps (pinned read buffers, H2D/D2H around the batched SVD): the bytes
    equal a sequential CUDA run's, and verify() accepts the output against the source."""
    from pissa_svd.convert import verify

    assert make_plan(bf16_shards, tmp_path / "o", Options(rank=4, device="cuda")).overlap
    on, off = tmp_path / "on", tmp_path / "off"
    decompose(bf16_shards, on, rank=4, device="cuda", quiet=True)
    decompose(bf16_shards, off, rank=4, device="cuda", overlap="off", quiet=True)
    assert _files(on) == _files(off)
    assert verify(bf16_shards, on).passed
