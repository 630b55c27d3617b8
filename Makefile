# The two commands of the README: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
OUT    := out
# torch first, pinned: a bare `torch` requirement would pull a multi-GB CUDA build on a CPU machine.
TORCH  := torch==2.13.0

.PHONY: demo test install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[test,tensorrt-rtx]"
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/latentrt export tiny-sd3 -o $(OUT)/tiny-sd3 --overwrite
	$(BIN)/latentrt generate $(OUT)/tiny-sd3 --prompt "a red circle on the left" --steps 8 --seed 0 -o $(OUT)/demo.png

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(OUT) build dist *.egg-info
