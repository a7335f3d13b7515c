# Set-up, demo and tests. `make demo` and `make test` are the two commands of the README.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
HOME_DIR := $(or $(LAKEHOUSE_HOME),.lakehouse)
PORT   := $(or $(LAKEHOUSE_HTTP_PORT),8000)
STAMP  := $(VENV)/.installed
# The demo's fleet: 20 pumps reporting four metrics, each in time order as real devices send, with two batches at
# the 5 MiB limit and 1% of the readings broken on purpose so that the quarantine has something to show.
DEMO_FLEET := --synthetic --kinds pump --devices 20 --messages 3000 --full-batches 2 \
	--metrics 4 --in-order --bad-share 0.01

.PHONY: install browser demo test quick lint stop clean help

help:
	@echo "make demo   set up, start Kafka, send a synthetic fleet of pumps (four metrics, 1% bad input), run the"
	@echo "            pipeline, start the API on :$(PORT) and show sample requests"
	@echo "make test   set up, run the linters and the whole test suite (starts its own Kafka broker; installs"
	@echo "            Debian's chromium for the dashboard's browser test if it is missing)"
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

# The dashboard's browser test drives Debian's chromium: `make test` installs it, `make demo` needs none.
browser:
	command -v chromium >/dev/null || { apt-get update -qq && apt-get install -y -qq chromium; }

demo: install
	$(BIN)/lakehouse kafka start
	$(BIN)/lakehouse produce $(DEMO_FLEET)
	$(BIN)/lakehouse pipeline --available-now
	@if [ -f $(HOME_DIR)/serve.pid ] && kill -0 $$(cat $(HOME_DIR)/serve.pid) 2>/dev/null; then kill $$(cat $(HOME_DIR)/serve.pid); sleep 1; fi
	nohup $(BIN)/lakehouse serve --port $(PORT) > $(HOME_DIR)/serve.log 2>&1 & echo $$! > $(HOME_DIR)/serve.pid
	@for i in $$(seq 1 60); do curl -sf localhost:$(PORT)/health >/dev/null && break; sleep 0.5; done
	@ts=$$($(BIN)/lakehouse sql --output csv "SELECT strftime(\"timestamp\", '%Y-%m-%dT%H:%M:%SZ') FROM gold WHERE metric = 'temperature_c' ORDER BY reading_count DESC, \"timestamp\" LIMIT 1" | tail -n 1); \
	  api=localhost:$(PORT); \
	  echo; echo "API running on :$(PORT) (pid $$(cat $(HOME_DIR)/serve.pid), log $(HOME_DIR)/serve.log). Try:"; \
	  for request in "kpis/$$ts?metric=temperature_c" "kpis/$$ts?metric=pressure_bar&grain=minute&device_id=pump-0000" \
	      "kpis/$$ts/metrics" "catalog/metrics"; do \
	    echo "  curl -s '$$api/$$request'"; curl -s "$$api/$$request"; echo; done; \
	  query="SELECT metric, reason_code, count(*) AS n FROM quarantine GROUP BY ALL ORDER BY n DESC"; \
	  echo "  $(BIN)/lakehouse sql \"$$query\""; $(BIN)/lakehouse sql "$$query"; \
	  echo "Stop with: make stop"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: install browser lint
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
