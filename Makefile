# Newcomer entry points (see README "Quick start"): `make demo`, `make test`.
#
# `make venv` creates .venv and installs the pinned dependencies from pyproject.toml
# (TVM, torch CPU, onnx, dev tools, transformers/diffusers for the library-model benchmarks). It reinstalls only when pyproject.toml is newer than
# the stamp file .venv/.installed. torch is pinned to 2.13.0; to get the CPU build on a
# machine without a local wheel, set PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu
# (pip reads it from the environment; the Dockerfile does the same).

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
EXTRAS := torch,onnx,dev,bench

.PHONY: venv demo test bench bench-report lint clean distclean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 10))' || \
		{ echo "error: $(PYTHON) is older than Python 3.10; run: make PYTHON=python3.11 venv" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check --no-input -e '.[$(EXTRAS)]'
	touch $(STAMP)

demo: venv
	$(PY) examples/demo.py

test: venv
	$(PY) -m pytest -q

# All the CPU benchmarks (long: tens of minutes on 2 cores), then the tables and plots.
# fuzz.py and benchmarks/gpu/ are run on their own (see benchmarks/README.md).
bench: venv
	$(PY) benchmarks/estimator_accuracy.py
	$(PY) benchmarks/chunk_regions.py
	$(PY) benchmarks/budget_sweep.py
	$(PY) benchmarks/budget_sweep.py --case gpt:4096:1 --repeats 5 \
		--out benchmarks/results/budget_sweep_target_gpt.jsonl
	$(PY) benchmarks/budget_sweep.py --case evoformer:256 --case vit:2304:1 --repeats 5 \
		--out benchmarks/results/budget_sweep_target.jsonl
	$(PY) benchmarks/budget_sweep.py --case unet:128 --repeats 3 \
		--out benchmarks/results/budget_sweep_target_unet.jsonl  # ~15 min a budget
	$(PY) benchmarks/search_time.py
	$(PY) benchmarks/cpu_speed.py
	$(PY) benchmarks/attention_kernel.py
	$(PY) benchmarks/library_models.py
	$(PY) benchmarks/dynamic_lengths.py
	$(PY) benchmarks/max_length.py
	$(PY) benchmarks/calibrate_cost.py
	$(PY) benchmarks/refit.py
	$(PY) benchmarks/report.py

# Only the report: plots, benchmarks/README.md tables and the README headline, from the
# JSON lines already in benchmarks/results/ (a few seconds, runs no model).
bench-report: venv
	$(PY) benchmarks/report.py

lint: venv
	$(PY) -m ruff check .

# Removes build outputs and caches; keeps .venv (use `make distclean` to drop it too).
clean:
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache .hypothesis
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
