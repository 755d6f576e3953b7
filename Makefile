# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install clean bench

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (Python 3.11)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch pinned to the CPU build that lies on this machine's disk; a newer range pulls a CUDA build
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[test,quant,tracking]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m lorakit demo

test: $(STAMP)
	$(VENV)/bin/lint-imports    # the layer contract in .importlinter
	$(PY) scripts/check_import_cycles.py
	$(PY) -m pytest -n 2    # both cores (pytest-xdist); plain `pytest` runs serially

bench: $(STAMP)
	$(PY) -m lorakit bench --device cpu --compare-peft --out benchmarks/results/cpu.json

clean:
	rm -rf $(VENV) build dist src/*.egg-info
