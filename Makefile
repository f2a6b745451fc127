# Two commands do all the set-up: `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
PIP     = $(PY) -m pip
# Never ask for a torch newer than 2.14.1 (the release these machines carry on disk).
TORCH  ?= torch==2.14.1 torchvision==0.29.1

.PHONY: install dev data demo test quickstart toy bench bench-quick gpu-check study study-variants study-first clean

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
	# test-only oracle: Betty 0.2.1 declares Python < 3.11; its own imports are torch and numpy
	$(PIP) install -q --no-deps --ignore-requires-python betty-ml==0.2.1
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

# -- benchmarks (benchmarks/README.md) ------------------------------------------------------------
# Peers (Betty, higher, TorchOpt) live in their own venv, never among the project's dependencies;
# it sees the project's venv (torch, timm, mlomae) through a .pth file instead of a second torch.
BENCH_VENV = benchmarks/.venv-bench
BENCH_PY   = $(BENCH_VENV)/bin/python
BENCH      = cd benchmarks && ../$(BENCH_PY) -W ignore

$(BENCH_VENV)/.installed: $(VENV)/.installed Makefile
	test -x $(BENCH_PY) || $(PY) -m venv $(BENCH_VENV)
	base=$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'); \
	dest=$$($(BENCH_PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'); \
	echo "import site; site.addsitedir('$$base')" > "$$dest/mlomae-base.pth"
	$(BENCH_PY) -m pip install -q --ignore-installed --no-deps higher==0.2.1 torchopt==0.7.3
	# Betty 0.2.1 declares Python < 3.11; its own imports are torch and numpy
	$(BENCH_PY) -m pip install -q --ignore-installed --no-deps --ignore-requires-python betty-ml==0.2.1
	# their own dependencies (TorchOpt's; Betty and higher need only torch and numpy)
	$(BENCH_PY) -m pip install -q 'optree>=0.4.1' 'typing-extensions>=4' graphviz
	touch $@

# every question in full, then plots and headlines (about 20 minutes on 2 cores)
bench: $(BENCH_VENV)/.installed
	$(BENCH) overhead.py
	$(BENCH) learned_cost.py
	$(BENCH) linear_probe.py
	$(BENCH) mae_methods.py
	$(BENCH) peers_mlp.py
	$(BENCH) peers_mae.py
	$(BENCH) memory.py
	$(BENCH) precision.py
	$(BENCH) plots.py
	$(BENCH) headlines.py

# the headline ratios in under two minutes (fewer repeats, fewer configurations)
bench-quick: $(BENCH_VENV)/.installed
	$(BENCH) overhead.py --quick
	$(BENCH) learned_cost.py --quick
	$(BENCH) linear_probe.py --quick
	$(BENCH) peers_mlp.py --quick
	$(BENCH) peers_mae.py --quick
	$(BENCH) memory.py --quick
	$(BENCH) precision.py --quick
	$(BENCH) headlines.py --quick

# the GPU check (benchmarks/README.md, "GPU check"): the CUDA tests, one-process torchrun (NCCL)
# on the toy and the quickstart, engine vs hand-written MAE throughput at ViT-B/16 224 in bf16
# and fp32, the MLO-MAE cycle's time and peak memory; one table, benchmarks/results/gpu_check.json.
# Without CUDA it says so and runs the same code paths at tiny sizes on the CPU (a dry run).
gpu-check: $(VENV)/.installed-dev
	$(PY) benchmarks/gpu_check.py

# the learned-masking study in the regime: every masking method x 3 seeds at 40 epochs, each run
# in its own process, resumable (tens of hours on 2 cores: stop it any time and run it again;
# see benchmarks/study/masking.yaml), then its table into benchmarks/RESULTS.md and the plots.
# Each finished run leaves a record in benchmarks/study/results/masking/ (commit it: the tables
# are made from the records, and a run with one is not trained again)
study: install data
	$(PY) benchmarks/study/run_study.py --study benchmarks/study/masking.yaml \
		--write-results benchmarks/RESULTS.md

# which repaired MLO-MAE masker the study takes: its variants at the study's budget, one seed,
# judged on the mask split (benchmarks/study/variants.yaml; about an hour a variant), its table
# into benchmarks/RESULTS.md; records in benchmarks/study/results/variants/
study-variants: install data
	$(PY) benchmarks/study/run_study.py --study benchmarks/study/variants.yaml \
		--write-results benchmarks/RESULTS.md

# the first study (6.4 epochs) and its masker-collapse diagnosis, as RESULTS.md reports them
study-first: install data
	$(PY) benchmarks/study/collapse.py
	$(PY) benchmarks/study/run_study.py
