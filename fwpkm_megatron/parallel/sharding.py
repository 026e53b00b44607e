"""Memory-parallel sharding (design decision 4): value tables split along d_v over TP x M ranks.

Every TP rank sees the same tokens. Addressing (queries, sub-keys, top-k, read weights) is replicated,
so it is identical on every rank without communication; each rank holds, reads and writes only its
column slice `[:, d_v*r/tp : d_v*(r+1)/tp]` of each value table. The closed-form write is separable
by columns (method Eqs. 13-15: the row coefficients depend on the addressing only), so a rank's slice
after a write is exactly that slice of the unsharded write. What needs the other columns:

- the z-score of the value targets v (mean and std over d_v): `feature_sum` all-reduces two [b, s]
  sums per FwPKM layer;
- the RMSNorm of the mixed output (mean square over d_v): one more [b, s] all-reduce;
- the output projection, row-parallel: megatron's usual [s, b, h] all-reduce.

Memory parallel (M > 1): the table columns of each TP rank are split again over the M data-parallel
ranks of its memory group, and the group's tokens are pooled for every chunk (`GroupExchange`: addresses
and gates all-gathered, targets and reads moved between token owners and column owners by all-to-all).
The static PKM table is split the same way and read the same way (addresses gathered, each rank reads its
columns for the group's tokens, the reads go back by all-to-all); it has no writes.

Gradients: replicated inputs of sharded computation (q, the gate, the input of a column-parallel
projection) go through `copy_to` (identity forward, all-reduce backward), so replicated slow weights
get the full gradient on every rank. The layers reach these through `ShardComm` (the
`memory.comm.LayerComm` interface), set by `apply_memory_sharding`; without it they run the exact
single-process math.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from fwpkm_megatron.memory.comm import LayerComm, TableShard
from fwpkm_megatron.ops.reference import TokenExchange


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


# ------------------------------------------------------------------- the memory group's token exchange

def _bytes(x: torch.Tensor) -> int:
    return x.numel() * x.element_size()


class GroupExchange(TokenExchange):
    """The M data-parallel ranks of one memory group (same TP rank, same stage) pooling their tokens.

    Implements `ops.reference.TokenExchange` with gloo/NCCL collectives. `sent[(what, pass)]` counts the
    bytes this rank sent ("read" / "write" / "keys", "forward" / "backward"; ring algorithms: an
    all-gather sends (M-1) pieces, an all-to-all (M-1)/M of its input, an all-reduce 2(M-1)/M of it).
    """

    def __init__(self, group, size: int, rank: int):
        self.group, self.size, self.rank = group, size, rank
        self.sent: dict[tuple[str, str], int] = {}

    def _count(self, what: str, backward: bool, n: int) -> None:
        key = (what, "backward" if backward else "forward")
        self.sent[key] = self.sent.get(key, 0) + n

    def all_gather(self, x: torch.Tensor, what: str, backward: bool = False) -> torch.Tensor:
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x, group=self.group)
        self._count(what, backward, _bytes(x) * (self.size - 1))
        return torch.cat(parts)

    def all_to_all(self, x: torch.Tensor, what: str, backward: bool) -> torch.Tensor:
        """x [M, ...]: block j goes to rank j; returns [M, ...] with block r from rank r."""
        x = x.contiguous()
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x, group=self.group)
        self._count(what, backward, _bytes(x) * (self.size - 1) // self.size)
        return out

    def reduce_scatter(self, x: torch.Tensor, what: str) -> torch.Tensor:
        """[M*B, ...] partial sums on every rank -> this rank's [B, ...] block, summed over the group."""
        blocks = self.all_to_all(x.reshape(self.size, -1, *x.shape[1:]), what, True)
        return blocks.sum(0)

    def to_columns(self, x: torch.Tensor, what: str, backward: bool) -> torch.Tensor:
        B, C, d = x.shape
        blocks = x.reshape(B, C, self.size, d // self.size).permute(2, 0, 1, 3)     # [M, B, C, d/M]
        return self.all_to_all(blocks, what, backward).view(self.size * B, C, d // self.size)

    def to_tokens(self, x: torch.Tensor, what: str, backward: bool) -> torch.Tensor:
        MB, C, dm = x.shape
        blocks = self.all_to_all(x.reshape(self.size, MB // self.size, C, dm), what, backward)  # [M(cols), B, C, d/M]
        return blocks.permute(1, 2, 0, 3).reshape(MB // self.size, C, self.size * dm)

    def gather_tokens(self, x, what=""):
        if not x.is_floating_point():
            return self.all_gather(x, what)
        return _GatherTokens.apply(x, self, what)

    def tokens_to_columns(self, x, what=""):
        return _ToColumns.apply(x, self, what)

    def columns_to_tokens(self, x, what=""):
        return _ToTokens.apply(x, self, what)

    def sum(self, x, what=""):
        n = _bytes(x) * 2 * (self.size - 1) // self.size
        self._count(what, False, n)
        return _GroupSum.apply(x, self, what, n)


class _GatherTokens(torch.autograd.Function):
    """All-gather forward; reduce-scatter backward (every rank used the gathered tensor)."""

    @staticmethod
    def forward(ctx, x, ex, what):
        ctx.ex, ctx.what = ex, what
        return ex.all_gather(x, what)

    @staticmethod
    def backward(ctx, grad):
        return ctx.ex.reduce_scatter(grad, ctx.what), None, None


class _ToColumns(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, ex, what):
        ctx.ex, ctx.what = ex, what
        return ex.to_columns(x, what, False)

    @staticmethod
    def backward(ctx, grad):
        return ctx.ex.to_tokens(grad, ctx.what, True), None, None


class _ToTokens(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, ex, what):
        ctx.ex, ctx.what = ex, what
        return ex.to_tokens(x, what, False)

    @staticmethod
    def backward(ctx, grad):
        return ctx.ex.to_columns(grad, ctx.what, True), None, None


class _GroupSum(torch.autograd.Function):
    """All-reduce forward and backward: a group-wide sum feeding every rank's work."""

    @staticmethod
    def forward(ctx, x, ex, what, n):
        ctx.ex, ctx.what, ctx.n = ex, what, n
        x = x.contiguous().clone()
        dist.all_reduce(x, group=ex.group)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.ex.group)
        ctx.ex._count(ctx.what, True, ctx.n)
        return grad, None, None, None


class ShardComm(LayerComm):
    """The collectives of a memory layer: its TP group and (M > 1) its memory group's exchange."""

    def __init__(self, tp_group, tp_size: int, exchange: GroupExchange | None = None):
        self.tp_group, self.tp_size, self.exchange = tp_group, tp_size, exchange

    def copy_to(self, x):
        return copy_to(x, self.tp_group)

    def feature_sum(self, x):
        return feature_sum(x, self.tp_group)

    def row_parallel_linear(self, layer, x):
        return row_parallel_linear(layer, x, self.tp_group)


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


def table_shards(groups) -> tuple[TableShard, TableShard]:
    """(FwPKM, static PKM) value-table shards of this rank: both over TP x M (TP rank major)."""
    shard = TableShard(groups.tp_rank * groups.mp + groups.mp_rank, groups.tp * groups.mp)
    return shard, shard


def _check_table(name: str, table: torch.Tensor, shard: TableShard, d: int) -> None:
    if table.shape[1] != d // shard.count:
        raise ValueError(f"{name}: holds {table.shape[1]} of d_v={d} columns, expected {d // shard.count} "
                         f"(build the model with the layout's table shards, parallel/sharding.py::table_shards)")


def shard_fwpkm_block(block, comm: ShardComm, rank: int, size: int) -> None:
    """Keep this TP rank's d_v slice of an FwPKMBlock's slow weights: v projection rows, output-norm
    columns, output projection input columns (the table was built as its TP x M slice). Queries, keys,
    gate and biases stay replicated."""
    if size > 1:
        cols = column_slice(block.cfg.d_v, rank, size)
        block.v_proj.weight = _slice_param(block.v_proj.weight, 0, cols)
        block.v_proj.bias = _slice_param(block.v_proj.bias, 0, cols)
        block.out_norm.weight = _slice_param(block.out_norm.weight, 0, cols)
        block.out_proj.weight = _slice_param(block.out_proj.weight, 1, cols)
        block.tp_group = block.out_norm.tp_group = comm.tp_group
    block.comm = block.out_norm.comm = comm


def shard_pkm(mlp, comm: ShardComm, rank: int, size: int) -> None:
    """Keep this TP rank's d_v slice of a static PKM's slow weights: swilu projection rows, value projection
    input columns (the value table was built as its TP x M slice). Query, its norm and the sub-keys stay
    replicated. In a memory group (M > 1) the table's gradient is reduced only over the ranks holding the
    same columns: it is marked `allreduce=False`, megatron's flag for expert-parallel parameters, which
    megatron DDP reduces over its expert-data-parallel group (the memory sync group, training/megatron_dp.py)."""
    if size > 1:
        cols = column_slice(mlp.cfg.d_v, rank, size)
        mlp.swilu_proj.weight = _slice_param(mlp.swilu_proj.weight, 0, cols)
        mlp.swilu_proj.bias = _slice_param(mlp.swilu_proj.bias, 0, cols)
        mlp.value_proj.weight = _slice_param(mlp.value_proj.weight, 1, cols)
        mlp.tp_group = comm.tp_group
    _mark(mlp.values, 1)
    if comm.exchange is not None:
        mlp.values.allreduce = False
    mlp.comm = comm


def apply_memory_sharding(model: nn.Module, groups, exchange: GroupExchange | None = None) -> int:
    """Give every FwPKM and PKM layer of `model` its collectives and this TP rank's slow-weight slices
    (before the optimizer is built). Returns the number of memory modules changed; a no-op at TP = M = 1."""
    if groups.tp == 1 and exchange is None:
        return 0
    from fwpkm_megatron.memory import FwMLPBlock, FwPKMBlock, PKMMLP

    fw_shard, pkm_shard = table_shards(groups)
    comm = ShardComm(groups.tp_group, groups.tp, exchange)
    count = 0
    for name, m in model.named_modules():
        if isinstance(m, FwMLPBlock):  # the FwMLP baseline: hidden dim split over TP, like a megatron MLP
            m.shard(groups.tp_group, groups.tp_rank, groups.tp)
            count += 1
        elif isinstance(m, FwPKMBlock):
            _check_table(f"{name}.state.values", m.state.values, fw_shard, m.cfg.d_v)
            shard_fwpkm_block(m, comm, groups.tp_rank, groups.tp)
            count += 1
        elif isinstance(m, PKMMLP):
            _check_table(f"{name}.values", m.values, pkm_shard, m.cfg.d_v)
            shard_pkm(m, comm, groups.tp_rank, groups.tp)
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
