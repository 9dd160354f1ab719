# meshbake — every target installs what it needs first (idempotent `make install`).
SHELL := /bin/bash
VENV  ?= .venv
PY    := $(VENV)/bin/python
STAMP := $(VENV)/.install.stamp
RECIPE ?= tiny_cpu
OUT   ?= out
SUDO  := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# one set of apt packages for the whole suite: shellcheck (generated scripts), Slurm + munge (e2e)
APT_PKGS := shellcheck slurmctld slurmd slurm-client munge

.PHONY: install demo bundle check test test-fast golden bench zoo import-sweep slurm-up slurm-down clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || python3 -m venv $(VENV)
	@# torch first and pinned: the CPU wheel from the local cache; anything else could pull CUDA
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[test,tracking,qlora]'
	@missing=""; for p in $(APT_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "apt-get install$$missing"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi
	@touch $@

demo: install
	@# chat fine-tuning of the tiny model on data/chat (2,025 conversations): prepare (tokenize +
	@# pack once) and train via the bundle's launch.sh, then export and answer one question.
	@# Starts fresh every time (a real run in the same run dir would resume instead).
	rm -rf runs/tiny_chat runs/tiny_chat-hf
	$(VENV)/bin/meshbake bundle tiny_chat -o $(OUT)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" OMP_NUM_THREADS=1 bash $(OUT)/launch.sh
	PYTHONPATH=$(CURDIR) $(PY) scripts/demo_answer.py runs/tiny_chat runs/tiny_chat-hf "What is AI?"

bundle: install
	$(VENV)/bin/meshbake bundle $(RECIPE) -o $(OUT)

check: install
	$(VENV)/bin/meshbake check $(RECIPE)

# --cpu-times: CPU seconds per test file (tests/conftest.py), the number a loaded machine cannot distort
test: install lint
	$(PY) -m pytest -q --durations=12 --cpu-times tests

lint: install
	$(VENV)/bin/ruff check .

test-fast: install
	$(PY) -m pytest -q --durations=8 --cpu-times tests -m "not dist and not slurm"

golden: install
	$(PY) -m tests.golden_refresh

bench: install
	$(PY) -m bench.data
	$(PY) -m bench.prepare
	$(PY) -m bench.run
	$(PY) -m bench.compiler
	$(PY) -m bench.calibrate

# every causal-LM type with a base_model_tp_plan: tiny config, compile, 2 CPU steps -> docs/MODELS.md
# (one torchrun per compiled type: ~10-20 min on 2 cores; not part of `make test`)
zoo: install
	PYTHONPATH=. $(PY) scripts/zoo.py

# every Axolotl example config through `meshbake import axolotl` + `check`, classified ->
# docs/IMPORT_SWEEP.md + bench/results/import_sweep.json; exit 1 while any config is a bug.
# AXOLOTL: a clone or a bare git dir of axolotl-ai-cloud/axolotl (REV: the commit to sweep);
# HUB_CACHE: an offline Hugging Face cache holding base models' config.json (not part of `make test`)
AXOLOTL ?= ../axolotl
REV ?= HEAD
HUB_CACHE ?=
import-sweep: install
	PYTHONPATH=. $(PY) scripts/import_sweep.py $(AXOLOTL) --rev $(REV) $(if $(HUB_CACHE),--hub-cache $(HUB_CACHE))

clean:
	rm -rf $(OUT) runs

SLURM_DIR ?= /tmp/meshbake-slurm
slurm-up: install
	scripts/slurm-local/up.sh $(SLURM_DIR)

slurm-down:
	scripts/slurm-local/down.sh $(SLURM_DIR)
