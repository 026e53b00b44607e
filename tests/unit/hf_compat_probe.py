"""Run inside another transformers version (tests/unit/test_export.py): logits, greedy and beam
generation, and bf16 loading of an export, saved for the caller to compare. Usage: probe.py EXPORT OUT.pt"""
import sys

import torch
import transformers
from transformers import AutoModelForCausalLM

path, out = sys.argv[1], sys.argv[2]
model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
ids = torch.arange(3, 43)[None] % model.config.vocab_size
mask = torch.ones_like(ids)
with torch.no_grad():
    result = {"version": transformers.__version__, "logits": model(ids).logits,
              "greedy": model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False),
              "beam": model.generate(ids, attention_mask=mask, max_new_tokens=4, num_beams=2, do_sample=False)}
bf16 = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.bfloat16)
result["bf16_fast_dtype"] = str(next(iter(bf16.fast_weights.values())).values.dtype)
torch.save(result, out)
