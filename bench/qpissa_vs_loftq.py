"""Benchmark: NF4 quantization error of QPiSSA (pissa_svd.quant) vs PEFT's LoftQ.

What it measures
----------------
For real weight matrices of two small models,

* all-MiniLM-L6-v2 (fp32 BERT): the query/key/value/attention-output/intermediate/output dense
  weights of all 6 encoder layers (36 matrices);
* SmolLM2-135M-Instruct (dequantized from the Q4_1 GGUF to bf16, upcast to fp32): the 7
  projections q/k/v/o/gate/up/down of ``--smollm-layers`` (default: 10 of the 30 layers, evenly
  spaced: 0, 3, 6, 10, 13, 16, 19, 23, 26, 29, 70 matrices, to keep the run under 10 minutes on
  a shared 2-core machine; ``--smollm-layers all`` for all 30, about 3x as long for SmolLM2),

at ranks ``--ranks`` (16, 32, 64) and ``--iters`` T (1 and 5), both methods produce an NF4
residual and a rank-r adapter (scaling 1), scored with one metric,
``pissa_svd.quant.quantization_error`` (nuclear norm, fp64 ``torch.linalg.svdvals``):

    reduction = 1 - ||W - (deq(Q(residual)) + B @ A)||_* / ||W - deq(Q(W))||_*

i.e. the share of QLoRA's quantization error that the method removes. Reported: the unweighted
mean over the matrices of a model (min and max in the JSON).

The two methods
---------------
* QPiSSA: ``pissa_svd.quant.qpissa_factors(W, r, iters=T)`` with its defaults (SVD by
  ``pissa_svd.svd_lowrank``: method auto, niter 4, its default oversample, seeded per matrix with
  ``derive_seed(name, 0)``; T quantization rounds, T + 1 SVDs, the best of its 2T
  candidates by Frobenius error), fp32 adapter and residual.
  NF4 by pissa-svd's own torch quantizer.
* LoftQ: PEFT's own ``peft.utils.loftq_utils.loftq_init(W, num_bits=4, reduced_rank=r,
  num_iter=T)``: it quantizes with bitsandbytes (``Params4bit``, NF4, blocksize 64, no double
  quantization), takes a full ``torch.linalg.svd`` each round and returns the last iterate.
  That function hard-codes ``compute_device = "cuda"``; this machine has no GPU, so we run the
  function's own bytecode with that one constant replaced by ``"cpu"`` (``peft_loftq_on_cpu``);
  nothing else changes. LoftQ's dequantized weight is scored as the residual: re-quantizing an
  fp32 NF4-dequantized tensor returns it unchanged, which the run checks bit for bit on every
  LoftQ output, and it checks that pissa-svd's NF4 equals bitsandbytes' on every W. So both
  sides are scored with the same quantizer, bit for bit.

Run
---
    python bench/qpissa_vs_loftq.py                     # the benchmark (~10 min, 2 cores)
    python bench/qpissa_vs_loftq.py --smollm-layers all # all 30 SmolLM2 layers
    python bench/qpissa_vs_loftq.py --quick             # smoke run: r=16, 1 layer of each
    python bench/qpissa_vs_loftq.py --from-json bench/results/qpissa_vs_loftq.json
                                                        # only rewrite the RESULTS.md section

Outputs: ``bench/results/qpissa_vs_loftq.json`` and the section of ``bench/RESULTS.md`` between
``<!-- qpissa_vs_loftq:begin -->`` and ``<!-- qpissa_vs_loftq:end -->``.
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import json
import shlex
import statistics
import sys
import time
import types
from importlib import metadata
from pathlib import Path

import torch
from accuracy_vs_speed import (
    BENCH_DIR,
    load_minilm,
    load_smollm2,
    machine_description,
    update_results_md,
)

from pissa_svd.linalg import default_oversample, derive_seed
from pissa_svd.quant import fake_quantize, qpissa_factors, quantization_error

DEFAULT_JSON = BENCH_DIR / "results" / "qpissa_vs_loftq.json"
MARK_BEGIN = "<!-- qpissa_vs_loftq:begin -->"
MARK_END = "<!-- qpissa_vs_loftq:end -->"
SMOLLM2_LAYERS = 30
DEFAULT_SMOLLM_LAYERS = 10
# The PiSSA paper (arXiv 2404.02948, Section 4), LLaMA-2-7B, r = 128, 5 iterations.
PAPER = {"model": "LLaMA-2-7B", "rank": 128, "iters": 5, "qpissa": 0.194, "loftq": 0.146}

Matrix = tuple[str, torch.Tensor]


def peft_loftq_on_cpu():
    """PEFT's ``loftq_init`` with its hard-coded compute device "cuda" replaced by "cpu".

    The function body is PEFT's own code object; only that one constant differs, so the
    algorithm (bitsandbytes NF4, full SVD, iteration order) is exactly the installed PEFT's.
    """
    from peft.utils import loftq_utils

    fn = inspect.unwrap(loftq_utils.loftq_init)  # drop the torch.no_grad wrapper
    consts = fn.__code__.co_consts
    if consts.count("cuda") != 1:
        raise RuntimeError(
            "peft.utils.loftq_utils.loftq_init no longer has exactly one 'cuda' constant; "
            "re-check how it picks its device before benchmarking it on CPU"
        )
    code = fn.__code__.replace(co_consts=tuple("cpu" if c == "cuda" else c for c in consts))
    patched = types.FunctionType(code, fn.__globals__, fn.__name__, fn.__defaults__)

    def run(weight: torch.Tensor, num_bits: int, reduced_rank: int, num_iter: int):
        with torch.no_grad():
            return patched(weight, num_bits, reduced_rank, num_iter)

    return run


def evenly_spaced(count: int, total: int) -> list[int]:
    if count >= total:
        return list(range(total))
    return sorted({round(i * (total - 1) / (count - 1)) for i in range(count)})


def check_same_quantizer(mats: list[Matrix]) -> None:
    """pissa-svd's NF4 must equal bitsandbytes' (the quantizer inside PEFT's LoftQ) on W."""
    import bitsandbytes.functional as bnbf

    for name, W in mats:
        q, state = bnbf.quantize_4bit(W, blocksize=64, quant_type="nf4")
        if not torch.equal(bnbf.dequantize_4bit(q, state), fake_quantize(W, "nf4")):
            raise RuntimeError(f"pissa-svd NF4 differs from bitsandbytes on {name}")


def bench_model(
    model: str,
    mats: list[Matrix],
    ranks: list[int],
    iters: list[int],
    loftq,
    svd_method: str,
    on_cell,
) -> list[dict]:
    base = {}
    for name, W in mats:
        base[name] = quantization_error(W, W)  # QLoRA: ||W - deq(Q(W))||_*
    cells = []
    for r in ranks:
        for T in iters:
            rows, t_ours, t_loftq, t_metric = [], 0.0, 0.0, 0.0
            for name, W in mats:
                t0 = time.perf_counter()
                A, B, R, info = qpissa_factors(
                    W,
                    r,
                    iters=T,
                    adapter_dtype=torch.float32,
                    residual_dtype=torch.float32,
                    seed=derive_seed(name, 0),
                    method=svd_method,
                )
                t1 = time.perf_counter()
                deq, lora_A, lora_B = loftq(W, num_bits=4, reduced_rank=r, num_iter=T)
                t2 = time.perf_counter()
                t_ours += t1 - t0
                t_loftq += t2 - t1
                for label, res in (("QPiSSA's residual", R), ("LoftQ's dequantized weight", deq)):
                    if not torch.equal(fake_quantize(res, "nf4"), res):
                        raise RuntimeError(f"{label} for {name} is not an NF4 fixed point")
                err_q = quantization_error(W, R, A, B)
                err_l = quantization_error(W, deq, lora_A, lora_B)
                t_metric += time.perf_counter() - t2
                rows.append(
                    {
                        "name": name,
                        "shape": list(W.shape),
                        "qlora_nuc": base[name],
                        "qpissa_nuc": err_q,
                        "loftq_nuc": err_l,
                        "qpissa_reduction": 1.0 - err_q / base[name],
                        "loftq_reduction": 1.0 - err_l / base[name],
                        "qpissa_best_iter": info["best_iter"],
                        "qpissa_best_refit": info["best_refit"],
                        "qpissa_fro_errors": info["errors"],
                        "qpissa_fro_refit_errors": info["refit_errors"],
                    }
                )
            red_q = [x["qpissa_reduction"] for x in rows]
            red_l = [x["loftq_reduction"] for x in rows]
            cell = {
                "model": model,
                "rank": r,
                "iters": T,
                "n_matrices": len(rows),
                "qpissa_mean": statistics.fmean(red_q),
                "loftq_mean": statistics.fmean(red_l),
                "qpissa_min": min(red_q),
                "qpissa_max": max(red_q),
                "loftq_min": min(red_l),
                "loftq_max": max(red_l),
                "qpissa_wins": sum(q >= v for q, v in zip(red_q, red_l, strict=True)),
                "qpissa_seconds": t_ours,
                "loftq_seconds": t_loftq,
                "metric_seconds": t_metric,
                "best_iter_counts": {
                    f"{t}{'r' if refit else ''}": sum(
                        x["qpissa_best_iter"] == t and x["qpissa_best_refit"] == refit for x in rows
                    )
                    for t in range(1, T + 1)
                    for refit in (False, True)
                },
                "matrices": rows,
            }
            print(
                f"[{time.strftime('%H:%M:%S')}] [{model} r={r} T={T}] QPiSSA {cell['qpissa_mean']:.2%} ({t_ours:.1f} s) "
                f"LoftQ {cell['loftq_mean']:.2%} ({t_loftq:.1f} s); QPiSSA >= LoftQ on "
                f"{cell['qpissa_wins']}/{len(rows)} matrices; metric {t_metric:.1f} s",
                flush=True,
            )
            cells.append(cell)
            on_cell(cell)
    return cells


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def targets(cells: list[dict]) -> list[str]:
    lines = []
    for c in cells:
        ok = c["qpissa_mean"] >= c["loftq_mean"]
        lines.append(
            f"- QPiSSA >= LoftQ, {c['model']} r={c['rank']} T={c['iters']}: "
            f"**{'met' if ok else 'NOT met'}** -- {c['qpissa_mean']:.2%} vs "
            f"{c['loftq_mean']:.2%} ({100 * (c['qpissa_mean'] - c['loftq_mean']):+.2f} points; "
            f"QPiSSA >= LoftQ on {c['qpissa_wins']}/{c['n_matrices']} matrices)"
        )
    by_key = {(c["model"], c["rank"], c["iters"]): c for c in cells}
    for (model, r, T), c in by_key.items():
        if T == 1:
            continue
        one = by_key.get((model, r, 1))
        if one is None:
            continue
        ok = c["qpissa_mean"] > one["qpissa_mean"]
        lines.append(
            f"- QPiSSA T={T} beats T=1, {model} r={r}: **{'met' if ok else 'NOT met'}** -- "
            f"{c['qpissa_mean']:.2%} vs {one['qpissa_mean']:.2%}"
        )
    return lines


def projection(name: str) -> str:
    """'model.layers.3.mlp.up_proj.weight' -> 'mlp.up_proj' (the part after the layer index)."""
    parts = name.split(".")
    layer = next(i for i, p in enumerate(parts) if p.isdigit())
    return ".".join(parts[layer + 1 : -1])


def projection_table(cells: list[dict], model: str) -> list[str]:
    """Mean reduction per projection kind: QPiSSA / LoftQ, one row per (r, T)."""
    cells = [c for c in cells if c["model"] == model]
    kinds = list(dict.fromkeys(projection(m["name"]) for m in cells[0]["matrices"]))
    out = [
        "| r | T | " + " | ".join(kinds) + " |",
        "|---:|---:|" + "---:|" * len(kinds),
    ]
    for c in cells:
        row = []
        for kind in kinds:
            ms = [m for m in c["matrices"] if projection(m["name"]) == kind]
            q = statistics.fmean(m["qpissa_reduction"] for m in ms)
            v = statistics.fmean(m["loftq_reduction"] for m in ms)
            row.append(f"{q:.1%} / {v:.1%}" if q < v else f"**{q:.1%}** / {v:.1%}")
        out.append(f"| {c['rank']} | {c['iters']} | " + " | ".join(row) + " |")
    return out


def markdown(result: dict) -> str:
    meta = result["meta"]
    cells = result["cells"]
    out = [
        MARK_BEGIN,
        "## QPiSSA vs LoftQ: NF4 quantization error reduction",
        "",
        f"- Date: {meta['date']}",
        f"- Machine: {meta['machine']}",
        f"- Versions: {meta['versions']}",
        f"- Command: `{meta['command']}` ({meta['runtime_s'] / 60:.1f} min with "
        f"{meta['threads']} torch thread(s); the seconds below are from single runs on a noisy "
        "machine: indicative only, the reductions are exact)",
        f"- Work: {meta['work']}",
        "- Metric (both methods): reduction = 1 - ||W - (deq(Q(residual)) + B@A)||_* / "
        "||W - deq(Q(W))||_*, nuclear norm from fp64 `torch.linalg.svdvals`, averaged "
        "(unweighted) over the matrices of a model. NF4 blocksize 64, fp32 absmax, no double "
        "quantization; scaling 1.",
        "- QPiSSA: `pissa_svd.quant.qpissa_factors` (SVD: `svd_lowrank` method "
        f"{meta['qpissa_svd_method']}, niter 4, oversample "
        f"{default_oversample(meta['qpissa_svd_method'])}; T quantization rounds and T + 1 "
        "SVDs; the best of 2T candidates by Frobenius error: round t's quantized residual with "
        "the adapter it was quantized against (t) or with the adapter refitted to it (tr)), "
        "NF4 by pissa-svd's torch quantizer. "
        "LoftQ: PEFT's `loftq_init(W, num_bits=4, reduced_rank=r, num_iter=T)` run on CPU (its "
        "hard-coded `'cuda'` device constant swapped for `'cpu'`), NF4 by bitsandbytes, full "
        "SVD, last iterate. The run checked that both quantizers agree bit for bit on every W "
        "and that both methods' residuals (QPiSSA's stored residual, LoftQ's dequantized "
        "weight) re-quantize to themselves, so both sides are scored with the same quantizer.",
        "",
        "| model | r | T | QPiSSA avg reduction | LoftQ avg reduction | QPiSSA - LoftQ (points) | "
        "QPiSSA >= LoftQ (matrices) | QPiSSA best candidate (count: t, tr) | QPiSSA s | LoftQ s |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for c in cells:
        best = ", ".join(f"{t}: {n}" for t, n in c["best_iter_counts"].items() if n)
        out.append(
            f"| {c['model']} | {c['rank']} | {c['iters']} | {c['qpissa_mean']:.2%} | "
            f"{c['loftq_mean']:.2%} | {100 * (c['qpissa_mean'] - c['loftq_mean']):+.2f} | "
            f"{c['qpissa_wins']}/{c['n_matrices']} | {best} | {c['qpissa_seconds']:.1f} | "
            f"{c['loftq_seconds']:.1f} |"
        )
    p = PAPER
    out += [
        f"| *paper: {p['model']}* | *{p['rank']}* | *{p['iters']}* | *{p['qpissa']:.1%}* | "
        f"*{p['loftq']:.1%}* | *{100 * (p['qpissa'] - p['loftq']):+.1f}* | | | | |",
        "",
        "The last row is the PiSSA paper's own figure (arXiv 2404.02948, Section 4, LLaMA-2-7B, "
        "r = 128, 5 iterations), not measured here; it is shown for scale only. There r is "
        "128 / 4096 = 3% of the smaller matrix side; here r = 16, 32, 64 is 3-17% of it (384 "
        "or 576), 8-33% for SmolLM2's 192 x 576 k/v projections. A larger share of the "
        "spectrum in the adapter removes more of the error, so r = 16 is the closest setting "
        "to the paper's.",
        "",
        "Targets:",
        "",
        *targets(cells),
        "",
    ]
    for model in dict.fromkeys(c["model"] for c in cells):
        out += [
            f"Per projection, {model}: mean reduction QPiSSA / LoftQ (bold where QPiSSA is ahead):",
            "",
            *projection_table(cells, model),
            "",
        ]
    out += [
        MARK_END,
        "",
    ]
    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[16, 32, 64])
    ap.add_argument("--iters", type=int, nargs="+", default=[1, 5])
    ap.add_argument(
        "--smollm-layers",
        nargs="+",
        default=None,
        help=f"SmolLM2 layer indices, or 'all' (default: {DEFAULT_SMOLLM_LAYERS} evenly spaced)",
    )
    ap.add_argument("--minilm-layers", type=int, nargs="+", default=None, help="default: all 6")
    ap.add_argument(
        "--svd-method",
        default="auto",
        help="QPiSSA's svd_lowrank method (auto | halko | krylov | exact; LoftQ is always exact)",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: on a shared machine two threads per process thrash)",
    )
    ap.add_argument("--quick", action="store_true", help="r=16, T=1 and 2, one layer of each")
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON)
    ap.add_argument("--no-md", action="store_true", help="do not update bench/RESULTS.md")
    ap.add_argument("--from-json", type=Path, help="only rewrite the RESULTS.md section")
    args = ap.parse_args(argv)
    if args.quick:
        args.ranks, args.iters = [16], [1, 2]
        args.smollm_layers = args.smollm_layers or ["15"]
        args.minilm_layers = args.minilm_layers or [3]
    if args.smollm_layers is None:
        args.smollm_layers = evenly_spaced(DEFAULT_SMOLLM_LAYERS, SMOLLM2_LAYERS)
    elif args.smollm_layers == ["all"]:
        args.smollm_layers = list(range(SMOLLM2_LAYERS))
    else:
        args.smollm_layers = [int(x) for x in args.smollm_layers]
    return args


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    if args.from_json:
        result = json.loads(args.from_json.read_text())
        if not args.no_md:
            update_results_md(markdown(result), MARK_BEGIN, MARK_END)
        return
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    minilm = load_minilm()
    if args.minilm_layers is not None:
        keep = tuple(f"encoder.layer.{i}." for i in args.minilm_layers)
        minilm = [(n, W) for n, W in minilm if n.startswith(keep)]
    sets = {"all-MiniLM-L6-v2": minilm, "SmolLM2-135M": load_smollm2(args.smollm_layers)}
    for mats in sets.values():
        check_same_quantizer(mats)
    n_minilm = len({n.split(".")[2] for n, _ in minilm})
    n_smol = len(sets["SmolLM2-135M"])
    subset = len(args.smollm_layers) < SMOLLM2_LAYERS
    result = {
        "meta": {
            "date": datetime.date.today().isoformat(),
            "machine": machine_description(),
            "versions": ", ".join(
                f"{p} {metadata.version(p)}"
                for p in ("pissa-svd", "peft", "bitsandbytes", "transformers")
            ),
            "command": "python " + shlex.join(["bench/qpissa_vs_loftq.py", *argv]),
            "work": (
                f"all-MiniLM-L6-v2: {len(minilm)} matrices ({n_minilm} of 6 layers, "
                f"query/key/value/dense, fp32); SmolLM2-135M: {n_smol} matrices (layers "
                f"{', '.join(map(str, args.smollm_layers))} of 0-29"
                + (", evenly spaced: a subset, to keep the run near 10 min" if subset else "")
                + "; q/k/v/o/gate/up/down, bf16 upcast to fp32); ranks "
                + ", ".join(map(str, args.ranks))
                + "; iterations T = "
                + ", ".join(map(str, args.iters))
            ),
            "threads": args.threads,
            "qpissa_svd_method": args.svd_method,
            "complete": False,
        },
        "cells": [],
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)

    def save(cell: dict | None) -> None:
        """Write the JSON after every cell, so a stopped run keeps what it measured."""
        if cell is not None:
            result["cells"].append(cell)
        result["meta"]["runtime_s"] = time.perf_counter() - start
        args.json.write_text(json.dumps(result, indent=1))

    loftq = peft_loftq_on_cpu()
    for model, mats in sets.items():
        bench_model(model, mats, args.ranks, args.iters, loftq, args.svd_method, save)
    result["meta"]["complete"] = True
    save(None)
    if not args.no_md:
        update_results_md(markdown(result), MARK_BEGIN, MARK_END)
    print(f"[done] {result['meta']['runtime_s']:.0f} s; wrote {args.json}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
