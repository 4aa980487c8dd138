# `make test` and `make bench` set themselves up: a virtual environment in
# .venv with the package installed (editable) and its [test] extra.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test test-slow bench arch-bench recall classes throughput demo clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

test: $(STAMP)
	@start=$$(date +%s); \
	$(PY) -m pytest -n 2 -m "not slow" --durations=30 tests; status=$$?; \
	echo "make test: suite took $$(( $$(date +%s) - start )) s"; exit $$status

test-slow: $(STAMP)
	$(PY) -m pytest -m slow --durations=30 tests

bench: $(STAMP)
	$(PY) -m experiments.op_bench

# Train tokens/s at T=2048 and state bytes of every CPU preset (BUILD.md's table).
arch-bench: $(STAMP)
	$(PY) -m experiments.arch_bench --seq_len=2048

# Recall vs state size on MQAR (the quick preset, ~15 min on 2 CPU cores), then the
# JRT-Prompt table of the same models; resumes where it stopped.
RECALL_DIR ?= runs/recall_quick
recall: $(STAMP)
	$(PY) -m experiments.recall_sweep --workdir=$(RECALL_DIR)
	$(PY) -m experiments.jrt_eval --workdir=$(RECALL_DIR)

# Languini-style equal-compute comparison (the cpu preset: six architectures at
# 6/12/24 class hours of 8 CPU-seconds, about an hour here), then its report;
# resumes where it stopped.
CLASSES_DIR ?= runs/classes_cpu
classes: $(STAMP)
	$(PY) -m experiments.compute_classes --workdir=$(CLASSES_DIR)

# Training, prefill and decoding throughput and memory against sequence length.
THROUGHPUT_DIR ?= runs/throughput
throughput: $(STAMP)
	$(PY) -m experiments.throughput --out=$(THROUGHPUT_DIR)

# BUDGET: training seconds per model (the demo trains two, then evaluates both).
BUDGET ?= 180
demo: $(STAMP)
	$(PY) -m experiments.demo --budget_s=$(BUDGET)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
