# The two commands a newcomer types: `make demo` and `make test`. Each creates .venv itself.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# The pinned JavaScript packages of the Node sandbox host (npm ci from package-lock.json).
NODE_STAMP := node_modules/.package-lock.json

.PHONY: demo test test-js lint bench system-deps node-deps clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

# Needs node and npm (scripts/system-deps.sh installs them); without them JavaScript stubs are reported
# as a missing capability and their tests skip saying so.
$(NODE_STAMP): package.json package-lock.json
	@if command -v npm >/dev/null 2>&1; then npm ci --no-audit --no-fund --loglevel=error; \
	else echo "WARNING: npm missing: JavaScript stubs need Node.js and the packages of package-lock.json" >&2; fi

node-deps: system-deps
	@$(MAKE) --no-print-directory $(NODE_STAMP)

demo: $(STAMP)
	$(BIN)/protofly demo

test: $(STAMP) system-deps node-deps lint test-js
	$(BIN)/python -m pytest

# The Node sandbox host's own tests (node --test; Node 18 and later).
test-js: node-deps
	@if command -v node >/dev/null 2>&1; then node --test tests/js/*.test.mjs; \
	else echo "WARNING: node missing: tests/js skipped" >&2; fi

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
	rm -rf $(VENV) node_modules .pytest_cache .ruff_cache .hypothesis
