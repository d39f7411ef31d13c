# Set-up and the main jobs, over a local virtual environment in .venv.
# TORCH pins the torch build to install first; `make TORCH=torch test` takes PyPI's default build instead.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV = .venv
PY = $(VENV)/bin/python

.PHONY: demo test bench bench-all bench384 ladder clean

$(VENV)/installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

# Train the small character model on Tiny Shakespeare (a few minutes on a laptop CPU) and print a sample.
# Trains once: a second `make demo` samples from the checkpoint it has.
demo: out-shakespeare-char-cpu/ckpt.pt $(VENV)/installed
	$(PY) sample.py --out_dir=out-shakespeare-char-cpu --num_samples=1 --max_new_tokens=500

out-shakespeare-char-cpu/ckpt.pt: | $(VENV)/installed
	$(PY) train_efficient.py config/train_shakespeare_char_cpu.py

test: $(VENV)/installed
	$(PY) -m pytest -q

# The README's front table: trains what is missing (both baselines, the strong one at half depth, EfficientGPT and
# EfficientGPT-8L), measures them side by side and draws the plot. matplotlib is the optional 'plot' extra.
bench: $(VENV)/installed
	$(PY) -m pip install --quiet -e ".[plot]"
	$(PY) bench_suite.py --plot=results --json=results/bench_suite.json

# The same with every mechanism alone beside them (76 minutes from a fresh clone on 2 CPU cores for 11 models, 55
# of them training; the half-depth strong baseline adds some 4).
bench-all: $(VENV)/installed
	$(PY) -m pip install --quiet -e ".[plot]"
	$(PY) bench_suite.py --models=all --plot=results --json=results/bench_suite_all.json

# The front table at 384 dims, where batch-1 decode reads the weights from memory (a training there runs at about
# 500 tokens/s on one thread of a 2-core CPU: some 45 minutes for its 700 steps).
bench384: $(VENV)/installed
	$(PY) -m pip install --quiet -e ".[plot]"
	$(PY) bench_suite.py --size=384 --plot=results --json=results/bench_suite384.json

# Decode speed-ups from n_embd 128 to 1024 on random weights (no training; about 10 minutes).
ladder: $(VENV)/installed
	$(PY) -m pip install --quiet -e ".[plot]"
	$(PY) bench_ladder.py --plot=results --json=results/scaling_ladder.json

clean:
	rm -rf $(VENV) out-* __pycache__ .pytest_cache
