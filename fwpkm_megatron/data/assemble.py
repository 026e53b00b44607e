"""Assemble a prep's tokenized units into fixed-length samples in MDS shards, one pass for all splits,
optionally uploading through MDSWriter's (local, remote) output.

Packing ("concat"): a split's documents in id order, each followed by EOS, form one token stream cut
into samples of sample_len = seq_len + 1 tokens; only the stream's last partial sample is dropped.
"window": each document + EOS is cut into its own windows; tails shorter than a window, and documents
shorter than one, are dropped and counted. Units carry no split: documents get global ids in input order
here and go to the split the seeded draw gave them.
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from fwpkm_megatron.data.layout import ALL_SPLITS
from fwpkm_megatron.data.readers import DataError
from fwpkm_megatron.data.streaming_compat import import_streaming
from fwpkm_megatron.data.units import Progress

SHARD_BYTES = 1 << 25  # 32 MiB shards: a few per GB of tokens, small enough to stream from a remote


def token_dtype(vocab_size: int) -> str:
    """Narrowest unsigned dtype holding ids [0, vocab_size)."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


class _Packer:
    """Rows [sample_len] of one split from its documents' tokens, with the split's counts."""

    def __init__(self, sample_len: int, packing: str):
        self.sample_len, self.packing, self.carry = sample_len, packing, None
        self.counts = {"documents": 0, "tokens": 0, "dropped_documents": 0}

    def add(self, tokens: np.ndarray, lengths: np.ndarray) -> Iterator[np.ndarray]:
        self.counts["documents"] += len(lengths)
        self.counts["tokens"] += len(tokens)
        L = self.sample_len
        if self.packing == "concat":
            stream = tokens if self.carry is None else np.concatenate([self.carry, tokens])
            n = len(stream) // L
            yield from stream[: n * L].reshape(n, L)
            self.carry = stream[n * L:]
        else:
            offsets = np.concatenate([[0], np.cumsum(lengths)])
            for lo, hi in zip(offsets[:-1], offsets[1:]):
                n = int(hi - lo) // L
                self.counts["dropped_documents"] += int(n == 0)
                yield from tokens[lo: lo + n * L].reshape(n, L)


def write_splits(final: Path, unit_files: list[tuple[Path, int]], split_of_doc: Any, splits: tuple[str, ...], *,
                 dtype: str, sample_len: int, packing: str, compression: str | None, remote: str | None,
                 show_bar: bool) -> tuple[dict[str, dict[str, int]], float]:
    """Write every split's shards under `final/<split>` (and to `remote/<split>`) from the units in
    document order. `unit_files`: (npz path, first document id); `split_of_doc(ids)` -> split index
    (position in ALL_SPLITS) per id. Returns per-split counts (documents, tokens, dropped_documents,
    samples) and seconds."""
    streaming = import_streaming()
    packers = {s: _Packer(sample_len, packing) for s in splits}
    writers, samples = {}, dict.fromkeys(splits, 0)
    total = sum(p.stat().st_size for p, _ in unit_files)
    progress = Progress("assemble", total, 0, show_bar)
    try:
        for split in splits:
            out: Any = str(final / split)
            if remote is not None:
                out = (out, f"{remote}/{split}")
            writers[split] = streaming.MDSWriter(
                out=out, columns={"tokens": f"ndarray:{dtype}:{sample_len}"}, compression=compression,
                hashes=["sha1"], size_limit=SHARD_BYTES, keep_local=True, exist_ok=True)
        for path, first in unit_files:
            with np.load(path) as unit:
                tokens, lengths = unit["tokens"], unit["lengths"]
            split_idx = split_of_doc(np.arange(first, first + len(lengths)))
            offsets = np.concatenate([[0], np.cumsum(lengths)])
            for s, split in enumerate(ALL_SPLITS):
                if split not in packers:
                    continue
                pick = np.flatnonzero(split_idx == s)
                if not len(pick):
                    continue
                if len(pick) == len(lengths):
                    part = tokens
                else:
                    part = np.concatenate([tokens[offsets[i]: offsets[i + 1]] for i in pick])
                for row in packers[split].add(part, lengths[pick]):
                    writers[split].write({"tokens": row})
                    samples[split] += 1
            progress.update(path.stat().st_size, docs=len(lengths), tokens=len(tokens))
        for split, writer in writers.items():
            try:
                writer.finish()  # flushes the last shard and index.json, waits for the uploads
            except Exception as exc:  # streaming reports a failed upload thread as a bare Exception
                raise DataError(f"{remote}/{split}: upload failed ({exc})") from None
        writers = {}
    finally:
        for writer in writers.values():  # interrupted: stop the upload threads
            writer.cancel_future_jobs()
        stats = progress.close()
    counts = {s: {**packers[s].counts, "samples": samples[s]} for s in splits}
    return counts, stats["seconds"]
