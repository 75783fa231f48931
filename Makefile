# Two commands do all the set-up on a fresh machine with Python 3.10+:
#   make demo   builds .venv, installs pyro_elbo, runs the main job
#   make test   builds .venv, installs pyro_elbo[dev], runs ruff and the whole test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --constraint constraints.txt
OUT ?= demo-output

.PHONY: demo test lint bench venv clean

$(VENV)/.created:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	touch $@

$(VENV)/.runtime: $(VENV)/.created pyproject.toml constraints.txt
	$(PIP) --quiet torch==2.13.0
	$(PIP) --quiet -e .
	touch $@

$(VENV)/.dev: $(VENV)/.runtime
	$(PIP) --quiet -e ".[dev]"
	touch $@

venv: $(VENV)/.dev

demo: $(VENV)/.runtime
	$(PY) -m pyro_elbo demo --out $(OUT)

lint: $(VENV)/.dev
	$(VENV)/bin/ruff check .

test: $(VENV)/.dev
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -n 2 --dist loadfile tests $(wildcard notebooks/*.ipynb) --nbmake

bench: $(VENV)/.dev
	$(PY) -m benchmarks

clean:
	rm -rf $(VENV) demo-output
