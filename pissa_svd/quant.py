"""QPiSSA: PiSSA with a quantized residual (NF4 or LLM.int8). Pure functions, no IO.

Convention (as in pissa.py): W: (out, in); the adapter is A (r, in), B (out, r), scaling s, and
the frozen residual W_res is what a quantized base model stores. QPiSSA quantizes W_res rather
than W, so the quantization error is ``W - (deq(Q(W_res)) + s * B @ A)``.

Quantizers (values identical to bitsandbytes', checked bit for bit in tests/test_quant.py):

- ``nf4``: QLoRA's 4-bit NormalFloat. The tensor is flattened row-major and cut into blocks of
  64 values (the last block may be shorter); each block is scaled by 1/absmax (fp32), every
  value goes to the nearest of the 16 NF4 codes, and dequantization is ``code * absmax`` in
  fp32. Values exactly half-way between two codes go to the lower code (the thresholds are the
  fp32 midpoints of adjacent codes, equal bit for bit to the constants in bitsandbytes' CUDA
  kernel, which also compares with ``>``). Double quantization of the absmax values
  (``bnb_4bit_use_double_quant``) is not modelled: absmax is kept in fp32.
- ``int8``: LLM.int8's row-wise absmax: ``q = round(x * (127 / absmax_row))`` (round half to
  even), dequantized as ``q * absmax_row / 127``; no outlier decomposition (threshold 0). Of
  the values rounded to fp16 first: bitsandbytes' 8-bit layer (``Int8Params``) casts a weight
  to fp16 before it quantizes it, whatever its dtype, so that is what an 8-bit model holds.

NF4 quantizes the fp32 values of the input (bf16/fp16 widen exactly; fp64 is rounded to fp32),
as bitsandbytes' ``quantize_4bit`` does. A Conv1D weight (``fan_in_fan_out``) is quantized in
its (out, in) orientation, because transformers transposes Conv1D weights before quantizing.

The stored residual
-------------------
``qpissa_factors`` returns a residual R that is a *fixed point* of quantization in its own
dtype: ``deq(Q(R)).to(R.dtype) == R`` bit for bit, so a quantized model built from the stored
residual holds exactly the codes and scales chosen here. In fp32 ``deq(Q(W_res))`` already is
one for NF4: the largest value of each block dequantizes to exactly ``±absmax`` (code ±1), so
re-quantizing finds the same absmax and, since every scaled value is within a few ulps of its
code, the same codes. It is not one

- in bf16 (and for NF4 in fp16): rounding ``absmax`` to it changes the scale, and
  ``code * bf16(absmax)`` rounds differently from ``code * absmax``. (A row's largest int8
  value dequantizes to ``fl(fl(127 * a) * fp32(1/127))``, often one ulp below ``a``; the fp16
  cast rounds it back to ``a``, an fp16 number, so int8 is stable in fp32 and fp16.)

So R is obtained by re-quantizing the values rounded to the residual dtype until they stop
changing: one round in bf16 (and for NF4 in fp16; afterwards absmax is representable in that
dtype), none in fp32 (``info["settle_rounds"]``). The result differs from deq(Q(W_res)) only by
that rounding, and the function checks the fixed point before returning.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch

from . import native
from .errors import InputError
from .linalg import FLOAT_DTYPES, ieee_matmuls
from .pissa import all_finite, block_rows, frobenius, pissa_factors, subtract_adapter_, sum_squares

SCHEMES = ("nf4", "int8")
NORMS = ("fro", "nuc")
NF4_BLOCKSIZE = 64
# The 16 NF4 values (QLoRA, Dettmers et al. 2023): quantiles of N(0, 1) scaled to [-1, 1], with
# an exact zero. Index = 4-bit code.
NF4_CODE = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
# bitsandbytes clamps absmax to this before taking its reciprocal, so all-zero blocks stay zero.
_ABSMAX_FLOOR = 1e-38
# fp32(1 / 127): int8 dequantization multiplies by this rather than dividing by 127.
_INV127 = 7.874015718698502e-3
# Values per vectorized step (a multiple of NF4_BLOCKSIZE): bounds the temporaries to a few
# MB whatever the matrix size.
_CHUNK = 1 << 20
_MAX_SETTLE_ROUNDS = 8  # one is needed (see the module docstring); more means a bug


class QPissaFactors(NamedTuple):
    A: torch.Tensor  # (r, in)  adapter dtype
    B: torch.Tensor  # (out, r) adapter dtype
    W_res: torch.Tensor  # stored layout, residual dtype; a fixed point of fake_quantize
    info: dict


# --------------------------------------------------------------------------------------------
# Quantizers
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _nf4_tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes (16,) fp32, thresholds (15,) fp32): the fp32 midpoints of adjacent codes."""
    code = torch.tensor(NF4_CODE, dtype=torch.float32, device=device)
    return code, (code[:-1] + code[1:]) / 2


def _nf4_block_codes(x: torch.Tensor, absmax: torch.Tensor, tail: bool) -> torch.Tensor:
    """Code indices (same shape as x, int32) of fp32 values x scaled by their block's absmax.

    x: (blocks, 64) with absmax (blocks,), or one short tail block (k,) with a 0-dim absmax.
    bitsandbytes' CPU kernel multiplies full blocks by the fp32 reciprocal of absmax but divides
    the tail block by it; the two can differ by one ulp, which moves a value across a threshold
    only when it sits within an ulp of it, but bit equality needs the same operation.
    """
    _, bounds = _nf4_tables(x.device)
    denom = absmax.clamp(min=_ABSMAX_FLOOR)
    scaled = x / denom if tail else x * (1.0 / denom).unsqueeze(-1)
    # bucketize (right=False) returns i with bounds[i-1] < v <= bounds[i]: a tie goes down.
    return torch.bucketize(scaled.clamp_(-1.0, 1.0), bounds, out_int32=True)


def nf4_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """NF4-quantize ``x`` (any shape, bf16/fp16/fp32/fp64) over its row-major flattening.

    Returns (codes (numel,) uint8 in 0..15, absmax (ceil(numel / 64),) fp32). The absmax of a
    short last block is floored at 1e-38, as bitsandbytes stores it.
    """
    _check_float(x, "x")
    flat = x.reshape(-1)
    n = flat.numel()
    full = n - n % NF4_BLOCKSIZE
    codes = torch.empty(n, dtype=torch.uint8, device=x.device)
    absmax = torch.empty(-(-n // NF4_BLOCKSIZE), dtype=torch.float32, device=x.device)
    for start in range(0, full, _CHUNK):
        stop = min(start + _CHUNK, full)
        blocks = flat[start:stop].to(torch.float32).view(-1, NF4_BLOCKSIZE)
        amax = blocks.abs().amax(dim=1)
        codes[start:stop] = _nf4_block_codes(blocks, amax, tail=False).view(-1)
        absmax[start // NF4_BLOCKSIZE : stop // NF4_BLOCKSIZE] = amax
    if full < n:
        rest = flat[full:].to(torch.float32)
        amax = rest.abs().amax().clamp(min=_ABSMAX_FLOOR)
        codes[full:] = _nf4_block_codes(rest, amax, tail=True)
        absmax[-1] = amax
    return codes, absmax


def nf4_dequantize(
    codes: torch.Tensor,
    absmax: torch.Tensor,
    shape: torch.Size | tuple[int, ...],
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``code * absmax`` in fp32, reshaped to ``shape`` and cast to ``dtype``.

    codes: (numel,) uint8 from :func:`nf4_quantize`; absmax: (ceil(numel / 64),) fp32.
    """
    table, _ = _nf4_tables(codes.device)
    vals = table[codes.long()]
    n = vals.numel()
    full = n - n % NF4_BLOCKSIZE
    out = torch.empty(n, dtype=torch.float32, device=codes.device)
    out[:full] = (vals[:full].view(-1, NF4_BLOCKSIZE) * absmax[: full // NF4_BLOCKSIZE, None]).view(
        -1
    )
    if full < n:
        out[full:] = vals[full:] * absmax[-1]
    return out.view(shape).to(dtype)


def _nf4_fake(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """deq(Q(x)) computed in fp32 and rounded to ``dtype``, same shape as x.

    Chunk by chunk (whole blocks; the short last block ends the last chunk), so besides the
    result only one chunk's fp32 temporaries (a few MB) exist at a time: QPiSSA settles a bf16
    residual this way without a whole fp32 copy of it. A CPU chunk goes through the compiled
    loop (csrc/nf4.h: one pass, the same bits, many times faster) when the native module has
    it; straight into the result when that is fp32."""
    flat = x.detach().reshape(-1)  # blocks run over the row-major flattening (a copy if strided)
    n = flat.numel()
    out = torch.empty(n, dtype=dtype, device=x.device)
    table, bounds = _nf4_tables(x.device)
    compiled = x.device.type == "cpu" and native.has_nf4_fake()
    for start in range(0, n, _CHUNK):
        stop = min(start + _CHUNK, n)
        part = flat[start:stop].to(torch.float32).resolve_neg()
        if compiled and dtype == torch.float32:
            native.nf4_fake(part.contiguous(), table, bounds, out=out[start:stop])
            continue
        if compiled:
            out[start:stop] = native.nf4_fake(part.contiguous(), table, bounds)
            continue
        full = (stop - start) - (stop - start) % NF4_BLOCKSIZE
        blocks = part[:full].view(-1, NF4_BLOCKSIZE)
        amax = blocks.abs().amax(dim=1)
        idx = _nf4_block_codes(blocks, amax, tail=False)
        out[start : start + full] = (table[idx] * amax.unsqueeze(1)).view(-1)
        if full < stop - start:  # the short last block of x
            rest = part[full:]
            amax = rest.abs().amax().clamp(min=_ABSMAX_FLOOR)
            out[start + full : stop] = table[_nf4_block_codes(rest, amax, tail=True)] * amax
    return out.view(x.shape)


def int8_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """LLM.int8 row-wise absmax quantization of ``x``: (rows, cols) or (..., cols), of its
    values rounded to fp16 first, as bitsandbytes' 8-bit layer (``Int8Params``) casts a weight
    to fp16 before ``int8_vectorwise_quant``: what an 8-bit model loaded from ``x`` holds.

    Returns (q (..., cols) int8 in -127..127, absmax (rows,) fp32 with rows = numel / cols).
    An all-zero row gets codes 0 (bitsandbytes computes 0 * inf there; its dequantized row is
    0 either way). Values beyond fp16's range are an InputError (8-bit loading makes them inf).
    """
    _check_float(x, "x")
    if x.ndim < 1 or x.shape[-1] == 0:
        raise InputError(f"x must have a non-empty last dimension, got shape {tuple(x.shape)}")
    rows = x.reshape(-1, x.shape[-1])
    q = torch.empty(rows.shape, dtype=torch.int8, device=x.device)
    absmax = torch.empty(rows.shape[0], dtype=torch.float32, device=x.device)
    step = max(1, _CHUNK // rows.shape[1])
    for start in range(0, rows.shape[0], step):
        r32 = rows[start : start + step].to(torch.float16).to(torch.float32)
        amax = r32.abs().amax(dim=1)
        if not bool(torch.isfinite(amax).all()):
            raise InputError(
                "int8: values beyond fp16's range (65504), which bitsandbytes' 8-bit loading "
                "casts weights to; use nf4, or scale the weights down"
            )
        scale = (127.0 / amax).nan_to_num_(posinf=0.0)  # zero rows: codes 0
        q[start : start + step] = torch.round(r32 * scale.unsqueeze(1)).to(torch.int8)
        absmax[start : start + step] = amax
    return q.view(x.shape), absmax


def int8_dequantize(
    q: torch.Tensor, absmax: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``q * absmax_row * fp32(1/127)`` in fp32, cast to ``dtype``. q: (..., cols) int8.

    Row chunk by row chunk into the result, so no whole fp32 temporaries are made."""
    rows = q.reshape(-1, q.shape[-1])
    out = torch.empty(rows.shape, dtype=dtype, device=q.device)
    step = max(1, _CHUNK // max(rows.shape[1], 1))
    for start in range(0, rows.shape[0], step):
        part = slice(start, start + step)
        out[part] = (rows[part] * absmax[part].unsqueeze(1)).mul_(_INV127)
    return out.view(q.shape)


def _int8_fake(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    q, absmax = int8_quantize(x)
    return int8_dequantize(q, absmax, dtype)


def fake_quantize(
    W: torch.Tensor, scheme: str, *, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """deq(Q(W)): W quantized with ``scheme`` and dequantized, same shape.

    W: any shape for ``nf4`` (blocks run over the row-major flattening), (..., cols) for
    ``int8`` (one scale per row); bf16/fp16/fp32/fp64. The result is computed in fp32 and cast
    to ``dtype`` (default: W's dtype), like bitsandbytes' ``dequantize_4bit(..., dtype)``.
    """
    _check_scheme(scheme)
    _check_float(W, "W")
    if dtype is not None:
        _check_float_dtype(dtype, "dtype")
    _check_finite(W, "W")  # an inf makes its whole block (row) NaN
    return _fake_quantize(W, scheme, dtype)


def _fake_quantize(W: torch.Tensor, scheme: str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """:func:`fake_quantize` without its checks, for inputs known to be good (one pass less)."""
    W = W.detach()
    if scheme == "nf4":
        return _nf4_fake(W, dtype or W.dtype)
    return _int8_fake(W, dtype or W.dtype)


# --------------------------------------------------------------------------------------------
# Error metric
# --------------------------------------------------------------------------------------------


def _norm(E: torch.Tensor, norm: str) -> float:
    if norm == "fro":
        return frobenius(E)
    return torch.linalg.svdvals(E).sum().item()


def _reduction(err: float, base: float) -> float:
    """1 - err / base, with 0 / 0 read as "nothing to reduce" (0) and x / 0 as -inf."""
    if base > 0:
        return 1.0 - err / base
    return 0.0 if err == 0 else float("-inf")


def quantization_error(
    W: torch.Tensor,
    W_res_q: torch.Tensor,
    A: torch.Tensor | None = None,
    B: torch.Tensor | None = None,
    scaling: float = 1.0,
    scheme: str = "nf4",
    *,
    fan_in_fan_out: bool = False,
    norm: str = "nuc",
    dtype: torch.dtype = torch.float64,
) -> float:
    """``||W - (deq(Q(W_res_q)) + s * B @ A)||`` (no adapter term when A and B are None).

    ``quantization_error(W, W)`` is QLoRA's error, the baseline of :func:`error_reduction`.
    W, W_res_q: (out, in), or (in, out) with ``fan_in_fan_out``; A: (r, in); B: (out, r).
    Dequantized values are taken in fp32; the difference and its norm (nuclear by default,
    from ``torch.linalg.svdvals``; or ``fro``) are computed in ``dtype`` (fp64 by default).
    """
    _check_scheme(scheme)
    _check_norm(norm)
    _check_float(W, "W")
    _check_float(W_res_q, "W_res_q")
    Wo = W.mT if fan_in_fan_out else W
    Ro = W_res_q.mT if fan_in_fan_out else W_res_q
    if (A is None) != (B is None):
        raise InputError("pass both A and B, or neither")
    if (
        Wo.ndim != 2
        or Ro.shape != Wo.shape
        or (
            A is not None
            and (
                A.ndim != 2
                or B.ndim != 2
                or B.shape[0] != Wo.shape[0]
                or A.shape[1] != Wo.shape[1]
                or A.shape[0] != B.shape[1]
            )
        )
    ):
        raise InputError(
            f"shapes do not match: W {tuple(W.shape)}, W_res_q {tuple(W_res_q.shape)}"
            + ("" if A is None else f", A {tuple(A.shape)}, B {tuple(B.shape)}")
            + "; W is (out, in), A (r, in) and B (out, r)"
        )
    if dtype not in (torch.float32, torch.float64):
        raise InputError(f"dtype must be torch.float32 or torch.float64, got {dtype!r}")
    if not (scaling > 0 and math.isfinite(scaling)):
        raise InputError(f"scaling (lora_alpha / r) must be a finite number > 0, got {scaling}")
    E = Wo.to(dtype) - fake_quantize(Ro, scheme, dtype=torch.float32).to(dtype)
    if A is not None:
        E.addmm_(B.to(dtype), A.to(dtype), alpha=-scaling)
    return _norm(E, norm)


def error_reduction(
    W: torch.Tensor,
    W_res_q: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    scaling: float = 1.0,
    scheme: str = "nf4",
    *,
    fan_in_fan_out: bool = False,
    norm: str = "nuc",
    dtype: torch.dtype = torch.float64,
) -> float:
    """Quantization error removed relative to QLoRA (quantizing W itself):

        1 - ||W - (deq(Q(W_res_q)) + s * B @ A)||_* / ||W - deq(Q(W))||_*

    in the nuclear norm by default (the PiSSA paper's metric), both terms from
    :func:`quantization_error`. ``W_res_q`` is the residual to quantize: QPiSSA's stored
    residual, or any weight, e.g. LoftQ's dequantized weight (quantizing an already dequantized
    fp32 NF4 tensor returns it unchanged).

    W, W_res_q: (out, in), or (in, out) with ``fan_in_fan_out``; A: (r, in); B: (out, r).
    Returns a float: 1 means no error left, 0 as much as QLoRA, < 0 more. If W itself
    quantizes exactly (baseline 0) it returns 0 when no error is left and -inf otherwise.
    """
    kw = dict(scheme=scheme, fan_in_fan_out=fan_in_fan_out, norm=norm, dtype=dtype)
    err = quantization_error(W, W_res_q, A, B, scaling, **kw)
    return _reduction(err, quantization_error(W, W, **kw))


# --------------------------------------------------------------------------------------------
# QPiSSA
# --------------------------------------------------------------------------------------------


def qpissa_factors(
    W: torch.Tensor,
    rank: int,
    *,
    scheme: str = "nf4",
    iters: int = 5,
    scaling: float = 1.0,
    fan_in_fan_out: bool = False,
    adapter_dtype: torch.dtype | None = None,
    residual_dtype: torch.dtype | None = None,
    select: str = "fro",
    **svd_kwargs,
) -> QPissaFactors:
    """PiSSA adapter plus a quantization-ready residual, alternating SVD and quantization.

    Round 1 is PiSSA: (A_1, B_1) from the SVD of W, Q_1 = deq(Q(W - s * B_1 @ A_1)). Round
    t >= 2 takes (A_t, B_t) from the SVD of ``W - Q_{t-1}`` (the low-rank part that the
    previous quantized residual misses) and quantizes W - s * B_t @ A_t again (SVD first, then
    quantize, as in the PiSSA paper; LoftQ starts by quantizing W itself). Two pairings of a
    quantized residual with an adapter are scored by ``||W - (Q + s * B @ A)||``, with A and B
    as stored (after rounding to ``adapter_dtype``):

    - ``errors[t-1]``: Q_t with the adapter it was quantized against, (A_t, B_t);
    - ``refit_errors[t-1]``: Q_t with (A_{t+1}, B_{t+1}), the top-r SVD of ``W - Q_t``: the
      adapter refitted to the quantized residual it ships with (LoftQ's pairing). It is the
      first step of round t + 1 anyway, so it only costs one extra SVD, after round T.

    Each step of the alternation lowers the same error, so refit t is usually the best of
    round t; but quantization after an SVD step can make the error go up, so the last
    candidate is not always the best. The best of all 2T is returned, and its error never
    increases with ``iters`` (the iterates do not depend on ``iters``).

    The score uses the Frobenius norm by default (``select="fro"``): one pass over the matrix,
    where the nuclear norm of the paper needs a full SVD per candidate (tens of seconds for a
    4096 x 11008 matrix on a CPU). ``select="nuc"`` scores with the nuclear norm instead.

    Args:
        W: (out, in), or (in, out) with ``fan_in_fan_out``; bf16/fp16/fp32/fp64.
        rank: adapter rank r.
        scheme: ``nf4`` or ``int8`` (see the module docstring).
        iters: number of quantization rounds T >= 1 (the paper uses up to 5); T + 1 SVDs.
        scaling: lora_alpha / r.
        adapter_dtype / residual_dtype: output dtypes (default: W's dtype).
        select: ``fro`` or ``nuc``, the norm that picks the best candidate.
        svd_kwargs: passed to :func:`pissa_svd.svd_lowrank` (niter, method, seed, ...).

    Returns:
        (A (r, in) adapter dtype, B (out, r) adapter dtype, W_res, info). W_res is in the
        stored layout and ``residual_dtype``, equal to the chosen Q_t up to rounding to that
        dtype and a fixed point of quantization in it (see the module docstring).
        ``info``: ``scheme``, ``norm``, ``errors`` and ``refit_errors`` (one per round, in that
        norm), ``best_iter`` (the round t of the chosen Q_t, 1-based), ``best_refit`` (whether
        the adapter is the refitted one), ``best_error`` (the chosen candidate's, in the
        working precision), ``stored_error`` (``||W - deq(Q(W_res)) - s B@A||`` of what is
        returned, dequantized in the working precision; a bf16/fp16 residual rounds the
        scales), ``qlora_error`` (``||W - deq(Q(W))||``), ``error_reduction``
        (``1 - stored_error / qlora_error``) and ``settle_rounds``.
    """
    _check_scheme(scheme)
    _check_norm(select, "select")
    _check_float(W, "W")
    if W.ndim != 2:
        raise InputError(f"W must be a 2-D weight matrix, got shape {tuple(W.shape)}")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise InputError(f"iters must be an int >= 1 (the paper uses 1 to 5), got {iters!r}")
    if not (scaling > 0 and math.isfinite(scaling)):
        raise InputError(f"scaling (lora_alpha / r) must be a finite number > 0, got {scaling}")
    W = W.detach()  # an initialization: nothing here is differentiated
    _check_finite(W, "W")
    adapter_dtype = adapter_dtype or W.dtype
    residual_dtype = residual_dtype or W.dtype
    _check_float_dtype(residual_dtype, "residual_dtype")
    _check_float_dtype(adapter_dtype, "adapter_dtype")

    Wo = W.mT if fan_in_fan_out else W
    work = torch.float64 if W.dtype == torch.float64 else torch.float32
    # Row-major (out, in) also for Conv1D, so every GEMM below rounds the same way whatever the
    # stored layout. Never written to: it may be the caller's tensor.
    W32 = Wo.to(work).contiguous()

    def quant(x: torch.Tensor) -> torch.Tensor:
        return _fake_quantize(x, scheme, dtype=work)

    def residual(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        """W - s * B @ A from the stored A, B, computed exactly as pissa_factors does."""
        W_res = W32.clone()
        subtract_adapter_(W_res, A, B, scaling=scaling)
        return W_res

    # Differences for the scores are taken in place in buffers of our own: each matrix-sized
    # temporary held at once adds to decompose's peak (its plan: Target.working_bytes).
    qlora_error = _norm(quant(W32).sub_(W32), select)
    errors: list[float] = []
    refit_errors: list[float] = []
    # The best candidate so far: (error, t, refit, adapter Q_t was quantized against, adapter).
    best = None
    Q = None
    prev = None  # (A_{t-1}, B_{t-1}), which Q_{t-1} was quantized against
    for t in range(1, iters + 2):
        first = Q is None
        target = W32 if first else W32 - Q
        if t <= iters:  # Q_{t-1} is not needed past W - Q_{t-1}, except Q_T (the last one)
            Q = None
        A, B, res = pissa_factors(
            target,
            rank,
            scaling=scaling,
            adapter_dtype=adapter_dtype,
            residual_dtype=work,
            inplace=not first,  # target is then our own temporary
            **svd_kwargs,
        )
        del target
        if not first:
            # res = (W - Q_{t-1}) - s * B_t @ A_t: the refit candidate of round t - 1.
            refit_errors.append(_norm(res, select))
            if refit_errors[-1] < best[0]:
                best = (refit_errors[-1], t - 1, True, prev, (A, B))
        if t > iters:
            del res
            break
        # For t = 1, pissa_factors' residual is W - s * B @ A already.
        W_res = res if t == 1 else residual(A, B)
        del res
        Q = quant(W_res)
        # W - (Q + s * B @ A) = W_res - Q.
        errors.append(_norm(W_res.sub_(Q), select))
        del W_res
        if best is None or errors[-1] < best[0]:
            best = (errors[-1], t, False, (A, B), (A, B))
        prev = (A, B)

    # Only the best adapters are kept, not their quantized residual (one (out, in) buffer
    # less); rebuilding it is deterministic, so it is the very residual that was scored.
    best_error, t_best, refit, (Aq, Bq), (A, B) = best
    if t_best != iters:  # Q holds Q_T
        Q = None
        Q = quant(residual(Aq, Bq))
    R = _round_residual(Q, scheme, residual_dtype)
    del Q
    R, rounds = _settle(R, scheme)
    # What is stored may score worse than what was chosen: a bf16/fp16 residual rounds each
    # block's (row's) scale, which for int8 adds error of int8's own size. Report that one, with
    # the residual as a loader dequantizes it (in fp32, as verify does).
    stored_error = _stored_error(W32, A, B, R, scaling, scheme, select)
    if fan_in_fan_out:
        R = R.mT.contiguous()
    info = {
        "scheme": scheme,
        "norm": select,
        "errors": errors,
        "refit_errors": refit_errors,
        "best_iter": t_best,
        "best_refit": refit,
        "best_error": best_error,
        "stored_error": stored_error,
        "qlora_error": qlora_error,
        "error_reduction": _reduction(stored_error, qlora_error),
        "settle_rounds": rounds,
    }
    return QPissaFactors(A, B, R, info)


def quantized_row_blocks(rows: int, cols: int, scheme: str, target: int) -> list[tuple[int, int]]:
    """(start, stop) row ranges of about ``target`` rows covering a (rows, cols) matrix, each
    starting on a quantization block: an NF4 block of the row-major flattening (every
    64 / gcd(cols, 64) rows), an int8 row. Each range then quantizes as it does within the
    whole matrix, the short last NF4 block ending the last range."""
    unit = NF4_BLOCKSIZE // math.gcd(cols, NF4_BLOCKSIZE) if scheme == "nf4" else 1
    step = max(unit, target // unit * unit)
    return [(lo, min(lo + step, rows)) for lo in range(0, rows, step)]


def _stored_error(
    W32: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    R: torch.Tensor,
    scaling: float,
    scheme: str,
    norm: str,
) -> float:
    """``||W - deq(Q(R)) - s B@A||`` in the norm ``norm``, dequantized in W32's dtype.

    W32: (out, in) working copy; R: (out, in) stored residual; A: (r, in); B: (out, r). The
    Frobenius norm goes row block by row block, so it holds one block's temporaries, not the
    two matrices the whole difference takes. Blocks start on a quantization block (NF4 blocks
    run over the row-major flattening; int8 scales are per row), so each block dequantizes
    exactly as within the whole. A residual in the working dtype is its own dequantization:
    _settle found it a fixed point of the quantizer.
    """
    work = W32.dtype

    def error_rows(lo: int, hi: int) -> torch.Tensor:
        E = W32[lo:hi].clone()
        with ieee_matmuls(E.device):
            E.addmm_(B[lo:hi].to(work), A.to(work), alpha=-scaling)
        return E.sub_(R[lo:hi] if R.dtype == work else _fake_quantize(R[lo:hi], scheme, dtype=work))

    rows, cols = W32.shape
    if norm != "fro":
        return _norm(error_rows(0, rows), norm)
    blocks = quantized_row_blocks(rows, cols, scheme, block_rows(W32))
    total = sum(sum_squares(error_rows(lo, hi)) for lo, hi in blocks)
    return float(torch.as_tensor(total).sqrt())


def _round_residual(Q: torch.Tensor, scheme: str, dtype: torch.dtype) -> torch.Tensor:
    """deq(Q(W_res)) rounded to ``dtype``, the start of :func:`_settle`.

    Q: (out, in) fp32/fp64 dequantized values. A separate step so that the caller can drop Q
    (a whole fp32 matrix) before the re-quantization rounds run.
    """
    # (int8: a row's largest value dequantizes to fl(fl(127 a) * fp32(1/127)), often a - 1 ulp,
    # but re-quantizing casts it to fp16 first, which rounds it back to a, an fp16 number.)
    R = Q.to(dtype)
    if not all_finite(R):
        raise _does_not_fit(dtype, Q)
    return R


def _settle(R: torch.Tensor, scheme: str) -> tuple[torch.Tensor, int]:
    """Re-quantize R (:func:`_round_residual`'s result) in its dtype until it is a fixed point.

    Returns (R, rounds): the number of whole-matrix re-quantizations that changed R.
    """
    for rounds in range(_MAX_SETTLE_ROUNDS + 1):
        nxt = _fake_quantize(R, scheme)
        if torch.equal(nxt, R):
            return R, rounds
        if not all_finite(nxt):
            raise _does_not_fit(R.dtype, R)
        R = nxt
    # Not expected for finite values (see the module docstring); a silent fallback would store
    # a residual whose quantization differs from the one that was scored.
    raise RuntimeError(
        f"{scheme} residual in {R.dtype} did not settle after {_MAX_SETTLE_ROUNDS} rounds"
    )


def _does_not_fit(dtype: torch.dtype, values: torch.Tensor) -> InputError:
    return InputError(
        f"the quantized residual does not fit in {dtype} (max |value| "
        f"{values.float().abs().max().item():.3g}); store the residual as bfloat16 or float32"
    )


# --------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------


def _check_scheme(scheme: str) -> None:
    if scheme not in SCHEMES:
        raise InputError(f"unknown quantization scheme {scheme!r}: use one of {', '.join(SCHEMES)}")


def _check_norm(norm: str, what: str = "norm") -> None:
    if norm not in NORMS:
        raise InputError(f"unknown {what} {norm!r}: use 'fro' (Frobenius) or 'nuc' (nuclear)")


def _check_float_dtype(dtype: torch.dtype, what: str) -> None:
    if dtype not in FLOAT_DTYPES:
        raise InputError(
            f"{what} is {dtype}; quantization needs bfloat16, float16, float32 or float64 "
            "(upcast fp8 or integer weights first)"
        )


def _check_float(x: object, what: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise InputError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    _check_float_dtype(x.dtype, f"{what} dtype")


def _check_finite(x: torch.Tensor, what: str) -> None:
    if not all_finite(x):
        raise InputError(f"{what} has inf or NaN values; they cannot be quantized")
