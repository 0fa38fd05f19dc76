# Every target installs what it needs on first use (.venv at the repo root).
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# torch==2.13.0 is a CPU build that lies on disk on our CI machines; elsewhere pip fetches it.
TORCH   ?= torch==2.13.0
ARGS    ?=

.PHONY: install test compile-check train train-sft train-rm train-ppo eval experiment bench lint clean

install: $(STAMP)
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev,bench]"
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest tests -p no:cacheprovider

# every kernel x every flag combination, and every autotune config of the main variants, compiled for
# sm_90 and sm_80 without a GPU (644 compiles, not yet timed; an estimated 45-90 min on 2 cores)
compile-check: install
	$(BIN)/python -m pytest tests/test_compile.py -p no:cacheprovider --slow -k full_sweep

lint: install
	$(BIN)/ruff check kernels model trainers benchmarks tests

train: install
	$(BIN)/factrl pipeline $(ARGS)

train-sft: install
	$(BIN)/factrl sft $(ARGS)

train-rm: install
	$(BIN)/factrl rm $(ARGS)

train-ppo: install
	$(BIN)/factrl ppo $(ARGS)

eval: install
	$(BIN)/factrl eval $(ARGS)

# SFT once, then a vanilla and a fact-augmented RM + PPO per seed (experiment.seeds), evaluated
experiment: install
	$(BIN)/factrl experiment $(ARGS)

bench: install
	$(BIN)/python benchmarks/run_all.py $(ARGS)

clean:
	rm -rf runs .pytest_cache
