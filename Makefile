# The two Quick start commands of README.rst, plus the benchmarks.
# Everything installs into .venv with only python3 and make on the machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# "compat" keeps twisted/plugins visible to Twisted's plugin discovery in an editable install.
INSTALL := $(PY) -m pip install --disable-pip-version-check -q -e . --config-settings editable_mode=compat

.PHONY: run test test-all bench soak clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q --upgrade pip

$(VENV)/.installed: $(PY) setup.cfg pyproject.toml
	$(INSTALL)
	touch $@

$(VENV)/.installed-test: $(PY) setup.cfg pyproject.toml
	$(PY) -m pip install --disable-pip-version-check -q -e ".[test]" --config-settings editable_mode=compat
	touch $@ $(VENV)/.installed

run: $(VENV)/.installed
	$(VENV)/bin/twistd -n --pidfile= spoon --server spoon.examples.EchoServer --port 30111

test: $(VENV)/.installed-test
	$(PY) -m pytest $(PYTEST_ARGS)

# The suite on every supported Python found here (noxfile.py; absent versions are skipped
# with a line saying so). nox goes into .venv; each version gets its own virtualenv in .venv/nox/.
test-all: $(PY)
	@$(PY) -c "import nox" 2>/dev/null || $(PY) -m pip install --disable-pip-version-check -q nox
	$(PY) -m nox $(NOX_ARGS) -- $(PYTEST_ARGS)

# matplotlib (the "bench" extra) draws the plots; without it RESULTS.md still has every number.
bench: $(VENV)/.installed-test
	@$(PY) -c "import matplotlib" 2>/dev/null || $(PY) -m pip install --disable-pip-version-check -q -e ".[test,bench]" --config-settings editable_mode=compat || echo "bench: matplotlib unavailable, no plots"
	$(PY) bench/run.py $(BENCH_ARGS)

# Not in CI: 10 minutes of mixed load on a pool with a worker killed every 30 s and a HUP
# every 60 s (bench/soak.py; SOAK_ARGS="--minutes 2" for a shorter one).
soak: $(VENV)/.installed-test
	$(PY) bench/soak.py $(SOAK_ARGS)

clean:
	rm -rf $(VENV) build dist *.egg-info
