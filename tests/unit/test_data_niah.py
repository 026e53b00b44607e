"""The NIAH generator: records hold what the evaluator needs, at the asked length, reproducibly.

What is checked against what: every needle sentence against the context (present once, in depth order,
distinct IDs and numbers), the answer against the target needle, the re-encoded context length against
the requested length, the needle's character position against its depth, a rerun with the same seed
against the first file byte for byte, and the CLI against the library. Haystacks come from the tiny
stdlib prep's val split (shorter than the longest length here, so the wrap-around path runs too).
"""
from __future__ import annotations

import json

import pytest

from fwpkm_megatron.data import DataError, load_tokenizer
from fwpkm_megatron.data.niah import NEEDLE, write_niah

LENGTHS = [512, 3000]


def test_niah_records_match_request(tiny_data, tmp_path):
    out = tmp_path / "niah.jsonl"
    assert write_niah(tiny_data, out, lengths=LENGTHS, per_length=2, seed=11) == 4
    records = [json.loads(line) for line in out.read_text().splitlines()]
    tok = load_tokenizer(tiny_data)
    tok.encode_special_tokens = True
    for rec in records:
        assert rec["length"] in LENGTHS and rec["length"] - 2 <= rec["context_tokens"] <= rec["length"]
        assert len(tok.encode(rec["context"], add_special_tokens=False).ids) == rec["context_tokens"]
        needles = rec["needles"]
        assert len(needles) == 5 and len({n["key"] for n in needles}) == 5 and len({n["value"] for n in needles}) == 5
        places = [rec["context"].find(NEEDLE.format(**n)) for n in needles]
        assert all(p >= 0 and rec["context"].count(NEEDLE.format(**n)) == 1 for p, n in zip(places, needles))
        by_depth = sorted(range(5), key=lambda i: needles[i]["depth"])
        assert [places[i] for i in by_depth] == sorted(places)
        for p, n in zip(places, needles):  # character position tracks depth (tokens ~ chars here)
            assert abs(p / len(rec["context"]) - n["depth"]) < 0.1
        target = needles[rec["target_index"]]
        assert rec["answer"] == target["value"] and len(rec["answer"]) == 6
        assert rec["question"] == f"What is the secret number for ID-{target['key']}?"
        assert rec["prompt"].endswith(f"The secret number for ID-{target['key']} is")
        assert rec["depths"] == [n["depth"] for n in needles] and all(0 <= d <= 1 for d in rec["depths"])
    again = tmp_path / "again.jsonl"
    write_niah(tiny_data, again, lengths=LENGTHS, per_length=2, seed=11)
    assert again.read_bytes() == out.read_bytes()
    write_niah(tiny_data, again, lengths=LENGTHS, per_length=2, seed=12)
    assert again.read_bytes() != out.read_bytes()


def test_niah_cli_and_errors(tiny_data, tmp_path, capsys):
    from fwpkm_megatron.cli.prep import main
    out = tmp_path / "cli.jsonl"
    assert main(["niah", "--data", str(tiny_data), "--out", str(out), "--lengths", "512", "--per-length", "1",
                 "--seed", "11"]) == 0
    assert "wrote 1 records" in capsys.readouterr().out
    lib = tmp_path / "lib.jsonl"
    write_niah(tiny_data, lib, lengths=[512], per_length=1, seed=11)
    assert out.read_bytes() == lib.read_bytes()
    assert main(["niah", "--data", str(tmp_path / "none"), "--out", str(out)]) == 2
    assert "none/manifest.json: missing" in capsys.readouterr().err
    with pytest.raises(DataError, match="no 'test' split"):
        write_niah(tiny_data, out, lengths=[512], split="test")
    with pytest.raises(DataError, match="length=40: too short"):
        write_niah(tiny_data, out, lengths=[40])
