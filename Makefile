# Every target creates .venv and installs the project if needed, so a fresh clone needs only
# `make demo` or `make test`. `make demo` installs what the jobs need; `make test` adds the
# local stack's servers and the test tooling (pyproject's `dev` extra).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev

.PHONY: demo test lint bench clean venv lock

venv: $(STAMP)

# constraints.txt: the exact versions the suite last passed with (`make lock` rewrites it), so
# a fresh clone installs what was tested. torch, torchvision and their CUDA wheels are left to
# pyproject's ranges: machines hold 2.14.1 locally or get 2.14.0 from the registry.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e .
	touch $(STAMP)

$(DEV_STAMP): $(STAMP)
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(DEV_STAMP)

lock: $(DEV_STAMP)
	$(PY) -m pip freeze --exclude-editable \
		| grep -v -i -E '^(torch|torchvision|triton|nvidia-(cu|nc|nv)|cuda-)' > constraints.txt

demo: $(STAMP)
	$(PY) -m jobs.demo

lint: $(DEV_STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(PY) -m pytest

# CPU-sized by default; on a GPU machine: make bench BENCH_ARGS="--device cuda"
BENCH_ARGS ?= --quick
bench: $(DEV_STAMP)
	$(PY) -m benchmarks.run_all $(BENCH_ARGS)

clean:
	rm -rf demo mlflow.db mlartifacts .pytest_cache .ruff_cache
