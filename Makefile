# Two commands on a fresh machine: `make demo` and `make test`. Both create or reuse .venv here.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Versions this repository is tested with on CPU. torch is pinned only where no CUDA device is present:
# on a GPU cluster bring your own CUDA torch and `pip install -e .`.
CPU_PINS := torch==2.13.0 deepspeed==0.19.8 megatron-core==0.16.1 triton==3.9.0 mosaicml-streaming==0.13.0 \
            tensorboard==2.21.0 submitit==1.5.4 tokenizers==0.22.2 safetensors==0.8.0 pyarrow==26.0.1 \
            zstandard==0.25.0 boto3==1.44.8 'moto[server]==5.2.5' matplotlib==3.11.2
# Second step: mosaicml-streaming 0.13 declares transformers<5 yet runs with 5.x, which the export and
# lm-eval need, so pip cannot resolve both in one command (it warns about the declared conflict).
EVAL_PINS := transformers==5.24.0 'lm-eval[hf]==0.4.13' tokenizers==0.23.3
STAMP := $(VENV)/.installed
# mosaicml-streaming pulls in PyPI's torchvision, a CUDA build whose operators cannot register beside CPU
# torch, so `import torchvision` (and with it transformers' model classes and `import streaming`) fails.
# Idempotent fix: an import hook in site-packages defines the two operator schemas before torchvision
# loads, only for a CUDA torchvision beside a CPU torch (fwpkm_megatron/_torchvision_cpu.py says more).
define TV_HOOK
import shutil, sysconfig
d = sysconfig.get_paths()["purelib"]
shutil.copyfile("fwpkm_megatron/_torchvision_cpu.py", d + "/fwpkm_torchvision_cpu.py")
open(d + "/fwpkm_torchvision_cpu.pth", "w").write("import fwpkm_torchvision_cpu\n")
endef
export TV_HOOK

.PHONY: env demo test clean-demo

env: $(STAMP)

$(STAMP): setup.py Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -U pip
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "CUDA device found: installing without the CPU torch pin"; \
		$(PY) -m pip install -q -e '.[test]' && \
		$(PY) -m pip install -q 'transformers>=5.24' 'lm-eval[hf]>=0.4.13'; \
	else \
		$(PY) -m pip install -q $(CPU_PINS) -e '.[test]' && \
		$(PY) -m pip install -q torch==2.13.0 $(EVAL_PINS); \
	fi
	$(PY) -c "$$TV_HOOK"
	$(PY) -c "from transformers import AutoModelForCausalLM, PreTrainedModel"  # plain transformers imports
	@touch $(STAMP)

demo: env
	$(VENV)/bin/fwpkm-prep --out data/stdlib --max-mb 8 --vocab-size 4096 --seq-len 256
	$(VENV)/bin/fwpkm-train --config configs/tiny.yaml train.run_dir=runs/demo
	$(VENV)/bin/fwpkm-export --checkpoint runs/demo --out runs/demo/export --overwrite
	$(VENV)/bin/fwpkm-eval ppl --model runs/demo/export --data data/stdlib \
		--policies persistent per_sequence frozen --limit 50 --out runs/demo/eval
	$(VENV)/bin/fwpkm-eval niah --model runs/demo/export --data data/stdlib \
		--lengths 256 512 --per-length 5 --n-iters 1 2 --out runs/demo/eval

test: env
	$(PY) -m pytest tests -q

clean-demo:
	rm -rf runs/demo data/stdlib
