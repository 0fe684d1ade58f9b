# The two entry points a newcomer needs (see README.md):
#   make demo   create .venv, install everything, run the main job on this machine's default
#   make test   create .venv, install everything, run the test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# CPU wheel of torch where no GPU build is wanted; override TORCH_SPEC for another build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test install

$(VENV)/.installed: pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*.cu)
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
	$(PY) -m sam2_fast.cli info
	$(PY) -m sam2_fast.cli encode --size 512 --compare-reference
	$(PY) -m bench.report

test: install
	$(PY) -m pytest -q tests -m "not interpreter"
	TRITON_INTERPRET=1 $(PY) -m pytest -q tests -m interpreter
	# The whole model again with the C++ extension switched off: the package must be right on torch alone.
	SAM2_FAST_DISABLE_EXT=1 $(PY) -m pytest -q tests/test_parity.py tests/test_dense.py tests/test_ops_torch.py
