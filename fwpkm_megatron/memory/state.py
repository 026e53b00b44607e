"""Fast-weight state of one FwPKM layer: sub-key codebooks and the value table, as fp32 buffers.

Buffers, not Parameters: the outer optimizer never sees them, `state_dict()` saves them with the model,
and ZeRO-3 cannot partition them away (a partitioned frozen Parameter silently drops in-forward writes).
fp32 storage (method 7.6): unit-step writes accumulate over many steps and would round away in bf16.
"""
from __future__ import annotations

import math

import torch
from torch import nn


class FastWeightState(nn.Module):
    """keys [H, 2, R, d_k/2] and values [N, d_v], N = R*R, rewritten by the layer's forward."""

    def __init__(self, *, num_slots: int, d_k: int, d_v: int, heads: int, init_seed: int):
        super().__init__()
        self.num_sub_keys = math.isqrt(num_slots)
        self.init_seed = init_seed  # reset() regenerates exactly the construction-time state
        self.columns: slice | None = None  # this TP rank's d_v slice of the table (None: the whole table)
        self.tp_group = None  # the TP group the columns are split over (set with `columns`)
        self.replica: tuple[int, int] | None = None  # (dp_rank, dp) when each DP replica keeps its own memory
        self.register_buffer("keys", torch.empty(heads, 2, self.num_sub_keys, d_k // 2, dtype=torch.float32))
        self.register_buffer("values", torch.empty(num_slots, d_v, dtype=torch.float32))
        self.reset()

    @torch.no_grad()
    def reset(self) -> None:
        """Back to the initial state: keys ~ U(+-1/sqrt(d_k)), values ~ N(0, 1/sqrt(d_v)) (method 3.8)."""
        gen = torch.Generator(device="cpu").manual_seed(self.init_seed)
        d_k = self.keys.shape[-1] * 2
        bound = d_k ** -0.5
        keys = torch.rand(self.keys.shape, generator=gen) * 2 * bound - bound
        if self.columns is None:
            values = torch.randn(self.values.shape, generator=gen) * self.values.shape[1] ** -0.5
        else:  # a TP shard: draw the whole table as at TP=1 and keep this rank's columns
            full = (self.values.shape[0], self.d_v_total)
            values = (torch.randn(full, generator=gen) * self.d_v_total ** -0.5)[:, self.columns]
        self.keys = keys.to(self.keys.device)  # rebind: the old tensor may be saved by a pending backward
        self.values.copy_(values)

    @torch.no_grad()
    def shard_columns(self, columns: slice) -> None:
        """Keep only `values[:, columns]` (memory-parallel sharding, parallel/sharding.py)."""
        self.d_v_total = self.values.shape[1]
        self.columns = columns
        self.values = self.values[:, columns].clone()

    @torch.no_grad()
    def commit(self, keys: torch.Tensor, rows: torch.Tensor, row_values: torch.Tensor) -> None:
        """Store a scan's result: new keys, and new values for the written rows (detached, fp32).

        Values are updated in place (O(rows)); nothing in the autograd graph saves the table itself,
        only indices into it. Keys are rebound because the graph does save them.
        """
        self.keys = keys.detach().to(torch.float32).clone()
        if rows.numel():
            self.values.index_copy_(0, rows, row_values.detach().to(torch.float32))

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None) -> dict:
        """dist_checkpointing view: keys TP-replicated, values column-sharded along d_v (TP axis 1);
        with `replica` set (persistent_local) a leading DP axis keeps every replica's memory."""
        from ..parallel.dist_checkpoint import sharded_tensors

        return sharded_tensors({"keys": self.keys, "values": self.values}, prefix, sharded_offsets, metadata,
                               tp_axes={"values": 1}, tp_group=self.tp_group, replica=self.replica)

    def snapshot(self) -> dict[str, torch.Tensor]:
        return {"keys": self.keys.detach().clone(), "values": self.values.detach().clone()}

    @torch.no_grad()
    def restore(self, snap: dict[str, torch.Tensor]) -> None:
        self.keys = snap["keys"].clone().to(self.keys.device)
        self.values.copy_(snap["values"])

    def extra_repr(self) -> str:
        return f"slots={self.values.shape[0]}, d_v={self.values.shape[1]}, keys={tuple(self.keys.shape)}"
