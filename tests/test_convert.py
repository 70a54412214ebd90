"""to-lora, merge and verify: against PEFT, against the fp64 math, and on corrupted output."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pissa_svd import decompose
from pissa_svd.adapter import LoraAdapter

from .conftest import PYTHON, save_tiny_llama

RANK = 8


def _decompose(src: Path, out: Path, **kw) -> Path:
    decompose(src, out, rank=kw.pop("rank", RANK), niter=4, quiet=True, **kw)
    return out


@pytest.fixture(scope="module")
def out(tiny_llama, tmp_path_factory) -> Path:
    return _decompose(tiny_llama, tmp_path_factory.mktemp("convert") / "out")


@pytest.fixture(scope="module")
def out_bf16(tiny_llama_bf16, tmp_path_factory) -> Path:
    return _decompose(tiny_llama_bf16, tmp_path_factory.mktemp("convert_bf16") / "out")


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))


def _causal_lm(path: Path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.double()


@pytest.fixture(scope="module")
def trained(out, tmp_path_factory):
    """A PiSSA adapter really trained (a few AdamW steps) on the residual model, saved by PEFT.

    Returns (folder, the trained PeftModel).
    """
    from peft import PeftModel

    torch.manual_seed(0)
    model = PeftModel.from_pretrained(
        _causal_lm(out), out, subfolder="pissa_init", is_trainable=True
    )
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    data = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(1))
    model.train()
    for _ in range(5):
        loss = model(input_ids=data, labels=data).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    path = tmp_path_factory.mktemp("trained") / "adapter"
    model.save_pretrained(path)
    return path, model


def _rewrite_tensor(ckpt: Path, name: str, fn) -> None:
    """Replace tensor ``name`` of a (sharded) checkpoint by fn(tensor), in its shard."""
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    shard = ckpt / index["weight_map"][name]
    tensors = load_file(shard)
    tensors[name] = fn(tensors[name]).contiguous()
    save_file(tensors, shard, metadata={"format": "pt"})


# ------------------------------------------------------------------------------------------
# verify


@pytest.mark.parametrize("which", ["fp32", "bf16"])
def test_verify_passes_good_output(which, tiny_llama, tiny_llama_bf16, out, out_bf16, run_cli):
    src, dst = (tiny_llama, out) if which == "fp32" else (tiny_llama_bf16, out_bf16)
    code, stdout, _ = run_cli("verify", src, dst, "--quiet")
    assert code == 0, stdout
    assert "PASS: 21 adapted tensors" in stdout


@pytest.mark.parametrize("which", ["fp32", "bf16"])
def test_verify_fails_a_residual_changed_by_one_percent(
    which, tiny_llama, tiny_llama_bf16, out, out_bf16, run_cli, tmp_path
):
    src, good = (tiny_llama, out) if which == "fp32" else (tiny_llama_bf16, out_bf16)
    bad = tmp_path / "bad"
    shutil.copytree(good, bad)
    name = "model.layers.1.mlp.down_proj.weight"
    _rewrite_tensor(bad, name, lambda t: (t.double() * 1.01).to(t.dtype))
    code, stdout, _ = run_cli("verify", src, bad, "--quiet")
    assert code == 1
    assert "FAIL: 1 of" in stdout and f"worst {name}" in stdout


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
def test_verify_fails_a_non_finite_residual_value(tiny_llama, out, run_cli, tmp_path, bad_value):
    """A NaN must not slip through the error bound's max (max(0.0, nan) is 0.0 in Python)."""
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    name = "model.layers.0.self_attn.q_proj.weight"

    def poison(t):
        t = t.clone()
        t[0, 0] = bad_value
        return t

    _rewrite_tensor(bad, name, poison)
    code, stdout, _ = run_cli("verify", tiny_llama, bad, "--quiet")
    assert code == 1 and f"worst {name}: non-finite values" in stdout, stdout


def test_verify_fails_a_changed_copied_tensor(tiny_llama, out, run_cli, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    name = "model.norm.weight"
    _rewrite_tensor(bad, name, lambda t: torch.nextafter(t, t + 1))  # one ulp
    code, stdout, _ = run_cli("verify", tiny_llama, bad, "--quiet")
    assert code == 1 and f"worst {name}: bytes differ" in stdout


@pytest.mark.parametrize(
    ("file", "change", "says"),
    [
        ("pissa_init/adapter_config.json", {"init_lora_weights": "pissa"}, "PEFT would change"),
        ("pissa_init/adapter_config.json", {"init_lora_weights": "olora"}, "PEFT would change"),
        ("config.json", {"dtype": "float16"}, "dtype is 'float16', SRC's is 'float32'"),
        ("config.json", {"vocab_size": 512}, "differs from SRC's config.json"),
    ],
)
def test_verify_fails_configs_that_load_another_model(
    tiny_llama, out, run_cli, tmp_path, file, change, says
):
    """The weights check out, but PEFT or transformers would build another model from them:
    an init that makes PEFT redo the SVD on the residual, or a config.json that differs."""
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    config = json.loads((bad / file).read_text())
    (bad / file).write_text(json.dumps({**config, **change}))
    code, stdout, _ = run_cli("verify", tiny_llama, bad, "--quiet")
    assert code == 1 and "FAIL: 1 of" in stdout and says in stdout, stdout


def test_verify_passes_a_config_naming_a_wider_residual(tiny_llama_bf16, run_cli, tmp_path):
    """decompose names an fp32 residual of a bf16 model in config.json (so that it loads
    unrounded); verify accepts that, and only that, change."""
    dst = _decompose(tiny_llama_bf16, tmp_path / "out", residual_dtype="fp32")
    assert json.loads((dst / "config.json").read_text())["dtype"] == "float32"
    code, stdout, _ = run_cli("verify", tiny_llama_bf16, dst, "--quiet")
    assert code == 0, stdout


def test_verify_verbose_table_and_bound(tiny_llama, out, run_cli):
    code, stdout, _ = run_cli("verify", tiny_llama, out, "--quiet", "--verbose")
    assert code == 0
    rows = [line for line in stdout.splitlines() if line.startswith("model.")]
    n_tensors = len(LoraAdapter.load(out / "pissa_init").modules)
    assert sum(" target " in r for r in rows) == n_tensors
    # The bound is tight enough to matter: correct output uses a visible part of it.
    from pissa_svd.convert import verify

    res = verify(tiny_llama, out)
    worst = max(r.ratio for r in res.rows if r.kind == "target")
    assert 1e-3 < worst <= 1.0


def test_verify_gpt2_fan_in_fan_out(tiny_gpt2, run_cli, tmp_path):
    dst = _decompose(tiny_gpt2, tmp_path / "out", rank=4)
    code, stdout, _ = run_cli("verify", tiny_gpt2, dst, "--quiet")
    assert code == 0 and "PASS" in stdout


@pytest.mark.parametrize("which", ["fp32", "bf16"])
def test_verify_fp64_residual_is_checked_to_fp32_accuracy(
    which, tiny_llama, tiny_llama_bf16, run_cli, tmp_path
):
    """An fp64 residual from an fp32/bf16 source holds the fp32 working result unrounded:
    verify allows fp32's rounding (not fp64's) and still fails a change of 1e-5."""
    src = tiny_llama if which == "fp32" else tiny_llama_bf16
    dst = _decompose(src, tmp_path / "out", residual_dtype="fp64", adapter_dtype="fp32")
    code, stdout, _ = run_cli("verify", src, dst, "--quiet")
    assert code == 0 and "PASS: 21 adapted tensors" in stdout, stdout
    name = "model.layers.1.mlp.down_proj.weight"
    _rewrite_tensor(dst, name, lambda t: t * (1 + 1e-5))
    code, stdout, _ = run_cli("verify", src, dst, "--quiet")
    assert code == 1 and f"worst {name}: error" in stdout, stdout


def test_verify_subnormal_weights(tiny_llama, run_cli, tmp_path):
    """Weights around 1e-40 are fp32 subnormals, where rounding errors are absolute (half the
    subnormal spacing per operation), not relative: verify allows for them, and no more."""
    src = Path(shutil.copytree(tiny_llama, tmp_path / "src"))
    names = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    for name in names:
        if "layers." in name and name.endswith("proj.weight"):
            _rewrite_tensor(src, name, lambda t: t * 1e-40)
    dst = _decompose(src, tmp_path / "out")
    code, stdout, _ = run_cli("verify", src, dst, "--quiet")
    assert code == 0 and "PASS: 21 adapted tensors" in stdout, stdout
    name = "model.layers.0.self_attn.q_proj.weight"
    _rewrite_tensor(dst, name, lambda t: t * 1.1)
    code, stdout, _ = run_cli("verify", src, dst, "--quiet")
    assert code == 1 and f"worst {name}: error" in stdout, stdout


def test_verify_missing_adapter_is_bad_input(tiny_llama, tmp_path, run_cli):
    code, _, err = run_cli("verify", tiny_llama, tiny_llama, "--quiet")
    assert code == 2 and "pissa_init" in err and "Traceback" not in err


# ------------------------------------------------------------------------------------------
# merge


def test_merge_with_init_reproduces_source(tiny_llama, out, run_cli, tmp_path):
    merged = tmp_path / "merged"
    code, stdout, _ = run_cli("merge", out, "--adapter", out / "pissa_init", "--out", merged)
    assert code == 0 and "merged 21 weights" in stdout
    src = {k: v for f in sorted(tiny_llama.glob("*.safetensors")) for k, v in load_file(f).items()}
    got = {k: v for f in sorted(merged.glob("*.safetensors")) for k, v in load_file(f).items()}
    assert got.keys() == src.keys()
    for k, w in src.items():
        if "_proj" in k:  # W_res + B@A in fp32: a few fp32 ulps of W
            assert torch.allclose(got[k], w, rtol=0, atol=4e-7 * float(w.abs().max())), k
        else:
            assert torch.equal(got[k], w), k
    assert (merged / "config.json").read_bytes() == (tiny_llama / "config.json").read_bytes()
    assert not (merged / "pissa_report.json").exists()
    assert not (merged / "pissa_init").exists()
    assert sorted(p.name for p in merged.glob("*.safetensors")) == sorted(
        p.name for p in tiny_llama.glob("*.safetensors")
    )


def test_merge_equals_base_plus_trained_adapter(out, trained, ids, run_cli, tmp_path):
    adapter_dir, model = trained
    merged = tmp_path / "merged"
    assert run_cli("merge", out, "--adapter", adapter_dir, "--out", merged)[0] == 0
    ad = LoraAdapter.load(adapter_dir)
    res = {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(f).items()}
    got = {k: v for f in sorted(merged.glob("*.safetensors")) for k, v in load_file(f).items()}
    for m in ad.modules:
        ref = res[f"{m}.weight"].double() + ad.delta(m, torch.float64)
        assert torch.allclose(got[f"{m}.weight"].double(), ref, rtol=0, atol=1e-6), m
    # ... and the merged model is the trained model.
    want = _logits(model, ids)
    assert torch.allclose(_logits(_causal_lm(merged), ids), want, rtol=0, atol=1e-4)
    # verify of a merged model says what it is not, in one line.
    code, _, err = run_cli("verify", out, merged)  # (err also holds the loading bar above)
    last = err.rstrip("\n").split("\n")[-1]
    assert code == 2 and last.startswith("pissa-svd: error: ") and "Traceback" not in err
    assert "so it is no decompose output" in last


def test_merge_bad_input(out, tiny_gpt2, run_cli, tmp_path):
    # An adapter for another model: its modules do not exist in the base.
    gpt2_out = _decompose(tiny_gpt2, tmp_path / "g", rank=4)
    code, _, err = run_cli(
        "merge", out, "--adapter", gpt2_out / "pissa_init", "--out", tmp_path / "m"
    )
    assert code == 2 and "different model" in err and not (tmp_path / "m").exists()
    code, _, err = run_cli("merge", out, "--adapter", tmp_path / "nope", "--out", tmp_path / "m")
    assert code == 2 and "no such folder" in err
    (tmp_path / "exists").mkdir()
    code, _, err = run_cli(
        "merge", out, "--adapter", out / "pissa_init", "--out", tmp_path / "exists"
    )
    assert code == 2 and "--overwrite" in err


def _train_lora(src: Path, dest: Path, **lora):
    """A plain LoRA (``lora``: LoraConfig's settings) trained a few AdamW steps on ``src``,
    saved by PEFT to ``dest``; returns the trained PeftModel."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(_causal_lm(src), LoraConfig(r=4, init_lora_weights=False, **lora))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    data = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(1))
    model.train()
    for _ in range(3):
        model(input_ids=data, labels=data).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    model.save_pretrained(dest)
    return model


def _tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(ckpt.glob("*.safetensors")) for k, v in load_file(f).items()}


@pytest.fixture(scope="module")
def tied_llama(tmp_path_factory) -> Path:
    """The tiny Llama, sharded, with its input and output embeddings tied (lm_head not stored)."""
    return save_tiny_llama(tmp_path_factory.mktemp("tied") / "ckpt", tie_word_embeddings=True)


@pytest.mark.parametrize(
    ("model", "saved", "targets", "embedding"),
    [
        ("llama", "embed_tokens", ["q_proj", "v_proj"], "model.embed_tokens.weight"),
        ("gpt2", "lm_head", ["c_attn"], "transformer.wte.weight"),
    ],
)
def test_merge_unties_the_embeddings_as_training_did(
    model, saved, targets, embedding, tied_llama, tiny_gpt2, ids, run_cli, tmp_path
):
    """PEFT trains a saved module (modules_to_save) as a copy, and the weight tied to it keeps
    the original: the merged model has both, untied, as PEFT's merge_and_unload makes it."""
    src = tied_llama if model == "llama" else tiny_gpt2
    assert json.loads((src / "config.json").read_text())["tie_word_embeddings"] is True
    original = _tensors(src)
    assert "lm_head.weight" not in original
    trained = _train_lora(src, tmp_path / "ad", target_modules=targets, modules_to_save=[saved])
    merged = tmp_path / "merged"
    code, stdout, err = run_cli("merge", src, "--adapter", tmp_path / "ad", "--out", merged)
    assert code == 0, err
    assert torch.allclose(_logits(_causal_lm(merged), ids), _logits(trained, ids), atol=1e-5)
    assert json.loads((merged / "config.json").read_text())["tie_word_embeddings"] is False
    assert "1 tensors replaced" in stdout and "untied" in stdout
    got = _tensors(merged)
    copy = load_file(tmp_path / "ad" / "adapter_model.safetensors")
    if saved == "lm_head":  # the trained head, next to the original embedding
        assert torch.equal(got["lm_head.weight"], copy["base_model.model.lm_head.weight"])
        assert torch.equal(got[embedding], original[embedding])
    else:  # the trained embedding, and the head it was tied to keeps the original
        assert torch.equal(got[embedding], copy[f"base_model.model.{embedding}"])
        assert torch.equal(got["lm_head.weight"], original[embedding])
    index = merged / "model.safetensors.index.json"
    if index.exists():  # lm_head is in its embedding's shard, and counted in total_size
        index = json.loads(index.read_text())
        assert index["weight_map"]["lm_head.weight"] == index["weight_map"][embedding]
        assert index["metadata"]["total_size"] == sum(t.nbytes for t in got.values())


def test_merge_keeps_embeddings_tied_by_ensure_weight_tying(tied_llama, ids, run_cli, tmp_path):
    """With ensure_weight_tying PEFT ties the trained copies: the adapter holds both, equal,
    and the merged model stays tied, with the trained embedding."""
    trained = _train_lora(
        tied_llama,
        tmp_path / "ad",
        target_modules=["q_proj"],
        modules_to_save=["embed_tokens"],
        ensure_weight_tying=True,
    )
    merged = tmp_path / "merged"
    code, stdout, err = run_cli("merge", tied_llama, "--adapter", tmp_path / "ad", "--out", merged)
    assert code == 0, err
    assert "untied" not in stdout
    assert json.loads((merged / "config.json").read_text())["tie_word_embeddings"] is True
    got, copy = _tensors(merged), load_file(tmp_path / "ad" / "adapter_model.safetensors")
    assert "lm_head.weight" not in got
    want = copy["base_model.model.model.embed_tokens.weight"]
    assert torch.equal(got["model.embed_tokens.weight"], want)
    assert not torch.equal(want, _tensors(tied_llama)["model.embed_tokens.weight"])
    assert torch.allclose(_logits(_causal_lm(merged), ids), _logits(trained, ids), atol=1e-5)


def test_merge_refuses_tied_embeddings_transformers_cannot_build(
    tiny_gpt2, run_cli, tmp_path, capsys
):
    """Which weights are tied comes from the model transformers builds; where it cannot, a
    saved module may be one of them, and merge refuses rather than guess."""
    from peft import LoraConfig, get_peft_model

    src = Path(shutil.copytree(tiny_gpt2, tmp_path / "src"))
    get_peft_model(
        _causal_lm(src), LoraConfig(r=4, target_modules=["c_attn"], modules_to_save=["wte"])
    ).save_pretrained(tmp_path / "ad")
    config = json.loads((src / "config.json").read_text())
    config.update(model_type="not-a-model", architectures=["NotAModelForCausalLM"])
    (src / "config.json").write_text(json.dumps(config))
    capsys.readouterr()  # transformers' loading bar
    code, _, err = run_cli("merge", src, "--adapter", tmp_path / "ad", "--out", tmp_path / "m")
    assert code == 2 and "merge_and_unload" in err and err.count("\n") == 1, err
    assert not (tmp_path / "m").exists()


# ------------------------------------------------------------------------------------------
# to-lora


def test_to_lora_on_original_equals_trained_pissa(tiny_llama, out, trained, ids, run_cli, tmp_path):
    from peft import PeftModel

    adapter_dir, model = trained
    lora = tmp_path / "lora"
    code, stdout, err = run_cli(
        "to-lora", "--init", out / "pissa_init", "--trained", adapter_dir, "--out", lora
    )
    assert code == 0, err
    assert "warning" not in err  # trained on the residual model this init belongs to
    assert f"r doubled {RANK} -> {2 * RANK}" in stdout and "ORIGINAL" in stdout
    cfg = json.loads((lora / "adapter_config.json").read_text())
    assert cfg["r"] == 2 * RANK and cfg["lora_alpha"] == 2 * RANK
    assert cfg["init_lora_weights"] is True
    assert Path(cfg["base_model_name_or_path"]).resolve() == tiny_llama.resolve()

    want = _logits(model, ids)  # the trained PiSSA model: residual + trained adapter
    ours = _logits(PeftModel.from_pretrained(_causal_lm(tiny_llama), lora).eval(), ids)
    err_ours = float((ours - want).abs().max())

    # PEFT's own conversion (it rewrites the init's config, so give it a copy).
    init_copy = tmp_path / "init_copy"
    shutil.copytree(out / "pissa_init", init_copy)
    peft_lora = tmp_path / "peft_lora"
    model.save_pretrained(peft_lora, path_initial_model_for_weight_conversion=init_copy)
    peft = _logits(PeftModel.from_pretrained(_causal_lm(tiny_llama), peft_lora).eval(), ids)
    err_peft = float((peft - want).abs().max())

    assert err_ours < 1e-4
    assert err_ours <= max(1.5 * err_peft, 1e-5)
    ours_t, peft_t = (
        load_file(lora / "adapter_model.safetensors"),
        load_file(peft_lora / "adapter_model.safetensors"),
    )
    assert ours_t.keys() == peft_t.keys()
    for k in ours_t:
        assert torch.allclose(ours_t[k], peft_t[k], rtol=0, atol=1e-7), k


def test_to_lora_rejects_mismatched_adapters(tiny_llama, out, trained, run_cli, tmp_path):
    adapter_dir, _ = trained
    # Rank differs from the init.
    out4 = _decompose(tiny_llama, tmp_path / "out4", rank=4)
    code, _, err = run_cli(
        "to-lora", "--init", out4 / "pissa_init", "--trained", adapter_dir, "--out", tmp_path / "x"
    )
    assert code == 2 and "rank" in err and not (tmp_path / "x").exists()

    # Target modules differ: drop one module from a copy of the trained adapter.
    fewer = tmp_path / "fewer"
    shutil.copytree(adapter_dir, fewer)
    t = load_file(fewer / "adapter_model.safetensors")
    t = {k: v for k, v in t.items() if ".layers.0.self_attn.q_proj." not in k}
    save_file(t, fewer / "adapter_model.safetensors", metadata={"format": "pt"})
    code, _, err = run_cli(
        "to-lora", "--init", out / "pissa_init", "--trained", fewer, "--out", tmp_path / "x"
    )
    assert code == 2 and "different modules" in err and "q_proj" in err

    # An adapter trained on a different base model (here: wider layers).
    other = save_tiny_llama(tmp_path / "other_ckpt", hidden_size=48)
    other_out = _decompose(other, tmp_path / "other_out")
    args = ["--init", out / "pissa_init", "--trained", other_out / "pissa_init"]
    code, _, err = run_cli("to-lora", *args, "--out", tmp_path / "x")
    assert code == 2 and "base model differs" in err and not (tmp_path / "x").exists()

    code, _, err = run_cli(
        "to-lora", "--init", tmp_path / "none", "--trained", adapter_dir, "--out", tmp_path / "y"
    )
    assert code == 2 and "no such folder" in err and "Traceback" not in err


def _to_lora(run_cli, out: Path, adapter_dir: Path, lora: Path) -> Path:
    code, stdout, err = run_cli(
        "to-lora", "--init", out / "pissa_init", "--trained", adapter_dir, "--out", lora, "--quiet"
    )
    assert code == 0 and stdout == "" and err == "", err  # --quiet: no summary
    return lora


def test_merging_the_lora_into_the_original_equals_merging_pissa_into_the_residual(
    tiny_llama, out, trained, run_cli, tmp_path
):
    adapter_dir, _ = trained
    lora = _to_lora(run_cli, out, adapter_dir, tmp_path / "lora")
    a, b = tmp_path / "a", tmp_path / "b"
    assert run_cli("merge", out, "--adapter", adapter_dir, "--out", a, "--quiet")[0] == 0
    code, _, err = run_cli("merge", tiny_llama, "--adapter", lora, "--out", b, "--quiet")
    assert code == 0, err
    ta = {k: v for f in sorted(a.glob("*.safetensors")) for k, v in load_file(f).items()}
    tb = {k: v for f in sorted(b.glob("*.safetensors")) for k, v in load_file(f).items()}
    assert ta.keys() == tb.keys()
    for k in ta:  # two fp32 routes to the same W + dW: a few fp32 ulps apart
        assert torch.allclose(ta[k], tb[k], rtol=0, atol=1e-6 * float(tb[k].abs().max())), k


@pytest.mark.parametrize(
    ("key", "value", "says"),
    [
        ("r", 0, "r must be a positive number, got 0"),
        ("lora_alpha", -8, "lora_alpha must be a positive number"),
        ("lora_alpha", None, "lora_alpha must be a positive number, got None"),
        ("r", None, "r must be a positive number, got None"),
        ("rank_pattern", {"q_proj": "x"}, "rank_pattern must map module patterns"),
        ("alpha_pattern", ["q_proj"], "alpha_pattern must map module patterns"),
        ("target_parameters", "gate_up_proj", "target_parameters must be a list"),
        ("use_dora", True, "DoRA adapters are not supported"),
        ("target_modules", "(q_proj", "target_modules '(q_proj' is not a valid regex"),
        ("layers_to_transform", "0", "layers_to_transform must be a layer index"),
    ],
)
def test_impossible_adapter_numbers_are_bad_input(
    out, trained, run_cli, tmp_path, key, value, says
):
    import shutil

    adapter_dir, _ = trained
    bad = tmp_path / "bad"
    shutil.copytree(adapter_dir, bad)
    config = json.loads((bad / "adapter_config.json").read_text())
    config[key] = value
    (bad / "adapter_config.json").write_text(json.dumps(config))
    for args in (
        ("to-lora", "--init", out / "pissa_init", "--trained", bad, "--out", tmp_path / "o"),
        ("merge", out, "--adapter", bad, "--out", tmp_path / "o"),
    ):
        code, _, err = run_cli(*args)
        assert code == 2 and says in err and "Traceback" not in err
        assert not (tmp_path / "o").exists()


class _NotATensor:
    """Pickled by reference: a global that torch.load(weights_only=True) refuses."""


def _copy_adapter(src: Path, dest: Path, config=None, tensors=None) -> Path:
    """A copy of adapter ``src`` with config entries and tensors (fn(tensors)) changed."""
    shutil.copytree(src, dest)
    if config:
        cfg = json.loads((dest / "adapter_config.json").read_text())
        (dest / "adapter_config.json").write_text(json.dumps({**cfg, **config}))
    if tensors:
        t = tensors(load_file(dest / "adapter_model.safetensors"))
        save_file(t, dest / "adapter_model.safetensors", metadata={"format": "pt"})
    return dest


def _adapter_commands(tiny_llama, out, adapter: Path, dest: Path) -> list[tuple]:
    """merge, to-lora and verify, each reading ``adapter``."""
    return [
        ("merge", out, "--adapter", adapter, "--out", dest),
        ("to-lora", "--init", out / "pissa_init", "--trained", adapter, "--out", dest),
        ("verify", tiny_llama, out, "--adapter", adapter, "--quiet"),
    ]


def test_merge_refuses_the_pissa_mixups_and_warns_on_another_base(
    tiny_llama, out, trained, run_cli, tmp_path
):
    adapter_dir, _ = trained
    lora = _to_lora(run_cli, out, adapter_dir, tmp_path / "lora")
    # The LoRA for the original model merged into the residual, and the reverse.
    code, _, err = run_cli("merge", out, "--adapter", lora, "--out", tmp_path / "m")
    assert code == 2 and "is the PiSSA residual of that model" in err and err.count("\n") == 1
    code, _, err = run_cli("merge", tiny_llama, "--adapter", adapter_dir, "--out", tmp_path / "m")
    assert code == 2 and "is the principal part of this weight" in err and "to-lora" in err
    assert err.count("\n") == 1 and not (tmp_path / "m").exists()
    # The right pairings: no warning.
    for base, adapter in ((out, adapter_dir), (tiny_llama, lora)):
        code, _, err = run_cli(
            "merge", base, "--adapter", adapter, "--out", tmp_path / "ok", "--quiet"
        )
        assert code == 0 and err == "", err
        shutil.rmtree(tmp_path / "ok")
    # A copy of the original (another path, no decompose report): refused from the weights.
    copy = tmp_path / "copy"
    shutil.copytree(tiny_llama, copy)
    code, _, err = run_cli("merge", copy, "--adapter", adapter_dir, "--out", tmp_path / "m")
    assert code == 2 and "principal part" in err and str(out) in err
    assert not (tmp_path / "m").exists()
    # A copy of the residual: merged, with one line of warning (it may be another one).
    other = tmp_path / "other"
    shutil.copytree(out, other)
    code, _, err = run_cli(
        "merge", other, "--adapter", adapter_dir, "--out", tmp_path / "w", "--quiet"
    )
    assert code == 0 and (tmp_path / "w").is_dir()
    assert err.startswith("pissa-svd: warning: the adapter was saved on ") and err.count("\n") == 1
    assert str(out.resolve()) in err


def test_to_lora_refuses_swapped_init_and_trained(out, trained, run_cli, tmp_path):
    """The LoRA of a swapped pair would undo the training, with exit 0: the init is told from
    its factors (A A^T = B^T B diagonal), which training moves."""
    adapter_dir, _ = trained
    args = ("--trained", out / "pissa_init", "--init", adapter_dir, "--out", tmp_path / "lora")
    code, _, err = run_cli("to-lora", *args)
    assert code == 2 and "were the two swapped?" in err and not (tmp_path / "lora").exists()
    # A bf16 init and an fp32 trained adapter (the usual pair), swapped: each by its own dtype.
    init16 = tmp_path / "init16"
    ad = LoraAdapter.load(out / "pissa_init", "init")
    bf16 = {m: t.to(torch.bfloat16) for m, t in ad.A.items()}
    LoraAdapter(init16, ad.config, bf16, {m: t.to(torch.bfloat16) for m, t in ad.B.items()}).save(
        init16
    )
    args = ("--trained", init16, "--init", adapter_dir, "--out", tmp_path / "lora16")
    code, _, err = run_cli("to-lora", *args)
    assert code == 2 and "were the two swapped?" in err
    # The same folder as both: a slip, refused; a copy of the init (no training): a zero LoRA,
    # written with a warning.
    init = out / "pissa_init"
    code, _, err = run_cli("to-lora", "--init", init, "--trained", init, "--out", tmp_path / "s")
    assert code == 2 and "are the same adapter" in err and not (tmp_path / "s").exists()
    shutil.copytree(init, tmp_path / "copy")
    args = ("--init", init, "--trained", tmp_path / "copy", "--out", tmp_path / "zero")
    code, _, err = run_cli("to-lora", *args)
    assert code == 0 and "the LoRA is zero" in err and (tmp_path / "zero").is_dir()


def test_to_lora_given_the_decompose_output_points_to_its_adapter(out, trained, run_cli, tmp_path):
    adapter_dir, _ = trained
    code, _, err = run_cli(
        "to-lora", "--init", out, "--trained", adapter_dir, "--out", tmp_path / "lora"
    )
    assert code == 2 and f"the adapter decompose wrote is {out / 'pissa_init'}" in err


def test_merge_tells_the_mixups_apart_without_the_residual_folder(
    tiny_llama, out, trained, run_cli, tmp_path
):
    """The residual moved away (trained on one machine, merged on another) or re-saved without
    its report: the adapter still goes into the residual only, told from the weights."""
    adapter_dir, _ = trained
    moved = tmp_path / "adapter"
    shutil.copytree(adapter_dir, moved)
    config = json.loads((moved / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "gone")
    (moved / "adapter_config.json").write_text(json.dumps(config))
    code, _, err = run_cli("merge", tiny_llama, "--adapter", moved, "--out", tmp_path / "m")
    assert code == 2 and "is the principal part of this weight" in err and err.count("\n") == 1
    assert not (tmp_path / "m").exists()
    resaved = tmp_path / "resaved"  # the residual without pissa_report.json
    shutil.copytree(out, resaved, ignore=shutil.ignore_patterns("pissa_report.json"))
    code, _, err = run_cli("merge", resaved, "--adapter", moved, "--out", tmp_path / "ok")
    assert code == 0, err


def test_merge_refuses_a_converted_lora_on_the_residual(
    tiny_llama, out, trained, run_cli, tmp_path
):
    """PEFT's own conversion (path_initial_model_for_weight_conversion) writes the same rank-2r
    LoRA as to-lora but records the residual as its base: the report's rank tells them apart."""
    adapter_dir, model = trained
    converted = tmp_path / "converted"
    model.save_pretrained(
        converted, path_initial_model_for_weight_conversion=str(out / "pissa_init")
    )
    config = json.loads((converted / "adapter_config.json").read_text())
    assert config["r"] == 2 * RANK and Path(config["base_model_name_or_path"]) == out
    code, _, err = run_cli("merge", out, "--adapter", converted, "--out", tmp_path / "m")
    assert code == 2 and f"is a PiSSA residual of rank {RANK}" in err and "to-lora" in err
    assert err.count("\n") == 1 and not (tmp_path / "m").exists()
    # Into a copy of the residual without its report: told from the weights (the LoRA's
    # second half is the init, negated), for PEFT's conversion and for to-lora's.
    copy = tmp_path / "copy"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("pissa_report.json"))
    lora = _to_lora(run_cli, out, adapter_dir, tmp_path / "lora")
    init16 = tmp_path / "init16" / "pissa_init"  # a bf16 init, as for a bf16 model
    ad = LoraAdapter.load(out / "pissa_init", "init")
    bf16 = {m: t.to(torch.bfloat16) for m, t in ad.A.items()}
    B16 = {m: t.to(torch.bfloat16) for m, t in ad.B.items()}
    LoraAdapter(init16, ad.config, bf16, B16).save(init16)
    lora16 = _to_lora(run_cli, init16.parent, adapter_dir, tmp_path / "lora16")
    for adapter in (converted, lora, lora16):
        code, _, err = run_cli("merge", copy, "--adapter", adapter, "--out", tmp_path / "m")
        assert code == 2 and "is a LoRA converted for the original model" in err, err
        assert err.count("\n") == 1 and not (tmp_path / "m").exists()
    # Into a copy of the original: fine, and so is the untrained init merged into the residual
    # copy (its halves are an init too, but they do not cancel).
    original = tmp_path / "original"
    shutil.copytree(tiny_llama, original)
    code, _, err = run_cli("merge", original, "--adapter", lora, "--out", tmp_path / "ok1")
    assert code == 0, err
    code, _, err = run_cli(
        "merge", copy, "--adapter", out / "pissa_init", "--out", tmp_path / "ok2"
    )
    assert code == 0, err
    # An adapter of another rank that is no conversion: not sent to the original model.
    other = _decompose(tiny_llama, tmp_path / "other", rank=2 * RANK)
    code, _, err = run_cli("merge", other, "--adapter", adapter_dir, "--out", tmp_path / "m")
    assert code == 2 and "made for another residual or model" in err and "to-lora" not in err


_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.mark.parametrize(
    ("config", "module", "says"),
    [
        ({"target_modules": r".*\.(q_proj|k_proj)"}, "down_proj", "target_modules '.*"),
        ({"target_modules": ["q_proj", "k_proj"]}, "down_proj", "['q_proj', 'k_proj']"),
        ({"target_modules": _ALL, "layers_to_transform": [0]}, "layers.1.", "[0]"),
        ({"exclude_modules": ["down_proj"]}, "down_proj", "exclude_modules ['down_proj']"),
    ],
)
def test_weights_outside_target_modules_are_bad_input(
    tiny_llama, out, run_cli, tmp_path, config, module, says
):
    # PEFT would leave these weights out; merge, to-lora and verify must not use them.
    bad = _copy_adapter(out / "pissa_init", tmp_path / "bad", config)
    for args in _adapter_commands(tiny_llama, out, bad, tmp_path / "o"):
        code, _, err = run_cli(*args)
        assert code == 2 and "does not cover" in err and says in err, (args[0], err)
        assert module in err.split("holds weights for ")[1].split(",")[0]
        assert err.count("\n") == 1 and not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "config",
    [
        {"target_modules": r".*_proj"},
        {"target_modules": ["self_attn.q_proj", *_ALL[1:]]},
        {"target_modules": _ALL, "layers_to_transform": [0, 1, 2], "layers_pattern": "layers"},
        {"target_modules": _ALL, "exclude_modules": ["lm_head"], "modules_to_save": ["lm_head"]},
        {"target_modules": "all-linear"},
        {"target_modules": None},
    ],
)
def test_adapters_peft_loads_whole_are_accepted(out, tmp_path, config):
    ad = LoraAdapter.load(_copy_adapter(out / "pissa_init", tmp_path / "ok", config))
    assert len(ad.modules) == 21


def test_target_matching_is_peft_s(out):
    """targeted() against PEFT's check_target_module_exists, on names either may trip over."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    from pissa_svd.adapter import targeted

    names = [m for m in LoraAdapter.load(out / "pissa_init").modules if ".layers.1." not in m]
    names += ["h.0.attn.c_attn", "transformer.h.1.mlp.c_fc", "lm_head", "q_proj"]
    configs = [
        {"target_modules": r".*\.(q_proj|c_attn)"},
        {"target_modules": ["q_proj", "self_attn.k_proj", "c_fc"]},
        {"target_modules": ["q_proj", "c_attn", "c_fc"], "layers_to_transform": 0},
        {"target_modules": ["c_attn"], "layers_to_transform": [0, 2], "layers_pattern": ["h"]},
        {
            "target_modules": ["q_proj", "model.layers.2.self_attn.k_proj"],
            "layers_to_transform": [0],
        },
        {"target_modules": _ALL, "exclude_modules": r".*layers\.0\.mlp.*"},
        {"target_modules": ["q_proj", "lm_head"], "modules_to_save": ["lm_head"]},
    ]
    for config in configs:
        peft = LoraConfig(r=4, **config)
        for name in names:
            assert targeted(config, name) == bool(check_target_module_exists(peft, name)), (
                config,
                name,
            )


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
def test_non_finite_adapter_weights_are_bad_input(
    tiny_llama, out, trained, run_cli, tmp_path, bad_value
):
    adapter_dir, _ = trained
    key = "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"

    def poison(t):
        t[key][3, 2] = bad_value
        return t

    bad = _copy_adapter(adapter_dir, tmp_path / "bad", tensors=poison)
    for args in _adapter_commands(tiny_llama, out, bad, tmp_path / "o"):
        code, _, err = run_cli(*args)
        assert code == 2 and f"{key!r} holds NaN or inf" in err and err.count("\n") == 1, err
        assert not (tmp_path / "o").exists()


def test_bin_adapter_with_other_objects_is_one_line_of_bad_input(out, run_cli, tmp_path):
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    for value, says in (("str", f"{key!r} is a str, not a tensor"), (_NotATensor(), "GLOBAL")):
        bad = tmp_path / "bad"
        shutil.rmtree(bad, ignore_errors=True)
        bad.mkdir()
        shutil.copy(out / "pissa_init" / "adapter_config.json", bad)
        torch.save({key: value}, bad / "adapter_model.bin")
        code, _, err = run_cli("merge", out, "--adapter", bad, "--out", tmp_path / "o")
        assert code == 2 and says in err and err.count("\n") == 1, err
        assert "Traceback" not in err and not (tmp_path / "o").exists()
    # Not a pickle torch can read at all (torch also warns about its protocol): one line.
    (bad / "adapter_model.bin").write_bytes(b"\x80\x04garbage")
    cmd = ["merge", str(out), "--adapter", str(bad), "--out", str(tmp_path / "o")]
    proc = subprocess.run([PYTHON, "-m", "pissa_svd", *cmd], capture_output=True, text=True)
    assert proc.returncode == 2 and "unreadable" in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr


def test_merge_that_overflows_the_base_dtype_is_bad_input(tiny_llama, run_cli, tmp_path):
    """An adapter whose update is beyond fp16's range (lora_alpha 8e7) would merge into an
    fp16 checkpoint as inf: one line, exit 2, no OUT. The same into an fp32 copy is fine."""
    src = save_tiny_llama(tmp_path / "fp16", dtype=torch.float16)
    res = _decompose(src, tmp_path / "res")
    big = _copy_adapter(res / "pissa_init", tmp_path / "big", config={"lora_alpha": 8e7})
    code, _, err = run_cli("merge", res, "--adapter", big, "--out", tmp_path / "m", "--quiet")
    line = err.strip().splitlines()[-1]  # (before it: transformers saving the source)
    assert code == 2 and "Traceback" not in err and line.startswith("pissa-svd: ")
    assert "beyond the range of F16" in line and "merge into a float32 copy" in line
    assert not (tmp_path / "m").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".m")]
    code, _, err = run_cli("merge", res, "--adapter", res / "pissa_init", "--out", tmp_path / "m")
    assert code == 0, err


def test_to_lora_with_alphas_too_far_apart_for_the_dtype_is_bad_input(out, run_cli, tmp_path):
    """The LoRA holds the init's B times -s0 / s1; with fp16 adapters and the trained one at
    lora_alpha 8e9 (s0 / s1 = 1e-9) that rounds to zeros and the LoRA would lose the init's
    term."""
    to_fp16 = lambda t: {k: v.half() for k, v in t.items()}  # noqa: E731
    init = _copy_adapter(out / "pissa_init", tmp_path / "init", tensors=to_fp16)
    far = _copy_adapter(init, tmp_path / "far", config={"lora_alpha": 8e9})
    dest = tmp_path / "lora"
    code, _, err = run_cli("to-lora", "--init", init, "--trained", far, "--out", dest)
    assert code == 2 and "does not fit in torch.float16" in err and "Traceback" not in err
    assert not dest.exists()
    near = _copy_adapter(init, tmp_path / "near", config={"lora_alpha": 2 * RANK})
    code, _, err = run_cli("to-lora", "--init", init, "--trained", near, "--out", dest)
    assert code == 0, err


def test_to_lora_on_a_full_disk_is_one_line(out, trained, run_cli, tmp_path, monkeypatch):
    """safetensors reports a full disk as its own error type ("... (os error 28)"): one line
    naming the file, exit 2, nothing left behind. Other safetensors errors are not hidden."""
    import safetensors.torch
    from safetensors import SafetensorError

    adapter_dir, _ = trained
    message = "Error while serializing: I/O error: No space left on device (os error 28)"

    def full(*args, **kwargs):
        raise SafetensorError(message)

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    dest = tmp_path / "lora"
    args = ("to-lora", "--init", out / "pissa_init", "--trained", adapter_dir, "--out", dest)
    code, _, err = run_cli(*args)
    assert code == 2 and "Traceback" not in err
    assert "disk full while writing" in err and "adapter_model.safetensors" in err
    assert not dest.exists() and not [p for p in tmp_path.iterdir() if p.name != "lora"]

    def other(*args, **kwargs):
        raise SafetensorError("Error while serializing: something else")

    monkeypatch.setattr(safetensors.torch, "save_file", other)
    with pytest.raises(SafetensorError, match="something else"):
        from pissa_svd.convert import to_lora

        to_lora(out / "pissa_init", adapter_dir, dest)
    assert not dest.exists()


def test_a_killed_run_s_temporary_folder_is_removed_by_the_next(out, run_cli, tmp_path):
    """merge and to-lora write into a hidden ``.OUT.tmp-*`` sibling, marked as theirs; one that
    a SIGKILL left (marked, held by no process) goes at the next run into the same OUT, said on
    stderr, however recent. One a live run holds stays, and so does a user's folder that only
    has such a name, however old."""
    import os

    from pissa_svd.output import STAGED_MARK, try_lock

    dest = tmp_path / "merged"
    folders = {k: tmp_path / f".merged.tmp-{k}" for k in ("killed", "users", "live")}
    for k, folder in folders.items():
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"partial")
        if k != "users":
            (folder / STAGED_MARK).touch()
    os.utime(folders["users"], (0, 0))
    held = try_lock(folders["live"])
    try:
        code, _, err = run_cli(
            "merge", out, "--adapter", out / "pissa_init", "--out", dest, "--quiet"
        )
    finally:
        os.close(held)
    assert code == 0, err
    assert f"removed {folders['killed']}, left by an interrupted run" in err
    assert not folders["killed"].exists() and folders["live"].exists()
    assert (folders["users"] / "model.safetensors").read_bytes() == b"partial"
    assert dest.is_dir() and not (dest / STAGED_MARK).exists()
