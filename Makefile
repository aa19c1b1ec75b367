# Everyday commands. `make demo` and `make test` create venv/ on first use.
PYTHON ?= python3
VENV := venv
BIN := $(VENV)/bin
export PYTHONPATH := $(CURDIR)

.PHONY: help venv demo test lint soak bench check-broker image-base clean

help:
	@echo "make demo    run every example end to end against the broker"
	@echo "make test    run the test suite (real broker required)"
	@echo "make lint    ruff, hadolint on the Dockerfile, a compose parser on docker-compose.yml"
	@echo "make bench   benchmarks against multiprocessing, Celery and plain pika (~4 min)"
	@echo "make venv    create venv/ with the examples' requirements"

$(BIN)/.requirements: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	@touch $@

$(BIN)/.requirements-test: $(BIN)/.requirements requirements-test.txt
	$(BIN)/python -m pip install --quiet -r requirements-test.txt
	@touch $@

venv: $(BIN)/.requirements

# One line and a non-zero exit when no broker answers at AMQP_URL (or localhost).
check-broker: venv
	@$(BIN)/python -m pc.broker

demo: venv check-broker
	@for example in pc pikachat distop; do \
		if [ -f $$example/demo.sh ]; then \
			echo "=== $$example"; PATH="$(CURDIR)/$(BIN):$$PATH" bash $$example/demo.sh || exit 1; \
		fi; \
	done

# The image test builds FROM python:3.11-slim. Where podman stands in for Docker
# (no engine here, and no registry), build a local stand-in once.
image-base:
	@if ! docker info >/dev/null 2>&1 && podman info >/dev/null 2>&1; then tests/image/base-image.sh; fi

test: $(BIN)/.requirements-test check-broker image-base
	$(BIN)/python -m pytest -n 4

$(BIN)/.requirements-bench: $(BIN)/.requirements bench/requirements.txt
	$(BIN)/python -m pip install --quiet -r bench/requirements.txt
	@touch $@

# Every benchmark script in bench/ (not the private _modules), one after the other.
bench: $(BIN)/.requirements-bench check-broker
	@for script in bench/[!_]*.py; do \
		echo "=== $$script"; $(BIN)/python $$script || exit 1; \
	done

# docker-compose.yml goes through a real compose parser: Docker's where installed, else podman-compose.
lint: $(BIN)/.requirements-test
	$(BIN)/ruff check .
	$(BIN)/hadolint Dockerfile
	@if docker compose version >/dev/null 2>&1; then docker compose config --quiet; \
	else $(BIN)/podman-compose config >/dev/null; fi

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
