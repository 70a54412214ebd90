"""Writing an output folder safely: checks before, a staged temporary sibling, rename at the end.

Every command that writes (decompose, merge, to-lora) goes through :func:`staged`, so an
interrupted or failed run never leaves an OUT that looks complete, and an existing OUT is only
replaced with ``--overwrite``, after the new one is finished.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import InputError, disk_error


def check_out(out: Path, overwrite: bool, sources: dict[str, Path]) -> None:
    """Refuse an OUT that would clobber a user's files or overlap an input.

    ``sources`` maps a label ("the source checkpoint") to an input path. OUT may not be inside
    an input folder, nor contain an input, and may only exist when ``overwrite`` is set.
    """
    o = out.resolve()
    if out.name in ("", ".", "..") or Path.cwd().resolve().is_relative_to(o):
        raise InputError(f"--out {out} is the current folder or one above it; name a new folder")
    where = o.parent  # the folder OUT's staging sibling is created in, or its nearest ancestor
    while not where.exists() and where != where.parent:
        where = where.parent
    if not where.is_dir():
        raise InputError(f"--out {out}: {where} is a file, not a folder; choose another --out")
    if not os.access(where, os.W_OK | os.X_OK):
        raise InputError(
            f"--out {out}: cannot write in {where} (permission denied, or a read-only file "
            "system); choose another --out"
        )
    for label, src in sources.items():
        s = src.resolve()
        if src.is_dir() and (o == s or o.is_relative_to(s)):
            raise InputError(f"--out {out} is inside {label} {src}; choose a folder outside it")
        if s == o or s.is_relative_to(o):
            raise InputError(f"--out {out} contains {label} {src}; choose another folder")
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise InputError(
                f"{out} already exists; pass --overwrite to replace it, or choose another --out"
            )
        if not out.is_dir() or out.is_symlink():
            raise InputError(f"{out} exists and is not a folder; remove it or choose another --out")
        if not _replaceable(out):
            raise InputError(
                f"--overwrite replaces an earlier output, but {out} does not look like one (no "
                "config.json, adapter_config.json or .safetensors file in it, or other models "
                "in its subfolders); choose another --out, or empty it yourself"
            )


def _replaceable(out: Path) -> bool:
    """An OUT that --overwrite may replace: empty, or a model or adapter folder (what these
    commands write), never a folder of other things that merely has OUT's name, nor one that
    holds other models or adapters in subfolders (besides decompose's own adapter)."""
    names = {p.name for p in out.iterdir()}
    markers = {"config.json", "adapter_config.json", "pissa_report.json"}
    if names and not (names & markers or any(n.endswith(".safetensors") for n in names)):
        return False
    return not any(
        sub.is_dir() and sub.name != "pissa_init" and _holds_weights(sub) for sub in out.iterdir()
    )


def _holds_weights(folder: Path) -> bool:
    """A model or adapter folder: safetensors weights or a PEFT adapter config in it."""
    return any(
        p.suffix == ".safetensors" or p.name == "adapter_config.json" for p in folder.iterdir()
    )


@contextmanager
def staged(out: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a hidden temporary sibling of ``out``; rename it to ``out`` when the block succeeds.

    On any exception (including KeyboardInterrupt) the temporary folder is removed and ``out``
    is left as it was.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    held = try_lock(tmp)  # new, so ours: it tells later runs that this one is alive
    try:
        yield tmp
        move_into_place(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if held is not None:
            os.close(held)


# A temporary sibling this much older than its last change, which no live process holds, was
# left by a run that was killed (SIGKILL, out of memory, power loss) before it could clean up.
# The age keeps a folder that a starting run has made but not yet locked out of reach.
STALE_AFTER = 60.0  # seconds


def try_lock(folder: Path) -> int | None:
    """Hold ``folder`` for this process: an exclusive lock on the folder itself (it moves with
    the folder, and goes with the process however it ends). Returns the descriptor to close
    when done, or None while another process holds it."""
    import fcntl

    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _remove_stale(out: Path) -> None:
    """Remove the temporary siblings of ``out`` that killed runs left: older than
    ``STALE_AFTER`` and held by no live process. Saying so, on stderr."""
    for tmp in out.parent.glob(f".{glob.escape(out.name)}.tmp-*"):
        try:
            if tmp.is_symlink() or not tmp.is_dir():
                continue
            if time.time() - tmp.stat().st_mtime < STALE_AFTER:
                continue
            fd = try_lock(tmp)
        except OSError:  # gone meanwhile, or not ours to open
            continue
        if fd is None:  # a live run's
            continue
        try:
            shutil.rmtree(tmp, ignore_errors=True)
        finally:
            os.close(fd)
        print(f"pissa-svd: removed {tmp}, left by an interrupted run", file=sys.stderr)


def move_into_place(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename the finished ``tmp`` to ``out``; an existing ``out`` only with ``overwrite``."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp made it private; OUT is an ordinary folder
    if not out.exists():
        os.rename(tmp, out)
        return
    if not overwrite:  # appeared while we were working
        raise InputError(f"{out} appeared during the run; pass --overwrite to replace it")
    # Swap: the old OUT is only removed once the new one is in place.
    trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    old = trash / out.name
    os.rename(out, old)
    os.rename(tmp, out)
    shutil.rmtree(trash, ignore_errors=True)


def guarded(fn, path: Path):
    """Run ``fn``; a disk-full OSError becomes an InputError naming ``path``."""
    try:
        return fn()
    except OSError as exc:
        err = disk_error(exc, path)
        if err is not None:
            raise err from None
        raise


def write_json(path: Path, obj: dict) -> None:
    guarded(lambda: path.write_text(json.dumps(obj, indent=2) + "\n"), path)


def copy_files(src_root: Path, names: list[str], dest_root: Path) -> None:
    """Copy side files (config, tokenizer, ...) unchanged, keeping their relative paths."""
    for name in names:
        dest = dest_root / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        guarded(lambda n=name, d=dest: shutil.copy2(src_root / n, d), dest)


def progress(total: int, desc: str, quiet: bool, postfix: str | None = None):
    """A byte-counting tqdm bar on stderr (disabled with ``quiet``)."""
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=desc,
        file=sys.stderr,
        disable=quiet,
        postfix=postfix,
        dynamic_ncols=True,
    )


def plain_number(x: float) -> float | int:
    """64.0 -> 64 (for JSON configs and messages), other values unchanged."""
    return int(x) if float(x).is_integer() else x


def human(n: float) -> str:
    """Bytes for people: 1.23 GB."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"
