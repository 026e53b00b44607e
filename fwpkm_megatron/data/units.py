"""The parallel, resumable stages of a prep: scanning input files and tokenizing work units.

Both stages keep their results in the partial directory under content keys, never under the request,
so a rerun after a kill, after fixing one bad file, or with other assembly-only options (seq_len,
packing, compression, remote output) redoes only what is missing:
    scan/<file key>.json                  one input file validated and cut into chunks (file key: path,
                                          format, size, mtime or ETag, text field, chunk size)
    units/<tokenizer key>/<file key>-<chunk>.npz   the token ids of one chunk's documents, each + EOS
                                          (`tokens`), and their lengths (`lengths`); no split assignment,
                                          which assembly makes from the document ids
Each file appears by an atomic rename, so whatever a kill leaves is complete. Work runs over `workers`
processes (fork on Linux); `_scan_file` and `_tokenize_job` are the worker functions.
"""
from __future__ import annotations

import json
import logging
import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer
from tqdm import tqdm

from fwpkm_megatron.data import readers
from fwpkm_megatron.data import tokenizer as bpe
from fwpkm_megatron.data.layout import sha256_file
from fwpkm_megatron.data.readers import DataError

log = logging.getLogger(__name__)

held_locks: set[int] = set()  # fds of partial-dir locks this process holds (partial.Partial adds them)


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (temp file + rename)."""
    part = path.with_name(f".{path.name}.{os.getpid()}.part")
    part.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")
    os.replace(part, path)


def _init_worker() -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already
    for fd in held_locks:  # a forked copy would keep the flock alive after the prep itself is killed
        try:
            os.close(fd)
        except OSError:
            pass


class Progress:
    """A tqdm bar over bytes with a rate postfix, or a log line every 10 s when there is no terminal."""

    def __init__(self, desc: str, total: int, done: int, show_bar: bool, unit: str = "B"):
        self.desc, self.start, self.last_log = desc, time.perf_counter(), time.perf_counter()
        self.docs = self.tokens = 0
        self.total, self.done, self.first_done = total, done, done
        self.bar = tqdm(total=total, initial=done, unit=unit, unit_scale=True, desc=desc,
                        disable=not show_bar, leave=False, file=sys.stderr)

    def update(self, amount: int, docs: int = 0, tokens: int = 0) -> None:
        self.docs, self.tokens, self.done = self.docs + docs, self.tokens + tokens, self.done + amount
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        rate = f"{self.docs / elapsed:,.0f} docs/s" + (f", {self.tokens / elapsed:,.0f} tok/s" if self.tokens else "")
        self.bar.set_postfix_str(rate, refresh=False)
        self.bar.update(amount)
        if self.bar.disable and time.perf_counter() - self.last_log > 10:
            self.last_log = time.perf_counter()
            speed = (self.done - self.first_done) / elapsed
            eta = (self.total - self.done) / speed if speed else float("nan")
            log.info("%s: %.0f%% of %.1f MB, %s, ETA %.0fs", self.desc, 100 * self.done / max(self.total, 1),
                     self.total / 1e6, rate, eta)

    def close(self) -> dict[str, float]:
        self.bar.close()
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        return {"seconds": elapsed, "docs_per_s": self.docs / elapsed, "tokens_per_s": self.tokens / elapsed}


def run_pool(fn: Callable[[Any], tuple], jobs: list[Any], workers: int,
             on_result: Callable[[tuple], None]) -> None:
    """fn over jobs in this process (workers <= 1) or a process pool, results handed to on_result as they
    arrive. A worker's exception (a DataError naming a file) stops the stage; finished results stay."""
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            on_result(fn(job))
        return
    context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    with context.Pool(min(workers, len(jobs)), initializer=_init_worker) as pool:
        for result in pool.imap_unordered(fn, jobs):
            on_result(result)


# ---------------------------------------------------------------- scan (worker side)

def _scan_file(job: dict[str, Any]) -> tuple[int, int, int]:
    """Fetch (remote inputs), validate, chunk and checksum one file into scan/<key>.json."""
    from fwpkm_megatron.data import remote

    local = Path(job["local"])
    if job["remote"] is not None:
        remote.fetch(remote.RemoteInput(**job["remote"]), local)
    bad: dict | None = {} if job["skip_bad"] else None
    result = readers.scan_file(local, job["format"], text_field=job["text_field"], chunk_bytes=job["chunk_bytes"],
                               strict=job["strict"], bad=bad)
    size = job["bytes"] if job["bytes"] >= 0 else (  # a remote object whose scheme cannot list: measure the copy
        sum(p.stat().st_size for p in local.iterdir() if p.is_file()) if local.is_dir() else local.stat().st_size)
    entry = {"path": job["path"], "local": str(local), "format": job["format"], "bytes": size,
             "key": job["key"], "sha256": sha256_file(local),
             "documents": sum(c.documents for c in result.chunks),
             "text_bytes": sum(c.text_bytes for c in result.chunks), "empty": result.empty,
             "undecodable": result.undecodable, "bad": _relabel(bad or {}, str(local), job["path"]),
             "chunks": [c.to_json() for c in result.chunks]}
    write_json(Path(job["out"]), entry)
    return job["index"], job["bytes"], entry["documents"]


def _relabel(bad: dict, local: str, path: str) -> dict:
    """Bad-record locations name the input as the user gave it, not the local copy of a remote one."""
    return {r: {**v, "first": v["first"].replace(local, path)} for r, v in bad.items()}


def scan_files(jobs: list[dict[str, Any]], workers: int, show_bar: bool) -> float:
    """Scan the files whose scan/<key>.json is missing; returns seconds spent."""
    todo = [j for j in jobs if not Path(j["out"]).is_file()]
    if len(todo) < len(jobs):
        log.info("resuming prep: %d of %d input files already scanned", len(jobs) - len(todo), len(jobs))
    total = sum(max(j["bytes"], 0) for j in jobs)
    progress = Progress("scan", total, total - sum(max(j["bytes"], 0) for j in todo), show_bar)
    try:
        run_pool(_scan_file, todo, workers, lambda r: progress.update(max(r[1], 0), docs=r[2]))
    finally:
        stats = progress.close()
    return stats["seconds"]


# ---------------------------------------------------------------- tokenize (worker side)

_worker_tok: dict[str, Tokenizer] = {}  # per process: tokenizer path -> loaded tokenizer


def _tokenize_job(job: dict[str, Any]) -> tuple[int, int, int, int]:
    """Tokenize a job's units, each into units/<key>/<unit>.npz; returns (units, documents, tokens,
    text bytes). Runs in worker processes."""
    tok = _worker_tok.get(job["tokenizer"])
    if tok is None:
        tok = _worker_tok[job["tokenizer"]] = Tokenizer.from_file(job["tokenizer"])
    texts, counts = [], []
    for unit in job["units"]:
        docs = list(readers.read_chunk(Path(unit["local"]), unit["format"], readers.Chunk.from_json(unit["chunk"]),
                                       text_field=job["text_field"], skip_bad=job["skip_bad"]))
        if len(docs) != unit["chunk"][3]:
            raise DataError(f"{unit['path']}: {len(docs)} documents in a chunk the scan counted {unit['chunk'][3]} "
                            "in; did the file change during prep?")
        texts.extend(docs)
        counts.append(len(docs))
    ids = bpe.encode_documents(tok, texts, desc="", progress=False)
    n_tokens, at = 0, 0
    for unit, n in zip(job["units"], counts):
        docs = ids[at: at + n]
        at += n
        lengths = np.array([len(d) + 1 for d in docs], dtype=np.int64)
        tokens = np.fromiter((t for d in docs for t in (*d, job["eos_id"])), dtype=job["dtype"],
                             count=int(lengths.sum()))
        final = Path(job["units_dir"]) / f"{unit['id']}.npz"
        part = final.with_name(f".{final.stem}.{os.getpid()}.part.npz")
        np.savez(part, tokens=tokens, lengths=lengths)
        os.replace(part, final)
        n_tokens += int(lengths.sum())
    return len(job["units"]), len(texts), n_tokens, sum(u["chunk"][4] for u in job["units"])


def tokenize_units(units: list[dict[str, Any]], *, tokenizer: Path, eos_id: int, dtype: str, units_dir: Path,
                   text_field: str, skip_bad: bool, unit_bytes: int, workers: int,
                   show_bar: bool) -> dict[str, float]:
    """Tokenize the units whose file is missing, batched into jobs of about `unit_bytes` of text."""
    units_dir.mkdir(parents=True, exist_ok=True)
    todo = [u for u in units if not (units_dir / f"{u['id']}.npz").is_file()]
    if len(todo) < len(units):
        log.info("resuming prep: %d of %d work units already tokenized", len(units) - len(todo), len(units))
    jobs = [{"tokenizer": str(tokenizer), "eos_id": eos_id, "dtype": dtype, "units_dir": str(units_dir),
             "text_field": text_field, "skip_bad": skip_bad, "units": batch} for batch in _batches(todo, unit_bytes)]
    total = sum(u["chunk"][4] for u in units)
    progress = Progress("tokenize", total, total - sum(u["chunk"][4] for u in todo), show_bar)
    try:
        run_pool(_tokenize_job, jobs, workers, lambda r: progress.update(r[3], docs=r[1], tokens=r[2]))
    finally:
        stats = progress.close()
    return stats


def _batches(units: Iterable[dict[str, Any]], unit_bytes: int) -> list[list[dict[str, Any]]]:
    """Consecutive units grouped until each group holds >= unit_bytes of text (many small files)."""
    out, batch, size = [], [], 0
    for unit in units:
        batch.append(unit)
        size += unit["chunk"][4]
        if size >= unit_bytes:
            out.append(batch)
            batch, size = [], 0
    if batch:
        out.append(batch)
    return out
