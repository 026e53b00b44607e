"""Sliding-window attention (SWA) and probabilistic SWA (pSWA) as megatron-core core attention.

One `WindowControl` is shared by every layer of a model and says which window the current step uses:
`None` is plain causal attention, an int W lets a query see itself and the W-1 previous tokens.

Two core attentions with megatron's `DotProductAttention` contract ([sq, b, np, hn] in, [sq, b, np*hn] out):
- `FusedWindowedAttention` (the model's, through `specs.py`): `sliding_window_attention` below, built on
  `F.scaled_dot_product_attention`. Windowed, queries go in blocks of C = max(W, 64) and each block
  attends only to its C + W - 1 keys, so no T x T tensor exists: activations and scores are O(T * (C + W)),
  i.e. O(T * W), in the forward and the backward, on every device (on CUDA SDPA picks a fused kernel per
  block batch). Full attention is SDPA's causal path (flash / memory-efficient kernels on CUDA).
- `WindowedDotProductAttention`: megatron's unfused attention with a dense T x T band mask, kept as the
  readable reference that tests and `bench/attention.py` compare the fused one against.

FlexAttention (`torch.nn.attention.flex_attention`) would express the same band as a block mask, but in
torch 2.13 it has no backward on CPU and needs `torch.compile` to avoid materialising T x T scores, so it
could not be checked against the reference on the machines the tests run on; SDPA on blocks can.

Modes (`ModelConfig.attention`):
- `full`: never windowed.
- `swa`: always windowed, in training and evaluation.
- `pswa`: windowed with probability `pswa_prob` per training step, all layers together; full attention
  in evaluation (method notes 4.3, "pSWA"). The draw depends only on (seed, step), never on a global
  RNG, so every rank agrees without communication and a resumed run repeats the same sequence.

megatron's own `TransformerConfig.window_size` is not used: it is fixed at build time, and its
"infinite" setting `(-1, 0)` silently masks every key (megatron-deepspeed-notes.md, Q2).
"""
from __future__ import annotations

import functools
import math
import random

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType

from fwpkm_megatron.config import ModelConfig

_PSWA_STEP_STRIDE = 1_000_003  # prime; (seed, step) -> seed * stride + step seeds the per-step draw


class WindowControl:
    """The attention window of the current step, shared by all layers of one model.

    Attributes:
        mode: "full" | "swa" | "pswa".
        window_size: W from the config (a query sees itself and W-1 previous tokens).
        pswa_prob: probability that a pSWA training step is windowed.
        window: the window in force now: `window_size` or None (plain causal).
    """

    def __init__(self, mode: str, window_size: int, pswa_prob: float = 0.0):
        if mode not in ("full", "swa", "pswa"):
            raise ValueError(f"attention mode {mode!r}: must be full, swa or pswa")
        if window_size < 1:
            raise ValueError(f"window_size={window_size}: must be >= 1")
        self.mode = mode
        self.window_size = window_size
        self.pswa_prob = pswa_prob
        self.window: int | None = window_size if mode == "swa" else None

    @classmethod
    def from_config(cls, model: ModelConfig) -> "WindowControl":
        return cls(model.attention, model.window, model.pswa_prob)

    def begin_step(self, step: int, seed: int, training: bool) -> int | None:
        """Set and return the window for one step (call once per optimizer step, before its forwards).

        Args:
            step: the global step number; with `seed` it alone decides a pSWA draw.
            seed: the run seed.
            training: False for evaluation, where pSWA uses full attention.
        """
        if self.mode == "full":
            self.window = None
        elif self.mode == "swa":
            self.window = self.window_size
        elif not training:
            self.window = None
        else:
            draw = random.Random(seed * _PSWA_STEP_STRIDE + step).random()  # private RNG: ranks agree, resume is exact
            self.window = self.window_size if draw < self.pswa_prob else None
        return self.window

    def __repr__(self) -> str:
        return (f"WindowControl(mode={self.mode!r}, window_size={self.window_size}, "
                f"pswa_prob={self.pswa_prob}, window={self.window})")


def band_mask(sq: int, sk: int, window: int | None, device: torch.device) -> torch.Tensor:
    """Causal (optionally windowed) attention mask, True = masked.

    Queries are the last `sq` of `sk` positions (sq < sk with a KV cache). Query i sees key j iff
    j <= i and, with a window W, j > i - W.

    Returns:
        bool [1, 1, sq, sk], broadcast over batch and heads.
    """
    i = torch.arange(sk - sq, sk, device=device).view(-1, 1)  # query positions [sq, 1]
    j = torch.arange(sk, device=device).view(1, -1)           # key positions   [1, sk]
    masked = j > i
    if window is not None:
        masked = masked | (j <= i - window)
    return masked.view(1, 1, sq, sk)


class WindowedDotProductAttention(DotProductAttention):
    """megatron's local core attention with the mask chosen per step by a shared `WindowControl`.

    The caller's mask (e.g. padding), if any, is OR-ed into the band mask.
    """

    def __init__(self, *args, window_control: WindowControl, **kwargs):
        super().__init__(*args, **kwargs)
        self.window_control = window_control

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        # query [sq, b, np, hn], key/value [sk, b, ng, hn]
        mask = band_mask(query.size(0), key.size(0), self.window_control.window, query.device)
        if attention_mask is not None:
            mask = mask | attention_mask.bool()
        return super().forward(query, key, value, mask, attn_mask_type=AttnMaskType.arbitrary,
                               attention_bias=attention_bias, packed_seq_params=packed_seq_params)


MIN_QUERY_BLOCK = 64  # C = max(W, 64): small windows still get blocks large enough to keep kernels busy


@functools.lru_cache(maxsize=8)
def _block_band(batch: int, num_blocks: int, block: int, window: int, device: torch.device) -> torch.Tensor:
    """Which of a query block's C + W - 1 keys each query sees (True = visible).

    Cached per (B, T, W, device): built once, shared by every layer and step (B * T * (C + W - 1) bytes).
    Block i holds queries i*C + a (a < C) and keys i*C + c - (W-1) (c < C + W - 1). Query sees key iff
    key <= query and key > query - W, i.e. a <= c <= a + W - 1, and the key exists (position >= 0).

    Returns:
        bool [B * num_blocks, 1, C, C + W - 1] (batch-major, as the blocks in `sliding_window_attention`).
    """
    a = torch.arange(block, device=device).view(1, -1, 1)
    c = torch.arange(block + window - 1, device=device).view(1, 1, -1)
    first = (torch.arange(num_blocks, device=device) * block).view(-1, 1, 1)  # first query of each block
    visible = (c >= a) & (c <= a + window - 1) & (first + c - (window - 1) >= 0)
    return visible.expand(batch, *visible.shape).reshape(batch * num_blocks, 1, block, block + window - 1)


def _expand_kv(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, Hkv, L, D] -> [B, heads, L, D], query head i on kv head i // (heads / Hkv) (megatron's GQA layout).

    Expanded rather than through SDPA's `enable_gqa`, which not every fused SDPA backend supports; a
    refused backend would fall back to SDPA's math path, which materialises the scores."""
    return x if x.shape[1] == heads else x.repeat_interleave(heads // x.shape[1], dim=1)


def sliding_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None,
                             scale: float, dropout_p: float = 0.0) -> torch.Tensor:
    """Causal attention where a query sees itself and the `window` - 1 previous keys (None: all previous).

    Args:
        q: [B, Hq, T, D]; k, v: [B, Hkv, T, D] with Hq a multiple of Hkv (query head i uses kv head
            i // (Hq / Hkv), megatron's GQA layout).
        window: W >= 1, or None for full causal attention.
        scale: softmax scale (megatron's `softmax_scale`, 1/sqrt(D) by default).
        dropout_p: dropout on the attention probabilities (training only; the caller passes 0 in eval).

    Returns:
        [B, Hq, T, D] in q's dtype. Memory O(T * (C + W)) with C = max(W, 64) when windowed.
    """
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    if window is None or window >= T:  # the band covers every earlier key: plain causal attention
        k, v = _expand_kv(k, Hq), _expand_kv(v, Hq)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, dropout_p=dropout_p)
    C = max(window, MIN_QUERY_BLOCK)
    n = math.ceil(T / C)
    P = window - 1                                                   # keys before a block's first query
    span = C + P                                                     # keys one block sees
    q = F.pad(q, (0, 0, 0, n * C - T))                               # [B, Hq, nC, D]
    k, v = (F.pad(x, (0, 0, P, n * C - T)).unfold(2, span, C) for x in (k, v))  # [B, Hkv, n, D, span] views

    def blocks(x, heads, length):                                    # -> [B*n, heads, length, D]
        return x.transpose(1, 2).reshape(B * n, heads, length, D)

    qb = blocks(q.view(B, Hq, n, C, D), Hq, C)
    kb, vb = (blocks(x.transpose(-1, -2), Hkv, span) for x in (k, v))
    kb, vb = _expand_kv(kb, Hq), _expand_kv(vb, Hq)
    mask = _block_band(B, n, C, window, q.device)                   # [B*n, 1, C, span]
    out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, scale=scale,
                                         dropout_p=dropout_p)                # [B*n, Hq, C, D]
    return out.view(B, n, Hq, C, D).transpose(1, 2).reshape(B, Hq, n * C, D)[:, :, :T]


class FusedWindowedAttention(DotProductAttention):
    """Core attention through `sliding_window_attention`: O(T * W) memory, window from the shared control.

    Same constructor, scale and (empty) state dict as megatron's `DotProductAttention`, so checkpoints
    and the layer spec do not change. A caller's mask (padding) or a KV cache (sq != sk) takes a dense
    masked SDPA instead, which is O(sq * sk): neither occurs in training, where the mask is None.
    Attention dropout (off in the backbone) is SDPA's, drawn under megatron's model-parallel RNG
    fork as in `DotProductAttention`, so recompute redraws the same masks.
    """

    def __init__(self, *args, window_control: WindowControl, **kwargs):
        super().__init__(*args, **kwargs)
        self.window_control = window_control

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        assert packed_seq_params is None and attention_bias is None, "packed sequences / bias not supported"
        sq, b, np_, hn = query.shape
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))  # [b, heads, s, hn]
        window = self.window_control.window
        dropout_p = self.attention_dropout.p if self.training else 0.0
        with tensor_parallel.get_cuda_rng_tracker().fork():  # megatron's stream for attention dropout
            if attention_mask is None and sq == key.size(0):
                out = sliding_window_attention(q, k, v, window, self.softmax_scale, dropout_p)
            else:
                visible = ~band_mask(sq, key.size(0), window, query.device)
                if attention_mask is not None:
                    visible = visible & ~attention_mask.bool()
                out = F.scaled_dot_product_attention(q, _expand_kv(k, np_), _expand_kv(v, np_), attn_mask=visible,
                                                     scale=self.softmax_scale, dropout_p=dropout_p)
        return out.permute(2, 0, 1, 3).reshape(sq, b, np_ * hn)               # [sq, b, hp]
