"""Memory-parallel sharding (design decision 4): value tables split along d_v over the TP group.

Every TP rank sees the same tokens. Addressing (queries, sub-keys, top-k, read weights) is replicated,
so it is identical on every rank without communication; each rank holds, reads and writes only its
column slice `[:, d_v*r/tp : d_v*(r+1)/tp]` of each value table. The closed-form write is separable
by columns (method Eqs. 13-15: the row coefficients depend on the addressing only), so a rank's slice
after a write is exactly that slice of the unsharded write. What needs the other columns:

- the z-score of the value targets v (mean and std over d_v): `feature_sum` all-reduces two [b, s]
  sums per FwPKM layer;
- the RMSNorm of the mixed output (mean square over d_v): one more [b, s] all-reduce;
- the output projection, row-parallel: megatron's usual [s, b, h] all-reduce.

Gradients: replicated inputs of sharded computation (q, the gate, the input of a column-parallel
projection) go through `copy_to` (identity forward, all-reduce backward), so replicated slow weights
get the full gradient on every rank. The layer modules call these helpers with `self.tp_group`, which is
None unless `apply_memory_sharding` set it; with None every helper is the identity and the layer runs the
exact single-process math.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class _CopyTo(torch.autograd.Function):
    """Identity forward; all-reduce of the gradient backward (a replicated input of sharded work)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFrom(torch.autograd.Function):
    """All-reduce forward (partial sums of a row-parallel product); identity backward."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _SumOverShards(torch.autograd.Function):
    """All-reduce forward and backward: a statistic over all shards used only by sharded work."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def copy_to(x: torch.Tensor, group) -> torch.Tensor:
    """A replicated tensor entering column-sharded work (identity when group is None)."""
    return x if group is None else _CopyTo.apply(x, group)


def reduce_from(x: torch.Tensor, group) -> torch.Tensor:
    """Sum of the ranks' partial results (row-parallel output); identity when group is None."""
    return x if group is None else _ReduceFrom.apply(x, group)


def feature_sum(x: torch.Tensor, group) -> torch.Tensor:
    """Sum over the last dim of a column-sharded tensor, over all shards: [..., d/tp] -> [..., 1]."""
    s = x.sum(-1, keepdim=True)
    return s if group is None else _SumOverShards.apply(s, group)


def group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def row_parallel_linear(layer: nn.Linear, x: torch.Tensor, group) -> torch.Tensor:
    """`layer(x)` where layer.weight holds this rank's input columns: partial products summed, bias once."""
    if group is None:
        return layer(x)
    out = reduce_from(nn.functional.linear(x, layer.weight), group)
    return out if layer.bias is None else out + layer.bias


# ------------------------------------------------------------------------------ applying the split

def _mark(param: nn.Parameter, dim: int) -> nn.Parameter:
    """Tag a sharded parameter the way megatron does, so norms and DeepSpeed count every shard once."""
    from megatron.core.tensor_parallel import set_tensor_model_parallel_attributes

    set_tensor_model_parallel_attributes(param, True, dim, 1)
    return param


def _slice_param(param: nn.Parameter, dim: int, cols: slice) -> nn.Parameter:
    index = [slice(None)] * param.ndim
    index[dim] = cols
    return _mark(nn.Parameter(param.detach()[tuple(index)].clone(), requires_grad=param.requires_grad), dim)


def column_slice(d: int, rank: int, size: int) -> slice:
    per = d // size
    return slice(rank * per, (rank + 1) * per)


def shard_fwpkm_block(block, group, rank: int, size: int) -> None:
    """Keep this rank's d_v slice of an FwPKMBlock: v projection rows, value table and output-norm
    columns, output projection input columns. Queries, keys, gate and biases stay replicated."""
    cols = column_slice(block.cfg.d_v, rank, size)
    block.v_proj.weight = _slice_param(block.v_proj.weight, 0, cols)
    block.v_proj.bias = _slice_param(block.v_proj.bias, 0, cols)
    block.out_norm.weight = _slice_param(block.out_norm.weight, 0, cols)
    block.out_proj.weight = _slice_param(block.out_proj.weight, 1, cols)
    block.state.shard_columns(cols)
    block.state.tp_group = group
    block.tp_group = group
    block.out_norm.tp_group = group


def shard_pkm(mlp, group, rank: int, size: int) -> None:
    """Keep this rank's d_v slice of a static PKM: value table columns, swilu projection rows,
    value projection input columns. Query, its norm and the sub-keys stay replicated."""
    cols = column_slice(mlp.cfg.d_v, rank, size)
    mlp.values = _slice_param(mlp.values, 1, cols)
    mlp.swilu_proj.weight = _slice_param(mlp.swilu_proj.weight, 0, cols)
    mlp.swilu_proj.bias = _slice_param(mlp.swilu_proj.bias, 0, cols)
    mlp.value_proj.weight = _slice_param(mlp.value_proj.weight, 1, cols)
    mlp.tp_group = group


def apply_memory_sharding(model: nn.Module, tp_group, tp_rank: int, tp_size: int) -> int:
    """Column-shard every FwPKM and PKM value table of `model` over the TP group (before the optimizer
    is built). Returns the number of memory modules sharded; a no-op at tp_size 1."""
    if tp_size == 1:
        return 0
    from fwpkm_megatron.memory import FwMLPBlock, FwPKMBlock, PKMMLP

    count = 0
    for m in model.modules():
        if isinstance(m, FwMLPBlock):  # the FwMLP baseline: hidden dim split, like a megatron MLP
            m.shard(tp_group, tp_rank, tp_size)
            count += 1
        elif isinstance(m, FwPKMBlock):
            shard_fwpkm_block(m, tp_group, tp_rank, tp_size)
            count += 1
        elif isinstance(m, PKMMLP):
            shard_pkm(m, tp_group, tp_rank, tp_size)
            count += 1
    return count


def memory_bytes(model: nn.Module) -> int:
    """Bytes this rank holds in memory tables: FwPKM fast weights (keys, values) and PKM keys and values."""
    from fwpkm_megatron.memory import FastWeightState, PKMMLP

    total = 0
    for m in model.modules():
        if isinstance(m, FastWeightState):
            total += sum(b.numel() * b.element_size() for b in m.buffers(recurse=False))
        elif isinstance(m, PKMMLP):
            total += sum(p.numel() * p.element_size() for p in (m.values, m.sub_keys))
    return total
