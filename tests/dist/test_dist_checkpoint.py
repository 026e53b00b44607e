"""Distributed checkpoints (megatron dist_checkpointing) load at another TP x PP x DP layout.

What this proves, on the 2-layer GPT of test_parallel.py (FwPKM branch in layer 0, static PKM MLP in
layer 1), with 2 micro-batches per step so every layout runs the same computation:
- saved at TP=2 x PP=1 after 2 AdamW steps, loaded at TP=1 x PP=2 and at TP=1 in one process: the model,
  the fast weights and the AdamW state reassemble exactly, the eval loss equals the saving run's, and the
  next 2 training steps give the losses of the saving run continuing (1e-5 relative);
- TP=2 -> TP=2: every rank gets back exactly its own columns of every sharded tensor (a load that treats
  a column shard as replicated gives rank 1 rank 0's columns, silently);
- `persistent_local` at DP=2: both replicas' (different) memories come back, each to its rank, and a
  load at DP=1 fails saying why;
- the Trainer: a run stopped at TP=2 resumes at PP=2 (data position, step, optimizer) and equals the
  uninterrupted TP=2 run; a ZeRO-1 checkpoint resumes at another layout with a fresh optimizer (said so).
A new layout pair gets a worker call in the test of its kind. Ranks are forked (tests/dist/spawn.py).
"""
from __future__ import annotations

import io
import json
import shutil

import pytest
import torch

import deepspeed  # noqa: F401  imported once here (with megatron-core), inherited by every forked rank
import megatron.core  # noqa: F401

from spawn import run_ranks
from test_parallel import SEED, build, global_batches

RTOL = 1e-5
SAVE_AT = 2  # steps before the checkpoint; the test continues STEPS - SAVE_AT more


def _steps(engine, groups, batches, first_step, microbatches):
    out = []
    for step, batch in enumerate(batches, start=first_step):
        for chunk in engine.chunks:
            chunk.window_control.begin_step(step, SEED, True)
        mine = batch.chunk(groups.dp)[groups.dp_rank].chunk(microbatches)
        out.append(engine.train_step(list(mine))["train/loss"])
    return out


def _eval(engine, batch):
    from fwpkm_megatron.memory import restore_fast_weights, snapshot_fast_weights

    for chunk in engine.chunks:
        chunk.eval()
        chunk.window_control.begin_step(SAVE_AT, SEED, False)
    snap = snapshot_fast_weights(engine.model)
    loss = engine.eval_loss(batch)
    restore_fast_weights(engine.model, snap)
    return loss


def _named_state(engine) -> dict[str, torch.Tensor]:
    """Every model tensor and AdamW moment of this rank, by name (a copy)."""
    out = {f"model.{k}": v.detach().clone() for k, v in engine.model.state_dict().items() if torch.is_tensor(v)}
    from fwpkm_megatron.parallel.dist_checkpoint import adamw_view

    names = dict((id(p), n) for n, p in engine.model.named_parameters())
    adamw, pairs = adamw_view(engine.optimizer)  # megatron's optimizer wraps torch AdamW
    for p, main in pairs:
        for k in ("exp_avg", "exp_avg_sq"):
            out[f"adam.{k}.{names[id(p)]}"] = adamw.state[main][k].clone()
    return out


def save_then_continue(rank, overrides, directory, microbatches=2):
    """Train SAVE_AT steps, save, perturb everything, load back (exact?), eval, train the remaining steps."""
    from fwpkm_megatron.parallel.dist_checkpoint import load_distributed, save_distributed

    run, groups, engine = build(list(overrides) + [f"parallel.num_microbatches={microbatches}"])
    batches = global_batches(4 * microbatches * groups.dp)
    _steps(engine, groups, batches[:SAVE_AT], 0, microbatches)
    if rank == 0:
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
    torch.distributed.barrier()
    save_distributed(directory, engine.chunks, engine.optimizer)
    saved = _named_state(engine)
    with torch.no_grad():  # anything that is not loaded back shows up as a mismatch
        for t in list(engine.model.parameters()) + list(engine.model.buffers()):
            t.add_(1.0)
        for s in engine.optimizer.chained_optimizers[0].optimizer.state.values():
            s["exp_avg"].add_(1.0)
    load_distributed(directory, engine.chunks, engine.optimizer)
    reloaded = _named_state(engine)
    mismatched = [k for k in saved if not torch.equal(saved[k], reloaded[k])]
    eval_loss = _eval(engine, batches[-1][:4])
    losses = _steps(engine, groups, batches[SAVE_AT:], SAVE_AT, microbatches)
    return mismatched, eval_loss, losses, {k: v for k, v in saved.items() if ".state." in k}


def load_and_continue(rank, overrides, directory, microbatches=2):
    from fwpkm_megatron.parallel.dist_checkpoint import load_distributed

    run, groups, engine = build(list(overrides) + [f"parallel.num_microbatches={microbatches}"])
    batches = global_batches(4 * microbatches * groups.dp)
    load_distributed(directory, engine.chunks, engine.optimizer)
    for _ in range(SAVE_AT):  # the LR schedule's position travels in the trainer state, not here
        engine.scheduler.step()
    loaded = {k: v for k, v in _named_state(engine).items() if ".state." in k}
    eval_loss = _eval(engine, batches[-1][:4])
    return eval_loss, _steps(engine, groups, batches[SAVE_AT:], SAVE_AT, microbatches), loaded


def load_fails(rank, overrides, directory):
    from fwpkm_megatron.parallel.dist_checkpoint import LayoutMismatch, load_distributed

    run, groups, engine = build(list(overrides))
    try:
        load_distributed(directory, engine.chunks, engine.optimizer)
    except LayoutMismatch as exc:
        return str(exc)
    return None


def assert_close(ref, got, what):
    for i, (a, b) in enumerate(zip(ref, got)):
        assert abs(a - b) <= RTOL * abs(a), f"{what}: value {i}: {b} vs {a}"


def test_tp2_checkpoint_at_pp2_and_tp1_matches_continuing_run(tmp_path):
    directory = tmp_path / "tp2"
    saving = run_ranks(save_then_continue, 2, ["parallel.tp=2"], directory)
    for rank, (mismatched, *_ ) in enumerate(saving):  # TP2 -> TP2: each rank its own columns, exactly
        assert not mismatched, f"rank {rank}: not restored exactly: {mismatched}"
    _, eval_ref, losses_ref, states = saving[0]
    assert not torch.equal(states["model.0.decoder.layers.0.fwpkm.state.values"],
                           saving[1][3]["model.0.decoder.layers.0.fwpkm.state.values"])  # the shards differ
    full_table = {k: torch.cat([v, saving[1][3][k]], dim=-1) for k, v in states.items() if k.endswith("values")}
    for layout, nproc in ((["parallel.pp=2"], 2), ([], 1)):
        got = run_ranks(load_and_continue, nproc, layout, directory)[0]  # rank 0 holds layer 0 (FwPKM)
        for key, table in full_table.items():  # the TP=2 column shards, reassembled exactly
            assert torch.equal(got[2][key], table), f"{layout}: {key}"
        assert_close([eval_ref] + losses_ref, [got[0]] + got[1], f"TP=2 -> {layout or 'TP=1'}")


def test_persistent_local_dp2_checkpoint_keeps_both_memories(tmp_path):
    directory = tmp_path / "local"
    policy = ["fwpkm.policy=persistent_local"]
    saving = run_ranks(save_then_continue, 2, policy, directory, 1)
    for rank, (mismatched, *_ ) in enumerate(saving):
        assert not mismatched, f"rank {rank}: not restored exactly: {mismatched}"
    key = "model.0.decoder.layers.0.fwpkm.state.values"
    assert not torch.equal(saving[0][3][key], saving[1][3][key])  # replicas diverged, each got its own back
    message, = run_ranks(load_fails, 1, policy, directory)
    assert message and "DP=2" in message, message


# ------------------------------------------------------------------------------------------ Trainer

def _trainer(rank, run, stop_at=None, evaluate_first=False):
    from fwpkm_megatron.training import Trainer

    console = io.StringIO()
    trainer = Trainer(run, console=console)
    try:
        val = trainer.evaluate() if evaluate_first else None
        if stop_at != 0:
            trainer.train(stop_at=stop_at)
        if stop_at is not None and stop_at > 0:
            val = trainer.evaluate()
        return list(trainer.losses), val, console.getvalue()
    finally:
        trainer.close()


def test_trainer_resumed_at_pp2_matches_tp2_run(tiny_run, tmp_path):
    common = ["train.steps=4", "train.eval_batches=1", "parallel.num_microbatches=2"]
    saved = tmp_path / "tp2"
    _, val_at_2, _ = run_ranks(_trainer, 2, tiny_run(saved, *common, "parallel.tp=2"), 2)[0]
    manifest = json.loads((saved / "checkpoints" / "step_00000002" / "manifest.json").read_text())
    assert manifest["kind"] == "distributed" and manifest["layout"]["tp"] == 2
    for name in ("pp2", "single"):
        shutil.copytree(saved, tmp_path / name)
    full, _, _ = run_ranks(_trainer, 2, tiny_run(saved, *common, "parallel.tp=2"))[0]  # same layout
    losses, val, console = run_ranks(_trainer, 2, tiny_run(tmp_path / "pp2", *common, "parallel.pp=2"),
                                     None, True)[0]
    assert "another layout" in console, console
    assert_close([val_at_2] + full, [val] + losses, "TP=2 -> PP=2 (val at step 2, losses 1-4)")
    # one process, plain single-process step (1 micro-batch of 4: another computation, so eval only)
    losses, val, console = run_ranks(_trainer, 1, tiny_run(tmp_path / "single", *common[:2]), 0, True)[0]
    assert losses == full[:2] and abs(val - val_at_2) <= RTOL * val_at_2, (val, val_at_2)


def test_zero1_checkpoint_resumes_at_another_layout_with_a_fresh_optimizer(tiny_run, tmp_path):
    common = ["train.steps=3", "train.eval_batches=1"]
    run_ranks(_trainer, 2, tiny_run(tmp_path, *common, "deepspeed.zero_stage=1"), 2)  # DP=2, stopped at 2
    losses, _, console = run_ranks(_trainer, 2, tiny_run(tmp_path, *common, "parallel.tp=2"))[0]
    assert "optimizer state restarted" in console and len(losses) == 3, console
