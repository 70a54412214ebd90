"""Command line: parse, validate, call one function. No math here."""

from __future__ import annotations

import argparse
import errno
import os
import signal
import sys
import threading

from . import __version__
from .errors import InputError, RankFailure, os_error_message

EXIT_BAD_INPUT = 2


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors in one line (exit 2), like every other bad input."""

    def error(self, message: str):  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        raise SystemExit(EXIT_BAD_INPUT)


def build_parser() -> argparse.ArgumentParser:
    from . import linalg  # torch: loaded here, where an interrupt is one line (run)

    p = _Parser(prog="pissa-svd", description="Fast streaming SVD initialization for PiSSA.")
    p.add_argument("--version", action="version", version=f"pissa-svd {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    d = sub.add_parser(
        "decompose",
        help="split a safetensors checkpoint into a residual model and a PiSSA adapter",
        description=(
            "Stream a Hugging Face safetensors checkpoint one tensor at a time and write "
            "OUT/ (the residual model, W_res = W - B@A) plus OUT/pissa_init/ (a PEFT LoRA "
            "adapter holding the top-r singular triplets)."
        ),
    )
    d.add_argument(
        "src",
        help="checkpoint folder (model.safetensors or an index + shards) or a .safetensors file",
    )
    d.add_argument("--out", required=True, help="output folder (must not exist unless --overwrite)")
    d.add_argument("--rank", type=int, required=True, help="adapter rank r")
    d.add_argument(
        "--niter", type=int, default=4, help="power iterations, as PEFT's pissa_niter_N (default 4)"
    )
    d.add_argument(
        "--oversample",
        type=int,
        default=None,
        help="extra sketch columns (default 0 for auto, krylov2 and krylov3, else 16)",
    )
    d.add_argument(
        "--method",
        choices=linalg.METHODS,
        default="auto",
        help="SVD method (default auto: exact for small matrices, krylov3 where the short side is "
        "at least 64 block widths, else krylov2); gesvdr = "
        "cuSOLVER's randomized SVD (native CUDA backend)",
    )
    d.add_argument(
        "--backend",
        choices=("auto", "native", "torch"),
        default="auto",
        help="SVD engine: native (compiled, csrc/), torch, or auto = the faster one measured "
        "for the device (default)",
    )
    d.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    d.add_argument(
        "--targets",
        nargs="+",
        metavar="PATTERN",
        help="regexes searched in module names (tensor name without .weight); default: every "
        "attention and MLP projection of known architectures",
    )
    d.add_argument(
        "--exclude",
        nargs="+",
        metavar="PATTERN",
        help="regexes searched in module names: modules they find are not targets, e.g. "
        r"--exclude '\.experts\.' keeps the experts of a mixture-of-experts model whole",
    )
    d.add_argument(
        "--no-load-check",
        dest="load_check",
        action="store_false",
        help="decompose the targets even when the installed transformers and PEFT would not "
        "attach their adapters (checked for mixture-of-experts models and --targets; for "
        "another trainer)",
    )
    d.add_argument(
        "--alpha", type=float, default=None, help="lora_alpha (default: rank, so scaling 1)"
    )
    d.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default auto)")
    d.add_argument(
        "--adapter-dtype", default=None, help="bf16, fp16, fp32 or fp64 (default: input dtype)"
    )
    d.add_argument(
        "--residual-dtype", default=None, help="bf16, fp16, fp32 or fp64 (default: input dtype)"
    )
    d.add_argument(
        "--batch-memory",
        type=_size,
        default=None,
        metavar="SIZE",
        help="same-shape matrices are decomposed together up to SIZE of fp32 matrices per call, "
        "e.g. 512M or 8G; 0 = one at a time (default: 64M on CPU, min(1G, 1/8 of GPU memory))",
    )
    d.add_argument(
        "--processes",
        type=int,
        default=None,
        metavar="K",
        help="with --dry-run: plan for K torchrun processes (default: WORLD_SIZE, or 1)",
    )
    d.add_argument(
        "--quantize",
        choices=("nf4", "int8"),
        default=None,
        help="QPiSSA: make the residual ready for 4-bit NF4 (QLoRA) or LLM.int8 loading, "
        "alternating SVD and quantization to minimize the quantization error",
    )
    d.add_argument(
        "--quant-iters",
        type=int,
        default=None,
        metavar="T",
        help="with --quantize: SVD + quantization rounds; the best residual/adapter pair is "
        "kept, the adapter possibly refitted to the quantized residual (default 5)",
    )
    d.add_argument(
        "--overlap",
        choices=("on", "off"),
        default="on",
        help="read the next batch and write the previous one on background threads while one "
        "computes; on CPU the residuals go to the disk with O_DIRECT, so writing takes little "
        "CPU from the compute (default on; off saves one read and one output buffer)",
    )
    d.add_argument(
        "--sketch-dtype",
        choices=("fp32", "bf16"),
        default="fp32",
        help="dtype of the SVD's passes over each weight (the power iteration's GEMMs): fp32 "
        "(default; fp64 for fp64 weights) or bf16, which reads bf16 weights as they are, "
        "accumulates in fp32 and keeps the rest of the SVD in fp32: as accurate on LLM "
        "weights and much faster where the hardware multiplies bf16 natively (GPUs, CPUs "
        "with AMX); torch backend",
    )
    d.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run: reuse (after checking them) the tensors it finished",
    )
    d.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    d.add_argument(
        "--dry-run",
        action="store_true",
        help="print the plan (targets, FLOPs, memory) and write nothing",
    )
    d.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    sub.add_parser(
        "env",
        help="what was built and can run here: versions, devices, backends (and why not)",
    )

    t = sub.add_parser(
        "to-lora",
        help="convert a fine-tuned PiSSA adapter into a rank-2r LoRA for the original model",
        description=(
            "dW = B'A' - BA (trained minus init) is written as a LoRA adapter of rank 2r, "
            "[B' | -B] @ [A' ; A], that loads with PEFT on the ORIGINAL checkpoint."
        ),
    )
    t.add_argument("--init", required=True, help="the pissa_init adapter written by decompose")
    t.add_argument("--trained", required=True, help="the adapter saved after training")
    t.add_argument("--out", required=True, help="the new adapter folder")
    t.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    t.add_argument("--quiet", action="store_true", help="no summary (warnings still show)")

    mg = sub.add_parser(
        "merge",
        help="write a full checkpoint with an adapter merged in (W + s B@A), shard by shard",
    )
    mg.add_argument(
        "base", help="checkpoint to merge into (for PiSSA: the decompose output, the residual)"
    )
    mg.add_argument("--adapter", required=True, help="PEFT LoRA adapter folder")
    mg.add_argument(
        "--out", required=True, help="output folder (must not exist unless --overwrite)"
    )
    mg.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    mg.add_argument("--quiet", action="store_true", help="no progress bar or summary")

    v = sub.add_parser(
        "verify",
        help="check that a decompose output reproduces its source (exit 0 pass, 1 mismatch)",
        description=(
            "Streams SRC and OUT tensor by tensor: every adapted weight must satisfy "
            "W_res + s B@A == W within the rounding of the stored residual, every other tensor "
            "must be byte-identical."
        ),
    )
    v.add_argument("src", help="the checkpoint that was decomposed")
    v.add_argument("out", help="the decompose output folder")
    v.add_argument("--adapter", default=None, help="adapter folder (default OUT/pissa_init)")
    v.add_argument("--verbose", action="store_true", help="print a per-tensor table")
    v.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _env() -> int:
    import platform

    import torch

    from . import native
    from .linalg import AUTO_BACKEND

    lines = [
        f"pissa-svd {__version__}",
        f"python     {platform.python_version()} ({sys.executable})",
        f"torch      {torch.__version__} (CUDA {torch.version.cuda or 'none'})",
    ]
    try:
        import scipy

        lines.append(f"scipy      {scipy.__version__} (BLAS/LAPACK of the native CPU backend)")
    except ImportError:
        lines.append("scipy      not installed (the native CPU backend needs it)")
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += [
            f"cuda:{i} {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count())
        ]
    else:
        devices.append("(no CUDA device visible to torch)")
    lines.append("devices    " + ", ".join(devices))
    built = native.build_info()
    lines.append("build")
    for kind in ("cpu", "cuda"):
        lines.append(
            f"  {kind:<5}    {built.get(kind) or 'unknown (no _build_info.json: not built here)'}"
        )
    lines.append("backends")
    for kind in ("cpu", "cuda"):
        ok, what = native.available(kind)
        lines.append(f"  native {kind:<5} {'ok: ' if ok else 'unavailable: '}{what}")
        if ok and kind == "cuda":
            lines += [f"    {x}" for x in native.module("cuda").info().splitlines()]
    lines.append("  torch        ok (every device)")
    lines.append("  auto picks   " + ", ".join(f"{d}: {b}" for d, b in AUTO_BACKEND.items()))
    lines.append("bf16 sketch (--sketch-dtype bf16)")
    lines.append(f"  cpu          {native.bf16_support()}")
    if torch.cuda.is_available():
        lines.append("  cuda         bf16 GEMMs with fp32 output (torch out_dtype)")
    _print_product("\n".join(lines))
    return 0


def _size(text: str) -> int:
    """'512M' / '8G' / '1.5GiB' / '1000000' -> bytes (K, M, G, T are powers of 1024)."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    scale = 1024 ** ("KMGT".index(t[-1]) + 1) if t and t[-1] in "KMGT" else 1
    try:
        value = float(t[:-1] if scale > 1 else t) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 512M or 8G)") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a size >= 0, got {text!r}")
    return int(value)


def options_from_args(args: argparse.Namespace):
    """The decompose command line's :class:`~pissa_svd.pipeline.Options`."""
    from .pipeline import Options

    return Options(
        rank=args.rank,
        niter=args.niter,
        oversample=args.oversample,
        method=args.method,
        backend=args.backend,
        seed=args.seed,
        targets=args.targets,
        exclude=args.exclude,
        load_check=args.load_check,
        alpha=args.alpha,
        device=args.device,
        adapter_dtype=args.adapter_dtype,
        residual_dtype=args.residual_dtype,
        batch_memory=args.batch_memory,
        processes=args.processes,
        resume=args.resume,
        quantize=args.quantize,
        quant_iters=5 if args.quant_iters is None else args.quant_iters,
        overlap=args.overlap,
        sketch_dtype=args.sketch_dtype,
        overwrite=args.overwrite,
        quiet=args.quiet,
    )


def _decompose(args: argparse.Namespace) -> int:
    from . import resume
    from .pipeline import execute, make_plan

    # Options that would otherwise be ignored without a word.
    if args.processes is not None and not args.dry_run:
        raise InputError(
            "--processes only sizes a --dry-run plan; to run on K processes, launch with "
            "torchrun --nproc-per-node K -m pissa_svd decompose ..."
        )
    if args.quant_iters is not None and not args.quantize:
        raise InputError("--quant-iters sets QPiSSA's rounds: add --quantize nf4 or int8")

    plan = make_plan(args.src, args.out, options_from_args(args))
    if args.dry_run:
        note = resume.dry_run_note(plan)
        _print_product(plan.describe() + (f"\n{note}" if note else ""))
        return 0
    report = execute(plan)
    if not args.quiet and os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 speaks
        t = report["totals"]
        reused = t.get("resumed", 0)
        what, svd = f"{t['matrices']} matrices decomposed", f"SVD {t['svd_seconds']:.1f} s"
        if reused:  # the report's SVD seconds include the interrupted run's
            what = (
                f"{t['matrices']} matrices ({t['matrices'] - reused} decomposed now, {reused} "
                "reused from the interrupted run)"
            )
            svd += " over both runs"
        print(
            f"pissa-svd: {what} in {t['seconds']:.1f} s ({svd}), mean captured energy "
            f"{100 * t['mean_energy_fraction']:.1f}%, peak RSS {t['peak_rss_bytes'] / 1e9:.2f} GB\n"
            f"  residual model: {plan.out}\n"
            f"  adapter:        {plan.out / 'pissa_init'}  (r={plan.options.rank}, "
            f"lora_alpha={report['lora_alpha']:g})\n"
            f"  report:         {plan.out / 'pissa_report.json'}"
        )
    return 0


def _to_lora(args: argparse.Namespace) -> int:
    from .convert import to_lora

    r = to_lora(args.init, args.trained, args.out, overwrite=args.overwrite)
    if not args.quiet:
        how = (
            "lora_alpha x sqrt(2), as use_rslora scales by alpha/sqrt(r)"
            if r["use_rslora"]
            else ("lora_alpha x 2")
        )
        print(
            f"pissa-svd: wrote a LoRA adapter for {r['modules']} modules"
            f"{f' ({n} of them on fused experts)' if (n := r['fused']) else ''} to {r['out']}\n"
            f"  r doubled {r['r']} -> {r['r_out']} and lora_alpha {r['lora_alpha']} -> "
            f"{r['lora_alpha_out']} ({how}): the update B'A' - BA is the difference of two rank-r\n"
            "  products, so it needs rank 2r; the scaling, and so the model, are unchanged.\n"
            f"  Load it on the ORIGINAL model ({r['base_model'] or 'the checkpoint you decomposed'}),"
            " not on the residual.\n"
            f"  Change from init: median {r['median_change']:.3f}, max {r['max_change']:.3f} "
            "(||B'A' - BA|| / ||BA||)"
        )
    if r["unchanged"]:
        print(
            "pissa-svd: warning: the trained adapter's factors are the init's, so the LoRA is "
            "zero; was --trained saved before training?",
            file=sys.stderr,
        )
    if r["quantized"] and not args.quiet:
        print(
            f"  The residual was {r['quantized']}-quantized (QPiSSA), the original is not: on "
            "it the LoRA gives the trained\n  model up to the quantization error (stored_error "
            "in pissa_report.json)."
        )
    if r["other_base"]:
        print(
            f"pissa-svd: warning: the trained adapter was saved on {r['other_base']}, not on the "
            f"residual model this init belongs to; convert only if it was trained from {args.init}",
            file=sys.stderr,
        )
    return 0


def _merge(args: argparse.Namespace) -> int:
    from .convert import merge

    r = merge(args.base, args.adapter, args.out, overwrite=args.overwrite, quiet=args.quiet)
    if not args.quiet:
        extra = f", {r['replaced']} tensors replaced (modules_to_save)" if r["replaced"] else ""
        if r["untied"]:
            extra += ", tied embeddings untied as in training (tie_word_embeddings false)"
        print(f"pissa-svd: merged {r['merged']} weights{extra} into {r['out']}")
    if r["other_base"]:
        print(
            f"pissa-svd: warning: the adapter was saved on {r['other_base']}, not on "
            f"{args.base}; use the merged model only if the adapter was trained on {args.base}",
            file=sys.stderr,
        )
    return 0


def _verify(args: argparse.Namespace) -> int:
    from .convert import verify

    res = verify(args.src, args.out, adapter=args.adapter, quiet=args.quiet)
    if args.verbose:
        print(
            f"{'tensor':<56} {'kind':<6} {'shape':<14} {'dtype':<10} {'err/bound':>9} "
            f"{'rel err':>9}  status"
        )
        for r in res.rows:
            shape = "x".join(map(str, r.shape))
            ratio = f"{r.ratio:.3g}" if r.kind == "target" else "-"
            rel = f"{r.rel:.2e}" if r.kind == "target" else "-"
            status = "ok" if r.ok else f"FAIL {r.note}"
            print(
                f"{r.name:<56} {r.kind:<6} {shape:<14} {r.dtype:<10} {ratio:>9} {rel:>9}  {status}"
            )
    n_t = sum(r.kind == "target" for r in res.rows)
    n_c = len(res.rows) - n_t
    worst = res.worst()
    if res.passed:
        tail = (
            f" (worst {worst.name}: {worst.ratio:.2f} of the bound, rel. error {worst.rel:.1e})"
            if worst
            else ""
        )
        how = "within rounding"
        if any(r.dtype.endswith((" nf4", " int8")) for r in res.rows):
            how = "up to the quantization error decompose --quantize recorded (fixed points)"
        print(
            f"pissa-svd verify: PASS: {n_t} adapted tensors reproduce SRC {how}{tail}; "
            f"{n_c} other tensors identical"
        )
        return 0
    print(
        f"pissa-svd verify: FAIL: {len(res.failures)} of {len(res.rows)} tensors mismatch; "
        f"worst {worst.name}: {worst.note}{f'; {res.hint}' if res.hint else ''}"
    )
    return 1


class Terminated(KeyboardInterrupt):
    """SIGTERM (kill, a scheduler's timeout): unwinds like Ctrl-C, so the partial output is
    removed or kept as for an interrupt, and exits 143 (128 + SIGTERM), as a killed process
    reports."""


def _terminate(signum, frame):
    raise Terminated


def _kept(exc: BaseException) -> str:
    note = getattr(exc, "pissa_note", None)
    return f"; {note}" if note else ""


def main(argv: list[str] | None = None) -> int:
    args, extra = build_parser().parse_known_args(argv)
    if extra:  # point at the subcommand's help, which lists its options
        print(
            f"pissa-svd {args.command}: error: unrecognized arguments: {' '.join(extra)} "
            f"(see pissa-svd {args.command} --help)",
            file=sys.stderr,
        )
        return EXIT_BAD_INPUT
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)
    try:
        if args.command == "decompose":
            return _decompose(args)
        if args.command == "env":
            return _env()
        if args.command == "to-lora":
            return _to_lora(args)
        if args.command == "merge":
            return _merge(args)
        if args.command == "verify":
            return _verify(args)
    except InputError as exc:
        print(f"pissa-svd: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as exc:  # the file system refused: permissions, read-only, full, ...
        print(f"pissa-svd: error: {os_error_message(exc)}{_kept(exc)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except RankFailure as exc:
        out = getattr(exc, "pissa_out", "OUT was not written")
        print(f"pissa-svd: error: {exc}; {out}{_kept(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        out = getattr(exc, "pissa_out", "OUT was not written")
        unwritten = "" if args.command in ("verify", "env") else f"; {out}"
        fresh_line = "\n" if sys.stderr.isatty() else ""  # after a progress bar's last line
        print(f"{fresh_line}pissa-svd: interrupted{unwritten}{_kept(exc)}", file=sys.stderr)
        return _interrupted_code(exc)
    except Exception as exc:  # a bug: its traceback follows; first say what was kept
        if getattr(exc, "pissa_note", None):
            print(f"pissa-svd: {exc.pissa_note}", file=sys.stderr)
        raise
    return 0  # pragma: no cover (argparse requires a command)


def run() -> None:
    """The console entry point: :func:`main`, then exit without the interpreter's teardown.

    Unloading torch at exit (module teardown, its thread pools) costs 0.6-1.2 s on a 2-core
    machine (`python -c "import torch"`: 2.9-3.5 s, 2.3-2.7 s ending in ``os._exit``), a
    second of every run spent after the work is done. By the time main() returns, every file
    is closed and OUT is in place, so only the standard streams need flushing. An exception
    main() does not handle (``--help``, ``--version``, a bug) exits the normal way.
    """
    if sys.stderr is None:  # started with 2>&-: messages go nowhere, the exit code still tells
        sys.stderr = open(os.devnull, "w")  # noqa: SIM115 (lives as long as the process)
    sys.stdout = _Stdout(sys.stdout if sys.stdout is not None else _ClosedStream())
    try:
        code = main()
    except KeyboardInterrupt as exc:  # before any work: while loading torch, say
        print("pissa-svd: interrupted", file=sys.stderr)
        code = _interrupted_code(exc)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class _Stdout:
    """Standard output whose failure (a closed pipe: ``| head``; a full disk) never turns into
    the command's failure: what it reports is on disk, or was verified, either way, and the
    exit code must still say so. A closed pipe drops the rest silently, as other tools do;
    any other error says so once on stderr.

    Where the printed text is the command's product (``env``, ``decompose --dry-run``),
    :func:`_print_product` turns that error into the command's own failure instead."""

    def __init__(self, stream):
        self._stream, self._failed = stream, False
        self.error: OSError | None = None  # the first write error other than a closed pipe
        self.product = False  # set by a command whose output is what it prints

    def write(self, text: str) -> int:
        return self._guard(self._stream.write, text) or len(text)

    def flush(self) -> None:
        self._guard(self._stream.flush)

    def __getattr__(self, name):
        return getattr(self._stream, name)

    def _guard(self, fn, *args):
        if self._failed:
            return None
        try:
            return fn(*args)
        except OSError as exc:
            self._failed = True
            if not isinstance(exc, BrokenPipeError):
                self.error = exc
                if self.product:
                    return None
                why = exc.strerror or exc
                print(
                    f"pissa-svd: warning: could not write to standard output ({why})",
                    file=sys.stderr,
                )
            return None


class _ClosedStream:
    """Standard output of a process started with it closed (``>&-``): every write fails."""

    def write(self, text: str) -> int:
        raise OSError(errno.EBADF, os.strerror(errno.EBADF))

    def flush(self) -> None:  # nothing is ever buffered
        pass

    def isatty(self) -> bool:
        return False


def _print_product(text: str) -> None:
    """Print what the command produces (a plan, the environment). If standard output fails
    other than by a closed pipe, that is the command's failure (exit 2): it made nothing
    else."""
    out = sys.stdout
    if isinstance(out, _Stdout):
        out.product = True
    print(text)
    out.flush()
    if isinstance(out, _Stdout) and out.error is not None:
        raise InputError(
            f"could not write to standard output ({out.error.strerror or out.error}); "
            "redirect it to a file or pipe that accepts it"
        )


def _interrupted_code(exc: KeyboardInterrupt) -> int:
    return 128 + (signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT)


if __name__ == "__main__":
    run()
