"""Fixtures of the SLURM tier: one private two-node cluster per session (tests/slurm/local_slurm.py) and one
uninterrupted local 2-process run that the SLURM, preemption and crash tests must reproduce.

Where slurm-wlm cannot be installed the cluster tests skip, and the reason is printed in the summary.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from local_slurm import LocalCluster, ensure_installed  # noqa: E402
from slurm_common import CONFIG, RUN, launch_cmd  # noqa: E402

_SKIPPED: list[str] = []


@pytest.fixture(scope="session")
def run_overrides(tiny_overrides) -> list[str]:
    return [*tiny_overrides, *RUN]


@pytest.fixture(scope="session")
def slurm_cluster():
    """A started two-node cluster, stopped (by PID) at the end of the session whatever happened."""
    reason = ensure_installed()
    if reason:
        _SKIPPED.append(reason)
        pytest.skip(f"SLURM tests skipped: {reason}")
    directory = tempfile.mkdtemp(prefix="fwpkm_slurm_", dir="/tmp")  # munged wants a searchable path
    cluster = LocalCluster(directory)
    try:
        cluster.start()
        cluster.env["OMP_NUM_THREADS"] = "1"
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="session")
def local_reference(run_overrides, tmp_path_factory) -> dict:
    """summary.json of `fwpkm-launch local --nproc 2` on the shared overrides, never interrupted."""
    run_dir = tmp_path_factory.mktemp("local_reference") / "run"
    done = subprocess.run(launch_cmd("local", "--nproc", "2", "--config", CONFIG, *run_overrides,
                                     f"train.run_dir={run_dir}"),
                          capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((run_dir / "summary.json").read_text())


def pytest_terminal_summary(terminalreporter):
    for reason in _SKIPPED:
        terminalreporter.write_line(f"SLURM tests skipped: {reason}", yellow=True)
