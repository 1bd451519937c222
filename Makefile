# Two set-up commands for a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
WORKDIR ?= runs/demo
ABLATION_DIR ?= runs/ablation
export HF_HUB_OFFLINE := 1
export PYTHONPATH := $(CURDIR)

.PHONY: demo test lint format bench ablation clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.runtime: requirements.txt | $(BIN)/python
	$(BIN)/pip install --quiet -r requirements.txt
	touch $@

$(VENV)/.test: requirements-test.txt $(VENV)/.runtime
	$(BIN)/pip install --quiet -r requirements-test.txt
	touch $@

$(VENV)/.bench: requirements-bench.txt $(VENV)/.test
	$(BIN)/pip install --quiet --no-deps -r requirements-bench.txt
	touch $@

demo: $(VENV)/.runtime
	$(BIN)/python -m metaembed_jax data --config configs/demo.py
	$(BIN)/python train.py --config configs/demo.py --workdir $(WORKDIR)
	$(BIN)/python eval.py --config configs/demo.py --workdir $(WORKDIR)

# The paper's ablation at demo scale: MMR vs loss on the full budget only vs one vector, each
# trained with SEEDS seeds (config.seed = 0 .. SEEDS-1; the data stay the same), mean +- std.
SEEDS ?= 3
ablation: $(VENV)/.runtime
	$(BIN)/python -m metaembed_jax data --config configs/demo.py
	for variant in mmr nommr single; do \
	  for seed in $$(seq 0 $$(($(SEEDS) - 1))); do \
	    run=$(ABLATION_DIR)/$$variant/seed$$seed; \
	    $(BIN)/python train.py --config configs/demo.py:$$variant --workdir $$run \
	      --config.seed=$$seed || exit 1; \
	    $(BIN)/python eval.py --config configs/demo.py:$$variant --workdir $$run || exit 1; \
	  done; \
	done
	$(BIN)/python -m metaembed_jax.evaluation.ablation --names MMR nommr single \
	  --workdirs $(ABLATION_DIR)/mmr $(ABLATION_DIR)/nommr $(ABLATION_DIR)/single

# Two workers (the machine's cores; 3 measured slower, 29 min), each test file whole on one
# worker: its module fixtures are built once (work stealing split files and rebuilt them).
TEST_WORKERS ?= 2
test: $(VENV)/.test
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=30

lint: $(VENV)/.test
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

format: $(VENV)/.test
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(VENV)/.bench
	for script in benchmarks/bench_*.py; do $(BIN)/python $$script || exit 1; done

clean:
	rm -rf $(VENV) runs data_cache data_cache_*
