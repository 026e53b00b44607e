"""The data path: prepared shards hold exactly the documents, and the stream resumes exactly.

What is checked against what:
- packed samples against an independent per-document encode (token level) and the source text
  (decoded), with EOS exactly at document ends;
- manifest counts against the MDS shard indexes; val documents against train documents;
- a resumed TokenStream against one uninterrupted stream, mid-epoch and across epoch boundaries;
- a cropped stream against the prefix of the full-length stream;
- every bad input against its DataError naming the file or number; an interrupted or refused prep
  against the directory it must leave untouched.
Tiny corpora are written to tmp_path; one small stdlib run covers the default corpus. A new failure
mode of prep or the stream gets its case here, next to the closest existing one.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fwpkm_megatron.config import DataConfig
from fwpkm_megatron.data import (DataError, build_loader, existing_prep, load_tokenizer, prepare_corpus,
                                 read_manifest)
from fwpkm_megatron.data import layout, prepare, stream
from fwpkm_megatron.data.stream import stored_samples
from fwpkm_megatron.data.tokenizer import EOS_TOKEN

SEQ_LEN = 16
WORDS = ["alpha", "beta", "gamma", "δέλτα", "epsilon", "中文", "zeta", "eta🙂", "theta", "iota", "kappa",
         "def", "return", "self", "\t", "\r\n", "\n", "(", ")", ":", "=", "x", "y", "0", "1"]


def write_corpus(root: Path, n_docs: int = 30, seed: int = 0) -> list[Path]:
    """Documents of 40-400 words with non-ASCII text, CRLF, and the EOS literal inside one of them."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n_docs):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(40, 400)))
        if i == 3:
            text += f" a source file may mention {EOS_TOKEN} literally"
        path = root / f"doc{i:03d}.txt"
        path.write_bytes(text.encode())
        paths.append(path)
    return paths


def prep_tiny(out: Path, corpus: Path, **kw) -> dict:
    args = dict(inputs=[str(corpus / "*.txt")], vocab_size=300, seq_len=SEQ_LEN, val_fraction=0.25, seed=0,
                progress=False)
    return prepare_corpus(out, **{**args, **kw})


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A prepared tiny corpus, shared read-only by the tests below."""
    root = tmp_path_factory.mktemp("tiny")
    write_corpus(root / "corpus")
    prep_tiny(root / "data", root / "corpus")
    return root / "data"


def shard_tokens(data: Path, split: str) -> np.ndarray:
    """All samples of a split in storage order, [S, seq_len + 1], read without shuffling."""
    return stored_samples(data / split)


def split_documents(data: Path, split: str) -> list[str]:
    return list(layout.split_documents(data, split))


def split_paths(data: Path, split: str) -> list[str]:
    """Source paths of a split's documents (text files: one document per file)."""
    manifest, documents = read_manifest(data), json.loads((data / "documents.json").read_text())
    held = {s: set(ids) for s, ids in documents["held_out"].items()}
    paths = [f["path"] for f in manifest["source"]["file_list"] if f["documents"]]
    return [p for i, p in enumerate(paths) if next((s for s in held if i in held[s]), "train") == split]


# ---------------------------------------------------------------- prep output

@pytest.mark.parametrize("split", ["train", "val"])
def test_packed_samples_match_documents_joined_by_eos(tiny, split):
    manifest, tok = read_manifest(tiny), load_tokenizer(tiny)
    samples = shard_tokens(tiny, split)
    assert samples.shape[1] == SEQ_LEN + 1 and samples.dtype == np.uint16
    flat = samples.reshape(-1).tolist()
    docs = split_documents(tiny, split)
    eos = manifest["eos_id"]

    # ref: one encode per document (not the batched path), EOS literal kept as text
    tok.encode_special_tokens = True
    ref, doc_ends = [], []
    for doc in docs:
        ref += tok.encode(doc, add_special_tokens=False).ids + [eos]
        doc_ends.append(len(ref) - 1)
    assert flat == ref[: len(flat)]
    assert len(ref) - len(flat) == manifest["splits"][split]["dropped_tokens"] < SEQ_LEN + 1
    assert [i for i, t in enumerate(flat) if t == eos] == [i for i in doc_ends if i < len(flat)]

    decoded = tok.decode(flat, skip_special_tokens=False).rstrip("\ufffd")  # a cut may split a UTF-8 char
    assert "".join(d + EOS_TOKEN for d in docs).startswith(decoded)
    assert len(decoded) > 0.9 * sum(len(d) for d in docs)


def test_manifest_counts_match_shards(tiny):
    manifest = read_manifest(tiny)
    for split in ("train", "val"):
        index = json.loads((tiny / split / "index.json").read_text())
        counts = manifest["splits"][split]
        assert sum(s["samples"] for s in index["shards"]) == counts["samples"] == len(shard_tokens(tiny, split))
        assert counts["tokens"] == counts["samples"] * (SEQ_LEN + 1) + counts["dropped_tokens"]
        assert counts["documents"] == len(split_paths(tiny, split))
    assert manifest["source"]["files"] == manifest["source"]["documents"] == 30 and manifest["vocab_size"] == load_tokenizer(tiny).get_vocab_size()
    assert manifest["dtype"] == "uint16" and manifest["eos_token"] == EOS_TOKEN


def test_val_documents_are_disjoint_from_train(tiny):
    train, val = set(split_paths(tiny, "train")), set(split_paths(tiny, "val"))
    assert not train & val and len(train | val) == 30
    assert len(val) == round(0.25 * 30)
    sha = {f["path"]: f["sha256"] for f in read_manifest(tiny)["source"]["file_list"]}
    assert not {sha[p] for p in train} & {sha[p] for p in val}


def test_stdlib_prep_matches_manifest(tmp_path):
    manifest = prepare_corpus(tmp_path / "std", vocab_size=512, seq_len=64, max_bytes=200_000, progress=False)
    assert manifest["source"]["kind"] == "stdlib" and 0 < manifest["source"]["bytes"] <= 200_000
    paths = [f["path"] for f in manifest["source"]["file_list"]]
    assert all("site-packages" not in p and "/test/" not in p for p in paths)
    assert read_manifest(tmp_path / "std") == manifest
    again = prepare_corpus(tmp_path / "std2", vocab_size=512, seq_len=64, max_bytes=200_000, progress=False)
    assert again["source"]["content_sha256"] == manifest["source"]["content_sha256"]  # seeded selection
    assert again["splits"] == manifest["splits"]


# ---------------------------------------------------------------- the stream

def take(s: stream.TokenStream, n: int) -> list[torch.Tensor]:
    return [s.next_batch() for _ in range(n)]


def test_stream_epoch_is_a_permutation_of_the_split(tiny):
    s = build_loader(DataConfig(path=str(tiny)), "val", batch_size=4, seq_len=SEQ_LEN, seed=3)
    n = s.batches_per_epoch
    assert s.num_samples // 4 - 2 <= n <= s.num_samples // 4  # minus streaming's padding repeats
    e0, e1 = torch.cat(take(s, n)), torch.cat(take(s, n))
    assert e0.shape == (4 * n, SEQ_LEN + 1) and e0.dtype == torch.int64
    full = {tuple(r) for r in shard_tokens(tiny, "val").tolist()}
    for epoch in (e0, e1):
        rows = {tuple(r) for r in epoch.tolist()}
        assert len(rows) == len(epoch) and rows <= full
    assert not torch.equal(e0, e1)  # reshuffled per epoch
    assert (s.epoch, s.batch_in_epoch) == (1, n)
    s.close()


def test_resumed_stream_matches_uninterrupted(tiny):
    cfg = DataConfig(path=str(tiny))
    kw = dict(batch_size=4, seq_len=SEQ_LEN, seed=5)
    ref_stream = build_loader(cfg, "train", **kw)
    n = ref_stream.batches_per_epoch
    ref = take(ref_stream, 2 * n + 3)
    ref_stream.close()
    for k in (0, 3, n - 1, n, n + 1, 2 * n):  # mid-epoch, at and just past each epoch boundary
        first = build_loader(cfg, "train", **kw)
        take(first, k)
        state = json.loads(json.dumps(first.state_dict()))  # survives a checkpoint round trip
        first.close()
        resumed = build_loader(cfg, "train", **kw)
        resumed.load_state_dict(state)
        got = take(resumed, len(ref) - k)
        resumed.close()
        assert all(torch.equal(a, b) for a, b in zip(got, ref[k:])), f"resume after {k} batches diverged"


def test_rewound_stream_matches_its_first_pass(tiny):
    with build_loader(DataConfig(path=str(tiny)), "val", batch_size=4, seq_len=SEQ_LEN, seed=6) as s:
        start = s.state_dict()
        take(s, 2)
        mid = s.state_dict()
        first = take(s, s.batches_per_epoch + 2)  # into epoch 1
        s.load_state_dict(mid)  # back into epoch 0 of the same, used stream
        assert all(torch.equal(a, b) for a, b in zip(take(s, len(first)), first))
        s.load_state_dict(start)
        assert all(torch.equal(a, b) for a, b in zip(take(s, 2 + len(first))[2:], first))


def test_stream_state_of_other_seed_is_rejected(tiny):
    cfg = DataConfig(path=str(tiny))
    state = build_loader(cfg, "val", batch_size=4, seq_len=SEQ_LEN, seed=1).state_dict()
    other = build_loader(cfg, "val", batch_size=2, seq_len=SEQ_LEN, seed=2)
    with pytest.raises(DataError, match="seed: saved 1, now 2"):
        other.load_state_dict(state)
    with pytest.raises(DataError, match="version 1"):
        other.load_state_dict({**state, "version": 1})


def test_cropped_stream_matches_prefix_of_full_stream(tiny):
    cfg = DataConfig(path=str(tiny), shuffle=False)
    full = build_loader(cfg, "val", batch_size=3, seq_len=SEQ_LEN, seed=0)
    short = build_loader(cfg, "val", batch_size=3, seq_len=5, seed=0)
    for a, b in zip(take(full, 4), take(short, 4)):
        assert b.shape == (3, 6) and torch.equal(a[:, :6], b)
    with pytest.raises(DataError, match=f"seq_len=64 exceeds the prepared seq_len={SEQ_LEN}"):
        build_loader(cfg, "val", batch_size=3, seq_len=64, seed=0)


def test_train_and_val_streams_coexist_without_contacting_remote(tiny):
    cfg = DataConfig(path=str(tiny), remote="s3://fwpkm-no-such-bucket/data/")  # never resolved: all local
    train = build_loader(cfg, "train", batch_size=4, seq_len=SEQ_LEN, seed=0)
    val = build_loader(cfg, "val", batch_size=2, seq_len=SEQ_LEN, seed=0)
    for _ in range(3):
        assert train.next_batch().shape == (4, SEQ_LEN + 1) and val.next_batch().shape == (2, SEQ_LEN + 1)
    assert (train.vocab_size, train.eos_id) == (val.vocab_size, val.eos_id)
    train.close()
    val.close()


def test_remote_mirror_matches_local_stream(tiny, tmp_path):
    mirror = tmp_path / "mirror"  # empty: manifest, tokenizer, index and shards all come from the remote
    kw = dict(batch_size=4, seq_len=SEQ_LEN, seed=9)
    with build_loader(DataConfig(path=str(mirror), remote=str(tiny)), "val", **kw) as remote, \
            build_loader(DataConfig(path=str(tiny)), "val", **kw) as local:
        assert all(torch.equal(a, b) for a, b in zip(take(remote, 5), take(local, 5)))
    assert load_tokenizer(mirror).get_vocab_size() == read_manifest(tiny)["vocab_size"]


def test_data_rank_layout_matches_environment(tiny, monkeypatch):
    assert stream._data_replication(0, 1) == 1
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    assert stream._data_replication(1, 2) == 2  # TP=2 inside DP=2: ranks 2, 3 read data rank 1
    with pytest.raises(DataError, match="RANK=3, WORLD_SIZE=4"):
        stream._data_replication(0, 2)
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.delenv("RANK")
    with pytest.raises(DataError, match="WORLD_SIZE=1"):
        build_loader(DataConfig(path=str(tiny)), "val", batch_size=1, seq_len=8, seed=0, rank=1, world_size=2)


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="needs Linux /dev/shm")
def test_stale_shm_sweep_matches_only_dead_prefixes(tiny):
    live = build_loader(DataConfig(path=str(tiny)), "val", batch_size=2, seq_len=8, seed=0)
    live.next_batch()
    maps = [line for line in open("/proc/self/maps") if "/dev/shm/" in line and "(deleted)" not in line]
    own = {line.split("/dev/shm/")[1].split()[0] for line in maps}
    assert own  # the live stream's segments
    prefix = f"{990000 + os.getpid() % 9999:06d}"
    stale = [Path(f"/dev/shm/{prefix}_locals"), Path(f"/dev/shm/{prefix}_barrier")]
    for path in stale:
        path.write_bytes(b"\0" * 8)
    removed = stream.sweep_stale_shared_memory()
    assert {str(p) for p in stale} <= set(removed) and not any(p.exists() for p in stale)
    assert own <= set(os.listdir("/dev/shm"))  # live segments stay
    live.next_batch()
    live.close()


def test_released_stream_removes_its_filelocks_only_with_no_live_prefix_above(tmp_path, monkeypatch):
    """streaming leaves `<tmp>/<prefix>_*_filelock` behind; a lone process removes its own once no live
    prefix lies above (a hole below one could stop another job's prefix walk short), later if need be.
    Only the release step runs here, on its own files: no real segment of any process is touched."""
    locks = [tmp_path / f"990001_{name}" for name in ("barrier_filelock", "cache_filelock")]
    for path in locks:
        path.write_text("")
    monkeypatch.setattr(stream, "_kept_filelocks", [])
    monkeypatch.setattr(stream, "_mapped_shm_names", lambda: {"990002_locals", "000001_locals"})
    stream.release_shared_memory([], ("990001", [str(p) for p in locks]))
    assert all(p.exists() for p in locks)                      # 990002 is live above: kept
    monkeypatch.setattr(stream, "_mapped_shm_names", lambda: {"000001_locals"})
    stream.release_shared_memory([], ("", []))                              # the next release retries
    assert not any(p.exists() for p in locks) and stream._kept_filelocks == []


# ---------------------------------------------------------------- errors and atomicity

def test_each_bad_input_raises_data_error_naming_it(tmp_path, monkeypatch):
    good = tmp_path / "good"
    write_corpus(good, n_docs=4)
    cases = []
    cases.append((dict(inputs=[str(tmp_path / "nothing/*.txt")]), "nothing/\\*.txt: no files matched"))
    (tmp_path / "empty").mkdir()
    for i in range(3):
        (tmp_path / "empty" / f"e{i}.txt").write_text("")
    cases.append((dict(inputs=[str(tmp_path / "empty/*.txt")]), "empty corpus"))
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9 latin-1")
    cases.append((dict(inputs=[str(good / "*.txt"), str(tmp_path / "bad.txt")]), "bad.txt: not UTF-8"))
    cases.append((dict(inputs=[str(good / "*.txt")], vocab_size=100), "vocab_size=100: does not fit"))
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    no_eos = Tokenizer(models.BPE())
    no_eos.pre_tokenizer = pre_tokenizers.ByteLevel()
    no_eos.train_from_iterator(["plain text"], trainers.BpeTrainer(vocab_size=300, show_progress=False))
    no_eos.save(str(tmp_path / "no_eos.json"))
    cases.append((dict(inputs=[str(good / "*.txt")], tokenizer_path=str(tmp_path / "no_eos.json")),
                  "no_eos.json: has no EOS token"))
    (tmp_path / "garbage.json").write_text("{not json")
    cases.append((dict(inputs=[str(good / "*.txt")], tokenizer_path=str(tmp_path / "garbage.json")),
                  "garbage.json: cannot load"))
    cases.append((dict(inputs=[str(good / "*.txt")], seq_len=100_000), "seq_len=100000: the corpus holds at most .* fewer than one sample"))
    cases.append((dict(inputs=[str(good / "doc000.txt")]), "doc000.txt.*need >= 2"))
    cases.append((dict(inputs=[str(good)]), "is a directory"))
    (tmp_path / "locked.txt").write_text("no permission")
    cases.append((dict(inputs=[str(good / "*.txt"), str(tmp_path / "locked.txt")]),
                  "locked.txt: cannot read \\(Permission denied\\)"))
    real_read = Path.read_bytes

    def read_bytes(path: Path) -> bytes:  # chmod does not stop root, so refuse like the OS would
        if path.name == "locked.txt":
            raise PermissionError(13, "Permission denied", str(path))
        return real_read(path)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    for kwargs, message in cases:
        with pytest.raises(DataError, match=message):
            prepare_corpus(tmp_path / "out", **{"progress": False, "vocab_size": 300, **kwargs})
        assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_broken_prepared_dir_raises_data_error_naming_it(tiny, tmp_path):
    with pytest.raises(DataError, match="nowhere/manifest.json: missing"):
        read_manifest(tmp_path / "nowhere")
    broken = tmp_path / "broken"
    shutil.copytree(tiny, broken)
    (broken / "val" / "index.json").unlink()
    with pytest.raises(DataError, match="val/index.json: shard index missing"):
        build_loader(DataConfig(path=str(broken)), "train", batch_size=2, seq_len=8, seed=0)
    shutil.copytree(tiny, broken, dirs_exist_ok=True)
    manifest = json.loads((broken / "manifest.json").read_text())
    (broken / "manifest.json").write_text(json.dumps({**manifest, "vocab_size": 999}))
    with pytest.raises(DataError, match="tokenizer.json: vocab size .* != manifest vocab_size 999"):
        load_tokenizer(broken)
    (broken / "manifest.json").write_text("{")
    with pytest.raises(DataError, match="manifest.json: unreadable or corrupt"):
        read_manifest(broken)


def test_interrupted_prep_leaves_previous_state(tmp_path, monkeypatch):
    corpus = tmp_path / "corpus"
    write_corpus(corpus, n_docs=8)
    real_write = prepare.write_splits

    def write_then_die(*args, **kwargs):
        real_write(*args, **kwargs)
        raise KeyboardInterrupt  # after the shards exist, before the manifest

    monkeypatch.setattr(prepare, "write_splits", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        prep_tiny(tmp_path / "data", corpus)
    assert not (tmp_path / "data").exists()
    assert list((tmp_path / ".data.partial" / "units").glob("*/*.npz"))  # kept for the next run

    monkeypatch.setattr(prepare, "write_splits", real_write)
    first = prep_tiny(tmp_path / "data", corpus)
    assert not (tmp_path / ".data.partial").exists()
    monkeypatch.setattr(prepare, "write_splits", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        prep_tiny(tmp_path / "data", corpus, seed=1, overwrite=True)
    assert read_manifest(tmp_path / "data") == first  # the old prep is intact


def test_dead_prep_temp_is_removed_by_next_prep(tmp_path):
    corpus = tmp_path / "corpus"
    write_corpus(corpus, n_docs=8)
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # its pid is now free: the temp looks like a killed prep's
    leftover = tmp_path / f".data.tmp-{child.pid}-deadbeef"
    (leftover / "train").mkdir(parents=True)
    prep_tiny(tmp_path / "data", corpus)
    assert not leftover.exists() and read_manifest(tmp_path / "data")


def test_overwrite_refusal_matches_request(tmp_path):
    corpus = tmp_path / "corpus"
    write_corpus(corpus, n_docs=8)
    first = prep_tiny(tmp_path / "data", corpus)
    kw = dict(inputs=[str(corpus / "*.txt")], vocab_size=300, seq_len=SEQ_LEN, val_fraction=0.25, seed=0)
    assert existing_prep(tmp_path / "data", **kw) == first
    assert existing_prep(tmp_path / "data", **{**kw, "seed": 1}) is None
    with pytest.raises(DataError, match="already holds a complete prep.*overwrite"):
        prep_tiny(tmp_path / "data", corpus)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="not empty and holds no manifest.json"):
        prep_tiny(tmp_path / "other", corpus)
    second = prep_tiny(tmp_path / "data", corpus, seed=1, overwrite=True)
    assert read_manifest(tmp_path / "data") == second != first


def test_older_format_prep_is_replaced_with_a_warning(tmp_path, caplog):
    corpus = tmp_path / "corpus"
    write_corpus(corpus, n_docs=8)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "manifest.json").write_text(json.dumps({"format": "fwpkm-megatron/packed-tokens-v1"}))
    manifest = prep_tiny(tmp_path / "data", corpus)
    assert "older format" in caplog.text and read_manifest(tmp_path / "data") == manifest


def test_cli_reuses_matching_prep(tmp_path, capsys):
    from fwpkm_megatron.cli.prep import main
    corpus = tmp_path / "corpus"
    write_corpus(corpus, n_docs=8)
    argv = ["--out", str(tmp_path / "data"), "--input", str(corpus / "*.txt"), "--vocab-size", "300",
            "--seq-len", str(SEQ_LEN), "--val-fraction", "0.25"]
    assert main(argv) == 0 and "wrote" in capsys.readouterr().out
    assert main(argv) == 0 and "reusing" in capsys.readouterr().out
    assert main(argv + ["--seed", "7"]) == 2
    assert "different request" in capsys.readouterr().err
    assert main(["--out", str(tmp_path / "x"), "--input", str(tmp_path / "none*.txt")]) == 2
    assert "no files matched" in capsys.readouterr().err


def test_data_config_cache_fields_are_checked():
    from fwpkm_megatron.config import DataConfig

    assert DataConfig(path="p", remote="s3://b/d", local="/c", cache_limit="50gb").problems() == []
    assert DataConfig(path="p", remote="s3://b/d", local="/c").cache_dir == "/c"
    assert DataConfig(path="p", remote="s3://b/d").cache_dir == "p"  # configs from before `local`
    assert DataConfig(path="p").cache_dir == "p"
    assert DataConfig(path="p", local="/c", cache_limit="1gb").problems() == [
        "data.local='/c': is the cache of data.remote; without a remote set data.path",
        "data.cache_limit='1gb': needs data.remote (a local dataset has no cache)"]
    assert DataConfig(path="p", remote="s3://b/d", cache_limit="lots").problems() == [
        "data.cache_limit='lots': must be a size such as '50gb' or '800mb'"]
