# Two entry points: `make quickstart` and `make test`. Both build the same virtual environment.
VENV ?= .venv
PYTHON ?= python3
# The CPU build keeps CI and laptops fast; GPU users install their CUDA build of torch first (any torch>=2.11,<3 works).
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install quickstart test lint typecheck docs docs-serve unit dist-check floors-check bench bench-comm bench-finetune bench-scale selfcheck clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

quickstart: $(STAMP)
	$(BIN)/lightning-memopt fit --config recipes/quickstart.yaml

lint: $(STAMP)
	$(BIN)/ruff check lightning_memopt tests tools
	$(BIN)/ruff format --check lightning_memopt tests tools

typecheck: $(STAMP)
	$(BIN)/mypy lightning_memopt

# the documentation site, strictly: a broken link or anchor, a missing reference or a docstring it cannot parse fails
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

docs-serve: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve

unit: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadgroup tests

test: lint typecheck docs unit

# build the sdist and wheel, twine-check them, install the wheel into a fresh venv outside the tree and run it
dist-check: $(STAMP)
	$(BIN)/python tools/dist_check.py --torch "$(TORCH_SPEC)"

# every `>=` floor of pyproject.toml installed exactly into a fresh venv, and the core tests run against them
floors-check: $(STAMP)
	$(BIN)/python tools/floors_check.py --torch "$(TORCH_SPEC)"

bench: $(STAMP)
	$(BIN)/python -m lightning_memopt.bench --out bench_results

bench-comm: $(STAMP)
	$(BIN)/python -m lightning_memopt.bench comm --out bench_results

bench-finetune: $(STAMP)
	$(BIN)/python -m lightning_memopt.bench finetune --jobs 2 --out bench_results/finetune

# a few BAdam steps of Llama 3-8B's shape on this machine (~20 GB; refuses when the memory is not free)
bench-scale: $(STAMP)
	$(BIN)/python -m lightning_memopt.bench scale --out bench_results/scale

# the GPU checks (CUDA peak vs estimate, step-time ratio, 16-true, NCCL); without CUDA it lists them and exits 0
selfcheck: $(STAMP)
	$(BIN)/python -m lightning_memopt.selfcheck --json selfcheck.json

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache lightning_logs site dist
