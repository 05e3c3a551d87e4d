# micropod: `make demo` sets everything up and runs a container in a microVM; `make test` sets up and tests.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
export MICROPOD_CACHE ?= /var/cache/micropod

.PHONY: all setup host venv guest demo-image demo test lint unit e2e bench clean

all: setup

setup: host venv guest

host:
	@bash scripts/setup-host.sh

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]' --config-settings editable_mode=compat
	@touch $@

# The CRI's Python stubs are build output, generated from the vendored proto (rewritten only when it changes).
venv: host $(STAMP)
	@$(BIN)/python -m micropod.cri.generate

guest: venv
	$(BIN)/python -m micropod.guest.build

demo-image: venv
	@mkdir -p out
	$(BIN)/python -m micropod.image.demo out/hello.oci.tar
	$(BIN)/micropod load -q -i out/hello.oci.tar

# --network none: the demo leaves the host's network (bridge, firewall) untouched.
demo: setup demo-image
	$(BIN)/micropod run --rm --network none hello

lint: venv
	$(BIN)/ruff check micropod tests bench
	$(BIN)/mypy

unit: venv
	$(BIN)/pytest -m "not e2e" -q

e2e: setup
	$(BIN)/pytest -m e2e -q

test: setup lint
	$(BIN)/pytest -q -ra

# stdout is the JSON document alone; setup chatter goes to stderr.
bench:
	@$(MAKE) --no-print-directory setup >&2
	@$(BIN)/python -m bench

clean:
	rm -rf out build .pytest_cache .mypy_cache .ruff_cache
