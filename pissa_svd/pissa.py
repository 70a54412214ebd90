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

from typing import NamedTuple

import torch

from .linalg import svd_lowrank


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
    if scaling <= 0:
        raise ValueError(f"scaling must be > 0, got {scaling}")
    adapter_dtype = adapter_dtype or W.dtype
    residual_dtype = residual_dtype or W.dtype
    Wo = W.mT if fan_in_fan_out else W  # (…, out, in)
    if svd is None:
        svd = svd_lowrank(Wo, rank, **svd_kwargs)
    U, S, Vh = svd
    work = U.dtype
    root = (S.to(work) / scaling).sqrt()
    A = (root.unsqueeze(-1) * Vh).to(adapter_dtype)
    B = (U * root.unsqueeze(-2)).to(adapter_dtype)
    res = Wo if inplace and Wo.dtype == work else Wo.to(work, copy=True)
    # W_res = W - s * B @ A, in place to keep one (out, in) working buffer.
    if res.ndim == 3:
        res.baddbmm_(B.to(work), A.to(work), alpha=-scaling)
    else:
        res.addmm_(B.to(work), A.to(work), alpha=-scaling)
    if fan_in_fan_out:
        res = res.mT
    return PissaFactors(A, B, res.to(residual_dtype).contiguous())
