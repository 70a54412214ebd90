"""End-to-end decompose on one GPU against copying the checkpoint and against PEFT's route.

Builds a random-init bf16 Llama checkpoint with transformers on this machine's disk (default:
LLaMA-2-7B-shaped, 32 layers, hidden 4096, MLP 11008, 32/32 heads, vocab 32000), then times,
each in a fresh child process and side by side:

1. ``cp -r`` of the checkpoint folder (the IO floor: read and write every byte once);
2. ``pissa-svd decompose CKPT --rank 64 --niter 4 --device cuda`` (reads and writes overlapped
   with the compute, the default), and the same with ``--sketch-dtype bf16``;
3. PEFT's in-memory route on the same GPU (load bf16 -> ``get_peft_model`` with
   ``pissa_niter_4`` -> save adapter -> unload -> save), as in bench/decompose_vs_peft.py.

Targets (issue "Scale"): ours <= 1.3x the copy, and >= 5x faster than PEFT. Results go to
``bench/results/gpu_pipeline.json`` (and ``$OUT`` when set); the markdown lines it prints go into
bench/RESULTS.md by hand, with the date.

Smoke test on CPU: ``python bench/gpu_pipeline.py --small --device cpu``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

from decompose_vs_peft import child_build, run_ours, run_peft, shard_files, warm_page_cache

BENCH_DIR = Path(__file__).resolve().parent
LLAMA_7B = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                num_key_value_heads=32, vocab_size=32000)  # fmt: skip
SMALL = dict(hidden_size=256, intermediate_size=688, num_attention_heads=8,
             num_key_value_heads=8, vocab_size=1000)  # fmt: skip
TARGET_VS_COPY = 1.3
TARGET_VS_PEFT = 5.0


def build(dest: Path, layers: int, shape: dict, device: str) -> float:
    if (dest / "config.json").exists():
        return 0.0
    start = time.perf_counter()
    child_build(layers, dest, shard_size="5GB", init_device=device, **shape)
    return time.perf_counter() - start


def save(result: dict, path: Path) -> None:
    """Write what has been measured so far (and copy it to $OUT): a later stage that fails or
    runs out of time leaves the earlier figures."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    if os.environ.get("OUT"):
        shutil.copy(path, Path(os.environ["OUT"]) / path.name)


def timed_copy(src: Path, dest: Path) -> float:
    shutil.rmtree(dest, ignore_errors=True)
    os.sync()
    start = time.perf_counter()
    subprocess.run(["cp", "-r", str(src), str(dest)], check=True)
    wall = time.perf_counter() - start
    shutil.rmtree(dest)
    return wall


def _layer_bytes(shape: dict) -> int:
    """bf16 bytes of one layer's projections (attention 4 h^2, MLP 3 h i), plus its share of
    the embeddings for 32 layers."""
    h, i = shape["hidden_size"], shape["intermediate_size"]
    return 2 * (4 * h * h + 3 * h * i + 2 * shape.get("vocab_size", 32000) * h // 32)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--small", action="store_true", help="tiny shapes, for a smoke test")
    ap.add_argument("--skip-peft", action="store_true")
    ap.add_argument("--work", type=Path, default=BENCH_DIR / "_work" / "gpu_pipeline")
    ap.add_argument("--json", type=Path, default=BENCH_DIR / "results" / "gpu_pipeline.json")
    args = ap.parse_args(argv)
    shape = SMALL if args.small else LLAMA_7B
    layers = 2 if args.small else args.layers
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    src = work / f"llama-bf16-h{shape['hidden_size']}-L{layers}"
    # The checkpoint and a copy (cp -r), or an output, at once: ~27 GB at full size. Stop now
    # rather than midway through writing 13.5 GB.
    need = 2.2 * sum(_layer_bytes(shape) for _ in range(layers))
    free = shutil.disk_usage(work).free
    if not src.is_dir() and free < need:
        print(f"[disk] {free / 1e9:.1f} GB free in {work}, ~{need / 1e9:.1f} GB needed", flush=True)
        return 2

    build_s = build(src, layers, shape, args.device)
    size = sum(p.stat().st_size for p in shard_files(src))
    print(f"[build] {src} ({size / 1e9:.2f} GB) in {build_s:.0f} s", flush=True)
    warm_page_cache(src)  # for every route alike

    result = {
        "date": datetime.date.today().isoformat(),
        "device": args.device,
        "checkpoint": {"path": str(src), "layers": layers, **shape, "bytes": size},
        "copy_s": timed_copy(src, work / "copy"),
    }
    print(f"[cp -r] {result['copy_s']:.1f} s", flush=True)
    save(result, args.json)
    # The routes of decompose_vs_peft.py, on the device; outputs deleted after each (disk).
    result["ours"] = run_ours(work, src, "gpu", "--device", args.device)
    shutil.rmtree(work / "out")
    print(f"[ours] {result['ours']['wall_s']:.1f} s {result['ours']['report']}", flush=True)
    save(result, args.json)
    result["ours_bf16"] = run_ours(
        work, src, "gpu", "--device", args.device, "--sketch-dtype", "bf16", name="ours-bf16"
    )
    shutil.rmtree(work / "out")
    print(f"[ours bf16 sketch] {result['ours_bf16']['wall_s']:.1f} s", flush=True)
    save(result, args.json)
    if not args.skip_peft:
        try:
            result["peft"] = run_peft(work, src, "gpu", args.device)
            print(f"[peft] {result['peft']['wall_s']:.1f} s {result['peft']['phases_s']}")
        except Exception as exc:  # keep ours and the copy
            result["peft_error"] = f"{type(exc).__name__}: {exc}"
            print(f"[peft] failed: {result['peft_error']}", flush=True)
        shutil.rmtree(work / "out", ignore_errors=True)

    ours = result["ours"]["wall_s"]
    lines = [
        f"- ours / cp -r: {ours / result['copy_s']:.2f}x (target <= {TARGET_VS_COPY}x): "
        f"{'met' if ours <= TARGET_VS_COPY * result['copy_s'] else 'NOT met'}"
    ]
    if "peft" in result:
        speedup = result["peft"]["wall_s"] / ours
        lines.append(
            f"- PEFT / ours: {speedup:.1f}x (target >= {TARGET_VS_PEFT}x): "
            f"{'met' if speedup >= TARGET_VS_PEFT else 'NOT met'}"
        )
    low = result["ours_bf16"]["wall_s"]
    lines.append(
        f"- --sketch-dtype bf16: {low:.1f} s = {low / result['copy_s']:.2f}x cp -r"
        + (f", PEFT / it {result['peft']['wall_s'] / low:.1f}x" if "peft" in result else "")
    )
    result["verdicts"] = lines
    save(result, args.json)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
