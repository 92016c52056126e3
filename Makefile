# `make run` and `make test` work on a fresh machine: each sets up .venv itself.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
PYTEST_ARGS ?=

.PHONY: install run test lint migrate clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@rm -f $(VENV)/.installed-*; touch $@

# Serve on 127.0.0.1:8000 with SQLite and in-process limits. Without API_KEYS a development
# key is made once and kept in .dev-api-key; without OPENAI_API_KEY the offline mock answers.
run: install
	@if [ -z "$$API_KEYS$$API_KEYS_FILE" ] && [ ! -s .dev-api-key ]; then \
		$(PY) -c 'import secrets; print("dev:" + secrets.token_urlsafe(24))' > .dev-api-key; \
		chmod 600 .dev-api-key; fi; \
	if [ -z "$$API_KEYS$$API_KEYS_FILE" ]; then \
		export API_KEYS_FILE=.dev-api-key; \
		echo "API key (from .dev-api-key): $$(cut -d: -f2- .dev-api-key)"; fi; \
	if [ -z "$$OPENAI_API_KEY" ] && [ -z "$$LLM_PROVIDER" ]; then \
		export LLM_PROVIDER=mock; \
		echo "OPENAI_API_KEY is not set: answering with the offline mock provider."; fi; \
	exec $(VENV)/bin/reasoning-agent serve

migrate: install
	$(VENV)/bin/reasoning-agent migrate

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check service tests
	$(VENV)/bin/ruff format --check service tests
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache reasoning_agent.db*
