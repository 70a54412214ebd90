"""Time estimates for planning (``--dry-run``, balancing torchrun ranks).

A batch of same-shape matrices costs, on one device kind,

    seconds = gemm_flop / gemm_rate + bf16_gemm_flop / bf16_gemm_rate + dense_flop / dense_rate
              + svd_flop / svd_rate + elements * per_element + calls * per_call
              + nf4_elements * per_nf4_element + int8_elements * per_int8_element,

and the IO that is not part of a batch (copying the untouched tensors, writing the residuals)
costs ``bytes / io_rate``. The features are counted from the algorithms in linalg.py; the
coefficients are fitted by ``bench/cost_model.py`` to per-batch times it measures on the device,
and kept, with the measured points, in ``cost_model.json`` next to this file. A device kind
without measured points falls back to rough nominal rates and says so.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

from .linalg import krylov_depth

MODEL_FILE = Path(__file__).with_name("cost_model.json")
FEATURES = (
    "gemm_flop",
    "bf16_gemm_flop",
    "dense_flop",
    "svd_flop",
    "elements",
    "calls",
    "nf4_elements",
    "int8_elements",
)
QUANT_FEATURES = ("nf4_elements", "int8_elements")  # --quantize (QPiSSA) only

# Nominal rates for a device kind with no measured points: a guess, and labelled as one.
_NOMINAL = {
    "cpu": {"gemm_flop": 1 / 85e9, "bf16_gemm_flop": 1 / 85e9, "dense_flop": 1 / 40e9,
            "svd_flop": 1 / 10e9, "elements": 5e-9, "calls": 1e-3, "io_bytes": 1 / 1e9,
            "nf4_elements": 40e-9, "int8_elements": 10e-9},
    "cuda": {"gemm_flop": 1 / 40e12, "bf16_gemm_flop": 1 / 150e12, "dense_flop": 1 / 10e12,
             "svd_flop": 1 / 0.5e12, "elements": 2e-11, "calls": 2e-3, "io_bytes": 1 / 3e9,
             "nf4_elements": 2e-10, "int8_elements": 1e-10},
}  # fmt: skip


def features(
    m: int,
    n: int,
    rank: int,
    *,
    method: str,
    niter: int,
    oversample: int,
    batch: int = 1,
    bf16_sketch: bool = False,
    quantize: str | None = None,
    quant_iters: int = 0,
) -> dict[str, float]:
    """What a batch of ``batch`` (m, n) matrices costs, counted per term of the model.

    ``bf16_sketch``: the passes over W read it in bf16 (linalg._pass): the power iteration's
    lead passes with the block's k columns, the kept blocks' passes and the last one with 2k
    (their operand split into bf16 hi + lo).

    ``quantize`` ("nf4"/"int8") with ``quant_iters`` T: QPiSSA (quant.qpissa_factors), member
    by member: T + 1 SVDs, T residuals rebuilt from the stored factors, and T + 3 passes of
    fake quantization (the plain-QLoRA reference, one per round, the rebuild of the best
    residual, and settling it in its dtype) with the norms that go with them. That is the most
    it does: the rebuild is skipped when the last round is the best, and settling may take no
    round; the fitted per-element cost absorbs the difference."""
    small, big = min(m, n), max(m, n)
    residual = 2.0 * m * n * rank  # W_res = W - B A
    f = dict.fromkeys(FEATURES, 0.0)
    f["elements"] = float(m * n)  # bf16 -> fp32, norms, residual -> bf16, copies
    f["calls"] = 1.0 / batch
    if method == "exact":
        f["svd_flop"] = 4.0 * m * n * small + 8.0 * small**3
        f["gemm_flop"] = residual
    else:  # the power iteration of linalg._block_krylov, keeping the last d blocks
        k = min(rank + oversample, small)
        q, d = niter, krylov_depth(method, niter)
        lead = q + 1 - d  # blocks that are only powered up
        pass_flop = 2.0 * m * n * k
        if bf16_sketch:  # 1 + 2 lead passes of k columns, 2d - 1 of 2k
            f["bf16_gemm_flop"] = (1 + 2 * lead + 2 * (2 * d - 1)) * pass_flop
            f["gemm_flop"] = residual
        else:
            f["gemm_flop"] = (2 * q + 2) * pass_flop + residual
        # CholeskyQR rounds: 4 rows k^2 each (Gram, then the GEMM with the inverted factor),
        # all on the short side (the long side's Xᵀ Q_i are used as they come): the sketch and
        # each powered-up block one round, the first kept block one more (two in all when
        # nothing is powered up), each further kept block two.
        small_rounds = lead + 2 + 2 * (d - 1)
        gram_schmidt = 10.0 * small * k**2 * (d - 1) * d / 2
        width = d * k
        ritz = 2.0 * big * width**2 + 2.0 * (big + small) * width * rank + 20.0 * width**3
        f["dense_flop"] = 4.0 * small_rounds * small * k**2
        f["dense_flop"] += gram_schmidt + ritz
    if quantize:
        rounds = quant_iters + 1
        for key in ("gemm_flop", "bf16_gemm_flop", "dense_flop", "svd_flop"):
            f[key] *= rounds
        f["gemm_flop"] += quant_iters * residual
        f[f"{quantize}_elements"] = float(m * n) * (quant_iters + 3)
        f["calls"] = float(rounds)  # not batched
    return {key: v * batch for key, v in f.items()}


def buffer_bytes(
    m: int,
    n: int,
    batch: int,
    src_itemsize: int,
    work_itemsize: int,
    res_itemsize: int,
    overlap: bool = False,
) -> dict[str, int]:
    """The reusable buffers a batch of ``batch`` (m, n) matrices needs, by name: the read
    buffer (one member at a time; with ``overlap``, two whole batches: the one computing and
    the next), the batch in the working dtype (overwritten by the residuals), and the residuals
    rounded to their output dtype (two batches with ``overlap``: one being written). Decompose
    keeps each at the largest size any batch has needed (``pipeline._Scratch``)."""
    buffers = 2 if overlap else 1
    return {
        "read": (buffers * batch if overlap else 1) * m * n * src_itemsize,
        "work": batch * m * n * work_itemsize,
        "out": buffers * batch * m * n * res_itemsize,
    }


def working_bytes(*args, **kwargs) -> int:
    """Peak bytes held while a batch of (m, n) matrices is decomposed, from no buffers at all:
    :func:`memory`'s parts summed (same arguments)."""
    held, fresh = memory(*args, **kwargs)
    return sum(held.values()) + fresh


def memory(
    m: int,
    n: int,
    block: int,
    batch: int,
    src_itemsize: int,
    work_itemsize: int,
    res_itemsize: int,
    overlap: bool = False,
    method: str = "krylov2",
    niter: int = 4,
) -> tuple[dict[str, int], int]:
    """Bytes a batch of ``batch`` (m, n) matrices holds while it is decomposed: the reusable
    buffers by name (:func:`buffer_bytes`), and what it allocates afresh, per member the SVD's
    temporaries (:func:`svd_temporaries`)."""
    held = buffer_bytes(m, n, batch, src_itemsize, work_itemsize, res_itemsize, overlap)
    return held, batch * svd_temporaries(m, n, block, method, niter) * work_itemsize


def svd_temporaries(m: int, n: int, block: int, method: str, niter: int) -> int:
    """Elements the SVD of one (m, n) matrix allocates besides it: for the randomized methods
    4 + 3d blocks of ``block`` columns on both sides, d the kept Krylov blocks; for ``exact``
    a copy of the matrix, its factors and 8 small x small matrices of LAPACK workspace (gesdd).
    Upper bounds of the resident growth measured around one call on a CPU, native and torch
    backends, 1024 x 4096 to 28672 x 8192 (``python bench/memory_plan.py``; bench/RESULTS.md,
    "Memory plan")."""
    if method == "exact":
        small = min(m, n)
        return m * n + (m + n) * small + 8 * small * small
    return (4 + 3 * krylov_depth(method, niter)) * (m + n) * block


@cache
def _fitted() -> dict:
    try:
        return json.loads(MODEL_FILE.read_text())["devices"]
    except (OSError, ValueError, KeyError):
        return {}


def coefficients(device_kind: str) -> tuple[dict[str, float], str]:
    """Seconds per unit of each feature (and ``io_bytes``) on ``device_kind``, and a note
    saying where they come from."""
    fit = _fitted().get(device_kind)
    nominal = _NOMINAL.get(device_kind, _NOMINAL["cpu"])
    if fit:
        note = (
            f"cost model fitted to {len(fit['points'])} measured batches on {fit['machine']}"
            f" ({fit['date']}; max error {fit['max_rel_err']:.0%})"
        )
        coef = dict(fit["coef"])
        if not coef.get("bf16_gemm_flop"):  # a fit without bf16-sketch points
            coef["bf16_gemm_flop"] = coef["gemm_flop"]
            note += "; bf16 sketch not measured: its passes at the fp32 GEMM rate"
        if not all(coef.get(k) for k in QUANT_FEATURES):  # a fit without QPiSSA points
            coef.update({k: nominal[k] for k in QUANT_FEATURES})
            note += "; quantization not measured: nominal rates"
        return coef, note
    return nominal, f"no measured points for {device_kind}: nominal rates, a rough guess"


def predict(coef: dict[str, float], feats: dict[str, float], io_bytes: float = 0.0) -> float:
    """Seconds under coefficients ``coef`` (from :func:`coefficients`, or a fit being made)."""
    return sum(coef[k] * feats[k] for k in FEATURES) + coef["io_bytes"] * io_bytes


def seconds(feats: dict[str, float], device_kind: str, io_bytes: float = 0.0) -> float:
    return predict(coefficients(device_kind)[0], feats, io_bytes)


__all__ = [
    "FEATURES",
    "MODEL_FILE",
    "buffer_bytes",
    "coefficients",
    "features",
    "memory",
    "predict",
    "seconds",
    "svd_temporaries",
    "working_bytes",
]
