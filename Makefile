# The two commands of the README. Both work on a fresh CPU machine.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test install install-vllm test-vllm lint clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

# vLLM (CPU build) in its own environment: see docs/vllm.md for why torchvision needs the hook.
install-vllm:
	python3 -m venv .venv-vllm
	.venv-vllm/bin/pip install -q torch==2.13.0
	.venv-vllm/bin/pip install -q -e ".[dev,vllm]"
	.venv-vllm/bin/pip uninstall -y -q torchaudio torchcodec
	.venv-vllm/bin/python -m rollout.vllm_compat --install-torchvision-hook

# The vLLM tests (engine vs transformers greedy equality, weight sync, vLLM teacher) in the vLLM environment.
test-vllm:
	.venv-vllm/bin/python -m pytest -q tests/test_vllm.py

demo: install
	$(PY) -m cli demo

test: install
	$(PY) -m pytest -q tests

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf runs .cache
