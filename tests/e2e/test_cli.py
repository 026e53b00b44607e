"""The installed console scripts end to end: fwpkm-prep -> fwpkm-train -> rerun resumes, as `make demo` does.

What this proves: the entry points declared in setup.py work from a shell, the training loss falls on
the demo config shrunk to seconds, summary.json / checkpoints / TensorBoard land in the run dir, and a
second invocation on a finished run resumes instead of retraining.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

SMALL_DEMO = ["model.num_layers=2", "model.hidden_size=64", "model.max_seq_len=64", "model.window=8",
              "fwpkm.layers=[0]", "fwpkm.num_slots=256", "fwpkm.d_k=16", "fwpkm.d_v=32", "fwpkm.chunk_size=16",
              "pkm.layers=[1]", "pkm.num_slots=256", "pkm.d_k=16", "pkm.d_v=32",
              "train.seq_len=64", "train.micro_batch_size=4", "train.steps=40", "train.warmup_steps=4",
              "train.log_every=10", "train.eval_batches=2", "train.lr=5e-3"]


def _script(name: str) -> str:
    path = BIN / name
    return str(path) if path.exists() else shutil.which(name)


def _run(args, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=600, env=env)


def test_prep_train_and_resume_from_the_console_scripts(tmp_path):
    data = tmp_path / "data"
    prep = _run([_script("fwpkm-prep"), "--out", str(data), "--max-mb", "0.4", "--vocab-size", "512",
                 "--seq-len", "64"], tmp_path)
    assert prep.returncode == 0, prep.stderr
    assert (data / "manifest.json").exists() and (data / "tokenizer.json").exists()

    run_dir = tmp_path / "run"
    args = [_script("fwpkm-train"), "--config", str(REPO / "configs/tiny.yaml"), *SMALL_DEMO,
            f"data.path={data}", f"train.run_dir={run_dir}"]
    train = _run(args, tmp_path)
    assert train.returncode == 0, train.stderr[-3000:]
    assert "val ppl" in train.stdout

    summary = json.loads((run_dir / "summary.json").read_text())
    assert len(summary["losses"]) == 40
    assert summary["final_loss_mean_last_10"] < summary["first_loss"] - 0.5, "the loss must clearly fall"
    assert Path(summary["checkpoint"]).is_dir() and any(Path(summary["tensorboard_dir"]).iterdir())

    again = _run(args, tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from" in again.stdout
    assert json.loads((run_dir / "summary.json").read_text())["losses"] == summary["losses"]

