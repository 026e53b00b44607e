"""Synthetic associative recall beyond the attention window: key -> value items, filler, queries.

Every word is one token of a word-level tokenizer built here, so positions are exact. A document of
`seq_len` words (+ EOS = one window-packed sample of seq_len + 1 tokens) is

    k1 v1 k2 v2 ... kn vn   | f f f ... f (>= min_gap) | ki vi kj vj ... | f f ... f (>= min_gap) | ... | f ...

n pairs (distinct keys drawn from the key pool, values drawn from the value pool) are defined once,
then blocks of at least `min_gap` filler words alternate with query blocks repeating a random subset
of the pairs, until the document is full. Every queried key sits at least `min_gap` tokens after the
previous occurrence of that key, so with `min_gap` above the attention reach (layers x (window - 1)
for sliding-window attention) the value can only come from a memory. The queried value tokens are the
targets: the model predicts `tokens[p]` at input position p - 1.

Word pools are fixed by their sizes (a seeded shuffle of CVCV syllable words, all four letters, so no
word is a prefix of another); documents depend only on (seed, index). Training documents (seed) go
through the normal pipeline (`prepare_corpus`, window packing, the generated tokenizer); held-out
evaluation documents (eval_seed, which must differ) are written beside the shards as token ids with
their target positions (`recall_eval.jsonl`), with the generator's arguments in `recall.json`.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fwpkm_megatron.data.readers import DataError

EOS = "<|endoftext|>"
UNK = "<unk>"
CONSONANTS = "bdfghjklmnprstvz"
VOWELS = "aeiou"
POOL_SEED = 20240601   # the pools are part of the task, not of a draw: fixed for every seed
SIDECAR, EVAL_FILE = "recall.json", "recall_eval.jsonl"


@dataclass(frozen=True, kw_only=True)
class RecallSpec:
    """What `fwpkm-prep recall` generates (argument names of the CLI)."""

    docs: int = 4000          # training documents (split into train / val by the pipeline)
    eval_docs: int = 256      # held-out evaluation documents, from eval_seed
    seq_len: int = 256        # words per document; + EOS = one window-packed sample
    keys: int = 32            # key pool size
    values: int = 32          # value pool size (chance loss on a value = ln(values))
    filler: int = 64          # filler pool size
    min_pairs: int = 4        # pairs defined per document, drawn uniformly in [min_pairs, max_pairs]
    max_pairs: int = 8
    min_gap: int = 32         # filler words before every query block (> the attention reach)
    max_gap: int = 48         # a block's filler length is drawn in [min_gap, max_gap]
    seed: int = 0             # training documents
    eval_seed: int = 1        # evaluation documents; must differ from seed
    val_fraction: float = 0.02

    def problems(self) -> list[str]:
        p = []
        for name in ("docs", "eval_docs", "keys", "values", "filler", "min_pairs", "min_gap"):
            if getattr(self, name) < 1:
                p.append(f"{name}={getattr(self, name)}: must be >= 1")
        if self.max_pairs < self.min_pairs:
            p.append(f"max_pairs={self.max_pairs}: must be >= min_pairs={self.min_pairs}")
        if self.max_pairs > self.keys:
            p.append(f"max_pairs={self.max_pairs}: must be <= keys={self.keys} (keys of a document are distinct)")
        if self.max_gap < self.min_gap:
            p.append(f"max_gap={self.max_gap}: must be >= min_gap={self.min_gap}")
        needed = 2 * self.max_pairs + self.max_gap + 2
        if self.seq_len < needed:
            p.append(f"seq_len={self.seq_len}: must hold the definitions, one filler block and one query "
                     f"(2 * max_pairs + max_gap + 2 = {needed})")
        if self.seed < 0 or self.eval_seed < 0 or self.seed == self.eval_seed:
            p.append(f"seed={self.seed}, eval_seed={self.eval_seed}: must be >= 0 and differ (held-out documents "
                     "come from their own draw)")
        total = self.keys + self.values + self.filler
        if total > len(CONSONANTS) ** 2 * len(VOWELS) ** 2:
            p.append(f"keys + values + filler = {total}: more than the {len(CONSONANTS) ** 2 * len(VOWELS) ** 2} "
                     "four-letter words the pools are drawn from")
        if not 0 < self.val_fraction < 1:
            p.append(f"val_fraction={self.val_fraction}: must be in (0, 1)")
        return p


def word_pools(spec: RecallSpec) -> dict[str, list[str]]:
    """Disjoint key, value and filler pools: a fixed shuffle of the CVCV words, cut by the pool sizes."""
    words = [a + b + c + d for a in CONSONANTS for b in VOWELS for c in CONSONANTS for d in VOWELS]
    order = np.random.default_rng(POOL_SEED).permutation(len(words))
    words = [words[i] for i in order]
    k, v = spec.keys, spec.values
    return {"keys": words[:k], "values": words[k:k + v], "filler": words[k + v:k + v + spec.filler]}


def make_document(spec: RecallSpec, pools: dict[str, list[str]], seed: int, index: int) -> dict[str, Any]:
    """Document `index` of the draw `seed`: {"words": [...] (seq_len), "targets": word positions of the
    queried values, "pairs": [[key, value], ...]}."""
    rng = np.random.default_rng([seed, index])
    n = int(rng.integers(spec.min_pairs, spec.max_pairs + 1))
    keys = [pools["keys"][i] for i in rng.choice(spec.keys, size=n, replace=False)]
    values = [pools["values"][i] for i in rng.integers(spec.values, size=n)]
    words = [w for pair in zip(keys, values) for w in pair]
    targets: list[int] = []

    def filler(count: int) -> None:
        words.extend(pools["filler"][i] for i in rng.integers(spec.filler, size=count))

    while True:
        gap = int(rng.integers(spec.min_gap, spec.max_gap + 1))
        room = spec.seq_len - len(words) - gap
        if room < 2:  # no query fits after another full gap: the rest is filler
            filler(spec.seq_len - len(words))
            break
        filler(gap)
        asked = rng.permutation(n)[:int(rng.integers(1, n + 1))][:room // 2]
        for i in asked:
            words += [keys[i], values[i]]
            targets.append(len(words) - 1)
    return {"words": words, "targets": targets, "pairs": [[k, v] for k, v in zip(keys, values)]}


def build_tokenizer(pools: dict[str, list[str]]):
    """A word-level tokenizer: EOS = 0, <unk> = 1, then every pool word (one token each, split on spaces)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {EOS: 0, UNK: 1}
    for word in pools["keys"] + pools["values"] + pools["filler"]:
        vocab[word] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces, no prefix in this vocab
    tok.add_special_tokens([EOS])
    return tok


def eval_records(spec: RecallSpec, tok) -> list[dict[str, Any]]:
    """The held-out documents as token ids: {"id", "tokens" (seq_len + 1, EOS last), "targets", "pairs"}."""
    pools = word_pools(spec)
    out = []
    for i in range(spec.eval_docs):
        doc = make_document(spec, pools, spec.eval_seed, i)
        ids = [tok.token_to_id(w) for w in doc["words"]] + [tok.token_to_id(EOS)]
        out.append({"id": f"recall-{spec.eval_seed}-{i}", "tokens": ids, "targets": doc["targets"],
                    "pairs": doc["pairs"]})
    return out


def write_recall(out_dir: str | os.PathLike, spec: RecallSpec, *, overwrite: bool = False,
                 progress: bool = False) -> dict[str, Any]:
    """Generate and prepare a recall corpus at `out_dir` (appears complete or not at all); returns its manifest.

    The training documents are written as JSON Lines and prepared by `prepare_corpus` (window packing,
    seq_len = spec.seq_len, the generated word-level tokenizer); `recall.json` (the spec and pools) and
    `recall_eval.jsonl` (the held-out documents) are added before the directory is moved into place.
    Rerunning the same spec on a complete directory reuses it.

    Raises:
        DataError: bad arguments (every problem listed), or an existing different directory without overwrite.
    """
    from fwpkm_megatron.data.prepare import prepare_corpus

    problems = spec.problems()
    if problems:
        raise DataError("\n".join(f"recall: {p}" for p in problems))
    out = Path(out_dir)
    request = {"spec": asdict(spec)}
    sidecar = out / SIDECAR
    if out.exists():
        if sidecar.is_file() and (out / "manifest.json").is_file() and not overwrite:
            if json.loads(sidecar.read_text()).get("spec") == request["spec"]:
                from fwpkm_megatron.data.layout import read_manifest
                return read_manifest(out)
        if not overwrite:
            raise DataError(f"{out}: exists and is not this recall corpus; pass --overwrite to replace it")
    pools = word_pools(spec)
    tok = build_tokenizer(pools)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.recall-", dir=out.parent))
    try:
        src = stage / "train.jsonl"
        with open(src, "w") as f:
            for i in range(spec.docs):
                f.write(json.dumps({"text": " ".join(make_document(spec, pools, spec.seed, i)["words"])}) + "\n")
        tok.save(str(stage / "tokenizer.json"))
        manifest = prepare_corpus(stage / "prep", inputs=[str(src)], tokenizer_path=str(stage / "tokenizer.json"),
                                  seq_len=spec.seq_len, val_fraction=spec.val_fraction, seed=spec.seed,
                                  packing="window", progress=progress)
        dropped = sum(s["dropped_documents"] for s in manifest["splits"].values())
        if dropped:  # every document must be exactly one sample
            raise DataError(f"recall: {dropped} documents were not exactly seq_len + 1 tokens (generator bug)")
        records = eval_records(spec, tok)
        with open(stage / "prep" / EVAL_FILE, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        pool_record = {"spec": asdict(spec), "pools": pools, "eval_file": EVAL_FILE,
                       "targets": sum(len(r["targets"]) for r in records)}
        (stage / "prep" / SIDECAR).write_text(json.dumps(pool_record, indent=1) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(stage / "prep", out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return manifest


def read_eval_records(data_path: str | os.PathLike) -> list[dict[str, Any]]:
    """The held-out documents of a prepared recall corpus (`recall_eval.jsonl`).

    Raises:
        DataError: the directory was not made by `fwpkm-prep recall`, or a line is broken (file and line named).
    """
    path = Path(data_path) / EVAL_FILE
    if not path.is_file():
        raise DataError(f"{data_path}: has no {EVAL_FILE} (not made by `fwpkm-prep recall`)")
    records = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        try:
            rec = json.loads(line)
            if not isinstance(rec["tokens"], list) or not isinstance(rec["targets"], list):
                raise KeyError("tokens/targets")
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise DataError(f"{path}:{lineno}: not a recall record ({exc})") from None
        records.append(rec)
    return records


def niah_records(data_path: str | os.PathLike, *, lengths, per_length: int, seed: int,
                 num_needles: int = 5) -> list[dict[str, Any]]:
    """NIAH-style records from a recall corpus's pools, for `eval.niah.evaluate_niah` (reads 1..n).

    Record i of length L (its own draw, `seed` should differ from the corpus's seeds): `num_needles`
    "k v" pairs (distinct keys) at uniform depths in L - 1 - 2 * num_needles filler words, every one at
    least min_gap words before the end, so the question sits beyond the attention reach of all of them;
    the prompt is one needle's key and the answer its value (one word, so exact match = top-1).
    """
    sidecar = Path(data_path) / SIDECAR
    if not sidecar.is_file():
        raise DataError(f"{data_path}: has no {SIDECAR} (not made by `fwpkm-prep recall`)")
    info = json.loads(sidecar.read_text())
    spec, pools = RecallSpec(**info["spec"]), info["pools"]
    records = []
    for length in lengths:
        hay_len = length - 1 - 2 * num_needles
        if hay_len <= spec.min_gap or num_needles > spec.keys:
            raise DataError(f"length={length}: too short for {num_needles} needles placed min_gap={spec.min_gap} "
                            f"before the question (or more needles than keys={spec.keys})")
        for i in range(per_length):
            rng = np.random.default_rng([seed, length, i])
            keys = [pools["keys"][j] for j in rng.choice(spec.keys, size=num_needles, replace=False)]
            values = [pools["values"][j] for j in rng.integers(spec.values, size=num_needles)]
            depths = rng.uniform(0.0, 1.0, size=num_needles)
            words = [pools["filler"][j] for j in rng.integers(spec.filler, size=hay_len)]
            for j in np.argsort(-depths):  # deepest first, so earlier insertion points stay put
                at = int(round(depths[j] * (hay_len - spec.min_gap)))
                words[at:at] = [keys[j], values[j]]
            target = int(rng.integers(num_needles))
            records.append({"id": f"recall-niah-{length}-{i}", "length": length, "context": " ".join(words),
                            "prompt": " " + keys[target], "answer": values[target],
                            "depths": [float(d) for d in depths], "target_index": target})
    return records
