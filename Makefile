# Two commands do all set-up on a fresh machine: `make run` (main job on the embedded default) and `make test`.
PYTHON ?= python3
# The CPU wheel (a local build here); GPU machines keep their CUDA torch, see README.
TORCH_CPU = torch==2.13.0

.PHONY: setup run test bench
setup:
	$(PYTHON) -m pip install -q "$(TORCH_CPU)"
	$(PYTHON) -m pip install -q -e ".[test]"

# collect -> train_filter -> evaluate into runs/{collect,filter,evaluate}; ends with the report table.
# A rerun skips the stages that are complete.
run: setup
	$(PYTHON) jobs/pipeline.py --run-dir runs

test: setup
	$(PYTHON) -m pytest -q

bench: setup
	$(PYTHON) benchmarks/engine.py
	$(PYTHON) benchmarks/filter_fit.py --traces runs/collect
