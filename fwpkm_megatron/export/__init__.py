"""Export a training checkpoint to a self-contained Hugging Face directory, and load it back.

- `layout.py`: any checkpoint layout (single-process, or distributed from any TP x PP x DP) -> one
  consolidated megatron state dict.
- `convert.py`: megatron <-> exported tensor names, and the exported config.
- `writer.py`: the export directory (safetensors, tokenizer, remote code, README, sha256 index).
- `reshard.py`: a checkpoint or export -> a training run dir that resumes at another TP x PP layout.
- `loading.py`: verified loading with `transformers` (`load_model`).
- `hf/`: the model code copied into every export (imports only torch and transformers).
"""
from fwpkm_megatron.export.hf.fwpkm_integrity import ExportIntegrityError, verify_index
from fwpkm_megatron.export.layout import ExportError, read_checkpoint
from fwpkm_megatron.export.loading import load_model
from fwpkm_megatron.export.reshard import reshard_checkpoint
from fwpkm_megatron.export.writer import export_checkpoint, load_megatron_state

__all__ = ["ExportError", "ExportIntegrityError", "export_checkpoint", "load_megatron_state", "load_model",
           "read_checkpoint", "reshard_checkpoint", "verify_index"]
