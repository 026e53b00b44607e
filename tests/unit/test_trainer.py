"""The trainer, optimizer, checkpoints and logging on a tiny model and corpus (CPU, one process).

What this proves:
- a run stopped at step 3 and resumed by a new Trainer equals an uninterrupted run bit for bit
  (losses, every model tensor including the fast-weight buffers, the optimizer state);
- evaluation leaves training state untouched and sees the same batches every time;
- checkpoints are atomic (a `.tmp` leftover is ignored, `latest` names a complete directory), pruned to
  keep_last, and a corrupt or truncated file fails with an error naming it;
- TensorBoard event files and summary.json hold what the docs promise; the loss falls;
- the slow-weight optimizer decays only matrices, warms up then decays to min_lr, and clips slow weights.

The 6-step `finished_run` is built once per module and shared; a new check on a finished run goes there.
"""
from __future__ import annotations

import io
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

RESUME_STEPS = 6
PEAK_TFLOPS = 0.5  # an assumed device peak, so MFU is logged on the CPU too
FINISHED = ("train.steps=6", "train.eval_every=3", "train.save_every=2", "train.keep_last=2",
            f"train.peak_tflops={PEAK_TFLOPS}")


def _assert_same(ref, got, path: str = "state") -> None:
    """Bitwise equality of nested dicts/lists of tensors and plain values, naming the first difference."""
    if isinstance(ref, dict):
        assert ref.keys() == got.keys(), f"{path}: keys {sorted(ref)} != {sorted(got)}"
        for key in ref:
            _assert_same(ref[key], got[key], f"{path}.{key}")
    elif isinstance(ref, (list, tuple)):
        assert len(ref) == len(got), f"{path}: length {len(ref)} != {len(got)}"
        for i, (a, b) in enumerate(zip(ref, got)):
            _assert_same(a, b, f"{path}[{i}]")
    elif isinstance(ref, torch.Tensor):
        assert ref.dtype == got.dtype and ref.shape == got.shape, f"{path}: dtype/shape differ"
        assert torch.equal(ref, got), f"{path}: max |diff| {(ref.double() - got.double()).abs().max()}"
    else:
        assert ref == got, f"{path}: {ref!r} != {got!r}"


def _train(run, stop_at=None):
    """Build a Trainer, train, close; return (trainer, summary, console text)."""
    from fwpkm_megatron.training import Trainer

    console = io.StringIO()
    trainer = Trainer(run, console=console)
    try:
        summary = trainer.train(stop_at=stop_at)
    finally:
        trainer.close()
    return trainer, summary, console.getvalue()


@pytest.fixture(scope="module")
def finished_run(tiny_run, tmp_path_factory):
    """An uninterrupted 6-step run: (run_dir, final trainer state_dict, summary, console text)."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    trainer, summary, console = _train(tiny_run(run_dir, *FINISHED))
    return run_dir, trainer.state_dict(), summary, console


# --------------------------------------------------------------------------------- resume & eval

def test_resumed_run_matches_uninterrupted(finished_run, tiny_run, tmp_path):
    from fwpkm_megatron.memory import fast_weight_states

    run_dir, ref_state, ref_summary, _ = finished_run
    run = tiny_run(tmp_path / "run", *FINISHED)
    first, partial, _ = _train(run, stop_at=3)
    assert partial is None and first.step == 3
    resumed, summary, console = _train(run)
    assert "resuming from" in console and "step_00000003" in console

    assert summary["resumed_from_step"] == 3
    assert summary["losses"] == ref_summary["losses"]  # exact float equality, not approx
    assert len(summary["losses"]) == RESUME_STEPS
    final = resumed.state_dict()
    fast = [f"{name}.{buf}" for name in fast_weight_states(resumed.model) for buf in ("keys", "values")]
    assert fast and all(k in final["model"] for k in fast), "fast weights missing from model.state_dict()"
    for key in ("model", "optimizer", "scheduler", "data", "step", "tokens_seen", "losses"):
        _assert_same(ref_state[key], final[key], key)
    assert summary["val_loss"] == ref_summary["val_loss"]


def test_evaluation_leaves_state_unchanged_and_sees_same_batches(finished_run, tmp_path):
    from fwpkm_megatron.training import Trainer

    run_dir, _, summary, _ = finished_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    run = _config_of(copy)
    console = io.StringIO()
    trainer = Trainer(run, console=console)  # resumes at step 6: nothing left to train
    try:
        before = trainer.state_dict()
        first, second = trainer.evaluate(), trainer.evaluate()
        after = trainer.state_dict()
        assert "note: train.eval_batches" not in console.getvalue()
        trainer.run.train.eval_batches = 3  # the tiny val split holds 2 batches of 4: the third re-reads
        trainer.evaluate(), trainer.evaluate()
    finally:
        trainer.close()
    assert first == second == summary["val_loss"]
    _assert_same(before, after)
    assert console.getvalue().count("note: train.eval_batches=3 exceeds the 2 val global batches") == 1, console


def _config_of(run_dir: Path):
    """The RunConfig stored in a run's latest checkpoint, pointed at `run_dir`."""
    from fwpkm_megatron.config import from_dict

    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    tree = json.loads((run_dir / "checkpoints" / latest / "config.json").read_text())
    tree["train"]["run_dir"] = str(run_dir)
    return from_dict(tree)


# ------------------------------------------------------------------------------ checkpoints

def test_checkpoints_are_atomic_pruned_and_ignore_tmp_leftovers(finished_run, tmp_path):
    from fwpkm_megatron.training import latest_checkpoint, load_checkpoint

    run_dir, ref_state, _, _ = finished_run
    root = run_dir / "checkpoints"
    steps = sorted(p.name for p in root.iterdir() if p.is_dir())
    assert steps == ["step_00000004", "step_00000006"], steps  # save_every=2, keep_last=2
    assert (root / "latest").read_text().strip() == "step_00000006"
    assert not list(root.glob("*.tmp"))

    copy = tmp_path / "checkpoints"
    shutil.copytree(root, copy)
    leftover = copy / "step_00000008.tmp"  # a save that crashed before its rename
    leftover.mkdir()
    (leftover / "model.pt").write_bytes(b"partial")
    assert latest_checkpoint(copy) == copy / "step_00000006"
    state, config = load_checkpoint(latest_checkpoint(copy))
    assert state["step"] == 6 and config["train"]["steps"] == 6
    _assert_same(ref_state["model"], state["model"], "model")
    assert set(p.name for p in (copy / "step_00000006").iterdir()) == {
        "model.pt", "optimizer.pt", "trainer.pt", "config.json", "manifest.json"}


@pytest.mark.parametrize("damage", ["garbage", "truncated", "missing", "no_manifest"])
def test_corrupt_checkpoint_fails_naming_the_file(finished_run, tmp_path, damage):
    from fwpkm_megatron.training import CheckpointError, load_checkpoint

    run_dir = finished_run[0]
    ckpt = tmp_path / "step_00000006"
    shutil.copytree(run_dir / "checkpoints" / "step_00000006", ckpt)
    target = {"garbage": "model.pt", "truncated": "optimizer.pt", "missing": "trainer.pt",
              "no_manifest": "manifest.json"}[damage]
    path = ckpt / target
    if damage == "garbage":  # same size, so only decoding can notice
        path.write_bytes(b"\x00" * path.stat().st_size)
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        path.unlink()
    with pytest.raises(CheckpointError, match=target.replace(".", r"\.")):
        load_checkpoint(ckpt)


def test_trainer_refuses_to_resume_from_corrupt_latest(finished_run, tmp_path):
    from fwpkm_megatron.training import CheckpointError, Trainer

    copy = tmp_path / "run"
    shutil.copytree(finished_run[0], copy)
    (copy / "checkpoints" / "step_00000006" / "model.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="model.pt"):
        Trainer(_config_of(copy), console=io.StringIO())


# ------------------------------------------------------------------------ logs and summary

def test_tensorboard_scalars_read_back(finished_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _, summary, _ = finished_run
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    tags = acc.Tags()
    losses = acc.Scalars("train/loss")
    assert [e.step for e in losses] == list(range(1, RESUME_STEPS + 1))
    assert [e.value for e in losses] == pytest.approx(summary["losses"], rel=1e-6)  # stored as fp32
    for tag in ("train/lr", "train/grad_norm", "train/tokens_per_s"):
        assert len(acc.Scalars(tag)) == RESUME_STEPS, tag
    assert [e.step for e in acc.Scalars("val/ppl")] == [3, 6]  # eval_every=3 and at the end
    assert acc.Scalars("val/ppl")[-1].value == pytest.approx(summary["val_ppl"], rel=1e-5)
    assert any(t.startswith("memory/layer0/") for t in tags["scalars"]), tags["scalars"]
    assert "memory/layer0/gate" in tags["histograms"]
    assert acc.Scalars("run/tokens_per_step")[0].value == 4 * 32


def test_tensorboard_has_throughput_and_per_layer_memory_diagnostics(finished_run, tiny_run):
    """perf/ scalars follow the documented FLOP count; memory/layer{i}/ has the addressing loss, the
    fast-weight MSE and the read/write magnitudes at every logged step (log_every=2)."""
    import dataclasses

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from fwpkm_megatron.training.flops import training_flops_per_token

    run_dir, state, _, console = finished_run
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    run = tiny_run(run_dir, *FINISHED)
    vocab = state["model"]["embedding.word_embeddings.weight"].shape[0]
    flops = training_flops_per_token(dataclasses.replace(run, model=dataclasses.replace(run.model, vocab_size=vocab)))
    assert acc.Scalars("run/flops_per_token")[0].value == pytest.approx(flops, rel=1e-6)
    assert "model FLOPs per token" in console and "MFU logged" in console
    tok_s = [e.value for e in acc.Scalars("train/tokens_per_s")]
    tflops = [e.value for e in acc.Scalars("perf/model_tflops_per_device")]
    mfu = [e.value for e in acc.Scalars("perf/mfu")]
    assert [e.step for e in acc.Scalars("perf/mfu")] == list(range(1, RESUME_STEPS + 1))
    assert tflops == pytest.approx([flops * t / 1e12 for t in tok_s], rel=1e-5)
    assert mfu == pytest.approx([t / PEAK_TFLOPS for t in tflops], rel=1e-5)

    for key in ("addr_loss", "fw_mse", "read_abs_mean", "write_abs_mean"):
        events = acc.Scalars(f"memory/layer0/{key}")
        assert [e.step for e in events] == [2, 4, 6], key
        assert all(math.isfinite(e.value) for e in events), key
    num_sub_keys = 8  # fwpkm.num_slots=64
    addr = [e.value for e in acc.Scalars("memory/layer0/addr_loss")]   # -H(p1) - H(p2) >= -2 log R
    assert all(-2 * math.log(num_sub_keys) - 1e-4 <= a < 0 for a in addr), addr
    assert all(e.value > 0 for k in ("fw_mse", "read_abs_mean", "write_abs_mean")
               for e in acc.Scalars(f"memory/layer0/{k}"))


def test_summary_json_has_documented_fields(finished_run):
    run_dir, _, summary, console = finished_run
    on_disk = json.loads((run_dir / "summary.json").read_text())
    assert on_disk == summary
    assert on_disk["steps"] == RESUME_STEPS and on_disk["tokens_seen"] == RESUME_STEPS * 4 * 32
    assert len(on_disk["losses"]) == RESUME_STEPS
    assert on_disk["first_loss"] == on_disk["losses"][0] and on_disk["final_loss"] == on_disk["losses"][-1]
    assert on_disk["final_loss_mean_last_10"] == pytest.approx(sum(on_disk["losses"]) / RESUME_STEPS)
    assert on_disk["val_ppl"] == pytest.approx(math.exp(on_disk["val_loss"]))
    assert Path(on_disk["checkpoint"]).name == "step_00000006"
    assert Path(on_disk["tensorboard_dir"]) == run_dir / "tensorboard"
    assert on_disk["wall_seconds"] > 0 and on_disk["resumed_from_step"] == 0
    # tiny FwPKM layer: values 64 x 32 and keys 1 x 2 x 8 x 8, fp32
    assert on_disk["fast_weight_bytes_per_rank"] == (64 * 32 + 2 * 8 * 8) * 4
    for derived in ("tokens per step: 128", "slow parameters:", "fast weights:", "fast weights per rank: "):
        assert derived in console, derived


def test_loss_falls_over_30_steps(tiny_run, tmp_path):
    _, summary, _ = _train(tiny_run(tmp_path / "run", "train.steps=30", "train.warmup_steps=3",
                                    "train.log_every=10", "train.eval_batches=1"))
    first = summary["losses"][0]
    # ln(512) = 6.24 at init; 30 steps reach ~5.5 (unigram statistics), so 0.5 leaves a wide margin.
    assert summary["final_loss_mean_last_10"] < first - 0.5, summary["losses"]
    assert summary["val_loss"] < first - 0.5, summary["val_loss"]


# ------------------------------------------------------------------------------------- CLI

def test_cli_trains_and_prints_summary(tiny_overrides, tmp_path, capsys):
    from fwpkm_megatron.cli.train import main

    config = tmp_path / "tiny.yaml"
    config.write_text("train:\n  steps: 2\n")
    run_dir = tmp_path / "run"
    code = main(["--config", str(config), *tiny_overrides, f"train.run_dir={run_dir}"])
    out = capsys.readouterr().out
    assert code == 0
    assert "->" in out and "val ppl" in out and str(run_dir / "summary.json") in out
    assert (run_dir / "summary.json").is_file()


def test_cli_reports_missing_data_with_exit_2(tiny_overrides, tmp_path, capsys):
    from fwpkm_megatron.cli.train import main

    config = tmp_path / "tiny.yaml"
    config.write_text("train:\n  steps: 2\n")
    code = main(["--config", str(config), *tiny_overrides, f"data.path={tmp_path / 'no_data'}",
                 f"train.run_dir={tmp_path / 'run'}"])
    assert code == 2
    assert "no_data" in capsys.readouterr().err


# ------------------------------------------------------------------------------- optimizer

class _Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)
        self.out_norm = torch.nn.RMSNorm(4)
        self.scale = torch.nn.Parameter(torch.ones(4))
        self.register_buffer("values", torch.zeros(16, 4))  # a fast weight: never optimized


def test_param_groups_decay_only_matrices_and_skip_fast_weights():
    from fwpkm_megatron.training.optim import param_groups

    decay, no_decay = param_groups(_Toy(), weight_decay=0.1)
    assert decay["names"] == ["proj.weight"] and decay["weight_decay"] == 0.1
    assert sorted(no_decay["names"]) == ["out_norm.weight", "proj.bias", "scale"]
    assert no_decay["weight_decay"] == 0.0


def test_lr_schedule_warms_up_then_cosines_to_min_lr():
    from fwpkm_megatron.config import TrainConfig
    from fwpkm_megatron.training.optim import build_optimizer, lr_at

    cfg = TrainConfig(steps=10, warmup_steps=4, lr=1.0, min_lr=0.1)
    assert [lr_at(s, cfg) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(4, cfg) == 1.0 and lr_at(9, cfg) == pytest.approx(0.1)
    decaying = [lr_at(s, cfg) for s in range(4, 10)]
    assert decaying == sorted(decaying, reverse=True)

    optimizer, scheduler = build_optimizer(_Toy(), cfg)
    seen = []
    for _ in range(10):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([lr_at(s, cfg) for s in range(10)])


def test_clip_returns_pre_clip_norm_and_clips_slow_weights():
    from fwpkm_megatron.training.optim import clip_grad_norm

    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(4))
    a.grad, b.grad = torch.full((3,), 3.0), torch.full((4,), 4.0)
    expected = math.sqrt(3 * 9 + 4 * 16)
    assert clip_grad_norm([a, b], max_norm=1.0) == pytest.approx(expected)
    clipped = torch.cat([a.grad, b.grad]).norm().item()
    assert clipped == pytest.approx(1.0, rel=1e-5)
    assert clip_grad_norm([a, b], max_norm=0.0) == pytest.approx(clipped)  # 0 disables: norm only


def test_global_batch_size_sets_the_tokens_per_step(tiny_run, tmp_path):
    """train.global_batch_size=8 with micro-batches of 4 in one process: 2 micro-batches per step."""
    trainer, summary, console = _train(tiny_run(tmp_path / "run", "train.steps=1", "train.eval_batches=1",
                                                "train.global_batch_size=8"))
    assert trainer.num_microbatches == 2 and trainer.engine is not None
    assert summary["tokens_seen"] == 8 * trainer.run.train.seq_len
    assert "(4 seqs x 32 tok x 2 micro-batches x DP=1)" in console
