"""Every architecture transformers can build with token input: decompose, load, compare at step 0.

For each model type in the installed transformers, a tiny random model is built from its
default config with the sizes shrunk (hidden 64, 2 layers, 4 heads, ...; a vision-language
model's text and vision configs too), as an image-text-to-text model, causal LM,
sequence-to-sequence LM or masked LM, whichever builds and runs on ``input_ids``. Then:

1. ``decompose`` with the default targets at rank 2;
2. if it refuses with an ``--exclude`` hint (a load-check refusal), once more with that hint;
3. ``PeftModel.from_pretrained`` on the residual with ``pissa_init``: PEFT must load every
   tensor of the adapter and find one for every LoRA weight; the logits, and each LoRA layer's
   residual + update (the vision tower's too, which text input does not reach), must match the
   original model's within 1e-4 relative; and ``verify`` must pass.

Each type is one line of the output: OK, HINT-OK (OK after the hint), MISMATCH (step 0 differs:
a silent wrong model), LOADFAIL (PEFT cannot load the adapter), REFUSED (decompose stopped,
with its message), CRASH, SKIP (the type does not build, run, or save at this size, or
transformers' own ``save_pretrained``/``from_pretrained`` does not give the model back) or
TIMEOUT.

    python bench/arch_sweep.py --out bench/results/arch_sweep.tsv [--procs 2] [--types a b]
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import io
import json
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

SHRINK = dict(
    hidden_size=64, d_model=64, n_embd=64, dim=64, num_hidden_layers=2, n_layer=2, n_layers=2,
    num_layers=2, encoder_layers=2, decoder_layers=2, num_attention_heads=4, n_head=4, n_heads=4,
    encoder_attention_heads=4, decoder_attention_heads=4, intermediate_size=96, ffn_dim=96,
    encoder_ffn_dim=96, decoder_ffn_dim=96, d_ff=96, hidden_dim=96, n_inner=96,
    num_key_value_heads=2, head_dim=16, d_kv=16, max_position_embeddings=64, n_positions=64,
    moe_intermediate_size=32, num_experts=4, num_local_experts=4, n_routed_experts=4,
    embedding_size=64, num_experts_per_tok=2, kv_lora_rank=16, q_lora_rank=16,
    qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, vocab_size=128,
)  # fmt: skip


class _Timeout(Exception):
    pass


def _alarm(*_):
    raise _Timeout


VISION = dict(
    hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_layers=2, depth=2,
    num_attention_heads=2, num_heads=2, embed_dim=32, image_size=32, patch_size=8,
    out_hidden_size=64,
)  # fmt: skip
MROPE = [None, [2, 3, 3], [1, 1, 2]]  # multimodal rotary sections: none, head_dim 16, 8


def _shrunk(config: dict, mrope: list[int] | None) -> dict:
    """``config`` (a default config's dict) with its sizes, and its sub-configs' (text, vision,
    audio), shrunk: the keywords to build the tiny model's config from."""
    out = {k: SHRINK[k] for k in config if k in SHRINK}
    for k, v in config.items():
        if isinstance(v, dict) and k.endswith("_config") and "model_type" in v:
            layers = next((v[n] for n in ("num_hidden_layers", "depth") if n in v), None)
            v = {n: x for n, x in v.items() if not _per_layer(x, layers)}
            if "vision" in k or "audio" in k:  # per-layer settings dropped: rebuilt to size
                out[k] = {**v, **{s: n for s, n in VISION.items() if s in v}}
            else:
                out[k] = {**v, **_shrunk(v, mrope)}
                if mrope and isinstance(v.get("rope_parameters"), dict):
                    out[k]["rope_parameters"] = {**v["rope_parameters"], "mrope_section": mrope}
        elif k.endswith("token_id") and isinstance(v, int) and v >= SHRINK["vocab_size"]:
            out[k] = 3  # a special token's id past the shrunk vocabulary
    return out


def _per_layer(value, layers: int | None) -> bool:
    """Whether a config value holds one entry per layer (a list, or a dict by layer index)."""
    if isinstance(value, dict):
        return bool(value) and all(str(k).isdigit() for k in value)
    return isinstance(value, list) and len(value) == layers


def _build(model_type: str):
    """A tiny random model of ``model_type``: a vision-language model as one (it runs on text
    alone), else a causal LM, sequence-to-sequence LM or masked LM."""
    import torch
    import transformers as T

    cls = T.CONFIG_MAPPING[model_type]
    defaults = cls().to_dict()
    autos = [T.AutoModelForCausalLM, T.AutoModelForSeq2SeqLM, T.AutoModelForMaskedLM]
    if "vision_config" in defaults:
        autos.insert(0, T.AutoModelForImageTextToText)
    for mrope in MROPE:
        try:
            config = cls(**_shrunk(defaults, mrope))
        except Exception:
            continue
        for auto in autos:
            try:
                model = auto.from_config(config).float().eval()
                with torch.no_grad():  # runs on input_ids: else built wrong (mrope), or no use
                    model(**_inputs(model))
                return model
            except _Timeout:
                raise
            except Exception:
                continue
    return None


def _inputs(model) -> dict:
    import torch

    vocab = getattr(model.config, "vocab_size", None) or 100
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, max(6, min(vocab, 100)), (1, 8), generator=g)
    inputs = {"input_ids": ids}
    if getattr(model.config, "is_encoder_decoder", False):
        inputs["decoder_input_ids"] = ids[:, :4]
    return inputs


def one(model_type: str, work: Path) -> str:
    import torch
    from peft import PeftModel

    from pissa_svd import InputError, decompose
    from pissa_svd.convert import verify

    model = _build(model_type)
    if model is None:
        return "SKIP\tbuild"
    inputs = _inputs(model)
    try:
        with torch.no_grad():
            want = model(**inputs).logits
        src, out = work / model_type, work / f"{model_type}_out"
        model.save_pretrained(src)
    except _Timeout:
        raise
    except Exception:
        return "SKIP\tforward or save"
    try:  # the control: transformers' own save and load must give the model back
        with torch.no_grad():
            again = type(model).from_pretrained(src).eval()(**inputs).logits
        same = bool((again - want).abs().max() <= 1e-4 * want.abs().max())
    except _Timeout:
        raise
    except Exception:
        same = False
    if not same:
        return "SKIP\tround trip (from_pretrained does not load the saved model back)"
    tag = ""
    try:
        decompose(src, out, rank=2, quiet=True)
    except InputError as exc:
        hint = re.findall(r"--exclude '(.+?)'", str(exc))
        if str(exc).startswith("disk full"):
            return "SKIP\tdisk full"
        if not hint or "would" not in str(exc):
            return f"REFUSED\t{exc}"
        tag = "HINT-"
        shutil.rmtree(out, ignore_errors=True)
        try:
            decompose(src, out, rank=2, exclude=hint, quiet=True)
        except InputError as again:
            return f"REFUSED\tafter the hint {hint}: {again}"
    except _Timeout:
        raise
    except OSError as exc:  # the library raises the OSError (the command line prints one line)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return "SKIP\tdisk full"
        return f"CRASH\t{type(exc).__name__}: {exc}"
    except Exception as exc:
        return f"CRASH\t{type(exc).__name__}: {exc}"
    try:
        loaded = PeftModel.from_pretrained(type(model).from_pretrained(out), out / "pissa_init")
        with torch.no_grad():
            got = loaded.eval()(**inputs).logits
        layer = _worst_layer(loaded, model)
        unloaded = _not_loaded(loaded, out / "pissa_init")
    except _Timeout:
        raise
    except Exception as exc:
        return f"LOADFAIL\t{type(exc).__name__}: {exc}"
    if unloaded:
        return f"LOADFAIL\t{len(unloaded)} adapter keys not loaded, e.g. {unloaded[0]}"
    rel = float((got - want).abs().max() / want.abs().max())
    passed = verify(src, out).passed
    targets = len(
        json.loads((out / "pissa_init/adapter_config.json").read_text())["target_modules"]
    )
    ok = rel < 1e-4 and layer < 1e-4 and passed
    return (
        f"{tag}{'OK' if ok else 'MISMATCH'}\trel={rel:.1e} layer={layer:.1e} verify={passed} "
        f"targets={targets}"
    )


def _not_loaded(peft_model, adapter: Path) -> list[str]:
    """The adapter's keys that PEFT leaves out on loading, and the LoRA weights it finds none for
    (``from_pretrained`` warns of the second kind only, and not of the first)."""
    result = peft_model.load_adapter(adapter, adapter_name="again")
    return sorted([*result.unexpected_keys, *result.missing_keys])


def _worst_layer(peft_model, model) -> float:
    """The largest relative difference, over the LoRA layers, between residual + update and the
    original weight: step 0 layer by layer, the vision tower's too (the logits read text only)."""
    import torch

    original = dict(model.named_modules())
    worst = 0.0
    for name, module in peft_model.named_modules():
        if "default" not in getattr(module, "lora_A", {}):
            continue
        param = getattr(module, "parameter_name", "weight")  # a fused experts' parameter
        with torch.no_grad():
            merged = getattr(module.get_base_layer(), param) + module.get_delta_weight("default")
        name = name.removeprefix("base_model.model.").replace(".base_layer", "")
        want = getattr(original[name], param)
        worst = max(worst, float((merged - want).abs().max() / want.abs().max()))
    return worst


def worker(types: list[str], out: Path, timeout: int) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (12 << 30, 12 << 30))  # a default-sized model: SKIP
    warnings.filterwarnings("ignore")
    import transformers

    transformers.logging.set_verbosity_error()
    signal.signal(signal.SIGALRM, _alarm)
    with tempfile.TemporaryDirectory() as tmp, out.open("a") as f:
        for t in types:
            work = Path(tmp) / t
            work.mkdir()
            signal.alarm(timeout)
            try:
                with (
                    contextlib.redirect_stdout(io.StringIO()),
                    contextlib.redirect_stderr(io.StringIO()),
                ):
                    line = one(t, work)
            except _Timeout:
                line = "TIMEOUT"
            except MemoryError:
                line = "SKIP\tmemory"
            except BaseException as exc:  # noqa: BLE001 - one bad type must not end the sweep
                line = f"SKIP\t{type(exc).__name__}"
            signal.alarm(0)
            shutil.rmtree(work, ignore_errors=True)
            f.write(f"{t}\t{' '.join(line.splitlines())[:300]}\n")
            f.flush()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="TSV: type, outcome, detail")
    p.add_argument("--procs", type=int, default=2)
    p.add_argument("--timeout", type=int, default=90, help="seconds per type")
    p.add_argument("--types", nargs="*", help="model types (default: every one)")
    p.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.types:
        types = args.types
    else:
        from transformers import CONFIG_MAPPING

        types = sorted(CONFIG_MAPPING.keys())
    if args.worker is not None:
        worker(
            types[args.worker :: args.procs], args.out.with_suffix(f".{args.worker}"), args.timeout
        )
        return
    parts = [args.out.with_suffix(f".{i}") for i in range(args.procs)]
    for part in parts:
        part.unlink(missing_ok=True)
    base = [sys.executable, __file__, "--out", str(args.out), "--procs", str(args.procs)]
    base += ["--timeout", str(args.timeout), "--types", *types]
    procs = [subprocess.Popen([*base, "--worker", str(i)]) for i in range(args.procs)]
    for proc in procs:
        proc.wait()
    lines = sorted(line for part in parts for line in part.read_text().splitlines())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    for part in parts:
        part.unlink()
    counts: dict[str, int] = {}
    for line in lines:
        counts[line.split("\t")[1]] = counts.get(line.split("\t")[1], 0) + 1
    print(" ".join(f"{k}={v}" for k, v in sorted(counts.items())), f"(of {len(lines)} types)")


if __name__ == "__main__":
    main()
