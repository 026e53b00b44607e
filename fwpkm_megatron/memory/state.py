"""Fast-weight state of one FwPKM layer: sub-key codebooks and the value table, as fp32 buffers.

Buffers, not Parameters: the outer optimizer never sees them, `state_dict()` saves them with the model,
and ZeRO-3 cannot partition them away (a partitioned frozen Parameter silently drops in-forward writes).
fp32 storage (method 7.6): unit-step writes accumulate over many steps and would round away in bf16.

Only this rank's columns of the table exist (`shard`, fixed at construction): each column is drawn
from its own seeded stream, so the initial table is the same at every layout and no rank ever holds
the whole table (design decision 4).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .comm import TableShard, draw_columns


class FastWeightState(nn.Module):
    """keys [H, 2, R, d_k/2] and values [N, d_v / shard.count] (this rank's columns), rewritten by the layer."""

    def __init__(self, *, num_slots: int, d_k: int, d_v: int, heads: int, init_seed: int,
                 shard: TableShard | None = None):
        super().__init__()
        self.num_sub_keys = math.isqrt(num_slots)
        self.init_seed = init_seed  # reset() regenerates exactly the construction-time state
        self.shard = shard or TableShard()
        self.d_v_total = d_v
        self.columns = self.shard.columns(d_v)  # global d_v columns held here
        self.group = (0, 1)      # (index, count) of this memory group among the data-parallel ones
        self.replica: tuple[int, int] | None = None  # = group when each group keeps its own memory
        self.track_writes = False  # persistent across groups: remember the rows written since the last sync
        device = None if self.shard.materialize else "meta"
        self.register_buffer("keys", torch.empty(heads, 2, self.num_sub_keys, d_k // 2, device=device))
        self.register_buffer("values", torch.empty(num_slots, len(self.columns), device=device))
        self.reset()

    @torch.no_grad()
    def reset(self) -> None:
        """Back to the initial state: keys ~ U(+-1/sqrt(d_k)), values ~ N(0, 1/sqrt(d_v)) (method 3.8)."""
        self.clear_written()
        if not self.shard.materialize:
            return
        gen = torch.Generator(device="cpu").manual_seed(self.init_seed)
        d_k = self.keys.shape[-1] * 2
        bound = d_k ** -0.5
        keys = torch.rand(self.keys.shape, generator=gen) * 2 * bound - bound
        values = draw_columns(self.init_seed, self.values.shape[0], self.columns, self.d_v_total ** -0.5, self.shard)
        self.keys = keys.to(self.keys.device)  # rebind: the old tensor may be saved by a pending backward
        self.values.copy_(values)

    @torch.no_grad()
    def commit(self, keys: torch.Tensor, rows: torch.Tensor, row_values: torch.Tensor) -> None:
        """Store a scan's result: new keys, and new values for the written rows (detached, fp32).

        Values are updated in place (O(rows)); nothing in the autograd graph saves the table itself,
        only indices into it. Keys are rebound because the graph does save them. With `track_writes`
        the pre-write values of rows written for the first time since the last sync are kept (O(rows)).
        """
        self.keys = keys.detach().to(torch.float32).clone()
        if not rows.numel():
            return
        if self.track_writes:
            fresh = rows[~torch.isin(rows, self.written_rows)]
            merged, order = torch.sort(torch.cat([self.written_rows, fresh]))
            self.written_base = torch.cat([self.written_base, self.values[fresh]])[order]
            self.written_rows = merged
        self.values.index_copy_(0, rows, row_values.detach().to(torch.float32))

    def _apply(self, fn, *args, **kwargs):
        """Move the written-rows record with the buffers (`.to(device)`, `.cuda()`); it is not state."""
        super()._apply(fn, *args, **kwargs)
        self.clear_written()  # only ever non-empty within a step, never across a device move
        return self

    def clear_written(self) -> None:
        """Forget the rows written since the last sync (after a sync, a restore or a reset)."""
        self.written_rows = torch.empty(0, dtype=torch.long, device=self.values.device)
        self.written_base = self.values.new_empty(0, self.values.shape[1])

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None) -> dict:
        """dist_checkpointing view: values at their global column offset (TP x M shards), keys replicated;
        per-group memories (persistent_local) get a leading axis with one entry per memory group."""
        from .checkpoint import table_sharded_tensors

        return table_sharded_tensors(self.keys, self.values, prefix, sharded_offsets, shard=self.shard,
                                     group=self.group, per_group=self.replica is not None)

    def snapshot(self) -> dict[str, torch.Tensor]:
        """A copy of this rank's keys and columns (O(local slice))."""
        return {"keys": self.keys.detach().clone(), "values": self.values.detach().clone()}

    @torch.no_grad()
    def restore(self, snap: dict[str, torch.Tensor]) -> None:
        self.keys = snap["keys"].clone().to(self.keys.device)
        self.values.copy_(snap["values"])
        self.clear_written()

    def extra_repr(self) -> str:
        return (f"slots={self.values.shape[0]}, d_v={self.d_v_total} (columns {self.columns.start}:"
                f"{self.columns.stop} here), keys={tuple(self.keys.shape)}")
