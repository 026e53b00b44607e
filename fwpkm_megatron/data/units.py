"""Work units of a prep: runs of source chunks of about UNIT_BYTES of text, tokenized in parallel.

Each unit is tokenized into its own `units/NNNNNN.npz` (per split: tokens with EOS after each document,
and document lengths) and appears by an atomic rename, so a killed prep resumes by tokenizing only the
missing units (prepare.py assembles shards from them). Worker processes run `_tokenize_unit`.
"""
from __future__ import annotations

import bisect
import logging
import multiprocessing
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer
from tqdm import tqdm

from fwpkm_megatron.data import readers
from fwpkm_megatron.data import tokenizer as bpe
from fwpkm_megatron.data.layout import ALL_SPLITS, UNIT_BYTES
from fwpkm_megatron.data.readers import DataError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Unit:
    """A run of chunks (file index, chunk) whose documents have global ids [first_doc, first_doc + docs)."""
    index: int
    segments: tuple[tuple[int, tuple[int, ...]], ...]
    first_doc: int
    documents: int
    text_bytes: int


def work_units(scanned: list[dict[str, Any]], unit_bytes: int = UNIT_BYTES) -> list[Unit]:
    """Group consecutive chunks into units of about `unit_bytes` of text, in document-id order."""
    units: list[Unit] = []
    segments: list[tuple[int, tuple[int, ...]]] = []
    first = docs = text = 0
    for f, file in enumerate(scanned):
        for chunk in file["chunks"]:
            if not chunk[3]:
                continue
            segments.append((f, tuple(chunk)))
            docs, text = docs + chunk[3], text + chunk[4]
            if text >= unit_bytes:
                units.append(Unit(len(units), tuple(segments), first, docs, text))
                segments, first, docs, text = [], first + docs, 0, 0
    if segments:
        units.append(Unit(len(units), tuple(segments), first, docs, text))
    return units


def unit_documents(scanned: list[dict[str, Any]], unit: Unit, text_field: str) -> Iterator[str]:
    for f, chunk in unit.segments:
        file = scanned[f]
        yield from readers.read_chunk(Path(file["path"]), file["format"], readers.Chunk.from_json(list(chunk)),
                                      text_field=text_field)


def unit_splits(unit: Unit, held: dict[str, list[int]]) -> np.ndarray:
    """Split index (position in ALL_SPLITS) of each document of the unit."""
    ids = np.arange(unit.first_doc, unit.first_doc + unit.documents)
    out = np.zeros(unit.documents, dtype=np.int8)
    for s, split in enumerate(ALL_SPLITS[1:], start=1):
        out[np.isin(ids, np.asarray(held.get(split, []), dtype=np.int64))] = s
    return out


# ---------------------------------------------------------------- tokenizing units (worker side)

_worker_tok: dict[str, Tokenizer] = {}  # per process: tokenizer path -> loaded tokenizer


def _tokenize_unit(job: tuple) -> tuple[int, int, int]:
    """Tokenize one unit into `units/NNNNNN.npz` (per split: `tokens` with EOS after each document and
    `lengths` per document); returns (unit index, documents, tokens). Runs in worker processes."""
    unit, scanned, held, tok_path, text_field, eos_id, dtype, units_dir = job
    tok = _worker_tok.get(tok_path)
    if tok is None:
        tok = _worker_tok[tok_path] = Tokenizer.from_file(tok_path)
    texts = list(unit_documents(scanned, unit, text_field))
    if len(texts) != unit.documents:
        raise DataError(f"{scanned[unit.segments[0][0]]['path']}: {len(texts)} documents, the scan counted "
                        f"{unit.documents}; did the file change during prep?")
    ids = bpe.encode_documents(tok, texts, desc="", progress=False)
    split_of = unit_splits(unit, held)
    arrays = {}
    n_tokens = 0
    for s, split in enumerate(ALL_SPLITS):
        docs = [ids[i] + [eos_id] for i in np.flatnonzero(split_of == s)]
        lengths = np.array([len(d) for d in docs], dtype=np.int64)
        arrays[f"{split}_tokens"] = np.fromiter((t for d in docs for t in d), dtype=dtype, count=int(lengths.sum()))
        arrays[f"{split}_lengths"] = lengths
        n_tokens += int(lengths.sum())
    final = Path(units_dir) / f"{unit.index:06d}.npz"
    part = final.with_name(f".{final.stem}.{os.getpid()}.part.npz")
    np.savez(part, **arrays)
    os.replace(part, final)
    return unit.index, unit.documents, n_tokens


held_locks: set[int] = set()  # fds of partial-dir locks this process holds (prepare._Partial adds them)


def _init_worker() -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already
    for fd in held_locks:  # a forked copy would keep the flock alive after the prep itself is killed
        try:
            os.close(fd)
        except OSError:
            pass


class _Progress:
    """documents/s, tokens/s and ETA (by text bytes) on a tqdm bar, or a log line every 10 s."""

    def __init__(self, total_bytes: int, done_bytes: int, show_bar: bool):
        self.start, self.last_log = time.perf_counter(), time.perf_counter()
        self.docs = self.tokens = 0
        self.total, self.done, self.first_done = total_bytes, done_bytes, done_bytes
        self.bar = tqdm(total=total_bytes, initial=done_bytes, unit="B", unit_scale=True, desc="tokenize",
                        disable=not show_bar, leave=False, file=sys.stderr)

    def update(self, docs: int, tokens: int, text_bytes: int) -> None:
        self.docs, self.tokens, self.done = self.docs + docs, self.tokens + tokens, self.done + text_bytes
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        rate = f"{self.docs / elapsed:,.0f} docs/s, {self.tokens / elapsed:,.0f} tok/s"
        self.bar.set_postfix_str(rate, refresh=False)
        self.bar.update(text_bytes)
        if self.bar.disable and time.perf_counter() - self.last_log > 10:
            self.last_log = time.perf_counter()
            speed = (self.done - self.first_done) / elapsed
            eta = (self.total - self.done) / speed if speed else float("nan")
            log.info("tokenize: %.0f%% of %.1f MB, %s, ETA %.0fs", 100 * self.done / max(self.total, 1),
                     self.total / 1e6, rate, eta)

    def close(self) -> dict[str, float]:
        self.bar.close()
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        return {"seconds": elapsed, "docs_per_s": self.docs / elapsed, "tokens_per_s": self.tokens / elapsed}


def tokenize_units(units: list[Unit], scanned: list[dict[str, Any]], held: dict[str, list[int]],
                    tok_path: Path, text_field: str, eos_id: int, dtype: str, units_dir: Path,
                    workers: int, show_bar: bool) -> dict[str, float]:
    """Tokenize the units whose file is missing, over `workers` processes (1 = in this process)."""
    todo = [u for u in units if not (units_dir / f"{u.index:06d}.npz").is_file()]
    if len(todo) < len(units):
        log.info("resuming prep: %d of %d work units already tokenized", len(units) - len(todo), len(units))
    by_index = {u.index: u for u in todo}
    progress = _Progress(sum(u.text_bytes for u in units),
                         sum(u.text_bytes for u in units if u.index not in by_index), show_bar)
    jobs = [(u, _files_of(scanned, u), _held_in(held, u), str(tok_path), text_field, eos_id, dtype,
             str(units_dir)) for u in todo]
    try:
        if workers <= 1 or len(jobs) <= 1:
            for job in jobs:
                index, docs, tokens = _tokenize_unit(job)
                progress.update(docs, tokens, by_index[index].text_bytes)
        else:
            context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
            with context.Pool(workers, initializer=_init_worker) as pool:
                for index, docs, tokens in pool.imap_unordered(_tokenize_unit, jobs):
                    progress.update(docs, tokens, by_index[index].text_bytes)
    finally:
        stats = progress.close()
    return stats


def _held_in(held: dict[str, list[int]], unit: Unit) -> dict[str, list[int]]:
    """The held-out ids inside the unit's document range (jobs stay small when D is large)."""
    lo, hi = unit.first_doc, unit.first_doc + unit.documents
    return {s: ids[bisect.bisect_left(ids, lo): bisect.bisect_left(ids, hi)] for s, ids in held.items()}


def _files_of(scanned: list[dict[str, Any]], unit: Unit) -> list[dict[str, Any]]:
    """The scan entries a unit reads (others emptied: jobs are pickled to the workers)."""
    needed = {f for f, _ in unit.segments}
    return [{"path": s["path"], "format": s["format"]} if i in needed else {} for i, s in enumerate(scanned)]
