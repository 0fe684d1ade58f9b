#!/usr/bin/env bash
# Everything that needs a CUDA GPU, in one pass sized for a short lease on a lent machine:
#   1. install sam2_fast (editable) and build the C++/CUDA extension (timed), the reference `sam2` from
#      wheels in .whl/ if there are any (a machine without registry access);
#   2. the Triton kernel tests on the GPU (model-sized shapes switch on there), in parallel with the build;
#   3. the GPU tests: the extension's CUDA kernels and the whole encoder against `sam2` on the GPU;
#   4. the benchmark vs the reference, eager (whole encoder and per op), then under torch.compile.
# Every step has its own time limit inside BUDGET_S seconds (default 520), so a hang or a slow compile costs
# only its own step. STEPS (default: all) picks among triton_tests, bench_eager, gpu_tests, bench_compile;
# GPU_TESTS_K narrows the GPU tests (a pytest -k expression); COMPILE_MODE sets the compiled benchmark's mode. Logs and results go to $OUT (default
# ./cuda-session-out): log.txt, build.log, eager/, compile/.
# Usage: bash bench/cuda_session.sh    (from the repository root, with python3 holding a CUDA torch)
set -uo pipefail
OUT=${OUT:-cuda-session-out}
BUDGET_S=${BUDGET_S:-520}
PY=${PYTHON:-python3}
STEPS=${STEPS:-triton_tests bench_eager gpu_tests bench_compile}
GPU_TESTS_K=${GPU_TESTS_K:-not compiled}
# max-autotune (the comparison) took over 5 minutes for the reference alone on an H200; "default" fits a
# short lease.
COMPILE_MODE=${COMPILE_MODE:-max-autotune}
wanted() { [[ " $STEPS " == *" $1 "* ]]; }
START=$(date +%s)
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1

step() { echo; echo "=== [$(( $(date +%s) - START )) s] $*"; }
# limit CAP: CAP seconds, or what is left of the budget less a margin for the last steps, whichever is less.
limit() { local left=$(( START + BUDGET_S - $(date +%s) - 5 )); (( left < $1 )) && echo $(( left > 1 ? left : 1 )) || echo "$1"; }
XDIST=""
$PY -c "import xdist" 2>/dev/null && XDIST="-n 8"

step "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader
$PY -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name(), torch.cuda.get_device_capability())"
nproc

step "install"
if compgen -G ".whl/*.whl" >/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# The package first without the extension (seconds), so the Triton tests can run while the extension builds.
SAM2_FAST_BUILD_EXT=0 $PY -m pip install -q --no-deps --no-build-isolation -e . || exit 1
$PY -c "import sam2, sam2_fast; print('sam2', sam2.__file__, 'sam2_fast', sam2_fast.__file__)" || exit 1

step "build the C++/CUDA extension (background)"
rm -f sam2_fast/_C*.so
(
    build_start=$(date +%s)
    SAM2_FAST_EXT_REQUIRED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} \
        timeout "$(limit 240)" $PY setup.py -q build_ext --inplace >"$OUT/build.log" 2>&1
    echo "build rc $? in $(( $(date +%s) - build_start )) s" >>"$OUT/build.log"
) &
BUILD_PID=$!

if wanted triton_tests; then
    step "Triton kernel tests on the GPU"
    timeout "$(limit 170)" $PY -m pytest -q -p no:cacheprovider -p no:warnings $XDIST \
        tests/test_triton_attention.py tests/test_triton_pool_fpn.py
    echo "triton tests rc $?"
fi

step "wait for the extension build"
wait $BUILD_PID
tail -n 5 "$OUT/build.log"
$PY -c "import sam2_fast; from sam2_fast import _extension; print('extension:', _extension.load_error() or 'loaded', _extension.device_types()); print(sam2_fast.active_backends('cuda'))"

if wanted bench_eager; then
    step "benchmark, eager: base_plus 1024, batch 1 and 8, bf16 autocast, whole encoder and per op"
    timeout "$(limit 130)" $PY -m bench.report --device cuda --configs base_plus --sizes 1024 --batches 1,8 \
        --dtypes bf16-autocast --impls reference,torch,triton,auto --repeats 5 --out "$OUT/eager"
    echo "eager bench rc $?"
fi

if wanted gpu_tests; then
    step "GPU tests: extension CUDA kernels, whole encoder vs sam2 on the GPU"
    timeout "$(limit 150)" $PY -m pytest -q -p no:cacheprovider -p no:warnings $XDIST -rP -m gpu -k "$GPU_TESTS_K" \
        tests/test_extension.py tests/test_gpu_model.py
    echo "gpu tests rc $?"
fi

if wanted bench_compile; then
    step "benchmark, compiled ($COMPILE_MODE): reference vs sam2_fast, batch 1"
    timeout "$(limit 600)" $PY -m bench.report --device cuda --configs base_plus --sizes 1024 --batches 1 \
        --dtypes bf16-autocast --impls reference,auto,reference+compile,auto+compile --ops none --repeats 5 \
        --compile-mode "$COMPILE_MODE" --out "$OUT/compile"
    echo "compile bench rc $?"
fi

step "summary"
grep -h "\[cuda parity\]" "$OUT/log.txt" | sort -u
grep -hE "^(FAILED|ERROR)|passed|failed|rc [0-9]" "$OUT/log.txt" | grep -v "^FAILED.*\[cuda parity\]" | tail -n 40
echo "total $(( $(date +%s) - START )) s"
