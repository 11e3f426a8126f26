# Two entry points for a newcomer: `make demo` (train the embedded tiny SimPO job on CPU) and
# `make test` (the whole test suite; what CI runs). Both create the Python 3.12 venv when missing.
# The first Python >= 3.12 that actually runs (a pyenv shim can exist and still refuse to run).
PY ?= $(shell for p in python3.12 python3.13 python3 /root/.pyenv/versions/3.12.1/bin/python3.12; do \
	$$p -c 'import sys; assert sys.version_info >= (3, 12)' >/dev/null 2>&1 && { command -v $$p; break; }; done)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo demo-parity test test-quick lint clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || test -n "$(PY)" || { echo "error: no Python >= 3.12 found; run make PY=/path/to/python3.12"; exit 1; }
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/simpo-train configs/tiny_cpu.yaml

demo-parity: $(STAMP)
	$(BIN)/python tools/demo_parity.py

# The quick subset runs on two workers (single-process tests: one per core); the slow tests launch their own
# ranks, which already fill the cores, so they run one at a time.
test: $(STAMP)
	$(BIN)/ruff check simpo_mcore tools tests benchmarks
	$(BIN)/python -m pytest -q -m "not slow" -n 2
	$(BIN)/python -m pytest -q -m slow --durations=15

test-quick: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" -n 2

lint: $(STAMP)
	$(BIN)/ruff check simpo_mcore tools tests benchmarks

clean:
	rm -rf $(VENV) runs
