# The two commands a newcomer types: `make demo` and `make test`. Each creates .venv itself.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# The pinned JavaScript packages of the Node sandbox host (npm ci from package-lock.json).
NODE_STAMP := node_modules/.package-lock.json

.PHONY: demo test test-js lint bench fuzz system-deps node-deps clean

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

# Long fuzzing runs of every decoder (tests/fuzz/targets.py): atheris, FUZZ_SECONDS per target; new corpus
# entries and crash inputs go to .fuzz/.  Without an atheris wheel for this Python, the Hypothesis fuzz tests
# run with FUZZ_SCALE times their usual examples instead, and the fallback is said out loud.
FUZZ_SECONDS ?= 60
FUZZ_SCALE   ?= 100
FUZZ_TARGETS := message message_batch message_frame node_frames channel descriptor admin_send http_head config

fuzz: $(STAMP)
	@if $(BIN)/python -m pip install --quiet --disable-pip-version-check --only-binary=:all: 'atheris>=2.3'; then \
		mkdir -p .fuzz; \
		for target in $(FUZZ_TARGETS); do \
			echo "== fuzz/$$target.py for $(FUZZ_SECONDS) s"; \
			$(BIN)/python fuzz/$$target.py -max_total_time=$(FUZZ_SECONDS) -timeout=10 -rss_limit_mb=2048 \
				-dict=fuzz/json.dict -artifact_prefix=.fuzz/$$target- .fuzz/corpus/$$target || exit 1; \
		done; \
	else \
		echo "make fuzz: atheris cannot be installed here (no wheel for this Python or platform);"; \
		echo "make fuzz: running the Hypothesis fuzz tests with $(FUZZ_SCALE)x their examples instead"; \
		PROTOFLY_FUZZ_EXAMPLES=$(FUZZ_SCALE) $(BIN)/python -m pytest -q -p no:cacheprovider tests/fuzz; \
	fi

system-deps:
	@sh scripts/system-deps.sh

clean:
	rm -rf $(VENV) node_modules .pytest_cache .ruff_cache .hypothesis .fuzz
