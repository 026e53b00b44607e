"""Gated DeltaNet (GDN) layers of an exported FwPKM GPT, in plain torch, with their state in the cache.

Copied into every export directory by `fwpkm-export`; imports only torch. The training model runs
megatron-core's `GatedDeltaNet` (megatron/core/ssm/gated_delta_net.py); this is the same math, with the
state a generation step needs. Per GDN layer, x [B, T, h] (tensor names as in megatron's state dict):

    q, k, v, z, beta, alpha = in_proj(x)     rows [q (Hk dk) | k (Hk dk) | v (Hv dv) | z (Hv dv) | Hv | Hv]
    q, k, v = silu(depthwise causal conv1d, kernel K, over [q k v])
    q, k = l2norm(q), l2norm(k)              per head: x * rsqrt(sum x^2 + 1e-6); repeated to Hv heads
    g = -exp(A_log) * softplus(alpha + dt_bias);  b = sigmoid(beta)            [B, T, Hv]
    S_t = exp(g_t) S_{t-1} + k_t (b_t (v_t - exp(g_t) S_{t-1}^T k_t))^T        S [Hv, dk, dv], fp32
    o_t = S_t^T q_t / sqrt(dk)
    out = out_proj(RMSNorm_per_head(o) * silu(z))

The recurrence has two exact forms: `chunked_delta_rule` (megatron's torch WY form, chunks of 64, here
from any initial state) for calls with several tokens, and `recurrent_delta_rule` (one token at a time)
for decoding. The layer's cache entry is (conv, S): conv [B, Hk dk * 2 + Hv dv, K-1] holds the last K-1
conv inputs (zeros at a sequence start, as megatron's padding) and S [B, Hv, dk, dv] the recurrent state,
so token-by-token decoding, blockwise prefill and one pass give the same outputs.
Padding tokens (attention_mask 0) leave both untouched: their conv input, g and beta are zero, so a
left-padded row equals the row alone.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

L2NORM_EPS = 1e-6   # fla's l2norm default, used by megatron
CHUNK = 64          # megatron's torch_chunk_gated_delta_rule chunk size


def _fp32_or_wider(t):
    return t if t.dtype == torch.float64 else t.float()


def l2norm(x):
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.square().sum(-1, keepdim=True) + L2NORM_EPS)).to(x.dtype)


def recurrent_delta_rule(q, k, v, g, beta, state):
    """Token-by-token gated delta rule (the definition).

    q, k [B, T, H, dk] (L2-normalised), v [B, T, H, dv], g, beta [B, T, H], state [B, H, dk, dv]
    -> o [B, T, H, dv], the state after the last token (both fp32, or fp64 for fp64 inputs).
    """
    q, k, v, g, beta = (_fp32_or_wider(t) for t in (q, k, v, g, beta))
    q = q * q.shape[-1] ** -0.5
    state, out = _fp32_or_wider(state), []
    for t in range(q.shape[1]):
        state = state * g[:, t].exp()[..., None, None]
        delta = (v[:, t] - (state * k[:, t, :, :, None]).sum(-2)) * beta[:, t, :, None]   # [B, H, dv]
        state = state + k[:, t, :, :, None] * delta[:, :, None, :]
        out.append((state * q[:, t, :, :, None]).sum(-2))
    return torch.stack(out, 1), state


def chunked_delta_rule(q, k, v, g, beta, state, chunk: int = CHUNK):
    """The same recurrence in chunks of `chunk` tokens (megatron's `torch_chunk_gated_delta_rule`, WY form),
    starting from `state`. Shapes as `recurrent_delta_rule`; T need not be a multiple of `chunk`."""
    B, T, H, dk = k.shape
    q, k, v, beta, g = (_fp32_or_wider(t.transpose(1, 2)) for t in (q, k, v, beta, g))   # [B, H, T, ...]
    pad = (chunk - T % chunk) % chunk
    q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    beta, g = F.pad(beta, (0, pad)), F.pad(g, (0, pad))
    q = q * dk ** -0.5
    v_beta, k_beta = v * beta[..., None], k * beta[..., None]
    q, k, v, k_beta, v_beta = (t.reshape(B, H, -1, chunk, t.shape[-1]) for t in (q, k, v, k_beta, v_beta))
    g = g.reshape(B, H, -1, chunk).cumsum(-1)                                     # within-chunk log decay
    upper = torch.triu(torch.ones(chunk, chunk, dtype=torch.bool, device=q.device))
    decay = (g[..., :, None] - g[..., None, :]).tril().exp().tril()              # exp(g_i - g_j), j <= i
    attn = -((k_beta @ k.transpose(-1, -2)) * decay).masked_fill(upper, 0)
    for i in range(1, chunk):                                                      # (I + strict lower)^-1
        row, sub = attn[..., i, :i].clone(), attn[..., :i, :i].clone()
        attn[..., i, :i] = row + (row[..., None] * sub).sum(-2)
    attn = attn + torch.eye(chunk, dtype=attn.dtype, device=attn.device)
    v = attn @ v_beta
    k_cumdecay = attn @ (k_beta * g.exp()[..., None])
    state, out = _fp32_or_wider(state), torch.zeros_like(v)
    strict = torch.triu(upper, diagonal=1)
    for n in range(q.shape[2]):
        q_n, k_n = q[:, :, n], k[:, :, n]
        local = (q_n @ k_n.transpose(-1, -2) * decay[:, :, n]).masked_fill(strict, 0)
        v_new = v[:, :, n] - k_cumdecay[:, :, n] @ state
        out[:, :, n] = (q_n * g[:, :, n, :, None].exp()) @ state + local @ v_new
        state = (state * g[:, :, n, -1, None, None].exp()
                 + (k_n * (g[:, :, n, -1, None] - g[:, :, n]).exp()[..., None]).transpose(-1, -2) @ v_new)
    out = out.reshape(B, H, -1, out.shape[-1])[:, :, :T]
    return out.transpose(1, 2), state


class GatedDeltaNet(nn.Module):
    """One GDN token mixer (module docstring); `config.gdn` holds its sizes as the training config had them."""

    def __init__(self, config):
        super().__init__()
        c, h = config.gdn, config.hidden_size
        self.hk, self.hv, self.dk, self.dv = c["num_key_heads"], c["num_value_heads"], c["key_head_dim"], \
            c["value_head_dim"]
        self.kernel = c["conv_kernel"]
        self.qk_dim, self.v_dim = self.hk * self.dk, self.hv * self.dv
        self.conv_dim = 2 * self.qk_dim + self.v_dim
        self.in_proj = nn.Linear(h, self.conv_dim + self.v_dim + 2 * self.hv, bias=False)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, self.kernel, groups=self.conv_dim, bias=False)
        self.A_log = nn.Parameter(torch.zeros(self.hv))
        self.dt_bias = nn.Parameter(torch.ones(self.hv))
        self.out_norm = nn.RMSNorm(self.dv, eps=config.rms_norm_eps)
        self.out_proj = nn.Linear(self.v_dim, h, bias=False)

    def forward(self, x, past, row_mask):
        """x [B, T, h]; past = (conv, S) from earlier calls or None; row_mask [B, T] (1 token, 0 padding) or
        None -> (out [B, T, h], (conv, S) to keep)."""
        B, T, _ = x.shape
        qkv, z, b, a = self.in_proj(x).split([self.conv_dim, self.v_dim, self.hv, self.hv], -1)
        keep = None if row_mask is None else row_mask[..., None].to(x.dtype)        # [B, T, 1]
        if keep is not None:
            qkv = qkv * keep
        conv_past = past[0] if past is not None else qkv.new_zeros(B, self.conv_dim, self.kernel - 1)
        window = torch.cat([conv_past, qkv.transpose(1, 2)], 2)                    # [B, C, K-1+T]
        conv = F.silu(F.conv1d(window, self.conv1d.weight, groups=self.conv_dim)).transpose(1, 2)  # [B, T, C]
        q, k, v = conv.split([self.qk_dim, self.qk_dim, self.v_dim], -1)
        q, k = l2norm(q.reshape(B, T, self.hk, self.dk)), l2norm(k.reshape(B, T, self.hk, self.dk))
        if self.hv > self.hk:
            q, k = q.repeat_interleave(self.hv // self.hk, 2), k.repeat_interleave(self.hv // self.hk, 2)
        g = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias)         # [B, T, Hv]
        beta = b.sigmoid()
        if keep is not None:
            g, beta = g * keep, beta * keep
        state = past[1] if past is not None else x.new_zeros(B, self.hv, self.dk, self.dv, dtype=torch.float32)
        rule = recurrent_delta_rule if T == 1 else chunked_delta_rule
        o, state = rule(q, k, v.reshape(B, T, self.hv, self.dv), g, beta, state)
        o = (self.out_norm(o.to(x.dtype)) * F.silu(z.reshape(B, T, self.hv, self.dv).float())).to(x.dtype)
        return self.out_proj(o.reshape(B, T, self.v_dim)), (window[..., window.shape[-1] - (self.kernel - 1):], state)
