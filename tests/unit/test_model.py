"""The megatron-core GPT (`fwpkm_megatron.model`) and its CPU compatibility layer, in one process on CPU.

Proves: the model trains (finite per-token loss and gradients) with FwPKM and PKM layers; memory layers
sit exactly at the configured 0-indexed layer ids, also in a pipeline stage's slice of the spec; sliding
windows bound the receptive field to L*(W-1) tokens while full attention does not; no position ever
sees a later token; the pSWA draw depends only on (seed, step); `mcore_cpu.apply()` is idempotent and the
RNG tracker works on CPU. A new model-level property goes here; memory-layer math and memory causality
are tested with the memory modules.
"""
from __future__ import annotations

import random

import pytest
import torch

from fwpkm_megatron.config import FwPKMConfig, ModelConfig, PKMConfig, RunConfig
from fwpkm_megatron.parallel import groups, mcore_cpu

SEED = 1234
VOCAB = 64


@pytest.fixture(scope="module", autouse=True)
def single_process():
    groups.init_single_process(SEED)
    yield
    groups.teardown()


def tiny_run(*, attention="full", window=4, pswa_prob=0.9, num_layers=2, fwpkm_layers=(), pkm_layers=()):
    model = ModelConfig(num_layers=num_layers, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64,
                        max_seq_len=32, attention=attention, window=window, pswa_prob=pswa_prob)
    fwpkm = FwPKMConfig(layers=list(fwpkm_layers), num_slots=16, d_k=8, d_v=16, topk=2, chunk_size=8)
    pkm = PKMConfig(layers=list(pkm_layers), num_slots=16, d_k=8, d_v=16, heads=2, topk=2)
    return RunConfig(model=model, fwpkm=fwpkm, pkm=pkm)


def build(run, seed=SEED):
    from fwpkm_megatron.model import build_model
    groups.init_single_process(seed)  # reseeds megatron's tracker and the default generator
    return build_model(run, VOCAB)


def tokens(b=2, s=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (b, s), generator=g)
    return ids, torch.arange(s).expand(b, s)


def logits(model, ids, pos):
    with torch.no_grad():
        return model(ids, pos, None)  # [b, s, V]


def test_forward_backward_with_memory_layers_gives_finite_per_token_loss():
    model = build(tiny_run(num_layers=3, fwpkm_layers=[0, 2], pkm_layers=[1], attention="swa"))
    model.train()
    ids, pos = tokens(s=20)
    labels = torch.roll(ids, -1, dims=1)
    loss = model(ids, pos, None, labels=labels)
    assert loss.shape == ids.shape and loss.dtype == torch.float32
    assert torch.isfinite(loss).all()
    loss.mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values()), \
        [n for n, g in grads.items() if g is None or not torch.isfinite(g).all()]
    for name in ("decoder.layers.0.fwpkm.q_proj.weight", "decoder.layers.1.mlp.values"):
        assert grads[name].abs().sum() > 0, name  # gradients reach the memory slow weights


def test_memory_layers_sit_at_configured_layer_ids():
    from megatron.core.transformer.mlp import MLP

    from fwpkm_megatron.memory.fwpkm import FwPKMBlock
    from fwpkm_megatron.memory.pkm import PKMMLP
    from fwpkm_megatron.model.attention import FusedWindowedAttention

    fwpkm_layers, pkm_layers = [0, 2], [2, 3]
    model = build(tiny_run(num_layers=4, fwpkm_layers=fwpkm_layers, pkm_layers=pkm_layers))
    for i, layer in enumerate(model.decoder.layers):
        assert layer.layer_number - 1 == layer.layer_id == i
        if i in fwpkm_layers:
            assert isinstance(layer.fwpkm, FwPKMBlock) and layer.fwpkm.layer_id == i
        else:
            assert layer.fwpkm is None
        assert type(layer.mlp) is (PKMMLP if i in pkm_layers else MLP)
        core = layer.self_attention.core_attention
        assert isinstance(core, FusedWindowedAttention) and core.window_control is model.window_control


def test_pipeline_stage_spec_matches_its_slice_of_the_global_layer_ids():
    from fwpkm_megatron.memory.pkm import PKMMLP
    from fwpkm_megatron.model.attention import WindowControl
    from fwpkm_megatron.model.gpt import transformer_config
    from fwpkm_megatron.model.specs import block_spec

    run = tiny_run(num_layers=4, pkm_layers=[1, 2])
    config = transformer_config(run, pipeline_model_parallel_size=2)
    ctl = WindowControl.from_config(run.model)
    for pp_rank, global_ids in ((0, [0, 1]), (1, [2, 3])):
        specs = block_spec(run, config, ctl, pp_rank=pp_rank).layer_specs
        is_pkm = [getattr(s.submodules.mlp, "module", None) is PKMMLP for s in specs]
        assert is_pkm == [i in run.pkm.layers for i in global_ids], pp_rank


def test_sliding_window_bounds_receptive_field_and_full_attention_does_not():
    # pSWA with p=1 windows every training step and uses full attention in eval: one model, both modes.
    L, W, S = 2, 4, 16
    model = build(tiny_run(attention="pswa", pswa_prob=1.0, window=W, num_layers=L)).eval()
    ctl = model.window_control
    ids, pos = tokens(s=S)
    changed_ids = ids.clone()
    changed_ids[:, 0] = (ids[:, 0] + 1) % VOCAB
    reach = L * (W - 1)  # token 0 reaches positions 0..reach

    assert ctl.begin_step(step=0, seed=SEED, training=True) == W
    diff = (logits(model, ids, pos) - logits(model, changed_ids, pos)).abs().amax(dim=(0, 2))  # [s]
    # Masked keys get score -10000 and exactly zero weight, so unreachable positions are bit-equal
    # up to BLAS determinism; 1e-6 leaves room for that, far below the 1e-4 effects asserted below.
    assert diff[reach + 1:].max() <= 1e-6
    assert diff[reach] > 1e-4  # the bound is tight: the last reachable position does change

    assert ctl.begin_step(step=0, seed=SEED, training=False) is None
    diff = (logits(model, ids, pos) - logits(model, changed_ids, pos)).abs().amax(dim=(0, 2))
    assert (diff[reach + 1:] > 1e-4).all()


@pytest.mark.parametrize("attention", ["full", "swa"])
def test_logits_never_depend_on_later_tokens(attention):
    model = build(tiny_run(attention=attention, num_layers=2)).eval()
    ids, pos = tokens(s=16)
    base = logits(model, ids, pos)
    for t in (1, 7, 15):
        changed_ids = ids.clone()
        changed_ids[:, t] = (ids[:, t] + 1) % VOCAB
        out = logits(model, changed_ids, pos)
        torch.testing.assert_close(out[:, :t], base[:, :t], rtol=0, atol=1e-6)  # see the SWA test on 1e-6
        assert (out[:, t] - base[:, t]).abs().max() > 1e-4


def test_pswa_draw_depends_only_on_seed_and_step():
    from fwpkm_megatron.model.attention import WindowControl

    cfg = ModelConfig(attention="pswa", window=8, pswa_prob=0.9)
    a, b = WindowControl.from_config(cfg), WindowControl.from_config(cfg)
    draws = [a.begin_step(step, seed=7, training=True) for step in range(200)]
    random.seed(0)
    torch.manual_seed(0)  # the global RNGs play no part
    assert [b.begin_step(step, seed=7, training=True) for step in range(200)] == draws
    assert b.begin_step(123, seed=7, training=True) == draws[123]  # a resumed run repeats the draw
    assert set(draws) == {8, None}
    windowed = sum(w == 8 for w in draws) / len(draws)
    assert 0.82 <= windowed <= 0.97  # p = 0.9; 200 draws have std 0.021, so this is about 4 sigma
    assert [a.begin_step(step, seed=8, training=True) for step in range(200)] != draws
    assert all(a.begin_step(step, seed=7, training=False) is None for step in range(200))


def test_window_control_modes():
    from fwpkm_megatron.model.attention import WindowControl

    full, swa = WindowControl("full", 8), WindowControl("swa", 8)
    assert full.window is None and swa.window == 8
    for training in (True, False):
        assert full.begin_step(3, seed=1, training=training) is None
        assert swa.begin_step(3, seed=1, training=training) == 8
    assert WindowControl("pswa", 8, 0.0).begin_step(3, seed=1, training=True) is None
    with pytest.raises(ValueError):
        WindowControl("sliding", 8)


def test_same_seed_builds_identical_weights():
    run = tiny_run(num_layers=2, fwpkm_layers=[1], pkm_layers=[0])
    first, second = build(run).state_dict(), build(run).state_dict()
    assert first.keys() == second.keys()
    for key, value in first.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, second[key]), key


def test_full_recompute_matches_plain_backward():
    # megatron's CheckpointFunction saves and restores the RNG through mcore_cpu's CPU stand-ins; with
    # dropout on, the recomputed forward matches only if it redraws the same masks.
    # No FwPKM here: its state writes under recompute are the memory module's concern.
    from fwpkm_megatron.model import build_model, transformer_config

    run = tiny_run(attention="swa", num_layers=2, pkm_layers=[1])
    run.model.num_query_groups = 2  # GQA through the same core attention
    ids, pos = tokens()
    grads = []
    recompute = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    for overrides in ({}, recompute):
        groups.init_single_process(SEED)
        config = transformer_config(run, hidden_dropout=0.1, attention_dropout=0.1, **overrides)
        model = build_model(run, VOCAB, config=config).train()
        model(ids, pos, None, labels=ids).mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)


def test_rng_tracker_fork_leaves_default_stream_unchanged():
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    groups.init_single_process(SEED)
    expected = torch.rand(4)
    groups.init_single_process(SEED)
    with get_cuda_rng_tracker().fork():
        forked = torch.rand(4)
    assert torch.equal(torch.rand(4), expected)
    assert not torch.equal(forked, expected)


def test_mcore_cpu_apply_is_idempotent(monkeypatch):
    import megatron.core.models.common.embeddings.rotary_pos_embedding as rope
    from megatron.core.tensor_parallel import random as mcore_random

    mcore_cpu.apply()
    before = (rope.torch, mcore_random._get_cuda_rng_state, mcore_random._set_cuda_rng_state)
    mcore_cpu.apply()
    assert (rope.torch, mcore_random._get_cuda_rng_state, mcore_random._set_cuda_rng_state) == before
    assert mcore_cpu.is_applied() == (not torch.cuda.is_available())
    if not torch.cuda.is_available():
        assert rope.torch.cuda.current_device() == torch.device("cpu")
        assert rope.torch.zeros(2, device="cuda").device.type == "cpu"
        assert torch.__dict__["cuda"] is not rope.torch.cuda  # torch itself is untouched

    # With CUDA present, apply() patches nothing.
    monkeypatch.setattr(mcore_cpu, "_applied", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(rope, "torch", torch)
    mcore_cpu.apply()
    assert rope.torch is torch and not mcore_cpu.is_applied()
