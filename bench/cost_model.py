"""Fit the planning cost model (pissa_svd/costmodel.py) to measured per-batch costs.

1. Compute points: a synthetic bf16 checkpoint holding matrices of many shapes (square, wide,
   tall, thin KV-like; some repeated so that they batch) is decomposed batch by batch with the
   pipeline's own ``_decompose_batch`` (read from the page cache, bf16 -> fp32, SVD, residual,
   norms), at ranks 16/64/128, methods auto (krylov2 or exact), halko and krylov, niter 2 and
   4, with the fp32 sketch and (two configurations) the bf16 one (``--sketch-dtype bf16``),
   and QPiSSA (``--quantize nf4`` and ``int8``, T = 2 rounds, the shapes of 1M values or more).
   Each point is the minimum of ``--repeats`` timed runs after a warm-up.
2. The compute coefficients (seconds per GEMM FLOP, bf16-sketch GEMM FLOP, dense FLOP, LAPACK
   SVD FLOP, matrix element, call, and NF4/int8-quantized element) are a non-negative
   least-squares fit minimizing relative error over the points.
3. IO points: whole ``decompose`` runs of random-init Llama checkpoints (hidden 2048, the
   decompose benchmark's shapes) with 2 and 11 layers; what their reports do not account to
   batches is IO (copying the untouched tensors, writing residuals and adapter), fitted as
   seconds per byte written. The 22-layer checkpoint is held out: its whole runs (fp32 and
   bf16 sketch) are predicted from the fitted model and compared with measured runs, as is a
   QPiSSA run (``--quantize nf4``, default T = 5) of the 2-layer one.
4. The coefficients and every point go to ``pissa_svd/cost_model.json`` (under this device kind;
   other kinds are kept), and a table of estimates for 7B, 70B and 405B Llama shapes to
   ``bench/RESULTS.md``.

Run: ``python bench/cost_model.py`` (CPU, ~5 min here) or ``--device cuda`` on a GPU machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from accuracy_vs_speed import update_results_md
from safetensors.torch import save_file
from scipy.optimize import nnls

from pissa_svd import costmodel, pipeline
from pissa_svd.distributed import assign
from pissa_svd.output import human

BENCH_DIR = Path(__file__).resolve().parent
WORK = BENCH_DIR / "_work"
DEFAULT_JSON = BENCH_DIR / "results" / "cost_model.json"
MARK_BEGIN, MARK_END = "<!-- cost_model:begin -->", "<!-- cost_model:end -->"

# (out, in, copies): copies > 1 share a shape and are batched together when small enough.
SHAPES = [
    (256, 1024, 4),
    (1024, 256, 4),
    (512, 512, 4),
    (1024, 1024, 2),
    (2048, 2048, 1),
    (1024, 2816, 2),
    (2816, 1024, 1),
    (2048, 5632, 1),
    (5632, 2048, 1),
    (256, 2048, 2),
    (512, 4096, 1),
    (4096, 4096, 1),
    (4096, 11008, 1),
]
CONFIGS = [  # (rank, method, niter, sketch dtype, quantize)
    (16, "auto", 4, "fp32", None),
    (64, "auto", 4, "fp32", None),
    (64, "halko", 4, "fp32", None),
    (64, "krylov", 4, "fp32", None),
    (128, "auto", 2, "fp32", None),
    (16, "krylov", 2, "fp32", None),
    (64, "auto", 4, "bf16", None),
    (16, "krylov", 2, "bf16", None),
    (128, "auto", 2, "bf16", None),  # a third width: bf16 passes scale with it, elements not
    (64, "auto", 4, "fp32", "nf4"),
    (64, "auto", 4, "fp32", "int8"),
]
QUANT_ITERS = 2  # QPiSSA points: T rounds (the default 5 costs 2x as much for the same terms)
# QPiSSA points: the shapes of at least 1M values, as LLM projections are. Its passes over the
# matrix run up to 2x faster per value on matrices that fit in cache (256 x 1024), and a fit
# that counted those predicted a held-out 2-layer 1.1B QPiSSA run 42% short.
QUANT_SHAPES = r"^m\.s(1024x1024|1024x2816|2816x1024|2048x2048|2048x5632|5632x2048|4096x4096)_"
LLAMA_IO = (2, 11)  # layers of the checkpoints whose whole runs calibrate IO
LLAMA_HELD_OUT = 22

# Llama shapes for the estimate table: hidden, intermediate, layers, kv heads, head dim, vocab.
MODELS = {
    "Llama-2-7B": (4096, 11008, 32, 32, 128, 32000),
    "Llama-3-70B": (8192, 28672, 80, 8, 128, 128256),
    "Llama-3.1-405B": (16384, 53248, 126, 8, 128, 128256),
}


def build_checkpoint(path: Path) -> None:
    if path.exists():
        return
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for m, n, copies in SHAPES:
        for c in range(copies):
            w = torch.randn(m, n, generator=g) * 0.02
            tensors[f"m.s{m}x{n}_{c}.weight"] = w.to(torch.bfloat16)
    tmp = path.with_name(path.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
    tmp.rename(path)


def compute_points(src: Path, device: str, repeats: int) -> list[dict]:
    points = []
    for rank, method, niter, sketch, quantize in CONFIGS:
        opts = pipeline.Options(
            rank=rank,
            niter=niter,
            method=method,
            targets=[QUANT_SHAPES if quantize else r"^m\."],
            device=device,
            sketch_dtype=sketch,
            quantize=quantize,
            quant_iters=QUANT_ITERS if quantize else pipeline.Options.quant_iters,
            quiet=True,
        )
        plan = pipeline.make_plan(src, WORK / "cost_model_unused_out", opts)
        scratch = pipeline._Scratch()
        for batch in plan.batches:
            t0 = batch[0]
            out = pipeline._staging(scratch, "out", batch, [0] * len(batch))
            pipeline._decompose_batch(plan, batch, scratch, out)  # warm-up
            times = []
            for _ in range(repeats):
                # It returns host copies of its results: the device is idle when it returns.
                start = time.perf_counter()
                pipeline._decompose_batch(plan, batch, scratch, out)
                times.append(time.perf_counter() - start)
            m, n = t0.out_features, t0.in_features
            points.append(
                {
                    "shape": [m, n],
                    "batch": len(batch),
                    "rank": rank,
                    "niter": niter,
                    "oversample": plan.oversample,
                    "method": t0.method,
                    "sketch": sketch,
                    "quantize": quantize,
                    "quant_iters": QUANT_ITERS if quantize else 0,
                    "seconds": min(times),
                    "features": plan.batch_features(batch),
                }
            )
            print(
                f"  {m}x{n} x{len(batch)} r={rank} {t0.method} niter={niter} {sketch}"
                f"{f' {quantize}' if quantize else ''}: {min(times) * 1e3:.1f} ms",
                flush=True,
            )
    return points


def fit(points: list[dict]) -> tuple[dict[str, float], float]:
    """NNLS on relative error: minimize sum((pred - t) / t)^2 with coefficients >= 0.

    Two stages: the SVD terms on the plain points, then the quantization terms on the QPiSSA
    points with those fixed (a QPiSSA point is T + 1 SVDs plus its quantization passes, whose
    cost would otherwise leak into the shared per-element and per-call terms)."""
    quant = list(costmodel.QUANT_FEATURES)
    base = [k for k in costmodel.FEATURES if k not in quant]
    plain = [p for p in points if not p.get("quantize")]
    qpissa = [p for p in points if p.get("quantize")]
    coef = _nnls_relative(plain, base, {})
    coef.update(_nnls_relative(qpissa, quant, coef) if qpissa else dict.fromkeys(quant, 0.0))
    errors = []
    for p in points:
        p["predicted"] = costmodel.predict({**coef, "io_bytes": 0.0}, p["features"])
        errors.append(abs(p["predicted"] - p["seconds"]) / p["seconds"])
    return coef, max(errors)


def _nnls_relative(points: list[dict], keys: list[str], fixed: dict[str, float]) -> dict:
    """Coefficients for ``keys`` given the ``fixed`` ones, minimizing relative error."""
    X = np.array([[p["features"][k] for k in keys] for p in points], dtype=float)
    known = np.array(
        [sum(c * p["features"][k] for k, c in fixed.items()) for p in points], dtype=float
    )
    t = np.array([p["seconds"] for p in points])
    A = X / t[:, None]
    scale = A.max(axis=0)
    scale[scale == 0] = 1
    coef, _ = nnls(A / scale, 1 - known / t)
    return dict(zip(keys, (coef / scale).tolist(), strict=True))


def llama_checkpoint(layers: int) -> Path:
    path = WORK / f"llama-bf16-L{layers}"
    if not path.exists():
        subprocess.run(
            [sys.executable, str(BENCH_DIR / "decompose_vs_peft.py"), "_child", "build",
             str(layers), str(path)],
            check=True,
        )  # fmt: skip
    return path


def run_decompose(src: Path, device: str, sketch: str = "fp32", quantize=None) -> dict:
    out = WORK / f"cost_model_out_{src.name}"
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    report = pipeline.decompose(
        src, out, rank=64, niter=4, device=device, sketch_dtype=sketch, quantize=quantize,
        quiet=True,
    )  # fmt: skip
    wall = time.perf_counter() - start
    written = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    shutil.rmtree(out)
    batch_s = sum(r["seconds"] for r in report["matrices"])
    return {
        "checkpoint": src.name,
        "sketch": sketch,
        "wall_s": wall,
        "batch_seconds": batch_s,
        "io_seconds": wall - batch_s,
        "bytes_written": written,
        "matrices": len(report["matrices"]),
    }


def predict_run(
    src: Path, device: str, coef: dict[str, float], sketch: str = "fp32", quantize=None
) -> float:
    opts = pipeline.Options(rank=64, niter=4, device=device, sketch_dtype=sketch, quantize=quantize)
    plan = pipeline.make_plan(src, WORK / "cost_model_unused_out", opts)
    return sum(_batch_seconds(plan, b, coef) for b in plan.batches) + coef["io_bytes"] * (
        plan.ckpt.total_bytes + _adapter_bytes(plan.targets)
    )


def _batch_seconds(plan, batch, coef) -> float:
    return costmodel.predict(coef, plan.batch_features(batch))


def _adapter_bytes(targets) -> int:
    return sum(2 * t.rank * (t.in_features + t.out_features) for t in targets)


def estimates(coef: dict[str, float], device: str, processes: list[int]) -> list[dict]:
    """Whole-model estimates for the MODELS shapes at r=64, niter 4, method auto, bf16."""
    rows = []
    p = pipeline.default_oversample("auto")
    for name, (h, inter, layers, kv, hd, vocab) in MODELS.items():
        shapes = [(h, h), (kv * hd, h), (kv * hd, h), (h, h), (inter, h), (inter, h), (h, inter)]
        jobs, jobs_bf16 = [], []
        for m, n in shapes:
            method = pipeline.resolve_method("auto", m, n, 64, p, 4)
            io = coef["io_bytes"] * (2 * m * n + 2 * 64 * (m + n))  # residual + adapter, bf16
            for bf16, out in ((False, jobs), (True, jobs_bf16)):
                f = costmodel.features(
                    m, n, 64, method=method, niter=4, oversample=p, bf16_sketch=bf16
                )
                out += [costmodel.predict(coef, f) + io] * layers
        other_bytes = 2 * (2 * vocab * h) + 2 * h * (2 * layers + 1)  # embeddings, lm_head, norms
        copy_other = coef["io_bytes"] * other_bytes  # rank 0 copies the untouched tensors
        params = layers * sum(m * n for m, n in shapes) + other_bytes // 2

        # decompose's default pipeline overlaps IO: two read and two output buffers.
        def working(m, n, overlap):
            method = pipeline.resolve_method("auto", m, n, 64, p, 4)
            return costmodel.working_bytes(m, n, 64 + p, 1, 2, 4, 2, overlap, method, 4)

        peak = max(working(m, n, True) for m, n in shapes)
        peak_seq = max(working(m, n, False) for m, n in shapes)
        row = {
            "model": name,
            "params_b": params / 1e9,
            "checkpoint_bytes": 2 * params,
            "peak_working_bytes": peak,
            "peak_working_bytes_overlap_off": peak_seq,
            "per_process": {},
            "bf16_sketch_one_process": sum(jobs_bf16) + copy_other,
        }
        for k in processes:
            owner = assign(jobs, k)
            load = [sum(c for c, o in zip(jobs, owner, strict=True) if o == r) for r in range(k)]
            load[0] += copy_other
            row["per_process"][str(k)] = max(load)
        rows.append(row)
    return rows


def markdown(result: dict) -> str:
    kind = result["device_kind"]
    lines = [
        MARK_BEGIN,
        f"## Planning cost model ({kind})",
        "",
        f"- Date: {result['date']}",
        f"- Machine: {result['machine']}",
        f"- Command: `{result['command']}`",
        "- Model: seconds of a batch = gemm_flop/gemm_rate + bf16_gemm_flop/bf16_gemm_rate "
        "(the passes over W of a bf16 sketch) + dense_flop/dense_rate + svd_flop/svd_rate + elements x per-element + per-call (+ QPiSSA's NF4/int8 elements x their per-element cost); IO not part of a batch = bytes "
        "written / io_rate (features counted in `pissa_svd/costmodel.py`). Fitted by "
        "non-negative least squares on relative error; coefficients and points are in "
        "`pissa_svd/cost_model.json`, which `--dry-run` and the torchrun work split read.",
        "",
    ]
    c = result["coef"]
    rate = {
        k: (1 / c[k] if c[k] > 0 else float("inf"))
        for k in ("gemm_flop", "bf16_gemm_flop", "dense_flop", "svd_flop", "io_bytes")
    }
    lines += [
        f"Fitted: GEMM {rate['gemm_flop'] / 1e9:.0f} GFLOP/s, bf16-sketch GEMM "
        f"{rate['bf16_gemm_flop'] / 1e9:.0f} GFLOP/s, dense (orthonormalization, "
        f"Rayleigh-Ritz) {rate['dense_flop'] / 1e9:.0f} GFLOP/s, LAPACK SVD "
        f"{rate['svd_flop'] / 1e9:.1f} GFLOP/s, {c['elements'] * 1e9:.2f} ns per matrix element,"
        f" {c['calls'] * 1e3:.2f} ms per call, IO {rate['io_bytes'] / 1e9:.2f} GB/s written; "
        f"QPiSSA: {c['nf4_elements'] * 1e9:.1f} ns per NF4-quantized element, "
        f"{c['int8_elements'] * 1e9:.1f} ns per int8 one. "
        f"Worst relative error over the {len(result['points'])} compute points: "
        f"{result['max_rel_err']:.0%}.",
        "",
        "| shape (out x in) | batch | rank | method | niter | sketch | QPiSSA | measured ms |"
        " model ms | error |",
        "|---|---:|---:|---|---:|---|---|---:|---:|---:|",
    ]
    for p in result["points"]:
        err = p["predicted"] / p["seconds"] - 1
        qpissa = f"{p['quantize']}, T={p['quant_iters']}" if p.get("quantize") else ""
        lines.append(
            f"| {p['shape'][0]} x {p['shape'][1]} | {p['batch']} | {p['rank']} | {p['method']} |"
            f" {p['niter']} | {p.get('sketch', 'fp32')} |"
            f" {qpissa} |"
            f" {p['seconds'] * 1e3:.1f} | {p['predicted'] * 1e3:.1f} |"
            f" {err:+.0%} |"
        )
    lines += [
        "",
        "Whole runs (rank 64, niter 4; random-init bf16 Llama, hidden 2048, MLP 5632; the"
        " QPiSSA run with `--quant-iters` 5, the default):",
        "",
        "| checkpoint | role | matrices | measured s | batches s | IO s | bytes written |"
        " model s | error |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["io_points"] + result["held_out"]:
        model = r.get("predicted")
        err = "" if model is None else f"{model / r['wall_s'] - 1:+.0%}"
        lines.append(
            f"| {r['checkpoint']} | {r['role']} | {r['matrices']} | {r['wall_s']:.1f} |"
            f" {r['batch_seconds']:.1f} | {r['io_seconds']:.1f} | {human(r['bytes_written'])} |"
            f" {'' if model is None else f'{model:.1f}'} |"
            f" {err} |"
        )
    procs = list(result["estimates"][0]["per_process"])
    redone = result.get("estimates_redone")
    lines += [
        "",
        f"Estimates on this {kind} machine (r=64, niter 4, method auto, bf16, all 7 projections;"
        " per process, one device each, the work split as torchrun runs it; reads at the page"
        " cache's speed, as measured, so a checkpoint larger than RAM adds its disk read time"
        + (
            f"; recomputed from this fit with the planner of {redone['date']}: `{redone['command']}`"
            if redone
            else ""
        )
        + "):",
        "",
        "| model | parameters | checkpoint | peak working memory per process (`--overlap off`) | "
        + " | ".join(f"{k} process{'es' if k != '1' else ''}" for k in procs)
        + " | 1 process, `--sketch-dtype bf16` |",
        "|---|---:|---:|---:|" + "---:|" * (len(procs) + 1),
    ]
    for e in result["estimates"]:
        lines.append(
            f"| {e['model']} | {e['params_b']:.1f} B | {human(e['checkpoint_bytes'])} |"
            f" {human(e['peak_working_bytes'])} ({human(e['peak_working_bytes_overlap_off'])})"
            " + runtime | "
            + " | ".join(_duration(e["per_process"][k]) for k in procs)
            + f" | {_duration(e['bf16_sketch_one_process'])} |"
        )
    lines += ["", MARK_END]
    return "\n".join(lines) + "\n"


def machine_description(device: str) -> str:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "unknown CPU",
    )
    what = f"{torch.get_num_threads()} CPU threads ({cpu})"
    if device.startswith("cuda"):
        what = f"{torch.cuda.get_device_name(device)} + {what}"
    return f"{what}; torch {torch.__version__}, Python {sys.version.split()[0]}"


def _duration(s: float) -> str:
    if s < 120:
        return f"{s:.0f} s"
    if s < 2 * 3600:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


def save_model(kind: str, result: dict) -> None:
    try:
        data = json.loads(costmodel.MODEL_FILE.read_text())
    except (OSError, ValueError):
        data = {}
    data.setdefault("devices", {})[kind] = {
        "coef": result["coef"],
        "machine": result["machine_short"],
        "date": result["date"],
        "command": result["command"],
        "max_rel_err": result["max_rel_err"],
        "points": [
            {
                k: p[k]
                for k in (
                    "shape",
                    "batch",
                    "rank",
                    "niter",
                    "oversample",
                    "method",
                    "sketch",
                    "quantize",
                    "quant_iters",
                    "seconds",
                )
            }
            for p in result["points"]
        ],
        "io_points": result["io_points"],
    }
    data["note"] = "written by bench/cost_model.py; see bench/RESULTS.md (Planning cost model)"
    costmodel.MODEL_FILE.write_text(json.dumps(data, indent=1) + "\n")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--processes", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON)
    ap.add_argument("--no-md", action="store_true", help="do not update bench/RESULTS.md")
    ap.add_argument("--no-save", action="store_true", help="do not write cost_model.json")
    ap.add_argument(
        "--estimates-only",
        action="store_true",
        help="recompute the estimate table of the last run (--json) with its fitted rates and "
        "the current planner, without measuring",
    )
    args = ap.parse_args(argv)
    kind = torch.device(args.device).type
    if args.estimates_only:
        result = json.loads(args.json.read_text())
        result["estimates"] = estimates(result["coef"], args.device, args.processes)
        result["estimates_redone"] = {
            "date": datetime.date.today().isoformat(),
            "command": "python bench/cost_model.py --estimates-only",
        }
        args.json.write_text(json.dumps(result, indent=1) + "\n")
        if not args.no_md:
            update_results_md(markdown(result), MARK_BEGIN, MARK_END)
        print(markdown(result))
        return
    WORK.mkdir(parents=True, exist_ok=True)
    src = WORK / "cost_model_shapes"
    build_checkpoint(src)

    print("[compute points]", flush=True)
    points = compute_points(src, args.device, args.repeats)
    coef, max_err = fit(points)
    print(f"[fit] {coef}; worst relative error {max_err:.0%}", flush=True)

    print("[io points]", flush=True)
    io_points = []
    for layers in LLAMA_IO:
        r = run_decompose(llama_checkpoint(layers), args.device)
        r["role"] = "fits IO"
        io_points.append(r)
        print(f"  {r}", flush=True)
    coef["io_bytes"] = sum(r["io_seconds"] for r in io_points) / sum(
        r["bytes_written"] for r in io_points
    )
    held = []
    for layers, sketch, quantize in (
        (LLAMA_HELD_OUT, "fp32", None),
        (LLAMA_HELD_OUT, "bf16", None),
        (LLAMA_IO[0], "fp32", "nf4"),  # QPiSSA, T = 5 (the default; the points use 2)
    ):
        src = llama_checkpoint(layers)
        r = run_decompose(src, args.device, sketch, quantize)
        r["role"] = "held out" + (", bf16 sketch" if sketch == "bf16" else "")
        r["role"] += f", --quantize {quantize}" if quantize else ""
        r["predicted"] = predict_run(src, args.device, coef, sketch, quantize)
        held.append(r)
        print(f"  held out: {r}", flush=True)

    result = {
        "device_kind": kind,
        "date": datetime.date.today().isoformat(),
        "machine": machine_description(args.device),
        "machine_short": machine_description(args.device).split(";")[0],
        "command": "python bench/cost_model.py" + "".join(f" {a}" for a in (argv or sys.argv[1:])),
        "coef": coef,
        "max_rel_err": max_err,
        "points": points,
        "io_points": io_points,
        "held_out": held,
        "estimates": estimates(coef, args.device, args.processes),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    if not args.no_save:
        save_model(kind, result)
    if not args.no_md:
        update_results_md(markdown(result), MARK_BEGIN, MARK_END)
    print(markdown(result))


if __name__ == "__main__":
    main()
