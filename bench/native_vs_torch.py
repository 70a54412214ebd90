"""Benchmark: the native engine (csrc/) against the torch path, same algorithm, same sketch.

CPU part (default): real SmolLM2-135M weights, the 7 projections of layers ``--layers``, called
batched by shape exactly as decompose calls them, at ranks ``--ranks``, for ``halko``,
``krylov`` and ``krylov2`` at niter 4; plus LLM-shaped matrices (4096x4096, 4096x11008,
11008x4096 with a real layer's spectrum, as in accuracy_vs_speed.py) at rank 64. Both backends
run side by side in this process, round-robin, ``--repeats`` times; the table shows the minimum
wall time, the time ratio native / torch and the worst excess error ``||W - U S Vh||_F / ||W - W_r*||_F - 1``.

GPU part (``--llama7b``, needs CUDA): all 224 projection matrices of a LLaMA-2-7B-shaped model
(32 layers; q/k/v/o 4096x4096, gate/up 11008x4096, down 4096x11008), fp32, created on the GPU
with a decaying spectrum s_i = i^-0.6 on exactly orthonormal factors, r=64, niter=4:
native CUDA batched, torch backend batched, ``torch.svd_lowrank`` looped (PEFT), and cuSOLVER
``Xgesvdr`` looped. ``--small`` shrinks it (8 layers, dims / 4) for a smoke run on any device.

    python bench/native_vs_torch.py                      # CPU part (~4 min, 2 cores)
    python bench/native_vs_torch.py --llama7b            # GPU part (bench/gpu_check.sh)

Writes bench/results/native_vs_torch[_gpu].json and a section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from accuracy_vs_speed import (
    RESULTS_MD,
    exact_spectra,
    load_smollm2,
    ours,
    real_spectrum,
    score,
    stretch,
    synthetic,
    timed,
    update_results_md,
)

import pissa_svd
from pissa_svd import native
from pissa_svd.pissa import sum_squares

BENCH = Path(__file__).resolve().parent
LLM_SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096)]


def cpu_part(args) -> dict:
    ok, why = native.available("cpu")
    if not ok:
        sys.exit(f"native CPU backend unavailable: {why}")
    sets = {"SmolLM2": load_smollm2(args.layers)}
    base = real_spectrum()
    sets["LLM-shaped"] = [
        (f"llm{m}x{n}", synthetic(m, n, stretch(base, min(m, n)), seed=i))
        for i, (m, n) in enumerate(LLM_SHAPES)
    ]
    spectra = {name: s for mats in sets.values() for name, s in exact_spectra(mats).items()}
    rows = []
    for set_name, mats in sets.items():
        for r in [64] if set_name == "LLM-shaped" else args.ranks:
            for method in ("halko", "krylov", "krylov2"):
                runs = {b: ours(method, 4, None, backend=b) for b in ("torch", "native")}
                errs = {}
                for b, run in runs.items():
                    out = run(mats, r)  # warm-up; these outputs are scored
                    errs[b] = max(
                        score(W, f, spectra[n], r)[0] for (n, W), f in zip(mats, out, strict=True)
                    )
                times = {b: [] for b in runs}
                for _ in range(args.repeats):
                    for b, run in runs.items():
                        times[b].append(timed(lambda run=run, mats=mats, r=r: run(mats, r))[0])
                row = {
                    "set": set_name,
                    "rank": r,
                    "method": method,
                    "matrices": len(mats),
                    **{f"{b}_s": min(t) for b, t in times.items()},
                    **{f"{b}_median_s": statistics.median(t) for b, t in times.items()},
                    **{f"{b}_err": e for b, e in errs.items()},
                }
                row["ratio"] = row["native_s"] / row["torch_s"]
                rows.append(row)
                print(
                    f"{set_name:<11} r={r:<3} {method:<7} torch {row['torch_s']:.3f}s "
                    f"native {row['native_s']:.3f}s ratio {row['ratio']:.2f}  err torch "
                    f"{errs['torch']:.2e} native {errs['native']:.2e}",
                    flush=True,
                )
    return {"rows": rows}


def llama7b_part(args, progress=None) -> dict:
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    layers, scale = (8, 4) if args.small else (32, 1)
    h, f = 4096 // scale, 11008 // scale
    shapes = {"qkvo": (h, h, 4 * layers), "gate_up": (f, h, 2 * layers), "down": (h, f, layers)}
    gen = torch.Generator(device=dev).manual_seed(0)
    mats, spectra = {}, {}
    for key, (m, n, count) in shapes.items():
        k = min(m, n)
        U = torch.linalg.qr(torch.randn(m, k, device=dev, generator=gen)).Q
        V = torch.linalg.qr(torch.randn(n, k, device=dev, generator=gen)).Q
        s = torch.arange(1, k + 1, device=dev, dtype=torch.float32) ** -0.6
        scales = 1 + torch.rand(count, device=dev, generator=gen)
        spectra[key] = scales[:, None] * s
        mats[key] = torch.stack([(U * (c * s)) @ V.mT for c in scales])
    r, total = 64, sum(c for *_, c in shapes.values())

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def ours_batched(backend, method="auto"):  # auto: what decompose runs
        return {
            k: pissa_svd.svd_lowrank(
                W, r, niter=4, method=method, seed=list(range(len(W))), backend=backend
            )
            for k, W in mats.items()
        }

    def peft_loop():
        out = {}
        for k, W in mats.items():
            res = [torch.svd_lowrank(w, q=r, niter=4) for w in W]
            out[k] = (
                torch.stack([u for u, _, _ in res]),
                torch.stack([s for _, s, _ in res]),
                torch.stack([v.mT for _, _, v in res]),
            )
        return out

    # The bf16 sketch reads bf16 weights (the checkpoint's own dtype), made once; its error
    # is scored against the fp32 matrices, so it includes their rounding to bf16.
    mats_bf16 = {k: W.to(torch.bfloat16) for k, W in mats.items()}

    def ours_bf16_sketch():
        return {
            k: pissa_svd.svd_lowrank(
                W, r, niter=4, seed=list(range(len(W))), sketch_dtype=torch.bfloat16
            )
            for k, W in mats_bf16.items()
        }

    routes = {
        "torch.svd_lowrank loop (PEFT)": peft_loop,
        "ours torch backend, batched": lambda: ours_batched("torch"),
        "ours torch, bf16 sketch, batched": ours_bf16_sketch,
    }
    if native.available(dev.type)[0]:
        routes["ours native, batched"] = lambda: ours_batched("native")
        routes["ours native krylov, batched"] = lambda: ours_batched("native", "krylov")
        if dev.type == "cuda":
            routes["cuSOLVER gesvdr loop"] = lambda: {
                k: pissa_svd.svd_lowrank(
                    W, r, niter=4, method="gesvdr", backend="native", oversample=16
                )
                for k, W in mats.items()
            }
    results = {}
    for name, fn in routes.items():
        try:
            out = fn()  # warm-up, scored
            sync()
        except Exception as exc:  # one route failing (cuSOLVER's limits) keeps the others
            results[name] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            print(f"{name:<32} failed: {results[name]['error']}", flush=True)
            continue
        times = []
        for _ in range(1 if "gesvdr" in name else args.repeats):  # its speed is unknown
            t0 = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t0)
        worst = 0.0
        for k, (U, S, Vh) in out.items():
            resid = sum_squares(mats[k] - (U * S.unsqueeze(-2)) @ Vh).sqrt()
            opt = spectra[k][:, r:].double().square().sum(-1).sqrt()
            worst = max(worst, float((resid / opt - 1).max()))
        results[name] = {"s": min(times), "worst_err": worst}
        print(
            f"{name:<32} {min(times):.3f} s for {total} matrices, worst excess err {worst:.2e}",
            flush=True,
        )
        if progress is not None:  # what is measured so far survives a timeout
            progress({"matrices": total, "routes": results, "partial": True})
    return {
        "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
        "matrices": total,
        "small": args.small,
        "routes": results,
    }


def cpu_section(doc) -> str:
    lines = [
        "<!-- native_vs_torch:begin -->",
        "## Native engine vs torch path (CPU)",
        "",
        f"`{doc['command']}` — {doc['date']}, {doc['machine']}. Same algorithm and sketch on "
        "both sides; minimum of the timed runs; err = worst excess error over the set.",
        "",
        "| set | r | method | torch s | native s | native / torch | err torch | err native |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for x in doc["rows"]:
        lines.append(
            f"| {x['set']} ({x['matrices']}) | {x['rank']} | {x['method']} | {x['torch_s']:.3f}"
            f" | {x['native_s']:.3f} | {x['ratio']:.2f}x | {x['torch_err']:.2e}"
            f" | {x['native_err']:.2e} |"
        )
    ratios = [x["ratio"] for x in doc["rows"]]
    lines += [
        "",
        f"native / torch time: {min(ratios):.2f}x to {max(ratios):.2f}x. "
        '`backend="auto"` therefore stays on torch on this CPU '
        "(`pissa_svd.linalg.AUTO_BACKEND`) unless the native engine is faster.",
        "<!-- native_vs_torch:end -->",
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, nargs="+", default=[0, 15, 29])
    p.add_argument("--ranks", type=int, nargs="+", default=[16, 32, 64])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--llama7b", action="store_true", help="the GPU part")
    p.add_argument("--small", action="store_true", help="GPU part at 1/4 size (smoke run)")
    args = p.parse_args()
    doc = {
        "command": "python bench/native_vs_torch.py " + " ".join(sys.argv[1:]),
        "date": datetime.date.today().isoformat(),
        "machine": f"{torch.get_num_threads()} threads, torch {torch.__version__}",
    }
    if args.llama7b:
        out = BENCH / "results" / "native_vs_torch_gpu.json"
        out.parent.mkdir(exist_ok=True)

        def progress(part: dict) -> None:
            out.write_text(json.dumps({**doc, **part}, indent=1) + "\n")

        doc.update(llama7b_part(args, progress))
    else:
        doc.update(cpu_part(args))
        out = BENCH / "results" / "native_vs_torch.json"
        update_results_md(
            cpu_section(doc), "<!-- native_vs_torch:begin -->", "<!-- native_vs_torch:end -->"
        )
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {out}" + ("" if args.llama7b else f" and {RESULTS_MD}"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
