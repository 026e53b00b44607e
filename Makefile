# Two commands on a fresh machine: `make demo` and `make test`. Both create or reuse .venv here.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Versions this repository is tested with on CPU. torch is pinned only where no CUDA device is present:
# on a GPU cluster bring your own CUDA torch and `pip install -e .`.
CPU_PINS := torch==2.13.0 deepspeed==0.19.8 megatron-core==0.16.1 triton==3.9.0 mosaicml-streaming==0.13.0 \
            tensorboard==2.21.0 submitit==1.5.4 tokenizers==0.22.2 safetensors==0.8.0
STAMP := $(VENV)/.installed

.PHONY: env demo test clean-demo

env: $(STAMP)

$(STAMP): setup.py Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -U pip
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "CUDA device found: installing without the CPU torch pin"; \
		$(PY) -m pip install -q -e '.[test]'; \
	else \
		$(PY) -m pip install -q $(CPU_PINS) -e '.[test]'; \
	fi
	@touch $(STAMP)

demo: env
	$(VENV)/bin/fwpkm-prep --out data/stdlib --max-mb 8 --vocab-size 4096 --seq-len 256
	$(VENV)/bin/fwpkm-train --config configs/tiny.yaml train.run_dir=runs/demo

test: env
	$(PY) -m pytest tests -q

clean-demo:
	rm -rf runs/demo data/stdlib
