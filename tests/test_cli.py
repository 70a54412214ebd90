"""The command line: bad input is one line on stderr with exit 2, and nothing half-written survives."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from .conftest import PYTHON, tiny_llama_model


@pytest.fixture
def ckpt(tiny_llama, tmp_path) -> Path:
    """A private, mutable copy of the tiny sharded Llama."""
    return Path(shutil.copytree(tiny_llama, tmp_path / "ckpt"))


def leftovers(parent: Path) -> list[str]:
    return sorted(
        p.name
        for p in parent.iterdir()
        if ".tmp-" in p.name or ".old-" in p.name or p.name.endswith(".partial")
    )


def screen_lines(stderr: str) -> list[str]:
    """The non-blank lines a terminal would show: a carriage return (a progress bar's redraw,
    or its erasure) overwrites the line it is on."""
    shown = (line.rsplit("\r", 1)[-1] for line in stderr.split("\n"))
    return [line for line in shown if line.strip()]


def assert_bad_input(run_cli, args, match, out: Path):
    code, stdout, stderr = run_cli(*args)
    assert code == 2, (code, stderr)
    lines = screen_lines(stderr)
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    assert match in lines[0], lines[0]
    assert not out.exists()
    assert leftovers(out.parent) == []


def _shards(ckpt: Path) -> list[Path]:
    return sorted(ckpt.glob("model-*.safetensors"))


def _index(ckpt: Path) -> Path:
    return ckpt / "model.safetensors.index.json"


def _rewrite_weight_map(ckpt: Path, fn) -> None:
    index = json.loads(_index(ckpt).read_text())
    name = next(iter(index["weight_map"]))
    index["weight_map"][name] = fn(index["weight_map"][name])
    _index(ckpt).write_text(json.dumps(index))


def _set_header(path: Path, header: dict) -> None:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])


def _header(path: Path) -> dict:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n])


def _mutations():
    def missing_src(ck):
        return ck / "nope", "no such file"

    def no_safetensors(ck):
        for p in ck.glob("*.safetensors*"):
            p.unlink()
        return ck, "no model.safetensors"

    def missing_shard(ck):
        _shards(ck)[1].unlink()
        return ck, "does not exist"

    def truncated(ck):
        s = _shards(ck)[0]
        s.write_bytes(s.read_bytes()[:-100])
        return ck, "truncated"

    def corrupt_header(ck):
        s = _shards(ck)[0]
        data = bytearray(s.read_bytes())
        data[8:12] = b"\xff\xfe{{"
        s.write_bytes(bytes(data))
        return ck, "corrupt header"

    def oversized_header(ck):
        s = _shards(ck)[0]
        s.write_bytes(struct.pack("<Q", 1 << 40) + s.read_bytes()[8:])
        return ck, "header claims"

    def overlapping_offsets(ck):
        s = _shards(ck)[0]
        h = _header(s)
        names = [k for k in h if k != "__metadata__"]
        b = h[names[1]]["data_offsets"]
        h[names[1]]["data_offsets"] = [b[0] - 4, b[1] - 4]
        _set_header(s, h)
        return ck, "overlaps"

    def out_of_range_offsets(ck):
        s = _shards(ck)[0]
        h = _header(s)
        last = max((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][1])
        b = h[last]["data_offsets"]
        h[last]["data_offsets"] = [b[0] + 64, b[1] + 64]
        _set_header(s, h)
        return ck, "unaccounted bytes"

    def dotdot_shard(ck):
        _rewrite_weight_map(ck, lambda s: f"../{s}")
        return ck, "outside the checkpoint"

    def absolute_shard(ck):
        _rewrite_weight_map(ck, lambda s: str((ck / s).resolve()))
        return ck, "outside the checkpoint"

    def unsupported_dtype(ck):
        s = next(p for p in _shards(ck) if any(k.endswith("q_proj.weight") for k in _header(p)))
        h = _header(s)
        name = next(k for k in h if k.endswith("q_proj.weight"))
        b = h[name]["data_offsets"]
        n = (b[1] - b[0]) // 4
        h[name]["dtype"], h[name]["shape"] = "F8_E4M3", [n // 64, 64 * 4]
        _set_header(s, h)
        return ck, f"tensor '{name}'"

    def nested_header(ck):
        s = _shards(ck)[0]
        data = s.read_bytes()
        (n,) = struct.unpack("<Q", data[:8])
        raw = b"[" * 100_000 + b"]" * 100_000  # valid JSON, too deep for the parser
        s.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])
        return ck, "nested too deeply"

    def config_not_an_object(ck):
        (ck / "config.json").write_text("[1, 2]")
        return ck, "expected a JSON object"

    def index_metadata_not_an_object(ck):
        index = json.loads(_index(ck).read_text())
        index["metadata"] = "total"
        _index(ck).write_text(json.dumps(index))
        return ck, "metadata is not an object"

    def nul_in_shard_name(ck):
        _rewrite_weight_map(ck, lambda s: s + "\0.x")
        return ck, "NUL byte"

    return {f.__name__: f for f in (
        missing_src, no_safetensors, missing_shard, truncated, corrupt_header, oversized_header,
        overlapping_offsets, out_of_range_offsets, dotdot_shard, absolute_shard, unsupported_dtype,
        nested_header, config_not_an_object, index_metadata_not_an_object, nul_in_shard_name,
    )}  # fmt: skip


MUTATIONS = _mutations()


@pytest.mark.parametrize("case", list(MUTATIONS))
def test_bad_checkpoint(case, ckpt, tmp_path, run_cli):
    src, match = MUTATIONS[case](ckpt)
    out = tmp_path / "out"
    assert_bad_input(run_cli, ["decompose", src, "--rank", "4", "--out", out], match, out)


def _saved_quantized(path: Path, method: str) -> Path:
    """A tiny Llama saved as a quantized checkpoint: bitsandbytes 4-bit (saved by transformers),
    FP8 with 128x128 block scales (DeepSeek-V3's layout) or GPTQ (packed int32)."""
    import transformers

    model = tiny_llama_model()
    if method == "bitsandbytes":
        model.save_pretrained(path / "fp32")
        bnb = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
        quantized = transformers.AutoModelForCausalLM.from_pretrained(
            path / "fp32", quantization_config=bnb
        )
        quantized.save_pretrained(path / method)
        return path / method
    state, config = {}, model.config.to_dict()
    for name, W in model.state_dict().items():
        base = name.removesuffix("weight")
        if not name.endswith("proj.weight"):
            state[name] = W
        elif method == "fp8":
            state[name] = W.to(torch.float8_e4m3fn)
            state[base + "weight_scale_inv"] = torch.ones(-(-W.shape[0] // 128), 1)
        else:
            state[base + "qweight"] = torch.zeros(W.shape[1] // 8, W.shape[0], dtype=torch.int32)
            state[base + "scales"] = torch.ones(1, W.shape[0], dtype=torch.float16)
    config["quantization_config"] = {"quant_method": method, "bits": 8 if method == "fp8" else 4}
    (path / method).mkdir(parents=True)
    save_file(state, path / method / "model.safetensors", metadata={"format": "pt"})
    (path / method / "config.json").write_text(json.dumps(config))
    return path / method


@pytest.mark.parametrize(
    "method, stored",
    [("bitsandbytes", "as U8"), ("fp8", "proj.weight as F8_E4M3"), ("gptq", "qweight as I32")],
)
def test_a_quantized_checkpoint_is_refused_naming_its_method(
    method, stored, tmp_path, run_cli, capsys
):
    """PiSSA splits full-precision weights: a checkpoint saved quantized is refused up front,
    naming the method and a stored tensor, not taken for one without targets (GPTQ) or refused
    at one tensor with an --exclude hint that cannot help (FP8, bitsandbytes)."""
    src, out = _saved_quantized(tmp_path, method), tmp_path / "out"
    capsys.readouterr()  # transformers' progress bars while saving
    args = ["decompose", src, "--rank", "4", "--out", out]
    assert_bad_input(run_cli, args, f"was saved quantized ({method}", out)
    code, _, err = run_cli(*args, "--dry-run")
    assert code == 2 and stored in err and "original bf16/fp16 checkpoint" in err, err


def test_a_quantization_config_over_float_weights_decomposes(tmp_path, run_cli):
    """A quantization_config applied when loading (the stored weights are float) is no
    obstacle: the checkpoint decomposes."""
    src, out = tmp_path / "src", tmp_path / "out"
    tiny_llama_model().save_pretrained(src)
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (src / "config.json").write_text(json.dumps(config))
    code, _, err = run_cli("decompose", src, "--rank", "4", "--out", out, "--quiet")
    assert code == 0, err
    assert (out / "pissa_init" / "adapter_model.safetensors").is_file()


def test_huge_weights_decompose_and_verify(tmp_path, run_cli):
    """Weights ~1e20 overflow the fp32 Gram matrices of the power iteration: the SVD redoes
    them scaled by a power of two, so they decompose, and verify passes."""
    model = tiny_llama_model()
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight.mul_(1e20)
    src = tmp_path / "src"
    model.save_pretrained(src)
    out = tmp_path / "out"
    code, _, err = run_cli("decompose", src, "--rank", "4", "--out", out, "--method", "krylov2")
    assert code == 0, err
    code, stdout, err = run_cli("verify", src, out)
    assert code == 0 and "PASS" in stdout, stdout + err


def test_svd_failing_is_bad_input(tmp_path, run_cli, monkeypatch):
    """An SVD that fails all the same: one line naming the tensor and what to try, not a
    traceback, and no OUT."""
    from pissa_svd import pipeline

    def fail(*args, **kwargs):
        raise torch.linalg.LinAlgError("linalg.cholesky: The factorization could not be completed")

    model = tiny_llama_model()
    src = tmp_path / "src"
    model.save_pretrained(src)
    monkeypatch.setattr(pipeline, "svd_lowrank", fail)
    out = tmp_path / "out"
    code, _, err = run_cli("decompose", src, "--rank", "4", "--out", out, "--method", "krylov2")
    errors = [line for line in screen_lines(err) if line.startswith("pissa-svd")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
    assert "the SVD of 'model.layers." in errors[0] and ".weight' (in a batch of " in errors[0]
    assert "--method exact" in errors[0] and "a norm of" in errors[0]
    assert not out.exists()


@pytest.mark.parametrize("bad_value", [float("nan"), float("-inf")])
def test_non_finite_weight_is_bad_input(ckpt, tmp_path, run_cli, bad_value):
    """Named before its SVD runs, on the only line left on the screen (the progress bar is
    erased). Nothing is kept: fixing it changes the source or the targets, which --resume
    would refuse anyway."""
    s = _shards(ckpt)[0]
    name = next(k for k in _header(s) if k.endswith("v_proj.weight"))
    data = bytearray(s.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    begin = 8 + n + _header(s)[name]["data_offsets"][0] + 4 * 5
    data[begin : begin + 4] = struct.pack("<f", bad_value)  # the tiny Llama is fp32
    s.write_bytes(bytes(data))
    out = tmp_path / "out"
    code, _, err = run_cli("decompose", ckpt, "--rank", "4", "--out", out)
    errors = screen_lines(err)
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
    assert errors[0].startswith("pissa-svd: error: ")
    assert f"tensor '{name}' in {s.name} holds NaN or inf values" in errors[0]
    assert "kept" not in errors[0] and not out.exists() and leftovers(tmp_path) == []


def test_residual_overflowing_its_dtype_is_bad_input(tmp_path, run_cli):
    """An fp16 weight near fp16's limit whose top-1 component leaves -2 x 60000 on the
    diagonal: the residual cannot be stored in fp16. One line naming the tensor and the fix,
    no OUT (before the check it was written full of inf, exit 0)."""
    model = tiny_llama_model(dtype=torch.float16)
    q = model.model.layers[0].self_attn.q_proj.weight
    with torch.no_grad():
        q.fill_(60000.0)
        q.fill_diagonal_(-60000.0)
    src = tmp_path / "src"
    model.save_pretrained(src)
    out = tmp_path / "out"
    code, _, err = run_cli("decompose", src, "--rank", "1", "--out", out)
    errors = [line for line in screen_lines(err) if not line.startswith("Writing model")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
    assert "the residual of 'model.layers.0.self_attn.q_proj.weight' does not fit in F16" in err
    assert "--residual-dtype bf16 or fp32" in err and not out.exists()
    code, _, err = run_cli("decompose", src, "--rank", "1", "--out", out, "--quantize", "nf4")
    errors = [line for line in screen_lines(err) if not line.startswith("Writing model")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
    assert "'model.layers.0.self_attn.q_proj.weight': the quantized residual does not fit" in err
    assert "--resume" not in err and not out.exists()  # the same options fail the same way
    code, _, err = run_cli(
        "decompose", src, "--rank", "1", "--out", out, "--residual-dtype", "fp32", "--quiet"
    )
    assert code == 0 and out.is_dir(), err


def test_non_finite_weights_of_one_batch_are_all_named(ckpt, tmp_path, run_cli):
    """Same-shape tensors are read as one batch: every bad one in it is named at once, not
    one per rerun."""
    s = _shards(ckpt)[0]
    header = _header(s)
    names = [k for k in header if k.endswith(("k_proj.weight", "v_proj.weight"))][:2]
    assert header[names[0]]["shape"] == header[names[1]]["shape"]  # one batch
    data = bytearray(s.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    for name in names:
        begin = 8 + n + header[name]["data_offsets"][0]
        data[begin : begin + 4] = struct.pack("<f", float("nan"))
    s.write_bytes(bytes(data))
    code, _, err = run_cli("decompose", ckpt, "--rank", "4", "--out", tmp_path / "out")
    errors = screen_lines(err)
    assert code == 2 and len(errors) == 1, err
    listed = ", ".join(repr(name) for name in sorted(names))
    assert f"2 tensors hold ({listed}) NaN or inf values" in errors[0], errors[0]
    assert "leave them out with --exclude" in errors[0]


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--rank", "0"], "--rank must be a positive integer"),
        (["--rank", "-3"], "--rank must be a positive integer"),
        # k_proj and v_proj are 32 x 64 in each of 3 layers: all counted at once, with the bound
        (["--rank", "33"], "larger than 6 target(s) allow, down to tensor"),
        (["--rank", "33"], "lower --rank to 32 or leave them out with --exclude"),
        (["--rank", "4", "--targets", "nothing_like_this"], "matched no 2-D weight"),
        (["--rank", "4", "--targets", "lm_head", "embed"], "which are never targets"),
        (["--rank", "4", "--targets", "("], "not a valid regex"),
        (["--rank", "4", "--residual-dtype", "int4"], "--residual-dtype must be one of"),
        (
            ["--rank", "4", "--device", "cuda"]
            if not torch.cuda.is_available()
            else ["--rank", "4", "--device", "tpu"],
            "--device",
        ),
        (["--rank", "four"], "invalid int value"),
        (["--rank", "4", "--frobnicate"], "(see pissa-svd decompose --help)"),
        (["--rank", "4", "--alpha", "1e-300"], "overflows in F32 at --alpha 1e-300"),
        # fp16 zeros and subnormals: an exact model, but an adapter with nothing left in it
        (["--rank", "4", "--alpha", "1e14", "--adapter-dtype", "fp16"], "underflows ("),
        (["--rank", "4", "--alpha", "1e-300", "--quantize", "nf4"], "overflows in F32 at --alpha"),
        # fp32 factors in range, but their product below fp32's precision: a wrong residual
        (["--rank", "4", "--alpha", "1e37", "--adapter-dtype", "fp32"], "its product B @ A"),
        (
            ["--rank", "4", "--alpha", "1e14", "--adapter-dtype", "fp16", "--quantize", "int8"],
            "underflows (",
        ),
        (["--rank", "4", "--processes", "4"], "--processes only sizes a --dry-run plan"),
        (["--rank", "4", "--quant-iters", "2"], "add --quantize nf4 or int8"),
    ],
)
def test_bad_options(extra, match, ckpt, tmp_path, run_cli):
    out = tmp_path / "out"
    assert_bad_input(run_cli, ["decompose", ckpt, "--out", out, *extra], match, out)


def test_out_exists_needs_overwrite(ckpt, tmp_path, run_cli):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    (out / "config.json").write_text("{}")  # an earlier output, say
    (out / "model.safetensors").write_bytes(b"")
    code, _, err = run_cli("decompose", ckpt, "--rank", "4", "--out", out)
    assert code == 2 and "already exists" in err and len(screen_lines(err)) == 1
    assert (out / "keep.txt").read_text() == "user data"
    code, _, _ = run_cli("decompose", ckpt, "--rank", "4", "--out", out, "--overwrite", "--quiet")
    assert code == 0
    assert not (out / "keep.txt").exists() and (out / "pissa_init").is_dir()
    assert leftovers(tmp_path) == []


def test_overwrite_only_replaces_an_earlier_output(ckpt, tmp_path, run_cli):
    """--out models --overwrite, where models/ holds other models and notes: refused, nothing
    touched. An empty folder or a model/adapter folder may be replaced."""
    out = tmp_path / "models"
    (out / "other_model").mkdir(parents=True)
    (out / "other_model" / "config.json").write_text("{}")
    (out / "notes.txt").write_text("user data")
    args = ("decompose", ckpt, "--rank", "4", "--out", out, "--overwrite", "--quiet")
    code, _, err = run_cli(*args)
    assert code == 2 and len(screen_lines(err)) == 1 and "does not look like one" in err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "other_model"]
    # A folder that looks like a model but holds another model's weights in a subfolder.
    (out / "config.json").write_text("{}")
    (out / "other_model" / "model.safetensors").write_bytes(b"")
    code, _, err = run_cli(*args)
    assert code == 2 and "does not look like one" in err
    assert (out / "other_model" / "model.safetensors").exists()
    # Another model deeper down (a user's training checkpoints saved inside an earlier output),
    # or only a config.json and other files at the top (a home folder): refused too.
    (out / "other_model" / "model.safetensors").unlink()
    deep = out / "training" / "checkpoint-250"
    deep.mkdir(parents=True)
    (deep / "adapter_model.safetensors").write_bytes(b"")
    (out / "model.safetensors").write_bytes(b"")
    code, _, err = run_cli(*args)
    assert code == 2 and "does not look like one" in err and deep.is_dir()
    for p in (out / "model.safetensors", deep / "adapter_model.safetensors"):
        p.unlink()
    code, _, err = run_cli(*args)
    assert code == 2 and "does not look like one" in err
    assert (out / "notes.txt").read_text() == "user data"
    # An adapter saved under an earlier output's own pissa_init/ (PEFT: one folder per name).
    mine = tmp_path / "earlier"
    assert run_cli("decompose", ckpt, "--rank", "4", "--out", mine, "--quiet")[0] == 0
    (mine / "pissa_init" / "run1").mkdir()
    (mine / "pissa_init" / "run1" / "adapter_model.safetensors").write_bytes(b"")
    code, _, err = run_cli("decompose", ckpt, "--rank", "4", "--out", mine, "--overwrite")
    assert code == 2 and "does not look like one" in err
    assert (mine / "pissa_init" / "run1" / "adapter_model.safetensors").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_cli("decompose", ckpt, "--rank", "4", "--out", empty, "--overwrite")[0] == 0
    # An earlier decompose output (with its pissa_init adapter) is replaced.
    assert run_cli("decompose", ckpt, "--rank", "4", "--out", empty, "--overwrite")[0] == 0


def test_overwrite_does_not_replace_a_link(ckpt, tmp_path, run_cli):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    args = ("decompose", ckpt, "--rank", "4", "--out", tmp_path / "link", "--overwrite")
    code, _, err = run_cli(*args)
    assert code == 2 and "is a link; --overwrite does not replace links" in err
    assert (tmp_path / "link").is_symlink() and (tmp_path / "real").is_dir()


@pytest.mark.parametrize("where", [".", "..", "file/out"])
def test_out_that_cannot_be_a_new_folder(ckpt, tmp_path, run_cli, monkeypatch, where):
    work = tmp_path / "work"
    work.mkdir()
    (work / "file").write_text("user data")
    monkeypatch.chdir(work)
    code, _, err = run_cli("decompose", ckpt, "--rank", "4", "--out", where, "--overwrite")
    assert code == 2 and len(screen_lines(err)) == 1 and "Traceback" not in err
    assert ("is a file, not a folder" if "/" in where else "the current folder") in err
    assert sorted(p.name for p in work.iterdir()) == ["file"]
    assert (work / "file").read_text() == "user data" and leftovers(tmp_path) == []


def test_out_in_a_folder_we_cannot_write(ckpt, tmp_path, run_cli, monkeypatch):
    from pissa_svd import output

    locked = tmp_path / "locked"
    locked.mkdir()
    real = os.access
    monkeypatch.setattr(
        output.os, "access", lambda p, mode: False if Path(p) == locked else real(p, mode)
    )  # a permission check that root, who runs CI containers, would pass
    code, _, err = run_cli("decompose", ckpt, "--rank", "4", "--out", locked / "sub" / "out")
    assert code == 2 and len(screen_lines(err)) == 1 and "cannot write in" in err, err
    assert list(locked.iterdir()) == []  # checked before anything was created


def test_file_system_errors_are_one_line(ckpt, tmp_path, run_cli, monkeypatch):
    """An OSError from the file system (here: a side file that cannot be copied) is one line,
    exit 2, and says what was kept for --resume."""
    from pissa_svd import pipeline

    def refuse(src_root, names, dest_root):
        raise PermissionError(errno.EACCES, "Permission denied", str(src_root / names[0]))

    monkeypatch.setattr(pipeline, "copy_files", refuse)
    out = tmp_path / "out"
    code, _, err = run_cli("decompose", ckpt, "--rank", "4", "--out", out)
    lines = screen_lines(err)  # the progress bar was erased before the error
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert "Permission denied; check its permissions" in lines[0]
    assert "21 finished tensors kept" in lines[0] and "--resume" in lines[0]
    assert not out.exists()
    monkeypatch.undo()
    code, _, _ = run_cli("decompose", ckpt, "--rank", "4", "--out", out, "--resume", "--quiet")
    assert code == 0 and (out / "pissa_init").is_dir() and leftovers(tmp_path) == []


def test_failure_after_the_last_tensor_leaves_nothing_behind(ckpt, tmp_path, run_cli, monkeypatch):
    """OUT appears while the finished staging folder (its progress record already gone) is
    being renamed into place: the folder is still ours to remove, and the next run is clean."""
    from pissa_svd import pipeline

    out = tmp_path / "out"
    real = pipeline.move_into_place

    def racing(tmp, dest, overwrite):
        dest.mkdir()  # another process got there first
        return real(tmp, dest, overwrite)

    monkeypatch.setattr(pipeline, "move_into_place", racing)
    code, _, err = run_cli("decompose", ckpt, "--rank", "4", "--out", out, "--quiet")
    assert code == 2 and "appeared during the run" in err and leftovers(tmp_path) == [], err
    monkeypatch.undo()
    out.rmdir()
    code, _, err = run_cli("decompose", ckpt, "--rank", "4", "--out", out, "--quiet")
    assert code == 0 and err == "" and (out / "pissa_init").is_dir()


def test_decompose_removes_a_killed_merges_temporary_folder(ckpt, tmp_path, run_cli):
    from pissa_svd.output import STAGED_MARK

    left = tmp_path / ".out.tmp-killed"
    left.mkdir()
    (left / STAGED_MARK).touch()
    code, _, err = run_cli("decompose", ckpt, "--rank", "4", "--out", tmp_path / "out")
    assert code == 0 and f"removed {left}, left by an interrupted run" in err
    assert not left.exists()


def test_out_that_appears_during_the_run(ckpt, tmp_path, run_cli, monkeypatch):
    """What --overwrite may replace is checked again at the end: a user's folder that appeared
    at OUT meanwhile is left alone, and the finished work is kept for --resume."""
    from pissa_svd import pipeline

    out = tmp_path / "out"
    real = pipeline._write_all

    def then_a_user_writes_out(*args):
        report = real(*args)
        (out / "thesis").mkdir(parents=True)
        (out / "thesis" / "ch1.tex").write_text("user data")
        return report

    monkeypatch.setattr(pipeline, "_write_all", then_a_user_writes_out)
    for extra, says in (
        ("--overwrite", "no longer looks like an earlier output"),
        (None, "appeared"),
    ):
        args = ("decompose", ckpt, "--rank", "4", "--out", out, "--quiet")
        code, _, err = run_cli(*args, *([extra] if extra else []))
        assert code == 2 and says in err and len(screen_lines(err)) == 1, err
        assert "21 finished tensors kept" in err and "--resume" in err
        assert (out / "thesis" / "ch1.tex").read_text() == "user data"
        shutil.rmtree(out)
    monkeypatch.undo()
    code, _, err = run_cli("decompose", ckpt, "--rank", "4", "--out", out, "--resume", "--quiet")
    assert code == 0 and (out / "pissa_init").is_dir() and leftovers(tmp_path) == [], err


@pytest.mark.parametrize("kind", ["folder", "file", "symlink"])
def test_a_users_staging_namesake_is_never_removed(ckpt, tmp_path, run_cli, kind):
    staging = tmp_path / ".out.partial"
    if kind == "folder":
        staging.mkdir()
        (staging / "notes.txt").write_text("user data")
    elif kind == "file":
        staging.write_text("user data")
    else:
        (tmp_path / "mine").mkdir()
        staging.symlink_to(tmp_path / "mine")
    for extra in ([], ["--resume"]):
        code, _, err = run_cli("decompose", ckpt, "--rank", "4", "--out", tmp_path / "out", *extra)
        assert code == 2 and len(screen_lines(err)) == 1, err
        assert "not an interrupted" in err or "no interrupted run" in err
    if kind == "folder":
        assert (staging / "notes.txt").read_text() == "user data"
    elif kind == "file":
        assert staging.read_text() == "user data"
    else:
        assert staging.is_symlink() and (tmp_path / "mine").is_dir()
    assert not (tmp_path / "out").exists()


def test_out_inside_src(ckpt, run_cli):
    out = ckpt / "pissa"
    assert_bad_input(
        run_cli, ["decompose", ckpt, "--rank", "4", "--out", out], "inside the source", out
    )


def test_overwrite_never_deletes_the_source(ckpt, run_cli):
    code, _, err = run_cli(
        "decompose",
        ckpt / "model-00001-of-00004.safetensors",
        "--rank",
        "4",
        "--out",
        ckpt,
        "--overwrite",
    )
    assert code == 2 and "contains the source" in err
    assert _index(ckpt).exists()


def test_dry_run_writes_nothing(ckpt, tmp_path, run_cli):
    out = tmp_path / "out"
    code, stdout, _ = run_cli("decompose", ckpt, "--rank", "8", "--out", out, "--dry-run")
    assert code == 0
    assert "21 matrices" in stdout and "GFLOP" in stdout and "peak" in stdout
    assert "q_proj" in stdout and "64 x 64" in stdout
    assert "21 matrices in" in stdout and "calls" in stdout  # the batching line
    assert "overlapped" in stdout and "O_DIRECT" in stdout  # the default on CPU
    assert not out.exists() and leftovers(tmp_path) == []
    code, stdout, _ = run_cli(
        "decompose", ckpt, "--rank", "8", "--out", out, "--dry-run", "--overlap", "off"
    )
    assert code == 0 and "sequential (--overlap off)" in stdout


def test_targets_matching_a_head_say_it_is_not_adapted(ckpt, tmp_path, run_cli):
    """lm_head is never a target: --targets that also match it say so, rather than drop it
    without a word. --quiet keeps it quiet."""
    out = tmp_path / "out"
    args = ["decompose", ckpt, "--rank", "4", "--targets", "(q_proj|lm_head)", "--out", out]
    code, _, err = run_cli(*args, "--dry-run")
    assert code == 0
    assert "--targets also matches lm_head: embeddings and output heads are never targets" in err
    code, _, err = run_cli(*args, "--dry-run", "--exclude", "lm_head")
    assert code == 0 and "also matches" not in err
    code, _, err = run_cli(*args, "--dry-run", "--quiet")
    assert code == 0 and "also matches" not in err


def test_an_empty_target_says_exclude_it(tmp_path, run_cli):
    """A 0 x 64 q_proj allows no rank at all: the message says to leave it out, and how."""
    from safetensors.torch import save_file

    from .conftest import tiny_llama_model

    src = tmp_path / "src"
    src.mkdir()
    tensors = {k: v.contiguous() for k, v in tiny_llama_model().state_dict().items()}
    tensors["model.layers.1.self_attn.q_proj.weight"] = torch.zeros(0, 64)
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    args = ["decompose", src, "--rank", "4", "--out", out]
    assert_bad_input(run_cli, args, "is empty (0 x 64): there is nothing to decompose", out)
    code, _, err = run_cli(*args)
    exclude = err.split("--exclude (e.g. --exclude ")[1].rstrip().rstrip(")").strip("'")
    code, _, err = run_cli(*args, "--exclude", exclude, "--quiet")
    assert code == 0, err


@pytest.mark.parametrize("residual_dtype", [None, "fp64", "bf16"])
def test_dry_run_disk_figure_is_what_the_run_writes(ckpt, tmp_path, run_cli, residual_dtype):
    """The residual's size follows --residual-dtype (fp64 doubles the targets' bytes of this
    fp32 checkpoint, bf16 halves them); it is the index's total_size the run writes."""
    from pissa_svd.output import human

    out = tmp_path / "out"
    args = ["decompose", ckpt, "--rank", "8", "--out", out, "--quiet"]
    args += ["--residual-dtype", residual_dtype] if residual_dtype else []
    code, stdout, _ = run_cli(*args, "--dry-run")
    assert code == 0
    assert run_cli(*args)[0] == 0
    written = json.loads((out / "model.safetensors.index.json").read_text())
    total = written["metadata"]["total_size"]
    assert f"disk         residual {human(total)}," in stdout
    source = json.loads((ckpt / "model.safetensors.index.json").read_text())
    grew = {None: 1, "fp64": 2, "bf16": 0.5}[residual_dtype]
    assert (total > source["metadata"]["total_size"]) == (grew > 1)


@pytest.mark.parametrize("overlap", ["off", "on"])
def test_disk_full_is_one_line(ckpt, tmp_path, run_cli, monkeypatch, overlap):
    from pissa_svd import checkpoint

    real = checkpoint._pwrite_all

    def full(fd, mv, offset):
        if offset > 0:  # the headers (at offset 0) fit; the first tensor written does not
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, mv, offset)

    monkeypatch.setattr(checkpoint, "_pwrite_all", full)
    out = tmp_path / "out"
    args = ["decompose", ckpt, "--rank", "4", "--out", out, "--overlap", overlap]
    assert_bad_input(run_cli, args, "disk full", out)


def test_success_summary(ckpt, tmp_path, run_cli):
    code, stdout, stderr = run_cli("decompose", ckpt, "--rank", "4", "--out", tmp_path / "out")
    assert code == 0
    assert "21 matrices decomposed" in stdout and "pissa_init" in stdout
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o777 & ~umask
    assert "tensors 21/21" in stderr  # the progress bar


def test_subprocess_success_keeps_its_output(ckpt, tmp_path):
    """The entry point ends with os._exit (no interpreter teardown): what it printed must still
    arrive, through a pipe too, and the exit code and the output folder must be intact."""
    out = tmp_path / "out"
    cmd = [PYTHON, "-m", "pissa_svd", "decompose", ckpt, "--rank", "4", "--out", out]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "21 matrices decomposed" in proc.stdout and proc.stdout.endswith("\n")
    assert json.loads((out / "pissa_report.json").read_text())["totals"]["matrices"] == 21


def test_subprocess_bad_input_has_no_traceback(tmp_path):
    proc = subprocess.run(
        [
            PYTHON,
            "-m",
            "pissa_svd",
            "decompose",
            tmp_path / "missing",
            "--rank",
            "4",
            "--out",
            tmp_path / "o",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "no such file" in proc.stderr


@pytest.fixture
def slow_ckpt(tmp_path) -> Path:
    """Enough work (24 exact SVDs of 768 x 768) to interrupt a run midway."""
    root = tmp_path / "slow"
    root.mkdir()
    g = torch.Generator().manual_seed(0)
    weight_map = {}
    for s in range(6):
        shard = f"model-{s + 1:05d}-of-00006.safetensors"
        tensors = {
            f"layers.{4 * s + i}.mlp.up_proj.weight": torch.randn(768, 768, generator=g)
            for i in range(4)
        }
        save_file(tensors, root / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, shard))
    _index(root).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return root


def _start(src: Path, out: Path, *extra: str) -> subprocess.Popen:
    cmd = [
        PYTHON,
        "-m",
        "pissa_svd",
        "decompose",
        src,
        "--rank",
        "8",
        "--method",
        "exact",
        "--out",
        out,
        *extra,
    ]
    # SIGINT as a terminal delivers it, even where the suite runs in the background (a shell
    # starts background jobs with SIGINT ignored, and the child would inherit that).
    return subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def _wait_for_partial_output(parent: Path, proc: subprocess.Popen, tensors: int = 3) -> None:
    """Until the run's journal records ``tensors`` finished tensors (of 24)."""
    journal = parent / ".out.partial" / ".pissa_progress" / "rank-0.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline:
        if journal.exists() and journal.read_text().count("\n") >= tensors:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError("the run never got midway")


def _decompose_cli(src: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [PYTHON, "-m", "pissa_svd", "decompose", src, "--rank", "8", "--method", "exact"]
    return subprocess.run([*cmd, "--out", out, *extra], capture_output=True, text=True)


@pytest.mark.parametrize("overlap", ["off", "on"])
def test_killed_run_leaves_no_out_and_resumes_to_the_same_bytes(slow_ckpt, tmp_path, overlap):
    out = tmp_path / "out"
    proc = _start(slow_ckpt, out, "--overlap", overlap)
    _wait_for_partial_output(tmp_path, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()  # only the hidden staging folder remains
    assert leftovers(tmp_path) == [".out.partial"]

    proc = _decompose_cli(slow_ckpt, out, "--resume", "--quiet")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "pissa_report.json").read_text())
    assert 3 <= report["totals"]["resumed"] < 24 and report["totals"]["matrices"] == 24
    assert leftovers(tmp_path) == [] and not (out / ".pissa_progress").exists()

    clean = tmp_path / "clean"
    assert _decompose_cli(slow_ckpt, clean, "--quiet").returncode == 0
    names = sorted(p.name for p in clean.rglob("*.safetensors"))
    assert names == sorted(p.name for p in out.rglob("*.safetensors")) and len(names) == 7
    for p in clean.rglob("*.safetensors"):
        assert p.read_bytes() == (out / p.relative_to(clean)).read_bytes(), p.name


def test_rerun_without_resume_starts_over(slow_ckpt, tmp_path):
    out = tmp_path / "out"
    proc = _start(slow_ckpt, out)
    _wait_for_partial_output(tmp_path, proc, tensors=1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc = _decompose_cli(slow_ckpt, out)
    assert proc.returncode == 0 and "starting over" in proc.stderr
    assert json.loads((out / "pissa_report.json").read_text())["totals"]["resumed"] == 0


def test_resume_refuses_other_options_or_nothing_to_resume(slow_ckpt, tmp_path):
    out = tmp_path / "out"
    proc = _decompose_cli(slow_ckpt, out, "--resume")
    assert proc.returncode == 2 and "no interrupted run" in proc.stderr
    proc = _start(slow_ckpt, out)
    _wait_for_partial_output(tmp_path, proc, tensors=1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc = _decompose_cli(slow_ckpt, out, "--resume", "--seed", "7")
    assert proc.returncode == 2 and "had other options;" in proc.stderr and not out.exists()
    assert "kept" not in proc.stderr  # one piece of advice, not "--resume" both ways
    assert (tmp_path / ".out.partial").is_dir()  # the interrupted run's work is still there


def _failed_run(ckpt: Path, out: Path, monkeypatch, after: int, **options) -> Path:
    """A run (rank 4, ``options``) that fails in its batch number ``after + 1`` (batch_memory
    0: one tensor per batch), leaving ``after`` finished tensors in its staging folder, which
    is returned."""
    from pissa_svd import pipeline
    from pissa_svd.pipeline import decompose

    real, calls = pipeline._decompose_batch, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) > after:
            raise RuntimeError("injected failure")
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "_decompose_batch", failing)
    with pytest.raises(RuntimeError, match="injected failure"):
        decompose(ckpt, out, rank=4, batch_memory=0, quiet=True, **options)
    monkeypatch.setattr(pipeline, "_decompose_batch", real)
    return out.parent / f".{out.name}.partial"


def test_dry_run_says_what_a_run_would_do_with_an_interrupted_one(
    ckpt, tmp_path, monkeypatch, run_cli
):
    """--dry-run names the finished tensors a plain run would discard, and with --resume makes
    the same checks as the run would (here: other options), changing nothing."""
    out = tmp_path / "out"
    staging = _failed_run(ckpt, out, monkeypatch, after=3)
    before = sorted(p.name for p in staging.rglob("*"))
    dry = ["decompose", ckpt, "--rank", "4", "--out", out, "--batch-memory", "0", "--dry-run"]
    code, stdout, _ = run_cli(*dry)
    assert code == 0 and "holds 3 finished tensors of an interrupted run" in stdout
    code, stdout, _ = run_cli(*dry, "--resume")
    assert code == 0 and "resume: 3 finished tensors" in stdout
    code, _, err = run_cli(*dry, "--resume", "--seed", "1")
    assert code == 2 and "had other options" in err and len(screen_lines(err)) == 1
    assert sorted(p.name for p in staging.rglob("*")) == before and not out.exists()


def _resume_args(ckpt, out):
    return ["decompose", ckpt, "--rank", "4", "--out", out, "--batch-memory", "0", "--resume"]


def test_resume_reuses_finished_qpissa_tensors(ckpt, tmp_path, monkeypatch, run_cli):
    """QPiSSA residuals are checked as verify checks them (a fixed point with the recorded
    error), not as W - s B@A, which they never are: before, --resume redid every one."""
    out, opts = tmp_path / "out", ["--rank", "4", "--quantize", "nf4", "--quant-iters", "1"]
    _failed_run(ckpt, out, monkeypatch, after=3, quantize="nf4", quant_iters=1)
    code, stdout, err = run_cli("decompose", ckpt, *opts, "--out", out, "--resume")
    assert code == 0, err
    assert json.loads((out / "pissa_report.json").read_text())["totals"]["resumed"] == 3
    # The summary says what this run did: not 21 matrices in the seconds 18 took.
    assert "21 matrices (18 decomposed now, 3 reused from the interrupted run) in" in stdout
    assert "over both runs" in stdout
    clean = tmp_path / "clean"
    assert run_cli("decompose", ckpt, *opts, "--out", clean, "--quiet")[0] == 0
    for f in [*clean.glob("*.safetensors"), *clean.glob("pissa_init/*.safetensors")]:
        assert (out / f.relative_to(clean)).read_bytes() == f.read_bytes(), f.name


@pytest.mark.parametrize("resuming", [False, True], ids=["start-over", "resume"])
def test_a_live_runs_staging_is_never_touched(ckpt, tmp_path, monkeypatch, run_cli, resuming):
    """A second run on the same --out while the first is still writing .OUT.partial (it holds
    the folder's lock) is refused in one line, and the first run's files stay as they are."""
    import os

    from pissa_svd import resume

    out = tmp_path / "out"
    staging = _failed_run(ckpt, out, monkeypatch, after=2)
    before = sorted(p.relative_to(staging) for p in staging.rglob("*"))
    fd = resume.lock(staging)  # as the live run holds it
    try:
        args = _resume_args(ckpt, out) if resuming else _resume_args(ckpt, out)[:-1]
        code, _, err = run_cli(*args, "--quiet")
    finally:
        os.close(fd)
    assert code == 2 and len(screen_lines(err)) == 1, err
    assert "in use by another pissa-svd run" in err and "kept" not in err
    assert sorted(p.relative_to(staging) for p in staging.rglob("*")) == before
    assert not out.exists()
    # Once the lock is gone (that run ended), the folder can be resumed as usual.
    code, _, err = run_cli(*_resume_args(ckpt, out), "--quiet")
    assert code == 0 and out.is_dir(), err


def test_resume_after_a_stop_while_creating_the_files(ckpt, tmp_path, monkeypatch, run_cli):
    """Killed after the staging folder was started, before every file existed: --resume
    creates the files again instead of tripping over the ones that were there."""
    out = tmp_path / "out"
    staging = _failed_run(ckpt, out, monkeypatch, after=2)
    (staging / ".pissa_progress" / "prepared").unlink()
    (staging / ".pissa_progress" / "rank-0.jsonl").unlink()
    code, _, err = run_cli(*_resume_args(ckpt, out), "--quiet")
    assert code == 0, err
    clean = tmp_path / "clean"
    assert run_cli("decompose", ckpt, "--rank", "4", "--out", clean, "--quiet")[0] == 0
    for f in clean.glob("*.safetensors"):
        assert (out / f.name).read_bytes() == f.read_bytes()


@pytest.mark.parametrize("damage", ["plan", "journal_line", "adapter"])
def test_resume_of_a_damaged_run_is_one_line(ckpt, tmp_path, monkeypatch, run_cli, damage):
    out = tmp_path / "out"
    staging = _failed_run(ckpt, out, monkeypatch, after=3)
    progress = staging / ".pissa_progress"
    if damage == "plan":
        (progress / "plan.json").write_text("{oops")
        match = "the record of the interrupted run in"
    elif damage == "journal_line":  # not a line this tool writes: what follows is not trusted
        lines = (progress / "rank-0.jsonl").read_text().splitlines()
        (progress / "rank-0.jsonl").write_text("\n".join([lines[0], "5", *lines[1:]]) + "\n")
        match = None
    else:
        (staging / "pissa_init" / "adapter_model.safetensors").write_bytes(b"\0" * 8)
        match = "is damaged"
    code, _, err = run_cli(*_resume_args(ckpt, out), "--quiet")
    if match is None:
        report = json.loads((out / "pissa_report.json").read_text())
        assert code == 0 and report["totals"]["resumed"] == 1, err  # the line before it
        return
    assert code == 2 and len(screen_lines(err)) == 1 and match in err, err
    assert "Traceback" not in err and not out.exists()


@pytest.fixture
def ten_shards(tmp_path) -> Path:
    """A tiny Llama in 10 shards, the last holding only lm_head (a copied tensor)."""
    path = tmp_path / "ten"
    model = tiny_llama_model(
        intermediate_size=128, num_hidden_layers=2, vocab_size=128, max_position_embeddings=64
    )
    model.save_pretrained(path, max_shard_size="50KB")
    return path


def _set_tensor_bytes(path: Path, name: str, fill: int) -> None:
    """Overwrite the first bytes of tensor ``name`` in place (the file keeps its size)."""
    (n,) = struct.unpack("<Q", path.read_bytes()[:8])
    begin = 8 + n + _header(path)[name]["data_offsets"][0]
    with open(path, "r+b") as f:
        f.seek(begin)
        f.write(bytes([fill]) * 64)


@pytest.mark.parametrize(
    "damage",
    ["truncated", "deleted", "linked", "copied_bytes", "finished_shard", "source_same_mtime"],
)
def test_resume_repairs_the_staged_copies(ten_shards, tmp_path, monkeypatch, run_cli, damage):
    """Whatever happened to the staged shards' copied tensors, or to a source shard whose bytes
    changed but whose size and modification time did not (cp -p, rsync -t), the resumed OUT
    is the bytes of an uninterrupted run on the source as it is now."""
    src, out = ten_shards, tmp_path / "out"
    staging = _failed_run(src, out, monkeypatch, after=3)
    index = json.loads(_index(src).read_text())["weight_map"]
    last, embed = index["lm_head.weight"], index["model.embed_tokens.weight"]
    assert list(index.values()).count(last) == 1  # the last shard holds no target
    resumed = 3
    if damage == "truncated":
        os.truncate(staging / last, 1000)
    elif damage == "deleted":
        (staging / last).unlink()
    elif damage == "linked":  # the staged file is now a link to a file outside it
        outside = tmp_path / "outside.safetensors"
        outside.write_bytes((staging / last).read_bytes())
        (staging / last).unlink()
        (staging / last).symlink_to(outside)
        before = outside.read_bytes()
    elif damage == "copied_bytes":
        _set_tensor_bytes(staging / embed, "model.embed_tokens.weight", 7)
    elif damage == "finished_shard":  # a shard holding finished tensors: they are redone
        journal = (staging / ".pissa_progress" / "rank-0.jsonl").read_text().splitlines()
        finished = [json.loads(line)["name"] for line in journal]
        shard = index[finished[0]]
        resumed -= sum(index[n] == shard for n in finished)
        assert resumed < 3
        os.truncate(staging / shard, 1000)
    else:
        st = os.stat(src / embed)
        _set_tensor_bytes(src / embed, "model.embed_tokens.weight", 7)
        os.utime(src / embed, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert os.stat(src / embed).st_size == st.st_size
    code, _, err = run_cli(*_resume_args(src, out), "--quiet")
    assert code == 0 and err == "", err
    report = json.loads((out / "pissa_report.json").read_text())
    assert report["totals"]["resumed"] == resumed and leftovers(tmp_path) == []
    if damage == "linked":
        assert not (out / last).is_symlink() and outside.read_bytes() == before
    clean = tmp_path / "clean"
    code, _, err = run_cli("decompose", src, "--rank", "4", "--out", clean, "--quiet")
    assert code == 0, err
    made = sorted(str(p.relative_to(clean)) for p in clean.rglob("*.safetensors"))
    assert made == sorted(str(p.relative_to(out)) for p in out.rglob("*.safetensors"))
    assert len(made) == 11
    for name in [*made, "model.safetensors.index.json"]:
        assert (out / name).read_bytes() == (clean / name).read_bytes(), name


def test_a_made_again_shard_leaves_the_journal(ten_shards, tmp_path, monkeypatch, run_cli):
    """A resume that makes a damaged shard again forgets its finished tensors at once: a resume
    stopped before redoing them leaves none of them journaled for the next one to trust."""
    src, out = ten_shards, tmp_path / "out"
    staging = _failed_run(src, out, monkeypatch, after=3)
    index = json.loads(_index(src).read_text())["weight_map"]
    journal = staging / ".pissa_progress" / "rank-0.jsonl"
    names = [json.loads(line)["name"] for line in journal.read_text().splitlines()]
    shard = index[names[0]]
    os.truncate(staging / shard, 1000)
    _failed_run(src, out, monkeypatch, after=0, resume=True)
    kept = [json.loads(line)["name"] for line in journal.read_text().splitlines()]
    assert kept == [n for n in names if index[n] != shard] and len(kept) < 3
    code, _, err = run_cli(*_resume_args(src, out), "--quiet")
    assert code == 0 and err == "", err
    assert json.loads((out / "pissa_report.json").read_text())["totals"]["resumed"] == len(kept)


def test_resume_refuses_a_source_at_another_path(ten_shards, tmp_path, monkeypatch, run_cli):
    """The source's path is part of what a resume compares, not only its files' sizes and
    modification times."""
    out = tmp_path / "out"
    _failed_run(ten_shards, out, monkeypatch, after=3)
    moved = Path(shutil.copytree(ten_shards, tmp_path / "moved", copy_function=shutil.copy2))
    code, _, err = run_cli(*_resume_args(moved, out), "--quiet")
    assert code == 2 and len(screen_lines(err)) == 1 and "had other source" in err, err
    assert not out.exists()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_run_keeps_finished_tensors_for_resume(slow_ckpt, tmp_path, sig):
    out = tmp_path / "out"
    proc = _start(slow_ckpt, out)
    _wait_for_partial_output(tmp_path, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig  # 130 for Ctrl-C, 143 for kill, as the shell reports
    assert "interrupted" in err and "--resume" in err and "Traceback" not in err
    assert not out.exists() and leftovers(tmp_path) == [".out.partial"]
    if sig == signal.SIGINT:  # --quiet, into a pipe: one line, no blank one before it
        (tmp_path / "second").mkdir()
        proc = _start(slow_ckpt, tmp_path / "second" / "out", "--quiet")
        _wait_for_partial_output(tmp_path / "second", proc)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
        assert err.startswith("pissa-svd: interrupted") and err.count("\n") == 1, repr(err)


def test_library_and_cli_agree_on_entry_point():
    """`pissa-svd` is installed as a console script running the same main() (through run(),
    which skips the interpreter's teardown)."""
    exe = shutil.which("pissa-svd", path=os.path.dirname(sys.executable))
    assert exe is not None
    proc = subprocess.run([exe, "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and "pissa-svd" in proc.stdout


def test_empty_paths_are_named(ckpt, tmp_path, run_cli, monkeypatch):
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")  # "" is not taken for the current folder
    for args, says in (
        ([ckpt, "--out", ""], "--out is empty"),
        (["", "--out", "o"], "SRC is empty"),
    ):
        code, _, err = run_cli("decompose", *args, "--rank", "4")
        assert code == 2 and says in err and len(screen_lines(err)) == 1, err
    assert list((tmp_path / "here").iterdir()) == []


@pytest.mark.parametrize("size", ["lots", "-1M", "nan"])
def test_bad_batch_memory_is_one_line(ckpt, tmp_path, run_cli, size):
    out = tmp_path / "out"
    code, _, err = run_cli("decompose", ckpt, "--rank", "4", "--out", out, "--batch-memory", size)
    assert code == 2 and "--batch-memory" in err and len(screen_lines(err)) == 1
    assert not out.exists()


def test_batch_memory_sizes():
    from pissa_svd.cli import _size

    assert _size("512M") == 512 << 20 and _size("8GiB") == 8 << 30 and _size("0") == 0
    assert _size("1.5k") == 1536


def test_env_reports_build_and_backends(run_cli):
    code, stdout, _ = run_cli("env")
    assert code == 0
    assert "native cpu" in stdout and "native cuda" in stdout and "auto picks" in stdout
    if os.environ.get("PISSA_SVD_NO_EXT") != "1":
        assert "native cpu   ok" in stdout


def test_gesvdr_without_cuda_is_one_line(ckpt, tmp_path, run_cli):
    out = tmp_path / "out"
    cmd = ["decompose", ckpt, "--rank", "4", "--out", out, "--method", "gesvdr", "--device", "cpu"]
    assert_bad_input(run_cli, cmd, "needs --device cuda", out)


def test_native_backend_unavailable_is_one_line(ckpt, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PISSA_SVD_NO_EXT": "1"}
    cmd = [PYTHON, "-m", "pissa_svd", "decompose", ckpt, "--rank", "4", "--out", out]
    proc = subprocess.run([*cmd, "--backend", "native"], env=env, capture_output=True, text=True)
    assert proc.returncode == 2 and "PISSA_SVD_NO_EXT=1" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not out.exists()


def test_interrupt_while_starting_is_one_line():
    """Importing the command line loads no torch, so Ctrl-C while torch loads (the first
    seconds of every run) reaches run(), which says so in one line: exit 130, no traceback."""
    code = (
        "import sys, pissa_svd.cli as cli\n"
        "assert 'torch' not in sys.modules\n"
        "def main():\n"
        "    import torch\n"
        "    raise KeyboardInterrupt\n"
        "cli.main = main\n"
        "cli.run()\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr.strip() == "pissa-svd: interrupted"


def test_standard_output_failing_does_not_fail_the_command(ckpt, tmp_path):
    """decompose's summary to a full disk (/dev/full) or verify's to a closed pipe (| head):
    the work is done, so the exit code stays the command's own (0 here), OUT is in place, and
    a full disk is one warning line."""
    out = tmp_path / "out"
    cmd = [PYTHON, "-m", "pissa_svd"]
    with open("/dev/full", "w") as full:
        proc = subprocess.run(
            [*cmd, "decompose", str(ckpt), "--rank", "4", "--out", str(out)],
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
        )
    warnings = [line for line in screen_lines(proc.stderr) if line.startswith("pissa-svd")]
    assert proc.returncode == 0 and out.is_dir(), proc.stderr
    assert warnings == [
        "pissa-svd: warning: could not write to standard output (No space left on device)"
    ]
    read, write = os.pipe()
    os.close(read)  # a reader that has gone (| head after its lines): every write fails
    try:
        head = subprocess.run(
            [*cmd, "verify", str(ckpt), str(out), "--verbose"],
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
        )
    finally:
        os.close(write)
    assert head.returncode == 0 and "Traceback" not in head.stderr, head.stderr
    assert not [line for line in screen_lines(head.stderr) if line.startswith("pissa-svd")]


def test_printed_product_failing_to_write_is_an_error(ckpt, tmp_path):
    """env and --dry-run make nothing but what they print: a full stdout is their failure
    (exit 2, one line), while a closed pipe (| head) stays silent and exit 0."""
    cmd = [PYTHON, "-m", "pissa_svd"]
    dry = ["decompose", str(ckpt), "--rank", "4", "--out", str(tmp_path / "out"), "--dry-run"]
    for args in (["env"], dry):
        with open("/dev/full", "w") as full:
            proc = subprocess.run([*cmd, *args], stdout=full, stderr=subprocess.PIPE, text=True)
        lines = [line for line in screen_lines(proc.stderr) if line.startswith("pissa-svd")]
        assert proc.returncode == 2, (args, proc.stderr)
        assert lines == [
            "pissa-svd: error: could not write to standard output (No space left on device); "
            "redirect it to a file or pipe that accepts it"
        ], proc.stderr
        read, write = os.pipe()
        os.close(read)
        try:
            head = subprocess.run([*cmd, *args], stdout=write, stderr=subprocess.PIPE, text=True)
        finally:
            os.close(write)
        assert head.returncode == 0 and not head.stderr.strip(), (args, head.stderr)
    assert not (tmp_path / "out").exists()


def test_closed_standard_streams(ckpt, tmp_path):
    """Started with stdout closed (>&-): decompose still writes OUT and exits 0 with one
    warning, env fails in one line (exit 2); with stderr closed (2>&-), bad input still exits
    2. Python sees a closed stream as None, which used to end in a traceback, exit 120."""
    cmd = [PYTHON, "-m", "pissa_svd"]
    out = tmp_path / "out"
    run = subprocess.run(
        [*cmd, "decompose", str(ckpt), "--rank", "4", "--out", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: os.close(1),
    )
    lines = [line for line in screen_lines(run.stderr) if line.startswith("pissa-svd")]
    assert run.returncode == 0 and out.is_dir(), run.stderr
    assert lines == ["pissa-svd: warning: could not write to standard output (Bad file descriptor)"]
    env = subprocess.run(
        [*cmd, "env"], stderr=subprocess.PIPE, text=True, preexec_fn=lambda: os.close(1)
    )
    assert env.returncode == 2 and "Traceback" not in env.stderr, env.stderr
    assert screen_lines(env.stderr) == [
        "pissa-svd: error: could not write to standard output (Bad file descriptor); "
        "redirect it to a file or pipe that accepts it"
    ]
    bad = subprocess.run(
        [*cmd, "decompose", str(tmp_path / "nowhere"), "--rank", "4", "--out", str(out)],
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: os.close(2),
    )
    assert bad.returncode == 2 and bad.stdout == ""


def test_single_file_source_says_the_output_has_no_config(tmp_path, run_cli):
    """A model.safetensors given as SRC while its folder holds config.json: the output is only
    the weights, which from_pretrained cannot load; the run says so (not with --quiet)."""
    src = tmp_path / "src"
    tiny_llama_model().save_pretrained(src)
    out = tmp_path / "out"
    code, _, err = run_cli("decompose", src / "model.safetensors", "--rank", "4", "--out", out)
    notes = [line for line in screen_lines(err) if line.startswith("pissa-svd: note")]
    assert code == 0 and len(notes) == 1 and f"pass the folder {src} instead" in notes[0]
    assert not (out / "config.json").exists()
    code, _, err = run_cli(
        "decompose", src / "model.safetensors", "--rank", "4", "--out", tmp_path / "q", "--quiet"
    )
    assert code == 0 and "note" not in err
