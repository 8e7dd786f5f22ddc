# make setup: .venv/ with the project (editable), its development extras and CI's CPU-friendly pins.
# make test:  set up when needed, then lint and run the test suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# DeepSpeed's ops are JIT-built when first used; never at install time.
export DS_BUILD_OPS := 0
# The interpreter runs Triton kernels on the CPU (tests only; a GPU run leaves it unset).
# DeepSpeed JIT-compiles a CPU communication op on first use (~40 s): keep it across runs.
TEST_ENV := TRITON_INTERPRET=1 TORCH_EXTENSIONS_DIR=$(HOME)/.cache/mimae_scale/torch_extensions

.PHONY: setup test lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints-ci.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints-ci.txt -e '.[dev]'
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .

test: $(STAMP) lint
	$(TEST_ENV) $(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .cache .pytest_cache
