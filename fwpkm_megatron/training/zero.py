"""DeepSpeed ZeRO as the data-parallel optimizer engine (design table; megatron-deepspeed-notes.md Q1).

The model chunks stay megatron modules driven by megatron's schedules; DeepSpeed owns only the
optimizer step ("unmanaged" gradient accumulation): backward accumulates grads locally, and
`engine.step()` reduces them over DP (ZeRO-1/2 partitioned), computes the grad norm over the
model-parallel group, clips, steps the client torch AdamW and the LR scheduler.

- The client optimizer is torch's AdamW, so DeepSpeed never JIT-builds FusedAdam; on CPU the shm
  communication op is skipped (`_skip_shm_op`), so nothing is compiled at all.
- gradient_accumulation_steps = 1: megatron's schedule already divides the loss by num_microbatches.
- Fast weights are buffers: they are never handed to the optimizer and ZeRO-3 never partitions them.
- bf16 (`train.precision`): DeepSpeed's bf16 mode (fp32 master weights in its optimizer); the chunks are
  built with bf16 params_dtype/pipeline_dtype so PP buffers match, and the fast weights are put back in fp32.
- DeepSpeed 0.19.8 resets its backward-hook bookkeeping only in engine.forward; the schedule calls the
  module directly, so `_fix_backward_hook_state` resets it when a new backward starts with depth 0.
"""
from __future__ import annotations

import importlib
import os
import sys

import torch


def _skip_shm_op() -> None:
    """CPU: never JIT-compile DeepSpeed's shared-memory comm op (cpu-stack-notes.md section 3)."""
    if torch.cuda.is_available():
        return
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    importlib.import_module("deepspeed.comm.torch")
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None  # the module, not the torch package


def _fix_backward_hook_state(engine) -> None:
    prologue = engine._backward_prologue
    optimizer = engine.optimizer

    def fixed():
        if getattr(optimizer, "backward_active_depth", 1) == 0:
            optimizer.reset_for_new_step()
        return prologue()

    engine._backward_prologue = fixed


def deepspeed_config(run) -> dict:
    return {
        "train_micro_batch_size_per_gpu": run.train.micro_batch_size,
        "gradient_accumulation_steps": 1,
        "managed_gradient_accumulation": False,
        "gradient_clipping": run.train.grad_clip,
        "zero_optimization": {"stage": run.deepspeed.zero_stage},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": run.train.precision == "bf16"},  # the chunks' params/pipeline dtype match (engine.py)
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def build_deepspeed(parallel_engine, run):
    """(DeepSpeed engine, its optimizer, the LR scheduler) for a ParallelEngine's chunks."""
    _skip_shm_op()
    import deepspeed

    from fwpkm_megatron.parallel.deepspeed_mpu import mpu_adapter
    from fwpkm_megatron.training.optim import build_optimizer

    groups = parallel_engine.groups
    if groups.pp > 1 and run.model.tie_embeddings and groups.is_last_stage and not groups.is_first_stage:
        parallel_engine.chunks[-1].shared_embedding_or_output_weight().ds_pipe_replicated = True
    optimizer, scheduler = build_optimizer(parallel_engine.model, run.train)
    engine, ds_optimizer, _, _ = deepspeed.initialize(
        model=parallel_engine.model, optimizer=optimizer, lr_scheduler=scheduler,
        config=deepspeed_config(run), mpu=mpu_adapter(), dist_init_required=False)
    _fix_backward_hook_state(engine)
    if run.train.precision == "bf16":  # DeepSpeed casts every buffer; the fast weights stay fp32
        from fwpkm_megatron.training.megatron_dp import keep_fast_weights_fp32

        for chunk in parallel_engine.chunks:
            keep_fast_weights_fp32(chunk)
    return engine, ds_optimizer, scheduler
