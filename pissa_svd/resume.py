"""Resuming an interrupted decompose from its staging folder.

decompose stages OUT in the hidden sibling ``.OUT.partial/`` and journals every finished tensor
there (``.pissa_progress/rank-K.jsonl``: one JSON line per tensor, written after its residual
and adapter bytes are in place). A run that fails or is interrupted after finishing some tensors
keeps that folder; ``--resume`` re-checks each journaled tensor (``W_res + s B@A == W`` within
rounding, as ``pissa-svd verify`` does, reading the bytes back from the staging files) and
decomposes only the rest. Every staged shard must still have its planned size and header, else
it is created again (its finished tensors are then redone), and the tensors that are only copied
are copied from the source again, so nothing else in the staging folder is trusted. The work is
deterministic, so the result is byte-identical to an uninterrupted run. A plan fingerprint
(options, source path and files, batches) guards against resuming with different settings.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from .checkpoint import SafetensorsFile, has_layout, read_tensor
from .errors import InputError
from .output import try_lock

PROGRESS_DIR = ".pissa_progress"
PLAN_FILE = "plan.json"
PREPARED = "prepared"  # marker: every file exists and the copied tensors are in place


def staging_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.partial"


def fingerprint(plan) -> dict:
    """Everything that decides the output bytes."""
    o, ck = plan.options, plan.ckpt
    return {
        "source": [
            os.path.realpath(ck.root if ck.index is not None else ck.files[ck.shards[0]].path),
            *(
                [shard, os.stat(sf.path).st_size, os.stat(sf.path).st_mtime_ns]
                for shard, sf in ck.files.items()
            ),
        ],
        "options": [
            o.rank,
            o.niter,
            plan.oversample,
            o.method,
            o.seed,
            plan.alpha,
            plan.backend,
            torch.device(plan.device).type,
            o.quantize,
            o.quant_iters,
            o.sketch_dtype,
        ],
        "batches": [
            [[t.name, t.method, t.adapter_dtype, t.residual_dtype] for t in b] for b in plan.batches
        ],
    }


def start(staging: Path, plan) -> int:
    """A fresh staging folder with the plan's fingerprint, locked before the fingerprint marks
    it as ours (so no other run can take it for an abandoned one); returns the lock's
    descriptor, as :func:`lock`."""
    from .output import guarded

    plan_file = staging / PROGRESS_DIR / PLAN_FILE
    guarded(lambda: staging.mkdir(parents=True), staging)
    fd = lock(staging)  # a run that saw it before, with no fingerprint, refused to touch it
    try:
        guarded(lambda: plan_file.parent.mkdir(), plan_file.parent)
        guarded(lambda: plan_file.write_text(json.dumps(fingerprint(plan))), plan_file)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # just created, and not yet marked as ours
        os.close(fd)
        raise
    return fd


class Untouched(InputError):
    """Refused before this run changed the staging folder: it is left exactly as it was, and
    nothing about it is added to the message."""


class Busy(Untouched):
    """Another live run holds the staging folder."""


def lock(staging: Path) -> int:
    """Hold ``staging`` for this run: an exclusive lock on the folder itself (it moves with
    the folder when it becomes OUT, and goes with the process). Returns the descriptor to
    close when done; raises :class:`Busy` when another run holds it."""
    fd = try_lock(staging)
    if fd is None:
        raise Busy(
            f"{staging} is in use by another pissa-svd run writing the same --out; wait for it "
            "to finish, or choose another --out"
        )
    return fd


def remove(staging: Path) -> None:
    """Delete a staging folder of ours, its progress record last: interrupted halfway, what
    is left is still recognized as ours (:func:`is_ours`) and removed by the next run."""
    if not staging.exists():
        return
    for child in staging.iterdir():
        if child.name == PROGRESS_DIR:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)
    shutil.rmtree(staging, ignore_errors=True)


def is_ours(staging: Path) -> bool:
    """Whether ``staging`` is a folder this tool started (it holds a plan fingerprint), as
    opposed to a user's file or folder that happens to have its name."""
    return (
        staging.is_dir()
        and not staging.is_symlink()
        and (staging / PROGRESS_DIR / PLAN_FILE).is_file()
    )


def mark_prepared(staging: Path) -> None:
    (staging / PROGRESS_DIR / PREPARED).touch()


def is_prepared(staging: Path) -> bool:
    return (staging / PROGRESS_DIR / PREPARED).exists()


class Journal:
    """This rank's record of finished tensors, one flushed JSON line each."""

    def __init__(self, staging: Path, rank: int):
        # Held open for the whole run (one line per tensor); close() ends it.
        path = staging / PROGRESS_DIR / f"rank-{rank}.jsonl"
        self._f = open(path, "a", encoding="utf-8")  # noqa: SIM115

    def record(self, row: dict) -> None:
        self._f.write(json.dumps(row) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def journaled(staging: Path) -> int:
    """How many tensors the journals of ``staging`` record."""
    d = staging / PROGRESS_DIR
    if not d.is_dir():
        return 0
    return sum(len(_rows(p)) for p in d.glob("rank-*.jsonl"))


def forget(staging: Path, names: set[str]) -> None:
    """Drop ``names`` from the journals (their bytes are about to be made again), so that no
    later resume can take them for finished."""
    for path in (staging / PROGRESS_DIR).glob("rank-*.jsonl"):
        rows = _rows(path)
        keep = [r for r in rows if r["name"] not in names]
        if len(keep) != len(rows):
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in keep), encoding="utf-8")
            os.replace(tmp, path)


def check_plan(staging: Path, plan) -> None:
    """Untouched unless ``staging`` holds an interrupted run of this very plan (options,
    source, targets): what ``--resume`` (and ``--dry-run --resume``) requires."""
    d = staging / PROGRESS_DIR
    if not is_ours(staging):
        raise Untouched(
            f"--resume: {staging} holds no interrupted run of this OUT; run without --resume"
        )
    try:
        recorded = json.loads((d / PLAN_FILE).read_text())
    except (OSError, ValueError, RecursionError):
        recorded = None  # damaged: it cannot be shown to match
    now = json.loads(json.dumps(fingerprint(plan)))
    if recorded != now:
        if not isinstance(recorded, dict) or recorded.keys() != now.keys():
            raise Untouched(
                f"--resume: the record of the interrupted run in {staging} is damaged; run "
                "without --resume to start over"
            )
        what = {
            "source": "source (path, or its files' size or modification time)",
            "options": "options",
            "batches": "targets, dtypes or batches (--targets, --exclude, --adapter-dtype, "
            "--residual-dtype, --batch-memory)",
        }
        named = " and ".join(what[k] for k in now if recorded[k] != now[k])
        raise Untouched(
            f"--resume: the interrupted run in {staging} had other {named}; rerun with the "
            "same ones to continue it, or without --resume to start over"
        )


def require(staging: Path, out: Path) -> None:
    """What ``--resume`` needs first: a staging folder to continue."""
    if not staging.is_dir():
        raise InputError(
            f"--resume: no interrupted run of {out} to continue ({staging} does not exist); "
            "run without --resume"
        )


def dry_run_note(plan) -> str | None:
    """What a run of ``plan`` would do with an interrupted run's staging folder, for
    ``--dry-run``: continue it (``--resume``, after the same checks), or discard it."""
    staging = staging_dir(plan.out)
    if plan.options.resume:
        require(staging, plan.out)
        check_plan(staging, plan)
        return (
            f"resume: {journaled(staging)} finished tensors in {staging} are re-checked and "
            "reused; the rest is decomposed"
        )
    if is_ours(staging) and (n := journaled(staging)):
        return (
            f"note: {staging} holds {n} finished tensors of an interrupted run; this run would "
            "start over and discard them (add --resume to continue it)"
        )
    return None


def finished(
    staging: Path, plan, adapter_file: str, adapter_config: dict, layouts: dict[str, tuple]
) -> tuple[dict[str, dict], set[str]]:
    """The journaled tensors of an earlier run that still check out (name -> report row), and
    the staged shards to create again: those without the size and header of their planned
    ``layouts`` (shard -> (entries, metadata)), whose finished tensors are not reused.

    Raises InputError when there is nothing to resume, the plan differs or the staged adapter
    file (which every finished tensor needs) is damaged.
    """
    check_plan(staging, plan)
    if not is_prepared(staging):
        return {}, set()
    redo = {
        f for f, (entries, meta) in layouts.items() if not has_layout(staging / f, entries, meta)
    }
    try:
        if adapter_file in redo:
            raise InputError(f"{adapter_file} lost its planned size or header")
        return _verified(staging, plan, adapter_file, adapter_config, redo), redo
    except (InputError, OSError, KeyError, ValueError) as exc:
        raise Untouched(
            f"--resume: the interrupted run in {staging} is damaged ({exc}); run without "
            "--resume to start over"
        ) from None


def _verified(
    staging: Path, plan, adapter_file: str, adapter_config: dict, redo: set[str]
) -> dict[str, dict]:
    from .adapter import LoraAdapter, peft_key
    from .convert import _check_quantized, _check_target, quantized_check

    d = staging / PROGRESS_DIR
    rows = {r["name"]: r for p in sorted(d.glob("rank-*.jsonl")) for r in _rows(p)}
    by_name = {t.name: t for t in plan.targets}
    shard_of = {i.name: s for s, f in plan.ckpt.files.items() for i in f.tensors.values()}
    rows = {n: r for n, r in rows.items() if n in by_name and shard_of[n] not in redo}
    if not rows:
        return {}
    aw = SafetensorsFile.open(staging / adapter_file)
    modules = {by_name[n].module: n for n in rows}
    A = {m: read_tensor(aw.tensors[peft_key(m, "A")]) for m in modules}
    B = {m: read_tensor(aw.tensors[peft_key(m, "B")]) for m in modules}
    ad = LoraAdapter(staging, adapter_config, A, B)
    files: dict[str, SafetensorsFile] = {}
    good = {}
    for m, name in modules.items():
        shard = shard_of[name]
        if shard not in files:
            files[shard] = SafetensorsFile.open(staging / shard)
        src, done = by_name[name].info, files[shard].tensors[name]
        if plan.options.quantize:
            record = quantized_check(rows[name].get("quantization"))
            if record is None:
                continue  # a QPiSSA residual is checked against its recorded error: none, redo
            check = _check_quantized(src, done, ad, m, record)
        else:
            check = _check_target(src, done, ad, m)
        if check.ok:
            good[name] = rows[name]
    return good


def _rows(path: Path) -> list[dict]:
    out = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:  # a line cut short by the interruption
            break
        if not isinstance(row, dict) or not isinstance(row.get("name"), str):
            break  # not a line this tool wrote: trust nothing from here on
        out.append(row)
    return out
