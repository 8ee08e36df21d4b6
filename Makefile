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
	@$(BIN)/python -m pip install -q --no-compile -e '.[dev]' > $(VENV)/pip.log 2>&1 \
		|| { tail -n 40 $(VENV)/pip.log; echo "pip install failed; see $(VENV)/pip.log"; exit 1; }
	@# pip byte-compiles one file at a time (about 1.8 of its 4 min here); compileall uses every
	@# core (about 35 s). Python would not write the .pyc files itself where PYTHONDONTWRITEBYTECODE
	@# is set, as on CI, and every process would compile torch again. -x: files that packages ship
	@# for newer Pythons (torch's py312_intrinsics.py), never imported here. Not fatal: a .pyc
	@# that is missing only costs time.
	@$(BIN)/python -m compileall -q -j 0 -x '(py|_)31[2-9]' \
		"$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')" \
		> $(VENV)/compileall.log 2>&1 || echo "(some files did not byte-compile; see $(VENV)/compileall.log)"
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
