"""The fused core attention (`model/attention.py::FusedWindowedAttention`) against megatron's unfused one.

Proves, in fp32 on CPU with random inputs: the fused attention equals `WindowedDotProductAttention`
(megatron's `DotProductAttention` with a dense band mask) in the forward and in the gradients of query,
key and value, for odd lengths that end in a partial query block, GQA, windows smaller than, equal to and
larger than the query block, window 1, full attention, and a window switched per step on one module
(pSWA). A new window or shape case goes in `CASES`; model-level attention properties are in test_model.py.
"""
from __future__ import annotations

import pytest
import torch

from fwpkm_megatron.parallel import groups

SEED = 1234
# (T, window, heads, query groups): windows below, at and above the query block C = max(W, 64); T odd
CASES = [(131, 5, 4, 2), (131, 1, 4, 4), (67, 64, 4, 1), (201, 100, 2, 2), (45, None, 4, 2), (45, 50, 4, 2)]


@pytest.fixture(scope="module", autouse=True)
def single_process():
    groups.init_single_process(SEED)
    yield
    groups.teardown()


def _pair(heads, query_groups, window, head_dim=16):
    """(fused, unfused) core attentions on one config, both reading the same WindowControl."""
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.enums import AttnMaskType

    from fwpkm_megatron.model.attention import (FusedWindowedAttention, WindowControl,
                                                WindowedDotProductAttention)

    config = TransformerConfig(num_layers=1, hidden_size=heads * head_dim, num_attention_heads=heads,
                               num_query_groups=query_groups, attention_dropout=0.0, masked_softmax_fusion=False,
                               use_cpu_initialization=True, cuda_graph_scope=[])  # megatron's default is deprecated
    ctl = WindowControl("swa" if window else "full", window or 1)
    kw = dict(config=config, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self",
              window_control=ctl)
    return FusedWindowedAttention(**kw), WindowedDotProductAttention(**kw), ctl


def _inputs(T, heads, query_groups, b=2, head_dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(T, b, heads, head_dim, generator=g)
    k, v = (torch.randn(T, b, query_groups, head_dim, generator=g) for _ in range(2))
    return [x.requires_grad_() for x in (q, k, v)]


def _fwd_bwd(module, inputs, seed=1):
    out = module(*inputs, attention_mask=None)
    cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    grads = torch.autograd.grad(out, inputs, cotangent)
    return out, grads


def _assert_close(name, ref, got):
    # fp32 throughout; the two sum the same products in another order (SDPA vs baddbmm + softmax)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=2e-6, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("T,window,heads,groups_", CASES,
                         ids=[f"T{t}-W{w}-H{h}-G{g}" for t, w, h, g in CASES])
def test_fused_attention_matches_unfused_forward_and_gradients(T, window, heads, groups_):
    fused, unfused, _ = _pair(heads, groups_, window)
    inputs = _inputs(T, heads, groups_)
    ref, ref_grads = _fwd_bwd(unfused, inputs)
    out, grads = _fwd_bwd(fused, inputs)
    assert out.shape == (T, 2, heads * 16)
    _assert_close("output", ref, out)
    for name, r, g in zip("qkv", ref_grads, grads):
        _assert_close(f"d{name}", r, g)


def test_fused_attention_follows_the_window_switched_per_step():
    """pSWA: one module, the shared control flips between windowed and full; each step matches the reference."""
    fused, unfused, ctl = _pair(4, 2, 7)
    inputs = _inputs(99, 4, 2, seed=3)
    outs = {}
    for window in (7, None, 7):
        ctl.window = window
        ref, ref_grads = _fwd_bwd(unfused, inputs)
        out, grads = _fwd_bwd(fused, inputs)
        _assert_close(f"output, window {window}", ref, out)
        _assert_close(f"dq, window {window}", ref_grads[0], grads[0])
        outs.setdefault(window, out)
    assert (outs[7] - outs[None]).abs().max() > 1e-3  # the switch really changes the attention
