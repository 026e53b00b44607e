"""The memory-group scan (`ops.reference._scan_group`) in one process: with the M = 1 exchange it is the
shared scan, forward and every gradient, float64 - so its group-wide addressing step (the analytic
slope of the entropy, back-propagated per rank) and its write path are the method's. The multi-process
exchange itself is tested in tests/dist/test_memory_parallel.py."""
from __future__ import annotations

import pytest
import torch

from fwpkm_megatron.ops import reference
from fwpkm_megatron.ops.testing import random_scan_inputs

KW = dict(top_k=3, chunk_size=5, lookahead=1, eps=1e-3, addr_loss_weight=0.7, value_lr=1.0, key_lr=0.9)


@pytest.mark.parametrize("per_sequence", [False, True])
def test_group_scan_with_one_rank_is_the_shared_scan(per_sequence):
    torch.manual_seed(0)
    inputs = [t.double().requires_grad_() for t in random_scan_inputs(2, 13, 2, 5, 8, 6, seed=3)]
    outs = []
    for exchange in (None, reference.TokenExchange()):
        res = reference.fwpkm_scan_rows(*inputs, per_sequence=per_sequence, exchange=exchange, **KW)
        loss = (res.v_hat.sin().sum() + res.keys.square().sum()
                + (res.row_values * torch.arange(res.row_values.numel()).view_as(res.row_values).cos()).sum())
        grads = torch.autograd.grad(loss, inputs)
        outs.append((res, grads))
    (a, ga), (b, gb) = outs
    assert torch.equal(a.idx, b.idx) and torch.equal(a.rows, b.rows)
    for x, y in [(a.v_hat, b.v_hat), (a.keys, b.keys), (a.row_values, b.row_values), *zip(ga, gb)]:
        assert torch.allclose(x, y, rtol=1e-10, atol=1e-12), (x - y).abs().max()
    assert torch.equal(b.group_idx, b.idx)  # one rank: the group's reads are its own


def test_group_scan_in_eval_is_first_order():
    q, v, g, keys, values = random_scan_inputs(2, 10, 1, 4, 8, 4, seed=1)
    with torch.no_grad():
        a = reference.fwpkm_scan_rows(q, v, g, keys, values, **KW)
        b = reference.fwpkm_scan_rows(q, v, g, keys, values, exchange=reference.TokenExchange(), **KW)
    assert not b.v_hat.requires_grad and not b.keys.requires_grad
    assert torch.allclose(a.v_hat, b.v_hat, atol=1e-6) and torch.allclose(a.keys, b.keys, atol=1e-6)
    assert torch.allclose(a.row_values, b.row_values, atol=1e-6)
