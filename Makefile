# The two commands a learner needs (see README.md):
#   make lab    create .venv, install coursekit and everything it needs, open the course in JupyterLab
#   make test   the same install, then every check CI runs
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The project's local dataset mirror, when a checkout sits beside one (CI and the course machines).
MIRROR := $(abspath ../shared/datasets)
ifneq ($(wildcard $(MIRROR)),)
export COURSEKIT_MIRROR ?= $(MIRROR)
endif

.PHONY: lab test install check-sync pytest nbtest lint

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e ".[dev]"
	touch $@

install: $(BIN)/.installed

lab: install
	$(BIN)/jupyter lab nbs/lessons

test: install check-sync lint pytest nbtest

check-sync: install
	$(BIN)/python tools/check_sync.py

lint: install
	$(BIN)/ruff check coursekit tests bench tools

pytest: install
	$(BIN)/python -m pytest -q tests

# Library chapters are light: two at a time, one CPU thread each (two PyTorch processes with two
# threads each on two cores slow each other down many times over). Lessons train models: one at a time,
# with every core. Offline there is no Planet data: CI explicitly allows the planet lesson's generated
# stand-in (the lesson then says loudly that its numbers mean nothing).
nbtest: install
	OMP_NUM_THREADS=1 $(BIN)/nbdev-test nbs/core --do-print --timing
	COURSEKIT_QUICK=1 COURSEKIT_ALLOW_STANDIN=1 $(BIN)/nbdev-test nbs/lessons --n-workers 1 --do-print --timing
