"""A GPT with Fast-weight Product Key Memory, self-contained for Hugging Face `transformers` (remote code).

Copied verbatim into every export directory by `fwpkm-export`, next to `configuration_fwpkm.py`,
`fwpkm_integrity.py` and `fwpkm_reference.py` (a byte-identical copy of the training code's
`fwpkm_megatron/ops/reference.py`, the one definition of the memory math). Imports only torch and
transformers: no megatron-core and no fwpkm_megatron are needed to run it.

The backbone mirrors the training model (megatron-core GPT): pre-norm RMSNorm decoder, RoPE, SwiGLU MLP,
no biases, optional sliding-window attention, tied or untied output layer. Per layer:
    h = h + FwPKM(h)                      (layers in config.fwpkm["layers"]; method notes 3.10)
    h = h + Attention(RMSNorm(h))
    h = h + (static PKM or SwiGLU)(RMSNorm(h))

Test-time memory. Every FwPKM layer reads and writes its fast weights while the model reads (method
notes 3.6 and 3.9). Tokens of the current chunk wait in a queue; a chunk is written once all its tokens
have arrived (and, with `fwpkm_carry_lookahead`, the token that is its last token's lookahead target),
so feeding a sequence token by token gives the same reads, writes and memory state as feeding it in
one call. A `flush` writes what the queue holds now, as training does with a sequence's last partial
chunk. The memory of one batch lives in an `FwPKMMemory`, returned inside the cache, so `generate`
continues the same memory; pass `memory=` to carry it across calls that do not share a KV cache (the
n-iter NIAH protocol). Policies are described in `configuration_fwpkm.py`.

Names in model.safetensors: `model.*` are slow weights; `fast_weights.layer_{i}.keys|values` are the
FwPKM fast-weight state of layer i (fp32 always).

transformers notes (4.57 and 5.x, `configuration_fwpkm.TRANSFORMERS_RANGE`): the KV cache is our own
object, returned as `cache` (5.x) or `past_key_values` (4.x) and fed back by generate;
`prepare_inputs_for_generation` slices the unprocessed tokens itself, so generation is exact.
Long inputs: `prefill_block` feeds them through the cache in blocks (equal to one pass); attention runs
through SDPA with masks of bounded size, and a sliding-window layer keeps only its last W-1 keys/values.
"""
from __future__ import annotations

import copy
import math
import os

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_fwpkm import POLICIES, FwPKMConfig, check_transformers_version
from .fwpkm_integrity import verify_index
from .fwpkm_reference import RowOverlay, fwpkm_scan_rows, pkm_address, pkm_read

check_transformers_version()
# transformers 5 renamed the cache field/argument `past_key_values` to `cache`; forward accepts both
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
ZSCORE_EPS = 1e-6          # App. A.3: v <- (v - mean) / (std + 1e-6), unbiased std
PKM_QUERY_NORM_EPS = 1e-6  # the static PKM's RMSNorm on its query


# ----------------------------------------------------------------------------------------- helpers

def _output(loss, logits, cache) -> CausalLMOutputWithPast:
    return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: cache})


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


def rope_inv_freq(dim: int, base: float, scaling: dict | None = None, device=None):
    """RoPE inverse frequencies [dim/2] and the attention factor that scales cos/sin.

    scaling (`fwpkm_rope_scaling`, full-attention layers only): None; {"type": "linear", "factor": s}
    (positions / s); {"type": "yarn", "factor": s, "original_max_position_embeddings": L, "beta_fast": 32,
    "beta_slow": 1} (YaRN, arXiv 2309.00071: dimensions that rotate more than beta_fast times in L tokens
    keep their frequency, those under beta_slow are interpolated by s, a linear ramp between; cos/sin
    scaled by 0.1 ln s + 1).
    """
    exponent = torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim
    inv_freq = 1.0 / (base ** exponent)
    if not scaling:
        return inv_freq, 1.0
    kind, factor = scaling.get("type"), float(scaling.get("factor", 1.0))
    if factor < 1.0:
        raise ValueError(f"fwpkm_rope_scaling factor={factor}: must be >= 1")
    if kind == "linear":
        return inv_freq / factor, 1.0
    if kind != "yarn":
        raise ValueError(f"fwpkm_rope_scaling type={kind!r}: must be 'linear' or 'yarn'")
    original = float(scaling["original_max_position_embeddings"])  # the training length
    beta_fast, beta_slow = float(scaling.get("beta_fast", 32.0)), float(scaling.get("beta_slow", 1.0))

    def correction_dim(rotations: float) -> float:  # the dim index that rotates `rotations` times in `original`
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device=device) - low) / max(high - low, 1e-3)).clamp(0, 1)
    keep = 1.0 - ramp                                  # 1: extrapolate (high frequency), 0: interpolate
    return inv_freq / factor * (1 - keep) + inv_freq * keep, 0.1 * math.log(factor) + 1.0


def rope_cos_sin(positions, head_dim: int, base: float, scaling: dict | None = None):
    """cos, sin [B, T, head_dim] for integer positions [B, T] (megatron's non-interleaved RoPE)."""
    inv_freq, attention_factor = rope_inv_freq(head_dim, base, scaling, positions.device)
    freqs = positions.float()[..., None] * inv_freq                   # [B, T, hd/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * attention_factor, emb.sin() * attention_factor


def rotary_dim(config) -> int:
    """Channels per head that RoPE rotates (megatron: int(head_dim * rotary_percent)); the rest pass through."""
    return int(config.hidden_size // config.num_attention_heads * getattr(config, "rotary_percent", 1.0))


def apply_rope(x, cos, sin):
    """x [B, heads, T, hd]; rotate-half form on the first cos.shape[-1] channels (partial RoPE)."""
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
    rot, rest = x[..., :cos.shape[-1]], x[..., cos.shape[-1]:]
    x1, x2 = rot.chunk(2, dim=-1)
    return torch.cat((rot * cos + torch.cat((-x2, x1), dim=-1) * sin, rest), dim=-1)


def attention_extras(config: FwPKMConfig, heads: int, head_dim: int):
    """(q_norm, k_norm, gate_proj) of the paper's optional attention details (method notes 4.1), as megatron has them.

    q_norm / k_norm: RMSNorm over each head's channels, before RoPE (megatron's qk_layernorm), else Identity.
    gate_proj: the output gate's projection [h -> heads * hd] (megatron's attention_output_gate), else None;
    see `gate_output`.
    """
    norm = getattr(config, "qk_norm", False)
    q_norm = nn.RMSNorm(head_dim, eps=config.rms_norm_eps) if norm else nn.Identity()
    k_norm = nn.RMSNorm(head_dim, eps=config.rms_norm_eps) if norm else nn.Identity()
    gate = getattr(config, "attention_output_gate", False)
    return q_norm, k_norm, nn.Linear(config.hidden_size, heads * head_dim, bias=False) if gate else None


def gate_output(out, gate_proj, x):
    """Attention output out [B, T, heads * hd] times sigmoid(gate_proj(x)) in fp32, per head channel (or out)."""
    if gate_proj is None:
        return out
    return (out * torch.sigmoid(gate_proj(x).float())).to(out.dtype)


# ------------------------------------------------------------------------------ test-time memory

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

    def __init__(self, model: "FwPKMForCausalLM", batch_size: int, policy: str, update_chunk: int | None,
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


class FwPKMCache:
    """KV cache of every attention layer plus the batch's FwPKMMemory; `seen` = tokens processed."""

    def __init__(self, num_layers: int, memory: FwPKMMemory):
        self.kv: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * num_layers
        self.memory = memory
        self.seen = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    def reorder(self, index) -> "FwPKMCache":
        out = FwPKMCache(len(self.kv), self.memory.reorder(index))
        out.kv = [None if kv is None else (kv[0][index], kv[1][index]) for kv in self.kv]
        out.seen = self.seen
        return out


# ---------------------------------------------------------------------------------------- layers

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


class SwiGLU(nn.Module):
    def __init__(self, config: FwPKMConfig):
        super().__init__()
        h, f = config.hidden_size, config.intermediate_size
        self.gate_proj, self.up_proj = nn.Linear(h, f, bias=False), nn.Linear(h, f, bias=False)
        self.down_proj = nn.Linear(f, h, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


MASK_ELEMENTS = 1 << 24   # query rows x keys per attention call: bounds the additive mask (64 MiB in fp32)


def causal_attention(q, k, v, *, q0: int, k0: int, window: int | None, key_valid):
    """softmax(q k^T / sqrt(hd)) v over the visible keys, through SDPA, in query blocks of bounded mask size.

    q [B, nh, T, hd] are the tokens at absolute indices q0.., k/v [B, nkv, S, hd] the keys at k0..
    (query head i uses key group i // (nh / nkv), megatron's layout). Query i sees key j when
    j <= i, j > i - window (if windowed) and key_valid[:, j - k0] (padding; None = all valid). A query
    always sees itself, so a padding row is finite (its output is unused) instead of NaN.
    Memory: one additive mask of at most MASK_ELEMENTS x B entries; no [T, S] score matrix is kept.
    """
    B, nh, T, hd = q.shape
    S = k.shape[2]
    gqa = nh != k.shape[1]
    out = torch.empty_like(q)
    rows = max(1, min(T, MASK_ELEMENTS // max(S, 1)))
    if window is not None:
        rows = max(1, min(T, MASK_ELEMENTS // max(window + 1, 1)))
    for a in range(0, T, rows):
        b = min(a + rows, T)
        qa, qb = q0 + a, q0 + b                                 # absolute query indices [qa, qb)
        lo = k0 if window is None else max(k0, qa - window + 1)  # first key any of these queries sees
        i = torch.arange(qa, qb, device=q.device)[:, None]
        j = torch.arange(lo, qb, device=q.device)[None, :]
        visible = j <= i
        if window is not None:
            visible = visible & (j > i - window)
        visible = visible[None, None]                           # [1, 1, rows, keys]
        if key_valid is not None:
            visible = (visible & key_valid[:, None, None, lo - k0:qb - k0]) | (j == i)[None, None]
        mask = torch.zeros(visible.shape, dtype=q.dtype, device=q.device).masked_fill_(~visible, float("-inf"))
        out[:, :, a:b] = F.scaled_dot_product_attention(q[:, :, a:b], k[:, :, lo - k0:qb - k0],
                                                        v[:, :, lo - k0:qb - k0], attn_mask=mask, enable_gqa=gqa)
    return out


class Attention(nn.Module):
    """Causal (optionally sliding-window) multi-head / grouped-query attention with RoPE, through SDPA.

    Steps, in order: project q/k/v; per-head q/k RMSNorm (`qk_norm`, else identity); RoPE on the first
    `rotary_dim(config)` channels of every head; attention; the per-head output times the sigmoid output
    gate (`attention_output_gate`, else unchanged); o_proj.
    """

    def __init__(self, config: FwPKMConfig):
        super().__init__()
        h = config.hidden_size
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = h // self.heads
        self.window = config.attention_window
        self.q_proj = nn.Linear(h, self.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(h, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(h, self.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.heads * self.head_dim, h, bias=False)
        self.q_norm, self.k_norm, self.gate_proj = attention_extras(config, self.heads, self.head_dim)

    def forward(self, x, cos, sin, past, q0: int, key_valid):
        """x [B, T, h] at absolute indices q0..; past (k, v) kept from earlier calls (or None).

        Returns the output and the (k, v) to keep: all of them, or the last window - 1 when windowed
        (the most any later query can see), so a windowed layer's cache is O(window).
        """
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, T, self.heads, self.head_dim)).transpose(1, 2)     # [B, nh, T, hd]
        k = self.k_norm(self.k_proj(x).view(B, T, self.kv_heads, self.head_dim)).transpose(1, 2)  # [B, nkv, T, hd]
        v = self.v_proj(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # cos/sin cover the first rotary_dim channels
        kept = 0 if past is None else past[0].shape[2]
        if past is not None:
            k, v = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)
        out = causal_attention(q, k, v, q0=q0, k0=q0 - kept, window=self.window, key_valid=key_valid)
        out = out.transpose(1, 2).reshape(B, T, -1)                                    # per-head outputs
        if self.window is not None:
            drop = max(k.shape[2] - (self.window - 1), 0)
            k, v = k[:, :, drop:], v[:, :, drop:]
        return self.o_proj(gate_output(out, self.gate_proj, x)), (k, v)


class DecoderLayer(nn.Module):
    def __init__(self, config: FwPKMConfig, layer_id: int):
        super().__init__()
        self.fwpkm = FwPKMBranch(config, layer_id) if layer_id in config.fwpkm.get("layers", []) else None
        self.input_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = PKMMLP(config) if layer_id in config.pkm.get("layers", []) else SwiGLU(config)

    def forward(self, h, cos, sin, past, q0, key_valid, memory, row_mask, flush):
        if self.fwpkm is not None:
            h = h + self.fwpkm(h, memory, row_mask, flush)
        attn, kv = self.self_attn(self.input_layernorm(h), cos, sin, past, q0, key_valid)
        h = h + attn
        return h + self.mlp(self.post_attention_layernorm(h)), kv


# ----------------------------------------------------------------------------------------- models

class FwPKMPreTrainedModel(PreTrainedModel):
    config_class = FwPKMConfig
    base_model_prefix = "model"
    _no_split_modules = ["DecoderLayer"]

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, ZeroCenteredRMSNorm):
            nn.init.zeros_(module.weight)
        elif isinstance(module, nn.RMSNorm):
            nn.init.ones_(module.weight)


class FwPKMModel(FwPKMPreTrainedModel):
    def __init__(self, config: FwPKMConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_init()


class FwPKMForCausalLM(FwPKMPreTrainedModel, GenerationMixin):
    # fp32 fast weights always (bf16 would round writes away): FastWeightState refuses other dtypes, and
    # transformers 5 is told as well (4.x checks this list against parameters and has none to find here)
    _keep_in_fp32_modules = ["fast_weights"] if CACHE_FIELD == "cache" else None

    def __init__(self, config: FwPKMConfig):
        super().__init__(config)
        self.model = FwPKMModel(config)
        f = config.fwpkm
        self.fast_weights = nn.ModuleDict({f"layer_{i}": FastWeightState(f["heads"], f["num_slots"], f["d_k"], f["d_v"])
                                           for i in f.get("layers", [])})
        self.lm_head = None if config.tie_embeddings else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, verify_checksums: bool = True, **kwargs):
        """transformers' loader, after checking every file of a local export against its size/sha256 index."""
        path = os.fspath(pretrained_model_name_or_path)
        if os.path.isdir(path):
            verify_index(path, checksums=verify_checksums)
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    def get_input_embeddings(self):
        return self.model.embed_tokens

    # --- memory API -----------------------------------------------------------------------------

    def new_memory(self, batch_size: int = 1, *, policy: str | None = None, update_chunk: int | None = None,
                   carry_lookahead: bool | None = None) -> FwPKMMemory:
        """A fresh test-time memory for a batch; unset arguments come from the config."""
        c = self.config
        return FwPKMMemory(self, batch_size, policy or c.fwpkm_policy,
                           update_chunk if update_chunk is not None else c.fwpkm_update_chunk,
                           c.fwpkm_carry_lookahead if carry_lookahead is None else carry_lookahead)

    @torch.no_grad()
    def flush_memory(self, memory: FwPKMMemory) -> None:
        """Write what every FwPKM layer's queue holds now (see `FwPKMBranch.flush`), e.g. at a read's end."""
        for layer in self.model.layers:
            if layer.fwpkm is not None:
                for stream in memory.streams[layer.fwpkm.layer_id]:
                    layer.fwpkm.flush(stream, memory)

    def snapshot_fast_weights(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.fast_weights.state_dict().items()}

    @torch.no_grad()
    def restore_fast_weights(self, snapshot: dict[str, torch.Tensor]) -> None:
        for name, buf in self.fast_weights.state_dict().items():
            buf.copy_(snapshot[name])

    # --- forward --------------------------------------------------------------------------------

    def forward(self, input_ids=None, attention_mask=None, cache=None, use_cache=None, position_ids=None,
                labels=None, memory: FwPKMMemory | None = None, flush_memory: bool | None = None,
                logits_to_keep: int = 0, prefill_block: int | None = None, return_dict=None, past_key_values=None,
                **kwargs):
        """Logits [B, T, V] for `input_ids` [B, T] that follow the `cache.seen` tokens already processed.

        Args:
            attention_mask: [B, seen + T] (1 = token, 0 = padding), covering the cached tokens too.
            cache: an FwPKMCache from a previous call (KV + memory), or None to start a new sequence
                (`past_key_values` is the same argument under transformers 4.x).
            memory: an FwPKMMemory to read and write (default: the cache's, or a new one per the config).
            flush_memory: write the queued tokens at the end of this call. Default: only when a call on
                a new sequence without caching runs under the persistent policy (then the state left in
                the buffers equals the training model's after the same forward).
            logits_to_keep: return only the last this many positions' logits (0 = all).
            prefill_block: feed the tokens in blocks of this many through the KV cache and the memory
                queue (default `config.prefill_block`; None = one pass). The result equals one pass;
                activations are O(block), so long contexts fit in bounded memory (keep logits_to_keep
                small too: all logits of a long input are [T, V]).
        """
        cache = cache if cache is not None else past_key_values
        if cache is not None and not isinstance(cache, FwPKMCache):
            if cache.get_seq_length() != 0:
                raise TypeError(f"FwPKMForCausalLM needs its own FwPKMCache, got {type(cache).__name__}")
            cache = None
        B, T = input_ids.shape
        past = cache.seen if cache is not None else 0
        if memory is None:
            memory = cache.memory if cache is not None else self.new_memory(B)
            if flush_memory is None:
                flush_memory = cache is None and use_cache is not True and memory.policy == "persistent"
        if memory.batch_size != B:
            raise ValueError(f"memory was built for batch size {memory.batch_size}, the input has {B} rows")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if attention_mask is not None and attention_mask.shape[1] != past + T:
            raise ValueError(f"attention_mask covers {attention_mask.shape[1]} tokens, expected seen + new = {past + T}")
        block = self.config.prefill_block if prefill_block is None else prefill_block
        if block and T > block:
            return self._forward_blocks(input_ids, attention_mask, cache, use_cache, position_ids, labels, memory,
                                        bool(flush_memory), logits_to_keep, block)
        h, new_cache = self._decode(input_ids, attention_mask, cache, position_ids, memory, bool(flush_memory))
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        logits = self._logits(h)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
        return _output(loss, logits, new_cache if use_cache else None)

    def _logits(self, h):
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        logits = F.linear(h, weight).float()
        used = self.config.tokenizer_vocab_size
        if used is not None and used < logits.shape[-1]:  # padded rows (TP) are no tokens: never predicted
            logits[..., used:] = torch.finfo(logits.dtype).min
        return logits

    def _decode(self, input_ids, attention_mask, cache, position_ids, memory, flush):
        """The decoder stack over one call's tokens: (final hidden states, the cache extended by them)."""
        B, T = input_ids.shape
        past = cache.seen if cache is not None else 0
        kept = 0 if cache is None or cache.kv[0] is None else cache.kv[0][0].shape[2]
        if position_ids is None:
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)[:, past:]
            else:
                position_ids = torch.arange(past, past + T, device=input_ids.device).expand(B, T)
        key_valid = row_mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            key_valid = attention_mask[:, past - kept:].bool()
            row_mask = attention_mask[:, past:]
            if bool(row_mask.all()):
                row_mask = None
        c = self.config
        scaling = None  # full-attention layers only; YaRN's original length defaults to the training length
        if c.fwpkm_rope_scaling and c.attention_window is None:
            scaling = {"original_max_position_embeddings": c.max_position_embeddings, **c.fwpkm_rope_scaling}
        cos, sin = rope_cos_sin(position_ids, rotary_dim(c), c.rope_theta, scaling)
        h = self.model.embed_tokens(input_ids)
        new_cache = FwPKMCache(len(self.model.layers), memory)
        for n, layer in enumerate(self.model.layers):
            h, new_cache.kv[n] = layer(h, cos, sin, cache.kv[n] if cache is not None else None, past, key_valid,
                                       memory, row_mask, flush)
        new_cache.seen = past + T
        return self.model.norm(h), new_cache

    def _forward_blocks(self, input_ids, attention_mask, cache, use_cache, position_ids, labels, memory, flush,
                        logits_to_keep, block):
        """`forward` over blocks of `block` tokens (a multiple of the update chunk when it is finite)."""
        chunk = memory.update_chunk or self.config.fwpkm.get("chunk_size") or 1
        if chunk < block:
            block = block // chunk * chunk
        B, T = input_ids.shape
        past = cache.seen if cache is not None else 0
        kept_logits, loss_sum, loss_count = [], 0.0, 0
        for a in range(0, T, block):
            b = min(a + block, T)
            h, cache = self._decode(input_ids[:, a:b], None if attention_mask is None else attention_mask[:, :past + b],
                                    cache, None if position_ids is None else position_ids[:, a:b], memory,
                                    flush and b == T)
            if not logits_to_keep or b > T - logits_to_keep:
                logits = self._logits(h if not logits_to_keep else h[:, max(T - logits_to_keep - a, 0):])
                kept_logits.append(logits)
            if labels is not None:  # position t predicts labels[t + 1] (the whole input's shift)
                nxt = labels[:, a + 1:b + 1]
                lg = self._logits(h[:, :nxt.shape[1]]) if logits_to_keep else kept_logits[-1][:, :nxt.shape[1]]
                loss_sum = loss_sum + F.cross_entropy(lg.reshape(-1, lg.shape[-1]), nxt.reshape(-1),
                                                      ignore_index=-100, reduction="sum")
                loss_count += int((nxt != -100).sum())
        loss = None if labels is None else loss_sum / max(loss_count, 1)
        return _output(loss, torch.cat(kept_logits, 1), cache if use_cache else None)

    # --- generation (transformers 4.57+ and 5.x) --------------------------------------------------------

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # our own FwPKMCache; the prefill gets cache=None

    def prepare_inputs_for_generation(self, input_ids, next_sequence_length=None, cache=None, attention_mask=None,
                                      memory=None, past_key_values=None, **kwargs):
        cache = cache if cache is not None else past_key_values
        seen = cache.seen if isinstance(cache, FwPKMCache) else 0
        return {"input_ids": input_ids[:, seen:], "attention_mask": attention_mask, CACHE_FIELD: cache,
                "use_cache": True, "memory": memory}

    def _reorder_cache(self, cache, beam_idx):
        return cache.reorder(beam_idx)
