# The two commands of the README: `make demo` and `make test`. Both create .venv (and .venv/serve) on first use.
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

# Triton's Python-backend stub runs the served model in this second environment: latentrt's runtime with
# the nvidia-pytriton wheel and numpy<2 (the wheel's stubs were built against NumPy 1.x; serve/server.py).
SERVE  := $(VENV)/serve

$(SERVE)/.installed: pyproject.toml | $(BIN)/python
	$(PYTHON) -m venv $(SERVE)
	$(SERVE)/bin/python -m pip install -q --upgrade pip
	$(SERVE)/bin/pip install -q -e ".[serve]"
	touch $@

install: $(VENV)/.installed $(SERVE)/.installed

# The demo model (models/demo, trained on this project's shapes dataset) has no T5 encoder: it was
# trained with zero T5 tokens, hence --max-sequence-length 0.
DEMO_STEPS := --steps 16 --guidance 3.0

demo: install
	mkdir -p $(OUT)
	$(BIN)/latentrt export models/demo/pipeline -o $(OUT)/demo-bundle --max-sequence-length 0 --overwrite
	$(BIN)/latentrt generate $(OUT)/demo-bundle --grid $(DEMO_STEPS) --seed 0 -o $(OUT)/demo-grid.png \
		-p "a large red circle on the left" -p "a small blue square at the top on a grey background" \
		-p "right: big yellow triangle" -p "a small green circle in the centre" \
		-p "a large purple square at the bottom" -p "left: small orange triangle on a black background" \
		-p "a big white circle on the right" -p "a small red triangle at the top"
	$(BIN)/latentrt eval $(OUT)/demo-bundle $(DEMO_STEPS) --json $(OUT)/demo-eval.json

test: install
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(OUT) build dist *.egg-info
