"""pissa-svd: fast, streaming SVD initialization for PiSSA adapters.

>>> import pissa_svd
>>> U, S, Vh = pissa_svd.svd_lowrank(W, rank=64, niter=4)
>>> A, B, W_res = pissa_svd.pissa_factors(W, rank=64)
>>> report = pissa_svd.decompose("ckpt/", "out/", rank=64, niter=4)
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

from .errors import InputError  # noqa: E402

# Imported on first use (PEP 562): they load torch, which the command line loads only once it
# can report an interrupt in one line, and `pissa-svd --help` never needs.
_LAZY = {"svd_lowrank": ".linalg", "decompose": ".pipeline", "pissa_factors": ".pissa"}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["InputError", "__version__", "decompose", "pissa_factors", "svd_lowrank"]
