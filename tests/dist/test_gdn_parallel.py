"""The Gated DeltaNet mixer (megatron-core's GatedDeltaNet, `model.mixer: gdn`) under parallel layouts (gloo,
forked ranks): TP=2 (GDN heads split, megatron's per-part in_proj layout), PP=2 (1F1B) and full activation
recomputation each equal one process, from the same layout-independent initial weights (model/gdn.py);
a TP=2 distributed checkpoint loads at TP=1 with every GDN tensor in the TP=1 layout (megatron's per-part
sharded_state_dict).

A 4-layer GDN hybrid (attention at layer 3, FwPKM branch before the GDN mixer of layer 1), 3 AdamW steps of
2 micro-batches. Tolerance 1e-5 relative (sharded sums and all-reduces reorder fp32 additions).
"""
from __future__ import annotations

import torch

import megatron.core  # noqa: F401  imported once here, inherited by every forked rank
from fwpkm_megatron.config import load_config
from fwpkm_megatron.parallel.groups import init_distributed
from fwpkm_megatron.training.engine import ParallelEngine

from spawn import run_ranks

VOCAB, SEQ, STEPS, SEED, RTOL = 128, 24, 3, 1234, 1e-5
BASE = ["model.num_layers=4", "model.hidden_size=32", "model.num_attention_heads=4", "model.max_seq_len=32",
        "model.attention=swa", "model.window=8", f"model.vocab_size={VOCAB}", "model.mixer=gdn",
        "model.attention_layers=[3]", "model.gdn_num_key_heads=2", "model.gdn_num_value_heads=4",
        "model.gdn_key_head_dim=8", "model.gdn_value_head_dim=6", "fwpkm.layers=[1]", "fwpkm.num_slots=64",
        "fwpkm.d_k=16", "fwpkm.d_v=32", "fwpkm.topk=2", "fwpkm.chunk_size=8", "parallel.num_microbatches=2",
        "train.warmup_steps=1", f"train.steps={STEPS}", f"train.seq_len={SEQ}"]


def train(rank, overrides, directory=None):
    """STEPS steps on 4-sequence batches in 2 micro-batches -> ([(loss, grad norm)], {GDN tensor: initial value},
    {GDN tensor: final value}); then a distributed checkpoint into `directory`, if given."""
    from fwpkm_megatron.parallel.dist_checkpoint import save_distributed

    run = load_config(None, BASE + list(overrides))
    groups = init_distributed(run.parallel, SEED, run)
    engine = ParallelEngine(run, groups, VOCAB)
    initial = gdn_tensors(engine)
    g, out = torch.Generator().manual_seed(7), []
    for step in range(STEPS):
        batch = torch.randint(0, VOCAB, (4, SEQ + 1), generator=g)
        for chunk in engine.chunks:
            chunk.window_control.begin_step(step, SEED, True)
        m = engine.train_step(list(batch.chunk(2)))
        out.append((m["train/loss"], m["train/grad_norm"]))
    if directory is not None:
        save_distributed(directory, engine.chunks, engine.optimizer)
    return out, initial, gdn_tensors(engine)


def load(rank, directory):
    from fwpkm_megatron.parallel.dist_checkpoint import load_distributed

    run = load_config(None, BASE)
    engine = ParallelEngine(run, init_distributed(run.parallel, SEED, run), VOCAB)
    load_distributed(directory, engine.chunks, engine.optimizer)
    return gdn_tensors(engine)


def gdn_tensors(engine) -> dict[str, torch.Tensor]:
    """Layer 0's GDN tensors (on the first stage), for the layout-independent init check."""
    return {n: p.detach().clone() for n, p in engine.model.named_parameters()
            if "decoder.layers.0.self_attention." in n}


def assert_metrics_close(ref, got, what):
    for step, (a, b) in enumerate(zip(ref, got)):
        for name, x, y in (("loss", a[0], b[0]), ("grad_norm", a[1], b[1])):
            assert abs(x - y) <= RTOL * abs(x), f"{what}: step {step} {name} {y} vs reference {x}"


def full_from_tp(name, shards, parts):
    """The TP=1 tensor from two ranks' GDN tensors (inverse of `model.gdn.tp_rows` and the plain splits)."""
    part = next((p for suffix, p in parts.items() if name.endswith(suffix)), None)
    if part is not None:
        local = [s.split([n // 2 for n in part]) for s in shards]
        return torch.cat([torch.cat([local[0][i], local[1][i]]) for i in range(len(part))])
    if name.endswith("out_proj.weight"):
        return torch.cat(shards, 1)
    if name.endswith(("A_log", "dt_bias")):
        return torch.cat(shards)
    return shards[0]


def test_gdn_tp2_and_pp2_match_one_process(tmp_path):
    from fwpkm_megatron.model.gdn import tp_rows

    ref = run_ranks(train, 1, [])[0]
    tp = run_ranks(train, 2, ["parallel.tp=2"], tmp_path)
    assert_metrics_close(ref[0], tp[0][0], "GDN TP=2 vs TP=1")
    parts = {"in_proj.weight": [16, 16, 24, 24, 4, 4], "conv1d.weight": [16, 16, 24]}
    for name, full in ref[1].items():  # each rank holds its slice of the TP=1 draw
        part = next((p for suffix, p in parts.items() if name.endswith(suffix)), None)
        for rank in range(2):
            local = tp[rank][1][name]
            if part is not None:
                want = tp_rows(full, part, rank, 2)
            elif name.endswith("out_proj.weight"):
                want = full.chunk(2, dim=1)[rank]
            elif name.endswith(("A_log", "dt_bias")):
                want = full.chunk(2)[rank]
            else:
                want = full
            assert torch.equal(local, want), f"{name}: TP rank {rank} does not hold its slice of the TP=1 draw"
    loaded = run_ranks(load, 1, tmp_path)[0]
    for name, value in loaded.items():  # trained at TP=2, loaded at TP=1: megatron's TP=1 layout
        assert torch.equal(value, full_from_tp(name, [tp[0][2][name], tp[1][2][name]], parts)), name

    pp = run_ranks(train, 2, ["parallel.pp=2"])
    assert_metrics_close(ref[0], pp[0][0], "GDN PP=2 vs PP=1")
    assert pp[0][0] == pp[1][0]
    recompute = run_ranks(train, 1, ["parallel.recompute=true"])[0]
    assert_metrics_close(ref[0], recompute[0], "GDN with full recompute vs without")
