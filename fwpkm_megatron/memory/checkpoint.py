"""How a memory module declares its pieces to megatron's dist_checkpointing (its `sharded_state_dict`).

Lives beside the layers, not in `parallel/`, so the layers never import the parallel layout; the
parallel layer (`parallel/dist_checkpoint.py`) saves and loads with these declarations.
"""
from __future__ import annotations

import torch
from torch import nn


def sharded_tensors(tensors: dict[str, torch.Tensor], prefix: str, sharded_offsets=(), metadata=None, *,
                    tp_axes: dict[str, int], tp_group=None, replica: tuple[int, int] | None = None) -> dict:
    """ShardedTensors for a module's tensors (its `state_dict(keep_vars=True)` entries).

    Args:
        tensors: local name -> tensor (Parameters themselves, so optimizer state can be mapped to them).
        prefix: key prefix of the module (megatron passes it).
        sharded_offsets: offsets already applied by parent modules (a layer axis), prepended.
        metadata: megatron's metadata dict (carries `dp_cp_group`).
        tp_axes: local name -> tensor dim split over the TP group; every other tensor is TP-replicated.
        tp_group: the module's TP group (None: megatron's TP group, of which it is a replica).
        replica: (dp_rank, dp) for per-replica tensors: a leading DP axis, one entry per replica.
    """
    from megatron.core import parallel_state
    from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group
    from megatron.core.utils import (get_pg_rank, make_sharded_tensor_for_checkpoint,
                                     make_tp_sharded_tensor_for_checkpoint)

    metadata = ensure_metadata_has_dp_cp_group(metadata)
    if tp_group is None and parallel_state.model_parallel_is_initialized():
        # an unsharded module still sits on a TP rank: its replicated tensors are written by TP rank 0 only
        tp_group = parallel_state.get_tensor_model_parallel_group()
    groups = dict(tp_group=tp_group, dp_cp_group=metadata["dp_cp_group"])
    offsets = tuple(sharded_offsets)
    if replica is not None:  # a leading DP axis: each replica holds its own piece
        offsets += ((len(offsets), replica[0], replica[1]),)
    out = {}
    for name, tensor in tensors.items():
        key = f"{prefix}{name}"
        if name in tp_axes:  # replica id None: megatron's (0, 0, dp_rank); per replica, the only holder
            replica_id = None if replica is None else (0, 0, 0)
            out[key] = make_tp_sharded_tensor_for_checkpoint(tensor, key, tp_axis=tp_axes[name], replica_id=replica_id,
                                                             prepend_offsets=offsets, **groups)
        else:  # TP-replicated: megatron's (0, tp_rank, dp_rank); per replica, TP rank 0 writes
            replica_id = None if replica is None else (0, get_pg_rank(tp_group), 0)
            out[key] = make_sharded_tensor_for_checkpoint(tensor, key, prepend_offsets=offsets,
                                                          replica_id=replica_id, **groups)
    return out


def child_tensors(module: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """`state_dict(keep_vars=True)` entries of the named children of `module` (absent children skipped)."""
    out = {}
    for name in names:
        child = getattr(module, name, None)
        if child is not None:
            out.update({f"{name}.{k}": v for k, v in child.state_dict(keep_vars=True).items()})
    return out


def table_sharded_tensors(keys: torch.Tensor, values: torch.Tensor, prefix: str, sharded_offsets=(), *,
                          shard, group: tuple[int, int], per_group: bool) -> dict:
    """ShardedTensors of a fast-weight state whose table is column-sharded over a memory group.

    `values` is columns `shard.index` of `shard.count` (TP x M ranks) of the global [N, d_v] table, at its
    global offset; `keys` are replicated over the group. `group` = (index, count) of this memory group
    among the data-parallel ones: under `per_group` (persistent_local) each group's memory is its own
    (a leading axis, one entry per group), otherwise the groups hold copies and group 0 writes them.
    """
    from megatron.core.dist_checkpointing import ShardedTensor

    offsets = tuple(sharded_offsets)
    copy = group[0]
    if per_group:
        offsets += ((len(offsets), group[0], group[1]),)
        copy = 0
    axis = len(offsets) + 1  # values' d_v axis after the prepended ones
    return {
        f"{prefix}keys": ShardedTensor.from_rank_offsets(f"{prefix}keys", keys, *offsets,
                                                          replica_id=(0, shard.index, copy), prepend_axis_num=axis - 1),
        f"{prefix}values": ShardedTensor.from_rank_offsets(f"{prefix}values", values, *offsets,
                                                            (axis, shard.index, shard.count), replica_id=(0, 0, copy),
                                                            prepend_axis_num=axis - 1),
    }


def column_sharded_tensor(key: str, table: torch.Tensor, sharded_offsets=(), *, shard, copy: int):
    """ShardedTensor of a [N, d] table of which this rank holds columns `shard.index` of `shard.count`
    (TP x M ranks), at its global offset. `copy` numbers the identical copies of the shard (one per memory
    group, or per DP rank at M = 1); copy 0 writes it."""
    from megatron.core.dist_checkpointing import ShardedTensor

    offsets = tuple(sharded_offsets)
    return ShardedTensor.from_rank_offsets(key, table, *offsets, (len(offsets) + 1, shard.index, shard.count),
                                           replica_id=(0, 0, copy), prepend_axis_num=len(offsets))
