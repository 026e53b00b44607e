"""Export and reshard checkpoints of parallel runs (gloo, forked ranks; tests/dist/spawn.py).

What this proves, on the tiny run of tests/conftest.py (FwPKM at layer 0, PKM at layer 1), stopped at step 2:
- a TP=2 and a PP=2 run's distributed checkpoint exports to a directory that plain
  `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` loads, and its logits (and its
  fast weights after the call) equal the one-process megatron model loaded from that checkpoint within 1e-5;
- reshard -> continue equals continuing the original (losses of steps 3-4 within 1e-5 relative, AdamW carried):
  TP=2 checkpoint -> TP=1 in one process, and a single-process checkpoint -> TP=2 on two ranks;
- an export resharded for training restarts the optimizer and says so, and its eval loss equals the checkpoint's;
- a persistent_local DP=2 checkpoint exports DP rank 0's memory by default, another with dp_rank, and records which.
A new source layout gets a fixture entry in `runs`; a new target layout a case in the continue test.
"""
from __future__ import annotations

import io
import shutil

import pytest

import deepspeed  # noqa: F401  imported once here (with megatron-core), inherited by every forked rank
import megatron.core  # noqa: F401
from fwpkm_megatron.export.loading import ensure_transformers_importable

ensure_transformers_importable()
import transformers  # noqa: E402,F401  imported once too (seconds per process otherwise)

from spawn import run_ranks  # noqa: E402

RTOL = 1e-5
COMMON = ("train.steps=4", "train.eval_batches=1")
LAYOUTS = {"tp2": (2, ("parallel.tp=2",)), "pp2": (2, ("parallel.pp=2", "parallel.num_microbatches=2")),
           "single": (1, ())}


def _trainer(rank, run, stop_at=None, evaluate_first=False):
    from fwpkm_megatron.training import Trainer

    trainer = Trainer(run, console=io.StringIO())
    try:
        val = trainer.evaluate() if evaluate_first else None
        if stop_at != 0:
            trainer.train(stop_at=stop_at)
        return list(trainer.losses), val
    finally:
        trainer.close()


@pytest.fixture(scope="module")
def runs(tiny_run, tmp_path_factory):
    """name -> run dir of a 4-step run stopped (checkpointed) at step 2, for each source layout."""
    root = tmp_path_factory.mktemp("export_parallel")
    out = {}
    for name, (nproc, overrides) in LAYOUTS.items():
        run_ranks(_trainer, nproc, tiny_run(root / name, *COMMON, *overrides), 2)
        out[name] = root / name
    return out


def _export_and_compare(rank, step_dir, out):
    """Export; load with plain transformers; max |logit diff| and |fast-value diff| vs megatron from dist/."""
    import json

    import torch
    from transformers import AutoModelForCausalLM

    from fwpkm_megatron.config import DeepSpeedConfig, ParallelConfig, from_dict
    from fwpkm_megatron.export import export_checkpoint
    from fwpkm_megatron.memory import fwpkm_blocks
    from fwpkm_megatron.model import build_model
    from fwpkm_megatron.parallel.dist_checkpoint import load_distributed
    from fwpkm_megatron.parallel.groups import init_single_process

    export_checkpoint(step_dir, out)
    import dataclasses

    run = from_dict(json.loads((step_dir / "config.json").read_text()))
    run = dataclasses.replace(run, parallel=ParallelConfig(), deepspeed=DeepSpeedConfig(),
                              fwpkm=dataclasses.replace(run.fwpkm, policy="persistent"))
    init_single_process(run.train.seed)
    from fwpkm_megatron.export.layout import distributed_vocab_rows

    mega = build_model(run, distributed_vocab_rows(step_dir / "dist"))
    load_distributed(step_dir / "dist", [mega], None)  # the in-training model, one process
    mega.eval()
    mega.window_control.begin_step(0, run.train.seed, training=False)
    hf = AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True, fwpkm_policy="persistent")
    ids = torch.randint(0, 512, (2, 29), generator=torch.Generator().manual_seed(0))  # 3 chunks of 8 + 5
    with torch.no_grad():
        ref = mega(ids, torch.arange(29).expand_as(ids), attention_mask=None).float()
        got = hf(ids).logits
    values = fwpkm_blocks(mega)[0].state.values
    return (ref - got).abs().max().item(), (values - hf.fast_weights.layer_0.values).abs().max().item()


@pytest.mark.parametrize("name", ["tp2", "pp2"])
def test_export_of_parallel_run_matches_megatron_in_transformers(runs, tmp_path, name):
    step_dir = runs[name] / "checkpoints" / "step_00000002"
    logits, values = run_ranks(_export_and_compare, 1, step_dir, tmp_path / "hf")[0]
    assert logits < 1e-5 and values < 1e-5, (logits, values)
    readme = (tmp_path / "hf" / "README.md").read_text()
    assert "distributed layout" in readme and "shared by every DP rank" in readme


def _reshard(rank, source, out, tp, pp):
    from fwpkm_megatron.export import reshard_checkpoint

    reshard_checkpoint(source, out, tp=tp, pp=pp)


def assert_close(ref, got, what):
    assert len(ref) == len(got), (what, ref, got)
    for i, (a, b) in enumerate(zip(ref, got)):
        assert abs(a - b) <= RTOL * abs(a), f"{what}: value {i}: {b} vs {a} ({got} vs {ref})"


@pytest.mark.parametrize("source,target", [("tp2", "single"), ("single", "tp2")])
def test_resharded_checkpoint_continues_like_the_original(runs, tiny_run, tmp_path, source, target):
    src_nproc, src_overrides = LAYOUTS[source]
    shutil.copytree(runs[source], tmp_path / "original")
    full, _ = run_ranks(_trainer, src_nproc, tiny_run(tmp_path / "original", *COMMON, *src_overrides))[0]
    tp = 2 if target == "tp2" else 1
    run_ranks(_reshard, 1, runs[source] / "checkpoints", tmp_path / "resharded", tp, 1)
    nproc, overrides = LAYOUTS[target]
    losses, _ = run_ranks(_trainer, nproc, tiny_run(tmp_path / "resharded", *COMMON, *overrides))[0]
    assert_close(full, losses, f"{source} -> reshard -> {target}")
    with pytest.raises(AssertionError, match="exists"):  # never overwritten without overwrite=True
        run_ranks(_reshard, 1, runs[source] / "checkpoints", tmp_path / "resharded", tp, 1)


def test_resharded_export_restarts_the_optimizer_and_keeps_the_model(runs, tiny_run, tmp_path):
    step_dir = runs["tp2"] / "checkpoints" / "step_00000002"
    run_ranks(_export_only, 1, step_dir, tmp_path / "hf")
    run_ranks(_reshard, 1, tmp_path / "hf", tmp_path / "resharded", 1, 1)
    notes = (tmp_path / "resharded" / "RESHARD.md").read_text()
    assert "optimizer state restarted" in notes and "data stream restarted" in notes
    shutil.copytree(runs["tp2"], tmp_path / "original")
    _, val_ref = run_ranks(_trainer, 2, tiny_run(tmp_path / "original", *COMMON, "parallel.tp=2"), 0, True)[0]
    losses, val = run_ranks(_trainer, 1, tiny_run(tmp_path / "resharded", *COMMON), 3, True)[0]
    assert abs(val - val_ref) <= RTOL * val_ref, (val, val_ref)
    assert len(losses) == 1  # step 3 trained from the export (the schedule continued at step 2)


def _export_only(rank, step_dir, out):
    from fwpkm_megatron.export import export_checkpoint

    export_checkpoint(step_dir, out)


def _trained_memories(rank, run):
    from fwpkm_megatron.training import Trainer

    trainer = Trainer(run, console=io.StringIO())
    try:
        trainer.train()
        return next(b.clone() for n, b in trainer.model.named_buffers() if n.endswith("layers.0.fwpkm.state.values"))
    finally:
        trainer.close()


def _export_memory(rank, step_dir, out, dp_rank):
    import json

    from safetensors.torch import load_file

    from fwpkm_megatron.export import export_checkpoint

    export_checkpoint(step_dir, out, dp_rank=dp_rank)
    info = json.loads((out / "fwpkm_training.json").read_text())
    return load_file(str(out / "model.safetensors"))["fast_weights.layer_0.values"], info["memory_dp_rank"]


def test_persistent_local_export_takes_the_chosen_dp_ranks_memory(tiny_run, tmp_path):
    import torch

    run = tiny_run(tmp_path / "run", "train.steps=2", "train.eval_batches=1", "fwpkm.policy=persistent_local")
    memories = run_ranks(_trained_memories, 2, run)  # DP=2: the replicas' memories diverge
    assert not torch.equal(memories[0], memories[1])
    step_dir = tmp_path / "run" / "checkpoints" / "step_00000002"
    for dp_rank, out in ((None, "default"), (1, "rank1")):
        values, recorded = run_ranks(_export_memory, 1, step_dir, tmp_path / out, dp_rank)[0]
        assert recorded == (dp_rank or 0) and torch.equal(values, memories[dp_rank or 0]), out
    assert "DP rank 1's, one of 2" in (tmp_path / "rank1" / "README.md").read_text()
