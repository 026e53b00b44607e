"""The sparse read equals `reference.pkm_read` forward and backward; the overlay-aware read equals `RowOverlay`.

Shapes: odd d_v (7, 33, and 130 > one 128-wide column block), k in {1, 3, 8}, H in {1, 2, 4}, and
tables small enough that rows repeat within and across tokens (the backward's segmented reduction).
Tolerance: 1e-5 of the largest reference magnitude (fp32 sums in a different order).
"""
import pytest
import torch

from fwpkm_megatron.ops import reference
from fwpkm_megatron.ops.triton import read

RATIO = 1e-5

CASES = {  # M tokens, H, k, N slots, d_v
    "M13-H1-k3-N25-D7": (13, 1, 3, 25, 7),
    "M10-H2-k1-N9-D33": (10, 2, 1, 9, 33),
    "M7-H4-k8-N49-D130": (7, 4, 8, 49, 130),
    "M19-H2-k8-N16-D5": (19, 2, 8, 16, 5),
}


def make(M, H, k, N, D, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    values = torch.randn(N, D, generator=gen).to(device).requires_grad_()
    idx = torch.randint(0, N, (M, H, k), generator=gen).to(device)
    weight = torch.rand(M, H, k, generator=gen).to(device).requires_grad_()
    return values, idx, weight


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_triton_read_matches_reference(case, device, assert_close):
    values, idx, weight = make(*case, device)
    ref = reference.pkm_read(values, idx, weight)
    tri = read.pkm_read(values, idx, weight)
    assert_close("out", ref, tri, RATIO)
    dout = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1)).to(device)
    for name, a, b in zip(("dvalues", "dweight"), torch.autograd.grad(ref, (values, weight), dout),
                          torch.autograd.grad(tri, (values, weight), dout)):
        assert_close(name, a, b, RATIO)


def test_triton_read_bf16_storage_accumulates_in_fp32(device, assert_close):
    """bf16 rows are loaded and cast: the result equals an fp32 read of the same (bf16-rounded) rows."""
    values, idx, weight = make(11, 2, 3, 25, 33, device)
    vb = values.detach().bfloat16()
    tri = read.pkm_read(vb, idx, weight.detach())
    assert tri.dtype == torch.float32
    assert_close("out", reference.pkm_read(vb.float(), idx, weight.detach()), tri, RATIO)


def test_overlay_read_matches_row_overlay(device, assert_close):
    """A read through the scan's row store (ptr >= 0: a version written earlier) equals `RowOverlay.gather`."""
    values, idx, weight = make(9, 2, 3, 16, 10, device)
    values, weight = values.detach(), weight.detach()
    gen = torch.Generator().manual_seed(2)
    overlay = reference.RowOverlay(values)
    rows = torch.tensor([1, 4, 5, 11], device=device)
    overlay.add(rows, torch.randn(4, 10, generator=gen).to(device))
    store = torch.cat([torch.randn(3, 10, generator=gen).to(device), overlay.row_values])  # 3 stale versions first
    latest = torch.full((16,), -1, dtype=torch.long, device=device)
    latest[rows] = torch.arange(3, 7, device=device)
    ref = torch.einsum("mhk,mhkd->md", weight, overlay.gather(idx))
    tri = read.read_fwd(values, idx, weight, store, latest[idx])
    assert_close("out", ref, tri, RATIO)


def test_segments_group_entries_by_key_in_entry_order(device):
    keys = torch.tensor([5, 2, 5, 9, 2, 5], device=device)
    seg = read.segments(keys)
    assert seg.keys.tolist() == [2, 5, 9] and seg.counts.tolist() == [2, 3, 1]
    assert seg.perm.tolist() == [1, 4, 0, 2, 5, 3] and seg.start.tolist() == [0, 2, 5, 6]
    assert seg.inverse.tolist() == [1, 0, 1, 2, 0, 1]
