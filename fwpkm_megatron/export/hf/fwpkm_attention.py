"""Attention, RoPE and the dense MLP of an exported FwPKM GPT (Hugging Face remote code).

Copied into every export directory by `fwpkm-export`; imports only torch (and the config). The training model's
counterparts are megatron-core's attention (model/attention.py: full, sliding-window) and SwiGLU MLP.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .configuration_fwpkm import FwPKMConfig


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
