# Two entry points for a fresh machine: `make quickstart` and `make test`.
# Both create .venv (PyTorch 2.14.1 with its matching torchvision 0.29.1 first, pinned as a pair: open_clip needs
# torchvision, and an unpinned torch pulls the newest CUDA build) and install diffalign into it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

$(BIN)/diffalign: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
	$(BIN)/pip install --quiet -e ".[test]"
	# The HPSv2 package itself, only so a test can hold our preprocessing against its own transform; --no-deps:
	# it pins pytest 7.2 and protobuf < 4, and nothing imports it (the test loads its transform files by path).
	$(BIN)/pip install --quiet --no-deps "hpsv2==1.2.0"
	touch $@

.PHONY: install quickstart test clean
install: $(BIN)/diffalign

quickstart: install
	$(BIN)/diffalign quickstart

# Two workers (one torch thread each) on the 2-core machine the suite is timed on; PYTEST_WORKERS=0 runs it in one process.
PYTEST_WORKERS ?= 2

test: install
	$(BIN)/pytest -n $(PYTEST_WORKERS) --dist worksteal

clean:
	rm -rf $(VENV) quickstart_out
