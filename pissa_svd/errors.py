"""Errors that are the user's to fix.

Anything raised as :class:`InputError` is reported by the CLI as one line on stderr with exit
code 2 and no traceback. Everything else is a bug in pissa-svd and keeps its traceback.
"""

from __future__ import annotations

import errno
import json
from pathlib import Path


class InputError(Exception):
    """Bad input: a missing or corrupt file, an impossible option, a full disk.

    The message is one sentence that names the file or tensor and says what to do.
    """


class RankFailure(RuntimeError):
    """A process of a multi-process (torchrun) run failed; every process raises this.

    The message names the rank and the tensor. The failing rank also printed its traceback.
    """


def disk_error(exc: OSError, path: object) -> InputError | None:
    """Translate an out-of-space/quota OSError into an InputError, or return None."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return InputError(
            f"disk full while writing {path}: free some space or choose another --out location"
        )
    return None


_OS_HINTS = {
    errno.EACCES: "check its permissions, or choose another location",
    errno.EPERM: "check its permissions, or choose another location",
    errno.EROFS: "the file system is read-only; choose another --out location",
    errno.ENOTDIR: "a part of the path is a file, not a folder; fix the path",
    errno.ENOENT: "check the path",
    errno.EISDIR: "it is a folder; pass a file",
}


def os_error_message(exc: OSError) -> str:
    """One line for an OSError the file system raised: the path, the reason, what to do."""
    full = disk_error(exc, exc.filename or "the output")
    if full is not None:
        return str(full)
    where = f"{exc.filename}: " if exc.filename else ""
    if exc.filename2:
        where = f"{exc.filename} -> {exc.filename2}: "
    reason = exc.strerror or str(exc)
    return f"{where}{reason}; " + _OS_HINTS.get(exc.errno, "check the path and the disk")


def parse_json(raw: str | bytes, where: object, what: str = "JSON") -> object:
    """``json.loads(raw)``; malformed or pathologically nested input is an InputError that
    names ``where`` (``what``: what the text is, e.g. "header")."""
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise InputError(
            f"{where}: corrupt {what} ({exc.__class__.__name__}: {reason}); "
            "re-save or re-download it"
        ) from None


def read_json(path: Path, what: str = "JSON") -> dict:
    """The JSON object in file ``path``; anything else (unreadable, malformed, not an object)
    is an InputError that names the file."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise InputError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    data = parse_json(raw, path, what)
    if not isinstance(data, dict):
        raise InputError(f"{path}: corrupt {what} (expected a JSON object)")
    return data
