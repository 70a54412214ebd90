"""Truncated SVD: randomized (Halko, block Krylov) and exact. No IO, no CLI.

Shapes: ``W`` is ``(m, n)`` or a batch ``(b, m, n)``; results are ``U (..., m, k)``,
``S (..., k)`` descending and ``Vh (..., k, n)`` with ``W ~= U @ diag(S) @ Vh``.
Everything is computed in fp32, or fp64 when ``W`` is fp64, on ``W``'s device.

Cost in passes over W (one pass = one GEMM of W or W^T with a thin block), for ``niter`` = q
power iterations, exactly as PEFT's ``pissa_niter_q`` counts them. The randomized methods are
one algorithm, a power iteration from a Gaussian sketch followed by Rayleigh-Ritz, and differ
only in how many of its q + 1 blocks the Rayleigh-Ritz step keeps (``krylov_depth``):

- ``halko``: the last block (Halko, Martinsson & Tropp 2011): 2q + 2 passes with a block of
  ``rank + oversample`` columns (default oversample 16).
- ``krylov``: every block, the block Krylov subspace of Musco & Musco (2015), which converges
  much faster on slowly decaying spectra. The products with Wᵀ that the power iteration
  computes anyway are kept for the Rayleigh-Ritz step, so it still makes 2q + 2 passes; the
  extra cost is only small dense work on the ``(q + 1) * (rank + oversample)``-column basis
  (orthogonalization, and the Gram matrix of that width). When those columns would fill the
  smaller side, it runs ``exact`` instead (cheaper, and exact).
- ``krylov2``: the last two blocks, with no oversampling by default: PEFT's passes exactly
  (2q + 2 with ``rank`` columns) and 0.17-0.38x its worst error on real weights, for a
  little dense work on ``2 * rank`` columns (bench/RESULTS.md).
- ``krylov3``: the last three blocks, the same passes; its third block costs dense work on
  ``rank`` more columns, which pays where the short side is long: ``auto`` runs it there
  (``KRYLOV3_MIN_WIDTHS``) and ``krylov2`` elsewhere.
- ``exact``: LAPACK/cuSOLVER via ``torch.linalg.svd``; O(m n min(m, n)).
- ``gesvdr``: cuSOLVER's own randomized SVD (``cusolverDnXgesvdr``), native CUDA backend only.

Two backends run the same algorithm: ``torch`` (this file, any device) and ``native`` (the C++
engine in csrc/, see native.py: BLAS/LAPACK on CPU, cuBLAS/cuSOLVER on CUDA).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import operator
from collections.abc import Iterator, Sequence

import torch

METHODS = ("auto", "halko", "krylov", "krylov2", "krylov3", "exact", "gesvdr")
BACKENDS = ("auto", "native", "torch")
DEFAULT_OVERSAMPLE = 16  # halko, krylov and gesvdr
# krylov2/krylov3 (and so auto) get their accuracy from the blocks they keep rather than from
# oversampling: extra columns cost every pass (bench/RESULTS.md, accuracy vs speed).
OVERSAMPLE = {"auto": 0, "krylov2": 0, "krylov3": 0}
# auto keeps a third block where the short side is at least this many block widths: there the
# third block's dense work costs a few % of the SVD's time (4096 x 11008 at rank 64: 3%; the
# 2048-wide weights of a 1.1B model, which stay on krylov2: 8%), and it cuts the excess error
# by ~40% on matrices with a real layer's spectrum (0.46-0.50x PEFT's -> 0.28-0.30x;
# ``python bench/profile_decompose.py depth``, bench/RESULTS.md).
KRYLOV3_MIN_WIDTHS = 64
# backend="auto", per device: the backend bench/RESULTS.md measured faster at equal accuracy
# ("native vs torch"). CUDA stays on torch until the native CUDA path has been measured.
AUTO_BACKEND = {"cpu": "torch", "cuda": "torch"}


def default_batch_memory(device: str | torch.device) -> int:
    """Bytes of fp32 matrices worth batching into one call on ``device``.

    On CPU batching only pays for small matrices (per-call overhead; large ones measured up to
    1.2x slower batched), so 64 MiB; on a GPU, an eighth of its memory, at most 1 GiB (five
    4096 x 11008 fp32 weights: enough to fill the GPU, and the pipeline keeps pinned host
    buffers of this size). It depends only on the GPU model, not on what is free at the
    moment, so every torchrun process plans the same batches.
    """
    device = torch.device(device)
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        return min(total // 8, 1 << 30)
    return 64 << 20


CACHE_LINE = 64  # bytes


def padded_stride(cols: int, itemsize: int) -> int:
    """Row stride, in elements, for a row-major matrix that BLAS reads fast on a CPU: the row
    rounded up to an odd number of cache lines.

    A row of an even number of lines (e.g. 2048 or 5632 fp32 columns: 128 or 352 lines, with
    8 and 22 KB strides) maps the rows that a GEMM kernel reads together onto few cache sets,
    which then evict each other. One more line per row spreads them: the SVDs of one layer
    of the decompose benchmark's shapes took 9.3% and 12.4% less time with padded rows
    (``python bench/profile_decompose.py padded-svd``, two runs). Rows under a page are
    left as they are.
    """
    per_line = max(1, CACHE_LINE // itemsize)
    lines = -(-cols // per_line)
    return (lines | 1) * per_line if cols * itemsize >= 4096 else cols


def padded_nbytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    """Bytes :func:`padded_empty` takes for ``shape`` on a CPU."""
    return math.prod(shape[:-1]) * padded_stride(shape[-1], dtype.itemsize) * dtype.itemsize


def padded_empty(
    shape: Sequence[int],
    dtype: torch.dtype,
    device: str | torch.device = "cpu",
    buffer: torch.Tensor | None = None,
) -> torch.Tensor:
    """An uninitialized tensor of ``shape`` (at least 2-D) whose rows are :func:`padded_stride`
    apart on a CPU, the faster layout for the GEMMs of :func:`svd_lowrank`; a plain contiguous
    tensor on other devices. ``buffer``: CPU uint8 storage of at least :func:`padded_nbytes`
    bytes to carve it from (reused scratch memory) instead of a fresh allocation.
    """
    shape = tuple(shape)
    if torch.device(device).type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    ld = padded_stride(shape[-1], dtype.itemsize)
    full = (*shape[:-1], ld)
    if buffer is None:
        t = torch.empty(full, dtype=dtype)
    else:
        t = buffer[: padded_nbytes(shape, dtype)].view(dtype).view(full)
    return t[..., : shape[-1]]


# On a CPU, MKL multiplies a row-major (rows contiguous) left operand with many rows by a
# thin block 19-54% faster when the product is split into blocks of about ROW_BLOCK rows
# (``python bench/profile_decompose.py row-blocks --big``: 5632 x 2048 up to 28672 x 8192,
# 64 columns, three runs); square ones of up to 3072 rows gain little or nothing
# (bench/RESULTS.md).
ROW_BLOCK = 1024


def thin_matmul(X: torch.Tensor, B: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``X @ B`` for a thin ``B`` ((..., k, w), w small), in row blocks of X where that is
    faster (a CPU ``X`` with contiguous rows and more than ``2 * ROW_BLOCK`` of them).
    ``out``: where to write it (any layout whose rows are contiguous, e.g. a column slice of a
    wider basis), instead of a new tensor.

    Each block is one GEMM over the whole inner dimension, so only the BLAS's partition of the
    rows changes, not what any element sums: with MKL the result was bitwise equal to one
    call's for every shape ``row-blocks`` checks.
    """
    rows = X.shape[-2]
    if (
        X.device.type != "cpu"
        or X.stride(-1) != 1
        or rows <= 2 * ROW_BLOCK
        or B.shape[:-2] not in ((), X.shape[:-2])  # (broadcasting other batch shapes: one call)
    ):
        return X @ B if out is None else torch.matmul(X, B, out=out)
    return row_blocks_matmul(X, B, out)


def row_blocks_matmul(
    X: torch.Tensor, B: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``X @ B`` as one GEMM per block of about ``ROW_BLOCK`` rows of X (equal blocks), for
    any layout; :func:`thin_matmul` decides where that pays. ``B``: (k, w) or X's batch."""
    rows = X.shape[-2]
    if out is None:
        out = X.new_empty((*X.shape[:-1], B.shape[-1]))
    step = -(-rows // -(-rows // ROW_BLOCK))
    for r in range(0, rows, step):
        torch.matmul(X[..., r : r + step, :], B, out=out[..., r : r + step, :])
    return out


def derive_seed(name: str, seed: int) -> int:
    """A per-tensor seed from the tensor name and the run seed (independent of processing order)."""
    h = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def default_oversample(method: str, oversample: int | None = None) -> int:
    """``oversample``, or when it is None the oversampling ``method`` runs with by default."""
    return OVERSAMPLE.get(method, DEFAULT_OVERSAMPLE) if oversample is None else oversample


def krylov_depth(method: str, niter: int) -> int:
    """How many of the power iteration's ``niter + 1`` blocks Rayleigh-Ritz keeps."""
    shallow = {"halko": 1, "gesvdr": 1, "krylov2": 2, "krylov3": 3}
    return min(shallow.get(method, niter + 1), niter + 1)


def resolve_method(method: str, m: int, n: int, rank: int, oversample: int, niter: int) -> str:
    """The method that actually runs for an (m, n) matrix (what plans and reports show)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    small = min(m, n)
    if method == "gesvdr" and rank + oversample >= small:
        return "exact"  # cuSOLVER requires rank + oversample < min(m, n)
    if method == "krylov" and krylov_depth(method, niter) * (rank + oversample) >= small:
        # The Krylov space would fill all of R^min(m,n): an exact SVD is then cheaper and exact.
        return "exact"
    if method not in ("auto", "krylov2", "krylov3"):
        return method
    width = rank + oversample
    if method == "auto":
        method = "krylov3" if small >= KRYLOV3_MIN_WIDTHS * width else "krylov2"
    # When the basis would span half the smaller side (krylov2; krylov3: two thirds of it),
    # randomization saves little: be exact.
    if max(2, krylov_depth(method, niter)) * width >= small:
        return "exact"
    return method


def svd_lowrank(
    W: torch.Tensor,
    rank: int,
    *,
    niter: int = 4,
    oversample: int | None = None,
    method: str = "auto",
    seed: int | Sequence[int] = 0,
    backend: str = "auto",
    sketch_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``rank`` singular triplets of ``W``.

    Args:
        W: (m, n) or (b, m, n), bf16/fp16/fp32/fp64, any device. On a CPU, bf16/fp16 input
            is widened into rows padded for the GEMMs (:func:`padded_empty`); fp32/fp64 input
            is used as it is laid out, so a caller that owns its fp32 copy can allocate it
            padded (9-12% faster SVDs where rows are an even number of cache lines).
        rank: number of triplets, 1 <= rank <= min(m, n).
        niter: power iterations (PEFT's ``pissa_niter_N``).
        oversample: extra sketch columns (default: ``default_oversample(method)``, 0 for auto
            krylov2 and krylov3, 16 otherwise), capped so the sketch never exceeds min(m, n).
        method: ``auto`` (krylov3 where the short side is long, ``KRYLOV3_MIN_WIDTHS``;
            exact where a krylov2 basis would span half of it; else krylov2) | ``halko`` |
            ``krylov`` | ``krylov2`` | ``krylov3`` | ``exact`` | ``gesvdr`` (native CUDA only).
        seed: int, or one int per batch element. Matrix ``i`` of a batch uses exactly the
            random sketch a single call with ``seed[i]`` would use, so batched == looped.
        backend: ``torch``, ``native`` (the compiled engine; raises
            :class:`pissa_svd.native.NativeUnavailable` saying why if it cannot run), or
            ``auto``: per device, the faster one where it is available (``AUTO_BACKEND``).
        sketch_dtype: None (the working dtype) or ``torch.bfloat16``: the passes over W (the
            power iteration's GEMMs) then read W in bf16, summing in fp32, and everything
            else (orthonormalization, Rayleigh-Ritz, the factors) stays in the working
            dtype; bf16 input is used as it is, with no fp32 copy. About as accurate as the
            working dtype (:func:`_block_krylov`), and faster where the hardware multiplies
            bf16 natively (CPUs with AMX: MKL's bf16 GEMM; GPUs). Randomized methods on the
            torch backend only; ``exact`` ignores it.

    Returns:
        (U (..., m, rank), S (..., rank), Vh (..., rank, n)) in fp32 (fp64 for fp64 input).
    """
    check_weight(W)
    W = W.detach()  # an initialization: nothing here is differentiated
    m, n = W.shape[-2:]
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= min(m, n):
        raise ValueError(f"rank must be an int in [1, min(m, n) = {min(m, n)}], got {rank!r}")
    _check_count(niter, "niter")
    p = default_oversample(method, oversample)
    _check_count(p, "oversample")
    method = resolve_method(method, m, n, rank, p, niter)
    low = check_sketch_dtype(sketch_dtype) is not None and method != "exact"
    if low and backend == "native":
        raise ValueError("sketch_dtype=bfloat16 runs on the torch backend: pass backend='torch'")
    use_native = not low and resolve_backend(backend, W.device.type) == "native"
    if method == "gesvdr" and not (use_native and W.is_cuda):
        raise ValueError(
            "method='gesvdr' is cuSOLVER's: it needs a CUDA tensor and the native backend"
        )

    work = torch.float64 if W.dtype == torch.float64 else torch.float32
    batched = W.ndim == 3
    # A bf16 sketch reads W in bf16 only: no working copy (bf16 input is used as it is).
    X = W.to(sketch_dtype) if low else _working_copy(W, work)
    if not batched:
        X = X.unsqueeze(0)
    seeds = _seeds(seed, X.shape[0])
    width = min(rank + p, min(m, n))  # sketch columns

    def compute(X: torch.Tensor):
        if use_native:
            return _native_svd(X, rank, niter, width, method, seeds)
        if X.shape[0] == 1:
            # One matrix runs as 2-D: each step is then one plain GEMM or LAPACK call rather
            # than a batched one over a batch of one (bench/RESULTS.md: ``one-as-2d``).
            return (x[None] for x in _torch_svd(X[0], rank, niter, width, method, seeds, work))
        return _torch_svd(X, rank, niter, width, method, seeds, work)

    with ieee_matmuls(X.device):
        try:
            U, S, Vh = compute(X)
            shift = _out_of_range(S[..., 0], X)
        except torch.linalg.LinAlgError:
            if not bool(torch.isfinite(W).all()):  # checked only here: it costs a pass over W
                raise ValueError("W holds NaN or inf values; an SVD of it is undefined") from None
            shift = _exponent(X)
        if shift is not None:
            # Weights so large or small that the power iteration's Gram matrices (which hold
            # s_1^4) would overflow or lose their low bits: redone on W * 2^-e, which is exact,
            # with S scaled back. Real weights (s_1 of 1 to 1e3) never come here.
            U, S, Vh = compute(torch.ldexp(X, -shift[:, None, None]))
            S = torch.ldexp(S, shift[:, None])
    if not batched:
        U, S, Vh = U[0], S[0], Vh[0]
    return U.contiguous(), S.contiguous(), Vh.contiguous()


# The power iteration squares s_1 twice (a block of W Wᵀ W Ω, then its Gram matrix): in fp32
# that stays clear of overflow and of subnormals for s_1 in [2^-24, 2^24].
_SAFE_EXPONENT = {torch.float32: 24, torch.float64: 200, torch.bfloat16: 24}


def _out_of_range(top: torch.Tensor, X: torch.Tensor) -> torch.Tensor | None:
    """Per matrix, the power of two to divide X by when its largest singular value ``top``
    is outside the range the fp32 (fp64) iteration handles exactly, or not finite; None when
    every matrix is fine (the usual case: one check of b numbers)."""
    limit = 2.0 ** _SAFE_EXPONENT.get(X.dtype, 24)
    fine = (top >= 1 / limit) & (top <= limit)
    if bool(fine.all()):
        return None
    zero = top == 0  # a zero matrix, or one whose values vanished in the Gram matrices
    if bool(zero.any()):
        fine |= zero & (X.abs().amax(dim=(-2, -1)) == 0)
        if bool(fine.all()):
            return None
    return torch.where(fine, 0, _exponent(X, top)).to(torch.int32)


def _exponent(X: torch.Tensor, top: torch.Tensor | None = None) -> torch.Tensor:
    """log2 of each matrix's scale: of its largest singular value where that is finite and
    nonzero, else of its largest entry times sqrt(m n) (an upper bound of s_1)."""
    amax = X.abs().amax(dim=(-2, -1)).double() * math.sqrt(X.shape[-2] * X.shape[-1])
    scale = (
        amax if top is None else torch.where(torch.isfinite(top) & (top > 0), top.double(), amax)
    )
    return torch.where(scale > 0, torch.log2(scale).round(), 0).to(torch.int32)


@contextlib.contextmanager
def ieee_matmuls(device: torch.device) -> Iterator[None]:
    """fp32 GEMMs in full fp32 on a CUDA ``device`` (no TF32) and bf16 GEMMs summing in fp32,
    whatever the caller's flags (training scripts often turn TF32 on): CholeskyQR and the
    residual need them. Restores the flags after; a no-op on other devices."""
    if torch.device(device).type != "cuda":
        yield
        return
    m = torch.backends.cuda.matmul
    saved = m.allow_tf32, m.allow_bf16_reduced_precision_reduction
    m.allow_tf32 = m.allow_bf16_reduced_precision_reduction = False
    try:
        yield
    finally:
        m.allow_tf32, m.allow_bf16_reduced_precision_reduction = saved


def check_sketch_dtype(sketch_dtype: torch.dtype | None) -> torch.dtype | None:
    """``sketch_dtype`` if it is one :func:`svd_lowrank` takes (None, or bf16: fp16 could
    overflow, as the products with XXᵀ grow like s_1²), else ValueError."""
    if sketch_dtype not in (None, torch.bfloat16):
        raise ValueError(f"sketch_dtype must be None or torch.bfloat16, got {sketch_dtype!r}")
    return sketch_dtype


def _working_copy(W: torch.Tensor, work: torch.dtype) -> torch.Tensor:
    """W in the working dtype. A cast on a CPU goes into padded rows (:func:`padded_empty`),
    in the orientation W is stored in. W already in the working dtype is used as it is:
    copying it only for the layout lost more than the faster GEMMs saved (a fresh buffer is
    page-faulted in on every call): 5.2% slower on one layer's shapes
    (``python bench/profile_decompose.py padded-svd``, its second line).
    """
    if W.dtype == work or W.device.type != "cpu":
        return W.to(work)
    flip = W.stride(-1) != 1 and W.stride(-2) == 1  # stored transposed: keep that layout
    V = W.mT if flip else W
    X = padded_empty(V.shape, work).copy_(V)
    return X.mT if flip else X


def resolve_backend(backend: str, device_type: str) -> str:
    """The backend that runs on ``device_type``: "native" or "torch".

    Raises ValueError for an unknown name and ``NativeUnavailable`` (saying why) when "native"
    is asked for by name but cannot run.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "torch":
        return "torch"
    from . import native

    if backend == "native":
        native.module(device_type)  # raises NativeUnavailable with the reason
        return "native"
    if AUTO_BACKEND.get(device_type) == "native" and native.available(device_type)[0]:
        return "native"
    return "torch"


def _native_svd(X, rank, niter, width, method, seeds):
    """The compiled engine; any matrix failing its checks is redone on the torch path."""
    from . import native

    m, n = X.shape[-2:]
    omega = None
    if method in ("halko", "krylov", "krylov2", "krylov3"):
        omega = _gaussian(seeds, max(m, n), width, X)
    U, S, Vh, bad = native.svd(X.contiguous(), rank, niter, method, omega, width - rank)
    if bad:
        idx = torch.tensor(bad, device=X.device)
        fallback = "exact" if method == "gesvdr" else method
        Ub, Sb, Vhb = _torch_svd(X[idx], rank, niter, width, fallback, [seeds[i] for i in bad])
        U[idx], S[idx], Vh[idx] = Ub, Sb, Vhb
    return U, S, Vh


def _torch_svd(X, rank, niter, width, method, seeds, work=None):
    """The torch backend on X (b, m, n), or one matrix (m, n) (``seeds`` then has one seed).
    ``work``: the dtype of the result and of all but the passes over X, when X is a bf16
    sketch copy (default: X's dtype)."""
    m, n = X.shape[-2:]
    work = work or X.dtype
    if method == "exact":
        if m < n:  # LAPACK is markedly faster on tall than on wide input (measured 1.6x)
            V, S, Uh = torch.linalg.svd(X.mT, full_matrices=False)
            U, Vh = Uh.mT, V.mT
        else:
            U, S, Vh = torch.linalg.svd(X, full_matrices=False)
    else:
        # Work on the short side (m <= n): the orthonormal bases then live in the smaller space.
        flip = m > n
        Xs = X.mT if flip else X
        omega = _gaussian(seeds, Xs.shape[-1], width, X, work)
        if X.ndim == 2:
            omega = omega[0]
        U, S, Vh = _block_krylov(Xs, omega, niter, rank, krylov_depth(method, niter))
        if flip:
            U, Vh = Vh.mT, U.mT
    return U[..., :rank], S[..., :rank], Vh[..., :rank, :]


FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


def check_weight(W: object, what: str = "W") -> None:
    """ValueError unless ``W`` is a 2-D (m, n) or 3-D (b, m, n) bf16/fp16/fp32/fp64 tensor
    with values (not on the meta device)."""
    if not isinstance(W, torch.Tensor) or W.ndim not in (2, 3):
        raise ValueError(f"{what} must be a 2-D (m, n) or 3-D (b, m, n) tensor, got {_describe(W)}")
    if W.dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"{what} must be floating point (bf16/fp16/fp32/fp64), got {W.dtype}; upcast fp8 "
            "or integer weights first"
        )
    if W.device.type == "meta":
        raise ValueError(f"{what} is on the meta device, so it has no values; load them first")
    if W.numel() == 0:
        raise ValueError(f"{what} is empty (shape {tuple(W.shape)}); it has no singular values")


def check_float_dtype(dtype: object, what: str) -> None:
    """ValueError unless ``dtype`` is torch.bfloat16/float16/float32/float64."""
    if dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"{what} must be torch.bfloat16, torch.float16, torch.float32 or torch.float64, "
            f"got {dtype!r}"
        )


def _check_count(value: object, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{what} must be an int >= 0, got {value!r}")


def _describe(x: object) -> str:
    if isinstance(x, torch.Tensor):
        return f"shape {tuple(x.shape)}"
    return type(x).__name__


SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed takes


def _seeds(seed: int | Sequence[int], b: int) -> list[int]:
    """One seed per batch member: ``seed + i`` for an int, or the given ones."""
    try:
        seeds = [operator.index(seed) + i for i in range(b)]
    except TypeError:
        try:
            seeds = [operator.index(s) for s in seed]
        except TypeError:
            raise ValueError(f"seed must be an int or one int per matrix, got {seed!r}") from None
    if len(seeds) != b:
        raise ValueError(f"got {len(seeds)} seeds for a batch of {b} matrices")
    if not all(SEED_MIN <= s <= SEED_MAX for s in seeds):
        raise ValueError(f"seeds must be ints in [-2**63, 2**64 - 1], got {seed!r}")
    return seeds


def _gaussian(
    seeds: list[int], n: int, k: int, like: torch.Tensor, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """(b, n, k) standard normal test matrix in ``dtype`` (default ``like``'s) on ``like``'s
    device; slice i depends only on seeds[i]."""
    dtype = dtype or like.dtype
    out = torch.empty((len(seeds), n, k), dtype=dtype, device=like.device)
    gen = torch.Generator(device=like.device)
    for i, s in enumerate(seeds):
        gen.manual_seed(s)
        torch.randn((n, k), generator=gen, dtype=dtype, device=like.device, out=out[i])
    return out


_EYES: dict[tuple, torch.Tensor] = {}


def _eye(k: int, like: torch.Tensor) -> torch.Tensor:
    """The (k, k) identity in ``like``'s dtype and device, made once (read only)."""
    key = (k, like.dtype, like.device)
    eye = _EYES.get(key)
    if eye is None:
        eye = _EYES[key] = torch.eye(k, dtype=like.dtype, device=like.device)
    return eye


def orthonormalize(Y: torch.Tensor, rounds: int = 2) -> torch.Tensor:
    """Orthonormal basis of the columns of Y (..., m, k), m >= k, by CholeskyQR2.

    CholeskyQR2 (Gram -> Cholesky -> triangular solve, twice) uses only BLAS-3 and is the fastest
    thin QR on CPUs and GPUs. It breaks down when Y is too ill-conditioned for its Gram matrix
    (cond(Y) >~ 1/sqrt(eps)): then the Cholesky fails or the second Gram is far from identity, and
    we fall back to Householder QR, which is unconditionally stable (and returns an orthonormal
    basis even for rank-deficient or zero Y, so no NaN escapes).

    ``rounds=1`` (plain CholeskyQR) is enough between power iterations, where the basis only has
    to stay well conditioned, not exactly orthonormal.
    """
    Q = _cholesky_qr(Y)
    if Q is not None and rounds > 1:
        Q = _cholesky_qr(Q, check_identity=True)
    if Q is not None:
        return Q
    return torch.linalg.qr(Y, mode="reduced").Q


def _cholesky_qr(Y: torch.Tensor, check_identity: bool = False) -> torch.Tensor | None:
    G = Y.mT @ Y
    # After one good round G ~= I; a large deviation means round one lost orthogonality
    # (the test is also false for NaN).
    if check_identity and not bool(((G - _eye(G.shape[-1], G)).abs() <= 0.5).all()):
        return None
    L, info = torch.linalg.cholesky_ex(G)
    if bool(info.any()) or not bool(torch.isfinite(L).all()):
        return None
    # Q = Y L^{-T}. Inverting the small (k, k) factor and doing one GEMM is ~5x faster than a
    # triangular solve with the tall Y on CPU; any loss of orthogonality is what round two is for.
    return Y @ torch.linalg.solve_triangular(L, _eye(L.shape[-1], L), upper=False).mT


def _small_svd(Bt: torch.Tensor, Q: torch.Tensor, rank: int):
    """Rayleigh-Ritz: top-``rank`` SVD of the projection B = Qᵀ X (L, n), given ``Bt = Xᵀ Q``.

    B Bᵀ = Btᵀ Bt is only (L, L): its eigendecomposition (in fp64), B Bᵀ = Ur S² Urᵀ, gives
    the left vectors and the values, and the right vectors follow from one thin GEMM,
    V = Bt Ur S⁻¹, for the top ``rank`` only. The Gram matrix squares B's condition number,
    which only costs accuracy in values far below the largest: measured on spectra decaying
    like i^-2 (s_1 / s_64 = 4096) it is as accurate as the QR route, with V orthonormal to
    3e-6 in fp32. V's orthonormality is checked, and a matrix where it fails (a numerically
    rank-deficient B) is redone by ``_small_svd_qr``, which is stable for any B. For a
    320-column Krylov basis of a 2048 x 5632 matrix it took 31.5 ms against the QR route's
    89 ms (medians, bench/test_hotpaths.py).
    """
    G = (Bt.mT @ Bt).double()
    lam, Ur = torch.linalg.eigh(G)  # ascending
    lam, Ur = lam.flip(-1)[..., :rank], Ur.flip(-1)[..., :rank]
    S = lam.clamp_min(0).sqrt()
    ok = S[..., -1] > 0
    V = Bt @ (Ur / torch.where(S > 0, S, 1).unsqueeze(-2)).to(Bt.dtype)
    tol = 1e-4 if V.dtype == torch.float32 else 1e-10
    ok &= ((V.mT @ V - _eye(rank, V)).abs() <= tol).flatten(-2).all(-1)
    U, S, Vh = Q @ Ur.to(Q.dtype), S.to(Q.dtype), V.mT
    if U.ndim == 2:  # one matrix
        return (U, S, Vh) if bool(ok) else _small_svd_qr(Bt, Q, rank)
    bad = (~ok).nonzero().flatten()
    if bad.numel():
        U[bad], S[bad], Vh[bad] = _small_svd_qr(Bt[bad], Q[bad], rank)
    return U, S, Vh


def _small_svd_qr(Bt: torch.Tensor, Q: torch.Tensor, rank: int):
    """Rayleigh-Ritz for any B, however ill-conditioned: thin QR Bᵀ = Qb R, then the SVD of
    the (L, L) factor, B = Rᵀ Qbᵀ = Ur S (Vr Qbᵀ)."""
    Qb = orthonormalize(Bt)
    R = Qb.mT @ Bt  # (b, l, l)
    Ur, S, Vhr = torch.linalg.svd(R.mT)
    return Q @ Ur[..., :rank], S[..., :rank], Vhr[..., :rank, :] @ Qb.mT


def _block_krylov(X: torch.Tensor, omega: torch.Tensor, niter: int, rank: int, depth: int):
    """Power iteration from XΩ; Rayleigh-Ritz over its last ``depth`` blocks.

    The blocks are Q_i = orth((XXᵀ)^i XΩ), i = 0..q. ``depth = q + 1`` is the block Krylov
    subspace [Q_0 ... Q_q] of Musco & Musco (2015); ``depth = 1`` is Halko's range finder;
    ``depth = 2`` (krylov2) adds the previous block to it, which on real weights removes most
    of Halko's excess error at the same block width.
    Rayleigh-Ritz needs Xᵀ K for the kept basis K: the power iteration already computes Xᵀ Q_i
    for every block but the last (it is the next block's starting point), so keeping those
    products leaves one thin pass: 2q + 2 passes whatever the depth. Kept blocks are fully
    orthogonalized against each other; the blocks before them only need to stay well
    conditioned (one CholeskyQR round). Only the blocks Q_i (the short side) are
    orthonormalized: Xᵀ Q_i is used as it comes, since any basis of its span gives the same
    next block. That only squares the condition number the next CholeskyQR sees, to about
    (s_1 / s_w)²: median 4.3, at most 225 over SmolLM2's 210 weights at w = 64
    (``python bench/profile_decompose.py spectra``), where fp32
    CholeskyQR keeps a basis well conditioned up to ~1e3 (and ``orthonormalize`` falls back
    to Householder QR where it fails). It saves a third of the orthonormalizations: 3-4% of
    the SVD time of a layer of the decompose benchmark's shapes on a CPU
    (``python bench/profile_decompose.py paired-svd``, which alternates the two variants).

    X may be bf16 (``svd_lowrank(..., sketch_dtype=torch.bfloat16)``) while ``omega`` is in
    the working dtype, which the basis, its orthonormalization and Rayleigh-Ritz keep
    (:func:`_pass`). The power iteration's lead passes round their thin operand to bf16
    (relative error u = 2^-9), which only perturbs iterates that the next pass filters
    again. The passes that make the kept basis and Rayleigh-Ritz's ``P = Xᵀ K`` split their
    operand into two bf16 parts (hi + lo, one GEMM of twice the columns), so that they are
    as exact as the working dtype's for bf16 weights: the next Krylov block is a small
    difference of large terms (Gram-Schmidt), which rounding would swamp. Measured on a
    spectrum decaying like i^-0.35: halko and krylov as accurate as in fp32, krylov3 within
    3%, krylov2 within 30% of fp32's excess error (tests/test_linalg.py); on real weights
    and LLM-shaped matrices the same worst error to three digits (bench/RESULTS.md, "bf16
    sketch").
    """
    *batch, m, n = X.shape  # (b, m, n), or (m, n) for one matrix
    w = omega.shape[-1]  # block width
    d = min(depth, niter + 1)
    lead = niter + 1 - d  # blocks before the kept ones
    Xt = X.mT
    work = omega.dtype  # X's, or wider where X is a bf16 sketch copy (_pass)
    Q = orthonormalize(_pass(X, omega, work), rounds=1 if lead else 2)
    for i in range(lead):
        Q = orthonormalize(_pass(X, _pass(Xt, Q), work), rounds=2 if i == lead - 1 else 1)
    # resolve_method guarantees the d blocks fit in R^m, so the space never fills up.
    K = omega.new_empty((*batch, m, d * w))  # the kept basis, block by block
    P = omega.new_empty((*batch, n, d * w))  # Xᵀ K, block by block
    K[..., :w] = Q
    tol = 1000 * torch.finfo(work).eps
    for i in range(1, d):
        Ki = K[..., : i * w]
        Pi = _pass(Xt, K[..., (i - 1) * w : i * w], out=P[..., (i - 1) * w : i * w], exact=True)
        Y = _pass(X, Pi, work, exact=True)
        # Block Gram-Schmidt against the basis so far, twice ("twice is enough").
        for _ in range(2):
            Y = Y - Ki @ (Ki.mT @ Y)
        Qn = orthonormalize(Y)
        if float((Ki.mT @ Qn).abs().amax()) > tol:
            # The new block collapsed into the old space (exact low rank): extend K with an
            # orthonormal complement instead; Householder keeps it orthonormal whatever Y is.
            Qn = torch.linalg.qr(torch.cat([Ki, Y], dim=-1), mode="reduced").Q[..., i * w :]
        K[..., i * w : (i + 1) * w] = Qn
    _pass(Xt, K[..., (d - 1) * w :], out=P[..., (d - 1) * w :], exact=True)  # the last pass
    return _small_svd(P, K, rank)


def _pass(
    X: torch.Tensor,
    B: torch.Tensor,
    dtype: torch.dtype | None = None,
    out: torch.Tensor | None = None,
    exact: bool = False,
) -> torch.Tensor:
    """One pass over W: ``X @ B`` (:func:`thin_matmul`), the result in ``dtype`` (default:
    B's) or written into ``out``.

    Where X is a bf16 sketch copy and B is not, B is rounded to bf16 (``exact``: split into
    two bf16 parts, hi + lo, multiplied in one GEMM of twice the columns) and the GEMM sums
    in fp32 (:func:`_bf16_matmul_f32`).
    """
    if B.dtype == X.dtype:
        Y = thin_matmul(X, B, out)
    elif exact:  # B = hi + lo, both in bf16 (16 of B's 24 bits), in one GEMM of 2w columns
        hi = B.to(X.dtype)
        Y = _bf16_matmul_f32(X, torch.cat([hi, (B - hi.to(B.dtype)).to(X.dtype)], dim=-1))
        Y = Y[..., : B.shape[-1]] + Y[..., B.shape[-1] :]
    else:
        Y = _bf16_matmul_f32(X, B.to(X.dtype), out)
    if out is not None:
        return Y if Y is out else out.copy_(Y)
    return Y.to(dtype or B.dtype)


def _bf16_matmul_f32(
    X: torch.Tensor, B: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``X @ B`` for bf16 X and B as fp32 (into ``out`` where it is an fp32 tensor with
    contiguous rows): on a CPU with MKL's bf16 GEMM (:func:`native.bf16_matmul`) or on a GPU
    (``out_dtype``) the fp32 sums themselves; otherwise torch's bf16 GEMM, whose output is
    rounded to bf16 (each column by itself, so a lo part keeps its own precision)."""
    from . import native

    if X.device.type == "cpu":
        Y = out
        if Y is None or Y.dtype != torch.float32 or not native.rows_contiguous(Y):
            Y = torch.empty((*X.shape[:-1], B.shape[-1]), dtype=torch.float32)
        if native.bf16_matmul(X, B, Y):
            return Y
    elif X.is_cuda and X.ndim == B.ndim:
        mm = torch.mm if X.ndim == 2 else torch.bmm
        try:
            return mm(X, B, out_dtype=torch.float32)
        except (TypeError, RuntimeError, NotImplementedError):  # a torch without it
            pass
    return (X @ B).float()
