"""Sliding-window attention (SWA) and probabilistic SWA (pSWA) for megatron-core's local attention.

One `WindowControl` is shared by every layer of a model and says which window the current step uses:
`None` is plain causal attention, an int W lets a query see itself and the W-1 previous tokens.
`WindowedDotProductAttention` is megatron's `DotProductAttention` with that band mask; it enters the
model as the `core_attention` submodule of the layer spec (see `specs.py`).

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

import random

import torch
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
