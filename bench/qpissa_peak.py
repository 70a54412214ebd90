"""Peak memory of one QPiSSA factorization, in fp32 matrices of its size.

``python bench/qpissa_peak.py M N [--iters T] [--scheme nf4|int8] [--residual-dtype bfloat16]``
runs ``pissa_svd.quant.qpissa_factors`` once on a random (M, N) fp32 matrix (rank 64, niter
4, krylov3, bf16 adapter) in this fresh process, after a tiny warm-up call, with the peak
resident set reset just before it (``/proc/self/clear_refs``, Linux), and prints how much
the peak grew: the temporaries QPiSSA holds besides its input, which ``--dry-run`` plans
(``pipeline.Target.memory``). Run another version of the package by putting its folder on
``PYTHONPATH`` from outside the repository.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch

from pissa_svd.quant import qpissa_factors


def _status(key: str) -> int:
    return int(re.search(rf"{key}:\s+(\d+)", Path("/proc/self/status").read_text())[1]) * 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("m", type=int)
    ap.add_argument("n", type=int)
    ap.add_argument("--iters", type=int, default=2)
    ap.add_argument("--scheme", default="nf4", choices=["nf4", "int8"])
    ap.add_argument("--residual-dtype", default="bfloat16")
    args = ap.parse_args()
    W = torch.randn(args.m, args.n) * 0.02
    qpissa_factors(torch.randn(64, 128), 8, iters=1)  # loads what any first call loads
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    base = _status("VmRSS")
    qpissa_factors(
        W,
        64,
        iters=args.iters,
        scheme=args.scheme,
        adapter_dtype=torch.bfloat16,
        residual_dtype=getattr(torch, args.residual_dtype),
        niter=4,
        method="krylov3",
    )
    grew = _status("VmHWM") - base
    print(
        f"{args.m} x {args.n}, {args.scheme}, T={args.iters}, {args.residual_dtype} residual: "
        f"peak grew {grew / 1e6:.0f} MB = {grew / (args.m * args.n * 4):.2f} fp32 matrices"
    )


if __name__ == "__main__":
    main()
