"""pissa-svd: fast, streaming SVD initialization for PiSSA adapters.

>>> import pissa_svd
>>> U, S, Vh = pissa_svd.svd_lowrank(W, rank=64, niter=4)
>>> A, B, W_res = pissa_svd.pissa_factors(W, rank=64)
>>> report = pissa_svd.decompose("ckpt/", "out/", rank=64, niter=4)
"""

__version__ = "0.1.0"

from .errors import InputError  # noqa: E402
from .linalg import svd_lowrank  # noqa: E402
from .pipeline import decompose  # noqa: E402
from .pissa import pissa_factors  # noqa: E402

__all__ = ["InputError", "__version__", "decompose", "pissa_factors", "svd_lowrank"]
