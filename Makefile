# The README's two commands: `make serve` and `make test`. Everything else is a helper.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
MODEL ?= qwen2.5-coder-0.5b
# llama-cpp-python compiles from source. Build for a portable x86-64 (AVX2) baseline instead of
# -march=native: AMX/AVX-512 kernels picked up natively crash in some VMs and the cached wheel must
# run on every machine of this kind. For CUDA: make serve CMAKE_ARGS="-DGGML_CUDA=on".
# On a CPU with AVX-512 VNNI/BF16, `localcoder models kernels --build` then builds the same llama.cpp once more
# with those kernels (AMX still off; ~5 min, once) and the engine loads them (ModelConfig.kernels, ~1.45x prefill).
CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
  -DGGML_AVX512=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_BF16=OFF
export CMAKE_ARGS
export CMAKE_BUILD_PARALLEL_LEVEL ?= $(shell nproc)
PIP := $(BIN)/pip install --disable-pip-version-check -c constraints.txt

.PHONY: serve test install install-test lint bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -q --upgrade pip

$(VENV)/.serve-deps: $(BIN)/python pyproject.toml constraints.txt
	$(PIP) -e '.[llama]'
	touch $@

$(VENV)/.test-deps: $(VENV)/.serve-deps
	$(PIP) -e '.[llama,train,onnx,bench,dev]'
	touch $@

install: $(VENV)/.serve-deps

install-test: $(VENV)/.test-deps

serve: $(VENV)/.serve-deps
	$(BIN)/localcoder models pull $(MODEL)
	$(BIN)/localcoder models kernels --build
	$(BIN)/localcoder serve --model $(MODEL) $(ARGS)

test: $(VENV)/.test-deps
	$(BIN)/localcoder models pull $(MODEL) --quiet
	$(BIN)/localcoder models kernels --build --quiet
	bash tests/setup_tools.sh
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(VENV)/.test-deps
	$(BIN)/localcoder bench $(ARGS)

lint:
	$(BIN)/python -m ruff check core server lsp distill quantize tests || true

clean:
	rm -rf $(VENV) build *.egg-info
