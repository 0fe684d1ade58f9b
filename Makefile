# The two entry points a newcomer needs (see README.md):
#   make demo   create .venv, install everything, run the main job on this machine's default
#   make test   create .venv, install everything, run the test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# CPU wheel of torch where no GPU build is wanted; override TORCH_SPEC for another build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test install device-wheels test-torch2.14

$(VENV)/.installed: pyproject.toml setup.py $(shell find csrc -type f)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q "$(TORCH_SPEC)" ninja
	# sam2_fast itself with its test extras and the peer runtimes bench.peers times (ONNX Runtime, OpenVINO); builds
	# the C++ extension against the torch above.
	$(PY) -m pip install -q --no-build-isolation -e ".[test,peers]"
	# The reference sam2 package, to test and benchmark against. Its encoder is pure Python and imports without
	# torchvision, so it goes in last and without its declared dependencies.
	SAM2_BUILD_CUDA=0 $(PY) -m pip install -q --no-deps --no-build-isolation sam2==1.1.0
	touch $@

install: $(VENV)/.installed

# A second environment, for what the main one cannot have: torchvision (needed by sam2's image predictor and
# automatic mask generator, and by timm) has no build for the CPU torch above. torch 2.14.1's wheel is a CUDA build
# that runs on the CPU; libtorch links the nvidia-* wheels it pulls in (3.2 GB of the environment's 5.8 GB), so they
# stay. sam2_fast goes in as a regular install, not an editable one, from a copy of what setup.py builds from: an
# editable install would build the extension in place, into sam2_fast/_C.cpython-311-x86_64-linux-gnu.so, the very
# file of the main environment's build (both are Python 3.11). The copy's build/ folder stays, so a rebuild compiles
# only what changed. Where nvcc is found the extension gets its CUDA kernels too (one architecture, the H200's, to
# keep that short); torch takes CUDA_HOME from nvcc's folder, which here is /usr/local/bin, a wrapper of
# /usr/local/cuda's, so that one is named. The reference sam2 goes in with its real dependencies this time.
# Measured on 2 shared cores, from scratch: 4 min 17 s (torch and torchvision 50 s from the local registry, sam2_fast
# with its extension 2 min 40 s, sam2 and timm 2 s) and 5.8 GB of disk; after a source change, only what changed.
TORCH2_VENV := .venv-torch2.14
TORCH2_PY := $(TORCH2_VENV)/bin/python
TORCH2_SOURCES := $(TORCH2_VENV)/src
TORCH2_SPEC ?= torch==2.14.1 torchvision==0.29.1
TORCH2_CUDA_ARCH_LIST ?= 9.0
TORCH2_BUILD_ENV := TORCH_CUDA_ARCH_LIST=$(TORCH2_CUDA_ARCH_LIST) \
	$(if $(CUDA_HOME)$(CUDA_PATH),,$(if $(wildcard /usr/local/cuda/bin/nvcc),CUDA_HOME=/usr/local/cuda))
TORCH2_PACKAGE_FILES := $(shell find sam2_fast kernels csrc -type f -not -path '*/__pycache__/*' -not -name '*.so' \
	2>/dev/null)

$(TORCH2_VENV)/.installed: pyproject.toml setup.py README.md $(TORCH2_PACKAGE_FILES)
	$(PYTHON) -m venv $(TORCH2_VENV)
	$(TORCH2_PY) -m pip install -q --upgrade pip setuptools wheel
	$(TORCH2_PY) -m pip install -q $(TORCH2_SPEC) ninja
	rm -rf $(TORCH2_SOURCES)/sam2_fast $(TORCH2_SOURCES)/kernels $(TORCH2_SOURCES)/csrc
	mkdir -p $(TORCH2_SOURCES)
	tar -c --exclude=__pycache__ --exclude='*.so' pyproject.toml setup.py README.md sam2_fast $(wildcard kernels) csrc \
		| tar -x -C $(TORCH2_SOURCES)
	$(TORCH2_BUILD_ENV) $(TORCH2_PY) -m pip install -q --no-build-isolation "./$(TORCH2_SOURCES)[test]"
	SAM2_BUILD_CUDA=0 $(TORCH2_PY) -m pip install -q --no-build-isolation sam2==1.1.0 timm
	touch $@

# The tests that skip in the main environment for want of torchvision or timm, the files around them (optimize,
# checkpoint formats, the transformers drop-in) and, of the parity tests, the tiny configs' (-k): under
# SAM2_FAST_REQUIRE_TORCHVISION=1 a missing torchvision or timm fails instead of skipping (tests/needs_torchvision.py).
# pytest runs as its own script, not `python -m pytest`, which would put the repository first on sys.path: its
# sam2_fast/ (with the main environment's extension) would shadow the installed one; test_predictors.py checks which
# one is imported. Measured on 2 shared cores: 3.5 to 5.5 min, 55 passed and 1 skipped (needs a CUDA device).
test-torch2.14: $(TORCH2_VENV)/.installed
	env SAM2_FAST_REQUIRE_TORCHVISION=1 $(TORCH2_VENV)/bin/pytest -q -rs tests/test_predictors.py \
		tests/test_optimize.py tests/test_checkpoint_formats.py tests/test_transformers_dropin.py \
		tests/test_parity.py -k "not test_parity or tiny"

demo: install
	$(PY) -m sam2_fast info
	$(PY) -m sam2_fast encode --size 512 --compare-reference
	$(PY) -m bench.report

# Every step runs even when an earlier one fails, so one red test never hides another; the summary at the end lists
# each step's result and make fails if any did. Steps: the suite; the Triton kernels under the interpreter (their
# own process: TRITON_INTERPRET is read when triton is imported); the whole model again with the C++ extension
# switched off (the package must be right on torch alone); the op tests with the CPU capped at AVX2: ATen's kernels
# (ATEN_CPU_CAPABILITY), oneDNN's (ONEDNN_MAX_CPU_ISA: its GEMMs and ATen's brgemm) and the extension's own choice of
# ISA (it follows ATen's capability), so that a machine with AVX-512 or AMX checks the AVX2 paths for real: the op
# tests and the gradient-layout tests (ops and the whole encoder). Other model-level tests stay out: on an AMX CPU
# the cap makes ATen's own bf16 SDPA raise, which they call through the reference (the one bf16 layout case skips).
# Last, what needs torchvision or timm, in its own torch 2.14 environment (test-torch2.14 above).
test: install
	@failed=0; summary=""; \
	step() { name="$$1"; shift; echo "=== $$name"; \
		if "$$@"; then summary="$$summary\n  passed: $$name"; else failed=1; summary="$$summary\n  FAILED: $$name"; fi; }; \
	step "test suite" $(PY) -m pytest -q tests -m "not interpreter"; \
	step "Triton kernels under the interpreter" env TRITON_INTERPRET=1 $(PY) -m pytest -q tests -m interpreter; \
	step "model without the C++ extension" env SAM2_FAST_DISABLE_EXT=1 \
		$(PY) -m pytest -q tests/test_parity.py tests/test_dense.py tests/test_ops_torch.py; \
	step "op tests with the CPU capped at AVX2" env ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 \
		$(PY) -m pytest -q tests/test_extension.py tests/test_ops_torch.py tests/test_dense.py tests/test_cpu_gemm.py; \
	step "gradient layouts with the CPU capped at AVX2" env ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 \
		$(PY) -m pytest -q tests/test_gradient_layouts.py; \
	step "torch 2.14 with torchvision and timm (own environment)" $(MAKE) --no-print-directory test-torch2.14; \
	printf "=== summary$$summary\n"; exit $$failed

# Wheels of the reference `sam2` and its pure-Python dependencies in .whl/, for a device machine without registry
# access: carry .whl with the working tree and bench/cuda_session.sh installs from it.
device-wheels: install
	SAM2_BUILD_CUDA=0 $(PY) -m pip wheel -q --no-deps --no-build-isolation -w .whl sam2==1.1.0
	$(PY) -m pip wheel -q --no-deps -w .whl hydra-core==1.3.8 omegaconf==2.3.1 "antlr4-python3-runtime==4.9.3" iopath portalocker
