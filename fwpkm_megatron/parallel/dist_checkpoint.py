"""Layout-independent checkpoints through megatron-core `dist_checkpointing` (design decision 8).

A `dist_checkpointing` directory stores every tensor once, under a global key and its global shape;
each rank declares which piece it holds (`sharded_state_dict()`), so a checkpoint written at one
TP x PP x DP layout loads at another. megatron's own modules declare their TP splits; the memory
modules declare theirs with `sharded_tensors` below (memory/fwpkm.py, memory/pkm.py, memory/state.py):

- value tables, value projections, the FwPKM output norm: column-sharded along d_v (`tp_axes`);
- output projections: row-parallel (input columns, axis 1);
- queries, keys (fast-weight sub-keys and PKM sub-keys), gates, biases of row-parallel layers: replicated.

Without these declarations a TP-sharded tensor counts as TP-replicated: a TP2 -> TP1 load fails on
the global shape and, worse, a TP2 -> TP2 load silently gives rank 1 rank 0's columns
(megatron-deepspeed-notes.md Q4). Layer keys carry the global layer id (the config sets
`hetereogenous_dist_checkpoint`, Q3), so pipeline stages and virtual stages do not matter either.

`persistent_local` fast weights differ between DP replicas: each FastWeightState then carries
`replica = (dp_rank, dp)` (set by `parallel/apply.py::parallelize`) and its tensors get a leading DP
axis, so every replica's memory is stored, not rank 0's. Such a checkpoint loads only at the same DP
size (the trainer checks this before loading and says so).

The plain AdamW state (exp_avg, exp_avg_sq) is stored beside the model, sharded exactly like each
parameter (megatron's `dist_checkpointing.optimizer` helpers), so it reshards with the model.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from fwpkm_megatron.memory.checkpoint import child_tensors, sharded_tensors  # noqa: F401  (re-exported)

# Metadata of every sharded_state_dict call: layers differ (FwPKM branch, PKM MLP), so each keeps its own
# entry instead of being stacked along a layer axis.
METADATA = {"non_homogeneous_layers": True}
# Optimizer state keys that are scalars per parameter (stored once, as a common value).
_SCALAR_STATE = ("step",)


# --------------------------------------------------------------------------------- model + optimizer

def model_sharded_state_dict(chunks: list[nn.Module]) -> dict:
    """{"chunk{i}": chunk i's sharded state dict}; the keys inside are global, so the nesting is free."""
    return {f"chunk{i}": chunk.sharded_state_dict(metadata=dict(METADATA)) for i, chunk in enumerate(chunks)}


def adamw_views(optimizer) -> list[tuple[torch.optim.Optimizer, list[tuple[torch.Tensor, torch.Tensor]]]] | None:
    """[(torch AdamW, [(model parameter, the tensor AdamW steps)])] of a torch or megatron optimizer: one
    entry, or two with memory-sharded parameters (megatron's second optimizer, training/megatron_dp.py).

    megatron's FP32Optimizer steps the model parameters themselves; its Float16OptimizerWithFloat16Params
    steps fp32 master copies (stored beside the moments as `main_param`). None for megatron's
    DistributedOptimizer, whose state is sharded over DP (its checkpoints keep model and fast weights).
    """
    if optimizer is None:
        return None
    if not hasattr(optimizer, "chained_optimizers"):
        return [(optimizer, [(p, p) for g in optimizer.param_groups for p in g["params"]])]
    views = []
    for opt in optimizer.chained_optimizers:
        if hasattr(opt, "shard_fp32_from_float16_groups") or type(opt).__name__ == "DistributedOptimizer":
            return None
        pairs = []
        if hasattr(opt, "float16_groups"):  # Float16OptimizerWithFloat16Params: per group, half then fp32 params
            for half, main, fp32 in zip(opt.float16_groups, opt.fp32_from_float16_groups, opt.fp32_from_fp32_groups):
                pairs += list(zip(half, main)) + [(p, p) for p in fp32]
        else:
            pairs += [(p, p) for g in opt.optimizer.param_groups for p in g["params"]]
        views.append((opt.optimizer, pairs))
    return views


def adamw_view(optimizer) -> tuple[torch.optim.Optimizer, list[tuple[torch.Tensor, torch.Tensor]]] | None:
    """The one (torch AdamW, pairs) of `adamw_views` (an optimizer over dense parameters only)."""
    views = adamw_views(optimizer)
    if views is None:
        return None
    if len(views) != 1:
        raise ValueError(f"expected one optimizer over the dense parameters, got {len(views)}")
    return views[0]


def _init_adamw_state(optimizer: torch.optim.Optimizer) -> None:
    """Give every parameter AdamW state (zeros, step 0) so it has a place in the checkpoint.

    A parameter without state has taken no step; zeros at step 0 are exactly what AdamW would create.
    """
    for group in optimizer.param_groups:
        for p in group["params"]:
            if not optimizer.state[p]:
                optimizer.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                                      "exp_avg_sq": torch.zeros_like(p)}


def optimizer_sharded_state_dict(optimizer, model_sd: dict, main_params: bool | None = None) -> dict:
    """AdamW state as ShardedTensors keyed `optimizer.state.{exp_avg,exp_avg_sq[,main_param]}.<parameter key>`.

    `optimizer` is torch's AdamW or a non-distributed megatron optimizer (see `adamw_views`); fp32 master
    weights of a bf16 run are stored as `main_param`. The per-parameter `step` counters are stored once
    (they are equal: every slow weight steps every step). `main_params` (loading): whether the checkpoint
    holds master weights; None (saving): store them where this run keeps separate ones.
    """
    from megatron.core.dist_checkpointing.optimizer import (get_param_id_to_sharded_param_map,
                                                            make_sharded_optimizer_tensor)

    views = adamw_views(optimizer)
    for adamw, _ in views:
        _init_adamw_state(adamw)
    pairs = [(model, main, adamw) for adamw, view in views for model, main in view]
    params = [model for model, _, _ in pairs]
    id_map = get_param_id_to_sharded_param_map(model_sd, params)
    missing = [i for i in range(len(params)) if i not in id_map]
    if missing:
        raise ValueError(f"{len(missing)} optimized parameters have no sharded model tensor "
                         f"(shapes {[tuple(params[i].shape) for i in missing[:4]]})")
    state, steps = {}, set()
    for i, (model, main, adamw) in enumerate(pairs):
        s = adamw.state[main]
        steps.add(float(s["step"]))
        tensors = {k: v for k, v in s.items() if k not in _SCALAR_STATE}
        if (main is not model) if main_params is None else main_params:
            tensors["main_param"] = main.detach()
        state[i] = {k: make_sharded_optimizer_tensor(id_map[i], v, prefix=f"optimizer.state.{k}")
                    for k, v in tensors.items()}
    if len(steps) > 1:
        raise ValueError(f"AdamW step counters differ between parameters: {sorted(steps)}")
    return {"state": state, "step": steps.pop()}


@torch.no_grad()
def load_optimizer_state(optimizer, loaded: dict) -> None:
    """Put a loaded `optimizer_sharded_state_dict` into `optimizer` (hyperparameters stay this run's).

    Master weights: taken from the checkpoint when it has them (into the fp32 model parameters of an fp32
    run, the master copies of a bf16 run), else a bf16 run's masters are the loaded model parameters.
    """
    step = torch.tensor(float(loaded["step"]))
    i = 0  # the pairs' order of optimizer_sharded_state_dict
    for adamw, pairs in adamw_views(optimizer):
        position = {id(p): n for n, p in enumerate(p for g in adamw.param_groups for p in g["params"])}
        state = {}
        for model, main in pairs:
            saved = dict(loaded["state"][i])
            i += 1
            master = saved.pop("main_param", None)
            if master is not None:
                main.copy_(master)
            elif main is not model:
                main.copy_(model.float())
            if main is not model:
                model.copy_(main)
            state[position[id(main)]] = {"step": step.clone(), **{k: v.clone() for k, v in saved.items()}}
        current = adamw.state_dict()
        adamw.load_state_dict({"state": state, "param_groups": current["param_groups"]})


def _has_main_params(optimizer) -> bool:
    views = adamw_views(optimizer)
    return views is not None and any(main is not model for _, pairs in views for model, main in pairs)


class LayoutMismatch(ValueError):
    """The checkpoint cannot be loaded at this layout; the message says why and what would work."""


def fast_weight_replicas(chunks: list[nn.Module]) -> int:
    """How many per-replica memories each fast-weight state has: dp under persistent_local, else 1."""
    from fwpkm_megatron.memory import fast_weight_states

    sizes = {s.replica[1] for c in chunks for s in fast_weight_states(c).values() if s.replica is not None}
    return sizes.pop() if sizes else 1


def _gathered(chunks: list[nn.Module], modifier_rank):
    """ZeRO-3 partitions parameters: gather them for the duration of a save or load (else a no-op)."""
    import contextlib

    params = [p for c in chunks for p in c.parameters() if hasattr(p, "ds_id")]
    if not params:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)


def save_distributed(directory: str | Path, chunks: list[nn.Module],
                     optimizer: torch.optim.Optimizer | None) -> None:
    """Collective: write the chunks (fast weights included) and, if given, the AdamW state to `directory`.

    `directory` must exist and be empty (rank 0 creates it before a barrier).
    """
    from megatron.core import dist_checkpointing

    if adamw_views(optimizer) is None:
        optimizer = None  # megatron's DistributedOptimizer: model and fast weights only
    with _gathered(chunks, modifier_rank=None):
        model_sd = model_sharded_state_dict(chunks)
        state = {"model": model_sd}
        if optimizer is not None:
            state["optimizer"] = optimizer_sharded_state_dict(optimizer, model_sd)
        dist_checkpointing.save(state, str(directory),
                                content_metadata={"fast_weight_replicas": fast_weight_replicas(chunks),
                                                  "adamw": optimizer is not None,
                                                  "main_params": _has_main_params(optimizer)})


def load_distributed(directory: str | Path, chunks: list[nn.Module],
                     optimizer: torch.optim.Optimizer | None) -> bool:
    """Collective: load the chunks and (if given) the AdamW state from a `save_distributed` directory,
    whatever layout wrote it. Every tensor of this rank's chunks must be in the checkpoint.

    Returns:
        True when the AdamW state was loaded too (False: no optimizer given, or the checkpoint has none).
    Raises:
        LayoutMismatch: per-replica (persistent_local) memories saved at another DP size.
    """
    from megatron.core import dist_checkpointing

    content = dist_checkpointing.load_content_metadata(str(directory)) or {}
    if not content.get("adamw", False) or adamw_views(optimizer) is None:
        optimizer = None
    saved = content.get("fast_weight_replicas", 1)
    here = fast_weight_replicas(chunks)
    if saved != here:
        raise LayoutMismatch(
            f"{directory}: fast weights were saved as {saved} per-replica memories (persistent_local at DP={saved}); "
            f"this run keeps {here} (DP={here} with persistent_local, or another policy): load persistent_local "
            "memories at the DP size that wrote them")
    with _gathered(chunks, modifier_rank=0):
        model_sd = model_sharded_state_dict(chunks)
        state = {"model": model_sd}
        if optimizer is not None:
            state["optimizer"] = optimizer_sharded_state_dict(optimizer, model_sd,
                                                              main_params=content.get("main_params", False))
        loaded = dist_checkpointing.load(state, str(directory))
        for i, chunk in enumerate(chunks):
            chunk.load_state_dict(loaded["model"][f"chunk{i}"], strict=True)
    if optimizer is not None:
        load_optimizer_state(optimizer, loaded["optimizer"])
    return optimizer is not None

