"""The planning cost model: its terms, the fitted file, and what --dry-run prints from it."""

from __future__ import annotations

import json

import pytest

from pissa_svd import costmodel
from pissa_svd.pipeline import Options, _batch_cost, make_plan


def test_terms_follow_the_algorithms():
    halko = costmodel.features(2048, 5632, 64, method="halko", niter=4, oversample=16)
    krylov = costmodel.features(2048, 5632, 64, method="krylov", niter=4, oversample=16)
    exact = costmodel.features(2048, 5632, 64, method="exact", niter=4, oversample=16)
    # 2q + 2 = 10 thin passes with 80 columns, plus the residual's GEMM with 64.
    assert halko["gemm_flop"] == 10 * 2 * 2048 * 5632 * 80 + 2 * 2048 * 5632 * 64
    assert krylov["gemm_flop"] == halko["gemm_flop"]  # the same passes over W ...
    assert krylov["dense_flop"] > 3 * halko["dense_flop"]  # ... and a 5x wider basis
    assert exact["svd_flop"] > 0 and halko["svd_flop"] == krylov["svd_flop"] == 0
    assert (
        costmodel.features(2048, 5632, 64, method="halko", niter=2, oversample=16)["gemm_flop"]
        < halko["gemm_flop"]
    )
    four = costmodel.features(512, 512, 16, method="halko", niter=4, oversample=16, batch=4)
    one = costmodel.features(512, 512, 16, method="halko", niter=4, oversample=16)
    assert four["calls"] == one["calls"] == 1  # one batched call
    assert four["gemm_flop"] == 4 * one["gemm_flop"] and four["elements"] == 4 * one["elements"]


@pytest.mark.parametrize(("method", "k_passes", "two_k_passes"), [
    ("halko", 9, 1), ("krylov2", 7, 3), ("krylov3", 5, 5), ("krylov", 1, 9),
])  # fmt: skip
def test_bf16_sketch_counts_its_passes_apart(method, k_passes, two_k_passes):
    """niter 4: the sketch and the lead blocks' passes have k columns; the kept blocks' and the
    last pass split their operand into bf16 hi + lo, 2k columns (linalg._block_krylov)."""
    m, n, k = 2048, 5632, 64
    fp32 = costmodel.features(m, n, k, method=method, niter=4, oversample=0)
    bf16 = costmodel.features(m, n, k, method=method, niter=4, oversample=0, bf16_sketch=True)
    pass_flop = 2 * m * n * k
    assert bf16["bf16_gemm_flop"] == (k_passes + 2 * two_k_passes) * pass_flop
    assert bf16["gemm_flop"] == pass_flop == fp32["gemm_flop"] - 10 * pass_flop  # the residual
    assert fp32["bf16_gemm_flop"] == 0
    assert {key: v for key, v in bf16.items() if "gemm" not in key} == {
        key: v for key, v in fp32.items() if "gemm" not in key
    }
    exact = dict(method="exact", niter=4, oversample=0)
    assert costmodel.features(m, n, k, **exact, bf16_sketch=True) == costmodel.features(
        m, n, k, **exact
    )


def test_dry_run_prices_the_bf16_sketch_at_its_own_rate(tiny_llama, tmp_path, monkeypatch):
    fit = json.loads(costmodel.MODEL_FILE.read_text())["devices"]["cpu"]
    fast = {**fit, "coef": {**fit["coef"], "bf16_gemm_flop": fit["coef"]["gemm_flop"] / 100}}
    monkeypatch.setattr(costmodel, "_fitted", lambda: {"cpu": fast})

    def planned_seconds(sketch):
        opts = Options(rank=8, method="halko", sketch_dtype=sketch)
        plan = make_plan(tiny_llama, tmp_path / "out", opts)
        assert f"sketch {sketch}" in plan.describe()
        return sum(_batch_cost(plan, b) for b in plan.batches)

    assert planned_seconds("bf16") < planned_seconds("fp32")
    # A fit without bf16-sketch points prices its passes at the fp32 GEMM rate, and says so.
    del fast["coef"]["bf16_gemm_flop"]
    coef, note = costmodel.coefficients("cpu")
    assert coef["bf16_gemm_flop"] == coef["gemm_flop"] and "bf16 sketch not measured" in note


def test_bf16_sketch_plans_memory_for_its_bf16_copy(tiny_llama, tmp_path):
    plans = {
        s: make_plan(tiny_llama, tmp_path / "out", Options(rank=8, method="halko", sketch_dtype=s))
        for s in ("fp32", "bf16")
    }
    batch = max(plans["fp32"].batches, key=len)
    t, b = batch[0], len(batch)
    assert b > 1  # a batch of several reads a bf16 copy of them
    extra = t.working_bytes(0, b, bf16_sketch=True) - t.working_bytes(0, b)
    assert extra == b * t.out_features * t.in_features * 2
    assert plans["bf16"].working_bytes >= plans["fp32"].working_bytes


def test_fitted_file_is_complete_and_positive():
    data = json.loads(costmodel.MODEL_FILE.read_text())
    assert "cpu" in data["devices"]
    for fit in data["devices"].values():
        assert set(fit["coef"]) == {*costmodel.FEATURES, "io_bytes"}
        assert all(v >= 0 for v in fit["coef"].values()) and fit["coef"]["io_bytes"] > 0
        assert len(fit["points"]) >= 10 and all(p["seconds"] > 0 for p in fit["points"])
        # The fit explains its own points within its stated worst error.
        for p in fit["points"]:
            m, n = p["shape"]
            f = costmodel.features(
                m, n, p["rank"], method=p["method"], niter=p["niter"], oversample=p["oversample"],
                batch=p["batch"], bf16_sketch=p.get("sketch") == "bf16",
                quantize=p.get("quantize"), quant_iters=p.get("quant_iters", 0),
            )  # fmt: skip
            pred = sum(fit["coef"][k] * f[k] for k in costmodel.FEATURES)
            assert abs(pred / p["seconds"] - 1) <= fit["max_rel_err"] + 1e-9


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_qpissa_terms(scheme):
    """T + 1 SVDs, T rebuilt residuals, T + 3 quantization passes, member by member."""
    m, n, r, T = 2048, 5632, 64, 5
    one = costmodel.features(m, n, r, method="krylov2", niter=4, oversample=0)
    q = costmodel.features(
        m, n, r, method="krylov2", niter=4, oversample=0, quantize=scheme, quant_iters=T, batch=3
    )
    assert q["dense_flop"] == 3 * (T + 1) * one["dense_flop"]
    assert q["gemm_flop"] == 3 * ((T + 1) * one["gemm_flop"] + T * 2 * m * n * r)
    assert q[f"{scheme}_elements"] == 3 * (T + 3) * m * n
    assert q["calls"] == 3 * (T + 1)  # not batched
    other = {"nf4": "int8", "int8": "nf4"}[scheme]
    assert q[f"{other}_elements"] == one[f"{scheme}_elements"] == 0


def test_dry_run_prices_and_sizes_qpissa(tiny_llama, tmp_path):
    plain = make_plan(tiny_llama, tmp_path / "out", Options(rank=8))
    qpissa = make_plan(tiny_llama, tmp_path / "out", Options(rank=8, quantize="nf4"))
    batch = qpissa.batches[0]
    assert _batch_cost(qpissa, batch) > 6 * _batch_cost(plain, batch)  # T + 1 = 6 SVDs and more
    t = batch[0]
    work = t.out_features * t.in_features * 4  # one fp32 matrix of the member
    kept = 3 * min(work, 32 << 20)  # what glibc may keep of its freed temporaries
    assert qpissa.batch_working_bytes(batch) == plain.batch_working_bytes(batch) + 4 * work + kept
    assert max(len(b) for b in plain.batches) > 1  # same-shape matrices batched ...
    assert all(len(b) == 1 for b in qpissa.batches)  # ... but QPiSSA takes one at a time
    assert "quantize     nf4 residual (QPiSSA), 5 rounds" in qpissa.describe()
    assert "quantize " not in plain.describe()


def test_plan_keeps_the_largest_buffers_of_all_batches(tiny_llama, tmp_path, monkeypatch):
    """Buffers are reused and grown, never shrunk: a plan with a wide batch of small matrices
    and a narrow one of large matrices must count the wide batch's buffers together with the
    large matrices' temporaries, which is more than either batch's own working set."""
    plan = make_plan(tiny_llama, tmp_path / "out", Options(rank=8, batch_memory=1 << 30))
    parts = [b[0].memory(plan.oversample, len(b), plan.overlap) for b in plan.batches]
    held = {k: max(h[k] for h, _ in parts) for k in parts[0][0]}
    assert plan.working_bytes == sum(held.values()) + max(f for _, f in parts)
    wide, narrow = plan.batches[:2]
    fake = {  # buffers by name and fresh bytes: the wide batch's work buffer is the largest
        wide[0].name: ({"read": 10, "work": 100, "out": 1, "sketch": 0}, 5),
        narrow[0].name: ({"read": 50, "work": 20, "out": 2, "sketch": 0}, 70),
    }
    monkeypatch.setattr(type(wide[0]), "memory", lambda self, *a: fake[self.name])
    assert plan.batch_working_bytes(wide) == 116 and plan.batch_working_bytes(narrow) == 142
    assert plan.peak_working_bytes([wide, narrow]) == 50 + 100 + 2 + 70


def test_seconds_grow_with_work():
    small = costmodel.features(1024, 1024, 16, method="halko", niter=4, oversample=16)
    big = costmodel.features(4096, 11008, 64, method="halko", niter=4, oversample=16)
    assert costmodel.seconds(big, "cpu") > 10 * costmodel.seconds(small, "cpu") > 0
    assert costmodel.seconds(small, "cpu", io_bytes=1e9) > costmodel.seconds(small, "cpu")


def test_unmeasured_device_says_its_rates_are_a_guess(monkeypatch):
    monkeypatch.setattr(costmodel, "_fitted", lambda: {})
    coef, note = costmodel.coefficients("cuda")
    assert "no measured points" in note and set(coef) >= set(costmodel.FEATURES)


@pytest.mark.parametrize("processes", [1, 3])
def test_dry_run_prints_per_rank_estimates_from_the_model(tiny_llama, tmp_path, processes):
    plan = make_plan(tiny_llama, tmp_path / "out", Options(rank=8, processes=processes))
    text = plan.describe()
    _, note = costmodel.coefficients("cpu")
    assert note in text and "fitted to" in note
    ranks = [line for line in text.splitlines() if line.strip().startswith("rank ")]
    assert len(ranks) == processes
