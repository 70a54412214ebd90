"""Benchmark: the bf16 sketch (``--sketch-dtype bf16``) against the fp32 one and PEFT's init.

Two parts, each side by side in one run:

1. **Accuracy and SVD time on real weights** (as bench/accuracy_vs_speed.py scores them):
   the 7 projections of SmolLM2-135M layers ``--smollm-layers`` (bf16 weights) and all 36
   dense weights of all-MiniLM-L6-v2 (fp32 weights, which the bf16 sketch reads rounded to
   bf16), ranks ``--ranks``; worst excess error ``||W - U S Vh||_F / ||W - W_r*||_F - 1``
   over each set and the worst relative error of the top-r singular values, for
   ``torch.svd_lowrank(W, q=r, niter=4)`` (PEFT's ``pissa_niter_4``), ours with the defaults
   and ours with ``sketch_dtype=torch.bfloat16``. Ours are called batched by shape with one
   seed per matrix, as decompose calls them; each set's bf16 input is made once, outside the
   timing (a bf16 checkpoint is bf16 already). Times: the minimum of ``--repeats`` runs of
   the whole set, the routes alternated.
2. **LLM-shaped matrices** (4096 x 4096, 4096 x 11008, 11008 x 4096, rank 64) with a real
   SmolLM2 layer's spectrum and random orthonormal factors, rounded to bf16 (then exact in
   both sketches); the same three routes.
Whole decompose runs with ``--sketch-dtype bf16``, side by side with the default and PEFT:
bench/decompose_vs_peft.py (its ``ours-bf16`` route).

    python bench/sketch_dtype.py              # ~5 min on 2 cores
    python bench/sketch_dtype.py --quick      # one layer, rank 64, one LLM shape

It prints markdown for bench/RESULTS.md and writes ``bench/results/sketch_dtype.json``. The
speed-up depends on the hardware: MKL's bf16 GEMM uses AMX or AVX512-BF16 where the CPU has
them, and emulates bf16 (slower than fp32) where it does not; the machine line says which.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import accuracy_vs_speed as avs  # noqa: E402

import pissa_svd  # noqa: E402
from pissa_svd.linalg import derive_seed  # noqa: E402

ROUTES = ("peft", "ours fp32", "ours bf16")


def machine() -> str:
    from pissa_svd import native

    return (
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads,"
        f" torch {torch.__version__}; bf16 GEMM: {native.bf16_support()}"
    )


def groups(mats: list[tuple[str, torch.Tensor]]) -> list[tuple[list[str], torch.Tensor]]:
    """Same-shape matrices stacked, as decompose batches them."""
    by_shape: dict[tuple, list] = {}
    for name, W in mats:
        by_shape.setdefault(tuple(W.shape), []).append((name, W))
    return [([n for n, _ in g], torch.stack([W for _, W in g])) for g in by_shape.values()]


def run_route(route: str, sets, r: int) -> list[tuple[torch.Tensor, ...]]:
    """Factors (U, S, Vh) per matrix, in the order of ``sets`` (fp32, bf16 stacks)."""
    out = []
    for names, W32, W16 in sets:
        if route == "peft":
            for W in W32:
                U, S, V = torch.svd_lowrank(W, q=r, niter=4)
                out.append((U, S, V.mT))
            continue
        low = route == "ours bf16"
        U, S, Vh = pissa_svd.svd_lowrank(
            W16 if low else W32,
            r,
            niter=4,
            seed=[derive_seed(n, 0) for n in names],
            sketch_dtype=torch.bfloat16 if low else None,
        )
        out += list(zip(U, S, Vh, strict=True))
    return out


def compare(sets, r: int, repeats: int, spectra: list[torch.Tensor]) -> dict:
    """Worst excess error, worst top-r singular value error and min time per route."""
    W_all = [W for _, W32, _ in sets for W in W32]
    scores = {}
    for route in ROUTES:
        factors = run_route(route, sets, r)  # warm-up, scored
        errs, sv = [], []
        for W, (U, S, Vh), s in zip(W_all, factors, spectra, strict=True):
            approx = (U.double() * S.double()) @ Vh.double()
            errs.append(float(torch.linalg.norm(W.double() - approx) / s[r:].norm() - 1))
            sv.append(float(((S.double() - s[:r]).abs() / s[:r]).max()))
        scores[route] = {"worst_err": max(errs), "worst_sv_err": max(sv), "times": []}
    for i in range(repeats):
        for route in ROUTES if i % 2 == 0 else ROUTES[::-1]:
            t = time.perf_counter()
            run_route(route, sets, r)
            scores[route]["times"].append(time.perf_counter() - t)
    for v in scores.values():
        v["s"] = min(v["times"])
    return scores


def real_part(args) -> list[dict]:
    rows = []
    models = [("SmolLM2-135M", avs.load_smollm2(args.smollm_layers))]
    if not args.quick:
        models.append(("all-MiniLM-L6-v2", avs.load_minilm()))
    for label, mats in models:
        spectra_by_name = {n: torch.linalg.svdvals(W.double()) for n, W in mats}
        for r in args.ranks:
            sets, spectra = [], []
            for names, W32 in groups(mats):
                sets.append((names, W32, W32.to(torch.bfloat16)))
                spectra += [spectra_by_name[n] for n in names]
            scores = compare(sets, r, args.repeats, spectra)
            rows.append({"set": f"{label} ({len(mats)})", "rank": r, "scores": scores})
            print_row(rows[-1])
    return rows


def llm_part(args) -> list[dict]:
    s_real = avs.real_spectrum()
    rows = []
    shapes = [(4096, 4096)] if args.quick else [(4096, 4096), (4096, 11008), (11008, 4096)]
    for m, n in shapes:
        s = avs.stretch(s_real, min(m, n))
        W16 = avs.synthetic(m, n, s, seed=1).to(torch.bfloat16)
        W32 = W16.float()  # the bf16 matrix is the one scored: both sketches read it exactly
        spectrum = torch.linalg.svdvals(W32.double())
        sets = [([f"llm-{m}x{n}"], W32[None], W16[None])]
        scores = compare(sets, 64, args.repeats, [spectrum])
        rows.append({"set": f"LLM-shaped {m}x{n}", "rank": 64, "scores": scores})
        print_row(rows[-1])
    return rows


def print_row(row: dict) -> None:
    sc = row["scores"]
    print(
        f"{row['set']:<28} r={row['rank']:<3} "
        + "  ".join(
            f"{k}: err {v['worst_err']:.2e} sv {v['worst_sv_err']:.1e} {v['s']:.3f} s"
            for k, v in sc.items()
        ),
        flush=True,
    )


def markdown(doc: dict) -> str:
    lines = [
        "| set | r | PEFT err | fp32 err | bf16 err | PEFT sv err | fp32 sv err | bf16 sv err"
        " | PEFT s | fp32 s | bf16 s | bf16 / fp32 time |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in doc["real"] + doc["llm"]:
        sc = row["scores"]
        p, f, b = sc["peft"], sc["ours fp32"], sc["ours bf16"]
        lines.append(
            f"| {row['set']} | {row['rank']} | {p['worst_err']:.2e} | {f['worst_err']:.2e} |"
            f" {b['worst_err']:.2e} | {p['worst_sv_err']:.1e} | {f['worst_sv_err']:.1e} |"
            f" {b['worst_sv_err']:.1e} | {p['s']:.3f} | {f['s']:.3f} | {b['s']:.3f} |"
            f" {b['s'] / f['s']:.2f}x |"
        )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smollm-layers", type=int, nargs="+", default=[0, 10, 20, 29])
    ap.add_argument("--ranks", type=int, nargs="+", default=[16, 32, 64])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", type=Path, default=BENCH / "results" / "sketch_dtype.json")
    args = ap.parse_args()
    if args.quick:
        args.smollm_layers, args.ranks = [10], [64]
    torch.manual_seed(0)
    doc = {
        "command": "python bench/sketch_dtype.py " + " ".join(sys.argv[1:]),
        "date": datetime.date.today().isoformat(),
        "machine": machine(),
        "real": real_part(args),
        "llm": llm_part(args),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"\n{doc['date']}, `{doc['command']}`, {doc['machine']}\n")
    print(markdown(doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
