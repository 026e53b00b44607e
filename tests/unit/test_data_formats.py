"""Corpus formats, packing modes, shard options, and every bad input the issue lists.

What is checked against what:
- JSONL, Parquet and HF-on-disk corpora: packed samples against an independent per-document encode of
  the documents the split should hold (EOS exactly at document ends), and split_documents against them;
- window packing: every sample is a window of one document; dropped counts add up;
- uint32 + zstd shards and a test split: the same tokens as uint16 uncompressed;
- each bad input (malformed JSON line, missing text field, unreadable Parquet, empty corpus, a vocab
  that does not fit the dtype, a tokenizer/shards mismatch at training time) against its one-line
  DataError naming the file (and line), with nothing left behind at the target;
- .jsonl.zst and .txt.gz inputs (2 workers, several chunks per compressed file) against the same text
  plain: identical shards and split documents;
- an HF tokenizer directory (with tokenizer.json, or slow GPT-2 files converted offline): EOS from its
  tokenizer_config.json, or --eos-token, against the ids and an independent per-document encode;
- validation before work: every bad input reported on its own line, argument and tokenizer problems
  together, nothing started.
Object-store inputs and outputs are in test_data_s3.py. A new input format or failure mode gets its case here, next to the closest one.
"""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from fwpkm_megatron.config import DataConfig
from fwpkm_megatron.data import DataError, build_loader, load_tokenizer, prepare_corpus, read_manifest
from fwpkm_megatron.data import layout, prepare
from fwpkm_megatron.data.stream import stored_samples

SEQ_LEN = 16
WORDS = ["alpha", "beta", "γάμμα", "中文", "eta🙂", "def", "return", "\n", "\t", "(", ")", "x", "0", "1"]


def documents(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 200))) for _ in range(n)]


def expected_split(docs: list[str], data: Path, split: str) -> list[str]:
    held = json.loads((data / "documents.json").read_text())["held_out"]
    ids = set(held.get(split, [])) if split != "train" else set(range(len(docs))) - {
        i for s in held.values() for i in s}
    return [d for i, d in enumerate(docs) if i in ids]


def shard_tokens(data: Path, split: str) -> np.ndarray:
    return stored_samples(data / split)


def assert_packed(data: Path, split: str, docs: list[str]) -> None:
    """ref: one encode per document + EOS, concatenated, cut into samples; and the decoded text."""
    manifest, tok = read_manifest(data), load_tokenizer(data)
    tok.encode_special_tokens = True
    ref = []
    for doc in docs:
        ref += tok.encode(doc, add_special_tokens=False).ids + [manifest["eos_id"]]
    flat = shard_tokens(data, split).reshape(-1).tolist()
    assert flat == ref[: len(flat)] and len(ref) - len(flat) < SEQ_LEN + 1
    assert list(layout.split_documents(data, split)) == docs


def write_parquet(path: Path, rows: list[dict], row_group_size: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=row_group_size)


def write_hf_dir(path: Path, rows: list[dict]) -> None:
    """The layout datasets' save_to_disk writes: Arrow stream files listed in state.json."""
    import pyarrow as pa
    path.mkdir(parents=True)
    table = pa.Table.from_pylist(rows)
    names = []
    for i, (lo, hi) in enumerate([(0, len(rows) // 2), (len(rows) // 2, len(rows))]):
        name = f"data-{i:05d}-of-00002.arrow"
        with pa.OSFile(str(path / name), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table.slice(lo, hi - lo))
        names.append({"filename": name})
    (path / "state.json").write_text(json.dumps({"_data_files": names, "_split": "train"}))
    (path / "dataset_info.json").write_text("{}")


def prep(out: Path, inputs: list[str], **kw) -> dict:
    args = dict(inputs=inputs, vocab_size=300, seq_len=SEQ_LEN, val_fraction=0.2, seed=0, progress=False)
    return prepare_corpus(out, **{**args, **kw})


# ---------------------------------------------------------------- formats round trip

def test_jsonl_prep_matches_documents(tmp_path):
    docs = documents(24)
    lines = []
    for i, doc in enumerate(docs):
        lines.append(json.dumps({"id": i, "body": doc, "meta": {"x": 1}}, ensure_ascii=i % 2 == 0))
        if i == 5:
            lines += ["", json.dumps({"id": -1, "body": ""}), json.dumps({"id": -2, "body": None})]
    (tmp_path / "a.jsonl").write_text("\n".join(lines[:15]) + "\n")
    (tmp_path / "b.jsonl").write_text("\n".join(lines[15:]))  # no final newline
    manifest = prep(tmp_path / "data", [str(tmp_path / "*.jsonl")], text_field="body")
    assert manifest["source"]["documents"] == 24 and manifest["source"]["skipped_empty"] == 2
    assert [f["format"] for f in manifest["source"]["file_list"]] == ["jsonl", "jsonl"]
    for split in ("train", "val"):
        assert_packed(tmp_path / "data", split, expected_split(docs, tmp_path / "data", split))
        assert manifest["splits"][split]["documents"] == len(expected_split(docs, tmp_path / "data", split))


def test_parquet_and_hf_prep_match_documents(tmp_path):
    docs = documents(20, seed=1)
    write_parquet(tmp_path / "c.parquet", [{"text": d, "n": i} for i, d in enumerate(docs[:12])], row_group_size=5)
    write_hf_dir(tmp_path / "hf", [{"text": d} for d in docs[12:]])
    manifest = prep(tmp_path / "data", [str(tmp_path / "c.parquet"), str(tmp_path / "hf")])
    assert [f["format"] for f in manifest["source"]["file_list"]] == ["parquet", "hf"]
    assert manifest["source"]["documents"] == 20
    for split in ("train", "val"):
        assert_packed(tmp_path / "data", split, expected_split(docs, tmp_path / "data", split))


def test_window_packing_keeps_samples_inside_documents(tmp_path):
    docs = documents(16, seed=2)
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    manifest = prep(tmp_path / "data", [str(tmp_path / "d.jsonl")], packing="window")
    tok = load_tokenizer(tmp_path / "data")
    tok.encode_special_tokens = True
    width = SEQ_LEN + 1
    for split in ("train", "val"):
        ref = []
        for doc in expected_split(docs, tmp_path / "data", split):
            ids = tok.encode(doc, add_special_tokens=False).ids + [manifest["eos_id"]]
            ref += [ids[i: i + width] for i in range(0, len(ids) - width + 1, width)]
        assert shard_tokens(tmp_path / "data", split).tolist() == ref
        counts = manifest["splits"][split]
        assert counts["samples"] == len(ref) and counts["dropped_tokens"] == counts["tokens"] - len(ref) * width


def test_uint32_zstd_test_split_matches_uint16_plain(tmp_path):
    docs = documents(30, seed=3)
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    plain = prep(tmp_path / "plain", [str(tmp_path / "d.jsonl")], test_fraction=0.1)
    packed = prep(tmp_path / "packed", [str(tmp_path / "d.jsonl")], test_fraction=0.1, dtype="uint32",
                  compression="zstd")
    assert set(plain["splits"]) == {"train", "val", "test"} and packed["dtype"] == "uint32"
    index = json.loads((tmp_path / "packed" / "test" / "index.json").read_text())
    assert index["shards"][0]["compression"] == "zstd"
    for split in ("train", "val", "test"):
        a, b = shard_tokens(tmp_path / "plain", split), shard_tokens(tmp_path / "packed", split)
        assert b.dtype == np.uint32 and np.array_equal(a, b)
    with build_loader(DataConfig(path=str(tmp_path / "packed")), "test", batch_size=1, seq_len=SEQ_LEN, seed=0,
                      num_canonical_nodes=1) as s:
        assert s.next_batch().shape == (1, SEQ_LEN + 1)


# ---------------------------------------------------------------- bad input

def test_each_bad_input_names_file_and_line(tmp_path):
    good = [json.dumps({"text": d}) for d in documents(6, seed=4)]
    cases = []
    (tmp_path / "bad.jsonl").write_text("\n".join(good[:2] + ['{"text": "unterminated'] + good[2:]))
    cases.append(([str(tmp_path / "bad.jsonl")], {}, r"bad.jsonl:3: malformed JSON"))
    (tmp_path / "field.jsonl").write_text("\n".join(good[:1] + [json.dumps({"body": "x"})]))
    cases.append(([str(tmp_path / "field.jsonl")], {}, r"field.jsonl:2: no text field 'text' \(keys: body\)"))
    (tmp_path / "type.jsonl").write_text(json.dumps({"text": 7}))
    cases.append(([str(tmp_path / "type.jsonl")], {}, r"type.jsonl:1: field 'text' is int, not a string"))
    (tmp_path / "list.jsonl").write_text("[1, 2]\n")
    cases.append(([str(tmp_path / "list.jsonl")], {}, r"list.jsonl:1: expected a JSON object"))
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 this is not parquet")
    cases.append(([str(tmp_path / "broken.parquet")], {}, r"broken.parquet: unreadable Parquet"))
    write_parquet(tmp_path / "cols.parquet", [{"body": "x"}], row_group_size=1)
    cases.append(([str(tmp_path / "cols.parquet")], {}, r"cols.parquet: no column 'text' \(columns: body\)"))
    (tmp_path / "empty.jsonl").write_text('{"text": ""}\n\n{"text": null}\n')
    cases.append(([str(tmp_path / "empty.jsonl")], {}, "empty corpus: no non-empty documents"))
    (tmp_path / "ok.jsonl").write_text("\n".join(good))
    cases.append(([str(tmp_path / "ok.jsonl")], {"vocab_size": 70_000, "dtype": "uint16"},
                  "vocab_size=70000: does not fit.*uint16"))
    big = json.loads((_small_tokenizer(tmp_path)).read_text())
    big["model"]["vocab"]["far"] = 70_000  # a sparse id: the embedding would need 70,001 rows
    (tmp_path / "big.json").write_text(json.dumps(big))
    cases.append(([str(tmp_path / "ok.jsonl")], {"tokenizer_path": str(tmp_path / "big.json"), "dtype": "uint16"},
                  "vocab_size=70001 does not fit uint16"))
    cases.append(([str(tmp_path / "ok.jsonl")], {"fmt": "parquet"}, "ok.jsonl: unreadable Parquet"))
    for inputs, kwargs, message in cases:
        with pytest.raises(DataError, match=message):
            prep(tmp_path / "out", inputs, **kwargs)
        assert not (tmp_path / "out").exists(), message  # the partial keeps only finished, valid work
        assert not (tmp_path / ".out.partial" / "final").exists(), message


def _small_tokenizer(tmp_path: Path) -> Path:
    from fwpkm_megatron.data.tokenizer import train_bpe
    path = tmp_path / "small.json"
    train_bpe(documents(5), 300).save(str(path))
    return path


def test_tokenizer_shards_mismatch_stops_training_with_file(tmp_path):
    docs = documents(12, seed=5)
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    prep(tmp_path / "data", [str(tmp_path / "d.jsonl")])
    shutil.copyfile(_small_tokenizer(tmp_path), tmp_path / "data" / "tokenizer.json")
    with pytest.raises(DataError, match="data/tokenizer.json: does not match the tokenizer the shards"):
        build_loader(DataConfig(path=str(tmp_path / "data")), "train", batch_size=1, seq_len=8, seed=0)


def test_cli_reads_jsonl_with_text_field(tmp_path, capsys):
    from fwpkm_megatron.cli.prep import main
    docs = documents(10, seed=6)
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"content": d}) + "\n" for d in docs))
    argv = ["--out", str(tmp_path / "data"), "--input", str(tmp_path / "d.jsonl"), "--text-field", "content",
            "--vocab-size", "300", "--seq-len", str(SEQ_LEN), "--val-fraction", "0.2", "--compression", "zstd"]
    assert main(argv) == 0 and "wrote" in capsys.readouterr().out
    assert main(argv) == 0 and "reusing" in capsys.readouterr().out
    assert main(argv[:-4] + ["--text-field", "text", "--overwrite"]) == 2
    assert "d.jsonl:1: no text field 'text'" in capsys.readouterr().err
    assert read_manifest(tmp_path / "data")["source"]["text_field"] == "content"  # the old prep is intact


# ---------------------------------------------------------------- compressed inputs, pretrained tokenizers, validation

def test_compressed_inputs_match_plain(tmp_path):
    import gzip

    import zstandard

    docs = documents(30, seed=7)
    jsonl = "".join(json.dumps({"text": d}) + "\n" for d in docs[:26]).encode()
    (tmp_path / "plain").mkdir()
    (tmp_path / "packed").mkdir()
    (tmp_path / "plain" / "a.jsonl").write_bytes(jsonl)
    (tmp_path / "packed" / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(jsonl))
    for i, doc in enumerate(docs[26:]):
        (tmp_path / "plain" / f"t{i}.txt").write_text(doc)
        (tmp_path / "packed" / f"t{i}.txt.gz").write_bytes(gzip.compress(doc.encode()))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(prepare, "UNIT_BYTES", 1500)  # several chunks in the .zst: read forward, in order
        plain = prep(tmp_path / "p", [str(tmp_path / "plain/*")])
        packed = prep(tmp_path / "z", [str(tmp_path / "packed/*")], workers=2)
    assert [f["format"] for f in packed["source"]["file_list"]] == ["jsonl"] + ["text"] * 4
    assert packed["splits"] == plain["splits"] and packed["source"]["documents"] == 30
    for split in ("train", "val"):
        assert np.array_equal(shard_tokens(tmp_path / "p", split), shard_tokens(tmp_path / "z", split))
    assert list(layout.split_documents(tmp_path / "z", "val")) == list(layout.split_documents(tmp_path / "p", "val"))


def test_hf_tokenizer_dir_and_eos_token_are_used(tmp_path):
    from tokenizers import AddedToken

    tok = Tokenizer.from_file(str(_small_tokenizer(tmp_path)))
    tok.add_special_tokens([AddedToken("</s>", special=True)])
    hf = tmp_path / "hf_tok"
    hf.mkdir()
    tok.save(str(hf / "tokenizer.json"))
    (hf / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "</s>"}}))
    docs = documents(12, seed=8)
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    manifest = prep(tmp_path / "a", [str(tmp_path / "d.jsonl")], tokenizer_path=str(hf))
    assert manifest["eos_token"] == "</s>" and manifest["eos_id"] == tok.token_to_id("</s>")
    assert_packed(tmp_path / "a", "train", expected_split(docs, tmp_path / "a", "train"))
    chosen = prep(tmp_path / "b", [str(tmp_path / "d.jsonl")], tokenizer_path=str(hf), eos_token="<|endoftext|>")
    assert chosen["eos_id"] == tok.token_to_id("<|endoftext|>") != manifest["eos_id"]
    with pytest.raises(DataError, match=r"hf_tok: has no EOS token '<nope>' \(--eos-token\) in its vocab"):
        prep(tmp_path / "c", [str(tmp_path / "d.jsonl")], tokenizer_path=str(hf), eos_token="<nope>")

    slow = tmp_path / "slow_tok"  # no tokenizer.json: GPT-2 style vocab.json + merges.txt, converted offline
    slow.mkdir()
    model = json.loads(Tokenizer.from_file(str(_small_tokenizer(tmp_path))).to_str())["model"]
    (slow / "vocab.json").write_text(json.dumps(model["vocab"]))
    (slow / "merges.txt").write_text("#version: 0.2\n" + "".join(
        (m if isinstance(m, str) else " ".join(m)) + "\n" for m in model["merges"]))
    (slow / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GPT2Tokenizer",
                                                             "eos_token": "<|endoftext|>"}))
    converted = prep(tmp_path / "s", [str(tmp_path / "d.jsonl")], tokenizer_path=str(slow))
    assert converted["eos_token"] == "<|endoftext|>"
    assert_packed(tmp_path / "s", "train", expected_split(docs, tmp_path / "s", "train"))


def test_validation_reports_every_problem_before_work(tmp_path):
    good = [json.dumps({"text": d}) for d in documents(8, seed=9)]
    (tmp_path / "ok.jsonl").write_text("\n".join(good))
    (tmp_path / "x.jsonl").write_text("\n".join(good[:1] + ["{oops"] + good[1:]))
    (tmp_path / "y.jsonl").write_text("\n".join([json.dumps({"body": "b"})] + good))
    with pytest.raises(DataError) as err:
        prep(tmp_path / "out", [str(tmp_path / "*.jsonl")])
    assert str(err.value).splitlines()[0].endswith("x.jsonl:2: malformed JSON (Expecting property name "
                                                   "enclosed in double quotes: line 1 column 2 (char 1))")
    assert "y.jsonl:1: no text field 'text' (keys: body)" in str(err.value).splitlines()[1]
    assert not (tmp_path / ".out.partial").exists()  # nothing was started
    with pytest.raises(DataError) as err:
        prep(tmp_path / "out", [str(tmp_path / "ok.jsonl")], seq_len=0, tokenizer_path=str(tmp_path / "none.json"))
    assert str(err.value).splitlines() == ["seq_len=0: must be in [1, 1048576]",
                                           f"tokenizer {tmp_path / 'none.json'}: no such file or directory"]
    (tmp_path / "out").write_text("a file")
    with pytest.raises(DataError, match="out: exists and is not a directory"):
        prep(tmp_path / "out", [str(tmp_path / "ok.jsonl")])
