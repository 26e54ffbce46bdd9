# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-all test-gpu clean

install: $(STAMP)

# torch and torchvision first, pinned to the wheels this machine carries; then the project and its extras.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

# The main job: train rwkv4-tiny on the standard library's sources, report bits/byte, generate a sample.
demo: $(STAMP)
	$(BIN)/zoo train lm/rwkv4-tiny-stdlib
	$(BIN)/zoo generate runs/demo/model --prompt "def parse_args(" --max-new-tokens 300 --temperature 0.7 --seed 0

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m "not gpu"

test-gpu: $(STAMP)
	$(BIN)/python -m pytest -q -m gpu

clean:
	rm -rf $(VENV) runs build *.egg-info
