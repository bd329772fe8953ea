# `make demo` and `make test` create and reuse .venv (Python 3.12).
PYTHON ?= $(shell command -v python3.12 >/dev/null 2>&1 && python3.12 --version >/dev/null 2>&1 && echo python3.12 || echo "env PYENV_VERSION=3.12 python3.12")
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test bench clean

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/python -m scaling.demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q -n 2   # two workers: a 2-core machine runs the suite in ~10 min

bench: $(STAMP)
	$(VENV)/bin/python -m benchmarks.synthetic_generation
	$(VENV)/bin/python -m benchmarks.train_throughput
	$(VENV)/bin/python -m benchmarks.train_throughput --suite sequences

clean:
	rm -rf runs wandb
