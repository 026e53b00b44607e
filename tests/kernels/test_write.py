"""The fused chunk write equals `reference.value_write` forward and backward, and is bitwise reproducible.

Shapes: k in {1, 3, 8}, H in {1, 2, 4}, tables small enough that many reads hit the same row, target
masks as a scan makes them (a prefix) and arbitrary ones. Random cotangents on delta check the
gradient to every differentiable input (weight, v_hat, target, gate).
Tolerance: 1e-5 of the largest reference magnitude (fp32).
"""
import pytest
import torch

from fwpkm_megatron.ops import reference
from fwpkm_megatron.ops.triton import write

RATIO = 1e-5

CASES = {  # B, C, H, k, N, d_v, mask ("prefix": the last token has no target, "random")
    "B2-C5-H1-k3-N25-D7-prefix": (2, 5, 1, 3, 25, 7, "prefix"),
    "B3-C4-H4-k8-N49-D33-prefix": (3, 4, 4, 8, 49, 33, "prefix"),
    "B2-C7-H2-k1-N9-D130-random": (2, 7, 2, 1, 9, 130, "random"),
    "B1-C6-H2-k3-N16-D5-random": (1, 6, 2, 3, 16, 5, "random"),
}


def make(B, C, H, k, N, D, mask, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, N, (B, C, H, k), generator=gen).to(device)
    weight = torch.rand(B, C, H, k, generator=gen).to(device).requires_grad_()
    v_hat = torch.randn(B, C, D, generator=gen).to(device).requires_grad_()
    target = torch.randn(B, C, D, generator=gen).to(device).requires_grad_()
    gate = (torch.rand(B, C, generator=gen) * 0.8 + 0.1).to(device).requires_grad_()
    if mask == "prefix":
        has = torch.zeros(B, C, dtype=torch.bool)
        has[:, :C - 1] = True
    else:
        has = torch.rand(B, C, generator=gen) < 0.6
        has[0, 0] = True
    return idx, weight, v_hat, target, gate, has.to(device)


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_triton_write_matches_reference(case, device, assert_close):
    idx, *inputs, has = make(*case, device)
    ref_rows, ref_delta = reference.value_write(idx, *inputs, has, value_lr=0.7)
    tri_rows, tri_delta = write.value_write(idx, *inputs, has, value_lr=0.7)
    assert torch.equal(tri_rows, ref_rows)
    assert_close("delta", ref_delta, tri_delta, RATIO)
    ddelta = torch.randn(ref_delta.shape, generator=torch.Generator().manual_seed(1)).to(device)
    names = ("dweight", "dv_hat", "dtarget", "dgate")
    for name, a, b in zip(names, torch.autograd.grad(ref_delta, inputs, ddelta),
                          torch.autograd.grad(tri_delta, inputs, ddelta)):
        assert_close(name, a, b, RATIO)


def test_triton_write_is_bitwise_reproducible(device):
    """Segmented sums in a fixed order: the same inputs give the same bits (exact resume depends on it)."""
    idx, *inputs, has = make(4, 9, 2, 8, 16, 33, "prefix", device)  # ~1150 reads on 16 rows
    first = write.value_write(idx, *inputs, has)
    second = write.value_write(idx, *inputs, has)
    assert torch.equal(first[1], second[1])
    ddelta = torch.randn(first[1].shape, generator=torch.Generator().manual_seed(1)).to(device)
    for a, b in zip(torch.autograd.grad(first[1], inputs, ddelta), torch.autograd.grad(second[1], inputs, ddelta)):
        assert torch.equal(a, b)


def test_triton_write_without_targets_is_none(device):
    idx, *inputs, has = make(2, 3, 1, 2, 9, 4, "prefix", device)
    assert write.value_write(idx, *inputs, torch.zeros_like(has)) is None
