"""The batched per-sequence scan (`per_sequence`: every sequence its own stream of keys and rows, run as one
batch) equals its definition, one shared-state scan per sequence, forward and every gradient.

The gradients include the second-order path (the LM loss through the key steps' `create_graph` gradients
and through the writes), from random cotangents on the reads. float64, so 1e-10 is round-off.
"""
import pytest
import torch

from fwpkm_megatron.ops import reference
from fwpkm_megatron.ops.testing import random_scan_inputs

TOL = dict(rtol=1e-10, atol=1e-12)
CASES = {
    "B3-T11-C4-H2-k3": dict(B=3, T=11, H=2, R=5, chunk_size=4, top_k=3),
    "B2-T9-C3-H1-k2-dot-lahd2": dict(B=2, T=9, H=1, R=4, chunk_size=3, top_k=2, score="dot", lookahead=2),
    "B3-T8-C3-noaddr": dict(B=3, T=8, H=2, R=4, chunk_size=3, top_k=2, addr_loss=False),
    "B2-T7-C7-lahd0-detach": dict(B=2, T=7, H=1, R=3, chunk_size=7, top_k=1, lookahead=0, detach_writes=True),
}


def _inputs(B, T, H, R, seed=0):
    return [t.double().requires_grad_() for t in random_scan_inputs(B, T, H, R, 6, 5, seed=seed)]


def _loss(v_hat, cot):
    return (v_hat * cot).sum()


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_per_sequence_batch_equals_one_scan_per_sequence(case):
    case = dict(case)
    shape = {k: case.pop(k) for k in ("B", "T", "H", "R")}
    kw = dict(case, value_lr=0.8, key_lr=0.9, addr_loss_weight=0.6)
    inputs = _inputs(**shape)
    cot = torch.randn(shape["B"], shape["T"], 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    written = (torch.tensor([0, 3, 7]), torch.randn(3, 5, dtype=torch.float64))
    for start in (None, written):
        res = reference.fwpkm_scan_rows(*inputs, per_sequence=True, written=start, diagnostics=True, **kw)
        grads = torch.autograd.grad(_loss(res.v_hat, cot), inputs, allow_unused=True, materialize_grads=True)
        q, v, g, keys, values = inputs
        parts = [reference.fwpkm_scan_rows(q[b:b + 1], v[b:b + 1], g[b:b + 1], keys, values, written=start,
                                           diagnostics=True, **kw) for b in range(shape["B"])]
        v_hat = torch.cat([p.v_hat for p in parts])
        ref_grads = torch.autograd.grad(_loss(v_hat, cot), inputs, allow_unused=True, materialize_grads=True)
        torch.testing.assert_close(res.v_hat, v_hat, **TOL)
        assert torch.equal(res.idx, torch.cat([p.idx for p in parts]))
        for name, a, b in zip("q v g keys values".split(), grads, ref_grads):
            torch.testing.assert_close(a, b, **TOL, msg=f"d{name}")
        for key, value in reference.mean_diagnostics(parts).items():  # fp32 sums by design: fp32 round-off
            torch.testing.assert_close(res.diagnostics[key], value, rtol=1e-6, atol=1e-7, msg=key)
        assert res.keys is keys and res.rows.numel() == 0 and res.row_values.numel() == 0


def test_per_sequence_eval_matches_first_order():
    """Under no_grad (eval) the batched per-sequence scan gives the per-sequence loop's reads."""
    q, v, g, keys, values = (t.detach() for t in _inputs(3, 10, 2, 4, seed=2))
    with torch.no_grad():
        res = reference.fwpkm_scan_rows(q, v, g, keys, values, top_k=2, chunk_size=4, per_sequence=True)
        loop = [reference.fwpkm_scan_rows(q[b:b + 1], v[b:b + 1], g[b:b + 1], keys, values, top_k=2, chunk_size=4)
                for b in range(3)]
    assert not res.v_hat.requires_grad
    torch.testing.assert_close(res.v_hat, torch.cat([p.v_hat for p in loop]), **TOL)


def test_stream_overlay_is_one_private_table_per_stream():
    """`RowOverlay(base, streams=S)`: row id s*N + i is slot i of stream s; writes stay in their stream."""
    gen = torch.Generator().manual_seed(0)
    N, S = 9, 3
    base = torch.randn(N, 4, generator=gen, dtype=torch.float64)
    overlay = reference.RowOverlay(base, streams=S)
    dense = [base.clone() for _ in range(S)]
    for _ in range(3):
        ids = torch.unique(torch.randint(0, S * N, (7,), generator=gen))
        delta = torch.randn(ids.numel(), 4, generator=gen, dtype=torch.float64)
        overlay.add(ids, delta)
        for i, d in zip(ids.tolist(), delta):
            dense[i // N][i % N] += d
        probe = torch.randint(0, S * N, (5, 2), generator=gen)
        want = torch.stack([dense[i // N][i % N] for i in probe.flatten().tolist()]).view(5, 2, 4)
        torch.testing.assert_close(overlay.gather(probe), want, rtol=0, atol=1e-14)
