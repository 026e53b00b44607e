"""The FwPKM and PKM layers: fast-weight policies, ablation switches, gradient paths, state handling.

The math itself is proven in test_reference.py; here each test checks what a layer switch or policy
must (and must not) change. A new switch gets a case in `ABLATIONS`.
"""
import dataclasses
import types

import pytest
import torch

from fwpkm_megatron.config import FwPKMConfig, PKMConfig
from fwpkm_megatron.memory import (PKMMLP, FwPKMBlock, fast_weight_states, gate_histograms, memory_stats,
                                   reset_fast_weights, restore_fast_weights, snapshot_fast_weights)

HIDDEN = 24
MEGATRON_CFG = types.SimpleNamespace(hidden_size=HIDDEN, init_method_std=0.2, layernorm_epsilon=1e-5)
BASE = FwPKMConfig(num_slots=36, d_k=8, d_v=12, topk=2, chunk_size=4)


def make_block(seed=0, **changes) -> FwPKMBlock:
    torch.manual_seed(seed)
    return FwPKMBlock(MEGATRON_CFG, dataclasses.replace(BASE, **changes), layer_id=1)


def hidden(s=11, b=3, seed=1):
    return torch.randn(s, b, HIDDEN, generator=torch.Generator().manual_seed(seed))


def test_persistent_state_carries_across_forwards():
    block = make_block()
    x = hidden()
    before = block.state.snapshot()
    first = block(x)
    after = block.state.snapshot()
    assert not torch.equal(before["values"], after["values"]) and not torch.equal(before["keys"], after["keys"])
    second = block(x)
    assert not torch.allclose(first, second), "the second read must see the first forward's writes"
    assert not block.state.values.requires_grad and not block.state.keys.requires_grad


def test_per_sequence_isolates_sequences_and_keeps_state():
    block = make_block(policy="per_sequence")
    x = hidden()
    before = block.state.snapshot()
    out = block(x)
    x2 = x.clone()
    x2[:, 1] += 1.0          # change sequence 1 only
    out2 = block(x2)
    torch.testing.assert_close(out2[:, 0], out[:, 0], rtol=0, atol=0)
    torch.testing.assert_close(out2[:, 2], out[:, 2], rtol=0, atol=0)
    for key, value in block.state.snapshot().items():
        assert torch.equal(value, before[key]), f"per_sequence must not change the stored {key}"


def test_layer_is_causal_across_chunk_writes():
    block = make_block()
    snap = block.state.snapshot()
    x = hidden(s=13)
    base = block(x)
    for t in (3, 4, 10):
        block.state.restore(snap)
        x2 = x.clone()
        x2[t] += 1.0
        out = block(x2)
        torch.testing.assert_close(out[:t], base[:t], rtol=0, atol=0)


def _grad_through_writes(block):
    """Gradient of the last chunk's output w.r.t. v_proj when the output has no dense value path."""
    x = hidden(s=12)
    out = block(x)
    out[8:].square().sum().backward()
    return block.v_proj.weight.grad


def test_gradients_reach_slow_weights_through_writes():
    grad = _grad_through_writes(make_block(gate=False))   # no gate: the read is the only output path
    assert grad is not None and grad.abs().sum() > 0


def test_detach_writes_stops_gradient_through_writes():
    grad = _grad_through_writes(make_block(gate=False, detach_writes=True))
    assert grad is None or grad.abs().sum() == 0


def test_eval_mode_writes_carry_no_graph():
    block = make_block().eval()
    x = hidden().requires_grad_()
    out = block(x)
    assert out.requires_grad  # slow-weight paths still differentiable
    assert not block.state.values.requires_grad and not block.state.keys.requires_grad


def _state_after(block):
    block(hidden())
    return block.state.snapshot()


def _first_chunk_output(block):
    return block(hidden())[: block.cfg.chunk_size]


def like_pair(**changes) -> tuple[FwPKMBlock, FwPKMBlock]:
    """(default block, block with `changes`) starting from the same slow weights and fast-weight state.

    Construction draws random numbers in another order when a switch adds or removes a module (the gate)
    or changes a shape (heads), so the ablated block takes every default tensor it has: the same-shaped
    ones whole, and for more heads the default's head as its first head (q_proj rows, sub-keys). Fed the
    same input, any difference between the two is the switch's doing.
    """
    default, ablated = make_block(), make_block(**changes)
    ours = default.state_dict()
    with torch.no_grad():
        for name, tensor in ablated.state_dict().items():
            if name in ours:
                tensor[: ours[name].shape[0]].copy_(ours[name])
    return default, ablated


def _first_head(state):
    return {"keys": state["keys"][:1], "values": state["values"]}


ABLATIONS = {
    # switch: (changes, the part of the state it must change: keys, values; the other must stay equal)
    "lookahead0": (dict(lookahead=0), {"values"}),              # targets v_t instead of v_{t+1}
    "no_addr_loss": (dict(addr_loss=False), {"keys", "values"}),  # the MSE moves the keys (then the reads)
    "no_gate_weighted_loss": (dict(gate_weighted_loss=False), {"values"}),
    "no_value_zscore": (dict(value_zscore=False), {"values"}),
    "dot_scores": (dict(score="dot"), {"keys", "values"}),
    "heads4": (dict(heads=4), {"keys", "values"}),              # p_bar averages over all heads' rows
    "topk3": (dict(topk=3), {"keys", "values"}),
    "no_gate": (dict(gate=False), {"values"}),                  # loss weight 1 instead of g
    "control": ({}, set()),                                     # no switch: identical, bit for bit
}


@pytest.mark.parametrize("changes,changed", ABLATIONS.values(), ids=ABLATIONS.keys())
def test_ablation_switch_changes_the_write(changes, changed):
    """Same initial state, slow weights and input: the switch alone decides what the write changes.
    The addressing loss depends on the queries only, so switches acting on targets leave keys alone."""
    default, ablated = (_first_head(_state_after(b)) for b in like_pair(**changes))
    for part in ("keys", "values"):
        if part in changed:
            assert not torch.allclose(default[part], ablated[part], rtol=0, atol=1e-6), f"{part} unchanged"
        else:
            torch.testing.assert_close(ablated[part], default[part], rtol=0, atol=0, msg=f"{part} changed")


def _set_gate(block: FwPKMBlock, logit: float) -> None:
    """A constant gate g = sigmoid(logit) for every token."""
    with torch.no_grad():
        block.gate_proj.weight.zero_()
        block.gate_proj.bias.fill_(logit)


def test_gate_mixes_read_and_value_and_weights_the_write():
    """Eq. 12 and App. A.5: g = 1 is exactly the gateless block; g ~ 0 leaves the dense value path and
    (with gate-weighted loss) no write; a constant g scales the first chunk's write by g."""
    x = hidden()
    gated, gateless = like_pair(gate=False)
    _set_gate(gated, 30.0)                                       # sigmoid(30) == 1 in fp32
    v0 = gated.state.values.clone()
    torch.testing.assert_close(gated(x), gateless(x), rtol=0, atol=0)
    torch.testing.assert_close(gated.state.values, gateless.state.values, rtol=0, atol=0)

    closed, unweighted = like_pair(gate_weighted_loss=False)
    for block in (closed, unweighted):
        _set_gate(block, -30.0)                                  # g ~ 1e-13
    _, v, _ = closed.project(x)
    dense = closed.out_proj(closed.out_norm(v)).transpose(0, 1)  # the output without the memory
    torch.testing.assert_close(closed(x), dense, rtol=0, atol=1e-5)
    torch.testing.assert_close(closed.state.values, v0, rtol=0, atol=1e-10)   # gate-weighted: no write
    unweighted(x)
    assert (unweighted.state.values - v0).abs().max() > 1e-3     # unweighted: the write happens anyway

    one_chunk = hidden(s=BASE.chunk_size)
    deltas = {}
    for g_logit in (30.0, 0.0):                                  # g = 1 and g = 0.5
        block, _ = like_pair()
        _set_gate(block, g_logit)
        block(one_chunk)
        deltas[g_logit] = block.state.values - v0
    assert deltas[30.0].abs().max() > 1e-3
    torch.testing.assert_close(deltas[0.0], 0.5 * deltas[30.0], rtol=0, atol=1e-6)


def test_addr_loss_switch_decides_what_moves_keys():
    on, off = make_block(), make_block(addr_loss=False, addr_loss_weight=0.0)
    zero_weight = make_block(addr_loss_weight=0.0)
    k0 = on.state.keys.clone()
    _state_after(zero_weight)
    torch.testing.assert_close(zero_weight.state.keys, k0, rtol=0, atol=0)   # weight 0: keys fixed
    _state_after(off)
    assert not torch.equal(off.state.keys, k0)                               # MSE now moves the keys


def test_loss_weighting_and_lookahead_leave_first_chunk_reads_alone():
    """These switches act on writes only: the first chunk reads the initial state either way."""
    ref = _first_chunk_output(make_block())
    for changes in (dict(gate_weighted_loss=False), dict(lookahead=0), dict(addr_loss=False)):
        torch.testing.assert_close(_first_chunk_output(make_block(**changes)), ref, rtol=0, atol=0)


@pytest.mark.parametrize("gate", [True, False])
def test_project_is_each_norm_then_its_projection(gate):
    """`project` folds each norm's (1 + w) into its projection and shares one normalization and one matmul
    for q and the gate: it must equal proj(norm(x)) per input (random norm weights, float64, forward and the
    gradients of every parameter)."""
    block = make_block(gate=gate).double()
    with torch.no_grad():
        for norm in (block.q_norm, block.v_norm, *([block.gate_norm] if gate else [])):
            norm.weight.normal_(0, 0.5)
    x = hidden().double().requires_grad_()
    xb = x.transpose(0, 1)
    q, v, g = block.project(x)
    ref_q = block.q_proj(block.q_norm(xb)).view_as(q)
    v_lin = block.v_proj(block.v_norm(xb))
    ref_v = (v_lin - v_lin.mean(-1, keepdim=True)) / (v_lin.std(-1, keepdim=True) + 1e-6)
    ref = [ref_q, ref_v] + ([torch.sigmoid(block.gate_proj(block.gate_norm(xb))).squeeze(-1)] if gate else [])
    got = [q, v] + ([g] if gate else [])
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    params = [x] + [p for p in block.parameters() if p.requires_grad]
    u = [torch.randn_like(t) for t in ref]
    grads = torch.autograd.grad(sum((a * w).sum() for a, w in zip(got, u)), params, allow_unused=True)
    ref_grads = torch.autograd.grad(sum((a * w).sum() for a, w in zip(ref, u)), params, allow_unused=True)
    for a, b in zip(grads, ref_grads):
        if b is None:
            assert a is None or not a.any()
        else:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_value_zscore_switch():
    x = hidden()
    _, v_on, _ = make_block().project(x)
    _, v_off, _ = make_block(value_zscore=False).project(x)
    torch.testing.assert_close(v_on.mean(-1), torch.zeros_like(v_on[..., 0]), atol=1e-5, rtol=0)
    torch.testing.assert_close(v_on.std(-1), torch.ones_like(v_on[..., 0]), atol=1e-4, rtol=0)
    assert v_off.mean(-1).abs().max() > 1e-3


def test_gate_switch_removes_gate_and_its_statistics():
    block = make_block(gate=False)
    assert not hasattr(block, "gate_proj")
    block(hidden())
    assert "gate_mean" not in block.statistics() and block.last_gate is None


def test_snapshot_restore_and_reset_roundtrip():
    model = torch.nn.ModuleDict({"a": make_block(seed=0), "b": make_block(seed=1)})
    initial = snapshot_fast_weights(model)
    model["a"](hidden())
    model["b"](hidden())
    written = snapshot_fast_weights(model)
    reset_fast_weights(model)
    for name, state in fast_weight_states(model).items():
        for key, value in state.snapshot().items():
            assert torch.equal(value, initial[name][key])
    restore_fast_weights(model, written)
    for name, state in fast_weight_states(model).items():
        for key, value in state.snapshot().items():
            assert torch.equal(value, written[name][key])


def test_fast_weights_are_fp32_buffers_outside_parameters():
    block = make_block()
    param_names = {n for n, _ in block.named_parameters()}
    assert not any("state" in n for n in param_names)
    sd = block.state_dict()
    assert sd["state.values"].dtype == torch.float32 and sd["state.keys"].dtype == torch.float32
    block.to(torch.bfloat16)
    block.state.float()
    assert block.state.values.dtype == torch.float32


def test_memory_stats_and_gate_histograms_are_named_per_layer():
    block = make_block()
    model = torch.nn.ModuleDict({"blk": block})
    block(hidden())
    stats = memory_stats(model)
    for key in ("coverage", "collision_rate", "kl_uniform", "gate_mean"):
        assert f"memory/layer1/{key}" in stats
    assert 0 < stats["memory/layer1/coverage"] <= 1
    assert gate_histograms(model)["memory/layer1/gate"].numel() == 11 * 3


def test_static_pkm_reads_and_trains_values():
    torch.manual_seed(0)
    pkm = PKMMLP(MEGATRON_CFG, PKMConfig(num_slots=49, d_k=8, d_v=12, heads=2, topk=3))
    out, bias = pkm(hidden())
    assert bias is None and out.shape == (11, 3, HIDDEN)
    out.square().sum().backward()
    touched = pkm.values.grad.abs().sum(-1) > 0
    assert 0 < int(touched.sum()) <= 11 * 3 * 2 * 3, "only read rows get gradient"
    assert pkm.sub_keys.grad.abs().sum() > 0


def test_diagnostics_match_their_definitions_and_change_nothing():
    """addr_loss, fw_mse, read/write magnitudes of a one-chunk forward, recomputed from their definitions
    (method Eqs. 16-18; the pre-write read against the lookahead target; the stored rows' change), and
    a forward with diagnostics on equals one without, bit for bit."""
    from fwpkm_megatron import ops

    x = hidden(s=BASE.chunk_size)
    plain, block = like_pair()
    block.diagnostics = True
    v0, k0 = block.state.values.clone(), block.state.keys.clone()
    torch.testing.assert_close(block(x), plain(x), rtol=0, atol=0)
    torch.testing.assert_close(block.state.values, plain.state.values, rtol=0, atol=0)
    assert plain.last_diagnostics == {} and "fw_mse" not in plain.statistics()

    stats = block.statistics()
    with torch.no_grad():
        q, v, _ = block.project(x)
    B, T = q.shape[:2]
    addr = ops.pkm_address(q.reshape(B * T, BASE.heads, -1), k0, topk=BASE.topk)
    assert stats["addr_loss"] == pytest.approx(float(ops.addressing_loss(addr)), rel=1e-5)
    v_hat = torch.einsum("mhk,mhkd->md", addr.weight, v0[addr.idx]).view(B, T, -1)  # read before the write
    mse = (v_hat[:, :-1] - v[:, 1:]).square().mean()                                # lookahead 1
    assert stats["fw_mse"] == pytest.approx(float(mse), rel=1e-5)
    assert stats["read_abs_mean"] == pytest.approx(float(v_hat.abs().mean()), rel=1e-5)
    delta = (block.state.values - v0)[torch.unique(addr.idx)]  # a chunk's write covers every row it read
    assert stats["write_abs_mean"] == pytest.approx(float(delta.abs().mean()), rel=1e-5)
