"""FwMLP block: the paper's dense fast-weight baseline, a SwiGLU MLP rewritten per chunk while it reads.

The block mirrors `FwPKMBlock` (memory/fwpkm.py) with the sparse table replaced by a fast SwiGLU MLP
(ops/fast_mlp.py): q/v/g projections from the hidden state, the chunked read-then-write scan with
z-scored lookahead targets, the gated mix of Eq. 12, RMSNorm and an output projection. It is a residual
branch before the token mixer: h <- h + FwMLPBlock(h). Under TP the fast MLP is split along its hidden
dim like a megatron MLP (`FwMLPBlock.shard`); the slow projections are replicated.
"""
from __future__ import annotations

from collections import deque

import torch
from torch import nn

from .. import ops
from ..config import FwMLPConfig
from ..ops import FastMLP
from .recompute import in_first_checkpointed_pass, in_recompute
from .fwpkm import ZeroCenteredRMSNorm, _linear, zscore


class FwMLPState(nn.Module):
    """The fast MLP's weights as fp32 buffers (saved with the model, never seen by the optimizer).

    Buffers for the reasons of memory/state.py. Every change *rebinds* the tensors (never in place), so a
    first checkpointed pass can keep the state it read by reference for its recompute.
    """

    def __init__(self, *, d_in: int, d_hidden: int, d_v: int, init_seed: int):
        super().__init__()
        self.init_seed = init_seed
        self.replica: tuple[int, int] | None = None  # (dp_rank, dp) under persistent_local with DP > 1
        self.rows: slice | None = None  # this TP rank's slice of the hidden dim (None: all of it)
        self.tp_group = None
        self.d_hidden = d_hidden
        shapes = dict(w1=(d_hidden, d_in), b1=(d_hidden,), w3=(d_hidden, d_in), b3=(d_hidden,), w2=(d_v, d_hidden),
                      b2=(d_v,))
        for name, shape in shapes.items():
            self.register_buffer(name, torch.empty(shape, dtype=torch.float32))
        self.reset()

    @torch.no_grad()
    def reset(self) -> None:
        """Back to the initial state: matrices ~ N(0, 1/fan_in), biases 0 (the sources give no FwMLP init).

        A TP shard draws the whole MLP as at TP=1 and keeps its rows, so every layout starts equal."""
        gen = torch.Generator(device="cpu").manual_seed(self.init_seed)
        for name in FastMLP._fields:
            old, axis = getattr(self, name), self._hidden_axis(name)
            shape = list(old.shape)
            if axis is not None:
                shape[axis] = self.d_hidden
            new = torch.randn(shape, generator=gen) * shape[1] ** -0.5 if old.dim() == 2 else torch.zeros(shape)
            setattr(self, name, self._local(name, new).to(old.device))

    @staticmethod
    def _hidden_axis(name: str) -> int | None:
        """The axis of a fast tensor that runs along the hidden dim (None for b2)."""
        return {"w1": 0, "b1": 0, "w3": 0, "b3": 0, "w2": 1}.get(name)

    def _local(self, name: str, full: torch.Tensor) -> torch.Tensor:
        axis = self._hidden_axis(name)
        if self.rows is None or axis is None:
            return full
        return full.narrow(axis, self.rows.start, self.rows.stop - self.rows.start).clone()

    @torch.no_grad()
    def shard_hidden(self, rows: slice, group) -> None:
        """Keep this TP rank's rows of the hidden dim (w1, b1, w3, b3 rows; w2 columns)."""
        self.rows, self.tp_group = rows, group
        for name in FastMLP._fields:
            setattr(self, name, self._local(name, getattr(self, name)))

    def fast(self) -> FastMLP:
        return FastMLP(*(getattr(self, n) for n in FastMLP._fields))

    @torch.no_grad()
    def commit(self, fast: FastMLP) -> None:
        """Store a scan's final state (detached, fp32)."""
        for name, t in zip(FastMLP._fields, fast):
            setattr(self, name, t.detach().to(torch.float32).clone())

    def snapshot(self) -> dict[str, torch.Tensor]:
        return {n: getattr(self, n).detach().clone() for n in FastMLP._fields}

    @torch.no_grad()
    def restore(self, snap: dict[str, torch.Tensor]) -> None:
        for n in FastMLP._fields:
            setattr(self, n, snap[n].clone().to(getattr(self, n).device))

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None) -> dict:
        """dist_checkpointing view: split along the hidden dim over TP; a leading DP axis under persistent_local."""
        from .checkpoint import sharded_tensors

        axes = {} if self.tp_group is None else {
            n: a for n in FastMLP._fields if (a := self._hidden_axis(n)) is not None}
        return sharded_tensors({n: getattr(self, n) for n in FastMLP._fields}, prefix, sharded_offsets, metadata,
                               tp_axes=axes, tp_group=self.tp_group, replica=self.replica)

    def extra_repr(self) -> str:
        return f"d_in={self.w1.shape[1]}, d_hidden={self.w1.shape[0]}, d_v={self.w2.shape[0]}"


class FwMLPBlock(nn.Module):
    """q/v/g projections -> chunked fast-SwiGLU read-then-write -> gated mix -> RMSNorm -> projection.

    Args:
        config: megatron TransformerConfig (hidden_size, init_method_std, layernorm_epsilon).
        cfg: FwMLPConfig; layer_id: 0-indexed global layer id.
    Input and output are [s, b, h]; the output is the branch, added by the caller.
    """

    def __init__(self, config, cfg: FwMLPConfig, layer_id: int):
        super().__init__()
        self.cfg = cfg
        self.layer_id = layer_id
        h, std, eps = config.hidden_size, config.init_method_std, config.layernorm_epsilon
        self.q_norm, self.q_proj = ZeroCenteredRMSNorm(h, eps), _linear(h, cfg.d_in, std)
        self.v_norm, self.v_proj = ZeroCenteredRMSNorm(h, eps), _linear(h, cfg.d_v, std)
        if cfg.gate:
            self.gate_norm, self.gate_proj = ZeroCenteredRMSNorm(h, eps), _linear(h, 1, std)
        self.out_norm, self.out_proj = ZeroCenteredRMSNorm(cfg.d_v, eps), _linear(cfg.d_v, h, std)
        self.state = FwMLPState(d_in=cfg.d_in, d_hidden=cfg.d_hidden, d_v=cfg.d_v,
                                init_seed=int(torch.randint(2**62, ())))
        self.last_gate: torch.Tensor | None = None
        self.tp_group = None  # set by `shard`: the fast MLP's hidden dim is split over it
        self._recompute_stash: deque = deque()  # full recompute: the state each first pass read

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        x = hidden_states.transpose(0, 1)                                    # [b, s, h]
        q = self.q_proj(self.q_norm(x)).float()
        v = self.v_proj(self.v_norm(x)).float()
        if cfg.value_zscore:
            v = zscore(v)
        g = torch.sigmoid(self.gate_proj(self.gate_norm(x)).float()).squeeze(-1) if cfg.gate else None
        lw = g if (g is not None and cfg.gate_weighted_loss) else torch.ones_like(v[..., 0])
        scan_in = (q, v, lw)
        if not self.training:  # eval: first-order writes, no graph through them
            scan_in = tuple(t.detach() for t in scan_in)
        fast, recompute = self.state.fast(), False
        if self.training and in_recompute():  # read what the first pass read; write nothing (never twice)
            fast, recompute = self._recompute_stash.popleft(), True
        elif self.training and in_first_checkpointed_pass():
            self._recompute_stash.append(fast)  # by reference: the state is only ever rebound
        per_sequence = cfg.policy == "per_sequence"
        y, new = ops.fwmlp_scan(*scan_in, fast, chunk_size=cfg.chunk_size, lookahead=cfg.lookahead, lr=cfg.lr,
                                per_sequence=per_sequence, detach_writes=cfg.detach_writes, group=self.tp_group)
        if not per_sequence and not recompute:  # persistent: the state after the last chunk carries on
            self.state.commit(new)
        mixed = y if g is None else g[..., None] * y + (1 - g[..., None]) * v               # Eq. 12
        out = self.out_proj(self.out_norm(mixed.to(hidden_states.dtype)))
        self.last_gate = None if g is None else g.detach()
        return out.transpose(0, 1)                                           # [s, b, h]

    def shard(self, group, rank: int, size: int) -> None:
        """Split the fast MLP's hidden dim over the TP group (parallel/sharding.py); slow weights stay replicated."""
        per = self.cfg.d_hidden // size
        self.state.shard_hidden(slice(rank * per, (rank + 1) * per), group)
        self.tp_group = group

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None) -> dict:
        """dist_checkpointing view: every slow tensor TP-replicated; the norms and the state declare theirs."""
        from .checkpoint import child_tensors, sharded_tensors

        out = sharded_tensors(child_tensors(self, ["q_proj", "v_proj", "gate_proj", "out_proj"]), prefix,
                              sharded_offsets, metadata, tp_axes={})
        for name in ("q_norm", "v_norm", "gate_norm", "out_norm", "state"):
            child = getattr(self, name, None)
            if child is not None:
                out.update(child.sharded_state_dict(f"{prefix}{name}.", sharded_offsets, metadata))
        return out

    def statistics(self) -> dict[str, float]:
        """Mean gate of the last forward (empty before the first, or without a gate)."""
        return {} if self.last_gate is None else {"gate_mean": float(self.last_gate.mean())}


__all__ = ["FwMLPBlock", "FwMLPState"]
