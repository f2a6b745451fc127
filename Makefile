# Two commands do all the set-up: `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
PIP     = $(PY) -m pip
# Never ask for a torch newer than 2.14.1 (the release these machines carry on disk).
TORCH  ?= torch==2.14.1 torchvision==0.29.1

.PHONY: install dev data demo test quickstart toy bench bench-quick study clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) install -q -e '.[dev]'
	# test-only: 20 real CIFAR-10 and ImageNet images (foolbox's own dependencies not wanted)
	$(PIP) install -q --no-deps foolbox==3.3.4
	touch $@

install: $(VENV)/.installed

dev: $(VENV)/.installed-dev

data: install
	PYTHON=$(PY) bash scripts/get_data.sh

demo: install data
	$(VENV)/bin/mlomae run experiments/quickstart.yaml

toy: install
	$(VENV)/bin/mlomae run experiments/toy_bilevel.yaml

test: dev data
	$(PY) -m pytest -q

clean:
	rm -rf runs .pytest_cache
