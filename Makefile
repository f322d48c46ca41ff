# The two README commands: `make demo` (export the default offline model for this machine and stream a chat
# answer) and `make test` (the whole suite, unit + end-to-end on the real model). Both set up .venv first.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
BUNDLE ?= bundles/qwen2.5-coder-0.5b-instruct-int4
PROMPT ?= Write a Python function that checks whether a number is prime, with a short docstring.

.PHONY: install lean demo test unit e2e bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e ".[export,dev]"
	touch $@

demo: install
	$(BIN)/edgeqwen export qwen2.5-coder-0.5b-instruct --device host -o $(BUNDLE) --force
	$(BIN)/edgeqwen run $(BUNDLE) "$(PROMPT)" --stats

test: install
	$(BIN)/python -m pytest -q

unit: install
	$(BIN)/python -m pytest -q -m "not e2e and not slow"

e2e: install
	$(BIN)/python -m pytest -q -m e2e

# llama.cpp is built from source; explicit x86 ISA flags (no AMX: advertised but unusable on some VMs)
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX_VNNI=ON

bench: install
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/pip install -q -c constraints.txt -r benchmarks/requirements.txt
	$(BIN)/python benchmarks/compare.py

clean:
	rm -rf $(VENV) bundles .pytest_cache
