"""Static product-key memory replacing the MLP of its layer (method 2.4, the FwPKM paper's PKM baseline).

Query Linear -> RMSNorm over H*d_k -> per-head dot-product product-key top-k -> softmax per head ->
sum of the H*k value rows -> Memory+ "swilu" output: value_proj(read * SiLU(swilu_proj(x))).
Keys and values are ordinary Parameters trained by the outer optimizer.
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
        self.comm: LayerComm = LOCAL  # its TP collectives (parallel/sharding.py)

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
        read = ops.pkm_read(self.values, addr.idx, addr.weight)                  # [M, d_v], fp32 accumulation
        mixed = (read * F.silu(self.swilu_proj(comm.copy_to(x)))).to(x.dtype)
        out = comm.row_parallel_linear(self.value_proj, mixed)
        self.last_reads = addr.idx.detach()
        return out.view(s, b, h), None

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None) -> dict:
        """dist_checkpointing view (parallel/dist_checkpoint.py): values and swilu_proj split along d_v,
        value_proj row-parallel (weight axis 1, bias replicated); query, its norm and sub-keys replicated."""
        from .checkpoint import child_tensors, sharded_tensors

        tensors = {"sub_keys": self.sub_keys, "values": self.values,
                   **child_tensors(self, ["query", "query_norm", "swilu_proj", "value_proj"])}
        return sharded_tensors(tensors, prefix, sharded_offsets, metadata, tp_group=self.tp_group,
                               tp_axes={"values": 1, "swilu_proj.weight": 0, "swilu_proj.bias": 0,
                                        "value_proj.weight": 1})
