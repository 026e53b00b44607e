"""What a memory layer needs from the processes it is split over, as a small interface.

The memory layers hold a `LayerComm` and call its methods; they never import the parallel layout.
`LayerComm()` itself is one process (every method is the identity, nothing is sharded), which is what
a layer has unless `parallel/sharding.py` hands it a communicating implementation. That file supplies
two:
- over the tensor-parallel group (columns of v, the output RMSNorm, the row-parallel output);
- the memory-group `exchange` (`ops.reference.TokenExchange`): the M data-parallel ranks of a memory
  group pool their tokens for every read and write of their shared, column-sharded table.

`TableShard` says which d_v columns of a table this rank holds, fixed when the layer is built, so only
the local slice is ever allocated (design decision 4).
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class TableShard:
    """Columns `[index * d/count, (index + 1) * d/count)` of a d-wide table, over `count` ranks.

    `materialize=False` builds the table on the meta device (a throw-away build that only needs shapes).
    """

    index: int = 0
    count: int = 1
    materialize: bool = True

    def columns(self, d: int) -> range:
        per = d // self.count
        return range(self.index * per, (self.index + 1) * per)


def column_seed(seed: int, column: int) -> int:
    """Seed of one table column: the initial table is the same at every layout (any TP x M split)."""
    return zlib.crc32(f"{seed}:{column}".encode()) | (seed % (1 << 31)) << 32


def draw_columns(seed: int, rows: int, columns: range, std: float, shard: TableShard) -> torch.Tensor:
    """N(0, std^2) entries of `columns` of a [rows, d] table, each column from its own seeded stream."""
    if not shard.materialize:
        return torch.empty(rows, len(columns), device="meta")
    out = torch.empty(rows, len(columns))
    gen = torch.Generator(device="cpu")
    for j, c in enumerate(columns):
        gen.manual_seed(column_seed(seed, c))
        out[:, j] = torch.randn(rows, generator=gen)
    return out.mul_(std)


class LayerComm:
    """One process: no TP group, no memory group. Subclassed by the parallel layer."""

    tp_size = 1
    exchange = None  # ops.reference.TokenExchange of the memory group, or None (M = 1)

    def copy_to(self, x: torch.Tensor) -> torch.Tensor:
        """A replicated tensor entering column-sharded work (backward: sum over the TP group)."""
        return x

    def feature_sum(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over the last dim of a column-sharded tensor, over all shards: [..., d/tp] -> [..., 1]."""
        return x.sum(-1, keepdim=True)

    def row_parallel_linear(self, layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        """`layer(x)` where layer.weight holds this rank's input columns."""
        return layer(x)


LOCAL = LayerComm()

__all__ = ["LOCAL", "LayerComm", "TableShard", "column_seed", "draw_columns"]
