"""Errors that are the user's to fix.

Anything raised as :class:`InputError` is reported by the CLI as one line on stderr with exit
code 2 and no traceback. Everything else is a bug in pissa-svd and keeps its traceback.
"""

from __future__ import annotations

import errno


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
