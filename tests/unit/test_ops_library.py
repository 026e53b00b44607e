"""The memory ops as torch custom ops (fwpkm_megatron/ops/library.py): real implementations and fakes agree.

What this proves: `fwpkm::scan_rows` (the whole scan as one op, used for tensors without storage) equals the
reference scan forward and in the gradients of every input, including through the written rows; the fakes
of the Triton address and read ops give the shapes, dtypes and device of the real kernels (torch.library.opcheck's
schema and fake-tensor checks, on CPU through the Triton interpreter). A new custom op gets a case here.
"""
from __future__ import annotations

import pytest
import torch

from fwpkm_megatron.ops import library, reference

OPTS = dict(top_k=2, chunk_size=5, lookahead=1, eps=1e-3, addr_loss_weight=1.0, value_lr=1.0, key_lr=1.0,
            score="idw", addr_loss=True, per_sequence=False, detach_writes=False)


def _inputs(B=2, T=13, H=1, d_k=8, d_v=6, R=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, d_k, generator=g)
    v = torch.randn(B, T, d_v, generator=g)
    gate = torch.rand(B, T, generator=g)
    keys = torch.randn(H, 2, R, d_k // 2, generator=g) * 0.3
    values = torch.randn(R * R, d_v, generator=g) * 0.3
    return [t.requires_grad_() for t in (q, v, gate, keys, values)]


def test_scan_op_matches_reference_forward_and_gradients():
    ref_in, op_in = _inputs(), _inputs()
    ref = reference.fwpkm_scan_rows(*ref_in, **OPTS)
    out = library.fwpkm_scan_rows(*op_in, **OPTS)
    for name in ("v_hat", "keys", "rows", "row_values", "idx"):
        assert torch.equal(getattr(ref, name), getattr(out, name)), name
    g = torch.Generator().manual_seed(1)
    cot = [torch.randn(t.shape, generator=g) for t in (ref.v_hat, ref.keys, ref.row_values)]
    loss_ref = sum((a * b).sum() for a, b in zip((ref.v_hat, ref.keys, ref.row_values), cot))
    loss_op = sum((a * b).sum() for a, b in zip((out.v_hat, out.keys, out.row_values), cot))
    grads_ref = torch.autograd.grad(loss_ref, ref_in)
    grads_op = torch.autograd.grad(loss_op, op_in)
    for name, a, b in zip(("q", "v", "g", "keys", "values"), grads_ref, grads_op):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6, msg=name)  # the same math, recomputed


def test_scan_op_fake_gives_shapes_dtypes_and_device_on_meta():
    q, v, gate, keys, values = (t.detach().to("meta") for t in _inputs())
    out = library.fwpkm_scan_rows(q, v, gate, keys, values, **OPTS)
    assert all(t.device.type == "meta" for t in out[:5])  # group_idx / diagnostics: None through the op
    assert out.v_hat.shape == (2, 13, 6) and out.idx.shape == (2, 13, 1, 2) and out.idx.dtype == torch.long
    assert out.rows.dtype == torch.long and out.row_values.shape == (out.rows.shape[0], 6)


@pytest.mark.parametrize("op", ["address", "read"])
def test_triton_op_fakes_match_the_kernels(op):
    g = torch.Generator().manual_seed(0)
    M, H, d_k, R, k, d_v = 7, 2, 8, 5, 3, 6
    q = torch.randn(M, H, d_k, generator=g)
    keys = torch.randn(H, 2, R, d_k // 2, generator=g)
    if op == "address":
        torch.library.opcheck(library.address_fwd, (q, keys, k, "idw", 1e-3, True),
                              test_utils=("test_schema", "test_faketensor"))
    else:
        idx = torch.randint(0, R * R, (M, H, k), generator=g)
        weight = torch.rand(M, H, k, generator=g)
        values = torch.randn(R * R, d_v, generator=g)
        torch.library.opcheck(library.read_fwd, (values, idx, weight), test_utils=("test_schema", "test_faketensor"))
        dout = torch.randn(M, d_v, generator=g)
        torch.library.opcheck(library.read_bwd, (values, idx, weight, dout, True, True),
                              test_utils=("test_schema", "test_faketensor"))
