# Two commands on a fresh machine: `make demo` and `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: demo demo-bus test lint bench servers bytecode clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

## bytecode: compile Shoal's and the examples' modules as a pip install would (an editable
## install does not, and with PYTHONDONTWRITEBYTECODE set every process of `shoal up` or of
## a test would compile them from source again); only changed files are recompiled
bytecode: $(STAMP)
	@$(BIN)/python -m compileall -q -j0 shoal examples

## demo: the shop (examples/shop): shoal up, a few orders through the gateway, settled, down
demo: $(STAMP) bytecode
	$(BIN)/python examples/shop/demo.py

## demo-bus: a producer and two consumers of one group, in separate processes
demo-bus: $(STAMP) bytecode
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
test: $(STAMP) bytecode servers
	$(BIN)/ruff check shoal tests bench
	$(BIN)/python -m pytest -q -p no:cacheprovider

lint: $(STAMP)
	$(BIN)/ruff check shoal tests bench

## bench: every benchmark (prints figures and ratios against peers)
bench: $(STAMP) bytecode servers
	$(BIN)/python bench/bus.py
	$(BIN)/python bench/shop.py

clean:
	rm -rf $(VENV) .shoal .pytest_cache build *.egg-info
