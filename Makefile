# Everyday commands. `make demo` and `make test` create venv/ on first use.
PYTHON ?= python3
VENV := venv
BIN := $(VENV)/bin
export PYTHONPATH := $(CURDIR)

.PHONY: help venv demo test lint soak bench check-broker clean

help:
	@echo "make demo    run every example end to end against the broker"
	@echo "make test    run the test suite (real broker required)"
	@echo "make lint    ruff check"
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

test: $(BIN)/.requirements-test check-broker
	$(BIN)/python -m pytest -n 4

$(BIN)/.requirements-bench: $(BIN)/.requirements bench/requirements.txt
	$(BIN)/python -m pip install --quiet -r bench/requirements.txt
	@touch $@

# Every benchmark script in bench/ (not the private _modules), one after the other.
bench: $(BIN)/.requirements-bench check-broker
	@for script in bench/[!_]*.py; do \
		echo "=== $$script"; $(BIN)/python $$script || exit 1; \
	done

lint: $(BIN)/.requirements-test
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
