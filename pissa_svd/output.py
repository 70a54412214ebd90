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
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .checkpoint import WEIGHT_SUFFIXES, sentence_transformers_modules
from .errors import InputError, disk_error


def check_out(out: Path, overwrite: bool, sources: dict[str, Path]) -> None:
    """Refuse an OUT that would clobber a user's files or overlap an input.

    ``sources`` maps a label ("the source checkpoint") to an input path. OUT may not be inside
    an input folder, nor contain an input, and may only exist when ``overwrite`` is set.
    """
    o = out.resolve()
    if out.name in ("", ".", "..") or Path.cwd().resolve().is_relative_to(o):
        raise InputError(
            f"--out {out} names no new folder (it ends in '.' or '..', or is the current folder "
            "or one above it); name a new folder"
        )
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
        if out.is_symlink():
            raise InputError(
                f"{out} is a link; --overwrite does not replace links: remove it or choose "
                "another --out"
            )
        if not out.is_dir():
            raise InputError(f"{out} exists and is not a folder; remove it or choose another --out")
        if not _replaceable(out):
            raise InputError(
                f"--overwrite replaces an earlier output, but {out} does not look like one (no "
                ".safetensors file, adapter_config.json or pissa_report.json at its top, or "
                "other models or adapters in its subfolders); choose another --out, or empty "
                "it yourself"
            )


def _replaceable(out: Path) -> bool:
    """An OUT that --overwrite may replace: empty, or what these commands write (safetensors
    weights, an adapter config or decompose's report, at its top), never a folder of other
    things that merely has OUT's name, nor one that holds other models or adapters anywhere
    below it (besides decompose's own ``pissa_init``): a user's training checkpoints saved
    inside an output. The folders these commands write themselves (``pissa_init``, and a
    sentence-transformers module's, which may hold its own weights) may hold weights at their
    top, not below it (PEFT saves an adapter named X into ``X/``)."""
    names = {p.name for p in out.iterdir()}
    markers = {"pissa_report.json", "adapter_config.json"}
    if names and not (names & markers or any(n.endswith(".safetensors") for n in names)):
        return False
    own = {"pissa_init", *sentence_transformers_modules(out)}
    for sub in out.iterdir():
        if not sub.is_dir() or sub.is_symlink():
            continue
        below = [d for d in sub.iterdir() if d.is_dir() and not d.is_symlink()]
        if any(_holds_model(d) for d in below) if sub.name in own else _holds_model(sub):
            return False
    return True


def _holds_model(folder: Path) -> bool:
    """Model or adapter weights, or a PEFT adapter config, anywhere in ``folder`` (links not
    followed)."""
    for _, _, files in os.walk(folder):
        if any(f.endswith(WEIGHT_SUFFIXES) or f == "adapter_config.json" for f in files):
            return True
    return False


def check_free(out: Path, overwrite: bool) -> None:
    """Raise unless ``out`` may be created, or replaced with ``overwrite``, now: a long run
    checks again at its end what :func:`check_out` allowed at its start."""
    if not (out.exists() or out.is_symlink()):
        return
    if not overwrite:
        raise InputError(f"{out} appeared during the run; pass --overwrite to replace it")
    if out.is_symlink() or not out.is_dir() or not _replaceable(out):
        raise InputError(
            f"{out} changed during the run and no longer looks like an earlier output; it was "
            "left as it is: move it away and run again"
        )


@contextmanager
def staged(out: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a hidden temporary sibling of ``out``; rename it to ``out`` when the block succeeds.

    On any exception (including KeyboardInterrupt) the temporary folder is removed and ``out``
    is left as it was.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    held = try_lock(tmp)  # new, so ours: it tells later runs that this one is alive
    mark = tmp / STAGED_MARK  # written once locked: an unlocked folder with it is a dead run's
    mark.touch()
    try:
        yield tmp
        mark.unlink()
        move_into_place(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if held is not None:
            os.close(held)


# Marks a temporary sibling as this tool's (a user's folder may match its name pattern). It is
# written once the folder is locked, so a marked folder that no live process holds was left by
# a run that was killed (SIGKILL, out of memory, power loss) before it could clean up.
STAGED_MARK = ".pissa-svd-staging"


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


def remove_stale(out: Path) -> None:
    """Remove the temporary siblings of ``out`` that killed runs left: marked as ours
    (``STAGED_MARK``) and held by no live process. Saying so, on stderr."""
    for tmp in out.parent.glob(f".{glob.escape(out.name)}.tmp-*"):
        try:
            if tmp.is_symlink() or not tmp.is_dir() or not (tmp / STAGED_MARK).is_file():
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
    if not (out.exists() or out.is_symlink()):
        os.rename(tmp, out)
        return
    check_free(out, overwrite)  # appeared or changed while we were working
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
