"""Mixture-of-experts checkpoints: transformers 5 fuses the experts on loading.

The files name every expert's weight (``experts.3.w1``, ``experts.3.gate_proj``); the model
transformers builds holds one 3-D parameter per layer. PEFT maps per-expert adapters onto it
for some families and silently drops them for others. These tests hold decompose's load check
to what PEFT really does with the installed versions, whatever they are.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import peft
import pytest
import torch
import transformers

from pissa_svd import InputError, decompose
from pissa_svd.pipeline import ADAPTER_DIR

from .conftest import PYTHON, TINY_MOE, save_tiny_moe
from .test_decompose import load_state, move_adapters


@pytest.fixture(scope="module", params=sorted(TINY_MOE))
def moe(request, tmp_path_factory):
    family = request.param
    return family, save_tiny_moe(tmp_path_factory.mktemp(family) / "src", family)


def logits(path, ids, adapter=None):
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if adapter is not None:
        model = peft.PeftModel.from_pretrained(model, adapter, is_trainable=True)
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


def expert_tensors(state: dict) -> dict:
    return {k: v for k, v in state.items() if ".experts." in k}


@pytest.mark.parametrize(
    "exclude",
    [None, [r"\.experts\."], [r"\.experts\.\d+\.(w2|down_proj)$"]],
    ids=["default", "no-experts", "experts-without-down"],  # the last: gate/up fused alone
)
def test_load_check_agrees_with_peft(moe, exclude, tmp_path):
    """Decompose refuses exactly when PEFT would not reproduce the model at step 0, for the
    default targets and with the experts left out (which the refusal may suggest)."""
    family, src = moe
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    unchecked = tmp_path / "unchecked"
    report = decompose(src, unchecked, rank=4, exclude=exclude, load_check=False, quiet=True)
    assert report["load_check"] == "skipped (--no-load-check)"
    experts = {r["name"].split(".")[-2] for r in report["matrices"] if ".experts." in r["name"]}
    assert bool(experts) == (exclude != [r"\.experts\."])
    assert not experts & {"w2", "down_proj"} or exclude is None
    faithful = torch.allclose(
        logits(unchecked, ids, unchecked / ADAPTER_DIR), logits(src, ids), atol=1e-4, rtol=1e-4
    )
    checked = tmp_path / "checked"
    if faithful:
        report = decompose(src, checked, rank=4, exclude=exclude, quiet=True)
        assert report["load_check"].startswith("every target gets its adapter in transformers")
        return
    with pytest.raises(InputError) as info:
        decompose(src, checked, rank=4, exclude=exclude, quiet=True)
    message = str(info.value)
    assert ("would silently give" in message and "no adapter" in message) or (
        "would not load the adapter" in message and "do not land" in message
    )
    assert "--exclude" in message and "--no-load-check" in message
    assert not checked.exists()


def test_quantize_refuses_experts_bitsandbytes_leaves_unquantized(tmp_path):
    """transformers 5 loads the experts as fused 3-D parameters, which bitsandbytes' 4-bit
    loading leaves in full precision (checked here on the installed versions): a QPiSSA
    residual would only add its quantization error to them. Refused, naming the way out."""
    src = save_tiny_moe(tmp_path / "src", "mixtral")
    bnb = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_pretrained(src, quantization_config=bnb)
    kinds = {n: type(p).__name__ for n, p in model.named_parameters()}
    assert kinds["model.layers.0.self_attn.q_proj.weight"] == "Params4bit"
    experts = [k for n, k in kinds.items() if ".experts." in n]
    assert experts and "Params4bit" not in experts
    with pytest.raises(InputError, match="which bitsandbytes does not quantize"):
        decompose(src, tmp_path / "out", rank=4, quantize="nf4", quiet=True)
    report = decompose(
        src, tmp_path / "out", rank=4, quantize="nf4", exclude=r"\.experts\.", quiet=True
    )
    assert report["matrices"] and all(".experts." not in r["name"] for r in report["matrices"])


def test_experts_left_out_stay_whole(tmp_path):
    """The way out a refusal offers: with the experts left out they stay whole, and step 0 is
    the original model (attention and Qwen2-MoE's shared expert still adapted)."""
    src = save_tiny_moe(tmp_path / "src", "qwen2_moe")
    out = tmp_path / "out"
    report = decompose(src, out, rank=4, exclude=[r"\.experts\."], quiet=True)
    assert report["load_check"].startswith("every target gets its adapter")
    names = [r["name"] for r in report["matrices"]]
    assert not any(".experts." in n for n in names) and any("shared_expert." in n for n in names)
    original, residual = expert_tensors(load_state(src)), expert_tensors(load_state(out))
    assert original.keys() == residual.keys() and original
    assert all(torch.equal(original[k], residual[k]) for k in original)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(
        logits(out, ids, out / ADAPTER_DIR), logits(src, ids), atol=1e-4, rtol=1e-4
    )


def test_the_installed_versions_exercise_both_outcomes(tmp_path):
    """The agreement test above means something only if the installed transformers and PEFT
    refuse some family and accept another (5.24 and 0.21.2: Qwen2-MoE and GLM-4-MoE's dense
    layer are refused, Mixtral and Qwen3-MoE accepted)."""
    from pissa_svd import loadcheck

    outcomes = {}
    for family in TINY_MOE:
        src = save_tiny_moe(tmp_path / family, family)
        config = json.loads((src / "config.json").read_text())
        modules = [k.removesuffix(".weight") for k in load_state(src) if k.endswith("proj.weight")]
        outcomes[family] = loadcheck.check(src, config, modules, rank=4).ok
    if int(transformers.__version__.split(".")[0]) < 5 or all(outcomes.values()):
        pytest.skip(f"these versions load every family's adapter: {outcomes}")
    assert True in outcomes.values() and False in outcomes.values(), outcomes


def test_check_finds_targets_the_model_lacks(tmp_path):
    """A target that no module of the built model answers to is reported, even when other
    targets are fused parameters that PEFT does map."""
    from pissa_svd import loadcheck

    src = save_tiny_moe(tmp_path / "src", "mixtral")
    config = json.loads((src / "config.json").read_text())
    modules = ["model.layers.0.self_attn.q_proj", "model.layers.1.block_sparse_moe.experts.2.w9"]
    result = loadcheck.check(src, config, modules, rank=4)
    assert result.ok is False
    assert result.missing == ("model.layers.1.block_sparse_moe.experts.2.w9",)
    assert loadcheck.needed(["model.layers.0.mlp.experts.0.gate_proj"])
    assert not loadcheck.needed(["model.layers.0.mlp.shared_expert.gate_proj"])
    # Experts saved fused (3-D, no per-expert names): the config's expert count tells.
    assert loadcheck.needed(["model.layers.0.mlp.gate_proj"], {"num_experts": 8})
    assert loadcheck.needed([], {"text_config": {"num_local_experts": 8}})
    assert not loadcheck.needed(["model.layers.0.mlp.gate_proj"], {"num_experts": 0})


def test_load_check_result_in_dry_run_and_report(tmp_path, run_cli):
    src = save_tiny_moe(tmp_path / "src", "mixtral")
    code, out, err = run_cli("decompose", src, "--rank", "4", "--out", tmp_path / "o", "--dry-run")
    assert code == 0, err
    assert "  loading      every target gets its adapter in transformers" in out


def test_without_peft_the_check_says_so(tmp_path, monkeypatch):
    src = save_tiny_moe(tmp_path / "src", "mixtral")
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft -> ImportError
    report = decompose(src, tmp_path / "out", rank=4, quiet=True)
    assert report["load_check"] == "not checked: peft is not installed"


def test_remote_code_models_are_not_built(tmp_path):
    """Never trust_remote_code: a model transformers only knows through its own code is not
    checked, and the report says why (one with a native class is checked as usual)."""
    src = save_tiny_moe(tmp_path / "src", "mixtral")
    config = json.loads((src / "config.json").read_text())
    config |= {"model_type": "custom_moe", "architectures": ["CustomMoeForCausalLM"]}
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomMoeForCausalLM"}
    (src / "config.json").write_text(json.dumps(config))
    report = decompose(src, tmp_path / "out", rank=4, quiet=True)
    assert report["load_check"].startswith("not checked: the model needs remote code")


def test_single_file_checkpoint_says_it_was_not_checked(tmp_path):
    src = save_tiny_moe(tmp_path / "src", "mixtral")
    report = decompose(src / "model.safetensors", tmp_path / "out", rank=4, quiet=True)
    assert report["load_check"] == "not checked: no config.json next to the weights"


def test_exclude(tiny_llama, tmp_path, run_cli):
    report = decompose(tiny_llama, tmp_path / "a", rank=4, exclude=[r"\.mlp\."], quiet=True)
    names = [r["name"] for r in report["matrices"]]
    assert names and all(".self_attn." in n for n in names)
    report = decompose(
        tiny_llama, tmp_path / "b", rank=4, targets=["proj$"], exclude=["q_proj", "up_"], quiet=True
    )
    leaves = {r["name"].split(".")[-2] for r in report["matrices"]}
    assert leaves == {"k_proj", "v_proj", "o_proj", "gate_proj", "down_proj"}
    code, _, err = run_cli(
        "decompose", tiny_llama, "--rank", "4", "--out", tmp_path / "c", "--exclude", "proj"
    )
    assert code == 2
    assert "--exclude 'proj' leaves out every tensor the default target patterns match" in err
    code, _, err = run_cli(
        "decompose", tiny_llama, "--rank", "4", "--out", tmp_path / "c", "--exclude", "("
    )
    assert code == 2 and "--exclude pattern '(' is not a valid regex" in err


# ------------------------------------------------------------------------------------------
# After training: PEFT saves the experts' adapters fused; to-lora and merge read them.

FUSED_FAMILIES = ["mixtral", "qwen3_moe"]  # PEFT maps both; they name their experts differently


@pytest.fixture(scope="module", params=FUSED_FAMILIES)
def trained_moe(request, tmp_path_factory):
    """(source, decompose output, trained adapter, inputs, trained logits) of a tiny MoE."""
    root = tmp_path_factory.mktemp(f"trained_{request.param}")
    src = save_tiny_moe(root / "src", request.param)
    out = root / "out"
    decompose(src, out, rank=4, quiet=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(model, out / ADAPTER_DIR, is_trainable=True)
    g = torch.Generator().manual_seed(1)
    move_adapters(model, 0.1, g)
    ids = torch.randint(0, 128, (2, 12), generator=g)
    with torch.no_grad():
        want = model.eval()(input_ids=ids).logits
    model.save_pretrained(root / "trained")
    return src, out, root / "trained", ids, want


def test_peft_saves_the_experts_fused(trained_moe):
    """What the tests below read really is PEFT's fused layout (transformers 5)."""
    _, _, trained, _, _ = trained_moe
    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip("transformers 4 keeps the experts as modules: PEFT saves them per expert")
    config = json.loads((trained / "adapter_config.json").read_text())
    assert set(config["target_parameters"]) == {"gate_up_proj", "down_proj"}
    keys = load_state(trained).keys()
    assert any(k.endswith("mlp.experts.base_layer.lora_A.weight") for k in keys)
    assert not any(".experts.0." in k for k in keys)


def test_to_lora_of_fused_experts_on_original_equals_trained(trained_moe, tmp_path, run_cli):
    src, out, trained, ids, want = trained_moe
    lora = tmp_path / "lora"
    code, _, err = run_cli(
        "to-lora", "--init", out / ADAPTER_DIR, "--trained", trained, "--out", lora
    )
    assert code == 0, err
    assert float((logits(src, ids) - want).abs().max()) > 1e-3  # training moved the model
    torch.testing.assert_close(logits(src, ids, lora), want, atol=1e-4, rtol=1e-4)
    # Merging that LoRA into the original's per-expert files gives the trained model too.
    merged = tmp_path / "merged"
    assert run_cli("merge", src, "--adapter", lora, "--out", merged, "--quiet")[0] == 0
    torch.testing.assert_close(logits(merged, ids), want, atol=1e-4, rtol=1e-4)
    # Into a copy of the residual without its report: refused from the LoRA's factors, read on
    # the first weight of plain layout (the experts come first in the files, fused in it).
    copy = tmp_path / "copy"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("pissa_report.json"))
    code, _, err = run_cli("merge", copy, "--adapter", lora, "--out", tmp_path / "m")
    assert code == 2 and "is a LoRA converted for the original model" in err, err


def test_merge_of_fused_experts_into_the_residual_equals_trained(trained_moe, tmp_path, run_cli):
    src, out, trained, ids, want = trained_moe
    merged = tmp_path / "merged"
    code, stdout, err = run_cli("merge", out, "--adapter", trained, "--out", merged)
    assert code == 0, err
    n = sum(1 for k in load_state(src) if k.endswith("proj.weight") or ".experts." in k)
    assert f"merged {n} weights" in stdout  # every expert's tensors, one by one
    torch.testing.assert_close(logits(merged, ids), want, atol=1e-4, rtol=1e-4)


def test_merge_names_a_missing_expert_weight(trained_moe, tmp_path, run_cli):
    from safetensors.torch import load_file, save_file

    src, out, trained, _, _ = trained_moe
    broken = tmp_path / "broken"
    broken.mkdir()
    state = load_file(out / "model.safetensors")
    gone = next(
        k for k in state if ".experts.1." in k and k.endswith(("w2.weight", "down_proj.weight"))
    )
    del state[gone]
    save_file(state, broken / "model.safetensors", metadata={"format": "pt"})
    code, _, err = run_cli("merge", broken, "--adapter", trained, "--out", tmp_path / "m")
    assert code == 2 and "Traceback" not in err and not (tmp_path / "m").exists()
    assert "lacks expert 1's down projection in model.layers." in err


def test_fused_adapter_of_another_model_is_refused(trained_moe, tmp_path, run_cli):
    """Same attention shapes, same in-memory names (mlp.experts), experts of another size."""
    src, out, trained, _, _ = trained_moe
    family = json.loads((src / "config.json").read_text())["model_type"]
    other = save_tiny_moe(tmp_path / "other", next(f for f in FUSED_FAMILIES if f != family))
    for args in (
        ("merge", other, "--adapter", trained, "--out", tmp_path / "m"),
        ("to-lora", "--init", other, "--trained", trained, "--out", tmp_path / "m"),
    ):
        if args[0] == "to-lora":
            decompose(other, tmp_path / "other_out", rank=4, quiet=True)
            args = (*args[:2], tmp_path / "other_out" / ADAPTER_DIR, *args[3:])
        code, _, err = run_cli(*args)
        assert code == 2 and not (tmp_path / "m").exists(), err
        line = err.strip().splitlines()[-1]  # (above it: transformers saving `other`)
        assert "Traceback" not in err and line.startswith("pissa-svd: error: ")
        assert "adapts fused experts" in line and "belongs to a different model" in line


def test_fused_layout_round_trip():
    """A per-expert adapter stacked into PEFT's layout updates each expert's weights by its own
    s * B @ A, and split/join are inverses (independent of the installed versions)."""
    from pissa_svd.adapter import LoraAdapter
    from pissa_svd.fused import fused_params

    E, hidden, inter, r = 3, 12, 10, 2
    g = torch.Generator().manual_seed(0)
    shapes, A, B = {}, {}, {}
    for e in range(E):
        for proj, (out_f, in_f) in {"w1": (inter, hidden), "w3": (inter, hidden)}.items():
            m = f"model.layers.5.block_sparse_moe.experts.{e}.{proj}"
            shapes[m] = (out_f, in_f)
            A[m], B[m] = torch.randn(r, in_f, generator=g), torch.randn(out_f, r, generator=g)
    per_expert = LoraAdapter(Path("init"), {"r": r, "lora_alpha": 3 * r}, A, B)
    fused_key = "model.layers.5.mlp.experts.base_layer"
    config = {"r": r, "lora_alpha": 3 * r, "target_parameters": ["gate_up_proj"]}
    config |= {"rank_pattern": {r".*\.gate_up_proj": 2 * r}}
    config |= {"alpha_pattern": {r".*\.gate_up_proj": 6 * r}}
    shell = LoraAdapter(
        Path("trained"),
        config,
        {fused_key: torch.zeros(E * 2 * r, hidden)},
        {fused_key: torch.zeros(2 * inter, 2 * r * E)},
    )
    p = fused_params(shell, shapes, "the test model")[fused_key]
    assert (p.param, p.rank, p.experts, p.rows, p.scaling) == (
        "gate_up_proj",
        2 * r,
        E,
        (10, 10),
        3,
    )
    A3, B3, s = p.from_experts(per_expert)
    assert s == 3.0
    flat_A, flat_B = p.join(A3, B3)
    assert tuple(flat_A.shape) == (E * 2 * r, hidden) and tuple(flat_B.shape) == (
        2 * inter,
        2 * r * E,
    )
    for got, want in zip(p.split(flat_A, flat_B), (A3, B3), strict=True):
        assert torch.equal(got, want)
    for m in shapes:
        torch.testing.assert_close(
            p.delta(flat_A, flat_B, m, torch.float64), per_expert.delta(m, torch.float64)
        )


def test_half_of_a_fused_pair_is_refused(tmp_path, run_cli):
    """PEFT cannot load an adapter for w1 without w3 once both live in gate_up_proj."""
    src = save_tiny_moe(tmp_path / "src", "mixtral")
    code, _, err = run_cli(
        "decompose", src, "--rank", "4", "--out", tmp_path / "o", "--targets", r"\.w1$", "q_proj"
    )
    line = err.strip().splitlines()[-1]
    assert code == 2 and "Traceback" not in err and not (tmp_path / "o").exists()
    # PEFT 0.21 refuses such a config itself; the check would also see the half coverage.
    assert "would refuse the adapter" in line or "cover only some of them" in line
    assert "experts.0.w1" in line


def test_some_experts_of_a_fused_parameter_are_refused(tmp_path, run_cli):
    """One LoRA covers every expert of a fused parameter: an adapter for experts 0 and 1 of 4
    would not load (size mismatch), so decompose says so first."""
    src = save_tiny_moe(tmp_path / "src", "mixtral")
    code, _, err = run_cli(
        "decompose", src, "--rank", "4", "--out", tmp_path / "o", "--targets", r"experts\.[01]\."
    )
    line = err.strip().splitlines()[-1]
    assert code == 2 and "Traceback" not in err and not (tmp_path / "o").exists()
    assert "cover only some of them" in line or "would refuse the adapter" in line


# ------------------------------------------------------------------------------------------
# In memory: pissa_svd.peft.initialize on PEFT's LoRA of fused expert parameters


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_initialize_splits_every_expert_of_fused_parameters(family, tmp_path):
    """target_parameters LoRA on transformers 5's fused experts: each expert gets its own
    top-r triplets (all experts of a parameter in one batched call), the output is unchanged.
    This also covers Qwen2-MoE, whose per-expert adapters PEFT cannot map."""
    from pissa_svd.peft import initialize

    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip("transformers 4 keeps the experts as nn.Linear modules")
    src = save_tiny_moe(tmp_path / "src", family)
    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    experts = model.model.layers[0].mlp.experts
    originals = {p: getattr(experts, p).detach().clone() for p in ("gate_up_proj", "down_proj")}
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(input_ids=ids).logits
    r = 4
    config = peft.LoraConfig(
        r=r,
        lora_alpha=2 * r,
        target_modules=["q_proj", "v_proj"],
        target_parameters=["gate_up_proj", "down_proj"],
    )
    pm = peft.get_peft_model(model, config)
    report = initialize(pm, method="exact")
    with torch.no_grad():
        got = pm(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)

    E = originals["down_proj"].shape[0]
    names = set(report["modules"])
    for p in originals:
        assert {f"model.layers.0.mlp.experts.{p}.{e}" for e in range(E)} <= names
        assert report["modules"][f"model.layers.1.mlp.experts.{p}.0"]["batch"] >= E  # batched
    wrappers = {
        m.parameter_name: m for m in pm.modules() if isinstance(m, peft.tuners.lora.ParamWrapper)
    }
    for p, W in originals.items():
        layer = next(
            m
            for n, m in pm.named_modules()
            if isinstance(m, peft.tuners.lora.ParamWrapper)
            and m.parameter_name == p
            and ".layers.0." in n
        )
        assert p in wrappers
        s = layer.scaling["default"]
        A = layer.lora_A["default"].weight.reshape(E, r, -1)
        B = layer.lora_B["default"].weight.reshape(-1, r, E)
        residual = getattr(experts, p).detach()
        for e in range(E):
            update = s * B[:, :, e] @ A[e]  # (out, in) as PEFT computes it
            torch.testing.assert_close(residual[e] + update, W[e], atol=1e-5, rtol=1e-5)
            exact = torch.linalg.svdvals(W[e].double())[:r]
            got = torch.linalg.svdvals(update.double())[:r]
            torch.testing.assert_close(got, exact, rtol=1e-5, atol=1e-6)  # the top r


def test_peft_own_pissa_init_fails_on_fused_parameters(tmp_path):
    """Why initialize matters here: PEFT's init_lora_weights="pissa..." cannot split them."""
    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip("transformers 4 keeps the experts as nn.Linear modules")
    src = save_tiny_moe(tmp_path / "src", "mixtral")
    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    config = peft.LoraConfig(
        r=4, target_parameters=["gate_up_proj", "down_proj"], init_lora_weights="pissa_niter_4"
    )
    with pytest.raises(AttributeError):
        peft.get_peft_model(model, config)


@pytest.mark.parametrize("alpha_pattern", [{}, {"gate_up_proj": 16}])
def test_to_lora_after_initialize_on_fused_parameters(tmp_path, run_cli, alpha_pattern):
    """initialize -> save init -> train -> save -> to-lora: both adapters fused, no per-expert
    names to go by; the LoRA on the original model is the trained model. (With an alpha
    pattern, which parameter each module adapts matters: the shapes tell.)"""
    from pissa_svd.peft import initialize

    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip("transformers 4 keeps the experts as nn.Linear modules")
    src = save_tiny_moe(tmp_path / "src", "qwen2_moe")
    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
        target_parameters=["gate_up_proj", "down_proj"],
        alpha_pattern=alpha_pattern,
    )
    pm = peft.get_peft_model(model, config)
    initialize(pm)
    pm.save_pretrained(tmp_path / "init")
    g = torch.Generator().manual_seed(2)
    move_adapters(pm, 0.1, g)
    pm.save_pretrained(tmp_path / "trained")
    ids = torch.randint(0, 128, (2, 12), generator=g)
    with torch.no_grad():
        want = pm.eval()(input_ids=ids).logits
    code, stdout, err = run_cli(
        "to-lora", "--init", tmp_path / "init", "--trained", tmp_path / "trained",
        "--out", tmp_path / "lora",
    )  # fmt: skip
    assert code == 0, err
    assert "for 8 modules (4 of them on fused experts)" in stdout  # q, v, gate_up, down x 2
    assert float((logits(src, ids) - want).abs().max()) > 1e-3
    torch.testing.assert_close(logits(src, ids, tmp_path / "lora"), want, atol=1e-4, rtol=1e-4)
    # An init of another expert count is refused.
    lora_config = json.loads((tmp_path / "init" / "adapter_config.json").read_text())
    patterns = {r".*\.gate_up_proj": 2, r".*\.down_proj": 2}
    lora_config["rank_pattern"] = patterns  # 4 experts of rank 4 read as 8 of rank 2
    (tmp_path / "init" / "adapter_config.json").write_text(json.dumps(lora_config))
    code, _, err = run_cli(
        "to-lora", "--init", tmp_path / "init", "--trained", tmp_path / "trained",
        "--out", tmp_path / "lora2",
    )  # fmt: skip
    assert code == 2 and not (tmp_path / "lora2").exists()
    assert "Traceback" not in err and "pass the adapter that was trained from this init" in err


def test_quiet_decompose_of_a_moe_prints_nothing(tmp_path):
    """The load check imports PEFT, which imports bitsandbytes, whose CPU backend may log a
    warning about optional kernels on import: none of it reaches a --quiet run's stderr."""
    src = save_tiny_moe(tmp_path / "src", "mixtral")
    cmd = [PYTHON, "-m", "pissa_svd", "decompose", str(src), "--rank", "4"]
    proc = subprocess.run(
        [*cmd, "--out", str(tmp_path / "out"), "--quiet"], capture_output=True, text=True
    )
    assert proc.returncode == 0 and proc.stderr == "" and proc.stdout == "", proc.stderr


def test_targets_chosen_with_a_pattern_are_load_checked(tmp_path):
    """On a dense model too, --targets may pick a 2-D weight that is no layer PEFT adapts (here
    a tensor the model class does not have: transformers ignores it, and so would PEFT's
    adapter): refused before any work. The default targets need no check (no import cost)."""
    from safetensors.torch import load_file, save_file

    from .conftest import tiny_llama_model

    src = tmp_path / "src"
    tiny_llama_model().save_pretrained(src)
    state = load_file(src / "model.safetensors")
    state["model.layers.0.extra.weight"] = torch.randn(16, 16)
    save_file(state, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(InputError, match="model.layers.0.extra") as info:
        decompose(src, tmp_path / "a", rank=4, targets=["q_proj", "extra"], quiet=True)
    assert "--exclude" in str(info.value) and not (tmp_path / "a").exists()
    report = decompose(src, tmp_path / "b", rank=4, targets=["q_proj"], quiet=True)
    assert report["load_check"].startswith("every target gets its adapter")
    report = decompose(src, tmp_path / "c", rank=4, quiet=True)
    assert report["load_check"] is None


def test_torch_backend_on_fused_experts_points_to_peft(tmp_path):
    """transformers builds Mixtral's experts as one fused parameter: the torch backend, which
    adapts nn.Linear layers, says to use the peft backend, which loads them."""
    from pissa_svd.training import load_trainable

    src = save_tiny_moe(tmp_path / "src", "mixtral")
    out = tmp_path / "out"
    decompose(src, out, rank=4, quiet=True)
    with pytest.raises(InputError, match="this model fuses its experts .*use backend='peft'"):
        load_trainable(out, backend="torch")
    assert load_trainable(out, backend="peft") is not None
