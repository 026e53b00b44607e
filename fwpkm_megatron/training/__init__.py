"""Training: the `Trainer` loop, slow-weight optimizer, atomic checkpoints and TensorBoard logging.

`Trainer` imports the model and data stacks (megatron-core, streaming) only when constructed, so
importing this package does not pull them in.
"""
from fwpkm_megatron.training.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from fwpkm_megatron.training.trainer import Trainer

__all__ = ["CheckpointError", "Trainer", "latest_checkpoint", "load_checkpoint", "save_checkpoint"]
