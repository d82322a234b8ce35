# `make demo` and `make test` each create .venv and install the pinned set first.
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed

.PHONY: install demo test bench docs clean

install: $(STAMP)

# Re-installs only when the pins or the project metadata change (idempotent).
$(STAMP): requirements.lock pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -r requirements.lock
	$(VPY) -m pip install -q --no-deps -e .
	$(VPY) -c "import jax, flax, orbax.checkpoint, torch, transformers, tokenizers, safetensors, PIL, jinja2, hypothesis, fastapi, uvicorn, pydantic, prometheus_client, openai, xdist"
	touch $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VPY) -m mmjax.demo

# Two pytest workers (pytest-xdist), each file on one worker (its module fixtures built once):
# the suite is mostly single-threaded compiles, so two workers use both CI cores.
# TEST_WORKERS=0 runs in one process; more workers need ~3 GB of memory each.
TEST_WORKERS ?= 2

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(VPY) -m pytest -q tests $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

# docs/components.md is generated from the config dataclasses' field comments
docs: $(STAMP)
	$(VPY) -m mmjax.component_reference docs/components.md

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(VPY) -m benchmarks.generate

clean:
	rm -rf $(VENV) build *.egg-info
