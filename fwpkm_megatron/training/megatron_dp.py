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

Memory-sharded parameters (static PKM tables under parallel.memory_parallel = M > 1) hold different columns
on the M ranks of a memory group, so their gradients must be summed only over the ranks holding the same
columns (the memory sync group), never over the whole DP group. They carry megatron's expert-parallel flag
(`allreduce=False`, parallel/sharding.py::shard_pkm), and megatron's process-group collection maps the
expert slots onto the memory groups (`memory_process_groups`): DDP keeps them in a separate bucket reduced
over the sync group (scaled by 1/DP like the dense grads), and megatron builds a second optimizer over
them whose grad norm sums over the memory group's TP x PP x M ranks, so each column shard counts once.
"""
from __future__ import annotations

import math

import torch
from megatron.core.optimizer.optimizer import ChainedOptimizer
from torch import nn

from fwpkm_megatron.training.device import compute_dtype


def keep_fast_weights_fp32(chunk: nn.Module) -> None:
    """Float16Module casts every buffer; fast weights accumulate unit-step writes and must stay fp32."""
    from fwpkm_megatron.memory import fast_weight_states

    for state in fast_weight_states(chunk).values():  # FwPKM keys/values, FwMLP weights
        for name, buffer in list(state.named_buffers(recurse=False)):
            if buffer.is_floating_point():
                setattr(state, name, buffer.float())


def has_memory_sharded_params(run, groups) -> bool:
    """Whether static PKM tables are split over memory groups (the same answer on every rank)."""
    return groups.mp > 1 and bool(run.pkm.layers)


def memory_process_groups(run, groups):
    """megatron's ProcessGroupCollection with the expert-parallel slots on the memory groups: expert data
    parallel = the memory sync group (same columns, other groups), tensor-expert-pipeline = the memory
    group's TP x PP x M ranks (grad norms). None when no parameter is memory-sharded (megatron's defaults)."""
    if not has_memory_sharded_params(run, groups):
        return None
    from megatron.core import parallel_state as ps
    from megatron.core.process_groups_config import ProcessGroupCollection

    return ProcessGroupCollection(
        tp=ps.get_tensor_model_parallel_group(), pp=ps.get_pipeline_model_parallel_group(),
        mp=ps.get_model_parallel_group(), dp=ps.get_data_parallel_group(),
        dp_cp=ps.get_data_parallel_group(with_context_parallel=True), ep=groups.mp_group,
        expt_dp=groups.mem_sync_group, tp_ep_pp=groups.mem_model_group,
        intra_dist_opt=ps.get_intra_distributed_optimizer_instance_group() if run.optimizer.distributed else None)


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
    wrapped, pg_collection = [], memory_process_groups(run, groups)
    for i, chunk in enumerate(chunks):
        module = chunk
        if run.train.precision == "bf16":
            module = Float16Module(chunk.config, chunk)
            keep_fast_weights_fp32(chunk)
        # later virtual stages share one bucket each (megatron's rule for interleaving)
        wrapped.append(DistributedDataParallel(chunk.config, ddp_config, module, disable_bucketing=i > 0,
                                               pg_collection=pg_collection))
    config = chunks[0].config
    config.no_sync_func = [m.no_sync for m in wrapped] if len(wrapped) > 1 else wrapped[0].no_sync
    from megatron.core.distributed import finalize_model_grads

    config.finalize_model_grads_func = finalize_model_grads
    return wrapped


def build_optimizer(wrapped: list[nn.Module], run, groups):
    """(megatron optimizer, LR scheduler on the torch AdamW inside it (two with memory-sharded parameters))."""
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
    pg_collection = memory_process_groups(run, groups)
    optimizer = get_megatron_optimizer(config, wrapped, pg_collection=pg_collection,
                                       use_gloo_process_groups=pg_collection is None)
    inner = [o.optimizer for o in optimizer.chained_optimizers]
    if len(inner) > (1 if pg_collection is None else 2):
        raise RuntimeError(f"expected one optimizer over the dense parameters (and one over the memory-sharded "
                           f"ones), megatron built {len(inner)}")
    for opt in inner:  # megatron's own scheduler applies wd_mult; ours is the LR curve only
        for group in opt.param_groups:
            group["weight_decay"] = t.weight_decay * group.get("wd_mult", 1.0)
    if pg_collection is not None:
        optimizer = MemoryShardedOptimizer(optimizer.chained_optimizers, pg_collection.intra_dist_opt
                                           if run.optimizer.distributed else pg_collection.tp_ep_pp)
    scheduler = LRSchedules(inner, lambda step: lr_at(step, t) / t.lr)
    return optimizer, scheduler.schedulers[0] if len(inner) == 1 else scheduler


class MemoryShardedOptimizer(ChainedOptimizer):
    """megatron's chain of (dense, memory-sharded) optimizers whose grad norm every rank computes alike.

    Each optimizer's norm sums over its own group (dense: TP x PP; memory-sharded: the memory group's
    TP x PP x M ranks, or the world with the distributed optimizer). A pipeline stage without static PKM
    layers has no memory optimizer; it still joins that group's reduction with zero, so every rank of the
    group takes part and all ranks clip by the same total norm."""

    def __init__(self, optimizers: list, memory_stats_group):
        super().__init__(optimizers)
        self.memory_stats_group = memory_stats_group

    @torch.no_grad()
    def get_grad_norm(self) -> float:
        from megatron.core.optimizer.clip_grads import get_grad_norm_fp32

        squares = [(opt.get_grad_norm() or 0.0) ** 2 for opt in self.chained_optimizers]
        if len(self.chained_optimizers) == 1:  # no memory-sharded parameter on this stage
            squares.append(get_grad_norm_fp32([], grad_stats_parallel_group=self.memory_stats_group) ** 2)
        return math.sqrt(sum(squares))


class LRSchedules:
    """The LR curve on each torch optimizer megatron built (dense, memory-sharded), as one scheduler.

    Its state is the dense scheduler's, a plain LambdaLR state_dict, so a checkpoint resumes at any layout
    (a layout without memory-sharded parameters has just that scheduler)."""

    def __init__(self, optimizers: list[torch.optim.Optimizer], curve):
        self.schedulers = [torch.optim.lr_scheduler.LambdaLR(opt, curve) for opt in optimizers]

    def step(self) -> None:
        for scheduler in self.schedulers:
            scheduler.step()

    def get_last_lr(self) -> list[float]:  # in the order of the chained optimizer's param_groups
        return [lr for scheduler in self.schedulers for lr in scheduler.get_last_lr()]

    def state_dict(self) -> dict:
        return self.schedulers[0].state_dict()

    def load_state_dict(self, state: dict) -> None:
        for scheduler in self.schedulers:  # every group follows the one curve: same step, same LR
            own = scheduler.state_dict()
            scheduler.load_state_dict({**state, "base_lrs": own["base_lrs"],
                                       "_last_lr": [state["_last_lr"][0]] * len(own["_last_lr"])})
