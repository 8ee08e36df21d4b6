# tileseg: `make run` runs the default land-cover job, `make test` the test suite.
# Both create .venv on first use (pip install -e '.[dev]'; torch comes from pip too).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

# No Prefect telemetry from offline machines.
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: run test install clean bench

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "installing tileseg and its dependencies into $(VENV) (log: $(VENV)/pip.log) ..."
	@$(BIN)/python -m pip install -q -e '.[dev]' > $(VENV)/pip.log 2>&1 \
		|| { tail -n 40 $(VENV)/pip.log; echo "pip install failed; see $(VENV)/pip.log"; exit 1; }
	@touch $@

run: $(STAMP)
	$(BIN)/tileseg data fetch
	$(BIN)/tileseg run config/default.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf outputs .pytest_cache

# Benchmarks (full sizes, minutes): one JSON line per case, appended to tests/benchmarks/results.jsonl.
bench: $(STAMP)
	$(BIN)/tileseg data fetch
	$(BIN)/python tests/benchmarks/bench_ingest.py
	$(BIN)/python tests/benchmarks/bench_otsu.py
	$(BIN)/python tests/benchmarks/bench_unet.py
	$(BIN)/python tests/benchmarks/bench_scaling.py
	$(BIN)/python tests/benchmarks/bench_graph.py
