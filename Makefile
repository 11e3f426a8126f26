# Two entry points for a newcomer: `make demo` (train the embedded tiny SimPO job on CPU) and
# `make test` (the whole test suite; what CI runs). Both create the Python 3.12 venv when missing.
PY ?= $(shell command -v python3.12 2>/dev/null || echo /root/.pyenv/versions/3.12.1/bin/python3.12)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo test test-quick lint clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/simpo-train configs/tiny_cpu.yaml

test: $(STAMP)
	$(BIN)/ruff check simpo_mcore tools tests benchmarks
	$(BIN)/python -m pytest -q

test-quick: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check simpo_mcore tools tests benchmarks

clean:
	rm -rf $(VENV) runs
