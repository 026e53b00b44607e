"""Resumable prep and layout-independent streaming, single process.

What is checked against what:
- a prep interrupted after some work units, then rerun, against an uninterrupted prep: every file of
  the result byte-identical, and only the missing units tokenized again;
- a prep SIGKILLed mid-tokenization (2 worker processes), then rerun with 2 workers, against the same;
- finished work is keyed by content: a rerun that changes only assembly options (seq_len, packing,
  compression) tokenizes nothing again, a bad line fails the prep without losing the units of the
  other file, and after the fix only the fixed file is tokenized; a second prep on the same target
  stops on the lock;
- a stream at batch_size 4 against one at batch_size 8 (same canonical nodes): batches 2k and 2k+1
  together are batch k, so the order does not depend on how the global batch is cut;
- a weighted mixture: per-epoch source counts against the weights, exact mid-epoch resume, and a
  mixture of differently tokenized datasets refused.
Multi-process loading (2 ranks, DP=2 -> DP=1) is in tests/dist/test_data_dist.py.
"""
from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fwpkm_megatron.config import DataConfig
from fwpkm_megatron.data import DataError, MixtureSource, build_loader, prepare_corpus
from fwpkm_megatron.data import prepare
from fwpkm_megatron.data import units as data_units
from fwpkm_megatron.data.stream import stored_samples

SEQ_LEN = 16
UNIT = 3000  # bytes of text per work unit: the corpora below make 8-12 units


def write_jsonl(path: Path, n_docs: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    words = np.array(["alpha", "beta", "gamma", "δ", "中", "def", "x", "=", "(", ")", "\n"])
    path.write_text("".join(json.dumps({"text": " ".join(rng.choice(words, rng.integers(30, 300)))}) + "\n"
                            for _ in range(n_docs)))


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Every file's bytes; the manifest's prep report (timings, workers) is left out."""
    files = {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
    manifest = json.loads(files.pop("manifest.json"))
    assert set(manifest.pop("report")) >= {"documents", "tokens", "skipped", "bad_records", "seconds"}
    return {**files, "manifest.json": json.dumps(manifest, sort_keys=True).encode()}


KW = dict(vocab_size=300, seq_len=SEQ_LEN, val_fraction=0.1, test_fraction=0.05, seed=3, progress=False)


@pytest.fixture
def corpus(tmp_path, monkeypatch) -> Path:
    monkeypatch.setattr(prepare, "UNIT_BYTES", UNIT)
    write_jsonl(tmp_path / "a.jsonl", 60, seed=0)
    write_jsonl(tmp_path / "b.jsonl", 40, seed=1)
    return tmp_path


def unit_ids(job) -> list[str]:
    return [u["id"] for u in job["units"]]


def test_resumed_prep_matches_uninterrupted(corpus, monkeypatch):
    inputs = [str(corpus / "*.jsonl")]
    real, calls = data_units._tokenize_job, []
    monkeypatch.setattr(data_units, "_tokenize_job", lambda job: (calls.extend(unit_ids(job)), real(job))[1])
    prepare_corpus(corpus / "ref", inputs=inputs, **KW)
    all_units, calls[:] = list(calls), []

    def die_after_three(job):
        if len(calls) >= 3:
            raise KeyboardInterrupt
        calls.extend(unit_ids(job))
        return real(job)

    monkeypatch.setattr(data_units, "_tokenize_job", die_after_three)
    with pytest.raises(KeyboardInterrupt):
        prepare_corpus(corpus / "out", inputs=inputs, **KW)
    assert not (corpus / "out").exists() and len(list((corpus / ".out.partial/units").glob("*/*.npz"))) == len(calls)
    done, calls[:] = list(calls), []
    monkeypatch.setattr(data_units, "_tokenize_job", lambda job: (calls.extend(unit_ids(job)), real(job))[1])
    manifest = prepare_corpus(corpus / "out", inputs=inputs, **KW)
    assert len(all_units) >= 8 and len(done) >= 3 and sorted(calls) == sorted(set(all_units) - set(done))
    assert tree_bytes(corpus / "out") == tree_bytes(corpus / "ref")
    assert not (corpus / ".out.partial").exists() and manifest["splits"]["test"]["documents"] == 5


def test_killed_parallel_prep_resumes_byte_identical(corpus):
    inputs = [str(corpus / "*.jsonl")]
    prepare_corpus(corpus / "ref", inputs=inputs, **KW)  # one worker, never interrupted
    script = f"""
import time, torch
torch.set_num_threads(1)
from fwpkm_megatron.data import prepare, units
prepare.UNIT_BYTES = {UNIT}
real = units._tokenize_job
def slow(job):
    time.sleep(0.3)
    return real(job)
units._tokenize_job = slow
prepare.prepare_corpus({str(corpus / 'out')!r}, inputs={inputs!r}, workers=2, **{KW!r})
"""
    child = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    units = corpus / ".out.partial" / "units"
    deadline = time.monotonic() + 120
    while len(list(units.glob("*/*.npz"))) < 2 and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(child.pid, signal.SIGKILL)  # the prep and its two workers, mid-tokenization
    child.wait()
    left = len(list(units.glob("*/*.npz")))
    assert 2 <= left < 8 and not (corpus / "out").exists()
    prepare_corpus(corpus / "out", inputs=inputs, workers=2, **KW)
    assert tree_bytes(corpus / "out") == tree_bytes(corpus / "ref")


def test_finished_units_survive_assembly_changes_and_bad_input(corpus, monkeypatch):
    inputs = [str(corpus / "*.jsonl")]
    tok = corpus / "tok.json"
    prepare_corpus(corpus / "ref", inputs=inputs, **KW)
    (corpus / "ref" / "tokenizer.json").rename(tok)
    kw = {**KW, "tokenizer_path": str(tok)}
    real, calls = data_units._tokenize_job, []
    monkeypatch.setattr(data_units, "_tokenize_job", lambda job: (calls.extend(unit_ids(job)), real(job))[1])
    real_write = prepare.write_splits

    def write_then_die(*args, **kwargs):
        real_write(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare, "write_splits", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        prepare_corpus(corpus / "out", inputs=inputs, **kw)
    monkeypatch.setattr(prepare, "write_splits", real_write)
    first, calls[:] = list(calls), []
    windowed = prepare_corpus(corpus / "out", inputs=inputs, **{**kw, "seq_len": 8, "packing": "window",
                                                                 "compression": "zstd"})
    assert first and calls == [] and windowed["packing"] == "window"  # assembly-only: nothing re-tokenized

    calls[:] = []
    with pytest.raises(DataError, match="train split: .* fewer than one sample"):  # after tokenizing a.jsonl
        prepare_corpus(corpus / "out2", inputs=[str(corpus / "a.jsonl")], **{**kw, "seq_len": 10**5})
    a_units, calls[:] = set(calls), []
    good_b = (corpus / "b.jsonl").read_bytes()
    (corpus / "b.jsonl").write_bytes(good_b + b'{"text": "cut\n')  # a bad last line in the other file
    with pytest.raises(DataError, match=r"b.jsonl:41: malformed JSON"):
        prepare_corpus(corpus / "out2", inputs=inputs, **kw)
    assert a_units == {p.stem for p in (corpus / ".out2.partial" / "units").glob("*/*.npz")}  # a's units kept
    (corpus / "b.jsonl").write_bytes(good_b)
    prepare_corpus(corpus / "out2", inputs=inputs, **kw)
    assert calls and not a_units & set(calls)  # only b.jsonl was tokenized
    prepare_corpus(corpus / "out3", inputs=inputs, **kw)
    assert tree_bytes(corpus / "out2") == tree_bytes(corpus / "out3")



def test_live_partial_is_locked(corpus):
    partial = corpus / ".out.partial"
    partial.mkdir()
    with open(partial / "lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(DataError, match="another fwpkm-prep is writing it"):
            prepare_corpus(corpus / "out", inputs=[str(corpus / "a.jsonl")], **KW)


# ---------------------------------------------------------------- stream order and mixtures

def rows(batches: list[torch.Tensor]) -> list[tuple]:
    return sorted(tuple(r) for b in batches for r in b.tolist())


@pytest.fixture(scope="module")
def two_sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    write_jsonl(root / "a.jsonl", 40, seed=4)
    write_jsonl(root / "b.jsonl", 40, seed=5)
    kw = dict(vocab_size=300, seq_len=SEQ_LEN, val_fraction=0.1, seed=0, progress=False)
    prepare_corpus(root / "A", inputs=[str(root / "a.jsonl")], **kw)
    prepare_corpus(root / "B", inputs=[str(root / "b.jsonl")], tokenizer_path=str(root / "A/tokenizer.json"), **kw)
    prepare_corpus(root / "C", inputs=[str(root / "b.jsonl")], **{**kw, "vocab_size": 290})
    return root


def test_stream_order_matches_across_batch_cuts(two_sets):
    cfg = DataConfig(path=str(two_sets / "A"))
    with build_loader(cfg, "train", batch_size=8, seq_len=SEQ_LEN, seed=1) as big, \
            build_loader(cfg, "train", batch_size=4, seq_len=SEQ_LEN, seed=1) as small:
        assert small.batches_per_epoch in (2 * big.batches_per_epoch, 2 * big.batches_per_epoch + 1)
        for _ in range(big.batches_per_epoch + 2):  # into epoch 1
            b = big.next_batch()
            assert torch.equal(torch.cat([small.next_batch(), small.next_batch()]), b)
            if big.batch_in_epoch == big.batches_per_epoch and small.batches_per_epoch % 2:
                small.next_batch()  # the small cut fits one more batch into the epoch


def test_mixture_matches_weights_and_resumes(two_sets):
    cfg = DataConfig(path="unused")
    mixture = [MixtureSource(str(two_sets / "A"), weight=3.0), MixtureSource(str(two_sets / "B"), weight=1.0)]
    def ids(split_dir):
        return {tuple(r) for r in stored_samples(split_dir).tolist()}
    a, b = ids(two_sets / "A/train"), ids(two_sets / "B/train")
    kw = dict(batch_size=4, seq_len=SEQ_LEN, seed=2, mixture=mixture)
    with build_loader(cfg, "train", **kw) as s:
        epoch = [s.next_batch() for _ in range(s.batches_per_epoch)]
        n = s.num_samples
        assert n == len(a) + len(b)
        got = rows(epoch)
        from_a = sum(r in a for r in got)
        assert abs(from_a - 0.75 * len(got)) <= 0.02 * n + 4 and from_a + sum(r in b for r in got) == len(got)
        state = None
        for _ in range(3):
            s.next_batch()
        state = s.state_dict()
        rest = [s.next_batch() for _ in range(5)]
    with build_loader(cfg, "train", **kw) as resumed:
        resumed.load_state_dict(json.loads(json.dumps(state)))
        assert all(torch.equal(x, y) for x, y in zip(rest, [resumed.next_batch() for _ in range(5)]))
    with pytest.raises(DataError, match="tokenized differently"):
        build_loader(cfg, "train", batch_size=4, seq_len=SEQ_LEN, seed=2,
                     mixture=[MixtureSource(str(two_sets / "A")), MixtureSource(str(two_sets / "C"))])
