"""Which pass of megatron's full activation recomputation is running (design decision 5).

megatron's `CheckpointFunction` runs a layer's forward twice: once without grad (the first pass, inside
its forward) and again with grad during the backward (the recompute). A memory layer writes its
fast weights in the first pass only and, in the recompute, reads the state its first pass read
(`FwPKMBlock` keeps a FIFO of those, matching the schedules' forward-then-backward order per stage).
"""
from __future__ import annotations

import torch


def _checkpointing() -> bool:
    from megatron.core.tensor_parallel.random import is_checkpointing

    return is_checkpointing()


def in_first_checkpointed_pass() -> bool:
    """Inside CheckpointFunction.forward: outputs are dropped and recomputed in the backward."""
    return _checkpointing() and not torch.is_grad_enabled()


def in_recompute() -> bool:
    """Inside the backward's re-run of a checkpointed forward."""
    return _checkpointing() and torch.is_grad_enabled()
