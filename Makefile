# The two commands of the README:  make demo  and  make test.
# Each one installs what it needs: Debian packages (as root, when missing) and a project virtualenv.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
DEBS   := bubblewrap iproute2 util-linux postgresql

CHP    := .npm/node_modules/.bin/configurable-http-proxy

.PHONY: demo test lint system-deps venv clean

# JupyterHub's proxy, from the npm registry, pinned by .npm/package-lock.json.
$(CHP): .npm/package.json .npm/package-lock.json
	npm ci --prefix .npm --no-audit --no-fund --loglevel=error
	touch $@

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml enclave/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/python -m pip install --quiet -e './enclave[runtime]' -e '.[test,synthesis]'
	# SmartNoise's MST and AIM without its declared torch/opacus pins (docs/synthesis.md).
	$(BIN)/python -m pip install --quiet --no-deps smartnoise-synth==1.0.8 smartnoise-sql==1.0.10
	touch $@

# Debian packages the local enclave needs; installed only when missing (apt-get needs root).
system-deps:
	@missing=""; for p in $(DEBS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	command -v npm >/dev/null 2>&1 || missing="$$missing npm"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	  else echo "missing Debian packages:$$missing (install them as root: apt-get install$$missing)" >&2; exit 1; fi; \
	fi

# The secure stage on demo data: generate a dataset, register it as a provider would, run the sample
# notebook on the real rows in the local (simulated) enclave, and verify the receipt.
DEMO := .demo
demo: system-deps $(STAMP) $(CHP)
	rm -rf $(DEMO)
	$(BIN)/python demo/make_demo_data.py $(DEMO)/data
	$(BIN)/dcr provider add --store $(DEMO)/store --provider demo --dataset patients \
	  --real $(DEMO)/data/real/patients.csv --synthetic $(DEMO)/data/synthetic/patients.csv
	$(BIN)/dcr local-run demo/analysis.ipynb --store $(DEMO)/store --out $(DEMO)/run \
	  --host-state $(DEMO)/enclave-host
	$(BIN)/dcr verify $(DEMO)/run --trust $(DEMO)/enclave-host/public/jwks.json
	@echo "outputs: $(DEMO)/run/outputs  (the executed notebook, summary.csv, charges.png)"

test: system-deps $(STAMP) $(CHP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) .demo .pytest_cache .ruff_cache .mypy_cache test-artifacts .npm/node_modules
