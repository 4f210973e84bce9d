# torq-relay: make help lists the targets.
PYTHON ?= $(shell command -v python3 || command -v python)
DOMAIN ?= market_data

.PHONY: help run test bench lint soak

help:  ## list the targets
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/'

run:  ## serve one domain: make run DOMAIN=signal
	$(PYTHON) relay.py --domain $(DOMAIN)

test:  ## the test suite (installs pytest with pip when missing)
	@$(PYTHON) -c "import pytest" 2>/dev/null || $(PYTHON) -m pip install -q pytest
	$(PYTHON) -m pytest -q

bench:  ## every SPEC performance figure, side by side (about 3 minutes)
	$(PYTHON) bench.py

soak:  ## 60 s of mixed traffic on all three domains; the accounting must balance
	$(PYTHON) soak.py

lint:  ## ruff check and mypy --strict, each when installed
	@if $(PYTHON) -m ruff --version >/dev/null 2>&1; then \
		echo "ruff check"; $(PYTHON) -m ruff check . || exit 1; \
	else echo "ruff not installed: skipped (pip install ruff)"; fi
	@if $(PYTHON) -m mypy --version >/dev/null 2>&1; then \
		echo "mypy --strict"; $(PYTHON) -m mypy --strict logic.py relay.py || exit 1; \
	else echo "mypy not installed: skipped (pip install mypy)"; fi
