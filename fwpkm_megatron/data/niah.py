"""Needle-in-a-haystack (NIAH) evaluation sets built from a prepared corpus.

Each record hides `num_needles` sentences "The secret number for ID-xxxx is dddddd." at depths drawn
uniformly from [0, 1] in a haystack of held-out text, and asks for one of them (the target; the others
are distractors with different IDs and numbers). Lengths are in tokens of the corpus' tokenizer.

Haystack: the split's shards (default the held-out `val`), read in storage order, cut at EOS into
documents and rejoined with a blank line, so the text is the corpus' own documents. A record takes a
seeded window of it, wrapping around (with a warning) when the split is shorter than the length.
Needles go in on their own line at the word start nearest their drawn depth (within 64 tokens), and
`depths` records where they went (needle start / haystack tokens); the record's
`context_tokens` is the length of `context` re-encoded, trimmed to within a few tokens of `length`
(BPE may merge across an insertion point).

Record (one JSON object per line), what an evaluator needs:
    id, length, context_tokens, context,
    question   "What is the secret number for ID-xxxx?"
    prompt     text to append to `context`: "\n\nQuestion: <question>\nAnswer: The secret number for ID-xxxx is"
    answer     "dddddd" (the target's number; a generation is right if it starts with it)
    depths     depth of each needle in `needles` order; target_index: which one is asked for
    needles    [{key, value, depth}], seed, source {data, split, offset}
Reproducible: record i of length L depends only on (seed, L, i) and the prepared corpus.
"""
from __future__ import annotations

import functools
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from fwpkm_megatron.data.layout import load_tokenizer, read_manifest
from fwpkm_megatron.data.readers import DataError
from fwpkm_megatron.data.stream import storage_order_samples

log = logging.getLogger(__name__)

NEEDLE = "The secret number for ID-{key} is {value}."
QUESTION = "What is the secret number for ID-{key}?"
PROMPT = "\n\nQuestion: {question}\nAnswer: The secret number for ID-{key} is"
DEFAULT_LENGTHS = (4096, 8192, 16384, 32768, 65536, 131072)
_FIT_TRIES = 6


def haystack_ids(data_path: str | os.PathLike, split: str = "val") -> np.ndarray:
    """The split's tokens in storage order with each EOS replaced by the tokens of a blank line."""
    manifest = read_manifest(data_path)
    if split not in manifest["splits"]:
        raise DataError(f"{data_path}: has no {split!r} split (has {', '.join(manifest['splits'])})")
    tok = load_tokenizer(data_path)
    flat = np.concatenate(list(storage_order_samples(Path(data_path) / split))).astype(np.int64)
    separator = np.array(tok.encode("\n\n", add_special_tokens=False).ids, dtype=np.int64)
    pieces = np.split(flat, np.flatnonzero(flat == manifest["eos_id"]) + 1)
    joined = [np.concatenate([p[:-1], separator]) if len(p) and p[-1] == manifest["eos_id"] else p
              for p in pieces]
    return np.concatenate(joined)


def _needles(rng: np.random.Generator, count: int) -> list[dict[str, Any]]:
    keys = rng.choice(10_000, size=count, replace=False)
    values = rng.choice(900_000, size=count, replace=False) + 100_000
    depths = rng.uniform(0.0, 1.0, size=count)
    return [{"key": f"{int(k):04d}", "value": f"{int(v)}", "depth": float(d)} for k, v, d in zip(keys, values, depths)]


_SNAP_TOKENS = 64  # how far a needle may move from its drawn depth to reach a word start


@functools.lru_cache(maxsize=4)
def _word_starts_cached(tok_json: str) -> np.ndarray:
    from tokenizers import Tokenizer
    tok = Tokenizer.from_str(tok_json)
    vocab = max(tok.get_vocab(with_added_tokens=True).values()) + 1
    text = [tok.decode([i], skip_special_tokens=False) for i in range(vocab)]
    # bit 1: the token starts a word (leading whitespace); bit 2: it ends a line
    return np.array([(t[:1].isspace()) | (t.endswith("\n") << 1) for t in text], dtype=np.int8)


def _word_starts(tok: Any) -> np.ndarray:
    return _word_starts_cached(tok.to_str())


def _snap(window: np.ndarray, flags: np.ndarray, cut: int) -> int:
    """The position nearest `cut` (within _SNAP_TOKENS) where a word starts, else `cut` itself."""
    lo, hi = max(cut - _SNAP_TOKENS, 1), min(cut + _SNAP_TOKENS, len(window) - 1)
    if hi <= lo:
        return cut
    positions = np.arange(lo, hi + 1)
    ok = ((flags[window[positions]] & 1) | (flags[window[positions - 1]] >> 1)).astype(bool)
    if not ok.any():
        return cut
    return int(positions[ok][np.argmin(np.abs(positions[ok] - cut))])


def make_record(tok: Any, hay: np.ndarray, *, length: int, index: int, seed: int, num_needles: int = 5,
                source: dict[str, Any] | None = None) -> dict[str, Any]:
    """One NIAH record of `length` tokens (module docstring); `hay` from haystack_ids."""
    rng = np.random.default_rng([seed, length, index])
    needles = _needles(rng, num_needles)
    target = int(rng.integers(num_needles))
    offset = int(rng.integers(len(hay)))
    needle_ids = [tok.encode("\n" + NEEDLE.format(**n) + "\n", add_special_tokens=False).ids for n in needles]
    boundary = _word_starts(tok)
    order = sorted(range(num_needles), key=lambda i: needles[i]["depth"])
    hay_len = length - sum(map(len, needle_ids))
    if hay_len < num_needles:
        raise DataError(f"length={length}: too short for {num_needles} needles of {sum(map(len, needle_ids))} tokens")
    for _ in range(_FIT_TRIES):
        window = np.take(hay, np.arange(offset, offset + hay_len), mode="wrap")
        ids: list[int] = []
        at = 0
        cuts = {}
        for i in order:
            cut = max(_snap(window, boundary, round(needles[i]["depth"] * hay_len)), at)
            ids += window[at:cut].tolist() + needle_ids[i]
            at = cuts[i] = cut
        ids += window[at:].tolist()
        context = tok.decode(ids, skip_special_tokens=False)
        n_tokens = len(tok.encode(context, add_special_tokens=False).ids)
        if n_tokens <= length and length - n_tokens <= 2:
            break
        hay_len -= n_tokens - length
    for i, n in enumerate(needles):
        n["depth"] = cuts[i] / hay_len  # where it went: the drawn depth moved to the nearest word start
    key = needles[target]["key"]
    question = QUESTION.format(key=key)
    return {"id": f"niah-{length}-{index}", "length": length, "context_tokens": n_tokens, "context": context,
            "question": question, "prompt": PROMPT.format(question=question, key=key),
            "answer": needles[target]["value"], "depths": [n["depth"] for n in needles], "target_index": target,
            "needles": needles, "seed": seed, "source": {**(source or {}), "offset": offset}}


def write_niah(data_path: str | os.PathLike, out_path: str | os.PathLike, *, lengths=DEFAULT_LENGTHS,
               per_length: int = 10, seed: int = 0, split: str = "val", num_needles: int = 5) -> int:
    """Write `per_length` records for each length to a JSON Lines file (atomically); returns the count.

    Args:
        data_path: a prepared directory (fwpkm-prep); its tokenizer measures lengths.
        out_path: the .jsonl file to write.
        lengths: context lengths in tokens (e.g. 4096 ... 131072).
        per_length: records per length.
        seed: the only source of randomness besides the corpus.
        split: haystack split; "val" keeps the haystack out of the training text.
        num_needles: needles per record (one target, the rest distractors); at most 10,000.

    Raises:
        DataError: missing or broken prepared directory or split, or a length too short for the needles.
    """
    if per_length < 1 or not 1 <= num_needles <= 10_000 or not lengths or min(lengths) < 1 or seed < 0:
        raise DataError(f"per_length={per_length}, num_needles={num_needles}, lengths={list(lengths)}, seed={seed}: "
                        "need per_length >= 1, 1 <= num_needles <= 10000, lengths >= 1, seed >= 0")
    tok = load_tokenizer(data_path)
    tok.encode_special_tokens = True  # haystack text that spells a special token stays text
    hay = haystack_ids(data_path, split)
    if max(lengths) > len(hay):
        log.warning("the %s split of %s has %d tokens, fewer than length %d: haystacks repeat text",
                    split, data_path, len(hay), max(lengths))
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    part = out.with_name(f".{out.name}.{os.getpid()}.part")
    source = {"data": str(data_path), "split": split}
    count = 0
    try:
        with open(part, "w") as f:
            for length in lengths:
                for i in range(per_length):
                    record = make_record(tok, hay, length=length, index=i, seed=seed, num_needles=num_needles,
                                         source=source)
                    f.write(json.dumps(record, ensure_ascii=False) + "\n")
                    count += 1
        os.replace(part, out)
    finally:
        part.unlink(missing_ok=True)
    return count
