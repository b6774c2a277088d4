# The README's commands. `make demo` and `make test` install what is missing first.
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup demo test lint bench clean

setup:
	@scripts/setup.sh

demo: setup
	@$(BIN)/python scripts/demo.py

lint: setup
	$(BIN)/ruff check builder tests scripts
	$(BIN)/mypy

test: setup lint
	$(BIN)/pytest -v --durations=15 tests

bench: setup
	@$(BIN)/python scripts/bench.py

clean:
	rm -rf out .pytest_cache .mypy_cache .ruff_cache
