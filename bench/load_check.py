"""What decompose's mixture-of-experts load check costs on real model shapes, and what it finds.

``python bench/load_check.py`` writes, for each model below, the config.json of its real shape
(nothing else: the check builds the model on the meta device and never reads a weight), names
its attention and expert projections as its checkpoints do, and runs
``pissa_svd.loadcheck.check`` at rank 64 in a fresh process, so the time includes importing
transformers and PEFT, as in one ``pissa-svd decompose`` run. Writes
bench/results/load_check.json and the section of bench/RESULTS.md between
``<!-- load_check:begin -->`` and ``<!-- load_check:end -->``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from accuracy_vs_speed import machine_description, update_results_md

BENCH = Path(__file__).resolve().parent
OUT_JSON = BENCH / "results" / "load_check.json"
BEGIN, END = "<!-- load_check:begin -->", "<!-- load_check:end -->"

# name: (config class, config kwargs, expert block, expert projections, experts, shared MLP)
MODELS = {
    "Mixtral-8x7B": (
        "MixtralConfig",
        dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
             num_attention_heads=32, num_key_value_heads=8, num_local_experts=8),
        "block_sparse_moe", ("w1", "w3", "w2"), 8, None,
    ),
    "Mixtral-8x22B": (
        "MixtralConfig",
        dict(hidden_size=6144, intermediate_size=16384, num_hidden_layers=56,
             num_attention_heads=48, num_key_value_heads=8, num_local_experts=8),
        "block_sparse_moe", ("w1", "w3", "w2"), 8, None,
    ),
    "Qwen3-30B-A3B": (
        "Qwen3MoeConfig",
        dict(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
             num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
             num_experts=128, num_experts_per_tok=8),
        "mlp", ("gate_proj", "up_proj", "down_proj"), 128, None,
    ),
    "Qwen3-235B-A22B": (
        "Qwen3MoeConfig",
        dict(hidden_size=4096, intermediate_size=12288, moe_intermediate_size=1536,
             num_hidden_layers=94, num_attention_heads=64, num_key_value_heads=4, head_dim=128,
             num_experts=128, num_experts_per_tok=8),
        "mlp", ("gate_proj", "up_proj", "down_proj"), 128, None,
    ),
    "Qwen2-57B-A14B": (
        "Qwen2MoeConfig",
        dict(hidden_size=3584, intermediate_size=18944, moe_intermediate_size=2560,
             shared_expert_intermediate_size=20480, num_hidden_layers=28,
             num_attention_heads=28, num_key_value_heads=4, num_experts=64,
             num_experts_per_tok=8),
        "mlp", ("gate_proj", "up_proj", "down_proj"), 64, "shared_expert",
    ),
}  # fmt: skip

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
from pathlib import Path
from pissa_svd import loadcheck
folder, targets = Path(sys.argv[1]), list(json.loads(Path(sys.argv[2]).read_text()))
config = json.loads((folder / "config.json").read_text())
r = loadcheck.check(folder, config, targets, 64)
print(json.dumps({"ok": r.ok, "reason": r.reason, "missing": len(r.missing),
                  "seconds": time.perf_counter() - t0}))
"""


def targets_of(name: str) -> tuple[Path, dict[str, int]]:
    """Write ``name``'s config.json to a temporary folder; its targets: module -> out * in."""
    import transformers

    cls, kw, block, projs, experts, shared = MODELS[name]
    config = getattr(transformers, cls)(**kw)
    config.architectures = [cls.replace("Config", "ForCausalLM")]
    folder = Path(tempfile.mkdtemp(prefix="load_check_"))
    config.save_pretrained(folder)
    h = config.hidden_size
    head = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q, kv = config.num_attention_heads * head, config.num_key_value_heads * head
    inter = getattr(config, "moe_intermediate_size", None) or config.intermediate_size
    sizes = {}
    for layer in range(config.num_hidden_layers):
        for proj, n in (
            ("q_proj", q * h),
            ("k_proj", kv * h),
            ("v_proj", kv * h),
            ("o_proj", h * q),
        ):
            sizes[f"model.layers.{layer}.self_attn.{proj}"] = n
        for e in range(experts):
            for proj in projs:
                sizes[f"model.layers.{layer}.{block}.experts.{e}.{proj}"] = h * inter
        if shared:
            for proj in ("gate_proj", "up_proj", "down_proj"):
                n = h * config.shared_expert_intermediate_size
                sizes[f"model.layers.{layer}.mlp.{shared}.{proj}"] = n
    return folder, sizes


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-md", action="store_true", help="do not update bench/RESULTS.md")
    args = ap.parse_args()
    import peft
    import transformers

    rows = []
    for name in MODELS:
        folder, sizes = targets_of(name)
        spec = folder / "targets.json"
        spec.write_text(json.dumps(sizes))
        run = subprocess.run(
            [sys.executable, "-c", CHILD, str(folder), str(spec)],
            capture_output=True,
            text=True,
            check=True,
        )
        result = json.loads(run.stdout.strip().splitlines()[-1])
        rows.append({"model": name, "targets": len(sizes), **result})
        print(rows[-1], flush=True)
    doc = {
        "date": datetime.date.today().isoformat(),
        "machine": machine_description(),
        "versions": f"transformers {transformers.__version__}, PEFT {peft.__version__}",
        "command": "python bench/load_check.py",
        "rows": rows,
    }
    OUT_JSON.write_text(json.dumps(doc, indent=1) + "\n")
    if not args.no_md:
        update_results_md(markdown(doc), BEGIN, END)
    return 0


def markdown(doc: dict) -> str:
    lines = [
        BEGIN,
        "## Mixture-of-experts load check (decompose, before any work)",
        "",
        f"- Date: {doc['date']}; machine: {doc['machine']}; {doc['versions']}",
        f"- Command: `{doc['command']}`",
        "- What: the real shapes' config.json only; the attention and expert projections named",
        "  as their checkpoints name them; `loadcheck.check` at rank 64 in a fresh process",
        "  (seconds include importing transformers and PEFT).",
        "",
        "| model | targets | PEFT attaches every adapter | targets without one | seconds |",
        "|---|---:|---|---:|---:|",
    ]
    for r in doc["rows"]:
        verdict = {True: "yes", False: "**no**", None: "not checked"}[r["ok"]]
        lines.append(
            f"| {r['model']} | {r['targets']} | {verdict} | {r['missing']} | {r['seconds']:.1f} |"
        )
    lines += [
        "",
        "Where PEFT would drop adapters (Qwen2-MoE: transformers 5 fuses its experts and PEFT",
        "0.21 maps none of them), decompose stops with one line and suggests",
        r"`--exclude '\.experts\.'`.",
        END,
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
