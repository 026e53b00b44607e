"""The Trainer on forked gloo ranks with the real data stack: TP=2 writes the single-process summary,
and a DP=2 run stopped and resumed from its sharded checkpoint equals the uninterrupted run."""
from __future__ import annotations

import io
import json

import deepspeed  # noqa: F401  imported once (with megatron-core), inherited by the forked ranks
import megatron.core  # noqa: F401
import pytest

from spawn import run_ranks

RTOL = 1e-5


def _trainer_run(rank, run, stop_at=None):
    from fwpkm_megatron.training import Trainer

    trainer = Trainer(run, console=io.StringIO())
    try:
        trainer.train(stop_at=stop_at)
        values = {n: b.clone() for n, b in trainer.model.named_buffers() if ".state." in n}
        return list(trainer.losses), values
    finally:
        trainer.close()


def test_tp2_trainer_writes_the_single_process_summary(tiny_run, tmp_path):
    steps = ["train.steps=3", "train.eval_batches=1"]
    (single, _), = run_ranks(_trainer_run, 1, tiny_run(tmp_path / "single", *steps))
    run_ranks(_trainer_run, 2, tiny_run(tmp_path / "tp2", *steps, "parallel.tp=2"))
    ref = json.loads((tmp_path / "single" / "summary.json").read_text())
    got = json.loads((tmp_path / "tp2" / "summary.json").read_text())
    for a, b in zip(ref["losses"] + [ref["val_loss"]], got["losses"] + [got["val_loss"]]):
        assert abs(a - b) <= RTOL * abs(a), (ref, got)
    assert got["tokens_seen"] == ref["tokens_seen"]
    # fast weights per rank: half the table's columns, the replicated sub-keys whole
    assert 0 < got["fast_weight_bytes_per_rank"] < 0.6 * ref["fast_weight_bytes_per_rank"], (got, ref)
    step_dir = tmp_path / "tp2" / "checkpoints" / "step_00000003"  # distributed: dist/ + per-rank trainer state
    assert (step_dir / "dist" / "metadata.json").is_file() and (step_dir / "rank_00001" / "trainer.pt").is_file()


ENGINES = {"plain": [], "zero2": ["deepspeed.zero_stage=2"], "bf16": ["train.precision=bf16"]}


@pytest.mark.parametrize("engine", list(ENGINES))
def test_dp2_resumed_run_matches_uninterrupted(tiny_run, tmp_path, engine):
    """bf16: the checkpoint keeps the fp32 master weights (`main_param`) beside the AdamW moments."""
    steps = ["train.steps=4", "train.eval_batches=1"] + ENGINES[engine]
    full = run_ranks(_trainer_run, 2, tiny_run(tmp_path / "full", *steps))
    run_ranks(_trainer_run, 2, tiny_run(tmp_path / "resumed", *steps), 2)
    resumed = run_ranks(_trainer_run, 2, tiny_run(tmp_path / "resumed", *steps))
    assert resumed[0][0] == full[0][0]
    for rank in range(2):
        for name, value in full[rank][1].items():
            assert torch_equal(value, resumed[rank][1][name]), name
    for name, value in full[0][1].items():  # persistent: replicas identical
        assert torch_equal(value, full[1][1][name]), name


def torch_equal(a, b) -> bool:
    import torch

    return torch.equal(a, b)
