"""The plain engine's data parallelism and precision, the megatron way (megatron-core 0.16.1).

    chunk (GPTModel, on the rank's device)
      -> Float16Module            train.precision=bf16: bf16 compute; the fast-weight buffers are put back in fp32
      -> DistributedDataParallel  grads accumulate in fp32 `main_grad` buffers, bucketed all-reduce
                                  (optimizer.distributed: reduce-scatter) launched during the backward
    optimizer: megatron's FP32Optimizer / Float16OptimizerWithFloat16Params (fp32 master weights) /
               DistributedOptimizer (ZeRO-1: master weights, AdamW state and the update sharded over DP,
               parameters all-gathered after the step), each around torch's AdamW (no TE/Apex here)
    schedule:  `config.no_sync_func` defers the grad reduction to the last micro-batch;
               `config.finalize_model_grads_func` waits for it and sums the tied embedding's grads over the
               first and last pipeline stage.

The LR schedule is this project's (training/optim.py::lr_at) on the wrapped torch AdamW, so every engine
follows the same curve. Weight decay: megatron's rule (none for biases and 1-D tensors), which equals
training/optim.py's for every parameter of this model.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from fwpkm_megatron.training.device import compute_dtype


def keep_fast_weights_fp32(chunk: nn.Module) -> None:
    """Float16Module casts every buffer; fast weights accumulate unit-step writes and must stay fp32."""
    from fwpkm_megatron.memory import fast_weight_states

    for state in fast_weight_states(chunk).values():  # FwPKM keys/values, FwMLP weights
        for name, buffer in list(state.named_buffers(recurse=False)):
            if buffer.is_floating_point():
                setattr(state, name, buffer.float())


def wrap_chunks(chunks: list[nn.Module], run, groups) -> list[nn.Module]:
    """Float16Module (bf16) and megatron DDP around each chunk; the chunks themselves stay addressable."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.transformer.module import Float16Module

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,              # fp32 main grads whatever the compute dtype
        overlap_grad_reduce=groups.dp > 1,     # bucket all-reduces launched as the backward produces grads
        use_distributed_optimizer=run.optimizer.distributed,
        average_in_collective=False,           # grads scaled by 1/DP, then summed (exact in fp32 for DP = 2^k)
    )
    wrapped = []
    for i, chunk in enumerate(chunks):
        module = chunk
        if run.train.precision == "bf16":
            module = Float16Module(chunk.config, chunk)
            keep_fast_weights_fp32(chunk)
        # later virtual stages share one bucket each (megatron's rule for interleaving)
        wrapped.append(DistributedDataParallel(chunk.config, ddp_config, module, disable_bucketing=i > 0))
    config = chunks[0].config
    config.no_sync_func = [m.no_sync for m in wrapped] if len(wrapped) > 1 else wrapped[0].no_sync
    from megatron.core.distributed import finalize_model_grads

    config.finalize_model_grads_func = finalize_model_grads
    return wrapped


def build_optimizer(wrapped: list[nn.Module], run):
    """(megatron optimizer, LR scheduler on the torch AdamW inside it)."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from fwpkm_megatron.training.optim import lr_at

    t = run.train
    dtype = compute_dtype(t.precision)
    config = OptimizerConfig(
        optimizer="adam", lr=t.lr, min_lr=t.min_lr, weight_decay=t.weight_decay,
        adam_beta1=t.betas[0], adam_beta2=t.betas[1], adam_eps=t.adam_eps,
        clip_grad=t.grad_clip if t.grad_clip > 0 else math.inf,  # inf: the norm is still computed, never clips
        bf16=dtype == torch.bfloat16, params_dtype=dtype,
        use_distributed_optimizer=run.optimizer.distributed)
    optimizer = get_megatron_optimizer(config, wrapped)
    inner = [o.optimizer for o in optimizer.chained_optimizers]
    if len(inner) != 1:
        raise RuntimeError(f"expected one optimizer over the dense parameters, megatron built {len(inner)}")
    for group in inner[0].param_groups:  # megatron's own scheduler applies wd_mult; ours is the LR curve only
        group["weight_decay"] = t.weight_decay * group.get("wd_mult", 1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(inner[0], lambda step: lr_at(step, t) / t.lr)
    return optimizer, scheduler
