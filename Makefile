# The two commands a newcomer types: `make demo` and `make test`. Each creates .venv itself.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint bench system-deps clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/protofly demo

test: $(STAMP) system-deps lint
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check src tests bench stubs
	$(BIN)/ruff format --check src tests bench stubs
	$(BIN)/mypy --strict src/protofly
	for stub in stubs/*/stub.py; do $(BIN)/mypy --strict "$$stub" || exit 1; done

bench: $(STAMP)
	$(BIN)/python bench/run_all.py

system-deps:
	@sh scripts/system-deps.sh

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
