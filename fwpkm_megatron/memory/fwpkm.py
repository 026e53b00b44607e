"""FwPKM block: a sparse episodic memory rewritten by chunk-level gradient descent while it reads.

Method notes section 3 (docs/method.md). The block is a residual branch placed *before* the token
mixer of its layer (3.10): h <- h + FwPKMBlock(h). Slow weights (projections, norms, gate) are trained
by the outer optimizer through the in-forward writes; the fast weights live in a `FastWeightState`.
"""
from __future__ import annotations

from collections import deque

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..config import FwPKMConfig
from .comm import LOCAL, LayerComm, TableShard
from .recompute import in_first_checkpointed_pass, in_recompute
from .state import FastWeightState

ZSCORE_EPS = 1e-6  # App. A.3: v <- (v - mean) / (std + 1e-6), torch's unbiased std


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """x in fp32, or in its own dtype when that is wider (float64 checks keep their precision)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class ZeroCenteredRMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * (1 + w), w zero-initialized (the Qwen3-Next form the method uses)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))
        self.tp_group = None  # set when the normalized dim is column-sharded over TP ranks (checkpoint view)
        self.comm: LayerComm = LOCAL  # its TP collectives (parallel/sharding.py)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """x * rsqrt(mean(x^2) + eps) in fp32 (or wider), before the (1 + w) scale."""
        x32 = at_least_fp32(x)
        if self.comm.tp_size == 1:
            mean_square = x32.square().mean(-1, keepdim=True)
        else:  # the mean square runs over every shard's columns
            mean_square = self.comm.feature_sum(x32.square()) / (x32.shape[-1] * self.comm.tp_size)
        return x32 * torch.rsqrt(mean_square + self.eps)

    def scale(self) -> torch.Tensor:
        """The (1 + w) factor, fp32 (or wider)."""
        return 1 + at_least_fp32(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.normalize(x) * self.scale()).to(x.dtype)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None) -> dict:
        """dist_checkpointing view: the weight is split over TP (axis 0) when the normalized dim is."""
        from .checkpoint import sharded_tensors

        return sharded_tensors({"weight": self.weight}, prefix, sharded_offsets, metadata,
                               tp_axes={"weight": 0} if self.tp_group is not None else {}, tp_group=self.tp_group)


def zscore(v: torch.Tensor, comm: LayerComm = LOCAL) -> torch.Tensor:
    """Standardize along the feature dim (App. A.3), used both as target and in the residual mix.

    Under TP, v holds this rank's columns and the mean and (unbiased) std run over all of them.
    The std is written out (not `Tensor.std`, several times slower on CPU, forward and backward).
    """
    d = v.shape[-1] * comm.tp_size
    centered = v - comm.feature_sum(v) / d
    return centered / ((comm.feature_sum(centered.square()) / (d - 1)).sqrt() + ZSCORE_EPS)


def _linear(d_in: int, d_out: int, std: float) -> nn.Linear:
    layer = nn.Linear(d_in, d_out)
    nn.init.normal_(layer.weight, std=std)
    nn.init.zeros_(layer.bias)
    return layer


def read_statistics(idx: torch.Tensor, num_slots: int) -> dict[str, float]:
    """Slot usage of a batch of reads (method 5.7 D.3): coverage, collision rate, KL(usage || uniform)."""
    counts = torch.bincount(idx.reshape(-1), minlength=num_slots).double()
    total = counts.sum()
    p = counts / total
    used = p > 0
    return {
        "coverage": float(used.double().mean()),
        "collision_rate": float(counts[counts > 1].sum() / total),
        "kl_uniform": float((p[used] * torch.log(p[used] * num_slots)).sum()),
    }


class FwPKMBlock(nn.Module):
    """q/v/g projections -> chunked IDW product-key read-then-write -> gated mix -> RMSNorm -> projection.

    Args:
        config: megatron TransformerConfig (hidden_size, init_method_std, layernorm_epsilon).
        cfg: FwPKMConfig (table size, top-k, chunk, ablation switches, fast-weight policy).
        layer_id: 0-indexed global layer id (for names in logs).
        shard: the d_v columns of the value table this rank holds (TP x memory-parallel; default all).
    Input and output are [s, b, h] (megatron's layout); the output is the branch, added by the caller.
    """

    def __init__(self, config, cfg: FwPKMConfig, layer_id: int, shard: TableShard | None = None):
        super().__init__()
        self.cfg = cfg
        self.layer_id = layer_id
        h, std, eps = config.hidden_size, config.init_method_std, config.layernorm_epsilon
        self.q_norm, self.q_proj = ZeroCenteredRMSNorm(h, eps), _linear(h, cfg.heads * cfg.d_k, std)
        self.v_norm, self.v_proj = ZeroCenteredRMSNorm(h, eps), _linear(h, cfg.d_v, std)
        if cfg.gate:
            self.gate_norm, self.gate_proj = ZeroCenteredRMSNorm(h, eps), _linear(h, 1, std)
        self.out_norm, self.out_proj = ZeroCenteredRMSNorm(cfg.d_v, eps), _linear(cfg.d_v, h, std)
        # drawn from the global RNG, so the initial memory follows the run's seed
        self.state = FastWeightState(num_slots=cfg.num_slots, d_k=cfg.d_k, d_v=cfg.d_v, heads=cfg.heads,
                                     init_seed=int(torch.randint(2**62, ())), shard=shard)
        self.last_reads: torch.Tensor | None = None   # [b, s, H, k] slots read by the last forward
        self.last_gate: torch.Tensor | None = None    # [b, s] gates of the last forward
        self.tp_group = None  # set by parallel.sharding: v and out_norm hold a d_v column slice over TP
        self.comm: LayerComm = LOCAL  # TP collectives and the memory-group exchange (parallel/sharding.py)
        self.diagnostics = False  # record `last_diagnostics` in the next forwards (memory.set_memory_diagnostics)
        self.last_diagnostics: dict[str, torch.Tensor] = {}  # device scalars; read (host sync) when logged
        # full recompute: (keys, rows read, their values) of each first pass, popped by its recompute
        self._recompute_stash: deque = deque()

    def project(self, x: torch.Tensor):
        """Slow-weight inputs of the memory (method 3.1) from x [s, b, h], in fp32: q [b,s,H,d_k], v [b,s,d_v],
        g [b,s] or None.

        proj(norm(x)) for each input, computed as: x's RMS normalization once (the three norms see the same
        x) and each norm's (1 + w) folded into its projection's weight columns, W diag(1 + w); q and the gate
        share one matmul. The same function and parameters as three separate norm + projection pairs, with
        one normalization and two matmuls on the [s*b, h] activations instead of three of each.
        """
        cfg, comm = self.cfg, self.comm  # q and g are replicated over TP, v is this TP rank's columns
        s, b, _ = x.shape
        x_hat = self.q_norm.normalize(x)

        def folded(norm, proj, scale_grad=lambda t: t):
            return proj.weight * scale_grad(norm.scale()).to(proj.weight.dtype), proj.bias
        # v_proj holds this rank's output rows: the (1 + w) scale's gradient is summed over TP
        (w_q, b_q), (w_v, b_v) = folded(self.q_norm, self.q_proj), folded(self.v_norm, self.v_proj, comm.copy_to)
        if cfg.gate:
            w_g, b_g = folded(self.gate_norm, self.gate_proj)
            w_q, b_q = torch.cat([w_q, w_g]), torch.cat([b_q, b_g])
        qg = comm.copy_to(at_least_fp32(F.linear(x_hat.to(x.dtype), w_q, b_q)).transpose(0, 1))  # [b, s, H*d_k (+1)]
        q = qg[..., :cfg.heads * cfg.d_k].reshape(b, s, cfg.heads, cfg.d_k)
        g = torch.sigmoid(qg[..., -1]) if cfg.gate else None
        v = at_least_fp32(F.linear(comm.copy_to(x_hat.to(x.dtype)), w_v, b_v)).transpose(0, 1).contiguous()
        if cfg.value_zscore:
            v = zscore(v, comm)
        return q, v, g

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        cfg, comm = self.cfg, self.comm
        q, v, g = self.project(hidden_states)
        loss_weight = g if (g is not None and cfg.gate_weighted_loss) else torch.ones_like(v[..., 0])
        per_sequence = cfg.policy == "per_sequence"
        scan_in = (q, v, loss_weight)
        if not self.training:  # eval: first-order writes, no graph through them
            scan_in = tuple(t.detach() for t in scan_in)
        keys, values, written, recompute = self.state.keys, self.state.values, None, False
        if self.training and in_recompute():  # read what the first pass read; write nothing (never twice)
            keys, rows, old = self._recompute_stash.popleft()
            recompute = True
            if comm.exchange is not None or ops.resolve_backend(cfg.backend, values.device) == "reference":
                written = (rows, old)  # the old rows over the table: O(rows)
            else:  # the Triton scan cannot start from written rows: one O(local slice) transient
                values = values.index_copy(0, rows, old)
        extra = {} if comm.exchange is None else {"exchange": comm.exchange}
        if written is not None:
            extra["written"] = written
        res = ops.fwpkm_scan_rows(
            *scan_in, keys, values, backend=cfg.backend, top_k=cfg.topk,
            chunk_size=cfg.chunk_size, lookahead=cfg.lookahead, eps=cfg.eps, addr_loss_weight=cfg.addr_loss_weight,
            value_lr=cfg.value_lr, key_lr=cfg.key_lr, score=cfg.score, addr_loss=cfg.addr_loss,
            per_sequence=per_sequence, detach_writes=cfg.detach_writes,
            diagnostics=self.diagnostics and not recompute, **extra)
        if self.training and in_first_checkpointed_pass():
            # every row this rank's columns served (the whole memory group's reads); written rows are among them
            rows = torch.unique(res.idx if res.group_idx is None else res.group_idx)
            self._recompute_stash.append((keys, rows, values[rows].clone()))
        if not recompute:
            self.last_diagnostics = self._diagnostics(res, values)
        if not per_sequence and not recompute:  # persistent: the state after the last chunk carries on
            self.state.commit(res.keys, res.rows, res.row_values)
        mixed = res.v_hat if g is None else torch.lerp(v, res.v_hat.to(v.dtype), g[..., None])     # Eq. 12: g v_hat + (1 - g) v
        out = comm.row_parallel_linear(self.out_proj, self.out_norm(mixed.to(hidden_states.dtype)))
        self.last_reads = res.idx.detach()
        self.last_gate = None if g is None else g.detach()
        return out.transpose(0, 1)                                           # [s, b, h]

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None) -> dict:
        """dist_checkpointing view (parallel/dist_checkpoint.py): v_proj column-parallel (axis 0),
        out_proj row-parallel (weight axis 1, bias replicated), q/gate projections replicated;
        the norms and the fast-weight state declare their own."""
        from .checkpoint import child_tensors, sharded_tensors

        out = sharded_tensors(child_tensors(self, ["q_proj", "v_proj", "gate_proj", "out_proj"]), prefix,
                              sharded_offsets, metadata, tp_group=self.tp_group,
                              tp_axes={"v_proj.weight": 0, "v_proj.bias": 0, "out_proj.weight": 1})
        for name in ("q_norm", "v_norm", "gate_norm", "out_norm", "state"):
            child = getattr(self, name, None)
            if child is not None:
                out.update(child.sharded_state_dict(f"{prefix}{name}.", sharded_offsets, metadata))
        return out

    @torch.no_grad()
    def _diagnostics(self, res, values: torch.Tensor) -> dict[str, torch.Tensor]:
        """The scan's addr_loss and fw_mse, plus read_abs_mean (mean |v_hat|) and write_abs_mean (mean |dV|
        over the rows this forward wrote; shared-state policies only), when diagnostics are on."""
        if res.diagnostics is None:
            return {}
        out = {**res.diagnostics, "read_abs_mean": res.v_hat.detach().abs().mean()}
        if res.rows.numel():
            out["write_abs_mean"] = (res.row_values.detach() - values[res.rows]).abs().mean()
        return out

    def statistics(self) -> dict[str, float]:
        """Read statistics, mean gate and (when recorded) diagnostics of the last forward (empty before the first)."""
        if self.last_reads is None:
            return {}
        stats = read_statistics(self.last_reads, self.cfg.num_slots)
        if self.last_gate is not None:
            stats["gate_mean"] = float(self.last_gate.mean())
        stats.update({key: float(value) for key, value in self.last_diagnostics.items()})  # host sync
        return stats


__all__ = ["FwPKMBlock", "ZeroCenteredRMSNorm", "read_statistics", "zscore"]
