"""Crash safety of a local 2-process run (no cluster needed): SIGKILL one rank at a random step (mid-step
or mid-save), the launcher tears the other down within its grace period instead of hanging and leaves
no helper process behind, and a
restart resumes from the newest complete checkpoint (partial ones reported and ignored) and ends
bit-identical to the uninterrupted run.
"""
from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import time
from pathlib import Path

from slurm_common import CONFIG, STEPS, launch_cmd

from fwpkm_megatron.cli.launch import TEARDOWN_GRACE_S


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(x) for x in path.read_text().split()] if path.exists() else []


def _live_in_groups(groups: list[int]) -> list[str]:
    """Processes (not zombies) whose process group is one of `groups`, from /proc/<pid>/stat."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[2]) in groups:
            found.append(stat.parent.name)
    return found


def test_killed_rank_then_restart_matches_uninterrupted(local_reference, run_overrides, tmp_path):
    # from step 3: its line prints after the step-2 checkpoint is complete, so there is always one to resume
    # from (a kill at step 2 could land mid-save of the only checkpoint: a fresh start, nothing to resume);
    # a kill at an even step may still land mid-save of that step's checkpoint, which the restart must skip
    kill_step = random.SystemRandom().randrange(3, STEPS - 1)
    run_dir = tmp_path / "crashed"
    cmd = launch_cmd("local", "--nproc", "2", "--config", CONFIG, *run_overrides, f"train.run_dir={run_dir}")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = tmp_path / "first.log"
    with open(out, "w") as sink:
        launcher = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, env=env)
        try:
            deadline = time.time() + 300
            while not re.search(rf"^step +{kill_step}/", out.read_text(), re.M):
                assert launcher.poll() is None and time.time() < deadline, out.read_text()[-3000:]
                time.sleep(0.01)
            ranks = _children(launcher.pid)
            assert len(ranks) == 2, ranks
            os.kill(random.SystemRandom().choice(ranks), signal.SIGKILL)
            killed_at = time.time()
            code = launcher.wait(timeout=120)
            torn_down_s = time.time() - killed_at
        finally:
            launcher.kill()
    assert code != 0, f"kill at step {kill_step}: the launcher must report the failure"
    assert torn_down_s < TEARDOWN_GRACE_S + 15, f"survivor hung {torn_down_s:.0f} s after its peer died"
    deadline = time.time() + 10  # nothing a rank started outlives the launcher (each rank leads a group)
    while _live_in_groups(ranks) and time.time() < deadline:
        time.sleep(0.1)
    assert not _live_in_groups(ranks), f"left behind: {_live_in_groups(ranks)}"

    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert again.returncode == 0, f"kill at step {kill_step}:\n{again.stdout[-2000:]}{again.stderr[-3000:]}"
    assert "resuming from" in again.stdout, again.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["losses"] == local_reference["losses"], f"kill at step {kill_step}"
    assert summary["final_loss"] == local_reference["final_loss"]
