"""The associative-recall generator (`fwpkm-prep recall`): documents as specified, reproducible, with every
query beyond the attention reach, held-out documents disjoint from training ones, and the prepared shards
holding exactly the generated token sequences.

What is checked against what: each document's words against the spec (length, pools, pairs, gaps, the
value after each queried key), two generations of one seed against each other, the train and eval draws
against each other, the shards of the prepared directory against a re-generation from the sidecar's spec,
and bad arguments against their one-line errors (all problems together, nothing written).
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from fwpkm_megatron.data import DataError, load_tokenizer, read_manifest
from fwpkm_megatron.data.recall import (RecallSpec, make_document, read_eval_records, word_pools,
                                        write_recall)
from fwpkm_megatron.data.stream import stored_samples

SPEC = RecallSpec(docs=40, eval_docs=6, seq_len=96, keys=12, values=10, filler=20, min_pairs=2, max_pairs=4,
                  min_gap=20, max_gap=26, seed=3, eval_seed=4)


def test_recall_documents_match_spec():
    pools = word_pools(SPEC)
    assert sum(map(len, pools.values())) == len(set(sum(pools.values(), [])))  # disjoint pools
    assert {len(w) for w in sum(pools.values(), [])} == {4}  # no word is a prefix of another
    for i in range(30):
        doc = make_document(SPEC, pools, SPEC.seed, i)
        words, pairs = doc["words"], dict(doc["pairs"])
        assert len(words) == SPEC.seq_len and SPEC.min_pairs <= len(pairs) <= SPEC.max_pairs
        assert words[:2 * len(pairs)] == sum(doc["pairs"], [])
        assert doc["targets"], "every document asks at least one query"
        for p in doc["targets"]:
            key, value = words[p - 1], words[p]
            assert pairs[key] == value and value in pools["values"]
            previous = max(j for j in range(p - 1) if words[j] == key)
            assert p - 1 - previous > SPEC.min_gap, "the key was seen within the reach"
        queried = {p - 1 for p in doc["targets"]}
        outside = [w for j, w in enumerate(words[2 * len(pairs):], 2 * len(pairs)) if j not in queried
                   and j - 1 not in queried]
        assert set(outside) <= set(pools["filler"])
    again = make_document(SPEC, pools, SPEC.seed, 7)
    assert again == make_document(SPEC, pools, SPEC.seed, 7)
    assert again != make_document(SPEC, pools, SPEC.eval_seed, 7)


def test_recall_prep_holds_generated_tokens_and_disjoint_eval(tmp_path):
    out = tmp_path / "recall"
    manifest = write_recall(out, SPEC)
    assert read_manifest(out)["packing"] == "window" and manifest["splits"]["train"]["samples"] + \
        manifest["splits"]["val"]["samples"] == SPEC.docs
    tok = load_tokenizer(out)
    pools = word_pools(SPEC)
    expected = {tuple(tok.encode(" ".join(make_document(SPEC, pools, SPEC.seed, i)["words"])).ids) + (0,)
                for i in range(SPEC.docs)}
    stored = {tuple(row) for split in ("train", "val") for row in stored_samples(out / split).astype(np.int64)}
    assert stored == expected  # one document = one sample, each word one token, EOS last
    records = read_eval_records(out)
    assert len(records) == SPEC.eval_docs
    for rec, i in zip(records, range(SPEC.eval_docs)):
        doc = make_document(SPEC, pools, SPEC.eval_seed, i)
        assert rec["tokens"] == [tok.token_to_id(w) for w in doc["words"]] + [0]
        assert rec["targets"] == doc["targets"]
    assert not {tuple(r["tokens"]) for r in records} & stored  # held out: never trained on
    sidecar = json.loads((out / "recall.json").read_text())
    assert sidecar["spec"]["eval_seed"] == 4 and sidecar["pools"] == pools
    before = (out / "recall_eval.jsonl").stat().st_mtime_ns
    write_recall(out, SPEC)  # same spec: reused, nothing rewritten
    assert (out / "recall_eval.jsonl").stat().st_mtime_ns == before
    with pytest.raises(DataError, match="--overwrite"):
        write_recall(out, RecallSpec(**{**SPEC.__dict__, "seed": 5}))


def test_recall_cli_rejects_bad_arguments(tmp_path, capsys):
    from fwpkm_megatron.cli.prep import main

    out = tmp_path / "bad"
    assert main(["recall", "--out", str(out), "--pairs", "6", "5", "--seed", "2", "--eval-seed", "2",
                 "--seq-len", "40", "--keys", "4"]) == 2
    err = capsys.readouterr().err
    for rule in ("max_pairs=5: must be >= min_pairs=6", "eval_seed=2: must be >= 0 and differ",
                 "seq_len=40: must hold", "max_pairs=5: must be <= keys=4"):
        assert rule in err, err
    assert not out.exists() and not list(tmp_path.iterdir())
    with pytest.raises(DataError, match="recall_eval.jsonl"):
        read_eval_records(tmp_path)
