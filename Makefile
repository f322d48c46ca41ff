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

# llama.cpp is built from source with the x86 ISA flags this CPU reports. Not GGML_NATIVE: it also enables AMX,
# which some VMs advertise but cannot run. A flag the CPU lacks dies of SIGILL on the first decode (AVX-VNNI on a
# Zen 4, which has AVX512-VNNI only). Without /proc/cpuinfo (macOS) the native build is the right one.
CPU_FLAGS := $(shell grep -m1 '^flags' /proc/cpuinfo 2>/dev/null)
isa = $(if $(filter $(1),$(CPU_FLAGS)),ON,OFF)
ifeq ($(strip $(CPU_FLAGS)),)
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=ON
else
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=$(call isa,avx) -DGGML_AVX2=$(call isa,avx2) \
	-DGGML_FMA=$(call isa,fma) -DGGML_F16C=$(call isa,f16c) -DGGML_BMI2=$(call isa,bmi2) \
	-DGGML_AVX512=$(call isa,avx512f) -DGGML_AVX512_VNNI=$(call isa,avx512_vnni) -DGGML_AVX_VNNI=$(call isa,avx_vnni)
endif

bench: install
	# no wheel cache: a llama-cpp-python wheel built for another CPU would be reused as is
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/pip install -q --no-cache-dir -c constraints.txt -r benchmarks/requirements.txt
	$(BIN)/python benchmarks/compare.py

clean:
	rm -rf $(VENV) bundles .pytest_cache
