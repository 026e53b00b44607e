"""The SLURM pieces that need no cluster: `fwpkm-launch slurm --dry-run` renders the sbatch script and
resolved config(s) without writing anything; bad layouts are refused before submission; srun's
variables become torch.distributed's (torchrun's win, a batch script alone stays one process); stop
requests and the requeue rules; partial checkpoint directories are reported and removed.

Cluster behaviour (submission, preemption, requeue) is in tests/slurm/.
"""
from __future__ import annotations

import os
import signal
import threading

import pytest

from fwpkm_megatron.cli.launch import main as launch_main
from fwpkm_megatron.training import checkpoint as ckpt
from fwpkm_megatron.training.preemption import (NONE, SIGTERM, SIGUSR2, TIME_LIMIT, StopRequests,
                                                requeue_decision)
from fwpkm_megatron.training.slurm_env import LaunchEnvError, distributed_env, expand_nodelist

CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "tiny.yaml")


def test_dry_run_renders_the_sbatch_script_and_writes_nothing(tmp_path, capsys):
    run_dir = tmp_path / "run"
    code = launch_main(["slurm", "--config", CONFIG, "--nodes", "2", "--gpus-per-node", "8", "--partition", "gpu",
                        "--time", "240", "--account", "proj", "--exclusive", "--dry-run", "parallel.tp=2",
                        f"train.run_dir={run_dir}"])
    out = capsys.readouterr().out
    assert code == 0
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=gpu", "#SBATCH --time=240", "#SBATCH --account=proj", "#SBATCH --exclusive",
                 "#SBATCH --requeue", "#SBATCH --signal=USR2@90", f"#SBATCH --output={run_dir}/slurm/%j_0_log.out",
                 "--kill-on-bad-exit=1", "-m submitit.core._submit", "unset RANK WORLD_SIZE"):
        assert line in out, line
    assert "# resolved config (16 tasks)" in out and "tp: 2" in out
    assert not run_dir.exists()


def test_dry_run_array_sweep_gives_one_run_dir_per_value(tmp_path, capsys):
    code = launch_main(["slurm", "--config", CONFIG, "--nodes", "1", "--dry-run", "--array-sweep",
                        "train.lr=0.001,0.002,0.003", f"train.run_dir={tmp_path / 'sweep'}"])
    out = capsys.readouterr().out
    assert code == 0 and "#SBATCH --array=0-2%3" in out
    for value in ("0.001", "0.002", "0.003"):
        assert f"run_dir: {tmp_path / 'sweep' / f'train.lr={value}'}" in out


@pytest.mark.parametrize("args, message", [
    (["--nodes", "1", "--tasks-per-node", "3", "parallel.tp=2"], "world size 3: must be divisible by parallel.tp"),
    (["--nodes", "1", "--gpus-per-node", "4", "--tasks-per-node", "2"], "one task per GPU"),
    (["--nodes", "0"], "--nodes=0: must be >= 1"),
    (["--nodes", "1", "--array-sweep", "lr"], "expected section.key=v1,v2"),
    (["--nodes", "1", "--array-sweep", "train.steps=5,x"], "train.steps=x: train.steps='x': expected int"),
], ids=["tp-does-not-divide", "tasks-vs-gpus", "no-nodes", "bad-sweep", "bad-sweep-value"])
def test_bad_launch_is_refused_before_anything_is_written(tmp_path, capsys, args, message):
    run_dir = tmp_path / "run"
    code = launch_main(["slurm", "--config", CONFIG, *args, f"train.run_dir={run_dir}"])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert not run_dir.exists()


def test_srun_variables_become_torch_distributed_ones():
    assert expand_nodelist("gpu[01-03,07],cpu5") == ["gpu01", "gpu02", "gpu03", "gpu07", "cpu5"]
    assert expand_nodelist("a[1-2]-b[3-4]") == ["a1-b3", "a1-b4", "a2-b3", "a2-b4"]
    with pytest.raises(LaunchEnvError):
        expand_nodelist("gpu[01-")
    step = {"SLURM_JOB_ID": "1234", "SLURM_PROCID": "9", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
            "SLURM_STEP_NUM_TASKS": "16", "SLURM_STEP_NODELIST": "localhost,gpu[2-3]",
            "SLURM_STEP_TASKS_PER_NODE": "8(x2)", "SLURMD_NODENAME": "gpu2", "SLURM_JOB_NODELIST": "x"}
    assert distributed_env(step) == {"RANK": "9", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "8",
                                     "MASTER_ADDR": "localhost", "MASTER_PORT": str(20000 + 1234)}
    assert distributed_env({**step, "MASTER_PORT": "29500"})["MASTER_PORT"] == "29500"  # the override
    assert distributed_env({**step, "RANK": "0", "WORLD_SIZE": "2"}) == {}  # torchrun's variables win
    batch_script = {k: v for k, v in step.items() if not k.startswith("SLURM_STEP")}
    assert distributed_env(batch_script) == {}  # no srun: one process


def test_signals_are_recorded_and_requeue_follows_the_rules():
    stops = StopRequests().install()
    try:
        assert stops.agree() == NONE
        with stops.held():  # held during a save (in this thread), never lost
            # Sent to this thread: a process-directed kill may land on another thread (earlier tests leave
            # some running), whose handler then trips asynchronously and races the agree() below.
            signal.pthread_kill(threading.get_ident(), signal.SIGUSR2)
        assert stops.agree() == SIGUSR2
    finally:
        stops.uninstall()
    assert signal.getsignal(signal.SIGUSR2) is signal.SIG_DFL
    assert StopRequests(exit_after_minutes=1e-9).agree() == TIME_LIMIT
    job = {"SLURM_JOB_ID": "7"}
    assert requeue_decision(SIGUSR2, 3, job)[0] and requeue_decision(TIME_LIMIT, 3, job)[0]
    assert not requeue_decision(SIGTERM, 3, job)[0]  # a cancel never comes back
    assert requeue_decision(SIGUSR2, 3, {**job, "SLURM_RESTART_COUNT": "3"}) == (
        False, "requeue cap reached: requeued 3 times, train.max_requeues=3")
    assert not requeue_decision(SIGUSR2, 3, {})[0]  # not a SLURM job


def test_partial_checkpoints_are_reported_and_latest_stays_complete(tmp_path):
    root = tmp_path / "checkpoints"
    ckpt.save_checkpoint(root, 2, {"step": 2}, {}, keep_last=2)
    (root / "step_00000004.tmp" / "rank_00000").mkdir(parents=True)  # a save killed half-way
    notes = ckpt.discard_partial_checkpoints(root)
    assert len(notes) == 1 and "step_00000004.tmp" in notes[0]
    assert not (root / "step_00000004.tmp").exists()
    assert ckpt.latest_checkpoint(root).name == "step_00000002"
    assert ckpt.load_checkpoint(root / "step_00000002")[0]["step"] == 2
