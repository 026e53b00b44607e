"""Prepare a token corpus: text / JSONL / Parquet / HF-on-disk -> byte-level BPE -> fixed-length samples
in MDS shards, tokenized in parallel, resumable after a kill.

A prepared directory (the DataConfig `path`):

    DIR/
        manifest.json    written last: format, vocab_size, eos_id, dtype, seq_len, packing, per-split
                         counts, the source files with sha256 checksums, seeds, and the request that
                         produced it (read_manifest)
        tokenizer.json   HF `tokenizers` file (load_tokenizer)
        documents.json   how documents map to splits: global document ids of val and test (train is
                         the rest); ids count non-empty documents in source-file order (split_documents)
        train/, val/ [, test/]  MDS shards + index.json; one column "tokens": ndarray [seq_len + 1]

Documents and splits. The inputs are matched and sorted; each file is read in its format (readers.py).
Documents get global ids 0..D-1 in that order. A seeded draw (numpy, `seed`) picks the val and test
ids; splitting is by document, so no held-out text is trained on.

Packing ("concat", the default): a split's documents in id order, each followed by EOS, form one
token stream cut into samples of seq_len + 1 tokens (inputs s[:-1], labels s[1:]); documents are kept
whole in the stream, samples cross document ends, and only the stream's last partial sample is dropped.
"window": each document + EOS is cut into its own non-overlapping windows of seq_len + 1 tokens, so a
sample never mixes documents (the long-document regime: documents longer than the training length);
each document's tail shorter than a window, and documents shorter than one, are dropped and counted.

Pipeline, and why a killed prep resumes exactly. Work goes into a hidden sibling `.DIR.partial/`:
    request.json    the request; a partial of another request is discarded (with a log line)
    lock            flock held while a prep runs; a second prep on the same DIR stops with an error
    scan.json       every input validated and cut into chunks (readers.scan_file), file checksums
    tokenizer.json  trained on a seeded sample of train documents, or the given one
    units/NNNNNN.npz  the token ids of one work unit (about UNIT_BYTES of text), per split
    final/          the shards being assembled from the units, then manifest.json
Each file appears by an atomic rename, so whatever a kill leaves is complete and reused; the units
that are missing are tokenized (over `workers` processes), and assembly always restarts from the
units. Every step is a pure function of the sources and request, so the result is byte-identical to
an uninterrupted prep. Finally `final/` is renamed to DIR and the partial removed: a directory holding
manifest.json is always complete.
"""
from __future__ import annotations

import fcntl
import glob
import hashlib
import json
import logging
import os
import random
import secrets
import shutil
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from fwpkm_megatron.data import readers
from fwpkm_megatron.data import tokenizer as bpe
from fwpkm_megatron.data.layout import (DOCUMENTS, FORMAT, MANIFEST, READABLE_FORMATS, TOKENIZER, UNIT_BYTES,
                                        sha256_file)
from fwpkm_megatron.data.readers import DataError
from fwpkm_megatron.data.units import Unit, held_locks, tokenize_units, unit_documents, unit_splits, work_units
from fwpkm_megatron.data.streaming_compat import import_streaming

log = logging.getLogger(__name__)

PACKINGS = ("concat", "window")
COMPRESSIONS = (None, "zstd", "gz", "bz2", "br", "snappy")  # MDS shard compression (streaming codecs)
DTYPES = ("uint16", "uint32")
SHARD_BYTES = 1 << 25      # 32 MiB shards: a few per GB of tokens, small enough to stream from a remote
TOKENIZER_SAMPLE_BYTES = 256_000_000  # default BPE training sample: 256 MB of train text
_STDLIB_SKIP_DIRS = {"site-packages", "test", "tests", "idle_test"}


# ---------------------------------------------------------------- sources

def stdlib_files() -> tuple[Path, list[Path]]:
    """The running Python's standard-library `*.py` files (no site-packages, no test dirs), sorted."""
    root = Path(sysconfig.get_paths()["stdlib"]).resolve()
    files = [p for p in root.rglob("*.py")
             if p.is_file() and not _STDLIB_SKIP_DIRS & set(p.relative_to(root).parts[:-1])]
    return root, sorted(files)


def _match_inputs(inputs: list[str], fmt: str) -> list[tuple[Path, str]]:
    """Expand paths and globs (`**` recursive) into sorted unique (path, format); each must match."""
    found: dict[Path, str] = {}
    for pattern in inputs:
        path = Path(pattern).expanduser()
        if path.is_dir():
            if fmt not in ("auto", "hf"):
                raise DataError(f"input {pattern}: is a directory; pass a glob such as '{pattern}/**/*.txt'")
            found[path.resolve()] = readers.detect_format(path)
            continue
        matches = [Path(m) for m in glob.glob(str(path), recursive=True)]
        files = [m.resolve() for m in matches if m.is_file() or (m.is_dir() and (m / readers.HF_STATE).is_file())]
        if not files:
            raise DataError(f"input {pattern}: no files matched")
        for file in files:
            found[file] = readers.detect_format(file) if fmt == "auto" else fmt
    for path, kind in found.items():
        if kind == "hf" and not (path / readers.HF_STATE).is_file():
            raise DataError(f"{path}: format hf needs a datasets save_to_disk directory (with {readers.HF_STATE})")
    return sorted(found.items())


def _size(path: Path) -> int:
    try:
        if path.is_dir():
            return sum(p.stat().st_size for p in path.iterdir() if p.is_file())
        return path.stat().st_size
    except OSError as exc:
        raise DataError(f"{path}: cannot stat ({exc.strerror})") from None


def _sources(inputs: list[str] | None, fmt: str) -> tuple[dict[str, Any], list[tuple[Path, str, int]]]:
    """Candidate files as (path, format, size), plus the manifest's source description."""
    if inputs is None:
        root, files = stdlib_files()
        matched = [(p, "text") for p in files]
        desc: dict[str, Any] = {"kind": "stdlib", "root": str(root)}
    else:
        matched = _match_inputs(list(inputs), fmt)
        desc = {"kind": "files", "inputs": list(inputs)}
    sized = [(path, kind, _size(path)) for path, kind in matched]
    if not sized:
        raise DataError(f"no source files found under {desc.get('root', inputs)}")
    listing = "".join(f"{p}\t{k}\t{n}\n" for p, k, n in sized).encode()
    desc["listing_sha256"] = hashlib.sha256(listing).hexdigest()  # cheap identity: paths, formats, sizes
    return desc, sized


def _select(sized: list[tuple[Path, str, int]], max_bytes: int | None, seed: int) -> list[tuple[Path, str, int]]:
    """Files up to `max_bytes` in total, taken greedily in a seeded order (files that would overflow
    the cap are skipped, later smaller ones still fit), returned in sorted order."""
    if max_bytes is None:
        return sized
    order = list(sized)
    random.Random(f"{seed}/select").shuffle(order)
    chosen, total = [], 0
    for item in order:
        if total + item[2] <= max_bytes:
            chosen.append(item)
            total += item[2]
    return sorted(chosen)


def _scan(files: list[tuple[Path, str, int]], *, text_field: str, strict: bool) -> list[dict[str, Any]]:
    """readers.scan_file over every file: validated, chunked, checksummed (scan.json's `files`)."""
    scanned = []
    for path, kind, size in files:
        result = readers.scan_file(path, kind, text_field=text_field, chunk_bytes=UNIT_BYTES, strict=strict)
        scanned.append({"path": str(path), "format": kind, "bytes": size, "sha256": sha256_file(path),
                        "documents": sum(c.documents for c in result.chunks),
                        "text_bytes": sum(c.text_bytes for c in result.chunks), "empty": result.empty,
                        "undecodable": result.undecodable, "chunks": [c.to_json() for c in result.chunks]})
    return scanned


# ---------------------------------------------------------------- splits and work units

def _held_out(n_docs: int, val_fraction: float, test_fraction: float, seed: int) -> dict[str, list[int]]:
    """Seeded val and test document ids (sorted). Val gets round(val_fraction * D), at least 1; test gets
    round(test_fraction * D), at least 1 if test_fraction > 0; train keeps at least 1."""
    n_val = max(1, round(val_fraction * n_docs))
    n_test = max(1, round(test_fraction * n_docs)) if test_fraction > 0 else 0
    if n_docs - n_val - n_test < 1:
        raise DataError(f"corpus has {n_docs} documents; need more than val ({n_val}) + test ({n_test}) "
                        "to keep one for train")
    rng = np.random.default_rng([seed, 0x5b1])  # Floyd's sampling: memory O(held out), not O(D)
    held = rng.choice(n_docs, size=n_val + n_test, replace=False)
    out = {"val": sorted(int(i) for i in held[:n_val])}
    if n_test:
        out["test"] = sorted(int(i) for i in held[n_val:])
    return out


# ---------------------------------------------------------------- assembling shards from units

def token_dtype(vocab_size: int) -> str:
    """Narrowest unsigned dtype holding ids [0, vocab_size)."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def _samples(units_dir: Path, n_units: int, split: str, sample_len: int, packing: str,
             counts: dict[str, int]) -> Iterator[np.ndarray]:
    """Rows [sample_len] of one split, from the unit files in order; fills `counts`."""
    carry = None
    for i in range(n_units):
        with np.load(units_dir / f"{i:06d}.npz") as unit:
            tokens, lengths = unit[f"{split}_tokens"], unit[f"{split}_lengths"]
        counts["documents"] += len(lengths)
        counts["tokens"] += len(tokens)
        if packing == "concat":
            stream = tokens if carry is None else np.concatenate([carry, tokens])
            n = len(stream) // sample_len
            yield from stream[: n * sample_len].reshape(n, sample_len)
            carry = stream[n * sample_len:]
        else:
            offsets = np.concatenate([[0], np.cumsum(lengths)])
            for lo, hi in zip(offsets[:-1], offsets[1:]):
                n = int(hi - lo) // sample_len
                counts["dropped_documents"] += int(n == 0)
                yield from tokens[lo: lo + n * sample_len].reshape(n, sample_len)


def _write_split(split_dir: Path, rows: Iterator[np.ndarray], dtype: str, sample_len: int,
                 compression: str | None) -> int:
    """MDS shards with one column `tokens` of fixed shape [sample_len], sha1 per shard; returns rows."""
    streaming = import_streaming()
    n = 0
    with streaming.MDSWriter(out=str(split_dir), columns={"tokens": f"ndarray:{dtype}:{sample_len}"},
                             compression=compression, hashes=["sha1"], size_limit=SHARD_BYTES) as writer:
        for row in rows:
            writer.write({"tokens": row})
            n += 1
    return n


def _write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (temp file + rename)."""
    part = path.with_name(f".{path.name}.{os.getpid()}.part")
    part.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")
    os.replace(part, path)


# ---------------------------------------------------------------- the partial directory

def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_dead_temps(out: Path) -> None:
    """Delete `.DIR.tmp-<pid>-*` siblings of preps that were killed (their pid is gone)."""
    for tmp in out.parent.glob(f".{out.name}.tmp-*"):
        pid = tmp.name.rsplit(".tmp-", 1)[1].split("-")[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            log.warning("removing %s, left by an interrupted prep", tmp)
            shutil.rmtree(tmp, ignore_errors=True)


def partial_dir(out: Path) -> Path:
    """Where an unfinished prep of `out` keeps its work (module docstring)."""
    return out.parent / f".{out.name}.partial"


class _Partial:
    """The locked partial directory of one request; stale partials of other requests are discarded."""

    def __init__(self, out: Path, request: dict[str, Any]):
        self.root = partial_dir(out)
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.root / "lock", "a+")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise DataError(f"{out}: another fwpkm-prep is writing it (lock {self.root / 'lock'} is held)") from None
        held_locks.add(self._lock.fileno())
        try:
            held = json.loads((self.root / "request.json").read_text())
        except (OSError, ValueError):
            held = None
        if held != request:
            if held is not None or any(p.name != "lock" for p in self.root.iterdir()):
                log.warning("discarding %s: left by an interrupted prep of a different request", self.root)
            for p in self.root.iterdir():
                if p.name != "lock":
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
            _write_json(self.root / "request.json", request)
        (self.root / "units").mkdir(exist_ok=True)

    def load(self, name: str) -> Any:
        try:
            return json.loads((self.root / name).read_text())
        except (OSError, ValueError):
            return None

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
        self.close()

    def close(self) -> None:
        if not self._lock.closed:
            held_locks.discard(self._lock.fileno())
            self._lock.close()


def _install(tmp: Path, out: Path) -> None:
    """Rename the finished directory to `out`, replacing whatever the caller agreed to replace."""
    if out.exists():
        old = out.parent / f".{out.name}.tmp-{os.getpid()}-old-{secrets.token_hex(4)}"
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)


# ---------------------------------------------------------------- requests and reuse

def _request(inputs: list[str] | None, tokenizer_path: str | None, vocab_size: int, seq_len: int,
             val_fraction: float, seed: int, max_bytes: int | None, *, fmt: str = "auto",
             text_field: str = "text", test_fraction: float = 0.0, packing: str = "concat",
             compression: str | None = None, dtype: str | None = None,
             tokenizer_sample_bytes: int = TOKENIZER_SAMPLE_BYTES) -> tuple[dict[str, Any], dict, list]:
    """Validate arguments and resolve sources -> (request as stored in the manifest, source, files)."""
    problems = []
    if seq_len < 1:
        problems.append(f"seq_len={seq_len}: must be >= 1")
    if not 0.0 <= val_fraction < 1.0:
        problems.append(f"val_fraction={val_fraction}: must be in [0, 1) (val gets >= 1 document anyway)")
    if not 0.0 <= test_fraction < 1.0 or val_fraction + test_fraction >= 1.0:
        problems.append(f"test_fraction={test_fraction}: must be in [0, 1 - val_fraction)")
    if max_bytes is not None and max_bytes < 1:
        problems.append(f"max_bytes={max_bytes}: must be >= 1 or None")
    if seed < 0:
        problems.append(f"seed={seed}: must be >= 0 (streaming shuffles with it)")
    if fmt not in readers.FORMATS:
        problems.append(f"format={fmt!r}: must be one of {', '.join(readers.FORMATS)}")
    if inputs is None and fmt not in ("auto", "text"):
        problems.append(f"format={fmt!r} needs inputs (the default corpus is text)")
    if packing not in PACKINGS:
        problems.append(f"packing={packing!r}: must be one of {', '.join(PACKINGS)}")
    if compression not in COMPRESSIONS:
        problems.append(f"compression={compression!r}: must be one of {COMPRESSIONS}")
    if dtype not in (None, *DTYPES):
        problems.append(f"dtype={dtype!r}: must be one of {DTYPES} or None (by vocab size)")
    if tokenizer_sample_bytes < 1:
        problems.append(f"tokenizer_sample_bytes={tokenizer_sample_bytes}: must be >= 1")
    if tokenizer_path is None:
        limit = 1 << (16 if dtype == "uint16" else 32)
        if not bpe.MIN_VOCAB_SIZE <= vocab_size <= limit:
            problems.append(f"vocab_size={vocab_size}: does not fit; a byte-level BPE needs "
                            f">= {bpe.MIN_VOCAB_SIZE} (256 bytes + EOS) and ids must fit {dtype or 'uint32'}")
    if problems:
        raise DataError("; ".join(problems))
    tok_sha = None
    if tokenizer_path is not None:
        try:
            tok_sha = hashlib.sha256(Path(tokenizer_path).read_bytes()).hexdigest()
        except OSError as exc:
            raise DataError(f"tokenizer {tokenizer_path}: cannot read ({exc.strerror})") from None
    source, sized = _sources(inputs, fmt)
    request = {"listing_sha256": source["listing_sha256"], "tokenizer_sha256": tok_sha,
               "vocab_size": None if tokenizer_path else vocab_size, "seq_len": seq_len,
               "val_fraction": val_fraction, "test_fraction": test_fraction, "seed": seed,
               "max_bytes": max_bytes, "format": fmt, "text_field": text_field, "packing": packing,
               "compression": compression, "dtype": dtype,
               "tokenizer_sample_bytes": None if tokenizer_path else tokenizer_sample_bytes}
    return request, source, sized


def _complete_manifest(out: Path) -> dict[str, Any] | None:
    """The manifest of a complete prep at `out`, None if there is none; DataError if `out` is a file."""
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a directory")
    try:
        return json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def existing_prep(out_dir: str | os.PathLike, *, inputs: list[str] | None = None,
                  tokenizer_path: str | None = None, vocab_size: int = 4096, seq_len: int = 256,
                  val_fraction: float = 0.02, seed: int = 0, max_bytes: int | None = None,
                  **options: Any) -> dict | None:
    """The manifest at `out_dir` if it is complete and was made by the same request, else None.

    "Same" means the same source listing (paths, formats and sizes), tokenizer file bytes and
    parameters (`options`: the keyword arguments of prepare_corpus that shape the result), so a rerun
    of `make demo` reuses the data. Costs a stat per source file, no reads.
    """
    manifest = _complete_manifest(Path(out_dir))
    if manifest is None:
        return None
    options = {k: v for k, v in options.items() if k not in ("workers", "overwrite", "progress")}
    request, _, _ = _request(inputs, tokenizer_path, vocab_size, seq_len, val_fraction, seed, max_bytes,
                             **options)
    return manifest if manifest.get("format") == FORMAT and manifest.get("request") == request else None


# ---------------------------------------------------------------- the pipeline

def _tokenizer(partial: _Partial, tokenizer_path: str | None, vocab_size: int, sample_bytes: int,
               units: list[Unit], scanned: list[dict[str, Any]], held: dict[str, list[int]],
               text_field: str, seed: int) -> Tokenizer:
    """The partial's tokenizer.json: loaded if a killed prep got that far, else trained or copied."""
    path = partial.root / TOKENIZER
    if path.is_file():
        return Tokenizer.from_file(str(path))
    if tokenizer_path is None:
        texts, total = [], 0
        order = list(range(len(units)))
        random.Random(f"{seed}/tokenizer-sample").shuffle(order)
        for u in order:  # whole units in a seeded order, train documents only, until the sample is full
            unit = units[u]
            train = unit_splits(unit, held) == 0
            for text, is_train in zip(unit_documents(scanned, unit, text_field), train):
                if is_train:
                    texts.append(text)
                    total += len(text)
            if total >= sample_bytes:
                break
        tok = bpe.train_bpe(texts, vocab_size)
    else:
        try:
            tok = Tokenizer.from_file(str(tokenizer_path))
        except Exception as exc:  # tokenizers raises a bare Exception on parse errors
            raise DataError(f"tokenizer {tokenizer_path}: cannot load ({exc})") from None
    part = path.with_name(f".{TOKENIZER}.part")
    tok.save(str(part))
    os.replace(part, path)
    return Tokenizer.from_file(str(path))  # what the workers and a resumed prep load


def prepare_corpus(out_dir: str | os.PathLike, *, inputs: list[str] | None = None,
                   tokenizer_path: str | None = None, vocab_size: int = 4096, seq_len: int = 256,
                   val_fraction: float = 0.02, seed: int = 0, max_bytes: int | None = None,
                   overwrite: bool = False, progress: bool = True, fmt: str = "auto",
                   text_field: str = "text", test_fraction: float = 0.0, packing: str = "concat",
                   compression: str | None = None, dtype: str | None = None, workers: int = 1,
                   tokenizer_sample_bytes: int = TOKENIZER_SAMPLE_BYTES) -> dict[str, Any]:
    """Tokenize a corpus into packed MDS shards per split (layout and resume in the module docstring).

    Args:
        out_dir: target directory; appears complete or not at all.
        inputs: paths or globs of text files (one document each), JSON Lines, Parquet files, or
            datasets save_to_disk directories; None = the running Python's standard library
            (`*.py`, no site-packages or test dirs).
        tokenizer_path: an existing tokenizer.json to use instead of training one; it must hold an EOS
            token (one of tokenizer.EOS_CANDIDATES). `vocab_size` is then ignored.
        vocab_size: BPE vocab to train (including the byte alphabet and EOS). A small corpus may
            yield fewer; the manifest holds the real size.
        seq_len: tokens per training input; samples hold seq_len + 1 (inputs plus shifted labels).
        val_fraction, test_fraction: shares of documents held out (val gets at least one; test only
            if test_fraction > 0).
        seed: fixes the max_bytes file selection, the split and the tokenizer sample.
        max_bytes: cap on source file bytes, filled greedily in a seeded file order (quick demos).
        overwrite: replace an existing prep (or other content) at out_dir.
        progress: show a progress bar (else a log line every 10 s).
        fmt: "auto" (by suffix; a directory with state.json is "hf"), "text", "jsonl", "parquet", "hf".
        text_field: JSON key or column holding the text (jsonl, parquet, hf).
        packing: "concat" or "window" (module docstring).
        compression: MDS shard compression, e.g. "zstd"; None = uncompressed.
        dtype: token dtype; None = uint16 if the vocab fits, else uint32.
        workers: tokenizer processes (1 = in this process, using the tokenizer's own threads).
        tokenizer_sample_bytes: train text the BPE is trained on (whole work units, seeded order).

    Returns:
        The manifest dict (also written to out_dir/manifest.json).

    Raises:
        DataError: no files matched; an unreadable file, malformed JSON line, unreadable Parquet file
            or missing text field (naming file and line); an empty corpus; a split too short for one
            sample; a vocab that does not fit the dtype; a tokenizer without EOS; out_dir occupied or
            being written by another prep.
    """
    t0 = time.perf_counter()
    out = Path(out_dir).expanduser().absolute()
    request, source, sized = _request(
        inputs, tokenizer_path, vocab_size, seq_len, val_fraction, seed, max_bytes, fmt=fmt,
        text_field=text_field, test_fraction=test_fraction, packing=packing, compression=compression,
        dtype=dtype, tokenizer_sample_bytes=tokenizer_sample_bytes)
    if workers < 1:
        raise DataError(f"workers={workers}: must be >= 1")
    held_prep = _complete_manifest(out)
    if not overwrite and held_prep is not None:
        if held_prep.get("format") in READABLE_FORMATS and held_prep.get("format") != FORMAT:
            log.warning("%s holds a prep in the older format %s; replacing it", out, held_prep.get("format"))
        else:
            same = held_prep.get("request") == request
            raise DataError(f"{out}: already holds a complete prep"
                            f"{' of this request' if same else ' of a different request'}; "
                            "pass overwrite=True (fwpkm-prep --overwrite) to replace it")
    elif not overwrite and out.is_dir() and any(out.iterdir()):
        raise DataError(f"{out}: exists, is not empty and holds no {MANIFEST}; refusing to replace "
                        "it without overwrite=True")

    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_temps(out)
    partial = _Partial(out, request)
    try:
        manifest = _prepare(out, partial, request, source, sized, tokenizer_path=tokenizer_path,
                            vocab_size=vocab_size, seq_len=seq_len, seed=seed, max_bytes=max_bytes,
                            fmt=fmt, text_field=text_field, packing=packing, compression=compression,
                            dtype=dtype, workers=workers, progress=progress,
                            tokenizer_sample_bytes=tokenizer_sample_bytes, val_fraction=val_fraction,
                            test_fraction=test_fraction)
    except DataError:
        partial.remove()  # bad input: nothing worth resuming
        raise
    except BaseException:
        partial.close()   # killed or crashed: keep the finished units for the next run
        raise
    partial.remove()
    log.info("prepared %s in %.1fs", out, time.perf_counter() - t0)
    return manifest


def _prepare(out: Path, partial: _Partial, request: dict[str, Any], source: dict[str, Any],
             sized: list[tuple[Path, str, int]], *, tokenizer_path: str | None, vocab_size: int,
             seq_len: int, seed: int, max_bytes: int | None, fmt: str, text_field: str, packing: str,
             compression: str | None, dtype: str | None, workers: int, progress: bool,
             tokenizer_sample_bytes: int, val_fraction: float, test_fraction: float) -> dict[str, Any]:
    """Scan, split, tokenizer, units, assembly, install (module docstring), reusing the partial's work."""
    scan = partial.load("scan.json")
    if scan is None:
        chosen = _select(sized, max_bytes, seed)
        scan = {"files": _scan(chosen, text_field=text_field, strict=source["kind"] != "stdlib")}
        _write_json(partial.root / "scan.json", scan)
    scanned = scan["files"]
    n_docs = sum(f["documents"] for f in scanned)
    where = source.get("root") or ", ".join(source["inputs"])
    if not n_docs:
        raise DataError(f"empty corpus: no non-empty documents in {where}"
                        + (f" within max_bytes={max_bytes}" if max_bytes else ""))
    if n_docs < 2:
        only = next(f["path"] for f in scanned if f["documents"])
        raise DataError(f"corpus has 1 document ({only}); need >= 2 to split train/val by document")
    for f in scanned:
        if f["undecodable"]:
            log.warning("skipped %s: not UTF-8", f["path"])
    held = _held_out(n_docs, val_fraction, test_fraction, seed)
    splits = ("train", *held)
    units = work_units(scanned, UNIT_BYTES)

    tok = _tokenizer(partial, tokenizer_path, vocab_size, tokenizer_sample_bytes, units, scanned, held,
                     text_field, seed)
    eos = bpe.find_eos(tok)
    if eos is None:
        raise DataError(f"tokenizer {tokenizer_path}: has no EOS token (looked for "
                        f"{', '.join(bpe.EOS_CANDIDATES)})")
    eos_token, eos_id = eos
    vocab = bpe.vocab_size_of(tok)
    token_type = dtype or token_dtype(vocab)
    if vocab > 1 << (16 if token_type == "uint16" else 32):
        raise DataError(f"tokenizer {tokenizer_path or 'trained'}: vocab_size={vocab} does not fit {token_type} ids")

    t_tok = time.perf_counter()
    stats = tokenize_units(units, scanned, held, partial.root / TOKENIZER, text_field, eos_id, token_type,
                            partial.root / "units", workers, progress)
    log.info("tokenized %d units: %.0f docs/s, %.0f tok/s (%d workers)", len(units), stats["docs_per_s"],
             stats["tokens_per_s"], workers)

    final = partial.root / "final"
    shutil.rmtree(final, ignore_errors=True)  # a killed assembly restarts from the units
    final.mkdir()
    counts = {}
    for split in splits:
        c = {"documents": 0, "tokens": 0, "dropped_documents": 0}
        rows = _samples(partial.root / "units", len(units), split, seq_len + 1, packing, c)
        n_samples = _write_split(final / split, rows, token_type, seq_len + 1, compression)
        if not n_samples:
            hint = "a larger val_fraction" if split != "train" else "more data"
            raise DataError(f"{split} split: {c['tokens']} tokens from {c['documents']} documents, fewer than "
                            f"one sample of seq_len+1={seq_len + 1}{' per document' if packing == 'window' else ''}; "
                            f"use {hint} or a smaller seq_len")
        counts[split] = {**c, "samples": n_samples, "dropped_tokens": c["tokens"] - n_samples * (seq_len + 1)}
    shutil.copyfile(partial.root / TOKENIZER, final / TOKENIZER)
    _write_json(final / DOCUMENTS, {"held_out": held, "documents": n_docs,
                                    "files": [{k: f[k] for k in ("path", "format", "documents")} for f in scanned]})
    content = hashlib.sha256("".join(f["sha256"] for f in scanned).encode()).hexdigest()
    manifest = {
        "format": FORMAT, "seq_len": seq_len, "sample_len": seq_len + 1, "dtype": token_type,
        "vocab_size": vocab, "eos_id": eos_id, "eos_token": eos_token, "packing": packing,
        "compression": compression,
        "tokenizer": {"trained": tokenizer_path is None, "from": tokenizer_path,
                      "sha256": hashlib.sha256((final / TOKENIZER).read_bytes()).hexdigest()},
        "source": {**source, "candidate_files": len(sized), "files": len(scanned),
                   "bytes": sum(f["bytes"] for f in scanned), "text_bytes": sum(f["text_bytes"] for f in scanned),
                   "documents": n_docs, "content_sha256": content, "text_field": text_field,
                   "skipped_empty": sum(f["empty"] for f in scanned),
                   "skipped_undecodable": [f["path"] for f in scanned if f["undecodable"]],
                   "file_list": [{k: f[k] for k in ("path", "format", "bytes", "sha256", "documents")}
                                 for f in scanned]},
        "splits": counts, "seed": seed, "seeds": {"select": f"{seed}/select", "split": [seed, 0x5b1],
                                                  "tokenizer_sample": f"{seed}/tokenizer-sample"},
        "val_fraction": request["val_fraction"], "test_fraction": request["test_fraction"],
        "max_bytes": max_bytes, "request": request,
    }
    _write_json(final / MANIFEST, manifest)  # last: its presence marks the directory complete
    _install(final, out)
    log.info("assembled shards in %.1fs after tokenizing", time.perf_counter() - t_tok)
    return manifest
