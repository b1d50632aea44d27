# The two set-up commands of the README. Both work on a fresh machine with python3 >= 3.11.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test bench faults lint install clean kafka services

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# The main job on embedded defaults: broker (Apache Kafka when Java is present, its jars
# fetched on demand; else tansu), ClickHouse, workers, sink and simulator.
run: $(STAMP)
	$(BIN)/medstream up

# The Apache Kafka jars from Maven Central (deploy/kafka/pom.xml) into ~/.cache/medstream.
kafka: $(STAMP)
	$(BIN)/medstream broker --fetch-only

# PostgreSQL, MariaDB and Mosquitto on loopback, prepared for CDC (installed when missing).
services:
	deploy/dev/services.sh

# The whole test suite: unit, integration (real Apache Kafka + chdb + the local PostgreSQL,
# MariaDB and Mosquitto; a small tier on tansu) and end-to-end. The services are installed
# and started first, and the Kafka jars fetched.
# The unit and integration tiers run on UNIT_WORKERS processes (pytest-xdist: each has its
# own broker and engine; 3 on 2 cores, as much of it waits on brokers and sockets: 6.2 min
# against 7.5 with 2); the end-to-end tier runs whole pipelines on E2E_WORKERS processes
# (each pipeline has its own data directory, broker and ports; most of an e2e test is
# waiting), handed out by work stealing so the long ones do not queue behind each other,
# except the tests marked `alone` (their verdict depends on timing: alert precision, device
# silence, confirmations), which run one at a time after them. Every tier always runs; the
# target fails when any did.
UNIT_WORKERS ?= 3
E2E_WORKERS ?= 2
PYTEST := MEDSTREAM_REQUIRE_SOURCES=1 $(BIN)/python -m pytest -q -p no:cacheprovider
test: $(STAMP) services kafka
	@status=0; \
	echo "== unit and integration tiers ($(UNIT_WORKERS) workers)"; \
	$(PYTEST) -m "not e2e" -n $(UNIT_WORKERS) --durations=10 || status=1; \
	echo "== end-to-end tier"; \
	$(PYTEST) -m "e2e and not alone" -n $(E2E_WORKERS) --dist worksteal --durations=15 || status=1; \
	echo "== end-to-end tests that run alone"; \
	$(PYTEST) -m "e2e and alone" --durations=5 || status=1; \
	exit $$status

bench: $(STAMP)
	$(BIN)/medstream bench --events 30000 --json bench.json

# The fault suite's long run: 20 kill -9 trials of each kind (a worker, the sink, both, an
# MLLP collector, the embedded broker, one broker of a 3-node cluster) and 20 graceful stops
# under backlog, each counted against ground truth (README "Fault suite"). Hours, not minutes.
faults: $(STAMP) kafka
	$(BIN)/medstream faults --trials 20 --json faults.json

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy medstream producers streams sinks schemas

clean:
	rm -rf .medstream build *.egg-info
