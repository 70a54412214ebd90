"""Safetensors reading/writing: round trips with the reference library, and validation."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from pissa_svd import checkpoint
from pissa_svd.checkpoint import (
    INDEX_NAME,
    Checkpoint,
    SafetensorsFile,
    StreamingWriter,
    read_tensor,
)
from pissa_svd.errors import InputError

from .conftest import direct_write_spy


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(5, 7, generator=g),
        "b.weight": torch.randn(3, 4, generator=g).to(torch.bfloat16),
        "c.ids": torch.arange(6, dtype=torch.int64),
        "d.empty": torch.zeros(0, 3),
        "e.half": torch.randn(2, 2, generator=g).half(),
    }


def test_reads_every_dtype_like_safetensors(tmp_path):
    path = tmp_path / "m.safetensors"
    ref = _tensors()
    save_file(ref, path, metadata={"format": "pt"})
    f = SafetensorsFile.open(path)
    assert f.metadata == {"format": "pt"}
    assert set(f.tensors) == set(ref)
    for name, t in ref.items():
        got = f.read(name)
        assert got.dtype == t.dtype and got.shape == t.shape
        assert torch.equal(got, t)


def test_map_tensor_views_the_file_like_read_tensor(tmp_path):
    path = tmp_path / "m.safetensors"
    ref = _tensors()
    save_file(ref, path, metadata={"format": "pt"})
    f = SafetensorsFile.open(path)
    for name, t in ref.items():
        got = checkpoint.map_tensor(f.tensors[name])  # offsets not page aligned: 8 + header
        assert got.dtype == t.dtype and got.shape == t.shape
        assert torch.equal(got, t) and torch.equal(got, read_tensor(f.tensors[name]))
    # A file cut short after it was opened: an error naming the tensor, not a SIGBUS.
    info = f.tensors["a.weight"]
    os.truncate(path, info.end - 1)
    with pytest.raises(InputError, match=r"truncated while reading a\.weight"):
        checkpoint.map_tensor(info)
    path.unlink()
    with pytest.raises(InputError, match="file not found"):
        checkpoint.map_tensor(info)


def test_prefetch_hints_the_whole_range_one_readahead_window_at_a_time():
    """One MADV_WILLNEED starts at most one readahead window, so map_tensor hints each."""
    import mmap

    calls = []

    class Mapping:
        def __len__(self):
            return 5 * 4096 + 100

        def madvise(self, option, start, length):
            calls.append((option, start, length))

    checkpoint._prefetch(Mapping(), 2 * 4096 + 5)  # a window is whole pages
    assert calls == [
        (mmap.MADV_WILLNEED, 0, 8192),
        (mmap.MADV_WILLNEED, 8192, 8192),
        (mmap.MADV_WILLNEED, 16384, 4196),
    ]


def test_readahead_window_of_a_files_device(tmp_path):
    (tmp_path / "f").write_bytes(b"x")
    window = checkpoint.readahead_bytes(os.stat(tmp_path / "f").st_dev)
    assert window % 1024 == 0 and window >= 4096  # read_ahead_kb, or the 128 KB default
    assert checkpoint.readahead_bytes(os.makedev(0, 0xFFFFF)) == checkpoint.DEFAULT_READAHEAD


def test_streaming_writer_output_loads_in_safetensors(tmp_path):
    src = tmp_path / "src.safetensors"
    ref = _tensors()
    save_file(ref, src)
    f = SafetensorsFile.open(src)
    infos = list(f.tensors.values())
    entries = [(i.name, i.dtype, i.shape) for i in infos]
    out = tmp_path / "out.safetensors"
    with StreamingWriter(out, entries, {"format": "pt", "k": "v"}) as w:
        w.copy(infos[:2])  # a contiguous run copied byte for byte
        w.write(infos[2].name, read_tensor(infos[2]))
        w.copy(infos[3:])
    with safe_open(out, "pt") as g:
        assert g.metadata() == {"format": "pt", "k": "v"}
        for name, t in ref.items():
            assert torch.equal(g.get_tensor(name), t)
    assert struct.unpack("<Q", out.read_bytes()[:8])[0] % 8 == 0  # header padded to 8 bytes


def test_writer_any_order_same_bytes_and_rejects_misuse(tmp_path):
    entries = [("x", "F32", (2, 2)), ("y", "F32", (3,)), ("z", "BF16", (4,))]
    x, y, z = torch.arange(4.0).view(2, 2), torch.ones(3), torch.full((4,), 2.0).bfloat16()
    with StreamingWriter(tmp_path / "a.safetensors", entries) as w:
        w.write("x", x), w.write("y", y), w.write("z", z)
    w = StreamingWriter(tmp_path / "b.safetensors", entries)
    w.write("z", z)
    w.write("x", x)
    with pytest.raises(RuntimeError, match="written twice"):
        w.write("x", x)
    with pytest.raises(RuntimeError, match="not in the header"):
        w.write("q", x)
    with pytest.raises(RuntimeError, match="header says"):
        w.write("y", torch.zeros(4))
    with pytest.raises(RuntimeError, match="closed after 2/3"):
        w.close()
    w = StreamingWriter(tmp_path / "b.safetensors", entries)
    w.write("y", y), w.write("z", z), w.write("x", x)
    w.close()
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


def _aligned_copy(t: torch.Tensor, offset: int) -> torch.Tensor:
    """A copy of ``t`` staged for a direct write at file ``offset``."""
    buf = torch.empty(t.nbytes + 2 * checkpoint.DIRECT_ALIGN, dtype=torch.uint8)
    return checkpoint.direct_view(buf, 0, offset, t.dtype, tuple(t.shape))[0].copy_(t)


def test_direct_writes_give_the_same_bytes_and_fall_back(tmp_path, monkeypatch):
    """Large tensors at unaligned offsets: O_DIRECT writes the whole pages of those whose
    memory is congruent to their offset, the page cache the rest; the bytes never differ."""
    monkeypatch.setattr(checkpoint, "DIRECT_MIN_BYTES", 4 * checkpoint.DIRECT_ALIGN)
    g = torch.Generator().manual_seed(0)
    tensors = {
        "a": torch.randn(3, 5, generator=g),  # small: page cache
        "b": torch.randn(61, 173, generator=g),  # odd sizes: offsets off the page boundaries
        "c": torch.randn(97, 211, generator=g).bfloat16(),
        "d": torch.randn(45, 133, generator=g).half(),
    }
    entries = [(k, checkpoint.torch_to_dtype(v.dtype), tuple(v.shape)) for k, v in tensors.items()]
    with StreamingWriter(tmp_path / "ref.safetensors", entries) as w:
        for k, v in tensors.items():
            w.write(k, v)
    ref = (tmp_path / "ref.safetensors").read_bytes()

    direct = direct_write_spy(monkeypatch)
    with StreamingWriter(tmp_path / "d.safetensors", entries, direct=True) as w:
        assert any(w.offset(k) % checkpoint.DIRECT_ALIGN for k in "bcd")
        for k in "abc":
            w.write(k, _aligned_copy(tensors[k], w.offset(k)))
        w.write("d", _aligned_copy(tensors["d"], w.offset("d") + 2))  # not congruent
    assert (tmp_path / "d.safetensors").read_bytes() == ref
    al = checkpoint.DIRECT_ALIGN
    pages = [(tensors[k].nbytes - (-w.offset(k) % al)) // al * al for k in "bc"]
    assert direct == pages  # exactly b's and c's whole pages went straight to the disk

    # A filesystem that rejects the direct write itself: the page cache from then on.
    real, rejected = checkpoint._pwrite_all, []

    def rejecting(fd, mv, offset):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            rejected.append(len(mv))
            raise OSError(errno.EINVAL, "Invalid argument")
        real(fd, mv, offset)

    monkeypatch.setattr(checkpoint, "_pwrite_all", rejecting)
    with StreamingWriter(tmp_path / "e.safetensors", entries, direct=True) as w:
        for k in "dcba":
            w.write(k, _aligned_copy(tensors[k], w.offset(k)))
    assert len(rejected) == 1  # tried once, then never again
    assert (tmp_path / "e.safetensors").read_bytes() == ref


def _write_raw(path, header: dict, data: bytes, pad=True, length=None):
    raw = json.dumps(header).encode()
    if pad:
        raw += b" " * (-len(raw) % 8)
    n = len(raw) if length is None else length
    path.write_bytes(struct.pack("<Q", n) + raw + data)
    return path


@pytest.mark.parametrize(
    ("header", "data", "length", "match"),
    [
        ({}, b"", 1 << 40, "header claims"),
        ({}, b"", 10_000, "truncated"),
        (
            {"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}},
            b"\0" * 4,
            None,
            "truncated",
        ),
        (
            {
                "x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "y": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
            },
            b"\0" * 12,
            None,
            "overlaps",
        ),
        (
            {"x": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}},
            b"\0" * 16,
            None,
            "unaccounted",
        ),
        (
            {"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}},
            b"\0" * 12,
            None,
            "trailing",
        ),
        (
            {"x": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}},
            b"\0" * 8,
            None,
            "needs 12",
        ),
        (
            {"x": {"dtype": "Q9", "shape": [2], "data_offsets": [0, 8]}},
            b"\0" * 8,
            None,
            "unknown dtype",
        ),
        (
            {"x": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}},
            b"\0" * 8,
            None,
            "data_offsets",
        ),
        ({"x": [1, 2]}, b"", None, "corrupt header entry"),
    ],
)
def test_corrupt_files_are_rejected_with_the_reason(tmp_path, header, data, length, match):
    path = _write_raw(tmp_path / "bad.safetensors", header, data, length=length)
    with pytest.raises(InputError, match=match) as exc:
        SafetensorsFile.open(path)
    assert str(path) in str(exc.value)


def test_garbage_header_is_corrupt(tmp_path):
    path = tmp_path / "g.safetensors"
    path.write_bytes(struct.pack("<Q", 8) + b"{not json")
    with pytest.raises(InputError, match="corrupt header"):
        SafetensorsFile.open(path)
    path.write_bytes(b"abc")
    with pytest.raises(InputError, match="too short"):
        SafetensorsFile.open(path)


def test_checkpoint_index_is_validated(tmp_path):
    save_file({"w": torch.zeros(2)}, tmp_path / "s1.safetensors")
    index = tmp_path / "model.safetensors.index.json"

    def with_map(weight_map):
        index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))

    with_map({"w": "s1.safetensors"})
    assert [t.name for t in Checkpoint.open(tmp_path).tensors()] == ["w"]
    with_map({"w": "s2.safetensors"})
    with pytest.raises(InputError, match="does not exist"):
        Checkpoint.open(tmp_path)
    with_map({"w": "../s1.safetensors"})
    with pytest.raises(InputError, match="outside the checkpoint"):
        Checkpoint.open(tmp_path)
    with_map({"w": str(tmp_path / "s1.safetensors")})
    with pytest.raises(InputError, match="outside the checkpoint"):
        Checkpoint.open(tmp_path)
    with_map({"w": "s1.safetensors", "v": "s1.safetensors"})
    with pytest.raises(InputError, match="inconsistent"):
        Checkpoint.open(tmp_path)
    (tmp_path / "link.safetensors").symlink_to(tmp_path.parent / "elsewhere.safetensors")
    save_file({"w": torch.zeros(2)}, tmp_path.parent / "elsewhere.safetensors")
    with_map({"w": "link.safetensors"})
    with pytest.raises(InputError, match="is a link to .*outside the checkpoint folder"):
        Checkpoint.open(tmp_path)
    index.write_text("{")
    with pytest.raises(InputError, match="corrupt index"):
        Checkpoint.open(tmp_path)


def test_index_and_shards_must_agree_both_ways(tmp_path):
    """A tensor of a listed shard that the index leaves out, or a shard of the numbered set it
    leaves out, would be dropped from the model by transformers: refused, not mirrored.
    Other .safetensors files (an adapter, Mistral's consolidated.safetensors) are fine."""
    for i, names in ((1, ["a", "b"]), (2, ["c"]), (3, ["d"])):
        save_file(
            {n: torch.zeros(2) for n in names}, tmp_path / f"model-0000{i}-of-00003.safetensors"
        )
    save_file({"x": torch.zeros(2)}, tmp_path / "consolidated.safetensors")
    index = tmp_path / "model.safetensors.index.json"

    def with_map(weight_map):
        index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))

    full = {"a": 1, "b": 1, "c": 2, "d": 3}
    with_map({k: f"model-0000{v}-of-00003.safetensors" for k, v in full.items()})
    assert [t.name for t in Checkpoint.open(tmp_path).tensors()] == ["a", "b", "c", "d"]
    with_map({k: f"model-0000{v}-of-00003.safetensors" for k, v in full.items() if k != "b"})
    with pytest.raises(InputError, match="does not list tensor 'b' of model-00001-of-00003"):
        Checkpoint.open(tmp_path)
    with_map({k: f"model-0000{v}-of-00003.safetensors" for k, v in full.items() if k != "c"})
    with pytest.raises(InputError, match="does not list model-00002-of-00003.safetensors, a shard"):
        Checkpoint.open(tmp_path)
    outside = tmp_path.parent / "index-elsewhere.json"
    with_map({k: f"model-0000{v}-of-00003.safetensors" for k, v in full.items()})
    index.rename(outside)
    index.symlink_to(outside)
    with pytest.raises(InputError, match="is a link to .*outside the checkpoint folder"):
        Checkpoint.open(tmp_path)


def test_hugging_face_cache_snapshot_opens(tmp_path):
    """A hub cache snapshot (what snapshot_download returns): every file is a link to
    ../../blobs/HASH. Links from the snapshot into its own repo's blobs/ are followed; a link
    to anywhere else is still refused."""
    repo = tmp_path / "hub" / "models--org--tiny"
    blobs, snap = repo / "blobs", repo / "snapshots" / "0123abc"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    save_file({"a": torch.ones(2, 3)}, blobs / "h1")
    save_file({"b": torch.zeros(4)}, blobs / "h2")
    index = {"metadata": {}, "weight_map": {"a": "m-1.safetensors", "b": "m-2.safetensors"}}
    (blobs / "h3").write_text(json.dumps(index))
    for name, blob in (("m-1.safetensors", "h1"), ("m-2.safetensors", "h2"), (INDEX_NAME, "h3")):
        (snap / name).symlink_to(Path("../../blobs") / blob)
    ck = Checkpoint.open(snap)
    assert [t.name for t in ck.tensors()] == ["a", "b"]
    (tmp_path / "latest").symlink_to(snap)  # SRC a link to the snapshot
    assert [t.name for t in Checkpoint.open(tmp_path / "latest").tensors()] == ["a", "b"]
    save_file({"b": torch.zeros(4)}, tmp_path / "elsewhere.safetensors")
    (snap / "m-2.safetensors").unlink()
    (snap / "m-2.safetensors").symlink_to(tmp_path / "elsewhere.safetensors")
    with pytest.raises(InputError, match="outside the checkpoint folder"):
        Checkpoint.open(snap)


def test_single_file_beside_an_index_is_ambiguous(tmp_path):
    """transformers loads model.safetensors when both it and an index are there; decomposing
    the index would give a residual of another model. Refused, naming both."""
    save_file({"a": torch.ones(2, 3)}, tmp_path / "model.safetensors")
    save_file({"a": torch.zeros(2, 3)}, tmp_path / "s1.safetensors")
    index = {"metadata": {}, "weight_map": {"a": "s1.safetensors"}}
    (tmp_path / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(InputError, match="both model.safetensors and model.safetensors.index"):
        Checkpoint.open(tmp_path)


@pytest.mark.parametrize("kind", ["folder", "broken link"])
def test_model_safetensors_that_is_not_a_file(tmp_path, kind):
    path = tmp_path / "model.safetensors"
    if kind == "folder":
        path.mkdir()
    else:
        path.symlink_to(tmp_path / "gone.safetensors")
    with pytest.raises(InputError, match="model.safetensors: not a regular file"):
        Checkpoint.open(tmp_path)


def test_single_file_link_follows_the_shard_rule(tmp_path):
    """model.safetensors linked out of the folder is refused as an indexed shard linked out
    is; a link inside the folder, or into a hub cache's blobs/, opens."""
    src = tmp_path / "src"
    src.mkdir()
    save_file({"a": torch.ones(2, 3)}, tmp_path / "elsewhere.safetensors")
    (src / "model.safetensors").symlink_to(tmp_path / "elsewhere.safetensors")
    with pytest.raises(InputError, match="model.safetensors is a link to .*outside the checkpoint"):
        Checkpoint.open(src)
    (src / "model.safetensors").unlink()
    (tmp_path / "elsewhere.safetensors").rename(src / "real.safetensors")
    (src / "model.safetensors").symlink_to("real.safetensors")
    assert [t.name for t in Checkpoint.open(src).tensors()] == ["a"]
    repo = tmp_path / "hub" / "models--org--one"
    (repo / "blobs").mkdir(parents=True)
    (repo / "snapshots" / "rev").mkdir(parents=True)
    save_file({"b": torch.zeros(4)}, repo / "blobs" / "h1")
    (repo / "snapshots" / "rev" / "model.safetensors").symlink_to(Path("../../blobs/h1"))
    assert [t.name for t in Checkpoint.open(repo / "snapshots" / "rev").tensors()] == ["b"]
