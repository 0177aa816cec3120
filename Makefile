# The two commands a new user needs:  make demo  (the main job)  and  make test  (the full test suite).
# Both create .venv on first use: torch==2.13.0 first (the CPU wheel; never torchvision), then this package.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tokenprune-installed

# Everything runs offline: tiny models are built from configs, nothing is downloaded from a model hub.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"
	$(PY) -c "import torch, transformers, tokenprune; print('installed: torch', torch.__version__, '| transformers', transformers.__version__, '| tokenprune', tokenprune.__version__)"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m tokenprune demo

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest

# The CPU benchmark runs behind benchmarks/results/ (about 40 minutes on 2 cores; see benchmarks/README.md).
bench: $(STAMP)
	nice $(PY) benchmarks/run.py benchmarks/overhead_llava15_7b_eighth.json benchmarks/overhead_llava15_7b_fullvision.json
	nice $(PY) benchmarks/selection_cost.py
	nice $(PY) benchmarks/run.py benchmarks/sweep_llava15_7b_eighth.json

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
