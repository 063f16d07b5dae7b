# The two commands: `make demo` and `make test`. Both build .venv on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_OUT ?= runs/demo

.PHONY: demo test install clean

# The merge kernels (numba) are compiled once here into their cache, not by every test process and Ray worker.
# PIP_FIND_LINKS is cleared on purpose: some machines carry a local CPU-only torch wheel whose
# version (+cpu) would be picked over the registry's, and registry torchvision wheels do not import with it.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	PIP_FIND_LINKS= $(BIN)/pip install --quiet --upgrade pip
	PIP_FIND_LINKS= $(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/python -c "from sim.merge import kernels; print(f'merge kernels compiled in {kernels.warm_up():.0f} s')"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/forgesim run --preset demo --out $(DEMO_OUT) --overwrite
	$(BIN)/forgesim report $(DEMO_OUT)

# The suite on TEST_WORKERS pytest-xdist processes, each with its own local Ray and one torch thread (the default-
# model tests first, see tests/conftest.py); TEST_WORKERS=0 runs it in this one process. -rs names every skipped
# test with its reason, and the summary's "browser test:" line names the Chromium the HTML report was rendered in,
# so a CI log shows whether the Chromium test ran.
TEST_WORKERS ?= 2

test: $(STAMP)
	$(BIN)/python -m pytest -q -rs -n $(TEST_WORKERS) --dist worksteal

clean:
	rm -rf $(VENV) runs .pytest_cache
