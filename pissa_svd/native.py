"""The compiled engine (csrc/), loaded on first use, never at import.

``pissa_svd._native`` runs the C++ algorithm on the CPU over SciPy's BLAS/LAPACK;
``pissa_svd._native_cuda`` runs the same code over cuBLAS/cuSOLVER on the caller's current
stream. Tensors cross by DLPack. If a module was not built or fails to load, the reason is
raised as :class:`NativeUnavailable` when the native backend is asked for, and ``pissa-svd env``
prints it; the torch path always works.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import json
import os
import sys
from pathlib import Path
from types import ModuleType

import torch

MODULES = {"cpu": "pissa_svd._native", "cuda": "pissa_svd._native_cuda"}
BUILD_INFO = Path(__file__).with_name("_build_info.json")
# Orthonormality the result must have, else the matrix is redone on the torch path (whose
# Householder fallback handles rank-deficient and zero matrices).
ORTHO_TOL = {torch.float32: 1e-4, torch.float64: 1e-10}

_loaded: dict[str, ModuleType | NativeUnavailable] = {}


class NativeUnavailable(RuntimeError):
    """The native backend was asked for but cannot run here; the message says why."""


def build_info() -> dict:
    try:
        return json.loads(BUILD_INFO.read_text())
    except (OSError, ValueError):
        return {}


def module(device_type: str) -> ModuleType:
    """The native module for ``device_type`` ("cpu" or "cuda"), or NativeUnavailable."""
    if device_type not in MODULES:
        raise NativeUnavailable(f"no native backend for {device_type} tensors")
    if device_type not in _loaded:
        _loaded[device_type] = _load(device_type)
    got = _loaded[device_type]
    if isinstance(got, NativeUnavailable):
        raise got
    return got


def available(device_type: str) -> tuple[bool, str]:
    """(usable, what it is or why not), for ``pissa-svd env`` and backend selection."""
    try:
        mod = module(device_type)
    except NativeUnavailable as exc:
        return False, str(exc)
    return True, f"{mod.__name__} ({Path(mod.__file__).name})"


def _load(device_type: str) -> ModuleType | NativeUnavailable:
    name = MODULES[device_type]
    if os.environ.get("PISSA_SVD_NO_EXT") == "1":
        return NativeUnavailable(f"{name}: disabled by PISSA_SVD_NO_EXT=1")
    built = build_info().get(device_type) or ""
    if built.startswith("skipped"):
        return NativeUnavailable(f"{name} was not built ({built})")
    if built.startswith("failed"):  # a module left from an earlier build is not this source's
        return NativeUnavailable(f"{name} failed to build ({built[:300]})")
    preload = _preload_cuda_libraries() if device_type == "cuda" else []
    try:
        return importlib.import_module(name)
    except Exception as exc:  # ImportError, OSError from a missing .so, anything at load time
        hint = "" if built else " (reinstall with `pip install -e .` to build it)"
        cause = f" ({'; '.join(preload)})" if preload else ""
        return NativeUnavailable(f"{name} failed to load: {exc}{cause}{hint}")


def _preload_cuda_libraries() -> list[str]:
    """Load the wheels' versioned cuBLAS/cuSOLVER globally so the module's own load finds them.

    Returns the load errors (a missing cusparse/nvJitLink shows up here, with its real name).
    """
    errors = []
    for entry in sys.path:
        lib = Path(entry or ".") / "nvidia" / "cu13" / "lib"
        if not lib.is_dir():
            continue
        for so in ("libcublasLt.so.13", "libcublas.so.13", "libcusolver.so.12"):
            if (lib / so).exists():
                try:
                    ctypes.CDLL(str(lib / so), mode=ctypes.RTLD_GLOBAL)
                except OSError as exc:
                    errors.append(str(exc))
        break
    return errors


# (src, dst) dtype pairs whose conversion ``copy_rows`` fuses with the sum of squares.
FUSED_COPIES = {
    (torch.bfloat16, torch.float32),
    (torch.float32, torch.bfloat16),
    (torch.float32, torch.float32),
}


def copy_rows(dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor | None:
    """``dst.copy_(src)`` for (rows, cols) CPU matrices with contiguous (possibly padded) rows,
    fused with the sum of squares of the fp32 side, as a 0-d fp64 tensor.

    torch converts and then reads the result again for its norm; the compiled loop squares each
    value as it converts it, on ``torch.get_num_threads()`` threads, with the GIL released.
    Every bit of ``dst`` is what ``copy_`` writes (bf16 rounding: to nearest, ties to even);
    the sum is accumulated in fp64. Returns None where it does not apply: no compiled module
    (or ``PISSA_SVD_NO_EXT=1``), a dtype pair outside ``FUSED_COPIES``, another device or
    layout; the caller then uses torch.
    """
    if (
        (src.dtype, dst.dtype) not in FUSED_COPIES
        or src.device.type != "cpu"
        or dst.device.type != "cpu"
        or src.ndim != 2
        or src.shape != dst.shape
        or not all(rows_contiguous(t) for t in (src, dst))
    ):
        return None
    fused = _cpu_function("copy_rows")
    if fused is None:
        return None
    return torch.tensor(fused(src, dst, torch.get_num_threads()), dtype=torch.float64)


def _cpu_function(name: str):
    """The compiled CPU module's function ``name``, or None where there is no module (or one
    built before the function existed)."""
    try:
        return getattr(module("cpu"), name, None)
    except NativeUnavailable:
        return None


def has_nf4_fake() -> bool:
    """Whether the compiled NF4 loop is there (:func:`nf4_fake`)."""
    return _cpu_function("nf4_fake") is not None


def nf4_fake(
    x: torch.Tensor, code: torch.Tensor, mid: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """NF4 deq(Q(x)) of a 1-D contiguous fp32 CPU tensor by the compiled loop (csrc/nf4.h),
    on ``torch.get_num_threads()`` threads with the GIL released, into ``out`` (1-D contiguous
    fp32, x's length) or a new tensor. Only where :func:`has_nf4_fake`. ``code`` (16) and
    ``mid`` (15): the fp32 NF4 values and their midpoints (``quant._nf4_tables``)."""
    out = torch.empty_like(x) if out is None else out
    _cpu_function("nf4_fake")(x, out, code.tolist(), mid.tolist(), torch.get_num_threads())
    return out


def rows_contiguous(t: torch.Tensor) -> bool:
    """Whether the matrices of ``t`` (..., rows, cols) have contiguous rows that do not overlap:
    contiguous, or rows padded apart (``linalg.padded_empty``). The layout BLAS and the
    compiled loops take as they are."""
    if t.ndim < 2:
        return False
    rows, cols = t.shape[-2:]
    return (cols <= 1 or t.stride(-1) == 1) and (rows <= 1 or t.stride(-2) >= cols)


def svd(
    X: torch.Tensor,
    rank: int,
    niter: int,
    method: str,
    omega: torch.Tensor | None = None,
    oversample: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    """Native SVD of a contiguous fp32/fp64 batch X (b, m, n).

    ``omega`` is the (b, max(m, n), l) sketch of halko/krylov/krylov2/krylov3 (``oversample`` is
    gesvdr's). Returns U, S, Vh and the
    indices of matrices whose result did not pass the checks (non-zero status from the
    algorithm, non-finite values, or U/Vh not orthonormal to ORTHO_TOL); the caller redoes those.
    """
    mod = module(X.device.type)
    # DLPack exports neither tensors that require grad (e.g. a Parameter) nor CUDA tensors
    # of a device other than the current one.
    X = X.detach()
    omega = omega.detach() if omega is not None else X.new_empty((X.shape[0], 0, 0))
    b, m, n = X.shape
    U = torch.empty((b, m, rank), dtype=X.dtype, device=X.device)
    S = torch.empty((b, rank), dtype=X.dtype, device=X.device)
    Vh = torch.empty((b, rank, n), dtype=X.dtype, device=X.device)
    with torch.cuda.device(X.device) if X.is_cuda else contextlib.nullcontext():
        stream = torch.cuda.current_stream(X.device).cuda_stream if X.is_cuda else 0
        if method == "gesvdr":
            status = mod.gesvdr(X, U, S, Vh, rank, oversample, niter, stream)
        else:
            status = mod.svd(X, omega, U, S, Vh, rank, niter, method, stream)
    eye = torch.eye(rank, dtype=X.dtype, device=X.device)
    err = torch.maximum(
        (U.mT @ U - eye).abs().amax(dim=(-2, -1)), (Vh @ Vh.mT - eye).abs().amax(dim=(-2, -1))
    )
    ok = torch.isfinite(S).all(-1) & (err <= ORTHO_TOL[X.dtype])
    bad = [i for i, (s, good) in enumerate(zip(status, ok.tolist(), strict=True)) if s or not good]
    return U, S, Vh, bad


# MKL's bf16 x bf16 -> fp32 GEMM, from the MKL that torch's CPU library carries (AMX or
# AVX512-BF16 kernels where the CPU has them). torch's own bf16 matmul on a CPU rounds its
# output to bf16; this one keeps the fp32 sums (svd_lowrank's bf16 sketch, linalg._pass).
_CBLAS_ROW_MAJOR, _CBLAS_NO_TRANS, _CBLAS_TRANS = 101, 111, 112
_bf16_gemm: ctypes._CFuncPtr | None | bool = False  # False: not looked up yet


def _bf16_gemm_fn():
    global _bf16_gemm
    if _bf16_gemm is False:
        _bf16_gemm = None
        lib = Path(torch.__file__).with_name("lib") / "libtorch_cpu.so"
        if os.environ.get("PISSA_SVD_NO_EXT") != "1" and lib.exists():
            try:
                fn = ctypes.CDLL(str(lib)).cblas_gemm_bf16bf16f32
            except (OSError, AttributeError):  # another BLAS than MKL, or an older MKL
                fn = None
            if fn is not None:
                i, f, p = ctypes.c_int, ctypes.c_float, ctypes.c_void_p
                fn.argtypes = [i, i, i, i, i, i, f, p, i, p, i, f, p, i]
                fn.restype = None
                _bf16_gemm = fn
    return _bf16_gemm


def bf16_support() -> str:
    """How a CPU bf16 sketch multiplies here, for ``pissa-svd env``."""
    flags = ""
    with contextlib.suppress(OSError):
        flags = Path("/proc/cpuinfo").read_text()
    hw = [f for f in ("amx_bf16", "avx512_bf16") if f" {f}" in flags]
    if _bf16_gemm_fn() is None:
        return "torch's bf16 GEMM (sums rounded to bf16: no MKL bf16 GEMM in this torch)"
    return "MKL cblas_gemm_bf16bf16f32 (fp32 sums); " + (
        f"CPU bf16 instructions: {', '.join(hw)}"
        if hw
        else "no bf16 instructions (MKL converts inside its GEMM: measure before using it)"
    )


def bf16_matmul(A: torch.Tensor, B: torch.Tensor, out: torch.Tensor) -> bool:
    """``out = A @ B`` for bf16 CPU matrices (2-D or one batch dimension) with fp32 sums and
    an fp32 ``out``, by MKL's ``cblas_gemm_bf16bf16f32``. ``A`` may be a transposed view;
    ``B`` and ``out`` need contiguous rows. Returns False (nothing done) where it does not
    apply: no such MKL here (or ``PISSA_SVD_NO_EXT=1``), another device, dtype or layout.
    """
    if not (
        A.dtype == B.dtype == torch.bfloat16
        and out.dtype == torch.float32
        and A.device.type == B.device.type == out.device.type == "cpu"
        and A.ndim == B.ndim == out.ndim
        and A.ndim in (2, 3)
        and rows_contiguous(B)
        and rows_contiguous(out)
        and (rows_contiguous(A) or rows_contiguous(A.mT))
    ):
        return False
    fn = _bf16_gemm_fn()
    if fn is None:
        return False
    if A.ndim == 2:
        A, B, out = A[None], B[None], out[None]
    (m, k), n = A.shape[-2:], B.shape[-1]
    if A.shape[0] != out.shape[0] or B.shape[0] != out.shape[0] or k != B.shape[-2]:
        return False
    if out.shape[-2:] != (m, n):  # MKL would write outside it
        return False
    ld_limit = 2**31 - 1
    trans = not (k <= 1 or A.stride(-1) == 1)
    lda = A.stride(-1) if trans else A.stride(-2)
    if max(m, n, k, lda, B.stride(-2), out.stride(-2)) > ld_limit:
        return False
    for a, b, c in zip(A, B, out, strict=True):
        fn(
            _CBLAS_ROW_MAJOR,
            _CBLAS_TRANS if trans else _CBLAS_NO_TRANS,
            _CBLAS_NO_TRANS,
            m,
            n,
            k,
            1.0,
            a.data_ptr(),
            max(lda, 1),
            b.data_ptr(),
            max(b.stride(-2), 1),
            0.0,
            c.data_ptr(),
            max(c.stride(-2), 1),
        )
    return True
