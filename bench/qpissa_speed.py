"""QPiSSA decompose time with the compiled NF4 quantizer (csrc/nf4.h) and with torch's.

``python bench/qpissa_speed.py`` decomposes the 2-layer random-init bf16 Llama of the
decompose benchmark (hidden 2048, MLP 5632; built by bench/decompose_vs_peft.py if missing)
with ``--quantize nf4`` at rank 64, T = 5, alternating the two quantizers run by run in one
process, and reports the median wall time of each, their ratio, and that both wrote the same
bytes. It also times one fake quantization of a 5632 x 2048 fp32 matrix each way. Writes
bench/results/qpissa_speed.json and the section of bench/RESULTS.md between
``<!-- qpissa_speed:begin -->`` and ``<!-- qpissa_speed:end -->``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import shutil
import statistics
import time
from pathlib import Path

import torch
from accuracy_vs_speed import machine_description, update_results_md
from cost_model import WORK, llama_checkpoint

from pissa_svd import native, pipeline, quant

BENCH = Path(__file__).resolve().parent
OUT_JSON = BENCH / "results" / "qpissa_speed.json"
BEGIN, END = "<!-- qpissa_speed:begin -->", "<!-- qpissa_speed:end -->"


class TorchQuantizer:
    """Within the block, NF4 fake quantization takes the torch path."""

    def __enter__(self):
        self.saved = native.has_nf4_fake
        native.has_nf4_fake = lambda: False

    def __exit__(self, *exc):
        native.has_nf4_fake = self.saved


def digest(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.glob("*.safetensors")):
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def decompose_once(src: Path, out: Path) -> tuple[float, str]:
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    pipeline.decompose(src, out, rank=64, niter=4, quantize="nf4", quant_iters=5, quiet=True)
    seconds = time.perf_counter() - start
    return seconds, digest(out)


def quantizer_seconds(repeats: int) -> dict[str, float]:
    x = torch.randn(5632, 2048, generator=torch.Generator().manual_seed(0))
    times = {}
    for name in ("compiled", "torch"):
        ctx = TorchQuantizer() if name == "torch" else contextlib.nullcontext()
        with ctx:
            quant.fake_quantize(x, "nf4")
            runs = []
            for _ in range(repeats):
                start = time.perf_counter()
                quant.fake_quantize(x, "nf4")
                runs.append(time.perf_counter() - start)
        times[name] = min(runs)
    return times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--no-md", action="store_true", help="do not update bench/RESULTS.md")
    args = ap.parse_args()
    assert native.has_nf4_fake(), "no compiled NF4"
    src = llama_checkpoint(2)
    runs: dict[str, list[float]] = {"compiled": [], "torch": []}
    digests: dict[str, set[str]] = {"compiled": set(), "torch": set()}
    for _ in range(args.repeats):
        for name in ("compiled", "torch"):
            with TorchQuantizer() if name == "torch" else contextlib.nullcontext():
                seconds, d = decompose_once(src, WORK / f"qpissa_speed_{name}")
            runs[name].append(seconds)
            digests[name].add(d)
            print(f"  {name}: {seconds:.1f} s", flush=True)
    for name in runs:
        shutil.rmtree(WORK / f"qpissa_speed_{name}", ignore_errors=True)
    q = quantizer_seconds(3)
    med = {k: statistics.median(v) for k, v in runs.items()}
    doc = {
        "date": datetime.date.today().isoformat(),
        "machine": machine_description(),
        "command": "python bench/qpissa_speed.py" + (f" --repeats {args.repeats}"),
        "checkpoint": src.name,
        "runs": runs,
        "median_s": med,
        "ratio": med["compiled"] / med["torch"],
        "same_bytes": len(digests["compiled"] | digests["torch"]) == 1,
        "quantize_5632x2048_s": q,
    }
    OUT_JSON.write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps(doc, indent=1))
    if not args.no_md:
        update_results_md(markdown(doc), BEGIN, END)
    return 0


def markdown(doc: dict) -> str:
    med, q = doc["median_s"], doc["quantize_5632x2048_s"]
    n = 5632 * 2048
    return "\n".join(
        [
            BEGIN,
            "## QPiSSA: compiled NF4 quantizer vs torch",
            "",
            f"- Date: {doc['date']}; machine: {doc['machine']}",
            f"- Command: `{doc['command']}`",
            f"- Work: `decompose --quantize nf4 --quant-iters 5 --rank 64` of {doc['checkpoint']}"
            " (2 layers of a random-init bf16 Llama, hidden 2048, MLP 5632: 14 matrices), the"
            " two quantizers alternating run by run in one process; medians.",
            "",
            "| NF4 fake quantization | decompose wall s | one 5632 x 2048 fp32 matrix |",
            "|---|---:|---:|",
            f"| compiled (csrc/nf4.h) | {med['compiled']:.1f} | {q['compiled'] * 1e3:.0f} ms"
            f" ({q['compiled'] / n * 1e9:.1f} ns per value) |",
            f"| torch | {med['torch']:.1f} | {q['torch'] * 1e3:.0f} ms"
            f" ({q['torch'] / n * 1e9:.1f} ns per value) |",
            "",
            f"Compiled / torch: {doc['ratio']:.2f}x the wall time; the outputs are "
            + ("byte-identical." if doc["same_bytes"] else "**not** byte-identical."),
            END,
            "",
        ]
    )


if __name__ == "__main__":
    raise SystemExit(main())
