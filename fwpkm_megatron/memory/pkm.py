"""Static product-key memory replacing the MLP of its layer (method 2.4, the FwPKM paper's PKM baseline).

Query Linear -> RMSNorm over H*d_k -> per-head dot-product product-key top-k -> softmax per head ->
sum of the H*k value rows -> Memory+ "swilu" output: value_proj(read * SiLU(swilu_proj(x))).
Keys and values are ordinary Parameters trained by the outer optimizer.

The value table is column-sharded like the FwPKM tables (design decision 4): over the TP ranks, and in a
memory group (parallel.memory_parallel = M > 1) over its TP x M ranks. There each rank reads its columns
for the whole group's tokens (addresses gathered over the group) and the reads go back to their tokens:
`_read` below, through the layer's `comm.exchange`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..config import PKMConfig
from .comm import LOCAL, LayerComm, TableShard, draw_columns

QUERY_NORM_EPS = 1e-6  # the baseline's RMSNorm on the query


class PKMMLP(nn.Module):
    """Megatron MLP contract: forward(hidden [s, b, h]) -> (output [s, b, h], bias=None)."""

    def __init__(self, config, cfg: PKMConfig, shard: TableShard | None = None, **unused):
        super().__init__()
        self.cfg = cfg
        h, std = config.hidden_size, config.init_method_std
        R = math.isqrt(cfg.num_slots)
        self.query = nn.Linear(h, cfg.heads * cfg.d_k)
        self.query_norm = nn.RMSNorm(cfg.heads * cfg.d_k, eps=QUERY_NORM_EPS)
        bound = cfg.d_k ** -0.5
        self.sub_keys = nn.Parameter(torch.empty(cfg.heads, 2, R, cfg.d_k // 2).uniform_(-bound, bound))
        # one draw from the run's stream seeds the table; each rank draws only its columns (`shard`, over TP)
        self.shard = shard or TableShard()
        self.values_seed = int(torch.randint(2**62, ()))
        self.values = nn.Parameter(draw_columns(self.values_seed, cfg.num_slots, self.shard.columns(cfg.d_v),
                                                cfg.d_v ** -0.5, self.shard))
        self.swilu_proj = nn.Linear(h, cfg.d_v)
        self.value_proj = nn.Linear(cfg.d_v, h)
        for lin in (self.query, self.swilu_proj, self.value_proj):
            nn.init.normal_(lin.weight, std=std)
            nn.init.zeros_(lin.bias)
        self.last_reads: torch.Tensor | None = None
        self.tp_group = None  # set by parallel.sharding: values, swilu_proj and value_proj hold a d_v slice
        self.comm: LayerComm = LOCAL  # its TP collectives and memory-group exchange (parallel/sharding.py)
        self.group = (0, 1)  # (index, count) of this memory group among the data-parallel ones (checkpoint copies)

    @torch.no_grad()
    def redraw_values(self, seed: int) -> None:
        """Redraw this rank's value columns from `seed` (a layout-independent build copies the seed)."""
        self.values_seed = seed
        self.values.copy_(draw_columns(seed, self.cfg.num_slots, self.shard.columns(self.cfg.d_v),
                                       self.cfg.d_v ** -0.5, self.shard))

    def forward(self, hidden_states: torch.Tensor, **unused):  # megatron passes e.g. padding_mask
        s, b, h = hidden_states.shape
        x = hidden_states.reshape(s * b, h)
        comm = self.comm  # the query is replicated over TP, d_v is this rank's slice
        q = comm.copy_to(self.query_norm(self.query(x))).view(s * b, self.cfg.heads, self.cfg.d_k)  # [M, H, d_k]
        # fp32 addressing whatever the compute dtype: top-k over near-tied scores is fragile in bf16
        addr = ops.pkm_address(q.float(), comm.copy_to(self.sub_keys).float(), topk=self.cfg.topk,
                               score=self.cfg.score, joint_softmax=False)
        read = self._read(addr.idx, addr.weight)                                  # [M, d_v], fp32 accumulation
        mixed = (read * F.silu(self.swilu_proj(comm.copy_to(x)))).to(x.dtype)
        out = comm.row_parallel_linear(self.value_proj, mixed)
        self.last_reads = addr.idx.detach()
        return out.view(s, b, h), None

    def _read(self, idx: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """This rank's value columns for its tokens: idx, weight [M, H, k] -> [M, d_v / TP].

        In a memory group the M ranks' addresses are gathered, each rank reads its d_v / (TP x M) columns
        for all of them, and every token gets its columns back from their owners (all-to-all). Backward:
        the weights' gradients are summed over the column owners (reduce-scatter), the table's gradient
        covers the whole group's tokens."""
        ex = self.comm.exchange
        if ex is None:
            return ops.pkm_read(self.values, idx, weight)
        idx_all, weight_all = ex.gather_tokens(idx, "pkm"), ex.gather_tokens(weight, "pkm")    # [M*B, H, k]
        columns = ops.pkm_read(self.values, idx_all, weight_all)                            # [M*B, d_v/(TP*M)]
        return ex.columns_to_tokens(columns.unsqueeze(1), "pkm").squeeze(1)                # [B, d_v/TP]

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None) -> dict:
        """dist_checkpointing view (parallel/dist_checkpoint.py): values at their global column offset
        (TP x M shards, one copy per memory group), swilu_proj split along d_v over TP, value_proj
        row-parallel (weight axis 1, bias replicated); query, its norm and sub-keys replicated."""
        from .checkpoint import child_tensors, column_sharded_tensor, sharded_tensors

        tensors = {"sub_keys": self.sub_keys,
                   **child_tensors(self, ["query", "query_norm", "swilu_proj", "value_proj"])}
        out = sharded_tensors(tensors, prefix, sharded_offsets, metadata, tp_group=self.tp_group,
                              tp_axes={"swilu_proj.weight": 0, "swilu_proj.bias": 0, "value_proj.weight": 1})
        out[f"{prefix}values"] = column_sharded_tensor(f"{prefix}values", self.values, sharded_offsets,
                                                       shard=self.shard, copy=self.group[0])
        return out
