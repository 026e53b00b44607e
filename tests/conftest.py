"""Shared fixtures: a tiny prepared corpus (built once per session) and tiny run configs over it."""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

# Triton decides interpreted vs compiled when a kernel is *defined*, and megatron-core / DeepSpeed
# import triton early; without CUDA every kernel in this session must be the interpreted kind.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

TINY_DATA_BYTES = 300_000  # a few hundred KB of stdlib source: ~100K tokens, seconds to prepare
TINY_VOCAB = 512
TINY_SEQ_LEN = 32

# Model and memory sizes small enough for a step in tens of milliseconds on 2 cores.
TINY_MODEL = ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4",
              "model.max_seq_len=64", "model.window=16", "model.attention=pswa", "model.pswa_prob=0.5"]
TINY_TRAIN = [f"train.seq_len={TINY_SEQ_LEN}", "train.micro_batch_size=4", "train.warmup_steps=2",
              "train.log_every=2", "train.eval_batches=2", "train.threads=1"]
TINY_FWPKM = ["fwpkm.layers=[0]", "fwpkm.num_slots=64", "fwpkm.d_k=16", "fwpkm.d_v=32", "fwpkm.topk=2",
              "fwpkm.chunk_size=8"]
TINY_PKM = ["pkm.layers=[1]", "pkm.num_slots=64", "pkm.d_k=16", "pkm.d_v=32", "pkm.heads=2", "pkm.topk=2"]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A prepared dataset (train/, val/, tokenizer.json) from a few hundred KB of the stdlib."""
    from fwpkm_megatron.data import prepare_corpus

    out = tmp_path_factory.mktemp("tiny_data") / "stdlib"
    prepare_corpus(out, max_bytes=TINY_DATA_BYTES, vocab_size=TINY_VOCAB, seq_len=TINY_SEQ_LEN, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_overrides(tiny_data) -> list[str]:
    """`section.key=value` overrides for the tiny model, memory layers and data (no run_dir)."""
    return TINY_MODEL + TINY_TRAIN + TINY_FWPKM + TINY_PKM + [f"data.path={tiny_data}"]


@pytest.fixture(scope="session")
def tiny_run(tiny_overrides):
    """`tiny_run(run_dir, *overrides)` -> a validated RunConfig on the tiny dataset.

    Layer 0 has an FwPKM branch and layer 1 a static PKM MLP, so fast weights and memory statistics
    are part of every check.
    """
    from fwpkm_megatron.config import load_config

    def make(run_dir: Path, *overrides: str):
        return load_config(None, [*tiny_overrides, f"train.run_dir={run_dir}", *overrides])

    return make


@pytest.fixture(scope="session")
def train_and_export():
    """`train_and_export(run, out)` -> (last checkpoint step dir, export dir): trains `run` to its end
    in this process, then exports its last checkpoint to `out`."""
    import io

    def make(run, out: Path):
        from fwpkm_megatron.export import export_checkpoint
        from fwpkm_megatron.training import Trainer

        trainer = Trainer(run, console=io.StringIO())
        try:
            trainer.train()
        finally:
            trainer.close()
        return trainer.last_checkpoint, export_checkpoint(run.train.run_dir, out)

    return make


REPO_TMP = Path(__file__).resolve().parent.parent / ".pytest_tmp"  # gitignored
_session_tmp: str | None = None


def pytest_configure(config):
    # Test shapes are tiny: one intra-op thread is fastest, and it never oversubscribes the cores
    # when several test processes (or a parallel test's ranks) share the machine.
    torch.set_num_threads(1)
    # The known-benign library warnings (fwpkm_megatron/benign.py) stay out of the summary, as on the
    # command lines; pytest re-enables DeprecationWarnings per test, its ini filters come after that.
    from fwpkm_megatron import benign

    benign.silence()
    for entry in benign.WARNINGS:
        config.addinivalue_line("filterwarnings", f"ignore:{entry.message}:{entry.category.__name__}")
    # tmp_path lives in a fresh directory of this checkout, removed when the session ends: pytest's
    # default (/tmp/pytest-of-<user>/, the last three sessions kept) leaves data and runs in /tmp.
    # A fresh directory per session, so concurrent sessions in one checkout never share one.
    global _session_tmp
    if config.option.basetemp is None:
        REPO_TMP.mkdir(exist_ok=True)
        _session_tmp = tempfile.mkdtemp(prefix="session-", dir=REPO_TMP)
        config.option.basetemp = _session_tmp


def pytest_unconfigure(config):
    # The ranks of multi-process tests share streaming's /tmp filelocks and leave them to the next
    # run's sweep (data/stream.py); sweep now, so the suite leaves nothing behind.
    if "fwpkm_megatron.data.stream" in sys.modules:
        sys.modules["fwpkm_megatron.data.stream"].sweep_stale_shared_memory()
    if _session_tmp is not None:
        shutil.rmtree(_session_tmp, ignore_errors=True)
        try:
            REPO_TMP.rmdir()  # only when no other session of this checkout is running
        except OSError:
            pass
