# Set-up, demo and tests. `make demo` and `make test` are the two commands of the README.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
HOME_DIR := $(or $(LAKEHOUSE_HOME),.lakehouse)
PORT   := $(or $(LAKEHOUSE_HTTP_PORT),8000)
STAMP  := $(VENV)/.installed

.PHONY: install demo test quick lint stop clean help

help:
	@echo "make demo   set up, start Kafka, send a synthetic fleet, run the pipeline, start the API on :$(PORT)"
	@echo "make test   set up, run the linters and the whole test suite (starts its own Kafka broker)"
	@echo "make quick  the linters and the tests that need no Kafka (unit, parse, CLI, API): a few minutes"
	@echo "make stop   stop the demo's API and Kafka broker"
	@echo "make clean  stop, then delete the lake, the broker's data and the virtualenv"

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python 3.11+ is needed"'
	@command -v java >/dev/null || { echo "Java 17+ is needed (Debian: apt-get install openjdk-17-jre-headless)"; exit 1; }
	@command -v mvn >/dev/null || { echo "Maven is needed to fetch the JVM jars (Debian: apt-get install maven)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)
	$(BIN)/lakehouse setup
	@# the dashboard's browser test drives Debian's chromium
	command -v chromium >/dev/null || { apt-get update -qq && apt-get install -y -qq chromium; }

demo: install
	$(BIN)/lakehouse kafka start
	$(BIN)/lakehouse produce --synthetic --devices 20 --messages 3000 --full-batches 2
	$(BIN)/lakehouse pipeline --available-now
	@if [ -f $(HOME_DIR)/serve.pid ] && kill -0 $$(cat $(HOME_DIR)/serve.pid) 2>/dev/null; then kill $$(cat $(HOME_DIR)/serve.pid); sleep 1; fi
	nohup $(BIN)/lakehouse serve --port $(PORT) > $(HOME_DIR)/serve.log 2>&1 & echo $$! > $(HOME_DIR)/serve.pid
	@for i in $$(seq 1 60); do curl -sf localhost:$(PORT)/health >/dev/null && break; sleep 0.5; done
	@ts=$$($(BIN)/lakehouse sql --output csv "SELECT strftime(\"timestamp\", '%Y-%m-%dT%H:%M:%SZ') FROM gold ORDER BY reading_count DESC, \"timestamp\" LIMIT 1" | tail -n 1); \
	  echo; echo "API running on :$(PORT) (pid $$(cat $(HOME_DIR)/serve.pid), log $(HOME_DIR)/serve.log). Try:"; \
	  echo "  curl -s localhost:$(PORT)/kpis/$$ts"; curl -s localhost:$(PORT)/kpis/$$ts; echo; \
	  echo "  curl -s 'localhost:$(PORT)/kpis/$$ts?grain=minute&device_id=pump-0000'"; curl -s "localhost:$(PORT)/kpis/$$ts?grain=minute&device_id=pump-0000"; echo; \
	  echo "  $(BIN)/lakehouse sql \"SELECT reason_code, count(*) FROM quarantine GROUP BY ALL\""; echo "Stop with: make stop"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: install lint
	$(BIN)/python -m pytest -p no:cacheprovider --timeout=1200 --durations=25 $(PYTEST_ARGS); rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 0; fi; exit $$rc

quick: $(STAMP) lint
	$(BIN)/python -m pytest -p no:cacheprovider --timeout=600 -m "not kafka" $(PYTEST_ARGS); rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 0; fi; exit $$rc

stop:
	-@if [ -f $(HOME_DIR)/serve.pid ]; then kill $$(cat $(HOME_DIR)/serve.pid) 2>/dev/null; rm -f $(HOME_DIR)/serve.pid; fi
	-@test -x $(BIN)/lakehouse && $(BIN)/lakehouse kafka stop

clean: stop
	rm -rf data $(HOME_DIR)/kafka $(VENV)
