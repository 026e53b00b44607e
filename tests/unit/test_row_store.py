"""`reference.RowStore` (the scan's in-place row store with its hand-chained backward) equals `RowOverlay`.

Random reads and writes over a few chunks in float64 on odd shapes, an initial `written` state, two streams;
values, first-order gradients (plain and under create_graph) and second-order gradients (the gradient of a create_graph gradient) agree
to 1e-12 (both are the same sums in a different order).
"""
import pytest
import torch

from fwpkm_megatron.ops.reference import RowOverlay, RowStore

TOL = 1e-12


def _run(cls, base, p, w0, *, streams, chunks, gen_seed):
    """A chain of reads and writes whose deltas depend on p and on earlier reads (as the scan's do)."""
    gen = torch.Generator().manual_seed(gen_seed)
    n, d = base.shape[0] * streams, base.shape[1]
    rows0 = torch.tensor([1, 4, n - 1])
    if cls is RowStore:
        table = RowStore(base, streams, written=(rows0, w0))
    else:
        table = RowOverlay(base, streams)
        table.rows, table.row_values = rows0, w0
    out = 0.0
    for _ in range(chunks):
        idx = torch.randint(0, n, (5, 3), generator=gen)
        read = table.gather(idx)                                           # [5, 3, d]
        out = out + (read.sin() * p[: d]).sum()
        rows = torch.unique(torch.randint(0, n, (7,), generator=gen))
        mix = torch.randn(rows.numel(), 15, generator=gen, dtype=base.dtype)
        delta = mix @ read.reshape(15, d).tanh() * p[d:].exp()              # depends on reads and p
        table.add(rows, delta)
    rows, values = (table.rows, table.row_values) if cls is RowOverlay else table.state()
    return out + values.cos().sum(), rows, values


@pytest.mark.parametrize("trained_base", [True, False], ids=["base-requires-grad", "base-buffer"])
@pytest.mark.parametrize("streams", [1, 2])
def test_row_store_matches_overlay(streams, trained_base):
    """A trained base (copied whole into the store) and a buffer base (rows copied in as first read)."""
    torch.manual_seed(0)
    d = 7
    base = torch.randn(13, d, dtype=torch.float64, requires_grad=trained_base)
    p = torch.randn(2 * d, dtype=torch.float64, requires_grad=True)
    w0 = torch.randn(3, d, dtype=torch.float64, requires_grad=True)
    inputs = (base, p, w0) if trained_base else (p, w0)
    res = {}
    for cls in (RowOverlay, RowStore):
        loss, rows, values = _run(cls, base, p, w0, streams=streams, chunks=4, gen_seed=1)
        grads = torch.autograd.grad(loss, inputs, create_graph=True)
        second = torch.autograd.grad(sum((g * g).sum() for g in grads), inputs)
        loss_again = _run(cls, base, p, w0, streams=streams, chunks=4, gen_seed=1)[0]
        first = torch.autograd.grad(loss_again, inputs)                     # the in-place backward
        res[cls] = (loss.detach(), rows, values.detach(), [g.detach() for g in grads] + list(first), second)
    ref, new = res[RowOverlay], res[RowStore]
    assert torch.equal(ref[1], new[1])
    torch.testing.assert_close(new[0], ref[0], rtol=0, atol=TOL)
    torch.testing.assert_close(new[2], ref[2], rtol=0, atol=TOL)
    for a, b in zip(new[3] + list(new[4]), ref[3] + list(ref[4])):
        torch.testing.assert_close(a, b, rtol=TOL, atol=TOL)
