# The two commands of the README:  make demo  and  make test.
# Each one installs what it needs: Debian packages (as root, when missing) and a project virtualenv.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# python3-venv: Debian's python3 has no ensurepip without it, so `python3 -m venv` would fail.
DEBS   := python3-venv bubblewrap libseccomp2 iproute2 util-linux postgresql chromium

CHP    := .npm/node_modules/.bin/configurable-http-proxy

.PHONY: demo test test-fast lint system-deps venv jupyter dist clean tools

# JupyterHub's proxy, from the npm registry, pinned by .npm/package-lock.json.
$(CHP): .npm/package.json .npm/package-lock.json
	npm ci --prefix .npm --no-audit --no-fund --loglevel=error
	touch $@

venv: $(STAMP)

# Tools the tests run that are not Python packages, in a git-ignored directory: helm (tests/test_helm.py
# renders and lints helm/dcr with it), built from the Go module proxy. `go version -m` tells which module
# and version a binary was built from; the build (two to six minutes on a cold Go cache, seconds on a warm
# one) runs only when that is not the pinned one.
TOOLS        := .tools/bin
HELM         := $(TOOLS)/helm
HELM_MODULE  := helm.sh/helm/v4
HELM_VERSION := v4.3.2

tools:
	@if go version -m $(HELM) 2>/dev/null | grep -Eq '^[[:space:]]+mod[[:space:]]+$(subst .,\.,$(HELM_MODULE))[[:space:]]+$(subst .,\.,$(HELM_VERSION))([[:space:]]|$$)'; then \
	  echo "$(HELM): $(HELM_MODULE) $(HELM_VERSION)"; \
	else \
	  mkdir -p $(TOOLS) && GOBIN=$(CURDIR)/$(TOOLS) go install $(HELM_MODULE)/cmd/helm@$(HELM_VERSION); \
	fi

# The JupyterLab extension, built from source (npm registry only), its jest tests run, and made visible to
# the venv's JupyterLab by a link to the build output (a rebuild needs no reinstall); the server extension's
# enable-on-install file likewise. The editable install skips both: a wheel (`make dist`) carries them as
# data files (setup.py).
LABEXT     := dcr_labextension/labextension/package.json
LABEXT_SRC := $(wildcard dcr_labextension/src/* dcr_labextension/style/* dcr_labextension/schema/* dcr_labextension/test/*)
LABEXT_DIR := $(VENV)/share/jupyter/labextensions/@jupyterhub-dcr
SERVER_CFG := $(VENV)/etc/jupyter/jupyter_server_config.d/dcr_server_ext.json
# JupyterLab's news/update announcements off (setup.cfg ships the same file in a wheel).
PAGE_CFG   := $(VENV)/etc/jupyter/labconfig/page_config.d/dcr_labextension.json

$(LABEXT): $(STAMP) dcr_labextension/package.json dcr_labextension/package-lock.json $(LABEXT_SRC)
	cd dcr_labextension && npm ci --no-audit --no-fund --loglevel=error
	cd dcr_labextension && npm test -- --silent
	cd dcr_labextension && PATH="$(CURDIR)/$(BIN):$$PATH" npm run build
	mkdir -p $(LABEXT_DIR)
	ln -sfn $(CURDIR)/dcr_labextension/labextension $(LABEXT_DIR)/labextension
	touch $@

$(SERVER_CFG): jupyter-config/jupyter_server_config.d/dcr_server_ext.json $(STAMP)
	mkdir -p $(dir $@)
	cp $< $@

$(PAGE_CFG): jupyter-config/labconfig/page_config.d/dcr_labextension.json $(STAMP)
	mkdir -p $(dir $@)
	cp $< $@

jupyter: $(LABEXT) $(SERVER_CFG) $(PAGE_CFG)

# The wheels to install elsewhere: jupyterhub-dcr with the prebuilt extension, and the enclave distribution.
dist: $(LABEXT)
	$(BIN)/python -m pip wheel --quiet --no-deps --no-build-isolation -w dist . ./enclave

$(STAMP): setup.cfg pyproject.toml enclave/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/python -m pip install --quiet -e './enclave[runtime,gcp]' -e '.[test,synthesis,kubernetes,gcp]'
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

# The demo: JupyterHub on 127.0.0.1 (DCR's spawner, grant service, JupyterLab) with two researchers and one
# provider, demo datasets (made on the first run, reused by later runs) and the local SIMULATED enclave host.
# Prints the URL and the logins; Ctrl-C stops everything. `make demo DEMO_ARGS="--port 8001"` for options.
DEMO := .demo
demo: system-deps $(STAMP) $(CHP) jupyter
	$(BIN)/python -c 'import jupyterlab' 2>/dev/null || $(BIN)/python -m pip install --quiet "jupyterlab>=4.2,<5"
	$(BIN)/dcr demo --dir $(DEMO) $(DEMO_ARGS)

# The whole suite, in two lanes side by side (tests/lanes.py): the modules that only compute beside
# everything else. PYTEST_ARGS go to both; naming test files runs just those: make test PYTEST_ARGS=tests/x.py
# helm's build (minutes on a cold Go cache) runs beside the Python and npm installs.
test: system-deps
	$(MAKE) --no-print-directory -j3 tools $(STAMP) $(CHP) jupyter
	$(BIN)/python tests/lanes.py $(PYTEST_ARGS)

# The fast lane while developing: every test that needs neither root nor minutes (the markers `root` and
# `slow`, declared in pyproject.toml), with the 20 slowest printed. Needs the virtualenv and the built
# JupyterLab extension (rebuilt only when its sources changed), no Debian packages; `make test` runs
# everything, as CI does. Options as for `make test`: make test-fast PYTEST_ARGS="tests/test_verify.py -x"
test-fast: tools $(STAMP) jupyter
	$(BIN)/python -m pytest -m "not root and not slow" --durations=20 $(PYTEST_ARGS)

# Python: ruff (lint and format). The JupyterLab extension: eslint (typescript-eslint's type-checked rules,
# React's rules of hooks; dcr_labextension/eslint.config.mjs), then the prettier check.
lint: $(STAMP) $(LABEXT)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	cd dcr_labextension && npm run --silent lint

clean:
	rm -rf $(VENV) .tools .demo build enclave/build dist .pytest_cache .ruff_cache .mypy_cache test-artifacts .npm/node_modules dcr_labextension/node_modules dcr_labextension/lib dcr_labextension/labextension
