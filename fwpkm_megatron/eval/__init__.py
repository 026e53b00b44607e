"""Evaluation of exported FwPKM models with test-time memorization.

- `perplexity.py`: streaming perplexity over prepared shards; persistent / per_sequence / frozen
  fast weights, selectable update chunk; per-position loss curve (JSON + PNG).
- `niah.py`: needle-in-a-haystack with n-iter reads and greedy decoding (JSON + PNG heatmap).
- `recall.py`: value-token loss and top-1 on held-out `fwpkm-prep recall` documents, on the training model,
  under per_sequence / persistent / frozen (bench/fidelity.py, tests/e2e/test_recall_memory.py).
- `memory_stats.py`: slot coverage, collision rate, KL to uniform, gate histograms (JSON, PNG, TensorBoard).
- `lm_eval_adapter.py`: the lm-eval model `fwpkm` (imports lm_eval; import it only when needed).

Models come from `fwpkm_megatron.export.load_model` (an export directory, or a checkpoint exported on the fly).
"""
from fwpkm_megatron.eval.memory_stats import MemoryStats
from fwpkm_megatron.eval.niah import evaluate_niah, generate_records, plot_niah, read_jsonl
from fwpkm_megatron.eval.perplexity import plot_loss_curves, streaming_perplexity, val_segments

__all__ = ["MemoryStats", "evaluate_niah", "generate_records", "plot_loss_curves", "plot_niah", "read_jsonl",
           "streaming_perplexity", "val_segments"]
