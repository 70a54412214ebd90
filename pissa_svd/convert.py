"""After training: PiSSA -> LoRA conversion, merging an adapter into a checkpoint, verification.

- :func:`to_lora` turns a fine-tuned PiSSA adapter into a plain LoRA for the *original* model:
  ``dW = s B' A' - s B A = s [B' | -B] @ [A' ; A]``, rank 2r (PEFT's conversion does the same).
- :func:`merge` writes ``W + s B @ A`` for every adapted weight of a checkpoint, shard by shard.
- :func:`verify` checks, tensor by tensor, that a decompose output reproduces its source:
  ``W_res + s B @ A == W`` within the rounding of the stored residual, and every other tensor
  byte-identical.

All three stream: adapters are loaded whole (they are small), checkpoints one tensor at a time.
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from .adapter import ADAPTER_CONFIG, PEFT_PREFIX, LoraAdapter
from .checkpoint import (
    FLOAT_DTYPES,
    INDEX_NAME,
    Checkpoint,
    SafetensorsFile,
    StreamingWriter,
    TensorInfo,
    dtype_to_torch,
    read_tensor,
)
from .errors import InputError, read_json
from .fused import FusedParam, fused_params, unmapped_params
from .linalg import svd_lowrank
from .loadcheck import checkpoint_names, tied_to_input_embedding
from .output import check_out, copy_files, plain_number, progress, staged, write_json
from .pipeline import ADAPTER_DIR, REPORT_FILE
from .pissa import all_finite, sum_squares
from .targets import Names, module_name

CONFIG_NAME = "config.json"
_TIE = "tie_word_embeddings"
_CHUNK_ELEMENTS = 1 << 22  # verify works on row blocks of ~4M elements: fp64 temporaries stay small


# ---------------------------------------------------------------------------------------------
# PiSSA -> LoRA


def to_lora(
    init: str | os.PathLike,
    trained: str | os.PathLike,
    out: str | os.PathLike,
    *,
    overwrite: bool = False,
) -> dict:
    """Write a rank-2r LoRA adapter for the original model; returns a summary dict.

    Args:
        init: the ``pissa_init`` adapter that ``decompose`` wrote (the state before training).
        trained: the adapter saved after training on the residual model.
        out: the new adapter folder (loads with PEFT on the *original* checkpoint).

    A trained adapter in PEFT's fused layout for mixture-of-experts parameters (what PEFT
    saves under transformers 5, :mod:`pissa_svd.fused`) is matched to the init's per-expert
    modules, or to the init's own fused modules (``pissa_svd.peft.initialize`` on a
    ``target_parameters`` LoRA), and the LoRA keeps that layout. A trained adapter whose
    modules, shapes or layout differ from the init's (another rank, another model) is refused.
    Two models of identical shapes cannot be told apart from the weights, so the summary
    reports how far training moved the adapter and, when both configs name local folders,
    whether the trained adapter was saved on a different base.
    """
    ini = LoraAdapter.load(init, "init adapter")
    tr = LoraAdapter.load(trained, "trained adapter")
    out = Path(out)
    if ini.root.resolve() == tr.root.resolve():
        raise InputError(
            f"--init and --trained are the same adapter, {ini.root}: pass decompose's "
            "pissa_init as --init and the adapter saved after training as --trained"
        )
    check_out(out, overwrite, {"the init adapter": ini.root, "the trained adapter": tr.root})
    # Fused experts (pissa_svd.fused): the trained adapter in PEFT's fused layout over a
    # per-expert init (decompose's), or both fused (initialize on a target_parameters LoRA).
    init_fused = unmapped_params(ini)  # empty for decompose's per-expert init
    if init_fused:
        fused = unmapped_params(tr)
    else:
        fused = fused_params(tr, {m: ini.shape(m) for m in ini.modules}, f"init {ini.root}")
    _check_same_layout(ini, tr, fused, init_fused)

    A_out: dict[str, torch.Tensor] = {}
    B_out: dict[str, torch.Tensor] = {}
    changes: list[float] = []
    defects: list[tuple[float, float, torch.dtype, torch.dtype]] = []
    unchanged = True
    for m in tr.modules:
        # Per expert (E = 1 but for fused experts): A (E, r, in), B (E, out, r).
        if m in fused:
            p = fused[m]
            (A1, B1), s1 = p.split(tr.A[m], tr.B[m]), p.scaling
            if m in init_fused:
                (A0, B0), s0 = p.split(ini.A[m], ini.B[m]), init_fused[m].scaling
            else:
                A0, B0, s0 = p.from_experts(ini)  # the init in the trained adapter's layout
        else:
            A1, B1, s1 = tr.A[m][None], tr.B[m][None], tr.scaling(m)
            A0, B0, s0 = ini.A[m][None], ini.B[m][None], ini.scaling(m)
        dtype = torch.promote_types(
            torch.promote_types(A0.dtype, A1.dtype), torch.promote_types(B0.dtype, B1.dtype)
        )
        # The output keeps the trained adapter's scaling s1, so the init's B is rescaled by
        # s0 / s1 (1 unless the two configs disagree on alpha).
        A = torch.cat([A1.to(dtype), A0.to(dtype)], dim=1)
        B0s = B0.to(dtype) * (-s0 / s1)
        _check_rescaled(B0s, B0, s0 / s1, m, dtype)
        B = torch.cat([B1.to(dtype), B0s], dim=2)
        A_out[m], B_out[m] = fused[m].join(A, B) if m in fused else (A[0], B[0])
        changes.append(_relative_change(A1, B1, s1, A0, B0, s0))
        unchanged &= s0 == s1 and torch.equal(A0.to(dtype), A1.to(dtype))
        unchanged &= torch.equal(B0.to(dtype), B1.to(dtype))
        defects.append((_unlike_an_init(A0, B0), _unlike_an_init(A1, B1), A0.dtype, A1.dtype))
    median = sorted(changes)[len(changes) // 2]
    _check_not_swapped(defects, ini, tr)

    config = _doubled_config(tr.config)
    base = _original_model(ini.root.parent)
    if base is not None:
        config["base_model_name_or_path"] = base
    result = LoraAdapter(out, config, A_out, B_out, dict(tr.extra))
    with staged(out, overwrite) as tmp:
        result.save(tmp)
    return {
        "out": str(out),
        "modules": len(A_out),
        "fused": len(fused),
        "r": tr.config.get("r"),
        "r_out": config.get("r"),
        "lora_alpha": tr.config.get("lora_alpha"),
        "lora_alpha_out": config.get("lora_alpha"),
        "use_rslora": bool(config.get("use_rslora")),
        "base_model": base,
        "median_change": median,
        "max_change": max(changes),
        "unchanged": unchanged,
        "other_base": _other_base(ini, tr),
        "quantized": _quantize_scheme(ini.root.parent),
    }


def _quantize_scheme(decomposed: Path) -> str | None:
    """``nf4``/``int8`` when decompose wrote ``decomposed`` with --quantize, else None."""
    scheme = _report(decomposed).get("quantize")
    return scheme if isinstance(scheme, str) else None


def _report(decomposed: Path) -> dict:
    """The report decompose wrote into its output folder ``decomposed``; {} where there is
    none, or it is unreadable."""
    try:
        report = json.loads((decomposed / REPORT_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return report if isinstance(report, dict) else {}


def _check_same_layout(
    ini: LoraAdapter,
    tr: LoraAdapter,
    fused: dict[str, FusedParam],
    init_fused: dict[str, FusedParam],
) -> None:
    in_fused = {m for p in fused.values() for names in p.parts for m in names}
    only_init = sorted(set(ini.modules) - set(tr.modules) - in_fused)
    only_trained = sorted(set(tr.modules) - set(ini.modules) - {m for m in fused if fused[m].parts})
    if only_init or only_trained:
        which = (
            f"{len(only_init)} module(s) only in the init, e.g. {only_init[0]}"
            if only_init
            else f"{len(only_trained)} module(s) only in the trained adapter, e.g. {only_trained[0]}"
        )
        raise InputError(
            f"trained adapter {tr.root} and init {ini.root} target different modules ({which}); "
            "pass the adapter that was trained from this init"
        )
    for m in set(ini.modules) & set(tr.modules):
        a0, b0, a1, b1 = ini.A[m].shape, ini.B[m].shape, tr.A[m].shape, tr.B[m].shape
        if (a0, b0) != (a1, b1):
            raise InputError(
                f"{m}: trained adapter has lora_A {tuple(a1)} / lora_B {tuple(b1)}, the init has "
                f"{tuple(a0)} / {tuple(b0)}; the rank or the base model differs from the init's"
            )
    for m, p in init_fused.items():
        if m not in fused:
            raise InputError(
                f"init {ini.root} adapts fused experts ({m}) that the trained adapter "
                f"{tr.root} does not; pass the adapter that was trained from this init"
            )
        if (p.experts, p.rank) != (fused[m].experts, fused[m].rank):
            raise InputError(
                f"{m}: the trained adapter has {fused[m].experts} experts of rank "
                f"{fused[m].rank}, the init {p.experts} of rank {p.rank}; pass the adapter that "
                "was trained from this init"
            )
    for m, p in fused.items():
        if m in init_fused:
            continue
        r0 = sum(ini.rank(name) for name in p.parts[0])
        if p.rank != r0:
            raise InputError(
                f"{m}: the trained adapter's {p.param} has rank {p.rank} per expert, the init's "
                f"experts {' + '.join(p.parts[0])} have {r0}; the rank differs from the init's"
            )
    if ini.fan_in_fan_out != tr.fan_in_fan_out:
        raise InputError(
            f"trained adapter {tr.root} and init {ini.root} disagree on fan_in_fan_out; "
            "they were made for different model layouts"
        )


def _other_base(ini: LoraAdapter, tr: LoraAdapter) -> str | None:
    """The trained adapter's recorded base when it is a local folder other than the init's."""
    return _other_folder(tr, ini.config.get("base_model_name_or_path"))


def _other_folder(ad: LoraAdapter, expected: str | Path | None) -> str | None:
    """``ad``'s recorded base (base_model_name_or_path) when it and ``expected`` are local
    folders, and different ones."""
    recorded = ad.config.get("base_model_name_or_path")
    if not (isinstance(recorded, str) and isinstance(expected, (str, Path))):
        return None
    if _same_folder(recorded, expected) is False:
        return recorded
    return None


def _same_folder(a: str | Path | None, b: str | Path | None) -> bool | None:
    """Whether two paths name the same folder; None unless both are existing folders."""
    if a is None or b is None or not (Path(a).is_dir() and Path(b).is_dir()):
        return None
    return Path(a).resolve() == Path(b).resolve()


def _check_rescaled(B0s, B0, ratio: float, module: str, dtype: torch.dtype) -> None:
    """The init's B times -s0 / s1 must still be that in ``dtype``: alphas far apart
    overflow it to inf or round it to zeros, and the LoRA would lose the init's term."""
    want = abs(ratio) * float(torch.linalg.vector_norm(B0.double()))
    got = float(torch.linalg.vector_norm(B0s.double()))
    if not (math.isfinite(got) and abs(got - want) <= 0.01 * want):
        raise InputError(
            f"{module}: the init adapter's lora_B scaled by its scaling over the trained one's "
            f"({ratio:.3g}) does not fit in {dtype}; save the trained adapter with the init's "
            "lora_alpha (and r), or in float32"
        )


def _relative_change(A1, B1, s1: float, A0, B0, s0: float) -> float:
    """||s1 B1 A1 - s0 B0 A0||_F / ||s0 B0 A0||_F over all experts (A: (E, r, in), B: (E, out,
    r)), through (2r x 2r) Gram matrices in fp64.

    With X = [s1 B1 | -s0 B0] and Y = [A1 ; A0], ||X Y||_F^2 = <X^T X, Y Y^T>: no (out, in)
    product is formed.
    """
    d = torch.float64
    X = torch.cat([B1.to(d) * s1, B0.to(d) * -s0], dim=-1)
    Y = torch.cat([A1.to(d), A0.to(d)], dim=-2)
    r = A1.shape[-2]
    gx, gy = X.mT @ X, Y @ Y.mT
    diff = float((gx * gy).sum().clamp_min(0).sqrt())
    ref = float((gx[:, r:, r:] * gy[:, r:, r:]).sum().clamp_min(0).sqrt())
    return diff / ref if ref > 0 else math.inf


def _unlike_an_init(A: torch.Tensor, B: torch.Tensor) -> float:
    """How far A (E, r, in) and B (E, out, r) are from a PiSSA init's factors, sqrt(S/s) Vh and
    U sqrt(S/s), for which A A^T = B^T B = diag(S / s): the relative Frobenius distance of
    both Gram matrices from their common diagonal. A rounding's worth for an init (fp32 or
    bf16); training moves it, by a few percent after a few hundred steps."""
    d = torch.float64
    ga, gb = A.to(d) @ A.to(d).mT, B.to(d).mT @ B.to(d)
    diag = torch.diag_embed(torch.diagonal(ga, dim1=-2, dim2=-1))
    ref = float(torch.linalg.vector_norm(diag))
    if ref == 0:
        return 0.0
    return float(torch.linalg.vector_norm(ga - diag) + torch.linalg.vector_norm(gb - diag)) / ref


def _check_not_swapped(defects: list[tuple], ini: LoraAdapter, tr: LoraAdapter) -> None:
    """Refuse --init and --trained given the other way round: the trained adapter's factors
    are an init's to their dtype's rounding (an fp32 init's: a few 1e-7, bf16's: about 2e-3)
    and the init's are ten times further off (the LoRA would undo the training)."""
    n = len(defects)
    init_defect = sorted(d[0] for d in defects)[n // 2]
    trained_defect = sorted(d[1] for d in defects)[n // 2]
    init_tol = max(1e-5, max(torch.finfo(d[2]).eps for d in defects))
    trained_tol = max(1e-5, max(torch.finfo(d[3]).eps for d in defects))
    if init_defect > 10 * init_tol and trained_defect < trained_tol:
        raise InputError(
            f"the --trained adapter {tr.root} has the factors of an untouched PiSSA init and "
            f"the --init adapter {ini.root} does not: were the two swapped? Pass decompose's "
            "pissa_init as --init and the adapter saved after training as --trained"
        )


def _doubled_config(config: dict) -> dict:
    """The trained config with r doubled and lora_alpha adjusted so that s is unchanged."""
    out = copy.deepcopy(config)
    rslora = bool(out.get("use_rslora"))
    alpha_factor = math.sqrt(2) if rslora else 2  # s = alpha / sqrt(r) with rslora
    out["r"] = 2 * int(out["r"])
    out["lora_alpha"] = plain_number(out.get("lora_alpha", config["r"]) * alpha_factor)
    if out.get("rank_pattern"):
        out["rank_pattern"] = {k: 2 * v for k, v in out["rank_pattern"].items()}
    if out.get("alpha_pattern"):
        out["alpha_pattern"] = {
            k: plain_number(v * alpha_factor) for k, v in out["alpha_pattern"].items()
        }
    # True, not "pissa": PEFT would run an SVD on load instead of using these weights.
    out["init_lora_weights"] = True
    out["inference_mode"] = True
    return out


def _original_model(decomposed: Path) -> str | None:
    """The checkpoint decompose read, from the report in its output folder ``decomposed``."""
    source = _report(decomposed).get("source")
    if not isinstance(source, str):
        return None
    p = Path(source)
    return str(p.parent if p.suffix == ".safetensors" else p)


# ---------------------------------------------------------------------------------------------
# merge


def merge(
    base: str | os.PathLike,
    adapter: str | os.PathLike,
    out: str | os.PathLike,
    *,
    overwrite: bool = False,
    quiet: bool = False,
) -> dict:
    """Write ``base`` with ``W + s B @ A`` for every module of ``adapter``; returns a summary.

    ``base`` is a checkpoint folder or file (for a PiSSA run: the decompose output, the
    residual model); OUT gets the same shards, dtypes and side files (config, tokenizer).
    Tensors the adapter saves whole (modules_to_save) replace the base's; where one is a weight
    tied to others (tied input and output embeddings) that training left untied, OUT unties
    them as PEFT's merge_and_unload does (:func:`_untie`).
    An adapter whose recorded base is another local folder is merged, and the summary's
    ``other_base`` names that folder. The two PiSSA mix-ups are refused: a LoRA for the
    original merged into its residual (:func:`_check_base`, :func:`_check_residual_rank`), and
    an adapter trained on a residual merged into the original (:func:`_holds_update`).
    """
    base_path, out = Path(base), Path(out)
    ck = Checkpoint.open(base_path)
    ad = LoraAdapter.load(adapter, "adapter")
    check_out(out, overwrite, {"the base checkpoint": base_path, "the adapter": ad.root})
    infos = {t.name: t for t in ck.tensors()}
    names = checkpoint_names(ck)
    targets = _match_targets(infos, ad, str(base_path), names)  # an adapter that does not fit
    tied = [names.tensor(n) for n in _tied_weights(ck, ad)]
    replaced = _match_extra(infos, ad, str(base_path), tied, names)
    added, untie = _untie(infos, tied, replaced)
    other = _check_base(ad, ck.root)
    _check_residual_rank(ad, ck.root)
    merged = partial(_merged, targets=targets, twice=partial(_counted_twice, ad, ck.root))
    # The PiSSA mix-ups show on every target: refused before any work, from the first target
    # (and for the converted LoRA, the first one of plain layout: fused experts are not read).
    first = next((infos[name] for name in infos if name in targets), None)
    plain = next((infos[n] for n in infos if n in targets and _plain(ad, names.module(n))), None)
    W = None if first is None else read_tensor(first)
    if plain is not None:
        W_plain = W if plain is first else read_tensor(plain)
        _check_converted(ad, names.module(plain.name), plain.name, W_plain, ck.root)
    if first is not None:
        merged(first, W)
    del W
    bar = progress(ck.total_bytes, "merge", quiet)
    try:
        with staged(out, overwrite) as tmp:
            for shard in ck.shards:
                dest = tmp / shard
                dest.parent.mkdir(parents=True, exist_ok=True)
                _merge_shard(ck.files[shard], dest, targets, merged, replaced, added, bar)
            if ck.index is not None:
                write_json(tmp / INDEX_NAME, _with_added(ck.index, added, infos))
            skip = {REPORT_FILE, CONFIG_NAME} if untie else {REPORT_FILE}
            copy_files(ck.root, [f for f in ck.extra_files if f not in skip], tmp)
            if untie:
                write_json(tmp / CONFIG_NAME, _untied_config(ck.read_json(CONFIG_NAME)))
    finally:
        bar.close()  # an error's line then starts on a line of its own
    return {
        "out": str(out),
        "merged": len(targets),
        "replaced": len(replaced),
        "untied": untie,
        "other_base": other,
    }


def _check_base(ad: LoraAdapter, root: Path) -> str | None:
    """The adapter's recorded base when it is a local folder other than ``root``, the folder
    merged into; an error when decompose's report shows that ``root`` is the PiSSA residual of
    that folder: the update of an adapter for the original model does not belong on it.

    The reverse mix-up, an adapter trained on a residual merged into the original (or a copy,
    wherever the residual now is), is told from the weights (:func:`_holds_update`)."""
    other = _other_folder(ad, root)
    if other is None:
        return None
    if _same_folder(_original_model(root), other):
        raise InputError(
            f"adapter {ad.root} was made for {other}, and {root} is the PiSSA residual of that "
            f"model; merge it into {other}, or merge the adapter trained on the residual instead"
        )
    return other


def _check_residual_rank(ad: LoraAdapter, root: Path) -> None:
    """Into a PiSSA residual (``root`` has decompose's report) goes only an adapter trained from
    its ``pissa_init``, of the rank the report records. A rank-2r LoRA for the original model
    (``to-lora``'s, or PEFT's own conversion, which records the residual as its base) is not."""
    matrices = _report(root).get("matrices")
    ranks = {rec.get("module"): rec.get("rank") for rec in matrices or [] if isinstance(rec, dict)}
    for m in ad.modules:
        r, rank = ranks.get(m), ad.A[m].shape[-2]
        if isinstance(r, int) and rank != r:
            original = _original_model(root) or "the original model"
            converted = (
                f". A rank-{2 * r} one converted for the original model (pissa-svd to-lora, or "
                f"PEFT's path_initial_model_for_weight_conversion) merges into {original}"
                if rank == 2 * r
                else f" (of rank {r}); this one was made for another residual or model"
            )
            raise InputError(
                f"{m}: the adapter has rank {rank}, and {root} is a PiSSA residual of rank {r} "
                f"(its {REPORT_FILE}); only an adapter trained from its {ADAPTER_DIR} merges "
                f"into it{converted}"
            )


def _plain(ad: LoraAdapter, m: str | None) -> bool:
    """Whether module ``m`` has its own (r, in) / (out, r) factors in ``ad`` (no fused experts)."""
    return m in ad.A and ad.A[m].dim() == 2


def _check_converted(ad: LoraAdapter, m: str, name: str, W: torch.Tensor, root: Path) -> None:
    """Refuse a LoRA converted for the original model (``to-lora``'s, or PEFT's own conversion)
    merged into a PiSSA residual, told from the weights where no report says what ``root`` is.

    Such a LoRA's update is ``B'A' - BA``: the second half of its rank is an untouched PiSSA
    init (:func:`_unlike_an_init`) whose update, ``-W_r``, the first half nearly cancels. On
    the original weight <W, -W_r> = ||W_r||^2; on the residual, which lacks W_r, it is about 0.
    A trained adapter's halves are no init, and an init's halves do not cancel. ``m`` is the
    module whose weight is the tensor ``name``, ``W``."""
    if ad.rank(m) % 2:
        return
    k = ad.rank(m) // 2
    A0, B0 = ad.A[m][k:], ad.B[m][:, k:]
    if _unlike_an_init(A0[None], B0[None]) > 1e-2:  # a bf16 init's rounding is ~2e-3
        return
    s = ad.scaling(m)
    init = (B0.double() * s) @ A0.double()
    trained = (ad.B[m][:, :k].double() * s) @ ad.A[m][:k].double()
    ii = float(sum_squares(init))
    if not ii > 0 or float(sum_squares(trained + init)) > 0.25 * ii:
        return
    held = -float((W.double() * (init.mT if ad.fan_in_fan_out else init)).sum()) / ii
    if held < 0.5:
        raise InputError(
            f"{name}: the adapter is a LoRA converted for the original model (its update is "
            f"B'A' - BA, a trained adapter minus its PiSSA init), and {root} lacks that init's "
            f"principal part: it is a PiSSA residual; merge the LoRA into the original model, "
            "or merge the adapter trained on the residual into this one"
        )


def _holds_update(W: torch.Tensor, D: torch.Tensor, merged: torch.Tensor, rank: int) -> bool:
    """Whether the weight ``W`` already holds the rank-``rank`` update ``D`` (``merged`` =
    W + D) as its principal part: the mix-up of merging a PiSSA adapter into the weight it was
    decomposed from, which counts the top-r components twice.

    A PiSSA adapter's ``s B A`` is (up to training) W_r, the best rank-r approximation of W,
    and W - W_r is orthogonal to W_r (Frobenius inner product; exactly so for any
    Rayleigh-Ritz truncation). So on the original weight <W, D> / ||D||^2 is near 1 and
    ||D||^2 near the top-r energy of W; on the residual <W, D> is near 0. A LoRA's update
    that lay along W that much and held half of W's top-r energy would double W's leading
    components: no fine-tune. The top-r energy, an SVD, is computed only where the inner
    product already points to the mix-up.
    """
    dd, ww = float(sum_squares(D)), float(sum_squares(W))
    if not dd > 0:
        return False
    inner = (float(sum_squares(merged)) - ww - dd) / 2  # <W, D> with no other pass
    if not 0.5 <= inner / dd <= 1.5:
        return False
    k = min(rank, *W.shape[-2:])
    top = float(svd_lowrank(W, k, niter=2, backend="torch")[1].double().square().sum())
    return dd >= 0.5 * top


def _counted_twice(ad: LoraAdapter, root: Path, name: str) -> InputError:
    recorded = ad.config.get("base_model_name_or_path")
    where = (
        f" ({recorded})"
        if isinstance(recorded, str) and _same_folder(recorded, root) is not True
        else ""
    )
    return InputError(
        f"{name}: the adapter's update s*B@A is the principal part of this weight: it is a "
        f"PiSSA adapter, and {root} is the model it was decomposed from (or a copy), so merging "
        f"would count those components twice; merge it into the PiSSA residual it was trained "
        f"on{where}, or convert it with pissa-svd to-lora to merge into the original model"
    )


def _match_targets(
    infos: dict[str, TensorInfo], ad: LoraAdapter, where: str, names: Names
) -> dict[str, tuple[Callable[[torch.dtype], torch.Tensor], int]]:
    """tensor name -> (its update in the stored layout, the update's rank), checking that
    every module's weight exists and fits. Fused experts (:mod:`pissa_svd.fused`) update one tensor per expert."""
    shapes = {
        module: info.shape
        for info in infos.values()
        if (module := module_name(info.name)) is not None and len(info.shape) == 2
    }
    fused = fused_params(ad, shapes, where)
    targets = {}
    for m in ad.modules:
        if m in fused:
            p = fused[m]
            for name in p.index:
                info = infos[f"{name}.weight"]
                _check_float(info, where)
                targets[info.name] = (partial(p.delta, ad.A[m], ad.B[m], name), p.rank)
            continue
        info = infos.get(names.tensor(f"{m}.weight"))
        if info is None:
            raise InputError(
                f"the adapter adapts {m}, but {where} has no tensor {names.tensor(f'{m}.weight')}; "
                "the adapter belongs to a different model"
            )
        expected = ad.stored_shape(m)
        if info.shape != expected:
            raise InputError(
                f"{info.name} in {where} has shape {info.shape} but the adapter's update is "
                f"{expected}; the adapter belongs to a different model"
            )
        _check_float(info, where)
        targets[info.name] = (partial(ad.stored_delta, m), ad.A[m].shape[-2])
    return targets


def _check_float(info: TensorInfo, where: str) -> None:
    if info.dtype not in FLOAT_DTYPES:
        raise InputError(
            f"{info.name} in {where} is {info.dtype}; merging needs bf16/fp16/fp32/fp64 "
            "weights (merge into the full-precision checkpoint)"
        )


def _match_extra(
    infos: dict[str, TensorInfo], ad: LoraAdapter, where: str, tied: list[str], names: Names
) -> dict[str, torch.Tensor]:
    """Non-LoRA adapter tensors (modules_to_save) replace the base tensor of the same name; a
    weight tied to a stored one (``tied``, :func:`_tied_weights`) need not be stored."""
    stored = next((infos[n] for n in tied if n in infos), None)
    replaced = {}
    for key, t in ad.extra.items():
        name = names.tensor(key.removeprefix(PEFT_PREFIX))
        info = infos.get(name, stored if name in tied else None)
        if info is None or info.shape != tuple(t.shape):
            raise InputError(
                f"the adapter holds {key} {tuple(t.shape)}, which matches no tensor of {where}; "
                "the adapter belongs to a different model"
            )
        replaced[name] = t
    return replaced


def _merge_shard(sf: SafetensorsFile, dest: Path, targets, merged, replaced, added, bar) -> None:
    """Write one shard; ``added`` (new tensor -> the stored tensor it follows, and takes its
    shape, dtype and, unless ``replaced`` holds it, values from) are written after that one."""
    after = {i.name: [n for n, src in added.items() if src == i.name] for i in sf.tensors.values()}
    entries = [
        (name, i.dtype, i.shape) for i in sf.tensors.values() for name in [i.name, *after[i.name]]
    ]
    meta = {**sf.metadata, "format": sf.metadata.get("format", "pt")}
    with StreamingWriter(dest, entries, meta) as w:
        run: list[TensorInfo] = []  # consecutive untouched tensors, copied in one go
        for info in sf.tensors.values():
            if info.name not in targets and info.name not in replaced and not after[info.name]:
                run.append(info)
                continue
            w.copy(run)
            bar.update(sum(i.nbytes for i in run))
            run = []
            W = read_tensor(info)
            if info.name in replaced:
                w.write(info.name, replaced[info.name].to(W.dtype))
            else:
                w.write(info.name, merged(info, W) if info.name in targets else W)
            for name in after[info.name]:  # W is the tied weight's original value
                w.write(name, replaced[name].to(W.dtype) if name in replaced else W)
            bar.update(info.nbytes)
        w.copy(run)
        bar.update(sum(i.nbytes for i in run))


def _tied_weights(ck: Checkpoint, ad: LoraAdapter) -> list[str]:
    """The weights tied together in the base model (input and output embedding, where
    config.json's tie_word_embeddings ties them) when the adapter saves one of them whole
    (modules_to_save); else []. Found in the model transformers builds from config.json, on
    the meta device, only where the adapter saves modules and the config may tie them."""
    saved = {key.removeprefix(PEFT_PREFIX) for key in ad.extra}
    if not saved or CONFIG_NAME not in ck.extra_files:
        return []
    config = ck.read_json(CONFIG_NAME)
    if not isinstance(config, dict) or not _may_tie(config):
        return []
    try:
        tied = tied_to_input_embedding(ck.root, config)
    except Exception as exc:  # transformers missing, or unable to build the model
        raise InputError(
            f"{ck.root / CONFIG_NAME} may tie the input and output embeddings, and the adapter "
            "saves whole modules (modules_to_save); transformers cannot build this model "
            f"({type(exc).__name__}) to tell whether those are tied, so the merge could come "
            "out wrong: merge with PEFT (merge_and_unload), or with a transformers that "
            "builds this model"
        ) from None
    return tied if len(tied) > 1 and saved & set(tied) else []


def _may_tie(config: dict) -> bool:
    """Whether config.json may tie the embeddings: tie_word_embeddings true at the top level
    or in text_config (multimodal configs), or in neither (the model's default decides)."""
    values = [c.get(_TIE) for c in (config, config.get("text_config")) if isinstance(c, dict)]
    return True in values or all(v is None for v in values)


def _untie(
    infos: dict[str, TensorInfo], tied: list[str], replaced: dict[str, torch.Tensor]
) -> tuple[dict[str, str], bool]:
    """The tied weights OUT must add (each -> the stored one it takes shape, dtype and shard
    from), and whether OUT must untie them; drops redundant copies from ``replaced``.

    PEFT trains a module it saves as a copy, which the weights tied to it do not follow: they
    keep the original weight, unless ensure_weight_tying ties the copies too, and then the
    adapter holds each of them, all equal. Equal copies replace what the base stores, and the
    weights stay tied. Otherwise, as PEFT's merge_and_unload, OUT unties them: every one
    stored, the adapter's copy or the original weight, and tie_word_embeddings false.
    """
    if not tied:
        return {}, False
    stored = next(n for n in tied if n in infos)  # _match_extra found one for the adapter's
    dtype = dtype_to_torch(infos[stored].dtype)
    copies = [replaced.get(n) for n in tied]
    if all(c is not None and torch.equal(c.to(dtype), copies[0].to(dtype)) for c in copies):
        for n in tied:
            if n not in infos:
                del replaced[n]
        return {}, False
    return {n: stored for n in tied if n not in infos}, True


def _with_added(index: dict, added: dict[str, str], infos: dict[str, TensorInfo]) -> dict:
    """The index with each added tensor in the shard of the tensor it follows."""
    if not added:
        return index  # same dtypes, so the same total_size
    index = copy.deepcopy(index)
    meta = index.get("metadata")
    for name, src in added.items():
        index["weight_map"][name] = index["weight_map"][src]
        if isinstance(meta, dict) and isinstance(meta.get("total_size"), int):
            meta["total_size"] += infos[src].nbytes
    return index


def _untied_config(config: dict) -> dict:
    """config.json with tie_word_embeddings false, at the top level and in text_config."""
    config = copy.deepcopy(config)
    for c in (config, config.get("text_config")):
        if isinstance(c, dict):
            c[_TIE] = False
    return config


def _merged(info: TensorInfo, W: torch.Tensor, *, targets, twice) -> torch.Tensor:
    """``W + s B @ A`` in W's dtype, summed in fp32 (fp64 for fp64); an error where the sum
    overflows that dtype, or where W already holds the update (:func:`_holds_update`)."""
    work = torch.float64 if W.dtype == torch.float64 else torch.float32
    delta, rank = targets[info.name]
    Ww, D = W.to(work), delta(work)
    merged = Ww + D
    if _holds_update(Ww, D, merged, rank):
        raise twice(info.name)
    del Ww, D
    merged = merged.to(W.dtype)
    if not all_finite(merged) and all_finite(W):
        raise InputError(
            f"{info.name}: merging the adapter gives values beyond the range of "
            f"{info.dtype} (the base's dtype); the adapter's update is too large for "
            "it (check its lora_alpha), or merge into a float32 copy of the base"
        )
    return merged


# ---------------------------------------------------------------------------------------------
# verify


@dataclass
class TensorCheck:
    """One tensor's verdict. ``ratio``: worst |W_res + s B A - W| over its allowed rounding
    error (targets; <= 1 passes), 0 or inf for byte comparisons. ``rel``: relative Frobenius
    error of the reconstruction (targets)."""

    name: str
    kind: str  # "target" | "copy"
    shape: tuple[int, ...]
    dtype: str
    ok: bool
    ratio: float = 0.0
    rel: float = 0.0
    note: str = ""


@dataclass
class VerifyResult:
    rows: list[TensorCheck] = field(default_factory=list)
    hint: str = ""  # why the failures may be the report's, not the tensors'

    @property
    def passed(self) -> bool:
        return all(r.ok for r in self.rows)

    @property
    def failures(self) -> list[TensorCheck]:
        return [r for r in self.rows if not r.ok]

    def worst(self) -> TensorCheck | None:
        pool = self.failures or [r for r in self.rows if r.kind == "target"]
        return max(pool, key=lambda r: r.ratio, default=None)


def verify(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    adapter: str | os.PathLike | None = None,
    quiet: bool = True,
) -> VerifyResult:
    """Check a decompose output ``out`` against its source ``src``, one tensor at a time.

    For each adapted weight, ``W_res + s B @ A`` (fp64) must equal ``W`` within what the
    pipeline's arithmetic allows: half an ulp of the stored residual (its final rounding) plus
    the working-precision error of ``W - s B @ A``, ``(r + 2) (u (|W| + s |B| |A|) + t / 2)``
    elementwise (u = 2^-24, t = 2^-149 the subnormal spacing, in fp32; 2^-53 and 2^-1074 in
    fp64). The working precision is the source's: fp64 only for an fp64 source, so a residual
    stored wider than fp32 (``--residual-dtype fp64`` from an fp32/bf16/fp16 source) is checked
    to fp32 accuracy, which is all it has. Every other tensor must be byte-identical, and both
    checkpoints must hold the same tensor names, shapes and (for non-targets) dtypes.

    A quantized residual (``--quantize``) is checked by :func:`_check_quantized` instead.
    """
    src_ck, out_ck = Checkpoint.open(Path(src)), Checkpoint.open(Path(out))
    if adapter is None and not (Path(out) / ADAPTER_DIR).is_dir():
        raise InputError(
            f"{out} has no {ADAPTER_DIR}/, so it is no decompose output (verify checks one "
            f"against its source: a merged model is not one); pass --adapter if its adapter "
            "was moved"
        )
    ad = LoraAdapter.load(Path(adapter) if adapter else Path(out) / ADAPTER_DIR, "adapter")
    src_infos = {t.name: t for t in src_ck.tensors()}
    out_infos = {t.name: t for t in out_ck.tensors()}
    quantized = _quantized_rows(Path(out))
    names = checkpoint_names(src_ck)
    targets = {names.tensor(f"{m}.weight"): m for m in ad.modules}
    result = VerifyResult()
    for name in sorted(set(targets) - set(src_infos)):
        result.rows.append(TensorCheck(name, "target", (), "", False, math.inf, note="not in SRC"))
    for name in sorted(set(out_infos) - set(src_infos)):
        i = out_infos[name]
        result.rows.append(
            TensorCheck(name, "copy", i.shape, i.dtype, False, math.inf, note="not in SRC")
        )
    bar = progress(src_ck.total_bytes, "verify", quiet)
    for name, s in src_infos.items():
        o = out_infos.get(name)
        kind = "target" if name in targets else "copy"
        if o is None:
            row = TensorCheck(name, kind, s.shape, s.dtype, False, math.inf, note="missing in OUT")
        elif o.shape != s.shape:
            row = TensorCheck(
                name, kind, s.shape, s.dtype, False, math.inf, note=f"OUT has shape {o.shape}"
            )
        elif kind == "target":
            if name in quantized:
                row = _check_quantized(s, o, ad, targets[name], quantized[name])
            else:
                row = _check_target(s, o, ad, targets[name])
                if not row.ok and not result.hint and not quantized:
                    result.hint = _quantized_hint(o, ad.fan_in_fan_out)
        else:
            row = _check_copy(s, o)
        result.rows.append(row)
        bar.update(s.nbytes)
    bar.close()
    for key, t in ad.extra.items():  # a task head (modules_to_save): PEFT loads it from here
        name = names.tensor(key.removeprefix(PEFT_PREFIX))
        s = src_infos.get(name)
        same = s is not None and s.shape == tuple(t.shape) and torch.equal(read_tensor(s), t)
        note = "" if same else f"differs from SRC's {name}" if s else "matches no tensor of SRC"
        result.rows.append(
            TensorCheck(
                key, "copy", tuple(t.shape), str(t.dtype), same, 0 if same else math.inf, note=note
            )
        )
    residual = next((out_infos[n].dtype for n in targets if n in out_infos), None)
    result.rows += _check_configs(src_ck.root, out_ck.root, ad, residual)
    return result


# init_lora_weights that make PEFT change the base weights when it builds the LoRA layers, before
# loading the saved A and B: on a residual model they would subtract the principal part again.
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq")


def _check_configs(
    src: Path, out: Path, ad: LoraAdapter, residual: str | None
) -> list[TensorCheck]:
    """What loading OUT as a model and the adapter with PEFT reads besides the weights: the
    adapter must not re-initialize its base, and OUT's config.json is SRC's, but for a dtype
    naming the stored residual's where that is wider (decompose's ``_retag_config``)."""
    rows = []

    def fail(name: str, note: str) -> None:
        rows.append(TensorCheck(name, "config", (), "", False, math.inf, note=note))

    init = ad.config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        fail(
            str(ad.root / ADAPTER_CONFIG),
            f"init_lora_weights is {init!r}: PEFT would change the residual when it loads the "
            "adapter; decompose writes true",
        )
    have = [(root / CONFIG_NAME).is_file() for root in (src, out)]
    if have == [True, False]:
        fail(str(out / CONFIG_NAME), "missing in OUT")
    if not all(have):
        return rows
    want, got = (read_json(root / CONFIG_NAME, "config") for root in (src, out))
    keys = ("dtype", "torch_dtype")
    stored = dtype_to_torch(residual) if residual in FLOAT_DTYPES else None
    for k in keys:
        named = getattr(torch, str(want.get(k)), None)
        wider = (
            str(stored).removeprefix("torch.")
            if stored and isinstance(named, torch.dtype) and stored.itemsize > named.itemsize
            else None
        )
        if k in got and got.get(k) not in (want.get(k), wider):
            fail(str(out / CONFIG_NAME), f"{k} is {got.get(k)!r}, SRC's is {want.get(k)!r}")
    if {k: v for k, v in want.items() if k not in keys} != {
        k: v for k, v in got.items() if k not in keys
    }:
        fail(str(out / CONFIG_NAME), "differs from SRC's config.json")
    return rows


def _quantized_hint(o: TensorInfo, fan_in_fan_out: bool) -> str:
    """For a residual that failed the plain check with no quantization record: whether it is
    a quantizer's fixed point, i.e. a --quantize output checked without its report."""
    from .quant import _fake_quantize

    R = read_tensor(o)
    if o.dtype not in FLOAT_DTYPES or R.ndim != 2 or not all_finite(R):
        return ""
    R = R.mT.contiguous() if fan_in_fan_out else R
    for scheme in ("nf4", "int8"):
        if torch.equal(_fake_quantize(R, scheme), R):
            return (
                f"{o.name} is an {scheme} fixed point: OUT looks like a decompose --quantize "
                f"output checked without its {REPORT_FILE}; restore the report from that run"
            )
    return ""


def _quantized_rows(out: Path) -> dict[str, dict]:
    """For a QPiSSA output (decompose --quantize): tensor name -> what its residual is checked
    against, from the report's records: ``scheme``, ``norm``, ``want`` (the recorded error),
    ``scales_moved`` and ``fp32_sums`` (see :func:`_check_quantized`). A report that cannot be
    read, or whose records are broken, is bad input: it decides how OUT is checked."""
    path = out / REPORT_FILE
    report = _report(out)
    if not report and path.exists():
        raise InputError(
            f"{path} is not a readable decompose report; restore it from the decompose run "
            "(a --quantize output is checked against it), or remove it to check OUT as plain "
            "PiSSA"
        )
    if not report.get("quantize"):
        return {}
    # Reports without "error_sums" summed each error in one fp32 reduction.
    fp32_sums = "error_sums" not in report
    rows = {}
    for r in report.get("matrices") or []:
        if not isinstance(r, dict) or "quantization" not in r:
            continue
        name, check = r.get("name"), quantized_check(r["quantization"], fp32_sums)
        if check is None or not isinstance(name, str):
            raise InputError(
                f"{path}: the quantization record of {name!r} is incomplete or corrupt; "
                "restore the report from the decompose run, or rerun decompose"
            )
        rows[name] = check
    return rows


def quantized_check(q, fp32_sums: bool = False) -> dict | None:
    """What :func:`_check_quantized` checks a residual against, from its quantization record
    ``q`` (a report's, or a resumed run's): ``scheme``, ``norm``, ``want`` (the recorded
    error), ``scales_moved`` (an older record, of the scored residual, not the stored one)
    and ``fp32_sums`` (the record's error was summed in one fp32 reduction). None for a
    record without a known scheme or a finite error."""
    want = _recorded_error(q) if isinstance(q, dict) else None
    if want is None or q.get("scheme") not in ("nf4", "int8"):
        return None
    return {
        "scheme": q["scheme"],
        "norm": q.get("norm"),
        "want": want,
        "scales_moved": "stored_error" not in q,
        "fp32_sums": fp32_sums,
    }


def _recorded_error(q: dict) -> float | None:
    """The error decompose recorded for the stored residual: ``stored_error``; in older
    reports the chosen candidate's, ``best_error``, or before refits were scored
    ``errors[best_iter - 1]``. None where the record has no such finite number."""
    if "stored_error" in q:
        value = q["stored_error"]
    elif "best_error" in q:
        value = q["best_error"]
    else:
        errors, t = q.get("errors"), q.get("best_iter")
        ok = isinstance(errors, list) and isinstance(t, int) and 1 <= t <= len(errors)
        value = errors[t - 1] if ok else None
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return float(value) if number and math.isfinite(value) and value >= 0 else None


def _check_quantized(s: TensorInfo, o: TensorInfo, ad, module: str, record: dict) -> TensorCheck:
    """A QPiSSA residual is not W - s B@A: it is that, quantized. It must be a fixed point of
    the quantizer (what a 4/8-bit loader stores is then exactly it), and its error
    ||W - (deq(Q(W_res)) + s B@A)||_F must be the one decompose chose and recorded.

    Both are checked in the orientation bitsandbytes quantizes: nn.Linear's (out, in) weight,
    which for a Conv1D weight (``fan_in_fan_out``, stored (in, out)) is its transpose, as
    transformers transposes it before quantizing (and decompose quantized it so).
    """
    from .quant import _fake_quantize, quantized_row_blocks

    scheme = record["scheme"]
    row = TensorCheck(s.name, "target", s.shape, f"{s.dtype}->{o.dtype} {scheme}", True)
    W, R = read_tensor(s), read_tensor(o)
    if ad.fan_in_fan_out:
        W, R = W.mT, R.mT
    work = torch.float64 if W.dtype == torch.float64 else torch.float32
    B, A = ad.B[module].to(work) * ad.scaling(module), ad.A[module].to(work)
    scales_moved = record["scales_moved"]
    # An older decompose took its errors with one fp32 reduction over the whole matrix, which
    # drifts by more than the tolerance below (4.5e-3 at 14336 x 4096): the same for those.
    legacy_sum = record["fp32_sums"] and work == torch.float32
    whole = torch.empty(W.shape, dtype=work) if legacy_sum else None
    rows, cols = W.shape
    # Row blocks that start on a quantization block (NF4 blocks run over the row-major
    # flattening, int8 scales are per row), so each dequantizes as within the whole matrix:
    # a few blocks' temporaries, not several matrices (a 405B projection is 3.5 GB in fp32).
    err_sq = w_sq = v_sq = inner = block = 0.0
    for lo, hi in quantized_row_blocks(rows, cols, scheme, _CHUNK_ELEMENTS // max(cols, 1)):
        Rc = R[lo:hi].contiguous()
        if not all_finite(Rc):
            row.ok, row.ratio, row.note = False, math.inf, "non-finite values in the residual"
            return row
        # deq(Q(R)) in fp32: what a loader dequantizes (R itself, but not rounded to R's dtype).
        V = _fake_quantize(Rc, scheme, dtype=torch.float32)
        if not torch.equal(V.to(R.dtype), Rc):
            row.ok, row.ratio, row.note = False, math.inf, f"not a {scheme} fixed point"
            if scheme == "int8" and record["fp32_sums"] and o.dtype in ("F32", "F64"):
                row.note += (
                    " (written by an older pissa-svd, whose int8 skipped the fp16 cast that "
                    "bitsandbytes' 8-bit loading makes: rerun decompose)"
                )
            return row
        Wc, D = W[lo:hi].to(work), B[lo:hi] @ A
        E = (Wc - V.to(work)).sub_(D)
        if not scales_moved:
            # Where the adapter captures a row (nearly) whole, its residual is rounding noise,
            # which verify's own W - s B@A does not reproduce bit for bit: that much is allowed.
            noise = (
                (A.shape[0] + 2) * torch.finfo(work).eps * float(Wc.abs().amax() + D.abs().amax())
            )
            block = max(block, _block_error(E, V, scheme, noise))
        del D
        err_sq += float(sum_squares(E))
        w_sq += float(sum_squares(Wc.double()))
        v_sq += float(sum_squares(V.double()))
        if scales_moved:
            inner += _block_inner(E, V, scheme)
        if whole is not None:
            whole[lo:hi] = E
    err = math.sqrt(err_sq) if whole is None else float(torch.linalg.matrix_norm(whole))
    del whole
    # 0.1% of the recorded error for the arithmetic (fp32 sums, GEMMs done differently), with a
    # floor of a few rounding units of the operands for a matrix the adapter captures almost
    # whole (an error near 1e-8 ||W||).
    w_norm = math.sqrt(w_sq)
    floor = 4 * torch.finfo(work).eps * (w_norm + math.sqrt(v_sq))
    want = record["want"]
    slack = 1e-3 * want + floor
    if scales_moved:  # older reports: the scored error, which the stored scales may move
        slack += _scale_slack(inner, v_sq, R.numel(), scheme, dtype_to_torch(o.dtype), err + want)
    row.ratio = abs(err - want) / (slack + 1e-12)  # <= 1 passes
    row.rel = err / max(w_norm, 1e-30)
    row.ok = record["norm"] != "fro" or row.ratio <= 1.0
    if block > _BLOCK_ERROR_LIMIT[scheme]:  # names what changed more closely than the total
        row.ok, row.ratio = False, math.inf
        row.note = (
            f"a quantization block is off by {block:.2f} of its scale (a changed, zeroed or "
            f"swapped block; at most {_BLOCK_ERROR_LIMIT[scheme]} for a {scheme} residual)"
        )
    elif not row.ok:
        row.note = f"quantization error {err:.4g}, decompose recorded {want:.4g}"
    return row


# The largest error of one element of a quantization block (NF4: 64 values; int8: a row) over
# the block's scale, for the residual W - s B@A against the stored one: NF4's widest gap between
# levels is 0.30 of the scale, so rounding errs by at most 0.15, int8's by 1/254; the refitted
# adapter decompose may keep moves that a little (measured on all 210 projections of SmolLM2:
# at most 0.172 for nf4 at rank 16, 0.204 at rank 64 with one round, 0.018 for int8; 0.015 on
# two 2048-wide Llama layers, int8 at rank 64). A block changed, zeroed or swapped with another
# is off by about its whole scale.
_BLOCK_ERROR_LIMIT = {"nf4": 0.6, "int8": 0.25}


def _block_error(E: torch.Tensor, V: torch.Tensor, scheme: str, noise: float) -> float:
    """max over the quantization blocks of ``E``'s rows (whole blocks: the rows start on one) of
    max |E| / max(|V|, |V + E|) within the block, where V is the stored residual and V + E the
    one the adapter implies; errors up to ``noise`` (arithmetic rounding) count as none."""
    e, v = _quant_blocks(E, scheme), _quant_blocks(V.to(E.dtype), scheme)
    scale = torch.maximum(v.abs().amax(-1), (v + e).abs().amax(-1))
    off = (e.abs().amax(-1) - noise).clamp_min(0) / scale.clamp_min(torch.finfo(e.dtype).tiny)
    return float(off.max())


def _block_inner(E: torch.Tensor, V: torch.Tensor, scheme: str) -> float:
    """sum_b |<E_b, V_b>| over the quantization blocks b of a row block (see _scale_slack)."""
    e, v = _quant_blocks(E.double(), scheme), _quant_blocks(V.double(), scheme)
    return float((e * v).sum(dim=1).abs().sum())


def _quant_blocks(x: torch.Tensor, scheme: str) -> torch.Tensor:
    """A row block's quantization blocks, one per row of the result: NF4 blocks of 64 over the
    row-major flattening (the last one short, padded with zeros, which change no block's sum
    or largest magnitude), int8 rows."""
    from .quant import NF4_BLOCKSIZE

    if scheme != "nf4":
        return x
    pad = -x.numel() % NF4_BLOCKSIZE
    return torch.nn.functional.pad(x.reshape(-1), (0, pad)).view(-1, NF4_BLOCKSIZE)


def _scale_slack(
    inner: float, v_sq: float, numel: int, scheme: str, res: torch.dtype, e_sum: float
) -> float:
    """How far the recorded error may be from ``||E||_F``, E = W - V - s B@A, V = deq(Q(R)).

    Decompose scored Q = deq(Q(W_res)) in fp32, then stored R, Q rounded to the residual dtype
    and re-quantized (quant._settle). Q and V hold the same codes, but each block's (NF4) or
    row's (int8) scale a may have become a' = a (1 + g), |g| <= rho: rounded to a bf16/fp16
    residual (half an ulp of it, rho += u_res), and for int8 lowered by the scale's fixed-point
    iteration (at most 64 steps of at most 1.5 fp32 ulps). With V_b a block of V and E_b of
    E, the recorded error's square is ``||E + sum_b g_b V_b||^2``, so

        |e_rec^2 - ||E||^2| <= 2 rho sum_b |<E_b, V_b>| + rho^2 ||V||^2,

    and |e_rec - ||E||| is that over e_rec + ||E|| (``e_sum``). E is nearly orthogonal to each
    block's values, so this is far tighter than rho ||V||, the triangle inequality's bound: a
    changed adapter or residual still fails. (A scale rounded to a subnormal adds at most half
    the residual dtype's subnormal spacing per value.)

    ``inner``: sum_b |<E_b, V_b>| (:func:`_block_inner`); ``v_sq``: ||V||^2; ``numel``: V's.
    """
    fi = torch.finfo(res)
    rho = fi.eps / 2 if fi.bits < 32 else 0.0
    if scheme == "int8":
        rho += 64 * 1.5 * 2.0**-23
    if rho == 0.0:
        return 0.0
    sq = 2 * rho * inner + rho**2 * v_sq
    return sq / max(e_sum, 1e-30) + math.sqrt(numel) * fi.tiny * fi.eps / 2


def _check_copy(s: TensorInfo, o: TensorInfo) -> TensorCheck:
    row = TensorCheck(s.name, "copy", s.shape, s.dtype, True)
    if o.dtype != s.dtype:
        row.ok, row.ratio, row.note = False, math.inf, f"OUT has dtype {o.dtype}"
    elif not _same_bytes(s, o):
        row.ok, row.ratio, row.note = False, math.inf, "bytes differ"
    return row


def _same_bytes(a: TensorInfo, b: TensorInfo, chunk: int = 16 << 20) -> bool:
    with open(a.path, "rb", buffering=0) as fa, open(b.path, "rb", buffering=0) as fb:
        for off in range(0, a.nbytes, chunk):
            n = min(chunk, a.nbytes - off)
            if os.pread(fa.fileno(), n, a.begin + off) != os.pread(fb.fileno(), n, b.begin + off):
                return False
    return True


def _check_target(s: TensorInfo, o: TensorInfo, ad: LoraAdapter, module: str) -> TensorCheck:
    row = TensorCheck(s.name, "target", s.shape, f"{s.dtype}->{o.dtype}", True)
    expected = ad.stored_shape(module)
    if s.shape != expected:
        row.ok, row.ratio, row.note = False, math.inf, f"adapter expects {expected}"
        return row
    if s.dtype not in FLOAT_DTYPES or o.dtype not in FLOAT_DTYPES:
        row.ok, row.ratio, row.note = False, math.inf, "not a float tensor"
        return row
    d = torch.float64
    scale = ad.scaling(module)
    # In the stored layout: D = L @ Rt, with (L, Rt) = (s B, A), or (s A^T, B^T) when stored
    # transposed; |L| @ |Rt| bounds the magnitudes the working-precision GEMM summed.
    B, A = ad.B[module].to(d) * scale, ad.A[module].to(d)
    L, Rt = (A.mT, B.mT) if ad.fan_in_fan_out else (B, A)
    # The pipeline computes in fp32 unless the source is fp64, whatever the residual dtype: a
    # wider (fp64) residual holds the fp32 result unrounded, accurate to fp32 only.
    work = torch.finfo(torch.float64 if s.dtype == "F64" else torch.float32)
    work_bound = (ad.rank(module) + 2) * (work.eps / 2)
    # Below the normal range the working precision's errors are absolute: at most half its
    # subnormal spacing per operation.
    work_floor = (ad.rank(module) + 2) * (work.tiny * work.eps / 2)
    res_dtype = dtype_to_torch(o.dtype)
    eps, tiny = torch.finfo(res_dtype).eps, torch.finfo(res_dtype).tiny
    W_all, R_all = read_tensor(s), read_tensor(o)
    worst, err_sq, ref_sq = 0.0, 0.0, 0.0
    rows = max(1, _CHUNK_ELEMENTS // max(1, s.shape[1]))
    for i0 in range(0, s.shape[0], rows):
        sl = slice(i0, i0 + rows)
        W, R = W_all[sl].to(d), R_all[sl].to(d)
        err = (R + L[sl] @ Rt - W).abs()
        _, e = torch.frexp(R)  # |R| = m 2^e, m in [0.5, 1): one ulp is eps 2^(e-1)
        # Half an ulp of each stored residual value; the subnormal spacing floors it (and is
        # the whole allowance where R rounded to 0).
        half_ulp = torch.ldexp(torch.full_like(R, eps / 2), e - 1).clamp_min(tiny * eps / 2)
        half_ulp = torch.where(R == 0, tiny * eps / 2, half_ulp)
        allowed = half_ulp + work_floor + work_bound * (W.abs() + L[sl].abs() @ Rt.abs())
        ratio = float((err / allowed).max())
        worst = max(worst, ratio if math.isfinite(ratio) else math.inf)  # NaN, inf: fail
        err_sq += float((err * err).sum())
        ref_sq += float((W * W).sum())
    row.ratio = worst
    row.rel = math.sqrt(err_sq / ref_sq) if ref_sq > 0 else math.sqrt(err_sq)
    row.ok = worst <= 1.0
    if not math.isfinite(worst):
        row.note = "non-finite values (NaN or inf) in the residual or the adapter"
    elif not row.ok:
        row.note = f"error {worst:.3g}x the rounding bound"
    return row
