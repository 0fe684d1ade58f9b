# The two entry points a newcomer needs (see README.md):
#   make demo   create .venv, install everything, run the main job on this machine's default
#   make test   create .venv, install everything, run the test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# CPU wheel of torch where no GPU build is wanted; override TORCH_SPEC for another build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test install device-wheels

$(VENV)/.installed: pyproject.toml setup.py $(shell find csrc -type f)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q "$(TORCH_SPEC)" ninja
	# sam2_fast itself with its test extras; builds the C++ extension against the torch above.
	$(PY) -m pip install -q --no-build-isolation -e ".[test]"
	# The reference sam2 package, to test and benchmark against. Its encoder is pure Python and imports without
	# torchvision, so it goes in last and without its declared dependencies.
	SAM2_BUILD_CUDA=0 $(PY) -m pip install -q --no-deps --no-build-isolation sam2==1.1.0
	touch $@

install: $(VENV)/.installed

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
	printf "=== summary$$summary\n"; exit $$failed

# Wheels of the reference `sam2` and its pure-Python dependencies in .whl/, for a device machine without registry
# access: carry .whl with the working tree and bench/cuda_session.sh installs from it.
device-wheels: install
	SAM2_BUILD_CUDA=0 $(PY) -m pip wheel -q --no-deps --no-build-isolation -w .whl sam2==1.1.0
	$(PY) -m pip wheel -q --no-deps -w .whl hydra-core==1.3.8 omegaconf==2.3.1 "antlr4-python3-runtime==4.9.3" iopath portalocker
