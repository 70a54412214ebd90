#!/usr/bin/env bash
# GPU check, run from the repository root on a machine with a CUDA GPU (5-10 minutes on one
# H200): build the native extension with its CUDA backend, run the CUDA tests, time all 224
# projection matrices of a LLaMA-2-7B-shaped model (bench/native_vs_torch.py --llama7b), and fit
# the planning cost model on the GPU; PART=pipeline (not part of "all": ~5 min alone) times an
# end-to-end decompose of a LLaMA-2-7B-shaped checkpoint against cp -r and PEFT
# (bench/gpu_pipeline.py). PART=tests|native|cost|pipeline runs one part only (each part builds
# first), so the check can be split across commands with a per-command time limit.
# Results: bench/results/native_vs_torch_gpu.json, bench/results/cost_model_gpu.json,
# bench/results/gpu_pipeline.json and the fitted pissa_svd/cost_model.json, copied to $OUT (when
# set) after each part, so a part cut off by a time limit keeps what the others measured; so is
# the whole output, as $OUT/gpu_check.log. Time limits per part: T_TESTS, T_NATIVE, T_COST,
# T_PIPELINE (seconds).
# Without nvcc on the machine, a _native_cuda module built elsewhere for the same Python is used.
# Within a 15-minute device budget, two commands (nothing to carry; the device has torch+CUDA):
#   for p in tests native cost; do PART=$p bash bench/gpu_check.sh; done     (timeout ~570 s)
#   PART=pipeline bash bench/gpu_check.sh                       (at once after, what is left)
set -uo pipefail
cd "$(dirname "$0")/.."
# The package from this tree, also for the scripts run from bench/ (it need not be installed).
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py="${PYTHON:-python3}"  # the interpreter that holds torch (on the GPU machine: python3)
status=0
stamp="$(mktemp)"  # results written after this are this run's
if [ -n "${OUT:-}" ]; then
    exec > >(tee -a "$OUT/gpu_check.log") 2>&1
fi
save() {  # this run's results so far, into $OUT
    [ -n "${OUT:-}" ] || return 0
    for f in bench/results/native_vs_torch_gpu.json bench/results/cost_model_gpu.json \
        bench/results/gpu_pipeline.json pissa_svd/cost_model.json; do
        if [ -f "$f" ] && [ "$f" -nt "$stamp" ]; then
            cp "$f" "$OUT/$(basename "$(dirname "$f")")_$(basename "$f")"
        fi
    done
    cp bench/_work/gpu_pipeline/logs/*.log "$OUT/" 2>/dev/null || true
}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
df -h . /tmp 2>/dev/null || true
if ! command -v nvcc >/dev/null && [ -x /usr/local/cuda/bin/nvcc ]; then
    export PATH="/usr/local/cuda/bin:$PATH" CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
fi

"$py" -c "import sys, setuptools, torch; print('python', sys.version.split()[0], '| setuptools',
setuptools.__version__, '| torch', torch.__version__, '| cuda', torch.cuda.is_available())" || true
part="${PART:-all}"

# The pipeline part needs no native build (decompose's auto backend on CUDA is torch).
if [ "$part" = pipeline ]; then
    :
elif command -v nvcc >/dev/null || [ -n "${CUDA_HOME:-}" ]; then
    # Only the GPU at hand (sm_90 on an H200): one architecture compiles in a third of the time.
    export PISSA_SVD_CUDA_ARCH="${PISSA_SVD_CUDA_ARCH:-$("$py" -c "import torch
print(''.join(map(str, torch.cuda.get_device_capability())))" 2>/dev/null || echo 90)}"
    build_dir="$PWD"  # incremental: build/ stays between the calls on a warm machine
    if ! "$py" -c "import setuptools, sys; sys.exit(int(setuptools.__version__.split('.')[0]) < 77)"; then
        # An older setuptools rejects pyproject.toml's license string: build from a folder
        # without it (links to the sources; the modules land in pissa_svd/ all the same).
        build_dir="$(mktemp -d)"
        cp setup.py "$build_dir/"
        ln -s "$PWD/csrc" "$build_dir/csrc" && ln -s "$PWD/pissa_svd" "$build_dir/pissa_svd"
    fi
    (cd "$build_dir" && "$py" setup.py build_ext --inplace 2>&1) | grep -Ei "pissa-svd build|error" || true
else
    # Modules built elsewhere travel only when named in the run's carry (they are ignored by
    # git) and load only under the Python version they were built for.
    echo "gpu_check: no nvcc here; using the prebuilt modules in pissa_svd/ if any"
    ls pissa_svd/_native*.so 2>/dev/null || true
fi
"$py" -m pissa_svd env || status=1
if [ "$part" != pipeline ]; then
    "$py" -c "from pissa_svd import native; ok, why = native.available('cuda'); print('native cuda:', ok, why); assert ok" || status=1
fi

if [ "$part" = all ] || [ "$part" = tests ]; then
    # Launches blocking: a kernel fault is reported at its own call, not at a later sync.
    CUDA_LAUNCH_BLOCKING=1 timeout "${T_TESTS:-240}" "$py" -m pytest -q -p no:cacheprovider \
        tests/test_native.py tests/test_overlap.py -k "cuda or matches" || status=1
    save
fi
if [ "$part" = all ] || [ "$part" = native ]; then
    timeout "${T_NATIVE:-300}" "$py" bench/native_vs_torch.py --llama7b --repeats 3 || status=1
    save
fi
if [ "$part" = all ] || [ "$part" = cost ]; then
    # The planning cost model's CUDA coefficients (pissa_svd/cost_model.json, "cuda" entry).
    # Its own JSON (the CPU fit's stays as it is); the fitted file keeps the cpu entry.
    (cd bench && timeout "${T_COST:-300}" "$py" cost_model.py --device cuda --no-md \
        --json results/cost_model_gpu.json) || status=1
    save
fi
if [ "$part" = pipeline ]; then
    (cd bench && timeout "${T_PIPELINE:-480}" "$py" gpu_pipeline.py --device cuda) || status=1
    save
fi
exit $status
