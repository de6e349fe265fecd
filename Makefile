# Two commands do all set-up on a fresh machine: `make run` (main job on the embedded default) and `make test`.
PYTHON ?= python3
# The CPU wheel (a local build here); GPU machines keep their CUDA torch, see README.
TORCH_CPU = torch==2.13.0

.PHONY: setup run test bench
setup:
	$(PYTHON) -m pip install -q "$(TORCH_CPU)"
	$(PYTHON) -m pip install -q -e ".[test]"

run: setup
	$(PYTHON) jobs/collect.py --output runs/collect
	$(PYTHON) jobs/train_filter.py --traces runs/collect --output runs/filter
	$(PYTHON) -m learn2pd_core.demo --filter runs/filter

test: setup
	$(PYTHON) -m pytest -q

bench: setup
	$(PYTHON) benchmarks/engine.py
	$(PYTHON) benchmarks/filter_fit.py --traces runs/collect
