"""The FwMLP baseline (ops/fast_mlp.py, memory/fwmlp.py): math, causality, gradients through the writes,
state policies, recompute, config rules, training, checkpoint round-trip, and the export's refusal.

The closed-form inner gradient equals `torch.autograd.grad` of the gated, mean-reduced MSE; the scan
equals an autograd-stepped scan (create_graph=True, i.e. double backward) forward and backward, and
passes float64 `gradcheck` across three chunks, so the LM loss sees exactly the paper's update.
"""
from __future__ import annotations

import dataclasses
import io
import types

import pytest
import torch

from fwpkm_megatron.config import ConfigError, FwMLPConfig, fast_weight_policy, load_config
from fwpkm_megatron.memory import (FwMLPBlock, fast_weight_states, gate_histograms, memory_stats,
                                   reset_fast_weights, restore_fast_weights, snapshot_fast_weights)
from fwpkm_megatron.ops import FastMLP, fwmlp_scan
from fwpkm_megatron.ops.fast_mlp import fast_mlp_grad, swiglu

HIDDEN = 24
MEGATRON_CFG = types.SimpleNamespace(hidden_size=HIDDEN, init_method_std=0.2, layernorm_epsilon=1e-5)
BASE = FwMLPConfig(d_in=8, d_hidden=20, d_v=12, chunk_size=4, lr=0.5)
D_IN, D_HID, D_V = 5, 7, 6  # odd shapes for the op-level checks


def fast_weights(seed=0, dtype=torch.float64, requires_grad=False) -> FastMLP:
    g = torch.Generator().manual_seed(seed)
    shapes = [(D_HID, D_IN), (D_HID,), (D_HID, D_IN), (D_HID,), (D_V, D_HID), (D_V,)]
    return FastMLP(*(torch.randn(s, generator=g, dtype=dtype).mul(0.7).requires_grad_(requires_grad) for s in shapes))


def scan_inputs(B=2, T=11, seed=1, dtype=torch.float64, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, D_IN, generator=g, dtype=dtype)
    v = torch.randn(B, T, D_V, generator=g, dtype=dtype)
    lw = torch.rand(B, T, generator=g, dtype=dtype)
    return tuple(t.requires_grad_(requires_grad) for t in (q, v, lw))


def autograd_scan(q, v, lw, p: FastMLP, *, chunk_size, lookahead, lr):
    """An independent scan: the inner step by autograd.grad of the loss with create_graph (double backward)."""
    B, T, _ = q.shape
    outs = []
    for start in range(0, T, chunk_size):
        end = min(start + chunk_size, T)
        outs.append(swiglu(q[:, start:end], p))
        n = end - start - lookahead
        if n <= 0:
            continue
        y = swiglu(q[:, start:start + n], p)
        err = (y - v[:, start + lookahead:end]).square().mean(-1)                 # mean over features
        loss = 0.5 * (lw[:, start:start + n] * err).sum() / (B * n)             # mean over the B*n tokens
        grads = torch.autograd.grad(loss, p, create_graph=True)
        p = FastMLP(*(w - lr * g for w, g in zip(p, grads)))
    return torch.cat(outs, 1), p


def make_block(seed=0, **changes) -> FwMLPBlock:
    torch.manual_seed(seed)
    return FwMLPBlock(MEGATRON_CFG, dataclasses.replace(BASE, **changes), layer_id=1)


def hidden(s=11, b=3, seed=1):
    return torch.randn(s, b, HIDDEN, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------- the math

def test_closed_form_gradient_equals_autograd_of_the_loss():
    p = fast_weights(requires_grad=True)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(9, D_IN, generator=g, dtype=torch.float64)
    target = torch.randn(9, D_V, generator=g, dtype=torch.float64)
    weight = torch.rand(9, generator=g, dtype=torch.float64)
    loss = 0.5 * (weight[:, None] * (swiglu(x, p) - target).square()).sum()
    expected = torch.autograd.grad(loss, p)
    for name, got, want in zip(FastMLP._fields, fast_mlp_grad(x, p, target, weight), expected):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("lookahead", [0, 1])
def test_scan_equals_autograd_stepped_scan_forward_and_backward(lookahead):
    kw = dict(chunk_size=4, lookahead=lookahead, lr=0.3)
    q, v, lw = scan_inputs(requires_grad=True)
    p = fast_weights(requires_grad=True)
    y, new = fwmlp_scan(q, v, lw, p, **kw)
    y_ref, new_ref = autograd_scan(q, v, lw, p, **kw)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(new, new_ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    cot = torch.randn_like(y)
    inputs = (q, v, lw, *p)
    got = torch.autograd.grad((y * cot).sum() + sum(w.square().sum() for w in new), inputs)
    want = torch.autograd.grad((y_ref * cot).sum() + sum(w.square().sum() for w in new_ref), inputs)
    for i, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=f"input {i}")


def test_scan_gradcheck_through_three_chunks():
    q, v, lw = scan_inputs(B=1, T=9, requires_grad=True)
    p = fast_weights(requires_grad=True)

    def f(q, v, lw, *weights):
        y, new = fwmlp_scan(q, v, lw, FastMLP(*weights), chunk_size=3, lookahead=1, lr=0.2)
        return y, new.w2, new.b1

    assert torch.autograd.gradcheck(f, (q, v, lw, *p), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_no_read_sees_its_own_chunk_or_later_chunks():
    q, v, lw = scan_inputs(T=12)
    p = fast_weights()
    y, _ = fwmlp_scan(q, v, lw, p, chunk_size=4, lookahead=1, lr=0.5)
    t, start = 6, 4  # a token inside chunk 1
    q2, v2, lw2 = q.clone(), v.clone(), lw.clone()
    q2[:, start:t] += 1.0
    q2[:, t + 1:] += 1.0
    v2[:, start:] += 1.0
    lw2[:, start:] = 1.0
    y2, _ = fwmlp_scan(q2, v2, lw2, p, chunk_size=4, lookahead=1, lr=0.5)
    torch.testing.assert_close(y2[:, :start], y[:, :start], rtol=0, atol=0)
    torch.testing.assert_close(y2[:, t], y[:, t], rtol=0, atol=0)
    assert not torch.allclose(y2[:, 8:], y[:, 8:]), "chunk 2 must read chunk 1's write"


def test_per_sequence_scan_is_each_sequence_alone():
    q, v, lw = scan_inputs(B=3)
    p = fast_weights()
    y, new = fwmlp_scan(q, v, lw, p, chunk_size=4, per_sequence=True)
    assert all(a is b for a, b in zip(new, p))
    for b in range(3):
        alone, _ = fwmlp_scan(q[b:b + 1], v[b:b + 1], lw[b:b + 1], p, chunk_size=4)
        torch.testing.assert_close(y[b:b + 1], alone, rtol=0, atol=0)


def test_detach_writes_cuts_the_gradient_through_the_writes():
    q, v, lw = scan_inputs(requires_grad=True)
    y, _ = fwmlp_scan(q, v, lw, fast_weights(), chunk_size=4, detach_writes=True)
    grads = torch.autograd.grad(y.sum(), (q, v, lw), allow_unused=True)
    assert grads[1] is None and grads[2] is None  # targets and weights reach y only through the writes
    y, _ = fwmlp_scan(q, v, lw, fast_weights(), chunk_size=4)
    assert all(g.abs().sum() > 0 for g in torch.autograd.grad(y.sum(), (q, v, lw)))


# ------------------------------------------------------------------------------------- the layer

def test_persistent_state_carries_and_per_sequence_keeps_it():
    block, x = make_block(), hidden()
    before = block.state.snapshot()
    first = block(x)
    assert all(not torch.equal(before[k], v) for k, v in block.state.snapshot().items() if k.startswith("w"))
    assert not torch.allclose(block(x), first), "the second read must see the first forward's writes"
    block = make_block(policy="per_sequence")
    before = block.state.snapshot()
    out = block(x)
    x2 = x.clone()
    x2[:, 1] += 1.0
    out2 = block(x2)
    torch.testing.assert_close(out2[:, [0, 2]], out[:, [0, 2]], rtol=0, atol=0)
    for key, value in block.state.snapshot().items():
        assert torch.equal(value, before[key]), f"per_sequence must not change the stored {key}"


def test_layer_output_never_depends_on_later_tokens():
    block = make_block()
    snap = block.state.snapshot()
    x = hidden(s=13)
    base = block(x)
    for t in (0, 3, 6, 11):
        block.state.restore(snap)
        x2 = x.clone()
        x2[t + 1:] += torch.randn_like(x2[t + 1:])
        torch.testing.assert_close(block(x2)[:t + 1], base[:t + 1], rtol=0, atol=0)


def test_gradients_reach_slow_weights_through_writes_and_eval_keeps_no_graph():
    block = make_block(gate_weighted_loss=True)
    x = hidden(s=12)
    out = block(x)
    # only chunk 2's reads depend on the writes; v_proj reaches them through the targets and the mix
    grads = torch.autograd.grad(out[8:].sum(), [block.q_proj.weight, block.v_proj.weight, block.gate_proj.weight])
    assert all(g.abs().sum() > 0 for g in grads)
    block.eval()
    with torch.enable_grad():
        out = block(x)
    assert all(not t.requires_grad for t in block.state.fast())
    block.train()
    detached = make_block(detach_writes=True, gate=False)
    out = detached(x)
    (g_first,) = torch.autograd.grad(out[:4].sum(), detached.q_proj.weight)
    assert g_first.abs().sum() > 0


def test_fast_weights_are_fp32_buffers_with_snapshot_restore_reset():
    block = make_block()
    names = {n for n, _ in block.named_parameters()}
    assert not any(n.startswith("state.") for n in names)
    assert {f"state.{n}" for n in FastMLP._fields} <= set(block.state_dict())
    assert all(t.dtype == torch.float32 for t in block.state.fast())
    initial = snapshot_fast_weights(block)
    block(hidden())
    changed = snapshot_fast_weights(block)
    reset_fast_weights(block)
    for k, v in snapshot_fast_weights(block)["state"].items():
        assert torch.equal(v, initial["state"][k]), k
    restore_fast_weights(block, changed)
    for k, v in snapshot_fast_weights(block)["state"].items():
        assert torch.equal(v, changed["state"][k]), k
    assert list(fast_weight_states(block)) == ["state"]
    assert set(memory_stats(block)) == {"memory/fwmlp_layer1/gate_mean"}
    assert set(gate_histograms(block)) == {"memory/fwmlp_layer1/gate"}


def test_full_recompute_writes_once_and_matches_plain_backward():
    from fwpkm_megatron.config import FwPKMConfig, ModelConfig, RunConfig
    from fwpkm_megatron.memory import FwMLPBlock
    from fwpkm_megatron.model import build_model, transformer_config
    from fwpkm_megatron.parallel import groups

    run = RunConfig(model=ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64,
                                      max_seq_len=32, attention="full"),
                    fwpkm=FwPKMConfig(layers=[]), fwmlp=dataclasses.replace(BASE, layers=[0, 1]))
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(12).expand(2, 12)
    results = []
    try:
        for overrides in ({}, dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)):
            groups.init_single_process(1234)
            model = build_model(run, 64, config=transformer_config(run, **overrides)).train()
            for _ in range(2):  # the second step reads the first one's write
                model.zero_grad()
                model(ids, pos, None, labels=ids).mean().backward()
            blocks = [m for m in model.modules() if isinstance(m, FwMLPBlock)]
            assert len(blocks) == 2 and all(not b._recompute_stash for b in blocks)
            results.append((torch.cat([p.grad.flatten() for p in model.parameters()]),
                            torch.cat([t.flatten() for b in blocks for t in b.state.fast()])))
    finally:
        groups.teardown()
    torch.testing.assert_close(results[1][0], results[0][0], rtol=0, atol=0)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=0, atol=0)


# ------------------------------------------------------------------------------------- config

@pytest.mark.parametrize("overrides, needle", [
    (["fwmlp.layers=[0]", "fwpkm.layers=[0]"], "at most one fast-weight branch"),
    (["fwmlp.layers=[5]"], "fwmlp.layers=[5]: ids [5] outside"),
    (["fwmlp.layers=[1]", "fwpkm.layers=[0]", "fwmlp.policy=per_sequence"], "must equal fwpkm.policy"),
    (["fwmlp.layers=[0]", "fwmlp.d_hidden=30", "parallel.tp=4"], "parallel.tp=4: must divide fwmlp.d_hidden=30"),
    (["fwmlp.gate=false", "fwmlp.gate_weighted_loss=true"], "needs fwmlp.gate=true"),
    (["fwmlp.d_hidden=0", "fwmlp.lookahead=2"], "fwmlp.d_hidden=0: must be >= 1"),
    (["fwmlp.policy=episodic"], "fwmlp.policy='episodic'"),
])
def test_config_rules(overrides, needle):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert needle in str(err.value), str(err.value)


def test_fast_weight_policy_follows_the_layers_that_exist():
    assert fast_weight_policy(load_config(None, ["fwmlp.layers=[0]", "fwmlp.policy=per_sequence"])) == "per_sequence"
    assert fast_weight_policy(load_config(None, ["fwpkm.layers=[0]", "fwpkm.policy=persistent_local"])) == \
        "persistent_local"


def test_paper_recipe_loads():
    run = load_config("configs/paper-fwmlp-112m.yaml")
    assert run.fwmlp.layers == [2, 6, 10] and not run.fwpkm.layers and not run.pkm.layers
    assert (run.fwmlp.d_in, run.fwmlp.d_hidden, run.fwmlp.d_v, run.fwmlp.lr) == (512, 2304, 512, 0.1)


# ----------------------------------------------------------------------------- training smoke

def test_training_loss_falls_resume_restores_fast_mlp_and_export_refuses(tiny_run, tmp_path):
    from fwpkm_megatron.training import Trainer

    fwmlp = ("fwpkm.layers=[]", "fwmlp.layers=[0]", "fwmlp.d_in=16", "fwmlp.d_hidden=24", "fwmlp.d_v=32",
             "fwmlp.chunk_size=8", "train.steps=24", "train.warmup_steps=3", "train.save_every=12",
             "train.log_every=12", "train.eval_batches=1")

    def train(run_dir, stop_at=None):
        trainer = Trainer(tiny_run(run_dir, *fwmlp), console=io.StringIO())
        try:
            return trainer, trainer.train(stop_at=stop_at)
        finally:
            trainer.close()

    ref, summary = train(tmp_path / "ref")
    from fwpkm_megatron.export import ExportError, export_checkpoint
    with pytest.raises(ExportError, match=r"FwMLP layers \(fwmlp.layers=\[0\]\).*not the FwMLP baseline"):
        export_checkpoint(tmp_path / "ref", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    assert summary["final_loss_mean_last_10"] < summary["losses"][0] - 0.4, summary["losses"]
    train(tmp_path / "resumed", stop_at=12)
    resumed, again = train(tmp_path / "resumed")
    assert again["resumed_from_step"] == 12 and again["losses"] == summary["losses"]
    want, got = ref.state_dict()["model"], resumed.state_dict()["model"]
    fast = [k for k in want if ".fwmlp.state." in k]
    assert len(fast) == 6
    for key in want:
        if isinstance(want[key], torch.Tensor):  # megatron's _extra_state entries are None
            assert torch.equal(want[key], got[key]), key
