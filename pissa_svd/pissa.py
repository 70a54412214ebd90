"""PiSSA factors from an SVD. Pure functions, no IO.

Convention (used everywhere in pissa-svd):
    weight W: (out, in);  W = U @ diag(S) @ Vh,  U: (out, r), S: (r,), Vh: (r, in)
    scaling s = lora_alpha / r
    A = sqrt(S / s)[:, None] * Vh      (r, in)    -> lora_A.weight
    B = U * sqrt(S / s)                (out, r)   -> lora_B.weight
    W_res = W - s * B @ A              (out, in)  frozen residual, so W_res + s * B @ A == W

GPT-2's Conv1D stores its weight transposed, (in, out); pass ``fan_in_fan_out=True`` and the
residual comes back in the stored layout while A and B keep the shapes above (PEFT's layout).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from . import native
from .linalg import FLOAT_DTYPES, check_float_dtype, check_weight, ieee_matmuls, svd_lowrank


class PissaFactors(NamedTuple):
    A: torch.Tensor  # (r, in)  adapter dtype
    B: torch.Tensor  # (out, r) adapter dtype
    W_res: torch.Tensor  # stored layout, residual dtype


def pissa_factors(
    W: torch.Tensor,
    rank: int,
    *,
    scaling: float = 1.0,
    fan_in_fan_out: bool = False,
    adapter_dtype: torch.dtype | None = None,
    residual_dtype: torch.dtype | None = None,
    svd: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    inplace: bool = False,
    **svd_kwargs,
) -> PissaFactors:
    """Split W into a PiSSA adapter (A, B) and a frozen residual.

    Args:
        W: (out, in), or (in, out) with ``fan_in_fan_out``; a leading batch dim is allowed.
            bf16/fp16/fp32/fp64.
        rank: adapter rank r.
        scaling: lora_alpha / r (1 for PiSSA's alpha = r).
        adapter_dtype / residual_dtype: output dtypes (default: W's dtype).
        svd: a precomputed ``(U, S, Vh)`` of the (out, in) matrix; otherwise
            :func:`svd_lowrank` is called with ``svd_kwargs``.
        inplace: when W is already in the working dtype (fp32, or fp64), compute the residual in
            W's own buffer instead of a copy (W is overwritten). Saves one (out, in) buffer.

    The residual is computed from A and B *as stored* (after rounding to ``adapter_dtype``), in
    fp32 (fp64 for fp64 input), so rounding W_res to ``residual_dtype`` is the only error left
    in ``W_res + s * B @ A``.
    """
    if not (scaling > 0 and math.isfinite(scaling)):
        raise ValueError(f"scaling must be a finite number > 0, got {scaling}")
    check_weight(W)
    W = W.detach()  # an initialization: nothing here is differentiated
    adapter_dtype = adapter_dtype or W.dtype
    residual_dtype = residual_dtype or W.dtype
    check_float_dtype(adapter_dtype, "adapter_dtype")
    check_float_dtype(residual_dtype, "residual_dtype")
    if svd is None:
        svd = svd_lowrank(W.mT if fan_in_fan_out else W, rank, **svd_kwargs)
    else:
        _check_svd(svd, W.mT if fan_in_fan_out else W, rank)
        if not all_finite(W):  # svd_lowrank says so itself
            raise ValueError("W holds NaN or inf values; its residual would too")
    U, S, Vh = svd
    A, B = adapter_factors(U, S, Vh, scaling=scaling, adapter_dtype=adapter_dtype)
    if problem := adapter_range_problem(A, B, S, scaling):
        raise AdapterRangeError(problem, adapter_dtype, scaling)
    work = U.dtype
    inplace = inplace and W.dtype == work and _batch_of_rows(W) is not None
    # Not inplace, the residual is a fresh tensor for the caller: contiguous, as safetensors
    # and most consumers need (padded rows would only speed up the one GEMM below).
    res = W if inplace else W.to(work, memory_format=torch.contiguous_format, copy=True)
    out = None if residual_dtype == work else torch.empty_like(res, dtype=residual_dtype)
    sumsq = subtract_adapter_(res, A, B, scaling=scaling, fan_in_fan_out=fan_in_fan_out, out=out)
    if out is not None and rounding_overflowed(out, sumsq.max()):
        raise ValueError(
            f"the residual does not fit in {residual_dtype} (its values overflow to inf); "
            "use a wider residual_dtype (bfloat16 or float32)"
        )
    return PissaFactors(A, B, res if out is None else out)


def _check_svd(svd: object, W: torch.Tensor, rank: int) -> None:
    """ValueError unless ``svd`` is (U, S, Vh) of rank ``rank`` for W (..., m, n): U
    (..., m, rank), S (..., rank) finite and >= 0, Vh (..., rank, n), float tensors on W's
    device."""
    lead, (m, n) = tuple(W.shape[:-2]), tuple(W.shape[-2:])
    want = {"U": (*lead, m, rank), "S": (*lead, rank), "Vh": (*lead, rank, n)}
    if not isinstance(svd, (tuple, list)) or len(svd) != 3:
        raise ValueError("svd must be a tuple (U, S, Vh), as svd_lowrank returns")
    for (name, shape), t in zip(want.items(), svd, strict=True):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(
                f"svd's {name} must have shape {shape} for W {tuple(W.shape)} at rank {rank}, "
                f"got {got}"
            )
        if t.dtype not in FLOAT_DTYPES or t.device != W.device:
            raise ValueError(f"svd's {name} must be a float tensor on {W.device}")
    S = svd[1]
    if not (all_finite(S) and bool((S >= 0).all())):
        raise ValueError("svd's singular values S must be finite and >= 0")


def adapter_factors(
    U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, *, scaling: float, adapter_dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """A = sqrt(S / s) Vh and B = U sqrt(S / s), rounded to ``adapter_dtype``."""
    root = (S.to(U.dtype) / scaling).sqrt()
    A = (root.unsqueeze(-1) * Vh).to(adapter_dtype)
    B = (U * root.unsqueeze(-2)).to(adapter_dtype)
    return A, B


class AdapterRangeError(ValueError):
    """The scaling puts the adapter out of its dtype's range (:func:`adapter_range_problem`)."""

    def __init__(self, problem: str, dtype: torch.dtype, scaling: float):
        self.problem = problem
        super().__init__(
            f"the adapter {problem} in {dtype} at scaling {scaling:g}; use a scaling nearer 1 "
            "(lora_alpha nearer r) or a wider adapter_dtype"
        )


def adapter_range_problem(
    A: torch.Tensor, B: torch.Tensor, S: torch.Tensor, scaling: float
) -> str | None:
    """Why A and B do not represent sqrt(S / s) Vh and U sqrt(S / s) in their dtype, or None.

    A scaling far from 1 pushes the factors out of the adapter dtype's range: too small an
    alpha overflows them to inf; too large a one (``--alpha 5e13`` in fp16) rounds them to
    zeros and subnormals, a model that is still exact but an adapter that has lost its
    principal directions. Rows of Vh and columns of U are unit vectors, so each of
    ||A||_F^2 and ||B||_F^2 is sum(S) / s; an entry below the dtype's normal range is
    rounded with an absolute error up to tiny * eps / 2, and those errors may add up to at
    most twice the dtype's relative precision (eps) of that norm. Larger still (``--alpha
    1e37`` in fp32), the factors are in range but their product B @ A, whose entries are about
    ||S|| / s / sqrt(out * in), is not in the working precision (S's dtype): the residual
    W - s B A, and PEFT's forward, would lose it (weights that small to begin with are no
    fault of the scaling: their residual is as exact as they allow).
    """
    if not (bool(torch.isfinite(A).all()) and bool(torch.isfinite(B).all())):
        return "overflows"
    want = S.double().sum(-1) / scaling
    for F in (A, B):
        fi = torch.finfo(F.dtype)
        small = (F.abs() < fi.tiny).sum(dim=(-2, -1)).double()  # subnormals and zeros
        rel = (small * (fi.tiny * fi.eps / 2) ** 2 / want.clamp_min(1e-300)).sqrt()
        rel = torch.where(want > 0, rel, torch.zeros_like(rel)).max().item()
        if rel > 2 * fi.eps:
            share = small.max().item() / F.shape[-2:].numel()
            return (
                f"underflows ({100 * share:.3g}% of its values below the normal range: "
                f"{rel:.2g} relative error)"
            )
    work = torch.finfo(S.dtype)
    entry = torch.linalg.vector_norm(S.double(), dim=-1) / scaling
    entry = entry / math.sqrt(A.shape[-1] * B.shape[-2])
    low = work.tiny / work.eps  # entries this small or smaller lose precision in S's dtype
    if bool(((entry < low) & (entry * scaling >= low)).any()):  # the scaling's doing
        return (
            f"underflows (its product B @ A has entries near {entry.max().item():.2g}, "
            f"beyond what {str(S.dtype).removeprefix('torch.')} arithmetic resolves)"
        )
    return None


# Rows per block of a pass over a weight on a CPU: about 4 MB of fp32, so that the block is
# still in cache for the next step (its norm): one trip through memory instead of two
# (bench/test_hotpaths.py).
BLOCK_ELEMENTS = 1 << 20


def block_rows(W: torch.Tensor) -> int:
    """Rows of W (..., rows, cols) per block: ``BLOCK_ELEMENTS`` on a CPU, all on a GPU."""
    rows, cols = W.shape[-2:]
    return rows if W.device.type != "cpu" else max(1, BLOCK_ELEMENTS // max(cols, 1))


def all_finite(x: torch.Tensor) -> bool:
    """``torch.isfinite(x).all()``, block by block: on a whole matrix it holds 1.75 matrices of
    temporaries (fp32), which would set QPiSSA's peak. One host sync."""
    blocks = x.detach().reshape(-1).split(BLOCK_ELEMENTS)
    return bool(torch.stack([torch.isfinite(b).all() for b in blocks]).all())


def rounding_overflowed(rounded: torch.Tensor, sumsq: torch.Tensor) -> bool:
    """Whether rounding a finite residual whose sum of squares is ``sumsq`` into ``rounded``
    (fp16, say) overflowed to inf. No entry exceeds the Frobenius norm, so only a residual
    whose norm is beyond the dtype's largest value is scanned."""
    if not rounded.is_floating_point() or float(sumsq) ** 0.5 <= torch.finfo(rounded.dtype).max:
        return False
    return not all_finite(rounded)


def sum_squares(block: torch.Tensor) -> torch.Tensor:
    """Sum of squares of each (rows, cols) matrix of ``block`` (..., rows, cols), as fp64 of
    shape ``block.shape[:-2]`` (0-d for one matrix): per-row norms in fp32 (fp64 for fp64),
    summed in fp64, with no temporary larger than a column of norms. One fp32 reduction over a
    whole matrix drifts: torch's CPU ``matrix_norm`` of a random fp32 matrix is off by 4.5e-4
    relative at 2048 x 5632, 3.5e-3 at 4096 x 11008 and 4.5e-3 at 14336 x 4096, more than
    ``verify``'s 1e-3 tolerance; this is within 1e-8 (tests/test_pissa.py asks for 1e-6)."""
    wide = torch.float64 if block.dtype == torch.float64 else torch.float32
    return torch.linalg.vector_norm(block, dim=-1, dtype=wide).double().square().sum(-1)


def frobenius(E: torch.Tensor) -> float:
    """||E||_F of one matrix, accurately (:func:`sum_squares`)."""
    return float(sum_squares(E).sqrt())


def subtract_adapter_(
    W: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    *,
    scaling: float,
    fan_in_fan_out: bool = False,
    out: torch.Tensor | list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """W -= s * B @ A in place, in W's stored layout, optionally rounding the result into ``out``.

    Args:
        W: (..., out, in) working copy, or (..., in, out) with ``fan_in_fan_out``; fp32 or
            fp64, rows contiguous (contiguous, or rows padded as by
            :func:`~pissa_svd.linalg.padded_empty`). A leading batch dimension is allowed.
        A, B: the adapter as stored, (..., r, in) and (..., out, r); widened to W's dtype, so
            the residual is that of the rounded adapter.
        out: where to round the residual to (a tensor shaped like W, or one per batch
            member), e.g. a bf16 output buffer; None keeps it in W only.

    Returns each member's sum of squares of the residual before rounding, as fp64 of shape
    ``W.shape[:-2]``. The residual is one GEMM per member; the rounding and the norm then go
    in row blocks (:func:`block_rows`), the norm reading each block from cache.
    """
    Wb = _batch_of_rows(W)
    if Wb is None:
        raise ValueError("subtract_adapter_ needs W with contiguous rows (e.g. contiguous)")
    L, R = (A.mT, B.mT) if fan_in_fan_out else (B, A)  # W_stored -= s * L @ R
    lead, (rows, cols) = W.shape[:-2], W.shape[-2:]
    with ieee_matmuls(W.device):
        Wb.baddbmm_(
            L.to(W.dtype).reshape(-1, rows, L.shape[-1]),
            R.to(W.dtype).reshape(-1, R.shape[-2], cols),
            alpha=-scaling,
        )
    sumsq = [
        copy_rows_(None if out is None else (out[i] if lead else out), Wb[i], measure="src")
        for i in range(Wb.shape[0])
    ]
    return torch.stack(sumsq).reshape(lead)


def _batch_of_rows(W: torch.Tensor) -> torch.Tensor | None:
    """W as a (batch, rows, cols) view (rows contiguous, possibly padded), or None."""
    if not native.rows_contiguous(W):
        return None
    try:
        return W.view(-1, *W.shape[-2:])
    except RuntimeError:  # leading dims that do not merge
        return None


def copy_rows_(dst: torch.Tensor | None, src: torch.Tensor, *, measure: str) -> torch.Tensor:
    """``dst.copy_(src)`` for (rows, cols) matrices, with the sum of squares of the ``measure``
    side ("src" or "dst", the wider dtype); fp64, 0-d. ``dst=None``: the sum of squares only.

    On a CPU, bf16/fp32 pairs go through the compiled module's fused loop
    (:func:`pissa_svd.native.copy_rows`, one pass over memory); otherwise row block by row block
    (:func:`block_rows`), the norm reading each block while it is in cache."""
    measured = src if measure == "src" else dst
    if dst is not None and dst.device != src.device:
        # Host <-> GPU: move the stored dtype and convert on the GPU. A cross-device copy_
        # that also converts would convert on the host, into a fresh pageable buffer.
        if dst.is_cuda:
            dst.copy_(src.to(dst.device))
        else:
            dst.copy_(src.to(dst.dtype))
        return sum_squares(measured)
    # The compiled loop measures the fp32 side, which is the measured one here or, for an exact
    # bf16 -> fp32 widening, holds the same values.
    if dst is not None and (measured.dtype == torch.float32 or src.dtype == torch.bfloat16):
        fused = native.copy_rows(dst, src)
        if fused is not None:
            return fused
    step = block_rows(measured)
    sumsq = torch.zeros((), dtype=torch.float64, device=measured.device)
    for r in range(0, src.shape[-2], step):
        if dst is not None:
            dst[r : r + step].copy_(src[r : r + step])
        sumsq += sum_squares(measured[r : r + step])
    return sumsq
