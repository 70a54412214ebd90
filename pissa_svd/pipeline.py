"""The decompose job: plan -> stream -> write -> rename into place.

Memory is bounded by one batch of tensors, not one model: shards are walked in file order; the
targets of a shard that share a shape are decomposed together, as one (b, m, n) call, up to a
byte budget (``batch_memory``), and their residuals, A and B are written before the next batch is
read; every other tensor is copied file-to-file without passing through memory. All output goes to a hidden
temporary sibling of OUT, which is renamed to OUT only once complete, so an interrupted run
never leaves an OUT that looks finished.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import mmap
import os
import re
import resource
import shutil
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import __version__, costmodel, loadcheck, resume
from .adapter import ADAPTER_CONFIG, ADAPTER_FILE, PEFT_PREFIX, peft_key
from .checkpoint import (
    DIRECT_ALIGN,
    FLOAT_DTYPES,
    INDEX_NAME,
    Checkpoint,
    StreamingWriter,
    TensorInfo,
    direct_view,
    dtype_nbytes,
    dtype_to_torch,
    map_tensor,
    read_tensor,
)
from .distributed import Team, assign, env_world_size, team_from_env
from .errors import InputError, RankFailure, os_error_message, read_json
from .linalg import (
    BACKENDS,
    METHODS,
    default_batch_memory,
    default_oversample,
    derive_seed,
    padded_empty,
    padded_nbytes,
    resolve_backend,
    resolve_method,
    svd_lowrank,
)
from .output import (
    check_free,
    check_out,
    copy_files,
    human,
    move_into_place,
    plain_number,
    remove_stale,
    write_json,
)
from .output import progress as _progress
from .pissa import (
    AdapterRangeError,
    adapter_factors,
    adapter_range_problem,
    copy_rows_,
    rounding_overflowed,
    subtract_adapter_,
)
from .targets import (
    conv1d_layout,
    module_name,
    multihead_attention,
    never_target,
    not_adaptable,
    select,
    task_heads,
    task_type,
)

ADAPTER_DIR = "pissa_init"
REPORT_FILE = "pissa_report.json"

DTYPE_ALIASES = {
    "bf16": "BF16",
    "bfloat16": "BF16",
    "fp16": "F16",
    "float16": "F16",
    "half": "F16",
    "fp32": "F32",
    "float32": "F32",
    "float": "F32",
    "fp64": "F64",
    "float64": "F64",
}
# --sketch-dtype: the dtype of the SVD's passes over W (svd_lowrank's sketch_dtype); "fp32"
# is the working dtype (fp64 for fp64 weights).
SKETCH_DTYPES = {"fp32": None, "bf16": torch.bfloat16}


@dataclass
class Options:
    """What the user asked for. ``None`` means "the default for this checkpoint"."""

    rank: int = 64
    niter: int = 4
    oversample: int | None = None
    method: str = "auto"
    backend: str = "auto"
    seed: int = 0
    targets: list[str] | None = None
    exclude: list[str] | None = None  # regexes: modules they find are not targets
    load_check: bool = True  # MoE experts: check PEFT attaches their adapters (loadcheck.py)
    alpha: float | None = None
    device: str = "auto"
    adapter_dtype: str | None = None
    residual_dtype: str | None = None
    batch_memory: int | None = None  # bytes of working-precision matrices per batch
    processes: int | None = None  # for --dry-run: the torchrun process count to plan for
    resume: bool = False  # continue the interrupted run staged in .OUT.partial
    quantize: str | None = None  # QPiSSA: "nf4" or "int8" residual
    quant_iters: int = 5
    overlap: str = "on"  # read and write on background threads while batches compute: on, off
    sketch_dtype: str = "fp32"  # the SVD's passes over W: fp32 (the working dtype) or bf16
    overwrite: bool = False
    quiet: bool = False


@dataclass
class Target:
    info: TensorInfo
    module: str
    transposed: bool
    out_features: int
    in_features: int
    rank: int
    method: str
    adapter_dtype: str
    residual_dtype: str

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def work_bytes(self) -> int:
        """Bytes of the matrix in the working precision (fp32, or fp64 for fp64 input)."""
        return self.out_features * self.in_features * (8 if self.info.dtype == "F64" else 4)

    def batch_key(self) -> tuple:
        """Targets with equal keys can be decomposed in one batched call."""
        return (
            self.info.shape,
            self.info.dtype,
            self.transposed,
            self.rank,
            self.method,
            self.adapter_dtype,
            self.residual_dtype,
        )

    def memory(
        self,
        oversample: int,
        batch: int = 1,
        overlap: bool = False,
        bf16_sketch: bool = False,
        quantize: bool = False,
        niter: int = 4,
    ) -> tuple[dict[str, int], int]:
        """Bytes a batch of this target's shape holds while it is processed: the reusable
        buffers by name (:func:`costmodel.buffer_bytes`; a bf16 sketch adds the bf16 copy it
        reads, except for one bf16 weight, which it reads as loaded), and what it allocates
        afresh: the SVD's temporaries and, with QPiSSA (``quantize``), for the member it works
        on, up to four more matrices in the working precision: Q_t, W - Q_t (or the residual),
        and the residual rounded to its dtype with its re-quantization, with the SVD's
        temporaries (2.8-3.4 matrices on 14336 x 4096 and 5632 x 2048: ``python
        bench/qpissa_peak.py M N``), plus what the allocator keeps: glibc keeps freed blocks
        under its 32 MiB mmap threshold for reuse (4 layers of 1024 x 2816 peaked 1.08-1.10x a
        plan without it), so three more are planned, up to 32 MiB each. QPiSSA sketches matrices it computed, never the weight
        as loaded. Planned against measured peaks: ``python bench/memory_plan.py``
        (bench/RESULTS.md, "Memory plan")."""
        m, n = self.out_features, self.in_features
        held, fresh = costmodel.memory(
            m,
            n,
            min(self.rank + oversample, min(m, n)),
            batch,
            dtype_nbytes(self.info.dtype, (1,)),
            self.work_bytes // (m * n),
            dtype_nbytes(self.residual_dtype, (1,)),
            overlap,
            self.method,
            niter,
        )
        sketch_copy = bf16_sketch and self.method != "exact"
        sketch_copy &= batch > 1 or self.info.dtype != "BF16" or quantize
        held["sketch"] = batch * m * n * 2 if sketch_copy else 0
        kept = 3 * min(self.work_bytes, MMAP_THRESHOLD)
        return held, fresh + (4 * self.work_bytes + kept if quantize else 0)

    def working_bytes(self, *args, **kwargs) -> int:
        """Peak bytes held while a batch of this target's shape is processed, from no buffers
        at all (:meth:`memory`'s parts summed)."""
        held, fresh = self.memory(*args, **kwargs)
        return sum(held.values()) + fresh


@dataclass
class Plan:
    ckpt: Checkpoint
    out: Path
    options: Options
    targets: list[Target]
    scaling: float
    alpha: float
    oversample: int
    device: str
    fan_in_fan_out: bool
    task_type: str | None
    backend: str = "torch"
    overlap: bool = False
    batch_memory: int = 0
    batches: list[list[Target]] = field(default_factory=list)
    config: dict | None = field(default=None, repr=False)
    load_check: str | None = None  # loadcheck's finding; None when the targets need none

    @functools.cached_property
    def heads(self) -> list[TensorInfo]:
        """The task head's tensors (classification, QA), which the adapter carries as PEFT's
        task models save them (:data:`pissa_svd.targets.TASK_HEADS`): as in the checkpoint."""
        infos = {i.name: i for i in self.ckpt.tensors()}
        return [infos[n] for n in task_heads(self.task_type, infos)[1]]

    @property
    def flops(self) -> float:
        return sum(_flops(self.batch_features([t])) for t in self.targets)

    @property
    def residual_bytes(self) -> int:
        """Bytes of OUT's tensors: the targets in their residual dtype, the rest as stored."""
        by_name = {t.name: t for t in self.targets}
        return sum(
            dtype_nbytes(by_name[i.name].residual_dtype, i.shape) if i.name in by_name else i.nbytes
            for i in self.ckpt.tensors()
        )

    @property
    def bf16_sketch(self) -> bool:
        return SKETCH_DTYPES[self.options.sketch_dtype] is not None

    @property
    def direct_io(self) -> bool:
        """Write residuals with O_DIRECT: when a background thread writes (``overlap``) on a
        CPU run, where a page-cache copy would take CPU from the compute (StreamingWriter)."""
        return self.overlap and self.device_kind == "cpu"

    def batch_features(self, batch: list[Target]) -> dict[str, float]:
        """The cost model's terms for one batch (same-shape targets) under this plan."""
        o, t = self.options, batch[0]
        return costmodel.features(
            t.out_features,
            t.in_features,
            t.rank,
            method=t.method,
            niter=o.niter,
            oversample=self.oversample,
            batch=len(batch),
            bf16_sketch=self.bf16_sketch,
            quantize=o.quantize,
            quant_iters=o.quant_iters,
        )

    def batch_working_bytes(self, batch: list[Target]) -> int:
        return self.peak_working_bytes([batch])

    def peak_working_bytes(self, batches: list[list[Target]]) -> int:
        """Peak bytes beyond the runtime while ``batches`` run one after another: each reusable
        buffer at the largest size any of them needs (buffers are kept and grown, never
        shrunk), plus the largest of what one batch allocates afresh."""
        o = self.options
        parts = [
            b[0].memory(
                self.oversample, len(b), self.overlap, self.bf16_sketch, bool(o.quantize), o.niter
            )
            for b in batches
        ]
        if not parts:
            return 0
        held = {k: max(p[0][k] for p in parts) for k in parts[0][0]}
        return sum(held.values()) + max(p[1] for p in parts)

    @property
    def working_bytes(self) -> int:
        return self.peak_working_bytes(self.batches)

    def runtime_bytes(self) -> int:
        """Resident bytes of this process once the engine has run: a run's peak is this plus
        its buffers and its largest batch's temporaries (:attr:`working_bytes`). One tiny call
        per method the plan uses loads what a first call loads (the compiled engine, the BLAS
        threads' buffers, a GPU's context: ~30 MB on a CPU, which the estimate missed before)."""
        o = self.options
        small = torch.randn(2, 96, 64, generator=torch.Generator().manual_seed(0))
        small = small.to(self.device)
        for method in sorted({t.method for t in self.targets}):
            svd_lowrank(
                small,
                4,
                niter=1,
                method=method,
                backend=self.backend,
                sketch_dtype=SKETCH_DTYPES[o.sketch_dtype],
            )
        if o.quantize:
            from .quant import _fake_quantize

            _fake_quantize(small[0], o.quantize, dtype=small.dtype)
        _sync(small)
        return _rss_bytes()

    def describe(self) -> str:
        """The human-readable plan that ``--dry-run`` prints."""
        o, ck = self.options, self.ckpt
        n_tensors = sum(len(f.tensors) for f in ck.files.values())
        rss = self.runtime_bytes()
        lines = [
            "pissa-svd decompose plan (dry run: nothing is written)",
            f"  source       {ck.root if ck.index is not None else ck.files[ck.shards[0]].path}"
            f"  ({len(ck.shards)} shard(s), {n_tensors} tensors, {human(ck.total_bytes)})",
            f"  output       {self.out}  (residual model) + {self.out / ADAPTER_DIR}  (adapter)",
            f"  adapter      r={o.rank}, lora_alpha={plain_number(self.alpha)} (scaling {plain_number(self.scaling)}),"
            f" task_type={self.task_type}, fan_in_fan_out={self.fan_in_fan_out}",
            f"  svd          niter={o.niter}, oversample={self.oversample}, seed={o.seed},"
            f" device={self.device}, backend={self.backend}, sketch {o.sketch_dtype}",
            *(
                [
                    f"  quantize     {o.quantize} residual (QPiSSA), {o.quant_iters} rounds"
                    " (--quant-iters)"
                ]
                if o.quantize
                else []
            ),
            f"  batching     {len(self.targets)} matrices in {len(self.batches)} calls"
            + (
                " (QPiSSA: one matrix at a time)"
                if o.quantize
                else f" (same-shape matrices of a shard, up to {human(self.batch_memory)} each,"
                f" largest batch {max(len(b) for b in self.batches)})"
            ),
            "  io           "
            + (
                "overlapped: the next batch read and the previous one written on background"
                " threads" + (", residuals with O_DIRECT" if self.direct_io else "")
                if self.overlap
                else "sequential (--overlap off)"
            ),
            f"  targets      {len(self.targets)} matrices:",
            f"    {'module':<18} {'count':>5}  {'shape (out x in)':<18} {'rank':>5}  {'method':<7}"
            f" {'dtype':<5} {'GFLOP':>9}",
        ]
        groups: dict[tuple, list[Target]] = {}
        for t in self.targets:
            key = (t.module.rsplit(".", 1)[-1], t.out_features, t.in_features, t.rank, t.method)
            groups.setdefault(key + (t.info.dtype,), []).append(t)
        for (leaf, m, n, r, meth, dt), ts in groups.items():
            gf = sum(_flops(self.batch_features([t])) for t in ts) / 1e9
            lines.append(
                f"    {leaf:<18} {len(ts):>5}  {f'{m} x {n}':<18} {r:>5}  {meth:<7} {dt:<5}"
                f" {gf:>9.1f}"
            )
        adapter = sum(
            dtype_nbytes(t.adapter_dtype, (t.rank, t.in_features + t.out_features))
            for t in self.targets
        ) + sum(i.nbytes for i in self.heads)  # a task head: modules_to_save
        lines += [
            f"  compute      {self.flops / 1e9:.1f} GFLOP in all",
            f"  memory       peak ~{human(rss + self.working_bytes)}: runtime {human(rss)}"
            f" + buffers and the largest batch's temporaries {human(self.working_bytes)}"
            f" (the whole checkpoint is {human(ck.total_bytes)})",
            f"  disk         residual {human(self.residual_bytes)}, adapter {human(adapter)}",
        ]
        if self.load_check is not None:
            lines.append(f"  loading      {self.load_check}")
        k = o.processes or env_world_size()
        costs = [_batch_cost(self, b) for b in self.batches]
        owner = assign(costs, k)
        coef, note = costmodel.coefficients(self.device_kind)
        targets = {t.name for t in self.targets}
        copied = sum(i.nbytes for i in ck.tensors() if i.name not in targets)
        lines.append(f"  processes    {k}; estimated seconds per rank ({note}):")
        for r in range(k):
            mine = [i for i, o_ in enumerate(owner) if o_ == r]
            seconds = sum(costs[i] for i in mine) + (coef["io_bytes"] * copied if r == 0 else 0)
            peak = self.peak_working_bytes([self.batches[i] for i in mine])
            lines.append(
                f"    rank {r:<4} {len(mine):>4} batches  ~{seconds:8.1f} s"
                f"  peak ~{human(rss + peak)}"
            )
        return "\n".join(lines)

    @property
    def device_kind(self) -> str:
        return torch.device(self.device).type


def make_plan(src: str | os.PathLike, out: str | os.PathLike, options: Options) -> Plan:
    """Validate everything that can be validated before writing a byte."""
    for what, path in (("SRC", src), ("--out", out)):
        if isinstance(path, str) and not path.strip():  # Path("") would be the current folder
            raise InputError(f"{what} is empty; name the folder")
    o = _library_types(options)
    if not _is_int(o.rank) or o.rank <= 0:
        raise InputError(f"--rank must be a positive integer, got {o.rank!r}")
    if o.niter < 0:
        raise InputError(f"--niter must be >= 0, got {o.niter}")
    if o.oversample is not None and o.oversample < 0:
        raise InputError(f"--oversample must be >= 0, got {o.oversample}")
    if o.method not in METHODS:
        raise InputError(f"--method must be one of {', '.join(METHODS)}, got {o.method!r}")
    if o.backend not in BACKENDS:
        raise InputError(f"--backend must be one of {', '.join(BACKENDS)}, got {o.backend!r}")
    if o.quantize is not None and o.quantize not in ("nf4", "int8"):
        raise InputError(f"--quantize must be nf4 or int8, got {o.quantize!r}")
    if isinstance(o.quant_iters, bool) or not isinstance(o.quant_iters, int) or o.quant_iters < 1:
        raise InputError(f"--quant-iters must be an integer >= 1, got {o.quant_iters!r}")
    if o.overlap not in ("on", "off"):
        raise InputError(f"--overlap must be on or off, got {o.overlap!r}")
    if o.processes is not None and o.processes < 1:
        raise InputError(f"--processes must be >= 1, got {o.processes}")
    if o.sketch_dtype not in SKETCH_DTYPES:
        raise InputError(f"--sketch-dtype must be fp32 or bf16, got {o.sketch_dtype!r}")
    if o.batch_memory is not None and o.batch_memory < 0:
        raise InputError(f"--batch-memory must be >= 0, got {o.batch_memory}")
    if o.alpha is not None and not (o.alpha > 0 and math.isfinite(o.alpha)):
        raise InputError(f"--alpha must be a positive number, got {o.alpha}")
    adapter_dtype = _dtype_option("--adapter-dtype", o.adapter_dtype)
    residual_dtype = _dtype_option("--residual-dtype", o.residual_dtype)
    device = _device(o.device)
    if SKETCH_DTYPES[o.sketch_dtype] is not None and o.backend == "native":
        raise InputError("--sketch-dtype bf16 runs on the torch backend: use --backend torch")
    try:
        backend = resolve_backend(o.backend, torch.device(device).type)
    except RuntimeError as exc:  # NativeUnavailable: say why, and what to do
        raise InputError(f"--backend native: {exc}; use --backend torch") from None
    if SKETCH_DTYPES[o.sketch_dtype] is not None:
        backend = "torch"
    if o.method == "gesvdr" and not (device.startswith("cuda") and backend == "native"):
        raise InputError(
            "--method gesvdr is cuSOLVER's randomized SVD: it needs --device cuda and the "
            "native CUDA backend (see pissa-svd env); use --method halko or krylov"
        )
    patterns = _compile_patterns(o.targets, "--targets")
    exclude = _compile_patterns(o.exclude, "--exclude")

    src_path, out_path = Path(src), Path(out)
    ckpt = Checkpoint.open(src_path)
    check_out(out_path, o.overwrite, {"the source checkpoint": src_path})
    if src_path.is_file() and (src_path.parent / "config.json").is_file() and not o.quiet:
        print(
            f"pissa-svd: note: SRC is one file, so {out_path} gets no config.json or tokenizer "
            f"files; to load it with from_pretrained, pass the folder {src_path.parent} instead",
            file=sys.stderr,
        )

    targets = []
    too_small = []  # (largest rank it allows, tensor name, out, in)
    oversample = default_oversample(o.method, o.oversample)
    config = ckpt.read_json("config.json") if src_path.is_dir() else None
    model_type = (config or {}).get("model_type")
    infos = list(ckpt.tensors())
    _check_not_quantized(src_path, config, infos)
    tensor_names = [info.name for info in infos]
    conv1d = conv1d_layout((info.name, info.shape) for info in infos)
    names = loadcheck.loaded_names(ckpt.root, config, tensor_names)
    attention = multihead_attention(tensor_names)
    for info in infos:
        hit = select(
            info.name, info.shape, patterns, exclude, conv1d, names.to_memory.get(info.name)
        )
        if hit is None:
            continue
        if refused := not_adaptable(hit.module, model_type, attention):
            if patterns is None:
                continue
            why, regex = refused
            raise InputError(
                f"--targets picks {hit.module}, {why}; leave it out with --exclude '{regex}'"
            )
        if info.dtype not in FLOAT_DTYPES:
            raise InputError(
                f"tensor {info.name!r} in {info.path.name} has dtype {info.dtype}; only "
                f"{'/'.join(FLOAT_DTYPES)} can be decomposed (dequantize the checkpoint first, "
                "or leave it out with --exclude)"
            )
        rows, cols = info.shape
        out_f, in_f = (cols, rows) if hit.transposed else (rows, cols)
        if o.rank > min(out_f, in_f):
            too_small.append((min(out_f, in_f), info.name, out_f, in_f))
            continue
        targets.append(
            Target(
                info=info,
                module=names.module(info.name),
                transposed=hit.transposed,
                out_features=out_f,
                in_features=in_f,
                rank=o.rank,
                method=resolve_method(o.method, out_f, in_f, o.rank, oversample, o.niter),
                adapter_dtype=adapter_dtype or info.dtype,
                residual_dtype=residual_dtype or info.dtype,
            )
        )
    if patterns and targets and not o.quiet:
        _note_never_targets(ckpt, patterns, exclude)
    task = task_type(config, tensor_names)
    picked = [t.name for t in targets] + [name for _, name, _, _ in too_small]
    if in_head := task_heads(task, picked)[1]:
        raise InputError(
            f"--targets picks {in_head[0]}, in the task head, which PEFT's {task} model trains "
            "whole (modules_to_save) and gives no LoRA; leave the head out of --targets"
        )
    if too_small:
        most, name, out_f, in_f = min(too_small)
        if most == 0:  # no rank fits: only --exclude helps
            raise InputError(
                f"target tensor {name!r} is empty ({out_f} x {in_f}): there is nothing to "
                f"decompose; leave it out with --exclude (e.g. --exclude "
                f"'^{re.escape(name.removesuffix('.weight'))}$')"
            )
        raise InputError(
            f"--rank {o.rank} is larger than {len(too_small)} target(s) allow, down to tensor "
            f"{name!r} ({out_f} x {in_f}, at most {most}); lower --rank to {most} or leave "
            "them out with --exclude"
        )
    if not targets:
        _no_targets(ckpt, src_path, o, patterns)
    layouts = {t.transposed for t in targets}
    if len(layouts) > 1:
        raise InputError(
            "the targets mix Conv1D (transposed) and Linear weights, which one PEFT adapter "
            "cannot describe (fan_in_fan_out is global); narrow --targets to one kind"
        )
    alpha = float(o.alpha) if o.alpha is not None else float(o.rank)
    if o.quantize and (config or {}).get("quantization_config"):
        raise InputError(
            f"{src_path} is already quantized ({config['quantization_config'].get('quant_method', 'quantization_config')}"
            " in config.json); --quantize needs the full-precision checkpoint"
        )
    if o.quantize and config is not None:
        kept = loadcheck.kept_in_full_precision([t.module for t in targets], config)
        if kept:
            raise InputError(
                f"{src_path}: 4-bit and 8-bit loading keep {kept[0]} in full precision (the "
                f"model's _keep_in_fp32_modules; {len(kept)} target(s)), so a {o.quantize} "
                f"residual there would only add its rounding error; leave them out with "
                f"--exclude '{_exclude_regex(kept)}' (whole in the residual), or drop --quantize"
            )
    load_check = _load_check(src_path, tensor_names, config, targets, o, names.mapped)
    budget = default_batch_memory(device) if o.batch_memory is None else o.batch_memory
    if o.quantize:  # QPiSSA works on one matrix at a time: a batch would only hold memory
        budget = 0
    return Plan(
        ckpt=ckpt,
        out=out_path,
        options=o,
        targets=targets,
        scaling=alpha / o.rank,
        alpha=alpha,
        oversample=oversample,
        device=device,
        fan_in_fan_out=layouts.pop(),
        task_type=task,
        backend=backend,
        overlap=o.overlap == "on",
        batch_memory=budget,
        batches=_batches(targets, budget),
        config=config,
        load_check=load_check,
    )


# What quantized checkpoints store beside (or instead of) a float weight: GPTQ/AWQ packs,
# FP8 block scales, bitsandbytes' quantization state.
_QUANT_PARTS = re.compile(
    r"\.(qweight|qzeros|scales|weight_scale(_inv)?|weight_packed|absmax|quant_map|SCB)$"
    r"|\.quant_state\."
)


def _check_not_quantized(src: Path, config: dict | None, infos: list[TensorInfo]) -> None:
    """Refuse a checkpoint saved quantized (GPTQ, AWQ, FP8, bitsandbytes, ...): its weights are
    packed integers or 8-bit floats with scales, where PiSSA splits the full-precision weight.
    A quantization_config over float weights (quantized when loaded) is no obstacle."""
    quant = (config or {}).get("quantization_config")
    if not isinstance(quant, dict):
        return
    parts = [i for i in infos if i.dtype not in FLOAT_DTYPES or _QUANT_PARTS.search(i.name)]
    if not parts:
        return
    # Name a weight stored as integers or fp8 where there is one: the clearest evidence.
    shown = next((i for i in parts if i.name.endswith("weight")), parts[0])
    method = quant.get("quant_method") or "unknown method"
    raise InputError(
        f"{src} was saved quantized ({method}, says config.json's quantization_config; it "
        f"stores {shown.name} as {shown.dtype}), and PiSSA splits full-precision weights: "
        f"decompose the original bf16/fp16 checkpoint (for a 4-bit residual, QPiSSA, add "
        f"--quantize nf4)"
    )


def _exclude_regex(modules: list[str]) -> str:
    """A regex for --exclude that finds ``modules`` by their names past the layer index
    (``mlp.shared_expert.gate_proj``), or every expert where they are all experts."""
    if all(loadcheck.EXPERT.search(m) for m in modules):
        return r"\.experts\."
    leaves: dict[str, set[str]] = {}
    for m in modules:
        parent, _, leaf = re.sub(r"^.*\.\d+\.", "", m).rpartition(".")
        leaves.setdefault(parent, set()).add(leaf)
    parts = []
    for parent, names in sorted(leaves.items()):
        leaf = names.pop() if len(names) == 1 else f"({'|'.join(sorted(names))})"
        parts.append(rf"{re.escape(parent)}\.{leaf}" if parent else leaf)
    return rf"(^|\.)({'|'.join(parts)})$"


def _load_check(
    src: Path,
    tensor_names: list[str],
    config: dict | None,
    targets: list[Target],
    o: Options,
    mapped: bool,
) -> str | None:
    """Refuse targets PEFT would not load as planned (:mod:`pissa_svd.loadcheck`): on a
    mixture-of-experts model, on any model outside the common families (``mapped``: one whose
    fused q/k/v transformers splits as it loads it, say), and wherever --targets chose them
    (any 2-D weight but embeddings and heads, which need not be a layer PEFT wraps); None for
    a dense model's default targets, which the family table keeps to linear layers PEFT
    adapts."""
    modules = (m for name in tensor_names if (m := module_name(name)))
    moe = loadcheck.needed(modules, config)
    if not (moe or mapped or o.targets):
        return None
    if not o.load_check:
        return "skipped (--no-load-check)"
    if config is None:
        return "not checked: no config.json next to the weights"
    shapes = {t.module: (t.out_features, t.in_features) for t in targets}
    result = loadcheck.check(src, config, list(shapes), o.rank, shapes)
    if result.ok is False:
        hint = f"--exclude '{_exclude_regex(result.missing)}'"
        raise InputError(
            f"{src}: {result.reason} (e.g. {', '.join(result.missing[:2])}); leave them out "
            f"with {hint} (they stay whole in the residual), or pass --no-load-check to "
            "decompose them for another trainer"
        )
    if o.quantize and result.fused:
        raise InputError(
            f"{src}: transformers {sys.modules['transformers'].__version__} loads the experts as fused "
            f"parameters (e.g. {result.fused[0]}), which bitsandbytes does not quantize, so a "
            f"{o.quantize} residual would only add its rounding error to them; leave them out "
            r"with --exclude '\.experts\.' (whole and unquantized in the residual), drop "
            "--quantize, or pass --no-load-check for a trainer that quantizes experts"
        )
    return result.reason


def _batches(targets: list[Target], budget: int) -> list[list[Target]]:
    """Group same-shape targets of one shard, in file order, into batches within ``budget``.

    A batch holds at least one matrix; the first member's position orders the batches.
    """
    batches: list[list[Target]] = []
    open_: dict[tuple, list[Target]] = {}
    for t in targets:  # file order
        key = (t.info.path, *t.batch_key())
        cur = open_.get(key)
        if cur is None or (len(cur) + 1) * t.work_bytes > budget:
            cur = open_[key] = []
            batches.append(cur)
        cur.append(t)
    return batches


def decompose(src: str | os.PathLike, out: str | os.PathLike, *, rank: int, **kwargs) -> dict:
    """Library entry point: ``decompose("ckpt/", "out/", rank=64, niter=4)``; returns the report.
    The keywords are :class:`Options`' (the command's options), ``rank`` required as there."""
    return execute(make_plan(src, out, Options(rank=rank, **kwargs)))


def execute(plan: Plan) -> dict:
    """Run a plan; under torchrun, as one of WORLD_SIZE processes (see distributed.py).

    Rank 0 owns OUT: it stages the temporary folder, creates every file and copies the
    untouched tensors (on --resume: copies them again, and creates again the files that are
    not as planned); every rank then decomposes its share of the batches into those files;
    rank 0 writes the index, adapter config and report and renames the folder into place. If
    any rank fails, every rank raises an error naming it and the tensor, and no OUT appears.
    """
    team = team_from_env(torch.device(plan.device).type)
    try:
        if team.world > 1 and plan.device.startswith("cuda"):
            plan.device = f"cuda:{team.local_rank}"
        if not team.leader:
            tmp, done, redo = _from_leader(team)
            _write_all(plan, Path(tmp), team, done, redo)
            try:
                return _from_leader(team)  # done only once rank 0 has renamed OUT into place
            except RankFailure as exc:
                if (plan.out / REPORT_FILE).is_file() and not Path(tmp).exists():
                    exc.pissa_out = "rank 0 may have written OUT before: check it with verify"
                raise
        staging = resume.staging_dir(plan.out)
        remove_stale(plan.out)  # what a killed merge or to-lora into the same OUT left
        owned = False  # from here on staging is ours, even once its progress record is gone
        held: list[int] = []  # the staging folder's lock, held until this run ends
        try:
            done, redo = _open_staging(plan, staging, held)
            owned = True
            team.broadcast(("ok", (str(staging), done, redo)))
            report = _write_all(plan, staging, team, done, redo)
            check_free(plan.out, plan.options.overwrite)  # while the work can still be resumed
            shutil.rmtree(staging / resume.PROGRESS_DIR)
            move_into_place(staging, plan.out, plan.options.overwrite)
        except BaseException as exc:
            told = getattr(exc, "pissa_agreed", False)
            if team.world > 1 and isinstance(exc, Exception) and not told:
                team.broadcast(("failed", f"rank 0 failed on {plan.out}: {exc}"))
            if isinstance(exc, resume.Untouched):
                raise  # refused before this run changed the folder: leave it as it is
            owned = owned or resume.is_ours(staging)
            if getattr(exc, "pissa_discard", False) and owned:
                resume.remove(staging)  # nothing in it can be resumed
            note = _keep_or_remove(staging) if owned else None
            if note and isinstance(exc, InputError):
                exc.args = (f"{exc}; {note}",)  # still one line
            elif note:
                exc.pissa_note = note  # the CLI adds it to its message
            raise
        finally:
            for fd in held:
                os.close(fd)
        try:
            team.broadcast(("ok", report))
        except BaseException as exc:  # a peer died, or torchrun stopped us, after the rename
            exc.pissa_out = "OUT was written and is complete"
            raise
        return report
    finally:
        team.close()


def _write_all(
    plan: Plan, tmp: Path, team: Team, done: dict[str, dict], redo: set[str] | None
) -> dict:
    """``done``: report rows of tensors already finished in ``tmp`` (resume); ``redo``: the
    files to create (None: all of them, a fresh start)."""
    o, ck = plan.options, plan.ckpt
    t_start = time.perf_counter()
    todo = [b for b in plan.batches if not all(t.name in done for t in b)]
    owner = assign([_batch_cost(plan, b) for b in todo], team.world)
    mine = [b for b, r in zip(todo, owner, strict=True) if r == team.rank]
    prepare_bytes = ck.total_bytes - sum(t.info.nbytes for t in plan.targets)
    bar = _progress(
        sum(t.info.nbytes for b in mine for t in b) + (prepare_bytes if team.leader else 0),
        "decompose" if team.world == 1 else f"decompose [rank {team.rank}/{team.world}]",
        o.quiet or not team.leader,
        f"tensors 0/{sum(len(b) for b in mine)}",
    )
    rows: list[dict] = []
    try:
        # Phase 1 (rank 0): every file with its header, and the tensors that are only copied
        # (again on a resume: the staged copies are never trusted).
        prep = _attempt(lambda: _prepare(plan, tmp, bar, redo) if team.leader else None, team)
        _agree(team, prep)
        # Phase 2 (every rank): its batches, in file order, straight into those files.
        failure = _attempt(lambda: _decompose_share(plan, tmp, mine, bar, rows, team.rank), team)
        shared = team.all_gather((failure, rows, _rss_bytes()))
        _agree(team, next((f for f, _, _ in shared if f is not None), None))
        if not team.leader:
            return {}
        # Phase 3 (rank 0): index, adapter config, side files, report.
        rows = [r for _, rs, _ in shared for r in rs]
        rows += [r for n, r in done.items() if n not in {x["name"] for x in rows}]
        order = {t.name: i for i, t in enumerate(plan.targets)}
        rows.sort(key=lambda r: order[r["name"]])
        _write_index(plan, tmp)
        write_json(tmp / ADAPTER_DIR / ADAPTER_CONFIG, _adapter_config(plan))
        copy_files(ck.root, ck.extra_files, tmp)
        _retag_config(plan, tmp)
        report = {
            "pissa_svd_version": __version__,
            "source": os.path.abspath(
                ck.root if ck.index is not None else ck.files[ck.shards[0]].path
            ),
            "rank": o.rank,
            "lora_alpha": plan.alpha,
            "scaling": plan.scaling,
            "niter": o.niter,
            "oversample": plan.oversample,
            "method": o.method,
            "sketch_dtype": o.sketch_dtype,
            "seed": o.seed,
            "quantize": o.quantize,
            "quant_iters": o.quant_iters if o.quantize else None,
            # How the errors of the QPiSSA records were summed (verify reads it).
            "error_sums": "per row, in fp64" if o.quantize else None,
            "device": plan.device,
            "fan_in_fan_out": plan.fan_in_fan_out,
            "load_check": plan.load_check,
            "totals": {
                "matrices": len(rows),
                "processes": team.world,
                "resumed": len(done),
                "seconds": round(time.perf_counter() - t_start, 3),
                "svd_seconds": round(sum(r["svd_seconds"] for r in rows), 3),
                "compute_seconds": round(sum(r.get("compute_seconds", 0.0) for r in rows), 3),
                "bytes_in": ck.total_bytes,
                "peak_rss_bytes": max(rss for _, _, rss in shared),
                "mean_energy_fraction": sum(r["energy_fraction"] for r in rows) / len(rows),
            },
            "matrices": rows,
        }
        write_json(tmp / REPORT_FILE, report)
        return report
    except BaseException:
        bar.leave = False  # erase the bar: the error that follows gets a line of its own
        raise
    finally:
        bar.close()


def _open_staging(
    plan: Plan, staging: Path, held: list[int]
) -> tuple[dict[str, dict], set[str] | None]:
    """Start the staging folder, or with ``resume`` reopen it, and lock it (its descriptor is
    appended to ``held``); returns the finished tensors' report rows and the files to create
    (None: all of them). A folder another live run holds is never touched (resume.Busy)."""
    if plan.options.resume:
        resume.require(staging, plan.out)
        held.append(resume.lock(staging))
        adapter_file = f"{ADAPTER_DIR}/{ADAPTER_FILE}"
        layouts = {s: (_shard_entries(plan, s), _shard_meta(plan, s)) for s in plan.ckpt.shards}
        layouts[adapter_file] = (_adapter_entries(plan), ADAPTER_META)
        done, redo = resume.finished(staging, plan, adapter_file, _adapter_config(plan), layouts)
        if resume.is_prepared(staging):
            return done, redo
        # Stopped while creating the files: nothing was finished; create them again.
        resume.remove(staging)
    elif staging.exists() or staging.is_symlink():
        if not resume.is_ours(staging):
            raise InputError(
                f"{staging} exists and is not an interrupted pissa-svd run (it is where OUT is "
                "staged); move it away, or choose another --out"
            )
        held.append(resume.lock(staging))
        if not plan.options.quiet:  # our own leftover from an interrupted run
            print(f"pissa-svd: starting over: removing {staging}", file=sys.stderr)
        resume.remove(staging)
    held.append(resume.start(staging, plan))
    return {}, None


def _keep_or_remove(staging: Path) -> str | None:
    """After a failure: keep finished tensors for --resume, else leave nothing behind.
    Returns what to tell the user about what was kept."""
    n = resume.journaled(staging)
    if n == 0:
        resume.remove(staging)
        return None
    return f"{n} finished tensors kept in {staging}: rerun with --resume to continue (or delete it)"


def _from_leader(team: Team):
    status, value = team.broadcast(None)
    if status == "failed":
        raise RankFailure(value)
    return value


def _batch_cost(plan: Plan, batch: list[Target]) -> float:
    """Estimated seconds of a batch (cost model), for balancing ranks and for --dry-run."""
    t = batch[0]  # the members share shape and dtypes
    written = len(batch) * (
        dtype_nbytes(t.residual_dtype, t.info.shape)
        + dtype_nbytes(t.adapter_dtype, (t.rank, t.in_features + t.out_features))
    )
    return costmodel.seconds(plan.batch_features(batch), plan.device_kind, io_bytes=written)


def _flops(feats: dict[str, float]) -> float:
    return feats["gemm_flop"] + feats["bf16_gemm_flop"] + feats["dense_flop"] + feats["svd_flop"]


def _attempt(fn, team: Team):
    """Run ``fn``; on a multi-process run, turn an exception into (kind, message) for every
    rank to raise (see ``_agree``); alone, let it propagate with its traceback."""
    if team.world == 1:
        fn()
        return None
    try:
        fn()
        return None
    except Exception as exc:
        what = getattr(exc, "pissa_tensor", None) or "preparing the output files"
        if isinstance(exc, InputError):
            kind = "discard" if getattr(exc, "pissa_discard", False) else "input"
            return (kind, f"rank {team.rank}, {what}: {exc}")
        if isinstance(exc, OSError):  # the file system refused (permissions, space, ...)
            return ("input", f"rank {team.rank}, {what}: {os_error_message(exc)}")
        traceback.print_exc()  # a bug: its traceback, once, from the rank that hit it
        return ("error", f"rank {team.rank} failed on {what}: {exc.__class__.__name__}: {exc}")


def _agree(team: Team, failure) -> None:
    """Raise, on every rank, the first failure any rank reported."""
    if team.world > 1:
        failures = [f for f in team.all_gather(failure) if f is not None]
        failure = failures[0] if failures else None
    if failure is not None:
        kind, message = failure
        exc = InputError(message) if kind in ("input", "discard") else RankFailure(message)
        exc.pissa_agreed = True  # every rank raises it: nothing more to tell the others
        exc.pissa_discard = kind == "discard"
        raise exc


def _shard_entries(plan: Plan, shard: str) -> list[tuple[str, str, tuple[int, ...]]]:
    residual_dtype = {t.name: t.residual_dtype for t in plan.targets}
    return [
        (i.name, residual_dtype.get(i.name, i.dtype), i.shape)
        for i in plan.ckpt.files[shard].tensors.values()
    ]


def _shard_meta(plan: Plan, shard: str) -> dict[str, str]:
    meta = plan.ckpt.files[shard].metadata
    return {**meta, "format": meta.get("format", "pt")}


ADAPTER_META = {"format": "pt"}


def _adapter_entries(plan: Plan) -> list[tuple[str, str, tuple[int, ...]]]:
    entries = []
    for t in plan.targets:
        entries += [
            (peft_key(t.module, "A"), t.adapter_dtype, (t.rank, t.in_features)),
            (peft_key(t.module, "B"), t.adapter_dtype, (t.out_features, t.rank)),
        ]
    return entries + [(_head_key(i), i.dtype, i.shape) for i in plan.heads]


def _head_key(info: TensorInfo) -> str:
    return f"{PEFT_PREFIX}{info.name}"


def _prepare(plan: Plan, tmp: Path, bar, redo: set[str] | None) -> None:
    """Create the output files at their final size (``redo``; None: every file), and copy the
    tensors that are not targets into every shard.

    Copies go file-to-file (copy_file_range), in runs of consecutive tensors. On a resume
    (``redo`` not None) the staged shards keep their finished targets, but their copies are
    written again from the source: they may have been changed since, as may the source's bytes
    without its size or modification time.
    """
    targets = {t.name for t in plan.targets}
    if redo:
        resume.forget(tmp, {t.name for s in redo for t in plan.ckpt.files[s].tensors.values()})
    if redo is None:
        (tmp / ADAPTER_DIR).mkdir()
    heads = plan.heads  # copied on a resume too, as the other untouched tensors
    with StreamingWriter(
        tmp / ADAPTER_DIR / ADAPTER_FILE,
        _adapter_entries(plan),
        ADAPTER_META,
        create=redo is None,
        owned=[_head_key(i) for i in heads],
    ) as w:
        for info in heads:
            w.write(_head_key(info), read_tensor(info))
    for shard in plan.ckpt.shards:
        dest = tmp / shard
        create = redo is None or shard in redo
        if create and redo is not None:
            dest.unlink(missing_ok=True)  # a damaged file, or a link: never written through
        dest.parent.mkdir(parents=True, exist_ok=True)
        sf = plan.ckpt.files[shard]
        copied = [i for i in sf.tensors.values() if i.name not in targets]
        with StreamingWriter(
            dest,
            _shard_entries(plan, shard),
            _shard_meta(plan, shard),
            create=create,
            owned=[i.name for i in copied],
        ) as w:
            run: list[TensorInfo] = []  # consecutive untouched tensors, copied in one go
            for info in sf.tensors.values():
                if info.name in targets:
                    w.copy(run)
                    run = []
                else:
                    run.append(info)
            w.copy(run)
        bar.update(sum(i.nbytes for i in copied))
    if redo is None:
        resume.mark_prepared(tmp)


def _decompose_share(
    plan: Plan, tmp: Path, batches: list[list[Target]], bar, rows, rank: int
) -> None:
    """Decompose ``batches`` (file order) and write each result at its place in OUT.

    On a CPU the weights are never copied out of the page cache: ``_load`` maps them and the
    conversion to fp32 reads the mapping. With ``plan.overlap``, one background thread loads
    the next batch (on a CPU: maps it and asks the kernel to prefetch it; on a GPU: reads it
    into pinned memory) and another writes the previous batch's results while the current one
    computes; ``pread``/``pwrite`` release the GIL, and at most three batches are in flight,
    so memory stays bounded. On CPU the residuals are written with O_DIRECT
    (``plan.direct_io``): the BLAS threads own every core, and page-cache copies would take
    their time from the GEMMs (bench/RESULTS.md). Without the overlap, every step runs in
    turn. A batch enters the resume journal only once its bytes are written.
    """
    shard_of = {i.name: s for s in plan.ckpt.shards for i in plan.ckpt.files[s].tensors.values()}
    mine = [t for b in batches for t in b]
    writers: dict[str, StreamingWriter] = {}
    aw = StreamingWriter(
        tmp / ADAPTER_DIR / ADAPTER_FILE,
        _adapter_entries(plan),
        ADAPTER_META,
        create=False,
        owned=[peft_key(t.module, w) for t in mine for w in "AB"],
    )
    journal = resume.Journal(tmp, rank)
    scratch = _Scratch(pin=plan.overlap and plan.device_kind == "cuda")

    def compute(batch: list[Target], host: list[torch.Tensor] | None, slot: int):
        """Decompose, rounding the residuals straight into output buffer ``slot``."""
        try:
            offsets = [writers[shard_of[t.name]].offset(t.name) for t in batch]
            out = _staging(scratch, f"out{slot}", batch, offsets)
            results = _decompose_batch(plan, batch, scratch, out, host)
            return [(t, *r, out[i]) for i, (t, r) in enumerate(zip(batch, results, strict=True))]
        except Exception as exc:
            # For the message every rank prints.
            more = f" (batch of {len(batch)})" if len(batch) > 1 else ""
            exc.pissa_tensor = f"{batch[0].name}{more}"
            raise

    def write(done: list) -> None:
        for t, row, A, B, W_res in done:
            aw.write(peft_key(t.module, "A"), A)
            aw.write(peft_key(t.module, "B"), B)
            writers[shard_of[t.name]].write(t.name, W_res)
            rows.append(row)
            bar.update(t.info.nbytes)
        for _, row, *_ in done:  # its bytes are in place: a resume may reuse it
            journal.record(row)
        bar.set_postfix_str(f"tensors {len(rows)}/{len(mine)}")

    try:
        for shard in dict.fromkeys(shard_of[t.name] for t in mine):
            names = [t.name for t in mine if shard_of[t.name] == shard]
            writers[shard] = StreamingWriter(
                tmp / shard,
                _shard_entries(plan, shard),
                _shard_meta(plan, shard),
                create=False,
                owned=names,
                direct=plan.direct_io,
            )
        if plan.overlap:
            _overlapped(
                batches, lambda i: _load(plan, batches[i], scratch, f"read{i % 2}"), compute, write
            )
        else:
            for batch in batches:
                write(compute(batch, None, 0))
        for w in [aw, *writers.values()]:
            w.close()
    except BaseException:
        for w in [aw, *writers.values()]:
            w.abort()
        raise
    finally:
        journal.close()


def _overlapped(batches: list[list[Target]], load, compute, write) -> None:
    """Load batch i+1 and write batch i-1 on background threads while batch i computes.

    ``load(i)`` returns batch i's tensors as stored, on the CPU (a GPU run reads them into
    scratch buffer ``read{i % 2}``, free again by then: batch i-2 was consumed by its compute).
    ``compute(batch, host, slot)`` rounds its residuals into output buffer ``slot`` = i % 2,
    also free by then (batch i-2's write finished before batch i-1's write was queued).
    """
    if not batches:
        return
    with (
        ThreadPoolExecutor(1, thread_name_prefix="pissa-read") as reader,
        ThreadPoolExecutor(1, thread_name_prefix="pissa-write") as writer,
    ):
        pending_read = reader.submit(load, 0)
        pending_write = None
        try:
            for i, batch in enumerate(batches):
                host = pending_read.result()
                if i + 1 < len(batches):
                    pending_read = reader.submit(load, i + 1)
                done = compute(batch, host, i % 2)
                if pending_write is not None:
                    pending_write.result()
                pending_write = writer.submit(write, done)
            pending_write.result()
        except BaseException:
            # The batch being read is dropped. The one queued for writing finished computing:
            # leaving the block waits for its write (and journal entry), so it is kept.
            pending_read.cancel()
            raise


def _load(plan: Plan, batch: list[Target], scratch: _Scratch, key: str) -> list[torch.Tensor]:
    """Batch members as stored, on the CPU: views of the page cache on a CPU run
    (``map_tensor``, no copy); on a GPU run, read into one (pinned) scratch buffer ``key``,
    whence they are copied to the device asynchronously."""
    out, pos = [], 0
    buf = None if plan.device_kind == "cpu" else scratch.get(key, sum(t.info.nbytes for t in batch))
    for t in batch:
        try:
            if buf is None:
                out.append(map_tensor(t.info))
            else:
                out.append(read_tensor(t.info, buf[pos : pos + t.info.nbytes]))
        except Exception as exc:
            exc.pissa_tensor = t.name  # for the message every rank prints
            raise
        pos += t.info.nbytes
    return out


def _decompose_batch(
    plan: Plan,
    batch: list[Target],
    scratch: _Scratch,
    out: list[torch.Tensor],
    host: list[torch.Tensor] | None = None,
):
    """Decompose same-shape targets in one batched call; round each residual into ``out``.

    ``host``: the members as already loaded (overlapped pipeline); None: load them here, one
    at a time (``_load``). ``out``: one output view per member (``_staging``). Returns
    one (report row, A, B) per member. One conversion to the working dtype serves the SVD, the
    norms and, in place, the residual.
    """
    o, t0 = plan.options, batch[0]
    start = time.perf_counter()
    work = "F64" if t0.info.dtype == "F64" else "F32"
    shape = (len(batch), *t0.info.shape)
    # QPiSSA quantizes whole matrices, flattened: rows padded for the GEMMs would cost it a
    # contiguous copy of each.
    Wf = scratch.matrices("work", work, shape, plan.device, padded=not o.quantize)
    sketch_dtype = SKETCH_DTYPES[o.sketch_dtype]
    # A bf16 sketch of bf16 weights reads the weights themselves (one matrix: as loaded, or
    # its one copy on the GPU; several: copied into one batch), not a copy rounded from Wf;
    # the widening then reads that copy (on a GPU: one transfer per weight, not two).
    low = sketch_dtype is not None and t0.info.dtype == "BF16" and not o.quantize
    Wl = scratch.matrices("sketch", "BF16", shape, plan.device) if low and len(batch) > 1 else None
    w_sq = []
    for i, t in enumerate(batch):
        x = host[i] if host is not None else _load(plan, [t], scratch, "read")[0]
        if low and Wl is None:
            Wl = x.to(plan.device)[None]
            x = Wl[0]
        elif low:
            x = Wl[i].copy_(x)
        w_sq.append(_widen_(Wf[i], x))
    w_norms = torch.stack(w_sq).sqrt().tolist()
    bad = [t for t, w in zip(batch, w_norms, strict=True) if not math.isfinite(w)]
    if bad:  # every one of this batch named (later batches are not read)
        what = (
            f"tensor {bad[0].name!r} in {bad[0].info.path.name} holds"
            if len(bad) == 1
            else f"{len(bad)} tensors hold ({', '.join(repr(t.name) for t in bad)})"
        )
        raise _not_resumable(
            f"{what} NaN or inf values; fix the checkpoint, or leave "
            f"{'it' if len(bad) == 1 else 'them'} out with --exclude"
        )
    seeds = [derive_seed(t.name, o.seed) for t in batch]
    svd_kwargs = dict(
        niter=o.niter,
        oversample=plan.oversample,
        method=t0.method,
        backend=plan.backend,
        sketch_dtype=sketch_dtype,
    )
    quant_info: list[dict | None] = [None] * len(batch)
    t_read = time.perf_counter()
    try:
        if o.quantize:
            A, B, S, quant_info, res_sq = _qpissa_batch(plan, batch, Wf, seeds, svd_kwargs, out)
        else:
            X = Wl if low else Wf
            U, S, Vh = svd_lowrank(X.mT if t0.transposed else X, t0.rank, seed=seeds, **svd_kwargs)
    except torch.linalg.LinAlgError as exc:  # e.g. a Gram matrix overflowing fp32
        w, t = max(zip(w_norms, batch, strict=True), key=lambda p: p[0])
        raise _not_resumable(
            f"the SVD of {t.name!r}{f' (in a batch of {len(batch)})' if len(batch) > 1 else ''}"
            f" failed ({str(exc).splitlines()[0]}); a norm of {w:.3g} may be beyond what an "
            "fp32 SVD handles: try --method exact, or leave it out with --exclude"
        ) from None
    t_svd = time.perf_counter()
    if not o.quantize:
        A, B = adapter_factors(
            U, S, Vh, scaling=plan.scaling, adapter_dtype=dtype_to_torch(t0.adapter_dtype)
        )
        # In place in the working buffer, rounded block by block into the output buffers.
        res_sq = subtract_adapter_(
            Wf, A, B, scaling=plan.scaling, fan_in_fan_out=t0.transposed, out=out
        )
    _sync(Wf)
    if problem := adapter_range_problem(A, B, S, plan.scaling):
        raise _alpha_error(plan, t0, problem)
    for t, dst, sq in zip(batch, out, res_sq, strict=True):
        if rounding_overflowed(dst, sq):
            raise _not_resumable(
                f"the residual of {t.name!r} does not fit in {t.residual_dtype} (its values "
                "overflow to inf); store it wider with --residual-dtype bf16 or fp32"
            )
    # The engine's work: svd_lowrank and the residual, with its rounding to the output dtype
    # and its norm, which run fused with it (or QPiSSA).
    t_engine = time.perf_counter()
    res_norms = res_sq.sqrt().tolist()
    energy = (S.double() ** 2).sum(-1).tolist()
    seconds = (time.perf_counter() - start) / len(batch)
    S = S.cpu()
    rows = []
    for i, t in enumerate(batch):
        row = {
            "name": t.name,
            "module": t.module,
            "shape": list(t.info.shape),
            "out_features": t.out_features,
            "in_features": t.in_features,
            "dtype": t.info.dtype,
            "rank": t.rank,
            "method": t.method,
            "niter": o.niter,
            "oversample": plan.oversample,
            "seed": seeds[i],
            "batch": len(batch),
            "singular_values": [round(float(x), 6) for x in S[i].tolist()],
            "energy_fraction": energy[i] / w_norms[i] ** 2 if w_norms[i] > 0 else 0.0,
            "weight_norm": w_norms[i],
            "residual_norm": res_norms[i],
            "svd_seconds": round((t_svd - t_read) / len(batch), 4),
            "compute_seconds": round((t_engine - t_read) / len(batch), 4),
            "seconds": round(seconds, 4),
        }
        if quant_info[i] is not None:
            row["quantization"] = quant_info[i]
        rows.append((row, A[i].cpu(), B[i].cpu()))
    return rows


def _widen_(dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """dst.copy_(src) (e.g. bf16 to fp32, or to the GPU) and the sum of squares of dst (fp64,
    0-d), block by block on a CPU so that the norm reads each block from cache."""
    return copy_rows_(dst, src, measure="dst")


def _staging(
    scratch: _Scratch, key: str, batch: list[Target], offsets: list[int]
) -> list[torch.Tensor]:
    """One output view per member of ``batch`` in scratch buffer ``key``, each aligned to its
    file offset for a direct write (:func:`~pissa_svd.checkpoint.direct_view`)."""
    t0 = batch[0]
    dtype = dtype_to_torch(t0.residual_dtype)
    nbytes = dtype_nbytes(t0.residual_dtype, t0.info.shape)
    buf = scratch.get(key, len(batch) * (nbytes + DIRECT_ALIGN + dtype.itemsize))
    views, pos = [], 0
    for offset in offsets:
        view, pos = direct_view(buf, pos, offset, dtype, t0.info.shape)
        views.append(view)
    return views


def _sync(x: torch.Tensor) -> None:
    """Wait for ``x``'s device, so that the timings above are of finished work."""
    if x.is_cuda:
        torch.cuda.synchronize(x.device)


def _not_resumable(message: str) -> InputError:
    """Bad input found in a batch whose fix changes the source or the options, which --resume
    would refuse anyway: the run's finished tensors are removed, not kept (``pissa_discard``)."""
    exc = InputError(message)
    exc.pissa_discard = True
    return exc


def _alpha_error(plan: Plan, t: Target, problem: str) -> InputError:
    return InputError(
        f"the adapter of {t.name!r} {problem} in {t.adapter_dtype} at --alpha "
        f"{plan.alpha:g} (scaling {plan.scaling:g}); use an alpha nearer --rank"
    )


def _qpissa_batch(plan: Plan, batch: list[Target], Wf: torch.Tensor, seeds, svd_kwargs, out):
    """QPiSSA, one matrix at a time (each alternates its own SVD and quantization), each
    quantization-ready residual (already in the output dtype) copied into ``out`` as soon as
    it is made, so one member's residual exists at a time besides the output buffers.

    Returns batched A, B, the adapter's singular values (S_i = s ||A_i|| ||B_i||), each
    matrix's quantization info, and the residuals' sums of squares (fp64, batched).
    """
    from .quant import qpissa_factors

    o, t0 = plan.options, batch[0]
    res_sq = []

    def member(i: int):
        try:
            f = qpissa_factors(
                Wf[i],
                t0.rank,
                scheme=o.quantize,
                iters=o.quant_iters,
                scaling=plan.scaling,
                fan_in_fan_out=t0.transposed,
                adapter_dtype=dtype_to_torch(t0.adapter_dtype),
                residual_dtype=dtype_to_torch(t0.residual_dtype),
                seed=seeds[i],
                **svd_kwargs,
            )
        except AdapterRangeError as exc:
            raise _alpha_error(plan, batch[i], exc.problem) from None
        except InputError as exc:  # its residual does not fit the residual dtype, ...
            raise _not_resumable(f"{batch[i].name!r}: {exc}") from None
        res_sq.append(copy_rows_(out[i], f.W_res, measure="src"))
        return f._replace(W_res=None)

    factors = [member(i) for i in range(len(batch))]
    A = torch.stack([f.A for f in factors])
    B = torch.stack([f.B for f in factors])
    S = plan.scaling * (
        torch.linalg.vector_norm(A.double(), dim=-1) * torch.linalg.vector_norm(B.double(), dim=-2)
    )
    info = [
        {
            k: f.info[k]
            for k in (
                "scheme",
                "norm",
                "errors",
                "refit_errors",
                "best_iter",
                "best_refit",
                "best_error",
                "stored_error",
                "qlora_error",
                "error_reduction",
            )
        }
        for f in factors
    ]
    return A, B, S, info, torch.stack(res_sq)


HUGE_PAGE = 2 << 20  # bytes, x86-64 and arm64 (4 KB base pages)
MMAP_THRESHOLD = 32 << 20  # glibc's largest dynamic mmap threshold on 64-bit


def huge_page_buffer(nbytes: int) -> torch.Tensor:
    """An uninitialized CPU uint8 buffer that the kernel may back with transparent huge pages.

    2 MB pages instead of 4 KB ones take 512x fewer TLB entries, which the GEMMs' passes over
    a 46 MB working copy (and, on a virtual machine, the nested page walks behind each miss)
    feel: decompose's SVDs ran a few % faster (bench/RESULTS.md: ``huge-pages``). Linux
    grants them to a mapping advised with MADV_HUGEPAGE where THP is "always" or "madvise";
    elsewhere, or under 2 MB, this is ``torch.empty``.
    """
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is None or nbytes < HUGE_PAGE:
        return torch.empty(nbytes, dtype=torch.uint8)
    region = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    with contextlib.suppress(OSError):  # a kernel without THP: small pages
        region.madvise(advice)
    return torch.frombuffer(region, dtype=torch.uint8)  # keeps the mapping alive


class _Scratch:
    """Flat CPU buffers reused from tensor to tensor, in transparent huge pages where the
    kernel grants them (:func:`huge_page_buffer`).

    A fresh 50 MB tensor costs ~12k page faults (each zeroing a page) on every use, which took
    longer than the copy itself; reusing a few buffers sized for the largest target avoids that.
    ``pin``: page-locked buffers, for fast asynchronous copies to and from a GPU.
    """

    def __init__(self, pin: bool = False):
        self._bufs: dict[str, torch.Tensor] = {}
        self._pin = pin

    def get(self, key: str, nbytes: int) -> torch.Tensor:
        buf = self._bufs.get(key)
        if buf is None or buf.numel() < nbytes:
            self._bufs.pop(key, None)  # free the old one first
            if self._pin:
                buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
            else:
                buf = huge_page_buffer(nbytes)
            self._bufs[key] = buf
        return buf[:nbytes]

    def matrices(
        self, key: str, st_dtype: str, shape: tuple[int, ...], device: str = "cpu", padded=True
    ):
        """An uninitialized ``st_dtype`` batch of matrices ``shape``: on the CPU carved from
        buffer ``key``, rows padded for the GEMMs (``padded_empty``) unless ``padded`` is
        False; on an accelerator a fresh allocation (whose caching allocator already reuses
        memory)."""
        dtype = dtype_to_torch(st_dtype)
        if device != "cpu":
            return torch.empty(shape, dtype=dtype, device=device)
        if not padded:
            nbytes = math.prod(shape) * dtype.itemsize
            return self.get(key, nbytes).view(dtype).view(shape)
        return padded_empty(shape, dtype, buffer=self.get(key, padded_nbytes(shape, dtype)))


def _adapter_config(plan: Plan) -> dict:
    return {
        "peft_type": "LORA",
        "task_type": plan.task_type,
        # The adapter belongs on the residual model, never on the original weights.
        "base_model_name_or_path": str(plan.out.resolve()),
        "r": plan.options.rank,
        "lora_alpha": plain_number(plan.alpha),
        "target_modules": sorted(t.module for t in plan.targets),
        # True, not "pissa": PEFT would otherwise run the SVD again, on the residual.
        "init_lora_weights": True,
        "lora_dropout": 0.0,
        "fan_in_fan_out": plan.fan_in_fan_out,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "rank_pattern": {},
        "alpha_pattern": {},
        # PEFT's task models wrap their heads whatever this says; the adapter holds them.
        "modules_to_save": task_heads(plan.task_type, ())[0] if plan.heads else None,
        "inference_mode": True,
    }


def _retag_config(plan: Plan, tmp: Path) -> None:
    """With a --residual-dtype wider than the model's, config.json's dtype names it:
    transformers loads a model in that dtype by default (``dtype="auto"``), which would round
    an fp32 residual of a bf16 model back to bf16. (A narrower one leaves the config alone:
    loading then widens the residual exactly, and the untouched tensors keep their dtype.)"""
    path = tmp / "config.json"
    if plan.options.residual_dtype is None or not path.is_file():
        return
    config = read_json(path)
    new = dtype_to_torch(plan.targets[0].residual_dtype)
    keys = [k for k in ("dtype", "torch_dtype") if isinstance(config.get(k), str)]
    old = [getattr(torch, config[k], None) for k in keys]
    if keys and all(isinstance(d, torch.dtype) and d.itemsize < new.itemsize for d in old):
        name = str(new).removeprefix("torch.")
        write_json(path, {**config, **dict.fromkeys(keys, name)})


def _write_index(plan: Plan, tmp: Path) -> None:
    ck = plan.ckpt
    if ck.index is None:
        return
    index = dict(ck.index)
    index["metadata"] = {**(index.get("metadata") or {}), "total_size": plan.residual_bytes}
    write_json(tmp / INDEX_NAME, index)


def _dtype_option(flag: str, value: str | None) -> str | None:
    if value is None:
        return None
    key = value.lower()
    if key not in DTYPE_ALIASES:
        raise InputError(f"{flag} must be one of bf16, fp16, fp32, fp64, got {value!r}")
    return DTYPE_ALIASES[key]


def _device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return device
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InputError(
                f"--device {device} was asked for but no CUDA device is available; use --device cpu"
            )
        try:
            index = torch.device(device).index
        except RuntimeError:
            raise InputError(f"--device {device!r} is not a device; use cuda or cuda:N") from None
        if index is not None and index >= torch.cuda.device_count():
            raise InputError(
                f"--device {device}: this machine has {torch.cuda.device_count()} CUDA"
                f" device(s), cuda:0 .. cuda:{torch.cuda.device_count() - 1}"
            )
        return device
    raise InputError(f"--device must be auto, cpu or cuda, got {device!r}")


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _library_types(o: Options) -> Options:
    """Options as the command line makes them, from what a library caller may pass: a regex
    string for a list of them, torch dtypes and devices for their names. Other types that
    would fail deep inside are refused here, naming the option."""
    patterns = {}
    for key in ("targets", "exclude"):
        value = getattr(o, key)
        if isinstance(value, str):
            value = [value]  # one regex, not its letters
        if value is not None and not (
            isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
        ):
            raise InputError(f"{key} must be a regex string or a list of them, got {value!r}")
        patterns[key] = None if value is None else list(value)
    dtypes = {}
    for key in ("adapter_dtype", "residual_dtype"):
        value = getattr(o, key)
        if isinstance(value, torch.dtype):
            value = str(value).removeprefix("torch.")
        if value is not None and not isinstance(value, str):
            raise InputError(f"{key} must be a dtype name such as 'bf16', got {value!r}")
        dtypes[key] = value
    device = str(o.device) if isinstance(o.device, torch.device) else o.device
    sketch = o.sketch_dtype
    if isinstance(sketch, torch.dtype):
        sketch = {torch.float32: "fp32", torch.bfloat16: "bf16"}.get(sketch, str(sketch))
    for key in ("niter", "seed", "quant_iters"):
        if not _is_int(getattr(o, key)):
            raise InputError(f"{key} must be an integer, got {getattr(o, key)!r}")
    for key in ("oversample", "batch_memory", "processes"):
        if getattr(o, key) is not None and not _is_int(getattr(o, key)):
            raise InputError(
                f"{key} must be an integer (bytes for batch_memory), got {getattr(o, key)!r}"
            )
    if o.alpha is not None and (isinstance(o.alpha, bool) or not isinstance(o.alpha, (int, float))):
        raise InputError(f"alpha must be a number, got {o.alpha!r}")
    if o.quantize is None and o.quant_iters != Options.quant_iters:
        raise InputError("quant_iters is for quantize='nf4' or 'int8' (QPiSSA); pass quantize too")
    return dataclasses.replace(o, **patterns, **dtypes, device=device, sketch_dtype=sketch)


def _compile_patterns(patterns: list[str] | None, flag: str) -> list[str] | None:
    if patterns is None:
        return None
    for p in patterns:
        try:
            re.compile(p)
        except re.error as exc:
            raise InputError(f"{flag} pattern {p!r} is not a valid regex ({exc})") from None
    return list(patterns)


def _note_never_targets(ckpt: Checkpoint, patterns: list[str], exclude: list[str]) -> None:
    """Say which modules --targets matches that are never targets, rather than drop them
    silently: they are copied unchanged."""
    heads = sorted(
        {
            m
            for i in ckpt.tensors()
            if len(i.shape) == 2
            and (m := module_name(i.name)) is not None
            and never_target(m)
            and any(re.search(p, m) for p in patterns)
            and not any(re.search(p, m) for p in exclude or [])
        }
    )
    if heads:
        shown = ", ".join(heads[:3]) + (f" and {len(heads) - 3} more" if len(heads) > 3 else "")
        print(
            f"pissa-svd: note: --targets also matches {shown}: embeddings and output heads are "
            "never targets (PEFT adapts embeddings with other keys), so they are copied unchanged",
            file=sys.stderr,
        )


def _no_targets(ckpt: Checkpoint, src_path: Path, o: Options, patterns) -> None:
    """Say why no tensor is a target: the patterns match nothing, only embeddings and heads
    (never targets), or only what --exclude removes."""
    what = f"--targets {' '.join(o.targets)}" if o.targets else "the default target patterns"
    infos = list(ckpt.tensors())
    if o.exclude and any(select(i.name, i.shape, patterns) for i in infos):
        raise InputError(
            f"--exclude {' '.join(map(repr, o.exclude))} leaves out every tensor {what} match in "
            f"{src_path}; narrow --exclude"
        )
    modules = [m for i in infos if len(i.shape) == 2 and (m := module_name(i.name))]
    if o.targets and any(re.search(p, m) for p in o.targets for m in modules):
        raise InputError(
            f"{what} matched only embeddings or output heads in {src_path}, which are never "
            "targets (PEFT adapts embeddings with other keys); pass --targets REGEX matching "
            "attention or MLP layers"
        )
    sample = [n for i in infos if (n := i.name).endswith(".weight")][:3]
    raise InputError(
        f"{what} matched no 2-D weight in {src_path} (tensors look like: "
        f"{', '.join(sample) or 'none'}); pass --targets REGEX matching their module names"
    )


def _rss_bytes() -> int:
    """Peak resident set size of this process so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


__all__ = ["Options", "Plan", "Target", "decompose", "execute", "make_plan"]
