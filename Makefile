# Two commands on a fresh machine: `make demo` and `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: demo demo-bus test lint bench servers clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

## demo: the shop (examples/shop): shoal up, a few orders through the gateway, settled, down
demo: $(STAMP)
	$(BIN)/python examples/shop/demo.py

## demo-bus: a producer and two consumers of one group, in separate processes
demo-bus: $(STAMP)
	$(BIN)/python -m shoal.demo

## servers: Debian's nats-server, redis-server and chromium (the dashboard's browser
## test), those missing, when we are root
DEBS := nats-server:nats-server redis-server:redis-server chromium:chromium
servers:
	@missing=""; for pair in $(DEBS); do \
	  command -v $${pair%%:*} >/dev/null || missing="$$missing $${pair##*:}"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else echo "missing and not root:$$missing (their tests will be skipped)"; fi; \
	fi

## test: the whole suite
test: $(STAMP) servers
	$(BIN)/ruff check shoal tests bench
	$(BIN)/python -m pytest -q -p no:cacheprovider

lint: $(STAMP)
	$(BIN)/ruff check shoal tests bench

## bench: every benchmark (prints figures and ratios against peers)
bench: $(STAMP) servers
	$(BIN)/python bench/bus.py
	$(BIN)/python bench/shop.py

clean:
	rm -rf $(VENV) .shoal .pytest_cache build *.egg-info
