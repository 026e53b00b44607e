"""Tokenizer mechanics: train a byte-level BPE, load a pretrained tokenizer (file or Hugging Face
directory, offline) and its EOS, encode many documents fast.

Byte-level BPE is lossless on any UTF-8 text (no normalizer, every byte has a symbol), which is what
lets the data tests decode packed samples back to the exact source documents. Errors here are plain
ValueErrors; `prepare.py` turns them into DataErrors naming the tokenizer path.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm

EOS_TOKEN = "<|endoftext|>"
# Names an EOS may have in a user-supplied tokenizer.json, tried in order.
EOS_CANDIDATES = (EOS_TOKEN, "</s>", "<eos>", "<|eos|>", "<|end_of_text|>")
MIN_VOCAB_SIZE = 256 + 1  # every byte symbol plus EOS
ENCODE_CHUNK_BYTES = 1 << 20  # progress granularity; big enough to keep encode_batch parallel


def train_bpe(texts: Sequence[str], vocab_size: int, *, progress: bool = False) -> Tokenizer:
    """Train a byte-level BPE with `EOS_TOKEN` as its only special token (id 0).

    The vocab can come out smaller than `vocab_size` when the corpus has fewer mergeable pairs;
    callers read the real size from the tokenizer.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, even unseen ones
        show_progress=progress,  # tokenizers' own bars: pre-processing, pair counting, merges
    )
    tok.train_from_iterator(texts, trainer, length=len(texts))
    return tok


def find_eos(tok: Tokenizer) -> tuple[str, int] | None:
    """The first of `EOS_CANDIDATES` the tokenizer knows, as (token, id); None if it knows none."""
    for token in EOS_CANDIDATES:
        token_id = tok.token_to_id(token)
        if token_id is not None:
            return token, token_id
    return None


def load_pretrained(path: str | Path, eos_token: str | None = None) -> tuple[Tokenizer, str, int]:
    """A pretrained tokenizer, offline: a `tokenizer.json` file, or a Hugging Face tokenizer directory
    (its tokenizer.json, else the slow files converted through transformers' AutoTokenizer with
    local_files_only). EOS: `eos_token` if given, else the directory's tokenizer_config.json
    `eos_token`, else the first of EOS_CANDIDATES the vocab holds.

    Returns:
        (tokenizer, eos token, eos id).

    Raises:
        ValueError: unreadable, or no EOS (the message says which rule failed; callers add the path).
    """
    path = Path(path)
    configured = None
    if path.is_dir():
        config = path / "tokenizer_config.json"
        if config.is_file():
            try:
                value = json.loads(config.read_text()).get("eos_token")
            except ValueError as exc:
                raise ValueError(f"unreadable tokenizer_config.json ({exc})") from None
            configured = value.get("content") if isinstance(value, dict) else value
        if (path / "tokenizer.json").is_file():
            tok = _from_file(path / "tokenizer.json")
        else:
            try:
                from transformers import AutoTokenizer

                tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True, use_fast=True).backend_tokenizer
            except Exception as exc:  # transformers raises OSError/ValueError/... for a bad directory
                raise ValueError(f"not a Hugging Face tokenizer directory ({exc})") from None
    elif path.is_file():
        tok = _from_file(path)
    else:
        raise ValueError("no such file or directory")
    wanted = eos_token or configured
    if wanted is not None:
        token_id = tok.token_to_id(wanted)
        if token_id is None:
            source = "--eos-token" if eos_token else "tokenizer_config.json eos_token"
            raise ValueError(f"has no EOS token {wanted!r} ({source}) in its vocab")
        return tok, wanted, token_id
    found = find_eos(tok)
    if found is None:
        raise ValueError(f"has no EOS token (looked for {', '.join(EOS_CANDIDATES)}); name it with --eos-token")
    return tok, *found


def _from_file(path: Path) -> Tokenizer:
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception on parse errors
        raise ValueError(f"cannot load ({exc})") from None


def vocab_size_of(tok: Tokenizer) -> int:
    """Embedding rows needed: max id + 1 (ids of added tokens need not be contiguous)."""
    return max(tok.get_vocab(with_added_tokens=True).values()) + 1


def encode_documents(tok: Tokenizer, texts: Sequence[str], *, desc: str, progress: bool) -> list[list[int]]:
    """Token ids of each text, without special-token insertion, in chunks for a progress bar.

    Special-token strings inside a document (a source file mentioning "<|endoftext|>") are encoded
    as plain text, so EOS ids in the packed stream only ever mark document ends.
    """
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)  # _fast skips offsets (2x faster)
    out: list[list[int]] = []
    previous, tok.encode_special_tokens = tok.encode_special_tokens, True
    bar = tqdm(total=sum(len(t) for t in texts), unit="char", unit_scale=True, desc=desc,
               disable=not progress, leave=False)
    try:
        start = 0
        while start < len(texts):
            stop, size = start, 0
            while stop < len(texts) and (stop == start or size < ENCODE_CHUNK_BYTES):
                size += len(texts[stop])
                stop += 1
            out.extend(e.ids for e in encode(list(texts[start:stop]), add_special_tokens=False))
            bar.update(size)
            start = stop
    finally:
        tok.encode_special_tokens = previous
        bar.close()
    return out
