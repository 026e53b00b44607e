"""The reference memory ops against brute force, and the properties the method relies on.

`naive_scan` below is a second, independent definition: dense scoring of all N product keys per token,
explicit loops over tokens and rows, and `autograd.grad` of the memorization loss (method Eq. 13)
for the value write. A new op or option gets its brute-force twin here first.
Tolerances: float64 everywhere, so 1e-10 relative is round-off, not approximation.
"""
import itertools

import pytest
import torch

from fwpkm_megatron import ops
from fwpkm_megatron.ops import addressing as addressing_module
from fwpkm_megatron.ops import reference, row_products
from fwpkm_megatron.ops.testing import random_scan_inputs



@pytest.fixture(autouse=True)
def float64_default():
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def make_inputs(B=2, T=11, H=1, R=5, d_k=6, d_v=4, seed=0, requires_grad=False):
    tensors = random_scan_inputs(B, T, H, R, d_k, d_v, seed=seed)
    if requires_grad:
        tensors = tuple(t.clone().requires_grad_() for t in tensors)
    return tensors


def naive_scan(q, v, g, keys, values, *, top_k, chunk_size, lookahead=1, eps=1e-3, addr_loss_weight=1.0,
               value_lr=1.0, key_lr=1.0, score="idw", addr_loss=True):
    B, T, H, d_k = q.shape
    R = keys.shape[2]
    half = d_k // 2
    keys, values = keys.detach().clone(), values.detach().clone()
    v_hat = torch.zeros(B, T, values.shape[1])
    for start in range(0, T, chunk_size):
        end = min(start + chunk_size, T)
        C = end - start
        Vp = values.clone().requires_grad_()
        Kp = keys.clone().requires_grad_()
        reads, sub_probs = {}, [[], []]
        for b, t in itertools.product(range(B), range(start, end)):
            entries = []
            for h in range(H):
                subs = []
                for m in range(2):
                    qm = q[b, t, h, m * half:(m + 1) * half]
                    if score == "idw":
                        s = -torch.log(eps + ((qm[None] - Kp[h, m]) ** 2).sum(-1))
                    else:
                        s = Kp[h, m] @ qm
                    subs.append(s)
                    top = s.topk(top_k).indices
                    masked = torch.full((R,), float("-inf")).index_put((top,), s[top])
                    sub_probs[m].append(masked.softmax(0))
                full = (subs[0][:, None] + subs[1][None, :]).reshape(-1)  # all N product scores, dense
                best = full.topk(top_k)
                entries += [(int(i), s) for i, s in zip(best.indices, best.values)]
            w = torch.stack([s for _, s in entries]).softmax(0)  # joint softmax over H*k
            reads[b, t] = [(i, w[n]) for n, (i, _) in enumerate(entries)]
            v_hat[b, t] = sum(wn.detach() * values[i] for i, wn in reads[b, t])
        # value write: explicit autograd.grad of L_mem, then the k*H*(B*C/M)/N_read scaling
        has = [t for t in range(start, end) if t + lookahead < end]
        M = B * len(has)
        if M:
            loss = sum(0.5 * g[b, t] * (sum(wn * Vp[i] for i, wn in reads[b, t]) - v[b, t + lookahead]).square().sum()
                       for b in range(B) for t in has)
            (grad_v,) = torch.autograd.grad(loss, Vp, retain_graph=True)
            counts = torch.zeros(R * R)
            for entries in reads.values():
                for i, _ in entries:
                    counts[i] += 1
            touched = counts > 0
            values[touched] -= value_lr * top_k * H * (B * C / M) * grad_v[touched] / counts[touched, None]
        if addr_loss:
            ent = sum((torch.stack(p).mean(0) * torch.log(torch.stack(p).mean(0) + 1e-8)).sum() for p in sub_probs)
            (grad_k,) = torch.autograd.grad(addr_loss_weight * ent, Kp)
        else:
            loss = sum(0.5 * g[b, t] * (sum(wn * Vp[i] for i, wn in reads[b, t]) - v[b, t + lookahead]).square().sum()
                       for b in range(B) for t in has) * (B * C / max(M, 1))
            (grad_k,) = torch.autograd.grad(loss, Kp)
        keys = keys - key_lr * grad_k
    return v_hat, keys, values


CASES = {
    "B2-T11-C4-H1-k2": dict(B=2, T=11, H=1, R=5, chunk_size=4, top_k=2),
    "B1-T9-C3-H2-k3": dict(B=1, T=9, H=2, R=4, chunk_size=3, top_k=3),
    "B3-T7-C7-H1-k1-lahd0": dict(B=3, T=7, H=1, R=3, chunk_size=7, top_k=1, lookahead=0),
    "B2-T10-C4-dot": dict(B=2, T=10, H=1, R=4, chunk_size=4, top_k=2, score="dot"),
    "B2-T8-C3-noaddr": dict(B=2, T=8, H=2, R=4, chunk_size=3, top_k=2, addr_loss=False),
}


@pytest.fixture(params=["dense", "gathered"])
def addressing(request, monkeypatch):
    """Both forms of the addressing's graph: dense [M, H, R] scores, or only the k picked sub-keys (large R)."""
    monkeypatch.setattr(addressing_module, "GATHER_SCORES_ABOVE", 10**9 if request.param == "dense" else 0)
    return request.param


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_reference_scan_matches_naive_token_loop(case, addressing):
    case = dict(case)
    shape = {k: case.pop(k) for k in ("B", "T", "H", "R")}
    q, v, g, keys, values = make_inputs(**shape)
    kw = dict(case, value_lr=0.7, key_lr=0.9)
    ref = ops.fwpkm_scan(q, v, g, keys, values, **kw)
    naive = naive_scan(q, v, g, keys, values, **kw)
    for name, a, b in zip(("v_hat", "keys", "values"), ref, naive):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=name)


def test_reference_scan_gradcheck_through_writes(addressing):
    """Finite differences agree with autograd through three chunked writes, for every input."""
    inputs = make_inputs(B=2, T=7, H=1, R=3, d_k=4, d_v=3, requires_grad=True)

    def f(*ins):
        v_hat, keys, values = ops.fwpkm_scan(*ins, top_k=2, chunk_size=3)
        return v_hat, keys, values

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6)


def test_write_gradient_reaches_earlier_chunks():
    """A later chunk's read depends on an earlier chunk's q, v and g only through the writes."""
    q, v, g, keys, values = make_inputs(requires_grad=True)
    v_hat, *_ = ops.fwpkm_scan(q, v, g, keys, values, top_k=2, chunk_size=4)
    grads = torch.autograd.grad(v_hat[:, 8:].square().sum(), (q, v, g, keys, values))
    for name, grad in zip("q v g keys values".split(), grads):
        early = grad[:, :4] if name in "qvg" else grad
        assert early.abs().sum() > 0, f"no gradient into {name} through the writes"


def test_reference_scan_is_causal():
    """Perturbing token t never changes any read at positions < t, even across chunk writes."""
    q, v, g, keys, values = make_inputs(T=13)
    base, *_ = ops.fwpkm_scan(q, v, g, keys, values, top_k=2, chunk_size=4)
    for t in (2, 4, 9, 12):
        q2, v2, g2 = q.clone(), v.clone(), g.clone()
        q2[:, t] += 1.0
        v2[:, t] += 1.0
        g2[:, t] = 0.95
        out, *_ = ops.fwpkm_scan(q2, v2, g2, keys, values, top_k=2, chunk_size=4)
        torch.testing.assert_close(out[:, :t], base[:, :t], rtol=0, atol=0)
        chunk_end = (t // 4 + 1) * 4
        if chunk_end < 13:
            assert not torch.equal(out[:, chunk_end:], base[:, chunk_end:]), "later chunks must see the write"


def test_second_read_is_closer_to_lookahead_targets():
    """Memorization: reading the same sequence again lands nearer to v_{t+1} than the first read."""
    q, v, g, keys, values = make_inputs(B=1, T=16, R=8, d_k=8, d_v=8)
    g = torch.ones_like(g)
    first, keys1, values1 = ops.fwpkm_scan(q, v, g, keys, values, top_k=2, chunk_size=16)
    second, *_ = ops.fwpkm_scan(q, v, g, keys1, values1, top_k=2, chunk_size=16)
    err = lambda r: (r[:, :-1] - v[:, 1:]).square().sum()  # noqa: E731
    assert err(second) < 0.5 * err(first)


def test_per_sequence_isolation():
    """Under per_sequence a sequence's reads do not depend on its batch neighbours, and the state is unchanged."""
    q, v, g, keys, values = make_inputs(B=3, T=9)
    out = ops.fwpkm_scan(q, v, g, keys, values, top_k=2, chunk_size=4, per_sequence=True)
    q2, v2 = q.clone(), v.clone()
    q2[1] += 1.0
    v2[2] -= 1.0
    out2 = ops.fwpkm_scan(q2, v2, g, keys, values, top_k=2, chunk_size=4, per_sequence=True)
    torch.testing.assert_close(out2[0][0], out[0][0], rtol=0, atol=0)
    alone, *_ = ops.fwpkm_scan(q[:1], v[:1], g[:1], keys, values, top_k=2, chunk_size=4)
    torch.testing.assert_close(out[0][0], alone[0], rtol=1e-12, atol=1e-12)
    assert out[1] is keys and out[2] is values


def test_rows_form_matches_dense_table():
    """The O(rows touched) result describes exactly the dense new table."""
    q, v, g, keys, values = make_inputs(B=2, T=12, R=6)
    res = ops.fwpkm_scan_rows(q, v, g, keys, values, top_k=3, chunk_size=5)
    _, _, dense = ops.fwpkm_scan(q, v, g, keys, values, top_k=3, chunk_size=5)
    changed = (dense != values).any(-1).nonzero().flatten()
    assert set(changed.tolist()) <= set(res.rows.tolist())
    torch.testing.assert_close(dense[res.rows], res.row_values)
    assert res.idx.shape == (2, 12, 1, 3)


def test_no_grad_scan_is_first_order_and_matches():
    """Under no_grad the scan builds no graph and gives the same numbers."""
    inputs = make_inputs(requires_grad=True)
    with_grad = ops.fwpkm_scan(*inputs, top_k=2, chunk_size=4)
    with torch.no_grad():
        without = ops.fwpkm_scan(*inputs, top_k=2, chunk_size=4)
    for a, b in zip(with_grad, without):
        assert not b.requires_grad
        torch.testing.assert_close(a.detach(), b, rtol=1e-12, atol=1e-12)


def test_float32_matches_float64():
    inputs = make_inputs(B=2, T=10, R=6)
    ref = ops.fwpkm_scan(*inputs, top_k=2, chunk_size=4)
    f32 = ops.fwpkm_scan(*(t.float() for t in inputs), top_k=2, chunk_size=4)
    for a, b in zip(ref, f32):
        torch.testing.assert_close(b.double(), a, rtol=1e-4, atol=1e-5)  # fp32 round-off through 3 writes


def test_static_pkm_per_head_softmax_sums_to_one_per_head():
    q, _, _, keys, _ = make_inputs(H=2, R=4)
    addr = reference.pkm_address(q.reshape(-1, 2, 6), keys, topk=3, score="dot", joint_softmax=False)
    torch.testing.assert_close(addr.weight.sum(-1), torch.ones(addr.weight.shape[:2]))


def test_backend_selection_errors_are_clear(monkeypatch):
    q, v, g, keys, values = make_inputs()
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)   # CPU tensors need the interpreter for triton
    with pytest.raises(NotImplementedError, match="TRITON_INTERPRET"):
        ops.fwpkm_scan(q, v, g, keys, values, top_k=2, chunk_size=4, backend="triton")
    monkeypatch.setenv("FWPKM_BACKEND", "cuda-magic")
    with pytest.raises(ValueError, match="FWPKM_BACKEND"):
        ops.fwpkm_scan(q, v, g, keys, values, top_k=2, chunk_size=4)


@pytest.mark.parametrize("score", ["idw", "dot"])
@pytest.mark.parametrize("streams", [0, 3])
def test_closed_form_key_grad_matches_autograd_to_second_order(score, streams, addressing):
    """`addressing_key_grad` equals autograd's gradient of the addressing loss, and so does its own
    gradient (the second-order term the LM loss sees through a key step), for q and keys, streams or not."""
    gen = torch.Generator().manual_seed(3)
    lead = (streams,) if streams else ()
    q = (torch.randn(*lead, 7, 2, 6, generator=gen) * 0.5).requires_grad_()
    keys = (torch.randn(*lead, 2, 2, 5, 3, generator=gen) * 0.5).requires_grad_()
    addr = reference.pkm_address(q, keys, topk=3, score=score)
    (auto,) = torch.autograd.grad(0.7 * reference.addressing_loss(addr).sum(), keys, create_graph=True)
    closed = reference.addressing_key_grad(addr, q, keys, weight=0.7, score=score)
    torch.testing.assert_close(closed, auto, rtol=1e-12, atol=1e-12)
    u = torch.randn(auto.shape, generator=gen)
    second_auto = torch.autograd.grad((auto * u).sum(), (q, keys), retain_graph=True)
    second_closed = torch.autograd.grad((closed * u).sum(), (q, keys))
    for a, b in zip(second_closed, second_auto):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("csr", [True, False])
def test_read_and_write_products_match_their_definition_to_second_order(csr, monkeypatch):
    """`token_sum` (the read) and `row_sum` (the write), as CSR products on CPU (the write as its transpose's
    product) or as gathers, equal the plain indexing definitions, a slot read by two heads of one token
    included, in value, first- and second-order gradients (each backward is built from the other products)."""
    monkeypatch.setattr(row_products, "CSR_ON_CPU", csr)
    monkeypatch.setattr(row_products, "CSR_WRITE_ABOVE", 0)
    gen = torch.Generator().manual_seed(5)
    M, H, k, U, d = 7, 2, 3, 6, 3
    cols = torch.stack([torch.randperm(U, generator=gen)[:k] for _ in range(M * H)]).view(M, H, k)
    cols[0, 1] = cols[0, 0]                                  # one slot read by both heads of a token
    a, X, Y = (torch.randn(*shape, generator=gen).requires_grad_() for shape in ((M, H, k), (U, d), (M, d)))
    u_read, u_write = torch.randn(M, d, generator=gen), torch.randn(U, d, generator=gen)

    def loss(read, write):
        return (read * u_read).sum() + (write.sin() * u_write).sum()
    fast = loss(row_products.token_sum(a, cols, X), row_products.row_sum(a, cols, Y, U))
    plain = loss((a[..., None] * X[cols]).sum((1, 2)),
                 torch.zeros(U, d).index_add(0, cols.reshape(-1), (a[..., None] * Y[:, None, None, :]).reshape(-1, d)))
    torch.testing.assert_close(fast, plain, rtol=1e-12, atol=1e-12)
    grads = [torch.autograd.grad(f, (a, X, Y), create_graph=True) for f in (fast, plain)]
    for g_fast, g_plain in zip(*grads):
        torch.testing.assert_close(g_fast, g_plain, rtol=1e-12, atol=1e-12)
    second = [torch.autograd.grad(sum((g * g.cos()).sum() for g in gs), (a, X, Y)) for gs in grads]
    for s_fast, s_plain in zip(*second):
        torch.testing.assert_close(s_fast, s_plain, rtol=1e-11, atol=1e-12)
