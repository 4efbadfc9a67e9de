# Two entry points on a fresh machine: `make run` and `make test`.
# TORCH_SPEC picks the torch build: the default pin resolves to the CPU wheel on
# machines that carry it locally and to PyPI's CUDA wheel elsewhere; GPU users
# may pass e.g. TORCH_SPEC="torch==2.13.0 --index-url <their CUDA index>".
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
CONFIG ?= configs/local.yaml
PY := $(VENV)/bin/python

.PHONY: install chromium run test bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

# The playground's browser tests drive Debian's Chromium (Playwright never downloads a browser
# here): installed with apt when missing and apt-get is there; otherwise those tests skip, saying why.
chromium:
	@if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null 2>&1; then \
		apt-get install -y chromium >/dev/null 2>&1 || \
		{ apt-get update >/dev/null && apt-get install -y chromium >/dev/null; } || \
		echo "could not install chromium: the browser tests will skip"; \
	fi

run: install
	$(VENV)/bin/kandinsky-serve run --config $(CONFIG)

test: install chromium
	$(PY) -m pytest -q

bench: install
	$(VENV)/bin/kandinsky-serve bench latency

clean:
	rm -rf $(VENV) .pytest_cache *.egg-info test-artifacts
