"""Sharded safetensors checkpoints: validated reading, one tensor at a time, and streaming writing.

No math lives here. A checkpoint is never loaded whole: :class:`SafetensorsFile` reads one
tensor's bytes with ``os.pread`` (no mmap, so untouched tensors never count toward RSS), and
:class:`StreamingWriter` writes the header first and then each tensor in order, copying
untouched byte ranges file-to-file with ``os.copy_file_range``.

File layout (safetensors): 8-byte little-endian header length N, N bytes of JSON
``{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {str: str}}``, then the data.
Offsets are relative to the end of the header and must tile the data section exactly.
"""

from __future__ import annotations

import errno
import functools
import json
import math
import mmap
import os
import re
import stat
import struct
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import InputError, disk_error, parse_json, read_json

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the limit the safetensors library enforces
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

# safetensors dtype -> (torch dtype or None when torch has no such type, bytes per element)
_DTYPES: dict[str, tuple[torch.dtype | None, float]] = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1),
    "U16": (getattr(torch, "uint16", None), 2),
    "U32": (getattr(torch, "uint32", None), 4),
    "U64": (getattr(torch, "uint64", None), 8),
    "BOOL": (torch.bool, 1),
    "F8_E4M3": (getattr(torch, "float8_e4m3fn", None), 1),
    "F8_E5M2": (getattr(torch, "float8_e5m2", None), 1),
    "F8_E8M0": (getattr(torch, "float8_e8m0fnu", None), 1),
    "F6_E2M3": (None, 0.75),
    "F6_E3M2": (None, 0.75),
    "F4": (None, 0.5),
}
_TORCH_TO_ST = {t: name for name, (t, _) in _DTYPES.items() if t is not None}

# The floating dtypes pissa-svd decomposes (W is read, SVD'd in fp32/fp64, written back).
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


def dtype_to_torch(st_dtype: str) -> torch.dtype:
    dt = _DTYPES[st_dtype][0]
    if dt is None:
        raise InputError(f"dtype {st_dtype} has no torch equivalent in this torch build")
    return dt


def torch_to_dtype(dtype: torch.dtype) -> str:
    return _TORCH_TO_ST[dtype]


def dtype_nbytes(st_dtype: str, shape: Iterable[int]) -> int:
    n = math.prod(shape) * _DTYPES[st_dtype][1]
    return int(math.ceil(n))


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes live. ``begin``/``end`` are absolute offsets in ``path``."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    path: Path
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass
class SafetensorsFile:
    """A validated safetensors header; tensors are read on demand, one at a time."""

    path: Path
    metadata: dict[str, str]
    tensors: dict[str, TensorInfo]  # in file order (ascending offsets)
    data_start: int

    @classmethod
    def open(cls, path: Path) -> SafetensorsFile:
        path = Path(path)
        try:
            size = path.stat().st_size
            with open(path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise InputError(f"{path}: not a safetensors file ({size} bytes, too short)")
                (n,) = struct.unpack("<Q", head)
                if n > MAX_HEADER_BYTES:
                    raise InputError(
                        f"{path}: header claims {n} bytes (limit {MAX_HEADER_BYTES}); "
                        "the file is corrupt or not safetensors"
                    )
                if 8 + n > size:
                    raise InputError(
                        f"{path}: truncated: header needs {8 + n} bytes but the file has {size}; "
                        "re-download or re-save it"
                    )
                raw = f.read(n)
        except FileNotFoundError:
            raise InputError(f"{path}: file not found; check the path") from None
        except IsADirectoryError:
            raise InputError(f"{path}: is a folder, expected a .safetensors file") from None
        except PermissionError:
            raise InputError(f"{path}: permission denied") from None
        header = parse_json(raw, path, "header")
        if not isinstance(header, dict):
            raise InputError(f"{path}: corrupt header (JSON is not an object)")
        data_start = 8 + n
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
        ):
            raise InputError(f"{path}: corrupt header (__metadata__ must map strings to strings)")
        entries = [_parse_entry(path, name, spec, data_start) for name, spec in header.items()]
        entries.sort(key=lambda t: (t.begin, t.end))
        _check_tiling(path, entries, data_start, size)
        return cls(path, metadata, {t.name: t for t in entries}, data_start)

    def read(self, name: str) -> torch.Tensor:
        """One tensor as a fresh CPU tensor that owns its memory."""
        info = self.tensors[name]
        return read_tensor(info)


def read_tensor(info: TensorInfo, out: torch.Tensor | None = None) -> torch.Tensor:
    """Read one tensor with a single positioned read; nothing else of the file is touched.

    ``out``: an optional uint8 CPU buffer of at least ``info.nbytes`` to read into (reusing one
    buffer avoids re-faulting tens of MB of fresh pages per tensor); the result then views it.
    """
    if out is None:
        out = torch.empty(info.nbytes, dtype=torch.uint8)
    buf = out[: info.nbytes]
    got = 0
    if info.nbytes:
        with open(info.path, "rb", buffering=0) as f:
            f.seek(info.begin)
            got = f.readinto(memoryview(buf.numpy()))
    if got != info.nbytes:
        raise InputError(f"{info.path}: truncated while reading {info.name}; re-download the file")
    return buf.view(dtype_to_torch(info.dtype)).reshape(info.shape)


def map_tensor(info: TensorInfo) -> torch.Tensor:
    """A read-only view of one tensor's bytes in its file, through ``mmap``: no copy.

    On a CPU the consumer (a conversion to fp32) then reads the page cache directly, where
    ``read_tensor`` first copies the bytes into a buffer: a memory copy of the whole checkpoint
    saved, on a machine whose every core is busy with GEMMs. The kernel is asked to read the
    whole range from disk right away (``MADV_WILLNEED``, one readahead window per call: one
    call for the range would start only the first window), so mapping the next batch while
    one computes also prefetches it. The mapping lives as long as the returned tensor. Never
    write to it (the pages are read-only).
    """
    dtype = dtype_to_torch(info.dtype)
    if info.nbytes == 0:
        return torch.empty(info.shape, dtype=dtype)
    start = info.begin - info.begin % mmap.ALLOCATIONGRANULARITY
    try:
        with open(info.path, "rb") as f:
            st = os.fstat(f.fileno())
            if st.st_size < info.end:
                raise InputError(
                    f"{info.path}: truncated while reading {info.name}; re-download the file"
                )
            mm = mmap.mmap(f.fileno(), info.end - start, offset=start, access=mmap.ACCESS_READ)
    except FileNotFoundError:
        raise InputError(f"{info.path}: file not found (removed during the run?)") from None
    _prefetch(mm, readahead_bytes(st.st_dev))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "the given buffer is not writable"
        flat = torch.frombuffer(mm, dtype=torch.uint8, count=info.nbytes, offset=info.begin - start)
    return flat.view(dtype).reshape(info.shape)


DEFAULT_READAHEAD = 128 << 10  # the kernel's default read_ahead_kb


@functools.cache
def readahead_bytes(dev: int) -> int:
    """The readahead window of the block device ``dev`` (a file's ``st_dev``): how much one
    ``MADV_WILLNEED`` starts reading. From sysfs (Linux; a partition uses its disk's), else
    the kernel's default, 128 KB."""
    if not hasattr(os, "major"):  # Windows
        return DEFAULT_READAHEAD
    block = f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}"
    for where in (
        f"{block}/queue/read_ahead_kb",
        f"{block}/../queue/read_ahead_kb",  # a partition
        f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb",
    ):
        try:
            kb = int(Path(where).read_text())
        except (OSError, ValueError):
            continue
        if kb > 0:
            return kb << 10
    return DEFAULT_READAHEAD


def _prefetch(mm: mmap.mmap, window: int) -> None:
    """Ask the kernel to start reading all of ``mm`` from disk (asynchronously; pages already
    in the page cache cost a lookup). One call starts at most one readahead window (``window``
    bytes, :func:`readahead_bytes`), so the range is hinted window by window."""
    if not hasattr(mmap, "MADV_WILLNEED"):  # Windows
        return
    step = max(mmap.PAGESIZE, window - window % mmap.PAGESIZE)
    for off in range(0, len(mm), step):
        mm.madvise(mmap.MADV_WILLNEED, off, min(step, len(mm) - off))


_RESAVE = "re-download or re-save the file"


def _parse_entry(path: Path, name: str, spec: object, data_start: int) -> TensorInfo:
    where = f"{path}: tensor {name!r}"
    if not isinstance(spec, dict):
        raise InputError(f"{where}: corrupt header entry; {_RESAVE}")
    dtype, shape, offs = spec.get("dtype"), spec.get("shape"), spec.get("data_offsets")
    if dtype not in _DTYPES:
        raise InputError(f"{where}: unknown dtype {dtype!r}; {_RESAVE}")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise InputError(f"{where}: corrupt shape {shape!r}; {_RESAVE}")
    if (
        not isinstance(offs, list)
        or len(offs) != 2
        or not all(type(o) is int and o >= 0 for o in offs)
        or offs[0] > offs[1]
    ):
        raise InputError(f"{where}: corrupt data_offsets {offs!r}; {_RESAVE}")
    expected = dtype_nbytes(dtype, shape)
    if offs[1] - offs[0] != expected:
        raise InputError(
            f"{where}: data_offsets span {offs[1] - offs[0]} bytes but {dtype}{shape} needs "
            f"{expected}; the header is corrupt: {_RESAVE}"
        )
    return TensorInfo(name, dtype, tuple(shape), path, data_start + offs[0], data_start + offs[1])


def _check_tiling(path: Path, entries: list[TensorInfo], data_start: int, size: int) -> None:
    """Offsets must tile [0, data_len) exactly: no overlap, no hole, nothing past the end."""
    pos = data_start
    for t in entries:
        if t.begin < pos:
            raise InputError(
                f"{path}: tensor {t.name!r} overlaps the previous tensor (data_offsets "
                f"{t.begin - data_start}..{t.end - data_start}); the header is corrupt"
            )
        if t.begin > pos:
            raise InputError(
                f"{path}: {t.begin - pos} unaccounted bytes before tensor {t.name!r}; "
                "the header is corrupt"
            )
        pos = t.end
    if pos > size:
        raise InputError(
            f"{path}: truncated: tensors need {pos} bytes but the file has {size}; "
            "re-download or re-save it"
        )
    if pos < size:
        raise InputError(
            f"{path}: {size - pos} trailing bytes after the last tensor; the header is corrupt"
        )


@dataclass
class Checkpoint:
    """A checkpoint folder (or a single file): its shards, every tensor, and the other files.

    ``shards`` are paths relative to ``root``, in index order. ``index`` is the parsed
    ``model.safetensors.index.json`` or None for a single-file checkpoint.
    """

    root: Path
    shards: list[str]
    files: dict[str, SafetensorsFile]
    index: dict | None
    extra_files: list[str] = field(default_factory=list)

    @classmethod
    def open(cls, src: str | os.PathLike) -> Checkpoint:
        src = Path(src)
        if not src.exists():
            raise InputError(f"{src}: no such file or folder")
        if src.is_file():
            if src.suffix != ".safetensors":
                raise InputError(f"{src}: expected a .safetensors file or a checkpoint folder")
            return cls(src.parent, [src.name], {src.name: SafetensorsFile.open(src)}, None, [])
        index_path = src / INDEX_NAME
        if index_path.is_file() and (src / SINGLE_NAME).exists():
            raise InputError(
                f"{src}: holds both {SINGLE_NAME} and {INDEX_NAME} (transformers loads "
                f"{SINGLE_NAME} and ignores the index); remove whichever is stale"
            )
        if index_path.is_file():
            _refuse_outside_link(src, index_path, str(index_path))
            index = _read_index(index_path)
            shards = list(dict.fromkeys(index["weight_map"].values()))
            files = {s: SafetensorsFile.open(_inside(src, s, index_path)) for s in shards}
            _check_index_against_shards(index_path, index, files)
        elif (src / SINGLE_NAME).is_file():
            _refuse_outside_link(src, src / SINGLE_NAME, str(src / SINGLE_NAME))
            index, shards = None, [SINGLE_NAME]
            files = {SINGLE_NAME: SafetensorsFile.open(src / SINGLE_NAME)}
        elif (src / SINGLE_NAME).exists() or (src / SINGLE_NAME).is_symlink():
            raise InputError(
                f"{src / SINGLE_NAME}: not a regular file (a folder, a device, or a broken link); "
                "point SRC at a checkpoint folder whose model.safetensors is the weights file"
            )
        else:
            found = sorted(p.name for p in src.glob("*.safetensors"))
            hint = (
                f" (found {', '.join(found[:3])}{'...' if len(found) > 3 else ''} "
                f"but no {INDEX_NAME})"
                if found
                else ""
            )
            raise InputError(
                f"{src}: no {SINGLE_NAME} or {INDEX_NAME}{hint}; point SRC at a Hugging Face "
                "checkpoint folder saved with safetensors"
            )
        names: dict[str, str] = {}
        for s, f in files.items():
            for t in f.tensors:
                if t in names:
                    raise InputError(f"{src}: tensor {t!r} is stored in both {names[t]} and {s}")
                names[t] = s
        return cls(src, shards, files, index, _extra_files(src, set(shards)))

    def tensors(self) -> Iterator[TensorInfo]:
        """Every tensor, shard by shard, in file order."""
        for s in self.shards:
            yield from self.files[s].tensors.values()

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors())

    def read_json(self, name: str) -> dict | None:
        p = self.root / name
        return read_json(p) if p.is_file() else None


# Weight files of other formats are never copied to the residual model: they would hold the
# original, not the residual, weights and a loader could pick them up.
WEIGHT_SUFFIXES = (
    ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx",
    ".onnx_data", ".tflite",
)  # fmt: skip
_WEIGHT_INDEXES = ("pytorch_model.bin.index.json", "tf_model.h5.index.json", INDEX_NAME)


def _extra_files(root: Path, shards: set[str]) -> list[str]:
    """The side files to copy, relative to ``root``: config, tokenizer, and those in
    subfolders (sentence-transformers' ``1_Pooling/``, ...), except weights of any format,
    hidden files and folders, and PEFT adapters kept inside the checkpoint. The weights of a
    sentence-transformers module in a subfolder (``2_Dense/model.safetensors``, listed in
    ``modules.json``) are the model's, and copied."""
    modules = sentence_transformers_modules(root)
    out = []
    # A folder that links elsewhere in the checkpoint is walked too, so that OUT has it under
    # its link name, but only one link deep: links inside a linked folder are not followed,
    # which also keeps a cycle of links from being walked round.
    real_root = root.resolve()
    for folder, dirs, files in os.walk(root, followlinks=True):
        here = Path(folder)
        dirs[:] = sorted(
            d
            for d in dirs
            if not d.startswith(".") and not (here / d / "adapter_config.json").exists()
        )
        here_real = here.resolve()
        linked = here_real != real_root / here.relative_to(root)  # reached through a link
        walked = []
        for d in dirs:
            sub = here / d
            if sub.is_symlink():
                _refuse_outside_link(root, sub, str(sub))
                if linked or here_real.is_relative_to(sub.resolve()):
                    continue
            walked.append(d)
        dirs[:] = walked
        for name in sorted(files):
            p = here / name
            rel = p.relative_to(root).as_posix()
            if rel in shards or name in _WEIGHT_INDEXES or not p.is_file():
                continue
            own = here != root and any(here.is_relative_to(root / m) for m in modules)
            if (name.endswith(WEIGHT_SUFFIXES) and not own) or name.startswith("."):
                continue
            if p.is_symlink():  # copied into OUT: nothing from outside the checkpoint
                _refuse_outside_link(root, p, str(p))
            if not os.access(p, os.R_OK):  # copied to OUT at the end: say so before any work
                raise InputError(
                    f"{p}: cannot read it (permission denied); fix its permissions, or move it "
                    "out of the checkpoint folder"
                )
            out.append(rel)
    return out


def sentence_transformers_modules(root: Path) -> list[str]:
    """The subfolders of a sentence-transformers model's modules (``modules.json``: each
    module's ``path``, "" for the transformer at the top); [] for any other checkpoint."""
    try:
        entries = json.loads((root / "modules.json").read_text())
    except (OSError, ValueError, RecursionError):
        return []
    paths = (
        [e.get("path") for e in entries if isinstance(e, dict)] if isinstance(entries, list) else []
    )
    return [
        p
        for p in paths
        if isinstance(p, str) and p and ".." not in Path(p).parts and not os.path.isabs(p)
    ]


def _read_index(path: Path) -> dict:
    index = read_json(path, "index")
    wm = index.get("weight_map")
    if not isinstance(wm, dict) or not wm:
        raise InputError(f"{path}: index has no weight_map; re-save the checkpoint")
    for k, v in wm.items():
        if not isinstance(v, str) or not v:
            raise InputError(f"{path}: weight_map entry {k!r} is not a file name")
    if not isinstance(index.get("metadata", {}), dict | None):
        raise InputError(f"{path}: corrupt index (metadata is not an object); re-save it")
    return index


def _inside(root: Path, rel: str, index_path: Path) -> Path:
    """Resolve a shard name from the index, refusing anything outside the checkpoint folder."""
    if "\0" in rel:
        raise InputError(f"{index_path}: shard name {rel!r} holds a NUL byte; re-save the index")
    if os.path.isabs(rel) or ".." in Path(rel).parts or "\\" in rel:
        raise InputError(
            f"{index_path}: shard name {rel!r} points outside the checkpoint folder; "
            "shard names must be plain file names"
        )
    p = root / rel
    _refuse_outside_link(root, p, f"{index_path}: shard {rel!r}")
    if not p.is_file():
        raise InputError(f"{index_path}: names shard {rel!r}, which does not exist in {root}")
    return p


def _refuse_outside_link(root: Path, p: Path, what: str) -> None:
    """A weights file that is a link out of the checkpoint folder is refused, as an index
    naming ``../x`` is (links into a Hugging Face cache's blobs/ are how the cache works)."""
    real = os.path.realpath(p)
    allowed = [os.path.realpath(root), *_hub_blobs(root)]
    if not any(os.path.commonpath([a, real]) == a for a in allowed):
        raise InputError(
            f"{what} is a link to {real}, outside the checkpoint folder; copy the file into "
            "the folder (links into a Hugging Face cache's blobs/ are fine)"
        )


def _hub_blobs(root: Path) -> list[str]:
    """The blobs/ folder of a Hugging Face cache snapshot (``models--org--name/snapshots/REV``,
    whose files are links to ``models--org--name/blobs/HASH``), else nothing."""
    found = []
    for where in (os.path.abspath(root), os.path.realpath(root)):  # SRC may link to a snapshot
        snapshots = Path(where).parent
        repo = snapshots.parent
        if snapshots.name == "snapshots" and (repo / "blobs").is_dir():
            found.append(os.path.realpath(repo / "blobs"))
    return found


_SHARD = re.compile(r"(.+)-(\d+)-of-(\d+)\.safetensors")


def _check_index_against_shards(
    index_path: Path, index: dict, files: dict[str, SafetensorsFile]
) -> None:
    """The index and its shards must agree both ways (transformers loads what the index
    lists, so a tensor or shard it leaves out would be dropped from the model), and no shard
    of the same numbered set (``model-00002-of-00004.safetensors``) may be left out of it."""
    wm = index["weight_map"]
    for name, shard in wm.items():
        if name not in files[shard].tensors:
            raise InputError(
                f"{index_path}: says tensor {name!r} is in {shard}, but it is not; "
                "the index and shards are inconsistent"
            )
    for shard, f in files.items():
        for name in f.tensors:
            if wm.get(name) != shard:
                raise InputError(
                    f"{index_path}: does not list tensor {name!r} of {shard}; the index and "
                    "shards are inconsistent: re-save the checkpoint"
                )
    sets = {m.group(1, 3) for s in files if (m := _SHARD.fullmatch(s))}
    for p in sorted(index_path.parent.glob("*.safetensors")):
        m = _SHARD.fullmatch(p.name)
        if m and m.group(1, 3) in sets and p.name not in files:
            raise InputError(
                f"{index_path}: does not list {p.name}, a shard of the same set; the index "
                "and shards are inconsistent: re-save the checkpoint"
            )


def build_header(entries: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str]):
    """Header bytes (length prefix included) for tensors written back to back in ``entries`` order.

    Returns ``(header_bytes, offsets)`` where offsets are data-relative ``(begin, end)``.
    """
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    pos, offsets = 0, []
    for name, dtype, shape in entries:
        n = dtype_nbytes(dtype, shape)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + n]}
        offsets.append((pos, pos + n))
        pos += n
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, offsets


def has_layout(path: Path, entries: list[tuple[str, str, tuple[int, ...]]], metadata: dict) -> bool:
    """Whether ``path`` is a regular file (not a link) with the size and header bytes that
    ``StreamingWriter(path, entries, metadata)`` gives the file it creates."""
    header, offsets = build_header(entries, metadata)
    try:
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode) or st.st_size != len(header) + (
            offsets[-1][1] if offsets else 0
        ):
            return False
        with open(path, "rb") as f:
            return f.read(len(header)) == header
    except OSError:
        return False


def _reserve(fd: int, size: int) -> None:
    """Give the file its final size with its blocks allocated up front.

    Writing a 23 MB tensor into allocated blocks measured 2.5x faster than into a sparse
    (ftruncate'd) file on ext4 (median 11.5 vs 29.4 ms, bench/test_hotpaths.py: no block
    allocation per page), and a full disk is reported before any work is done. Filesystems
    without fallocate get a sparse file.
    """
    if size == 0:
        return
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
        os.ftruncate(fd, size)


# O_DIRECT needs the file offset, the memory address and the length aligned to the device's
# logical block size; 4096 satisfies every common one (512 or 4096).
DIRECT_ALIGN = 4096
# Below this a direct write saves too little to be worth its extra system calls.
DIRECT_MIN_BYTES = 1 << 20


def direct_view(
    buf: torch.Tensor, start: int, offset: int, dtype: torch.dtype, shape: tuple[int, ...]
) -> tuple[torch.Tensor, int]:
    """A ``dtype`` view of ``shape`` into byte buffer ``buf`` at or after position ``start``,
    at an address congruent to file offset ``offset`` modulo ``DIRECT_ALIGN`` (what lets
    ``StreamingWriter(direct=True)`` send it to the disk without a copy), and the position
    after it. ``buf`` needs ``DIRECT_ALIGN + dtype.itemsize`` bytes of slack per view.
    """
    pos = start + (offset - buf.data_ptr() - start) % DIRECT_ALIGN
    pos += -pos % dtype.itemsize  # a file offset not aligned to the dtype: no direct write
    end = pos + math.prod(shape) * dtype.itemsize
    return buf[pos:end].view(dtype).view(shape), end


class StreamingWriter:
    """Write a safetensors file whose header is known up front, one tensor at a time.

    Offsets follow from the header, so tensors may arrive in any order (a batch of same-shape
    matrices is written as soon as it is done), and from several writers (processes) at once;
    each tensor is written exactly once with ``pwrite``. Use as a context manager; closing
    checks that every tensor this writer owns was written.

    ``direct``: write the whole pages of large tensors with ``O_DIRECT``, straight from the
    caller's memory to the disk, and only their partial first and last pages through the page
    cache. A buffered write is a CPU copy into the page cache: a 23 MB tensor took 7.5 ms of
    CPU that way on the 2-core benchmark machine, and 1.8 ms written directly (whose 24 ms of
    wall time are the disk's; bench/test_hotpaths.py). Worth it when a background thread
    writes while the CPU computes. A tensor is written directly only when its memory address
    is congruent to its file offset modulo ``DIRECT_ALIGN`` (:func:`direct_view`), else as
    usual; filesystems without O_DIRECT (older tmpfs, some network filesystems) are written
    through the page cache.
    """

    def __init__(
        self,
        path: Path,
        entries: list[tuple[str, str, tuple[int, ...]]],
        metadata: dict[str, str] | None = None,
        *,
        create: bool = True,
        owned: Iterable[str] | None = None,
        direct: bool = False,
    ):
        """``create``: write the header and size the file (else open a file another writer
        created with the same entries: several processes may fill one file, each its own
        tensors). ``owned``: the tensors this writer must write before closing (default all).
        """
        self.path = Path(path)
        header, offsets = build_header(entries, metadata or {})
        base = len(header)
        self._slots = {
            name: (i, dtype, tuple(shape), base + b, base + e)
            for i, ((name, dtype, shape), (b, e)) in enumerate(zip(entries, offsets, strict=True))
        }
        self._owned = set(self._slots) if owned is None else set(owned)
        if not self._owned <= set(self._slots):
            raise RuntimeError(f"{self.path}: owned tensors missing from the header")
        self._done: set[str] = set()
        self.size = base + (offsets[-1][1] if offsets else 0)
        flags = os.O_WRONLY | (os.O_CREAT | os.O_TRUNC if create else 0)
        self._fd: int | None = self._guard(lambda: os.open(self.path, flags, 0o666))
        if create:
            self._guard(lambda: _reserve(self._fd, self.size))
            self._guard(lambda: _pwrite_all(self._fd, memoryview(header), 0))
        self._direct_fd: int | None = (
            self._guard(lambda: _open_direct(self.path)) if direct else None
        )

    def _guard(self, fn):
        try:
            return fn()
        except OSError as exc:
            err = disk_error(exc, self.path)
            if err is not None:
                raise err from None
            raise

    def _slot(self, name: str) -> tuple[int, str, tuple[int, ...], int, int]:
        """(index, dtype, shape, begin, end) of a declared tensor."""
        slot = self._slots.get(name)
        if slot is None:
            raise RuntimeError(f"{self.path}: {name!r} is not in the header")
        return slot

    def _claim(self, name: str) -> tuple[int, str, tuple[int, ...], int, int]:
        slot = self._slot(name)
        if name not in self._owned:
            raise RuntimeError(f"{self.path}: {name!r} is another writer's to write")
        if name in self._done:
            raise RuntimeError(f"{self.path}: {name!r} written twice")
        self._done.add(name)
        return slot

    def offset(self, name: str) -> int:
        """Where ``name``'s bytes start in the file."""
        return self._slot(name)[3]

    def write(self, name: str, tensor: torch.Tensor) -> None:
        _, dtype, shape, begin, _ = self._slot(name)
        if torch_to_dtype(tensor.dtype) != dtype or tuple(tensor.shape) != shape:
            raise RuntimeError(
                f"{name}: got {tensor.dtype}{tuple(tensor.shape)}, header says {dtype}{shape}"
            )
        self._claim(name)
        t = tensor.detach().to("cpu").contiguous()
        if t.numel():
            # uint8 view: numpy has no bfloat16, but bytes are bytes.
            mv = memoryview(t.view(torch.uint8).reshape(-1).numpy())
            self._guard(lambda: self._write_bytes(mv, t.data_ptr(), begin))

    def _write_bytes(self, mv: memoryview, address: int, begin: int) -> None:
        """Write ``mv`` (whose data starts at ``address``) at ``begin``; see ``direct``."""
        head = -begin % DIRECT_ALIGN  # bytes up to the first page boundary
        body = (len(mv) - head) // DIRECT_ALIGN * DIRECT_ALIGN if len(mv) > head else 0
        if (
            self._direct_fd is None
            or body < DIRECT_MIN_BYTES
            or (address + head) % DIRECT_ALIGN  # memory not congruent to the file offset
        ):
            _pwrite_all(self._fd, mv, begin)
            return
        _pwrite_all(self._fd, mv[:head], begin)
        try:
            _pwrite_all(self._direct_fd, mv[head : head + body], begin + head)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            # Alignment this filesystem rejects after all: the page cache from now on.
            os.close(self._direct_fd)
            self._direct_fd = None
            _pwrite_all(self._fd, mv[head : head + body], begin + head)
        _pwrite_all(self._fd, mv[head + body :], begin + head + body)

    def copy(self, infos: list[TensorInfo]) -> None:
        """Copy the bytes of consecutive source tensors unchanged (no trip through memory).

        They must be contiguous in the source file and declared consecutively here.
        """
        if not infos:
            return
        slots = [self._claim(i.name) for i in infos]
        pairs = list(zip(infos, infos[1:], strict=False))
        if any(a.end != b.begin for a, b in pairs) or any(
            s[0] + 1 != t[0] for s, t in zip(slots, slots[1:], strict=False)
        ):
            raise RuntimeError("copy() needs tensors that are consecutive in both files")
        if any(i.nbytes != s[4] - s[3] for i, s in zip(infos, slots, strict=True)):
            raise RuntimeError("copy() needs the header to declare the source's sizes")
        src, begin, end = infos[0].path, infos[0].begin, infos[-1].end
        self._guard(lambda: _copy_range(src, begin, end - begin, self._fd, slots[0][3]))

    def close(self) -> None:
        if self._fd is None:
            return
        self._close_direct()
        fd, self._fd = self._fd, None
        # No fsync: completeness is guaranteed by renaming OUT into place only after every file
        # is closed, which survives a killed process; forcing 2 GB/shard to disk would cost more
        # than the whole decomposition on a typical disk.
        self._guard(lambda: os.close(fd))
        if self._done != self._owned:
            raise RuntimeError(
                f"{self.path}: closed after {len(self._done)}/{len(self._owned)} tensors"
            )
        if self.path.stat().st_size != self.size:
            raise RuntimeError(f"{self.path}: size {self.path.stat().st_size} != {self.size}")

    def abort(self) -> None:
        self._close_direct()
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def _close_direct(self) -> None:
        if self._direct_fd is not None:
            fd, self._direct_fd = self._direct_fd, None
            os.close(fd)

    def __enter__(self) -> StreamingWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _open_direct(path: Path) -> int | None:
    """A second, O_DIRECT descriptor on ``path``; None where the filesystem has no O_DIRECT."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return None
    try:
        return os.open(path, os.O_WRONLY | flag)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            return None
        raise


def _pwrite_all(fd: int, mv: memoryview, offset: int) -> None:
    """Writes may be short (Linux caps one write near 2 GiB)."""
    while len(mv):
        n = os.pwrite(fd, mv, offset)
        mv, offset = mv[n:], offset + n


def _copy_range(src: Path, offset: int, count: int, out_fd: int, out_offset: int) -> None:
    with open(src, "rb") as fin:
        done = 0
        try:
            while done < count:
                n = os.copy_file_range(
                    fin.fileno(), out_fd, count - done, offset + done, out_offset + done
                )
                if n == 0:
                    raise InputError(f"{src}: truncated while copying; re-download the file")
                done += n
            return
        except (AttributeError, OSError) as exc:
            if isinstance(exc, OSError) and disk_error(exc, src) is not None:
                raise
            if done:
                raise
        # Fallback (filesystems without copy_file_range): bounded chunks through user space.
        while done < count:
            chunk = os.pread(fin.fileno(), min(64 << 20, count - done), offset + done)
            if not chunk:
                raise InputError(f"{src}: truncated while copying; re-download the file")
            _pwrite_all(out_fd, memoryview(chunk), out_offset + done)
            done += len(chunk)
