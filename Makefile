# Set-up and the main jobs, over a local virtual environment in .venv.
# TORCH pins the torch build to install first; `make TORCH=torch test` takes PyPI's default build instead.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV = .venv
PY = $(VENV)/bin/python

.PHONY: demo test bench clean

$(VENV)/installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

# Train the small character model on Tiny Shakespeare (a few minutes on a laptop CPU) and print a sample.
demo: $(VENV)/installed
	$(PY) train_efficient.py config/train_shakespeare_char_cpu.py
	$(PY) sample.py --ckpt=out-shakespeare-char-cpu/ckpt.pt --num_samples=1 --max_new_tokens=500

test: $(VENV)/installed
	$(PY) -m pytest -q

bench: $(VENV)/installed
	$(PY) bench.py

clean:
	rm -rf $(VENV) out-* __pycache__ .pytest_cache
