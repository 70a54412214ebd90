#!/usr/bin/env bash
# GPU check, run from the repository root on a machine with a CUDA GPU (5-10 minutes on one
# H200): build the native extension with its CUDA backend, run the CUDA tests, time all 224
# projection matrices of a LLaMA-2-7B-shaped model (bench/native_vs_torch.py --llama7b), and fit
# the planning cost model on the GPU; PART=pipeline (not part of "all": ~5 min alone) times an
# end-to-end decompose of a LLaMA-2-7B-shaped checkpoint against cp -r and PEFT
# (bench/gpu_pipeline.py). PART=tests|native|cost|pipeline runs one part only (each part builds
# first), so the check can be split across commands with a per-command time limit.
# Results: bench/results/native_vs_torch_gpu.json, bench/results/cost_model.json and the
# fitted pissa_svd/cost_model.json (all copied to $OUT when set).
# Without nvcc on the machine, a _native_cuda module built elsewhere for the same Python is used.
set -uo pipefail
cd "$(dirname "$0")/.."
# The package from this tree, also for the scripts run from bench/ (it need not be installed).
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py="${PYTHON:-python3}"  # the interpreter that holds torch (on the GPU machine: python3)
status=0
stamp="$(mktemp)"  # results written after this are this run's
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true

if command -v nvcc >/dev/null || [ -n "${CUDA_HOME:-}" ]; then
    "$py" setup.py -q build_ext --inplace 2>&1 | grep -Ei "pissa-svd build|error" || true
else
    echo "gpu_check: no nvcc here; using the prebuilt modules in pissa_svd/ if any"
    ls pissa_svd/_native*.so 2>/dev/null || true
fi
"$py" -m pissa_svd env || status=1
"$py" -c "from pissa_svd import native; ok, why = native.available('cuda'); print('native cuda:', ok, why); assert ok" || status=1

part="${PART:-all}"
if [ "$part" = all ] || [ "$part" = tests ]; then
    # Launches blocking: a kernel fault is reported at its own call, not at a later sync.
    CUDA_LAUNCH_BLOCKING=1 timeout 240 "$py" -m pytest -q -p no:cacheprovider \
        tests/test_native.py tests/test_overlap.py -k "cuda or matches" || status=1
fi
if [ "$part" = all ] || [ "$part" = native ]; then
    timeout 300 "$py" bench/native_vs_torch.py --llama7b --repeats 3 || status=1
fi
if [ "$part" = all ] || [ "$part" = cost ]; then
    # The planning cost model's CUDA coefficients (pissa_svd/cost_model.json, "cuda" entry).
    (cd bench && timeout 300 "$py" cost_model.py --device cuda --no-md) || status=1
fi
if [ "$part" = pipeline ]; then
    (cd bench && timeout 570 "$py" gpu_pipeline.py --device cuda) || status=1
fi

if [ -n "${OUT:-}" ]; then
    for f in bench/results/native_vs_torch_gpu.json bench/results/cost_model.json \
        bench/results/gpu_pipeline.json pissa_svd/cost_model.json; do
        [ "$f" -nt "$stamp" ] && cp "$f" "$OUT/$(basename "$(dirname "$f")")_$(basename "$f")"
    done
fi
exit $status
