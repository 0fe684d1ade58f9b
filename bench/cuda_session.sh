#!/usr/bin/env bash
# Everything that needs a CUDA GPU, in two calls sized for a 15-minute lease (a machine start takes minutes of it):
#
#   CALL=1 bash bench/cuda_session.sh   (about 8 minutes; BUDGET_S, default 480)
#     1. install sam2_fast (editable), the reference `sam2` and its deps from wheels in .whl/ (no registry on the
#        device), and build the C++/CUDA extension in the background;
#     2. the Triton kernel tests on the GPU, forward and backward (model-sized shapes switch on there), in parallel
#        with the build;
#     3. the GPU tests: CUDA-graph capture, the extension's CUDA kernels, the whole encoder vs sam2 on the GPU, the
#        encoder's gradients vs the float64 reference;
#     4. benchmark, eager and captured: tiny, base_plus, large at 1024, batch 1 and 8, bf16 autocast and bf16 cast;
#     5. the GPU profile (kernel time per category and GPU idle, the reference beside ours);
#     6. benchmark, compiled in the default and reduce-overhead modes, both sides (base_plus 1024, batch 1 and 8).
#   CALL=2 bash bench/cuda_session.sh   (about 4 minutes; BUDGET_S, default 240; right after call 1, while the
#                                        machine is still warm and the extension built)
#     7. the compiled and exported GPU tests (our kernels in inductor's code, no recompiles, the AOT package);
#     8. benchmark, max-autotune, both sides (base_plus 1024, batch 1), with each side's compile time ("first call"):
#        autotuning is bounded to ATen + Triton GEMM templates in the default search space, with its compile
#        workers on every core, and the step has its own time limit;
#     9. time to the first output in a fresh process: eager, torch.compile cold and warm, the reference compiled,
#        the AOT package, capture;
#    10. transformers' Sam2Model.get_image_embeddings before and after sam2_fast.optimize (tiny 1024, batch 1; needs
#        transformers installed);
#    11. the training step (forward + backward), reference vs sam2_fast with and without activation checkpointing:
#        base_plus 1024, batch 4, bf16 autocast (whatever time is left, at most 60 s).
#
# STEPS overrides the call's step list (triton_tests gpu_tests bench_eager profile bench_compile gpu_compile_tests
# bench_autotune cold_start transformers_embeddings train_step); GPU_TESTS_K narrows the GPU tests (a pytest -k expression). Every step has its own time limit inside
# BUDGET_S, so a hang or a slow compile costs only its own step. Logs and results go to $OUT (default
# ./cuda-session-out): log.txt, build.log, and one folder per benchmark; copy them under bench/results/ after.
# Usage: CALL=1 bash bench/cuda_session.sh    (from the repository root, with python3 holding a CUDA torch; on a
# device without registry access, build .whl/ here first with `make device-wheels` and carry it along)
set -uo pipefail
CALL=${CALL:-1}
OUT=${OUT:-cuda-session-out}
PY=${PYTHON:-python3}
if [[ "$CALL" == 1 ]]; then
    BUDGET_S=${BUDGET_S:-480}
    STEPS=${STEPS:-triton_tests gpu_tests bench_eager profile bench_compile}
else
    BUDGET_S=${BUDGET_S:-240}
    STEPS=${STEPS:-gpu_compile_tests bench_autotune cold_start transformers_embeddings train_step}
fi
GPU_TESTS_K=${GPU_TESTS_K:-not compiled and not exported}
wanted() { [[ " $STEPS " == *" $1 "* ]]; }
START=$(date +%s)
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1

step() { echo; echo "=== [call $CALL, $(( $(date +%s) - START )) s] $*"; }
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
if [[ "$CALL" == 1 ]] || ! compgen -G "sam2_fast/_C*.so" >/dev/null; then
    # The package first without the extension (seconds), so the Triton tests can run while the extension builds.
    SAM2_FAST_BUILD_EXT=0 $PY -m pip install -q --no-deps --no-build-isolation -e . || exit 1
    step "build the C++/CUDA extension (background)"
    rm -f sam2_fast/_C*.so
    (
        build_start=$(date +%s)
        SAM2_FAST_EXT_REQUIRED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} \
            timeout "$(limit 240)" $PY setup.py -q build_ext --inplace >"$OUT/build.log" 2>&1
        echo "build rc $? in $(( $(date +%s) - build_start )) s" >>"$OUT/build.log"
    ) &
    BUILD_PID=$!
else
    BUILD_PID=""
fi
$PY -c "import sam2, sam2_fast; print('sam2', sam2.__file__, 'sam2_fast', sam2_fast.__file__)" || exit 1

if wanted triton_tests; then
    step "Triton kernel tests on the GPU"
    timeout "$(limit 150)" $PY -m pytest -q -p no:cacheprovider -p no:warnings $XDIST \
        tests/test_triton_attention.py tests/test_triton_pool_fpn.py tests/test_triton_backward.py
    echo "triton tests rc $?"
fi

if [[ -n "$BUILD_PID" ]]; then
    step "wait for the extension build"
    wait "$BUILD_PID"
    tail -n 5 "$OUT/build.log"
fi
$PY -c "import sam2_fast; from sam2_fast.backends import extension as _extension; print('extension:', _extension.load_error() or 'loaded', _extension.device_types()); print(sam2_fast.active_backends('cuda'))"

if wanted gpu_tests; then
    step "GPU tests: capture, extension CUDA kernels, whole encoder vs sam2 on the GPU"
    timeout "$(limit 150)" $PY -m pytest -q -p no:cacheprovider -p no:warnings $XDIST -rP -m gpu -k "$GPU_TESTS_K" \
        tests/test_capture.py tests/test_extension.py tests/test_gpu_model.py tests/test_training.py
    echo "gpu tests rc $?"
fi

if wanted bench_eager; then
    step "benchmark, eager and captured: tiny, base_plus, large at 1024, batch 1 and 8"
    timeout "$(limit 120)" $PY -m bench.report --device cuda --configs tiny,base_plus,large --sizes 1024 \
        --batches 1,8 --dtypes bf16-autocast,bf16 --impls reference,auto,auto+capture --ops none --repeats 10 \
        --out "$OUT/eager"
    echo "eager bench rc $?"
fi

if wanted profile; then
    step "GPU profile: base_plus 1024, batch 1 and 8, bf16 autocast"
    timeout "$(limit 60)" $PY -m bench.profile --device cuda --configs base_plus --sizes 1024 --batches 1,8 \
        --dtypes bf16-autocast --forwards 5 --out "$OUT/profile"
    echo "profile rc $?"
fi

if wanted bench_compile; then
    for mode in default reduce-overhead; do
        step "benchmark, compiled ($mode): reference vs sam2_fast, base_plus 1024, batch 1 and 8"
        timeout "$(limit 150)" $PY -m bench.report --device cuda --configs base_plus --sizes 1024 --batches 1,8 \
            --dtypes bf16-autocast --impls reference,auto+capture,reference+compile,auto+compile --ops none \
            --repeats 10 --compile-mode "$mode" --out "$OUT/compile-$mode"
        echo "compile bench ($mode) rc $?"
    done
fi

if wanted gpu_compile_tests; then
    step "GPU tests: compiled (default, reduce-overhead) and exported encoders"
    timeout "$(limit 120)" $PY -m pytest -q -p no:cacheprovider -p no:warnings -rP -m gpu -k "compiled or exported" \
        tests/test_gpu_model.py
    echo "gpu compile tests rc $?"
fi

if wanted bench_autotune; then
    step "benchmark, max-autotune (bounded): reference vs sam2_fast, base_plus 1024, batch 1"
    TORCHINDUCTOR_MAX_AUTOTUNE_GEMM_BACKENDS=ATEN,TRITON TORCHINDUCTOR_MAX_AUTOTUNE_GEMM_SEARCH_SPACE=DEFAULT \
    TORCHINDUCTOR_COMPILE_THREADS=$(nproc) \
        timeout "$(limit 170)" $PY -m bench.report --device cuda --configs base_plus --sizes 1024 --batches 1 \
        --dtypes bf16-autocast --impls reference,auto+capture,reference+compile,auto+compile --ops none \
        --repeats 10 --compile-mode max-autotune --out "$OUT/compile-max-autotune"
    echo "autotune bench rc $?"
fi

if wanted cold_start; then
    step "time to the first output in a fresh process: base_plus 1024, batch 1, bf16 autocast"
    timeout "$(limit 120)" $PY -m bench.cold_start --device cuda --config base_plus --size 1024 \
        --dtype bf16-autocast --out "$OUT/cold-start"
    echo "cold start rc $?"
fi

if wanted transformers_embeddings; then
    step "transformers Sam2Model.get_image_embeddings before and after sam2_fast.optimize: tiny 1024, batch 1 (needs transformers)"
    timeout "$(limit 45)" $PY -m bench.transformers_embeddings --device cuda --config tiny --size 1024 --rounds 10 \
        --out "$OUT/transformers-embeddings"
    echo "transformers embeddings rc $?"
fi

if wanted train_step; then
    step "training step: base_plus 1024, batch 4, bf16 autocast, reference vs sam2_fast (+ checkpointing)"
    timeout "$(limit 60)" $PY -m bench.train_step --device cuda --configs base_plus --sizes 1024 --batch 4 \
        --dtypes bf16-autocast --repeats 3 --out "$OUT/train-step"
    echo "train step rc $?"
fi

step "summary"
grep -h "\[cuda parity\]" "$OUT/log.txt" | sort -u
grep -hE "^(FAILED|ERROR)|passed|failed|rc [0-9]" "$OUT/log.txt" | grep -v "^FAILED.*\[cuda parity\]" | tail -n 40
echo "total $(( $(date +%s) - START )) s"
