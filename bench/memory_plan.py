"""How the memory ``--dry-run`` plans compares with what a run takes, on real model shapes.

``python bench/memory_plan.py`` writes one-layer bf16 checkpoints with the shapes of
Llama-3-8B (hidden 4096, intermediate 14336) and Llama-3-70B (8192, 28672), and a two-layer
one of the 1.1B checkpoint of bench/decompose_vs_peft.py (2048, 5632), into bench/_work/, then
for each case, in fresh processes:

- the plan: ``make_plan`` with the CLI's options, ``runtime_bytes()`` + ``working_bytes``
  (what ``--dry-run`` prints as "memory peak ~");
- the run: ``pissa-svd decompose`` with the same options, and its report's
  ``totals.peak_rss_bytes`` (the process's peak resident set).

It also measures, one call per fresh process, how much the resident set grows while
``svd_lowrank`` runs on one fp32 matrix (rank 64, niter 4; /proc/self/status VmHWM, reset
just before the call), against ``costmodel.svd_temporaries``, the planner's term for it.

Writes bench/results/memory_plan.json and the section of bench/RESULTS.md between
``<!-- memory_plan:begin -->`` and ``<!-- memory_plan:end -->``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from accuracy_vs_speed import machine_description, update_results_md

BENCH = Path(__file__).resolve().parent
WORK = BENCH / "_work"
OUT_JSON = BENCH / "results" / "memory_plan.json"
BEGIN, END = "<!-- memory_plan:begin -->", "<!-- memory_plan:end -->"

# name: (hidden, intermediate, attention heads, kv heads, layers)
SHAPES = {
    "1.1B-L2": (2048, 5632, 32, 4, 2),
    "8B-L1": (4096, 14336, 32, 8, 1),
    "70B-L1": (8192, 28672, 64, 8, 1),
}
# (checkpoint, extra CLI options)
CASES = [
    ("8B-L1", []),
    ("8B-L1", ["--overlap", "off"]),
    ("70B-L1", []),
    ("70B-L1", ["--overlap", "off"]),
    ("8B-L1", ["--sketch-dtype", "bf16"]),
    ("1.1B-L2", ["--quantize", "nf4", "--quant-iters", "2"]),
    ("1.1B-L2", ["--quantize", "nf4", "--quant-iters", "2", "--overlap", "off"]),
    ("8B-L1", ["--quantize", "nf4", "--quant-iters", "2"]),
    ("8B-L1", ["--quantize", "nf4", "--quant-iters", "2", "--overlap", "off"]),
]
SVD_SHAPES = [(1024, 4096), (4096, 4096), (14336, 4096), (28672, 8192)]
SVD_METHODS = ["halko", "krylov2", "krylov3", "krylov", "exact"]

MAKE = """
import sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
h, i, heads, kv, layers = map(int, sys.argv[2:7])
cfg = LlamaConfig(hidden_size=h, intermediate_size=i, num_attention_heads=heads,
                  num_key_value_heads=kv, num_hidden_layers=layers, vocab_size=1024)
with torch.device("meta"):
    model = LlamaForCausalLM(cfg)
model = model.to_empty(device="cpu").to(torch.bfloat16)
torch.manual_seed(0)
for p in model.parameters():
    torch.nn.init.normal_(p, std=0.02)
model.save_pretrained(sys.argv[1], max_shard_size="1GB")
"""

PLAN = """
import json, sys
from pathlib import Path
from pissa_svd.cli import build_parser, options_from_args
from pissa_svd.pipeline import make_plan
args = build_parser().parse_args(["decompose", *sys.argv[1:]])
plan = make_plan(Path(args.src), Path(args.out), options_from_args(args))
runtime = plan.runtime_bytes()
print(json.dumps({"runtime": runtime, "working": plan.working_bytes}))
"""

SVD = """
import json, re, sys, torch
from pissa_svd import costmodel, svd_lowrank
from pissa_svd.linalg import default_oversample
m, n, method, backend = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
def kb(key):
    text = open("/proc/self/status").read()
    return int(re.search(rf"{key}:\\s+(\\d+) kB", text).group(1)) * 1024
svd_lowrank(torch.randn(2, 96, 64), 4, niter=1, method=method, backend=backend)  # load it all
W = torch.randn(m, n)
open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM to the current resident set
base = kb("VmRSS")
svd_lowrank(W, 64, niter=4, method=method, backend=backend)
grown = kb("VmHWM") - base
p = default_oversample(method)
bound = costmodel.svd_temporaries(m, n, min(64 + p, m, n), method, 4) * 4
print(json.dumps({"grown": grown, "planned": bound}))
"""


def _checkpoint(name: str) -> Path:
    path = WORK / f"memplan-{name}"
    if not (path / "config.json").exists():
        h, i, heads, kv, layers = SHAPES[name]
        tmp = path.with_name(path.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        args = [str(tmp), str(h), str(i), str(heads), str(kv), str(layers)]
        subprocess.run([sys.executable, "-c", MAKE, *args], check=True, capture_output=True)
        tmp.rename(path)
    return path


def _python(code: str, *args: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", code, *args], check=True, capture_output=True, text=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def _case(ckpt: Path, extra: list[str], rank: int) -> dict:
    with tempfile.TemporaryDirectory(dir=WORK) as tmp:
        out = Path(tmp) / "out"
        argv = [str(ckpt), "--rank", str(rank), "--out", str(out), *extra]
        plan = _python(PLAN, *argv)
        subprocess.run(["pissa-svd", "decompose", *argv, "--quiet"], check=True)
        report = json.loads((out / "pissa_report.json").read_text())
    measured = report["totals"]["peak_rss_bytes"]
    planned = plan["runtime"] + plan["working"]
    return {**plan, "planned": planned, "measured": measured, "ratio": measured / planned}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2, help="runs per case (the peak varies)")
    ap.add_argument("--no-md", action="store_true", help="do not update bench/RESULTS.md")
    args = ap.parse_args()
    WORK.mkdir(exist_ok=True)

    cases = []
    for name, extra in CASES:
        ckpt = _checkpoint(name)
        runs = [_case(ckpt, extra, args.rank) for _ in range(args.repeats)]
        row = {"checkpoint": name, "options": " ".join(extra) or "(defaults)", "runs": runs}
        cases.append(row)
        measured = ", ".join(f"{r['measured'] / 1e6:.0f}" for r in runs)
        print(
            f"{name:8s} {row['options']:52s} planned {runs[0]['planned'] / 1e6:7.0f} MB"
            f"  measured {measured} MB",
            flush=True,
        )
    svd = []
    for m, n in SVD_SHAPES:
        for method in SVD_METHODS:
            if method == "exact" and m * n > 4096 * 4096:
                continue  # minutes on a few cores; the smaller shapes show its workspace
            for backend in ("torch", "native"):
                r = _python(SVD, str(m), str(n), method, backend)
                svd.append({"shape": [m, n], "method": method, "backend": backend, **r})
                print(
                    f"svd {m}x{n} {method:8s} {backend:6s} grew {r['grown'] / 1e6:6.1f} MB,"
                    f" planned {r['planned'] / 1e6:6.1f} MB",
                    flush=True,
                )

    result = {
        "date": datetime.date.today().isoformat(),
        "machine": machine_description(),
        "command": "python bench/memory_plan.py",
        "rank": args.rank,
        "cases": cases,
        "svd_temporaries": svd,
    }
    OUT_JSON.parent.mkdir(exist_ok=True)
    OUT_JSON.write_text(json.dumps(result, indent=1) + "\n")
    if not args.no_md:
        update_results_md(_markdown(result), BEGIN, END)


def _markdown(res: dict) -> str:
    mb = 1e6
    lines = [
        BEGIN,
        "## Memory plan: `--dry-run` against measured peaks",
        "",
        f"`{res['command']}` ({res['date']}; {res['machine']}). Rank {res['rank']}, niter 4, bf16",
        "checkpoints of one or two layers with real models' shapes (random weights). Planned:",
        '`--dry-run`\'s "memory peak ~" (runtime once the engine has run + the reusable buffers',
        "at the largest size any batch needs + the largest batch's fresh temporaries). Measured:",
        "the run's `totals.peak_rss_bytes`, one per run.",
        "",
        "| checkpoint | options | planned | measured | measured / planned |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for c in res["cases"]:
        planned = c["runs"][0]["planned"]
        measured = [r["measured"] for r in c["runs"]]
        ratios = [m / planned for m in measured]
        lines.append(
            f"| {c['checkpoint']} | `{c['options']}` | {planned / mb:.0f} MB"
            f" | {', '.join(f'{m / mb:.0f}' for m in measured)} MB"
            f" | {_span(ratios)} |"
        )
    lines += [
        "",
        "SVD temporaries: resident growth while `svd_lowrank` runs on one fp32 matrix (fresh",
        "process, VmHWM reset before the call) against `costmodel.svd_temporaries`:",
        "",
        "| shape | method | torch | native | planned |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    by = {}
    for r in res["svd_temporaries"]:
        by.setdefault((tuple(r["shape"]), r["method"]), {})[r["backend"]] = r
    for (shape, method), rs in by.items():
        lines.append(
            f"| {shape[0]} x {shape[1]} | {method} | {rs['torch']['grown'] / mb:.1f} MB"
            f" | {rs['native']['grown'] / mb:.1f} MB | {rs['torch']['planned'] / mb:.1f} MB |"
        )
    lines.append(END)
    return "\n".join(lines) + "\n"


def _span(values: list[float]) -> str:
    lo, hi = f"{min(values):.2f}", f"{max(values):.2f}"
    return lo if lo == hi else f"{lo}-{hi}"


if __name__ == "__main__":
    main()
