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
	$(PY) -m pip install -q "$(TORCH_SPEC)" numpy triton ninja
	$(PY) -m pip install -q pytest pytest-benchmark tqdm pillow hydra-core iopath safetensors matplotlib
	SAM2_BUILD_CUDA=0 $(PY) -m pip install -q --no-deps --no-build-isolation sam2==1.1.0
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m sam2_fast.demo

test: install
	$(PY) -m pytest -q tests -m "not interpreter"
	TRITON_INTERPRET=1 $(PY) -m pytest -q tests -m interpreter
