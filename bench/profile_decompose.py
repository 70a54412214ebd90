"""Where a CPU decompose spends its time, and the checks behind the engine's design notes.

    python bench/profile_decompose.py phases [--layers 22] [--prefetch windows]  # by phase
    python bench/profile_decompose.py paired-svd [--reps 10]  # power iteration variants, paired
    python bench/profile_decompose.py depth [--reps 8]        # krylov3 vs krylov2: time, error
    python bench/profile_decompose.py padded-svd [--reps 10]  # padded vs contiguous rows, paired
    python bench/profile_decompose.py row-blocks [--reps 10]  # tall X @ thin in row blocks or not
    python bench/profile_decompose.py writes [--reps 3]       # what writing the residuals costs
    python bench/profile_decompose.py fused-copies [--reps 3] # compiled widen/round vs torch
    python bench/profile_decompose.py huge-pages [--reps 6]   # THP scratch buffers or not
    python bench/profile_decompose.py one-as-2d [--reps 6]    # one matrix as 2-D or batch of 1
    python bench/profile_decompose.py sketch-bf16 [--reps 6]  # --sketch-dtype bf16 or fp32
    python bench/profile_decompose.py prefetch                # page cache after mapping a weight
    python bench/profile_decompose.py spectra                 # s_1 / s_64 of SmolLM2's weights

``phases`` wraps the pipeline's steps with timers and runs one overlapped decompose of the
decompose benchmark's checkpoint (``bench/_work/llama-bf16-L{layers}``, built as
bench/decompose_vs_peft.py builds it where it is missing); ``--prefetch`` swaps ``map_tensor``'s prefetch for another way
(``PREFETCH``) to compare them. ``paired-svd`` alternates the current power iteration
with the previous one (``_power_both_sides`` in bench/test_hotpaths.py) on one layer's shapes,
so both see the same machine state; ``padded-svd`` alternates the same SVDs on weights whose
rows are padded (``pissa_svd.linalg.padded_empty``, as decompose's working buffers) and
contiguous, then with a fresh padded copy made before each SVD. ``row-blocks`` times X times a
64-column block in one GEMM and in row blocks (``pissa_svd.linalg.row_blocks_matmul``, what
``thin_matmul`` does for a row-major X of many rows), for several shapes and for two
column-major X (which ``thin_matmul`` leaves whole),
checks that both give the same bits, then times one layer's SVDs (padded rows, as decompose
runs them) with and without the row blocks, alternated. ``writes`` runs
decompose in process (22 layers), alternating the overlapped pipeline writing with O_DIRECT
(the default on CPU), the overlapped pipeline writing through the page cache, and
``--overlap off``, and reports the machine's CPU time by kind (``/proc/stat``: user, system,
iowait, and steal, the time a virtual machine's host ran something else) for each run.
``depth`` alternates krylov3 and krylov2 (what ``auto`` picks for long and for
shorter short sides) on one layer's SVDs and on a 4096 x 11008 matrix, then compares their
excess error with PEFT's on bench/accuracy_vs_speed.py's LLM-shaped matrices (a real layer's
spectrum), for three sketch seeds. ``fused-copies`` times the compiled widen/round loops
(``pissa_svd.native.copy_rows``) against torch's copy and norm on one matrix of each of a
layer's shapes, checking that they write the same bits, then alternates whole in-process
decompose runs with and without them; ``huge-pages``, ``one-as-2d`` and ``sketch-bf16`` alternate whole runs
(ABBA) with and without transparent huge pages for the scratch buffers
(``pissa_svd.pipeline.huge_page_buffer``), with one matrix's SVD run as 2-D tensors or as
a batch of one, and with ``--sketch-dtype bf16`` or fp32. ``prefetch`` evicts a shard
from the page cache and measures (``mincore``) how much of one weight is in memory 1 s after
mapping it, for each way. ``spectra`` needs ``bench/_work/smollm2``
(bench/accuracy_vs_speed.py).
"""

from __future__ import annotations

import argparse
import functools
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from pissa_svd import checkpoint

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))


def _one_willneed(mm, window: int) -> None:
    """map_tensor's prefetch as it was: one MADV_WILLNEED for the whole range."""
    import mmap

    mm.madvise(mmap.MADV_WILLNEED)


def _populate(mm, window: int) -> None:
    """The pages faulted in before map_tensor returns (MADV_POPULATE_READ, Linux 5.14+)."""
    mm.madvise(22)  # mmap.MADV_POPULATE_READ from Python 3.13


def _per_128k(mm, window: int) -> None:
    """map_tensor's hints, but per 128 KB (the kernel's default window) whatever the device's."""
    _WINDOWS(mm, 128 << 10)


_WINDOWS = checkpoint._prefetch  # map_tensor's own, kept before any swap
PREFETCH = {
    "windows": None,  # map_tensor's: one hint per readahead window of the device
    "per-128k": _per_128k,
    "one-willneed": _one_willneed,
    "populate": _populate,
}


PHASES = ("_prepare", "_load", "_widen_", "svd_lowrank", "subtract_adapter_")
_spent: dict[str, float] = {}  # seconds per phase of the pipeline, while _time_phases is on
_options: dict = {}  # extra decompose options for _decompose (set by a use() of _alternate_runs)


def _time_phases() -> None:
    """Wrap the pipeline's steps (``PHASES``) with timers adding up into ``_spent``."""
    from pissa_svd import pipeline

    for name in PHASES:
        fn = getattr(pipeline, name)

        def timed(*a, _fn=fn, _name=name, **k):
            t = time.perf_counter()
            try:
                return _fn(*a, **k)
            finally:
                _spent[_name] = _spent.get(_name, 0.0) + time.perf_counter() - t

        setattr(pipeline, name, functools.wraps(fn)(timed))


def _decompose(layers: int, overlap: str = "on") -> tuple[float, dict, dict[str, float], dict]:
    """One in-process decompose of the benchmark checkpoint, written next to it: wall s, the
    report, seconds per phase (while ``_time_phases`` is on) and the machine's CPU seconds by
    kind during it (``/proc/stat``)."""
    from accuracy_vs_speed import cpu_seconds_by_kind
    from decompose_vs_peft import ensure_checkpoint

    from pissa_svd import pipeline

    src = ensure_checkpoint(BENCH / "_work", layers)
    _spent.clear()
    with tempfile.TemporaryDirectory(dir=BENCH / "_work") as tmp:
        before, start = cpu_seconds_by_kind(), time.perf_counter()
        report = pipeline.decompose(
            src, Path(tmp) / "out", rank=64, niter=4, quiet=True, overlap=overlap, **_options
        )
        wall, after = time.perf_counter() - start, cpu_seconds_by_kind()
        shutil.rmtree(Path(tmp) / "out")
    return wall, report, dict(_spent), {k: after[k] - before[k] for k in after}


def phases(layers: int, prefetch: str) -> None:
    if PREFETCH[prefetch] is not None:
        checkpoint._prefetch = PREFETCH[prefetch]
    _time_phases()
    wall, report, spent, _ = _decompose(layers)
    print(f"decompose llama-bf16-L{layers} (in process, imports excluded): {wall:.2f} s")
    for name, s in spent.items():
        print(f"  {name:<18} {s:6.2f} s")
    t = report["totals"]
    print(f"  report: seconds {t['seconds']}, compute_seconds {t['compute_seconds']}")


def fused_copies(layers: int, reps: int) -> None:
    """The compiled widen/round loops (``native.copy_rows``) against torch's copy + norm."""
    from pissa_svd import native
    from pissa_svd.linalg import padded_empty
    from pissa_svd.pissa import copy_rows_

    fused = native.copy_rows
    if fused(torch.empty(1, 1), torch.zeros(1, 1)) is None:
        sys.exit("the compiled module is not available here (pip install -e .)")

    def use(on: bool) -> None:
        native.copy_rows = fused if on else (lambda dst, src: None)

    med = statistics.median
    print("one matrix (bf16 -> padded fp32 with its norm; back to bf16 with the fp32 norm),")
    print("ms, median of 15 alternations, fused vs torch; norm error relative to fp64:")
    g = torch.Generator().manual_seed(0)
    for shape in ((5632, 2048), (2048, 5632), (2048, 2048), (256, 2048)):
        src = torch.randn(shape, generator=g).to(torch.bfloat16)
        wide = padded_empty(shape, torch.float32)
        out = torch.empty(shape, dtype=torch.bfloat16)
        exact = float(src.double().square().sum())
        cells = []
        for step in ("widen", "round"):
            times: dict[bool, list[float]] = {True: [], False: []}
            got: dict[bool, tuple] = {}
            for i in range(16):
                for on in (True, False):
                    use(on)
                    t = time.perf_counter()
                    if step == "widen":
                        sq = copy_rows_(wide, src, measure="dst")
                    else:
                        sq = copy_rows_(out, wide, measure="src")
                    if i:  # the first round is the warm-up
                        times[on].append(time.perf_counter() - t)
                    dst = wide if step == "widen" else out
                    got[on] = (dst.clone(), abs(float(sq) / exact - 1))
            if not torch.equal(got[True][0], got[False][0]):
                sys.exit(f"{step} {shape}: the fused loop wrote other bits than torch")
            cells.append(
                f"{step} {1e3 * med(times[True]):.2f} vs {1e3 * med(times[False]):.2f}"
                f" (norm err {got[True][1]:.0e} vs {got[False][1]:.0e})"
            )
        print(f"  {shape[0]}x{shape[1]}: " + "; ".join(cells) + "; same bits")
    use(True)

    _alternate_runs(layers, reps, use, ("fused", "torch"))


def _alternate_runs(layers: int, reps: int, use, names: tuple[str, str]) -> None:
    """Whole in-process decompose runs with a change on (``use(True)``) and off, alternated
    ABBA so that the order cancels out; wall, phase and compute seconds, and the median of
    the paired savings. Leaves the change on."""
    med = statistics.median
    _time_phases()
    print(f"decompose llama-bf16-L{layers} in process, {names[0]} vs {names[1]} alternated:")
    use(True)
    _decompose(layers)  # warm-up
    rows: dict[bool, list] = {True: [], False: []}
    for i in range(reps):
        for on in (True, False) if i % 2 == 0 else (False, True):
            use(on)
            rows[on].append(_decompose(layers))
    use(True)
    for on in (True, False):
        walls = [r[0] for r in rows[on]]
        part = {k: med([r[2][k] for r in rows[on]]) for k in PHASES[2:]}
        comp = med([r[1]["totals"]["compute_seconds"] for r in rows[on]])
        print(
            f"  {names[0] if on else names[1]}: wall {' '.join(f'{w:.2f}' for w in walls)} s"
            f" (median {med(walls):.2f}); widening {part['_widen_']:.2f} s, SVDs"
            f" {part['svd_lowrank']:.2f} s, residual {part['subtract_adapter_']:.2f} s,"
            f" compute_seconds {comp:.2f} (medians)"
        )
    diffs = [b[0] - a[0] for a, b in zip(rows[True], rows[False], strict=True)]
    share = 100 * med(diffs) / med(r[0] for r in rows[False])
    print(f"  median paired saving {med(diffs):.2f} s ({share:.1f}%)")


def huge_pages(layers: int, reps: int) -> None:
    """Scratch buffers advised for transparent huge pages (the default) vs plain ones."""
    from pissa_svd import pipeline

    advised = pipeline.huge_page_buffer
    print("THP:", Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip())

    def use(on: bool) -> None:
        pipeline.huge_page_buffer = (
            advised if on else (lambda nbytes: torch.empty(nbytes, dtype=torch.uint8))
        )

    _alternate_runs(layers, reps, use, ("huge pages", "small pages"))


def one_as_2d(layers: int, reps: int) -> None:
    """A batch of one matrix decomposed as 2-D tensors (the default) vs as a batch of one."""
    from pissa_svd import linalg

    flat = linalg._torch_svd

    def as_batch(X, *args):
        if X.ndim == 3:
            return flat(X, *args)
        return tuple(x[0] for x in flat(X[None], *args))

    def use(on: bool) -> None:
        linalg._torch_svd = flat if on else as_batch

    X = torch.randn(1, 300, 500)
    a = linalg.svd_lowrank(X, 20, seed=[1])
    use(False)
    b = linalg.svd_lowrank(X, 20, seed=[1])
    use(True)
    if not all(torch.equal(x, y) for x, y in zip(a, b, strict=True)):
        sys.exit("the 2-D path changed the SVD's bits")
    print("same bits either way")
    _alternate_runs(layers, reps, use, ("2-D", "batch of one"))


def sketch_bf16(layers: int, reps: int) -> None:
    """``--sketch-dtype bf16`` vs the default fp32 sketch, whole runs alternated ABBA."""

    def use(on: bool) -> None:
        _options["sketch_dtype"] = "bf16" if on else "fp32"

    _alternate_runs(layers, reps, use, ("bf16 sketch", "fp32 sketch"))
    _options.clear()


def _layer_mats() -> list[torch.Tensor]:
    """One layer's weights of the decompose benchmark's shapes (fp32, contiguous)."""
    import test_hotpaths as hot

    g = torch.Generator().manual_seed(3)
    return [torch.randn(m, n, generator=g) * 0.02 for m, n, c in hot.LAYER for _ in range(c)]


def _layer_svd(mats: list[torch.Tensor], method: str = "auto") -> float:
    from pissa_svd import linalg

    start = time.perf_counter()
    for W in mats:
        linalg.svd_lowrank(W, 64, niter=4, method=method)
    return time.perf_counter() - start


def _alternate(what: str, new, old, reps: int) -> None:
    """Time ``new()`` and ``old()`` alternately (after one warm-up each); print the medians
    and the median of the paired savings."""
    new(), old()
    t_new, t_old, diffs = [], [], []
    for _ in range(reps):
        a, b = new(), old()
        t_new.append(a)
        t_old.append(b)
        diffs.append(b - a)
    med = statistics.median
    print(
        f"{what}, {reps} alternations: {1e3 * med(t_new):.0f} ms vs {1e3 * med(t_old):.0f} ms,"
        f" median paired saving {1e3 * med(diffs):.0f} ms ({100 * med(diffs) / med(t_old):.1f}%)"
    )


def paired_svd(reps: int) -> None:
    import test_hotpaths as hot

    from pissa_svd import linalg

    mats = _layer_mats()
    now, before = linalg._block_krylov, hot._power_both_sides

    def with_krylov(fn):
        def run() -> float:
            linalg._block_krylov = fn
            try:
                return _layer_svd(mats)
            finally:
                linalg._block_krylov = now

        return run

    _alternate(
        "one layer's SVDs, short side only vs both sides orthonormalized",
        with_krylov(now),
        with_krylov(before),
        reps,
    )


def depth(reps: int) -> None:
    """krylov3 against krylov2: time (one layer of the 1.1B shapes; 4096 x 11008) and excess
    error relative to PEFT's on LLM-shaped matrices with a real layer's spectrum."""
    import accuracy_vs_speed as avs

    from pissa_svd import linalg

    layer = [linalg.padded_empty(W.shape, W.dtype).copy_(W) for W in _layer_mats()]
    big = [torch.randn(4096, 11008, generator=torch.Generator().manual_seed(5))]
    for what, mats in (("one layer's SVDs (2048-wide)", layer), ("4096 x 11008", big)):
        _alternate(
            f"{what}, krylov3 vs krylov2",
            lambda mats=mats: _layer_svd(mats, "krylov3"),
            lambda mats=mats: _layer_svd(mats, "krylov2"),
            reps,
        )
    del layer, big

    avs.ensure_smollm2()
    base = avs.real_spectrum()
    print("excess error / PEFT's (torch.svd_lowrank, q=64, niter=4), sketch seeds 0, 1, 2:")
    for i, (m, n) in enumerate(avs.LLM_SHAPES):
        s = avs.stretch(base, min(m, n))
        W = avs.synthetic(m, n, s, seed=1234 + i)
        ratios: dict[str, list[float]] = {"krylov2": [], "krylov3": []}
        for seed in range(3):
            torch.manual_seed(seed)
            U, S, V = torch.svd_lowrank(W, q=64, niter=4)
            peft = avs.score(W, (U, S, V.mT), s, 64)[0]
            for method, out in ratios.items():
                f = linalg.svd_lowrank(W, 64, niter=4, method=method, seed=seed)
                out.append(avs.score(W, f, s, 64)[0] / peft)
        print(
            f"  {m}x{n}: "
            + "; ".join(f"{k} {' '.join(f'{r:.3f}' for r in v)}" for k, v in ratios.items())
        )
        del W


def padded_svd(reps: int) -> None:
    from pissa_svd import linalg

    mats = _layer_mats()
    padded = [linalg.padded_empty(W.shape, W.dtype).copy_(W) for W in mats]
    _alternate(
        "one layer's SVDs, rows padded (padded_empty) vs contiguous",
        lambda: _layer_svd(padded),
        lambda: _layer_svd(mats),
        reps,
    )

    def copied() -> float:  # what svd_lowrank would do to pad fp32 input itself
        start = time.perf_counter()
        for W in mats:
            linalg.svd_lowrank(linalg.padded_empty(W.shape, W.dtype).copy_(W), 64, niter=4)
        return time.perf_counter() - start

    _alternate(
        "one layer's SVDs, fp32 copied into fresh padded rows first vs contiguous",
        copied,
        lambda: _layer_svd(mats),
        reps,
    )


def writes(layers: int, reps: int) -> None:
    import os

    from pissa_svd import pipeline

    direct = pipeline.Plan.direct_io
    ways = {  # name: (--overlap, O_DIRECT for the residuals)
        "overlapped, O_DIRECT (default)": ("on", direct),
        "overlapped, page cache": ("on", property(lambda self: False)),
        "--overlap off (page cache)": ("off", direct),
    }
    runs: dict[str, list[dict[str, float]]] = {w: [] for w in ways}
    for _ in range(reps):
        for way, (overlap, direct_io) in ways.items():
            pipeline.Plan.direct_io = direct_io
            try:
                os.sync()
                wall, report, _, cpu = _decompose(layers, overlap)
            finally:
                pipeline.Plan.direct_io = direct
            t = report["totals"]
            runs[way].append(
                {"wall": wall, "compute": t["compute_seconds"], "svd": t["svd_seconds"]}
                | {k: cpu[k] for k in ("user", "system", "iowait", "steal")}
            )
            print(f"{way}: " + ", ".join(f"{k} {v:.2f}" for k, v in runs[way][-1].items()))
    print(
        f"decompose llama-bf16-L{layers} in process, medians of {reps} (seconds; CPU time"
        " summed over cores):"
    )
    for way, rs in runs.items():
        print(
            f"  {way}: "
            + ", ".join(f"{k} {statistics.median(r[k] for r in rs):.2f}" for k in rs[0])
        )


ROW_BLOCK_SHAPES = [(2048, 2048), (3072, 3072), (5632, 2048), (11008, 4096), (14336, 4096)]
BIG_SHAPES = [(28672, 8192), (8192, 28672)]  # 70B's MLP (0.94 GB each in fp32)
COLUMN_MAJOR_SHAPES = [(5632, 2048), (14336, 4096)]  # what thin_matmul leaves as one call


def row_blocks(reps: int, big: bool) -> None:
    from pissa_svd import linalg

    cases = [(m, n, "padded rows") for m, n in ROW_BLOCK_SHAPES + (BIG_SHAPES if big else [])]
    cases += [(m, n, "column-major") for m, n in COLUMN_MAJOR_SHAPES]
    for m, n, layout in cases:
        if layout == "column-major":
            X = linalg.padded_empty((n, m), torch.float32).normal_().T
        else:
            X = linalg.padded_empty((m, n), torch.float32).normal_()
        B = torch.randn(n, 64)
        one, blocked = [], []
        for _ in range(reps):
            for f, into in ((torch.matmul, one), (linalg.row_blocks_matmul, blocked)):
                t = time.perf_counter()
                f(X, B)
                into.append(time.perf_counter() - t)
        gf = 2 * m * n * 64 / 1e9
        same = torch.equal(X @ B, linalg.row_blocks_matmul(X, B))
        print(
            f"({m} x {n}, {layout}) @ ({n} x 64), {reps} alternations: one GEMM"
            f" {gf / statistics.median(one):.0f} GF/s, row blocks"
            f" {gf / statistics.median(blocked):.0f} GF/s; bitwise equal: {same}"
        )
    mats = [linalg.padded_empty(W.shape, W.dtype).copy_(W) for W in _layer_mats()]
    mine = linalg.thin_matmul

    def plain() -> float:
        linalg.thin_matmul = torch.matmul
        try:
            return _layer_svd(mats)
        finally:
            linalg.thin_matmul = mine

    _alternate(
        "one layer's SVDs (padded rows), tall products in row blocks vs one GEMM each",
        lambda: _layer_svd(mats),
        plain,
        reps,
    )


def _resident(x: torch.Tensor) -> float:
    """Fraction of the pages under tensor ``x`` that are in memory (``mincore``, Linux)."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    page = mmap.PAGESIZE
    lo = x.data_ptr() - x.data_ptr() % page
    n = -(-(x.data_ptr() + x.numel() * x.element_size() - lo) // page)
    vec = (ctypes.c_ubyte * n)()
    if libc.mincore(ctypes.c_void_p(lo), ctypes.c_size_t(n * page), vec) != 0:
        raise OSError(ctypes.get_errno(), "mincore failed")
    return sum(v & 1 for v in vec) / n


def prefetch() -> None:
    """How much of a weight is in memory 1 s after mapping it, the file evicted from the page
    cache first, for each way of prefetching (``PREFETCH``; "windows" is ``map_tensor``'s)."""
    import os

    from decompose_vs_peft import ensure_checkpoint

    ck = checkpoint.Checkpoint.open(ensure_checkpoint(BENCH / "_work", 22))
    info = next(i for f in ck.files.values() for i in f.tensors.values() if "up_proj" in i.name)
    mine = checkpoint._prefetch
    for name, fn in PREFETCH.items():
        fd = os.open(info.path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        checkpoint._prefetch = fn or mine
        try:
            t = time.perf_counter()
            x = checkpoint.map_tensor(info)
            spent = time.perf_counter() - t
        finally:
            checkpoint._prefetch = mine
        time.sleep(1.0)
        print(
            f"{info.name} ({info.nbytes / 2**20:.0f} MiB), evicted: {name}: "
            f"{100 * _resident(x):.0f}% in memory 1 s after mapping (the call took {spent:.3f} s)"
        )
        del x


def spectra() -> None:
    from safetensors.torch import load_file

    ratios = []
    for f in sorted((BENCH / "_work" / "smollm2").glob("*.safetensors")):
        for name, w in load_file(f).items():
            if w.ndim == 2 and name.endswith("proj.weight"):
                s = torch.linalg.svdvals(w.float())
                ratios.append(float(s[0] / s[63]))
    r = sorted(ratios)
    print(
        f"SmolLM2 {len(r)} weights: s_1/s_64 median {statistics.median(r):.2f}, max {r[-1]:.2f};"
        f" squared: median {statistics.median(r) ** 2:.1f}, max {r[-1] ** 2:.1f}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="what", required=True)
    ph = sub.add_parser("phases")
    ph.add_argument("--layers", type=int, default=22)
    ph.add_argument("--prefetch", choices=tuple(PREFETCH), default="windows")
    sub.add_parser("paired-svd").add_argument("--reps", type=int, default=10)
    sub.add_parser("depth").add_argument("--reps", type=int, default=8)
    sub.add_parser("padded-svd").add_argument("--reps", type=int, default=10)
    rb = sub.add_parser("row-blocks")
    rb.add_argument("--reps", type=int, default=10)
    rb.add_argument("--big", action="store_true", help="also 70B's MLP shapes (2 GB of RAM)")
    # The commands that alternate whole decompose runs: name -> (function, default --reps).
    whole_runs = {
        "writes": (writes, 3),
        "fused-copies": (fused_copies, 3),
        "huge-pages": (huge_pages, 6),
        "one-as-2d": (one_as_2d, 6),
        "sketch-bf16": (sketch_bf16, 6),
    }
    for name, (_, reps) in whole_runs.items():
        wr = sub.add_parser(name)
        wr.add_argument("--layers", type=int, default=22)
        wr.add_argument("--reps", type=int, default=reps)
    sub.add_parser("prefetch")
    sub.add_parser("spectra")
    args = ap.parse_args()
    torch.set_num_threads(2)
    if args.what == "phases":
        phases(args.layers, args.prefetch)
    elif args.what == "paired-svd":
        paired_svd(args.reps)
    elif args.what == "depth":
        depth(args.reps)
    elif args.what == "padded-svd":
        padded_svd(args.reps)
    elif args.what == "row-blocks":
        row_blocks(args.reps, args.big)
    elif args.what in whole_runs:
        whole_runs[args.what][0](args.layers, args.reps)
    elif args.what == "prefetch":
        prefetch()
    else:
        spectra()


if __name__ == "__main__":
    main()
