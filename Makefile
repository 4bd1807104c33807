# stream-kpis: the two commands of the README, and a few more.
#   make demo   set everything up, start a local Kafka broker and Redis, run the live demo
#   make test   set everything up and run the whole test suite (what .ci/run runs)
#   make soak   fault soak on the real broker: ROUNDS rounds (10) of each scenario, or of SCENARIOS=a,b
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
# pip builds the native fast paths (native/) with cargo: rustup's, when it is not on the PATH
export PATH := $(HOME)/.cargo/bin:$(PATH)

.PHONY: setup deps demo test test-unit soak bench charts services-up services-down lint clean

setup: deps $(VENV)/.installed

# apt packages (redis-server, prometheus, alertmanager; as root) and the Kafka jars (Maven)
deps:
	deploy/local/install-deps.sh

$(VENV)/.installed: pyproject.toml native/Cargo.toml native/Cargo.lock $(wildcard native/src/*.rs)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

demo: setup
	$(BIN)/stream-kpis demo

test: setup
	$(BIN)/python -m pytest -p no:cacheprovider --timeout=900

test-unit: $(VENV)/.installed
	$(BIN)/python -m pytest -p no:cacheprovider tests/unit tests/property

# Fault soak on the real local broker (scripts/soak.py): a table of exact rounds per scenario;
# failed rounds are kept under .local/soak/. Exit 1 when any round was wrong.
ROUNDS ?= 10
SCENARIOS ?=
soak: setup
	$(BIN)/python scripts/soak.py --rounds $(ROUNDS) $(if $(SCENARIOS),--scenarios $(SCENARIOS))

bench: setup
	$(BIN)/python benchmarks/run.py

# The README's picture, docs/images/kpis.png: the main KPIs of a seeded synthetic stream replayed
# day by day (no broker, no Prometheus); the intermediate files stay in .local/charts.
CHARTS := .local/charts
charts: $(VENV)/.installed
	mkdir -p $(CHARTS) docs/images
	$(BIN)/stream-kpis generate --seed 7 --members 3000 --days 180 -o $(CHARTS)/events.jsonl
	$(BIN)/stream-kpis replay $(CHARTS)/events.jsonl --every 1d --output jsonl > $(CHARTS)/kpis.jsonl
	$(BIN)/python scripts/render_charts.py --records $(CHARTS)/kpis.jsonl --dpi 60 -o $(CHARTS)
	cp $(CHARTS)/overview.png docs/images/kpis.png

services-up:
	deploy/local/up

services-down:
	deploy/local/down

lint: $(VENV)/.installed
	$(BIN)/ruff check stream_kpis tests benchmarks

clean:
	rm -rf .local $(VENV) build *.egg-info
