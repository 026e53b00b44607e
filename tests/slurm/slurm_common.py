"""Shared by the SLURM-tier tests: the config, the run length and how to call fwpkm-launch."""
from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CONFIG = str(REPO / "configs" / "tiny.yaml")
STEPS = 12
# save often (the crash test restarts from the newest checkpoint), log every step (tests watch progress)
RUN = [f"train.steps={STEPS}", "train.save_every=2", "train.log_every=1", "train.eval_batches=1"]


def launch_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "fwpkm_megatron.cli.launch", *args]
