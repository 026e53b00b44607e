"""The FwMLP baseline under parallel layouts (gloo, forked ranks): TP=2 (hidden dim split like a megatron
MLP) equals TP=1, its distributed checkpoint loads at TP=1 with the same fast MLP, and DP=2 `persistent`
replicas end every step with identical fast MLPs.

A 2-layer GPT with an FwMLP branch at layer 0; tolerance 1e-5 relative (sharded sums reorder fp32 adds).
"""
from __future__ import annotations

import torch

import megatron.core  # noqa: F401  imported once here, inherited by every forked rank
from fwpkm_megatron.config import load_config
from fwpkm_megatron.parallel.groups import init_distributed
from fwpkm_megatron.training.engine import ParallelEngine

from spawn import run_ranks

VOCAB, SEQ, STEPS, SEED, RTOL = 128, 16, 3, 1234, 1e-5
BASE = ["model.num_layers=2", "model.hidden_size=32", "model.num_attention_heads=4", "model.max_seq_len=32",
        "model.attention=swa", "model.window=8", f"model.vocab_size={VOCAB}", "fwmlp.layers=[0]", "fwmlp.d_in=16",
        "fwmlp.d_hidden=24", "fwmlp.d_v=32", "fwmlp.chunk_size=8", "fwmlp.lr=100.0", "fwmlp.gate_weighted_loss=true",
        "train.warmup_steps=1", f"train.steps={STEPS}", f"train.seq_len={SEQ}"]


def train(rank, overrides, directory=None):
    """STEPS steps on this rank's share of 4-sequence global batches -> (losses and grad norms, fast weights);
    then a distributed checkpoint into `directory`, if given."""
    from fwpkm_megatron.parallel.dist_checkpoint import save_distributed

    run = load_config(None, BASE + list(overrides))
    groups = init_distributed(run.parallel, SEED, run)
    engine = ParallelEngine(run, groups, VOCAB)
    g, out = torch.Generator().manual_seed(7), []
    for step in range(STEPS):
        batch = torch.randint(0, VOCAB, (4, SEQ + 1), generator=g)
        engine.chunks[0].window_control.begin_step(step, SEED, True)
        m = engine.train_step([batch.chunk(groups.dp)[groups.dp_rank]])
        out.append((m["train/loss"], m["train/grad_norm"], m["train/fast_weight_sync_bytes"]))
    if directory is not None:
        save_distributed(directory, engine.chunks, engine.optimizer)
    return out, fast_mlp(engine)


def fast_mlp(engine) -> dict[str, torch.Tensor]:
    return {n: b.clone() for n, b in engine.model.named_buffers() if ".fwmlp.state." in n}


def load(rank, overrides, directory):
    from fwpkm_megatron.parallel.dist_checkpoint import load_distributed

    run = load_config(None, BASE + list(overrides))
    engine = ParallelEngine(run, init_distributed(run.parallel, SEED, run), VOCAB)
    load_distributed(directory, engine.chunks, engine.optimizer)
    return fast_mlp(engine)


def test_tp2_matches_tp1_its_checkpoint_loads_at_tp1_and_dp2_replicas_stay_identical(tmp_path):
    ref = run_ranks(train, 1, [])[0]
    (tmp_path / "ckpt").mkdir()
    tp = run_ranks(train, 2, ["parallel.tp=2"], tmp_path / "ckpt")
    for step, (a, b) in enumerate(zip(ref[0], tp[0][0])):
        assert abs(a[0] - b[0]) <= RTOL * abs(a[0]) and abs(a[1] - b[1]) <= RTOL * abs(a[1]), (step, a, b)
    assert len(ref[1]) == 6
    loaded = run_ranks(load, 1, [], tmp_path / "ckpt")[0]
    for name, full in ref[1].items():
        shards = [tp[0][1][name], tp[1][1][name]]
        axis = [i for i, (x, y) in enumerate(zip(shards[0].shape, full.shape)) if x != y]
        got = torch.cat(shards, axis[0]) if axis else shards[0]
        assert axis or name.endswith("b2"), f"{name}: not split over TP"
        torch.testing.assert_close(got, full, rtol=RTOL, atol=1e-6, msg=name)
        assert torch.equal(loaded[name], got), f"{name}: the TP=2 checkpoint loads differently at TP=1"

    dp = run_ranks(train, 2, ["fwmlp.policy=persistent"])
    assert all(m[2] > 0 for m in dp[0][0])  # the fast MLPs are part of the per-step DP sync
    for name, value in dp[0][1].items():
        assert torch.equal(value, dp[1][1][name]), f"{name}: DP replicas differ"
