"""The fused addressing kernel equals `reference.pkm_address`: ids exactly, weights and gradients to fp32 round-off.

Shapes are odd on purpose: R = sqrt(N) never a power of two, k from 1 to near R, H in {1, 2, 4}, both
scores and both softmax groupings. A new addressing option gets a case in CASES.
Tolerance: 1e-5 of the largest reference magnitude (fp32; the kernel sums in a different order, and
the IDW -log(eps + d^2) amplifies round-off where a query sits close to a sub-key).
"""
import pytest
import torch

from fwpkm_megatron.ops import reference
from fwpkm_megatron.ops.triton import address

RATIO = 1e-5

CASES = {  # M tokens, H heads, R sub-keys per codebook, d_k, k, score, joint softmax
    "M13-H1-R5-dk6-k3-idw-joint": (13, 1, 5, 6, 3, "idw", True),
    "M20-H2-R7-dk8-k1-dot-joint": (20, 2, 7, 8, 1, "dot", True),
    "M9-H4-R10-dk4-k8-idw-perhead": (9, 4, 10, 4, 8, "idw", False),
    "M17-H2-R12-dk10-k8-dot-perhead": (17, 2, 12, 10, 8, "dot", False),
    "M11-H4-R6-dk6-k3-idw-joint": (11, 4, 6, 6, 3, "idw", True),
    "M21-H1-R9-dk34-k8-idw-joint": (21, 1, 9, 34, 8, "idw", True),  # d_k/2 = 17 > one 16-wide block
}


def make(M, H, R, d_k, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = (torch.randn(M, H, d_k, generator=gen) * 0.5).to(device).requires_grad_()
    keys = (torch.randn(H, 2, R, d_k // 2, generator=gen) * 0.5).to(device).requires_grad_()
    return q, keys


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_triton_address_matches_reference(case, device, assert_close):
    M, H, R, d_k, k, score, joint = case
    q, keys = make(M, H, R, d_k, device)
    ref = reference.pkm_address(q, keys, topk=k, score=score, joint_softmax=joint)
    tri = address.pkm_address(q, keys, topk=k, score=score, joint_softmax=joint)
    assert torch.equal(tri.idx, ref.idx)
    for m in range(2):
        assert torch.equal(tri.sub_topk[m], ref.sub_topk[m])
    assert tri.top_scores is None
    assert_close("weight", ref.weight, tri.weight, RATIO)

    dw = torch.randn(ref.weight.shape, generator=torch.Generator().manual_seed(1)).to(device)
    ref_dq, ref_dk = torch.autograd.grad(ref.weight, (q, keys), dw)
    tri_dq, tri_dk = torch.autograd.grad(tri.weight, (q, keys), dw)
    assert_close("dq", ref_dq, tri_dq, RATIO)
    assert_close("dkeys", ref_dk, tri_dk, RATIO)


@pytest.mark.parametrize("case", [CASES["M13-H1-R5-dk6-k3-idw-joint"], CASES["M17-H2-R12-dk10-k8-dot-perhead"]],
                         ids=["idw", "dot"])
def test_topk_addressing_loss_matches_reference(case, device, assert_close):
    """The marginal-entropy loss from the top-k scores only equals the masked full-R reference, and so do its grads."""
    M, H, R, d_k, k, score, _ = case
    q, keys = make(M, H, R, d_k, device, seed=3)
    ref_loss = reference.addressing_loss(reference.pkm_address(q, keys, topk=k, score=score))
    top = address.pkm_address(q, keys, topk=k, score=score).sub_topk
    tri_loss = address.addressing_loss_topk(q, keys, top, score=score)
    assert_close("loss", ref_loss, tri_loss, RATIO)
    for name, a, b in zip(("dq", "dkeys"), torch.autograd.grad(ref_loss, (q, keys)),
                          torch.autograd.grad(tri_loss, (q, keys))):
        assert_close(name, a, b, RATIO)


def test_triton_address_bf16_inputs_compute_in_fp32(device, assert_close):
    """bf16 queries and keys are cast to fp32 in-kernel: equal to the fp32 reference on the same bf16 values."""
    q, keys = make(15, 2, 7, 8, device)
    qb, kb = q.detach().bfloat16(), keys.detach().bfloat16()
    ref = reference.pkm_address(qb.float(), kb.float(), topk=3)
    tri = address.pkm_address(qb, kb, topk=3)
    assert torch.equal(tri.idx, ref.idx)
    assert_close("weight", ref.weight, tri.weight.float(), 1e-2)  # the weight is stored in bf16 (q's dtype)


def test_triton_address_rejects_bad_shapes(device):
    q, keys = make(4, 1, 5, 6, device)
    with pytest.raises(ValueError, match="topk"):
        address.pkm_address(q, keys, topk=6)
    with pytest.raises(ValueError, match="d_k"):
        address.pkm_address(q[..., :4], keys, topk=2)


@pytest.mark.parametrize("case", [CASES["M13-H1-R5-dk6-k3-idw-joint"], CASES["M17-H2-R12-dk10-k8-dot-perhead"],
                                  CASES["M21-H1-R9-dk34-k8-idw-joint"]], ids=["idw", "dot", "idw-wide"])
def test_key_step_and_its_hvp_match_reference_double_backward(case, device, assert_close):
    """The fused key step grad_K L_addr and its Hessian-vector product equal torch autograd of the reference."""
    M, H, R, d_k, k, score, _ = case
    q, keys = make(M, H, R, d_k, device, seed=4)
    weight = 0.7
    ref_loss = weight * reference.addressing_loss(reference.pkm_address(q, keys, topk=k, score=score))
    (ref_kg,) = torch.autograd.grad(ref_loss, keys, create_graph=True)
    u = torch.randn(keys.shape, generator=torch.Generator().manual_seed(5)).to(device)
    ref_hq, ref_hk = torch.autograd.grad(ref_kg, (q, keys), u)

    _, _, tops, top_scores = address.address_fwd(q.detach(), keys.detach(), k, score)
    tri_kg = address.addressing_key_grad(q.detach(), keys.detach(), tops, top_scores, score=score, weight=weight)
    tri_hq, tri_hk = address.addressing_key_hvp(q.detach(), keys.detach(), tops, u, score=score, weight=weight)
    assert_close("key_grad", ref_kg, tri_kg, RATIO)
    assert_close("hvp_q", ref_hq, tri_hq, RATIO)
    assert_close("hvp_keys", ref_hk, tri_hk, RATIO)
