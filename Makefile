# The two set-up commands of the README. Both work on a fresh machine with python3 >= 3.11.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test bench lint install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# The main job on embedded defaults: broker, ClickHouse, workers, sink and simulator.
run: $(STAMP)
	$(BIN)/medstream up

# The whole test suite: unit, integration (real tansu + chdb + the local PostgreSQL, MariaDB
# and Mosquitto) and end-to-end. The source databases are first prepared for CDC.
test: $(STAMP)
	deploy/dev/services.sh
	MEDSTREAM_REQUIRE_SOURCES=1 $(BIN)/python -m pytest -q -p no:cacheprovider --durations=15

bench: $(STAMP)
	$(BIN)/medstream bench --events 30000 --json bench.json

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy medstream producers streams sinks schemas

clean:
	rm -rf .medstream build *.egg-info
