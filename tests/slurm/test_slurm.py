"""fwpkm-launch slurm on a real two-node SLURM (slurmctld + two slurmd on 127.0.0.1, submitted through
submitit): a 2-node x 1-task gloo job equals the local 2-process run step for step; a job sent SIGUSR2
mid-run checkpoints on every rank, requeues itself, resumes and ends with the uninterrupted losses;
`train.exit_after_minutes` checkpoints and requeues until `train.max_requeues`; a bare `srun fwpkm-train`
trains as one world; bad requests and a run directory owned by a live job are refused before anything
is written; `fwpkm-launch status|cancel|logs` work on a run directory.

A new cluster check goes here and reuses the session's cluster (conftest.py); keep jobs to seconds.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

from slurm_common import CONFIG, STEPS, launch_cmd


def _slurm(cluster, run_dir: Path, overrides, *options: str, wait: bool = True, **kw):
    args = launch_cmd("slurm", "--config", CONFIG, "--nodes", "2", "--tasks-per-node", "1", "--time", "10",
                      *options, *(["--wait"] if wait else []), *overrides, f"train.run_dir={run_dir}")
    return subprocess.run(args, env=cluster.env, capture_output=True, text=True, timeout=400, **kw)


def _wait_for(path: Path, pattern: str, timeout: float = 240.0) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        text = path.read_text() if path.exists() else ""
        if re.search(pattern, text, re.M):
            return text
        time.sleep(0.05)
    raise AssertionError(f"{path}: no line matching {pattern!r} within {timeout:.0f} s")


def test_two_node_job_matches_local_two_process_run(slurm_cluster, local_reference, run_overrides, tmp_path):
    run_dir = tmp_path / "two_nodes"
    done = _slurm(slurm_cluster, run_dir, run_overrides)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["losses"] == local_reference["losses"]  # bitwise: same ranks, same gloo sums
    assert summary["val_loss"] == local_reference["val_loss"]

    record = json.loads((run_dir / "launch.json").read_text())
    assert record["tasks"] == 2 and len(record["job_ids"]) == 1
    assert "#SBATCH --nodes=2" in Path(record["script"]).read_text()
    assert "train:" in (run_dir / "config.yaml").read_text()
    assert f"step {STEPS}/{STEPS}" in (run_dir / "logs" / "train.log").read_text()
    status = subprocess.run(launch_cmd("status", str(run_dir)), env=slurm_cluster.env, capture_output=True,
                            text=True, timeout=60)
    assert "COMPLETED" in status.stdout and "'status': 'completed'" in status.stdout, status.stdout
    logs = subprocess.run(launch_cmd("logs", str(run_dir), "--task", "1"), env=slurm_cluster.env,
                          capture_output=True, text=True, timeout=60)
    assert "Starting with JobEnvironment" in logs.stdout


def test_bare_srun_fwpkm_train_matches_local_two_process_run(slurm_cluster, local_reference, run_overrides,
                                                            tmp_path):
    """`srun fwpkm-train` as in launch/sbatch_8gpu.sh: ranks and master address from SLURM's variables."""
    run_dir = tmp_path / "bare_srun"
    done = slurm_cluster.run(["srun", "--nodes=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1", sys.executable,
                              "-m", "fwpkm_megatron.cli.train", "--config", CONFIG, *run_overrides,
                              f"train.run_dir={run_dir}"], timeout=400)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "parallel layout: 2 processes (TP=1, PP=1, DP=2)" in done.stdout
    assert json.loads((run_dir / "summary.json").read_text())["losses"] == local_reference["losses"]


def test_preempted_job_requeues_itself_and_matches_uninterrupted(slurm_cluster, local_reference, run_overrides,
                                                                  tmp_path):
    run_dir = tmp_path / "preempted"
    waiting = subprocess.Popen(launch_cmd("slurm", "--config", CONFIG, "--nodes", "2", "--tasks-per-node", "1",
                                          "--time", "10", "--wait", *run_overrides, f"train.run_dir={run_dir}"),
                               env=slurm_cluster.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for(run_dir / "logs" / "train.log", r"^step +2/")
        job_id = json.loads((run_dir / "launch.json").read_text())["job_ids"][0]
        subprocess.run(["scancel", "--signal=USR2", job_id], env=slurm_cluster.env, check=True, timeout=30)

        owned = _slurm(slurm_cluster, run_dir, run_overrides, wait=False)  # a second launch into a live run
        assert owned.returncode == 2 and f"owned by running job {job_id}" in owned.stderr, owned.stderr
        out, _ = waiting.communicate(timeout=400)
    finally:
        waiting.kill()
    assert waiting.returncode == 0, out
    log = (run_dir / "logs" / "train.log").read_text()
    stopped = int(re.search(r"stop requested \(SIGUSR2\) after step (\d+)", log)[1])
    assert stopped < STEPS, log
    assert f"requeueing: SIGUSR2: requeue 1 of at most" in log and f"at step {stopped}/{STEPS}" in log, log
    info = slurm_cluster.run(["scontrol", "show", "job", "-o", job_id]).stdout
    assert "Restarts=1" in info, info
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resumed_from_step"] == stopped
    assert summary["losses"] == local_reference["losses"]  # nothing lost, nothing repeated
    assert summary["final_loss"] == local_reference["final_loss"]


def test_exit_after_minutes_checkpoints_and_requeues_up_to_the_cap(slurm_cluster, run_overrides, tmp_path):
    run_dir = tmp_path / "time_budget"
    # a budget of ~0 minutes stops after every first step; one requeue allowed: steps 1 and 2, then a stop
    done = _slurm(slurm_cluster, run_dir, [*run_overrides, "train.exit_after_minutes=1e-6", "train.max_requeues=1"])
    assert done.returncode == 3, done.stdout + done.stderr  # stopped with a checkpoint, not finished
    log = (run_dir / "logs" / "train.log").read_text()
    assert "requeueing: train.exit_after_minutes reached: requeue 1 of at most 1" in log, log
    assert "not requeueing: requeue cap reached: requeued 1 times, train.max_requeues=1" in log, log
    assert "resuming from" in log and "at step 1/" in log, log
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    assert not (run_dir / "summary.json").exists()


def test_bad_requests_are_refused_before_anything_is_written(slurm_cluster, run_overrides, tmp_path):
    cases = {("--partition", "nope"): "--partition=nope: unknown partition (known: debug)",
             ("--tasks-per-node", "3"): "partition debug has 0 node(s) that hold 3 CPUs",
             ("--nodes", "3"): "partition debug has 2 node(s)"}
    for options, message in cases.items():
        run_dir = tmp_path / "refused"
        args = launch_cmd("slurm", "--config", CONFIG, "--nodes", "2", "--time", "10", *options, *run_overrides,
                          f"train.run_dir={run_dir}")
        done = subprocess.run(args, env=slurm_cluster.env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and message in done.stderr, (options, done.stderr)
        assert not run_dir.exists()
    assert slurm_cluster.run(["squeue", "-h"]).stdout.strip() == ""  # nothing was submitted

    run_dir = tmp_path / "cancelled"  # and a submitted run is cancelled through its run directory
    assert _slurm(slurm_cluster, run_dir, run_overrides, wait=False).returncode == 0
    done = subprocess.run(launch_cmd("cancel", str(run_dir)), env=slurm_cluster.env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    deadline = time.monotonic() + 60
    while True:  # COMPLETING: SLURM's transient state while a cancelled job's processes exit
        status = subprocess.run(launch_cmd("status", str(run_dir)), env=slurm_cluster.env, capture_output=True,
                                text=True, timeout=60)
        if "COMPLETING" not in status.stdout or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert "CANCELLED" in status.stdout, status.stdout
