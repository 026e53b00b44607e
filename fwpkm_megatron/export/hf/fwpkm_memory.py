"""The fast-weight memory of an exported FwPKM GPT: FwPKM branches, their test-time memory, the static PKM.

Copied into every export directory by `fwpkm-export`, next to `fwpkm_reference.py` (a byte-identical copy
of the training code's `ops/reference.py`, the one definition of the memory math). Imports only torch.

Test-time memory. Every FwPKM layer reads and writes its fast weights while the model reads (method
notes 3.6 and 3.9). Tokens of the current chunk wait in a queue; a chunk is written once all its tokens
have arrived (and, with `fwpkm_carry_lookahead`, the token that is its last token's lookahead target),
so feeding a sequence token by token gives the same reads, writes and memory state as feeding it in
one call. A `flush` writes what the queue holds now, as training does with a sequence's last partial
chunk. The memory of one batch lives in an `FwPKMMemory`, returned inside the cache, so `generate`
continues the same memory. Policies are described in `configuration_fwpkm.py`.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from .configuration_fwpkm import POLICIES, FwPKMConfig
from .fwpkm_reference import RowOverlay, fwpkm_scan_rows, pkm_address, pkm_read

ZSCORE_EPS = 1e-6          # App. A.3: v <- (v - mean) / (std + 1e-6), unbiased std
PKM_QUERY_NORM_EPS = 1e-6  # the static PKM's RMSNorm on its query


class ZeroCenteredRMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * (1 + w), w zero-initialized (the FwPKM branch's norms)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + self.eps) * (1 + self.weight.float())).to(x.dtype)


def zscore(v):
    return (v - v.mean(-1, keepdim=True)) / (v.std(-1, keepdim=True) + ZSCORE_EPS)


class _Stream:
    """Fast weights and pending queue of one FwPKM layer, for the batch rows that share one state.

    kind: "buffers" (persistent: writes go into the model's buffers in place), "private" (a sequence's
    own written rows over the shared table) or "frozen" (reads only).
    """

    def __init__(self, keys, values, kind: str):
        self.keys, self.values, self.kind = keys, values, kind
        self.written = None  # private: (rows, row_values) written so far over the shared table, O(rows touched)
        self.q = self.v = self.g = None                               # queue [b, n, ...] of unwritten tokens

    @property
    def pending(self) -> int:
        return 0 if self.q is None else self.q.shape[1]

    def clone(self) -> "_Stream":
        """An independent stream (beam search): writes rebind, so sharing tensors is safe."""
        return copy.copy(self)

    def table(self) -> torch.Tensor:
        """The full value table this stream reads (materialized for a private stream: O(N), for inspection)."""
        if self.written is None:
            return self.values
        return self.values.index_copy(0, self.written[0], self.written[1].to(self.values.dtype))

    def commit(self, res) -> None:
        if self.kind == "buffers":
            self.keys.copy_(res.keys.detach())
            if res.rows.numel():
                self.values.index_copy_(0, res.rows, res.row_values.detach().to(self.values.dtype))
            return
        self.keys = res.keys.detach()
        if res.rows.numel():  # the scan continued from self.written, so its rows include the earlier ones
            self.written = (res.rows, res.row_values.detach())


class FwPKMMemory:
    """The test-time memory of every FwPKM layer for one batch of `batch_size` rows.

    Build it with `model.new_memory(batch_size, ...)`. Under `per_sequence` every row has its own
    stream (isolated from the other rows); under `persistent` all rows share the model's buffers and
    one queue; under `frozen` nothing is written.
    """

    def __init__(self, model, batch_size: int, policy: str, update_chunk: int | None,
                 carry_lookahead: bool):
        if policy not in POLICIES:
            raise ValueError(f"policy={policy!r}: must be one of {POLICIES}")
        self.batch_size, self.policy, self.carry_lookahead = batch_size, policy, bool(carry_lookahead)
        self.update_chunk = int(update_chunk) if update_chunk is not None else None
        self.streams: dict[int, list[_Stream]] = {}
        for layer_id in model.config.fwpkm.get("layers", []):
            state = model.fast_weights[f"layer_{layer_id}"]
            if policy == "per_sequence":
                self.streams[layer_id] = [_Stream(state.keys, state.values, "private") for _ in range(batch_size)]
            else:
                self.streams[layer_id] = [_Stream(state.keys, state.values,
                                                  "buffers" if policy == "persistent" else "frozen")]

    def reorder(self, index) -> "FwPKMMemory":
        """Rows of a new batch taken from `index` (beam search); per_sequence streams are copied."""
        out = copy.copy(self)
        out.batch_size = len(index)
        if self.policy == "per_sequence":
            out.streams = {lid: [s[int(i)].clone() for i in index] for lid, s in self.streams.items()}
        else:
            out.streams = {}
            for lid, (s,) in self.streams.items():
                c = copy.copy(s)
                if c.q is not None:
                    c.q, c.v, c.g = c.q[index], c.v[index], c.g[index]
                out.streams[lid] = [c]
        return out

    def frozen_view(self) -> "FwPKMMemory":
        """The same memory, read-only: reads see every write so far; nothing is queued or written.

        For decoding after a read whose write is done (NIAH): the answer tokens must not enter the queue.
        """
        out = copy.copy(self)
        out.streams = {}
        for lid, streams in self.streams.items():
            frozen = []
            for s in streams:
                c = s.clone()
                c.kind, c.q, c.v, c.g = "frozen", None, None, None
                frozen.append(c)
            out.streams[lid] = frozen
        return out

    def state(self, layer_id: int, row: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys, values) that row `row` of layer `layer_id` currently reads."""
        streams = self.streams[layer_id]
        s = streams[row] if self.policy == "per_sequence" else streams[0]
        return s.keys, s.table()

    def pending(self, layer_id: int, row: int = 0) -> int:
        streams = self.streams[layer_id]
        return (streams[row] if self.policy == "per_sequence" else streams[0]).pending

class FastWeightState(nn.Module):
    """keys [H, 2, R, d_k/2] and values [N, d_v] of one FwPKM layer (fp32 buffers, loaded from the export)."""

    def __init__(self, heads: int, num_slots: int, d_k: int, d_v: int):
        super().__init__()
        R = math.isqrt(num_slots)
        self.register_buffer("keys", torch.zeros(heads, 2, R, d_k // 2, dtype=torch.float32))
        self.register_buffer("values", torch.zeros(num_slots, d_v, dtype=torch.float32))

    def _apply(self, fn, recurse=True):
        """`.to(device)` moves the state, but a dtype cast (`.bfloat16()`, `.to(dtype)`) leaves it fp32."""
        super()._apply(fn, recurse)
        for name, buf in self._buffers.items():
            if buf is not None and buf.dtype != torch.float32:
                self._buffers[name] = buf.float()
        return self


class FwPKMBranch(nn.Module):
    """q/v/g projections -> chunked read-then-write on the layer's stream(s) -> gated mix -> projection."""

    def __init__(self, config: FwPKMConfig, layer_id: int):
        super().__init__()
        cfg, h, eps = config.fwpkm, config.hidden_size, config.rms_norm_eps
        self.cfg, self.layer_id = cfg, layer_id
        self.q_norm, self.q_proj = ZeroCenteredRMSNorm(h, eps), nn.Linear(h, cfg["heads"] * cfg["d_k"])
        self.v_norm, self.v_proj = ZeroCenteredRMSNorm(h, eps), nn.Linear(h, cfg["d_v"])
        if cfg["gate"]:
            self.gate_norm, self.gate_proj = ZeroCenteredRMSNorm(h, eps), nn.Linear(h, 1)
        self.out_norm, self.out_proj = ZeroCenteredRMSNorm(cfg["d_v"], eps), nn.Linear(cfg["d_v"], h)
        self.last_reads: list[torch.Tensor] = []   # per row: [T_real, H, k] slots read in the last call
        self.last_gate: torch.Tensor | None = None   # [B, T] gates of the last call

    def project(self, x):
        """q [B,T,H,d_k], v [B,T,d_v], g [B,T] or None, in fp32 (method 3.1)."""
        B, T, _ = x.shape
        cfg = self.cfg
        q = self.q_proj(self.q_norm(x)).float().view(B, T, cfg["heads"], cfg["d_k"])
        v = self.v_proj(self.v_norm(x)).float()
        if cfg["value_zscore"]:
            v = zscore(v)
        g = torch.sigmoid(self.gate_proj(self.gate_norm(x)).float()).squeeze(-1) if cfg["gate"] else None
        return q, v, g

    def forward(self, x, memory: FwPKMMemory, row_mask, flush: bool):
        cfg = self.cfg
        q, v, g = self.project(x)
        weight = g if (g is not None and cfg["gate_weighted_loss"]) else torch.ones_like(v[..., 0])
        streams = memory.streams[self.layer_id]
        v_hat = torch.zeros_like(v)
        self.last_reads = []
        if memory.policy == "per_sequence":
            for b, stream in enumerate(streams):
                real = slice(None) if row_mask is None else row_mask[b].bool()
                out, idx = self._advance(stream, memory, q[b:b + 1, real], v[b:b + 1, real], weight[b:b + 1, real], flush)
                v_hat[b, real] = out[0]
                self.last_reads.append(idx[0])
        else:
            if memory.policy == "persistent" and row_mask is not None and not bool(row_mask.all()):
                raise ValueError("fwpkm_policy='persistent' shares one memory across the batch and cannot skip "
                                 "padding; use per_sequence (or frozen) for padded batches")
            v_hat, idx = self._advance(streams[0], memory, q, v, weight, flush)
            self.last_reads = [idx[b] if row_mask is None else idx[b][row_mask[b].bool()] for b in range(q.shape[0])]
        self.last_gate = None if g is None else g.detach()
        mixed = v_hat if g is None else g[..., None] * v_hat + (1 - g[..., None]) * v        # Eq. 12
        return self.out_proj(self.out_norm(mixed.to(x.dtype)))

    # --- the queue (method notes 3.9) ---------------------------------------------------------

    def _scan_kwargs(self, chunk_size: int) -> dict:
        cfg = self.cfg
        return dict(top_k=cfg["topk"], chunk_size=chunk_size, eps=cfg["eps"], addr_loss_weight=cfg["addr_loss_weight"],
                    value_lr=cfg["value_lr"], key_lr=cfg["key_lr"], score=cfg["score"], addr_loss=cfg["addr_loss"])

    def _read(self, stream: _Stream, q):
        """Reads with the stream's current state: q [b, n, H, d_k] -> (v_hat [b, n, d_v], idx [b, n, H, k])."""
        b, n, H, _ = q.shape
        addr = pkm_address(q.reshape(b * n, H, -1), stream.keys, topk=self.cfg["topk"], score=self.cfg["score"],
                           eps=self.cfg["eps"])
        if stream.written is None:
            v_hat = pkm_read(stream.values, addr.idx, addr.weight)
        else:  # a private memory: the shared table overlaid with this sequence's written rows
            table = RowOverlay(stream.values)
            table.rows, table.row_values = stream.written
            v_hat = torch.einsum("mhk,mhkd->md", addr.weight, table.gather(addr.idx).to(addr.weight.dtype))
        return v_hat.view(b, n, -1), addr.idx.view(b, n, H, -1)

    def _write(self, stream: _Stream, Q, V, G, lo: int, hi: int, chunk: int, carry: bool):
        """Read-then-write the queued tokens [lo, hi) as chunks of `chunk` with the reference scan; commit.

        Aligned: targets v_{t+lookahead} inside each chunk, the chunk's last tokens get none (as in
        training). Carry: every token's target v_{t+lookahead} is passed explicitly (lookahead 0 on the
        shifted values), the last ones taken from the tokens after `hi`.
        """
        la = self.cfg["lookahead"]
        args = (Q[:, lo:hi], V[:, lo + la:hi + la], G[:, lo:hi]) if carry else (Q[:, lo:hi], V[:, lo:hi], G[:, lo:hi])
        if torch.is_inference_mode_enabled():  # the key step needs autograd, which inference tensors refuse
            with torch.inference_mode(False):
                args = tuple(t.clone() for t in args)
                res = fwpkm_scan_rows(*args, stream.keys.clone(), stream.values, lookahead=0 if carry else la,
                                      written=stream.written, **self._scan_kwargs(chunk))
                stream.commit(res)
            return res
        res = fwpkm_scan_rows(*args, stream.keys, stream.values, lookahead=0 if carry else la, written=stream.written,
                              **self._scan_kwargs(chunk))
        stream.commit(res)
        return res

    def flush(self, stream: _Stream, memory: FwPKMMemory) -> None:
        """Write the queued tokens that have a target now as one (partial) chunk; keep the rest queued.

        Training cadence: all of them (the last `lookahead` without a target, as a sequence's last
        chunk in training). Carry: all but the last `lookahead`, which wait for their target token.
        """
        n = stream.pending
        if n == 0 or stream.kind == "frozen":
            return
        la = self.cfg["lookahead"]
        carry = memory.carry_lookahead and la > 0
        end = max(n - la, 0) if carry else n
        if end == 0:
            return
        self._write(stream, stream.q, stream.v, stream.g, 0, end, end, carry)
        if end < n:
            stream.q, stream.v, stream.g = stream.q[:, end:], stream.v[:, end:], stream.g[:, end:]
        else:
            stream.q = stream.v = stream.g = None

    def _advance(self, stream: _Stream, memory: FwPKMMemory, q, v, g, flush: bool):
        """Feed new tokens q/v/g [b, T, ...] to one stream; return their reads (v_hat [b,T,d_v], idx)."""
        b, T = q.shape[:2]
        H, k = self.cfg["heads"], self.cfg["topk"]
        if stream.kind == "frozen":
            return self._read(stream, q)
        la = self.cfg["lookahead"]
        C = memory.update_chunk or self.cfg["chunk_size"]
        carry = memory.carry_lookahead and la > 0
        n_q = stream.pending
        if n_q:
            Q, V, G = torch.cat([stream.q, q], 1), torch.cat([stream.v, v], 1), torch.cat([stream.g, g], 1)
        else:
            Q, V, G = q, v, g
        n = n_q + T
        W = max(((n - la) // C) * C, 0) if carry else (n // C) * C  # tokens whose chunks can be written now
        out = v.new_zeros(b, T, v.shape[-1])
        idx = torch.zeros(b, T, H, k, dtype=torch.long, device=q.device)
        if W > 0:
            res = self._write(stream, Q, V, G, 0, W, C, carry)
            if W > n_q:
                out[:, :W - n_q], idx[:, :W - n_q] = res.v_hat[:, n_q:].to(out.dtype), res.idx[:, n_q:]
        start = max(W, n_q)                       # first new token not read yet: it reads the current state
        if start < n:
            r, i = self._read(stream, Q[:, start:])
            out[:, start - n_q:], idx[:, start - n_q:] = r.to(out.dtype), i
        stream.q, stream.v, stream.g = (Q[:, W:], V[:, W:], G[:, W:]) if W < n else (None, None, None)
        if flush:  # after the reads above, so a flush never changes what this call's tokens read
            self.flush(stream, memory)
        return out, idx


class PKMMLP(nn.Module):
    """Static product-key memory in the MLP slot: query -> RMSNorm -> per-head top-k -> swilu output."""

    def __init__(self, config: FwPKMConfig):
        super().__init__()
        cfg, h = config.pkm, config.hidden_size
        self.cfg = cfg
        R = math.isqrt(cfg["num_slots"])
        self.query = nn.Linear(h, cfg["heads"] * cfg["d_k"])
        self.query_norm = nn.RMSNorm(cfg["heads"] * cfg["d_k"], eps=PKM_QUERY_NORM_EPS)
        self.sub_keys = nn.Parameter(torch.zeros(cfg["heads"], 2, R, cfg["d_k"] // 2))
        self.values = nn.Parameter(torch.zeros(cfg["num_slots"], cfg["d_v"]))
        self.swilu_proj = nn.Linear(h, cfg["d_v"])
        self.value_proj = nn.Linear(cfg["d_v"], h)

    def forward(self, x):
        B, T, h = x.shape
        flat = x.reshape(B * T, h)
        q = self.query_norm(self.query(flat)).view(B * T, self.cfg["heads"], self.cfg["d_k"])
        addr = pkm_address(q, self.sub_keys, topk=self.cfg["topk"], score=self.cfg["score"], joint_softmax=False)
        read = pkm_read(self.values, addr.idx, addr.weight)
        return self.value_proj(read * F.silu(self.swilu_proj(flat))).view(B, T, h)
