"""Prepare a token corpus: text / JSONL / Parquet / HF-on-disk, local or in an object store, plain or
.gz/.zst -> byte-level BPE (or a pretrained tokenizer) -> fixed-length samples in MDS shards, on local
disk and optionally uploaded; parallel, resumable after a kill, validated before any work.

A prepared directory (the DataConfig `path`, or the local twin of its `remote`):

    DIR/
        manifest.json    written last: format, vocab_size, eos_id, dtype, seq_len, packing, per-split
                         counts, the source files with sha256 checksums, seeds, the request that
                         produced it, and the prep report (documents, tokens, skipped and bad records
                         by reason, seconds per stage)
        tokenizer.json   HF `tokenizers` file (load_tokenizer)
        documents.json   global document ids of val and test (train is the rest); ids count non-empty
                         documents in input order (split_documents)
        train/, val/ [, test/]  MDS shards + index.json; one column "tokens": ndarray [seq_len + 1]

Stages (each shows a progress bar, or a log line every 10 s without a terminal):
    validate   arguments; the tokenizer loads and has its EOS; the output (and remote) is writable and
               holds no other prep; the first records of every input parse and hold the text field;
               all problems reported together, one line each, before anything is written
    scan       every input fetched (remote), validated and cut into chunks, in `workers` processes
    tokenizer  a byte-level BPE trained on a seeded sample of train documents, or the pretrained one
    tokenize   every chunk's documents into a unit file, in `workers` processes
    assemble   units -> samples -> MDS shards (uploaded through MDSWriter's (local, remote) output)
Scan and tokenize results are keyed by content (units.py): a killed prep, a prep rerun after one bad
file was fixed, or a rerun that changes only assembly options (seq_len, packing, compression, remote)
reuses every finished file and unit. An error never deletes that work; only a complete prep removes
the partial directory (partial.py). The result is a pure function of the sources and request,
byte-identical whatever the number of workers or interruptions. `final/` is renamed to DIR after the
remote copy (manifest.json uploaded last) is complete: a directory or remote prefix holding
manifest.json is always complete.

Documents and splits. Inputs are matched and sorted; documents get global ids 0..D-1 in that order. A
seeded draw (numpy, `seed`) picks the val and test ids; splitting is by document, so no held-out text
is trained on.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from fwpkm_megatron.data import readers
from fwpkm_megatron.data import remote as store
from fwpkm_megatron.data import tokenizer as bpe
from fwpkm_megatron.data.assemble import token_dtype, write_splits
from fwpkm_megatron.data.layout import (ALL_SPLITS, DOCUMENTS, FORMAT, MANIFEST, READABLE_FORMATS, TOKENIZER,
                                        UNIT_BYTES)
from fwpkm_megatron.data.partial import Partial, install, partial_dir, remove_dead_temps
from fwpkm_megatron.data.readers import DataError
from fwpkm_megatron.data.sources import Input, select_inputs, source_inputs, stdlib_files
from fwpkm_megatron.data.units import Progress, scan_files, tokenize_units, write_json

log = logging.getLogger(__name__)

__all__ = ["existing_prep", "partial_dir", "prepare_corpus", "stdlib_files", "token_dtype"]

PACKINGS = ("concat", "window")
COMPRESSIONS = (None, "zstd", "gz", "bz2", "br", "snappy")  # MDS shard compression (streaming codecs)
DTYPES = ("uint16", "uint32")
TOKENIZER_SAMPLE_BYTES = 256_000_000  # default BPE training sample: 256 MB of train text
MAX_SEQ_LEN = 1 << 20       # a sanity bound: longer samples are a typo, not a context length
HEAD_RECORDS, HEAD_BYTES = 5, 1 << 20  # validation reads this much of each input before the scan


# ---------------------------------------------------------------- sources

def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


# ---------------------------------------------------------------- validation (before any work)

def _request(inputs: list[str] | None, tokenizer_path: str | None, vocab_size: int, seq_len: int,
             val_fraction: float, seed: int, max_bytes: int | None, *, fmt: str = "auto",
             text_field: str = "text", test_fraction: float = 0.0, packing: str = "concat",
             compression: str | None = None, dtype: str | None = None,
             tokenizer_sample_bytes: int = TOKENIZER_SAMPLE_BYTES, eos_token: str | None = None,
             skip_bad_records: bool = False, remote_out: str | None = None,
             ) -> tuple[dict[str, Any], dict, list[Input], tuple | None]:
    """Validate arguments, the tokenizer and resolve sources -> (request as stored in the manifest,
    source, inputs, (tokenizer, eos token, eos id) or None)."""
    problems = []
    if not 1 <= seq_len <= MAX_SEQ_LEN:
        problems.append(f"seq_len={seq_len}: must be in [1, {MAX_SEQ_LEN}]")
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
    if remote_out is not None and not store.is_url(remote_out):
        problems.append(f"remote={remote_out!r}: must be an object-store URL (s3://bucket/prefix, gs://, ...)")
    pretrained, tok_sha = None, None
    if tokenizer_path is None:
        limit = 1 << (16 if dtype == "uint16" else 32)
        if not bpe.MIN_VOCAB_SIZE <= vocab_size <= limit:
            problems.append(f"vocab_size={vocab_size}: does not fit; a byte-level BPE needs "
                            f">= {bpe.MIN_VOCAB_SIZE} (256 bytes + EOS) and ids must fit {dtype or 'uint32'}")
        if eos_token is not None:
            problems.append(f"eos_token={eos_token!r}: only for a pretrained tokenizer (a trained BPE uses "
                            f"{bpe.EOS_TOKEN})")
    else:
        try:
            pretrained = bpe.load_pretrained(tokenizer_path, eos_token)
        except ValueError as exc:
            problems.append(f"tokenizer {tokenizer_path}: {exc}")
        else:
            vocab = bpe.vocab_size_of(pretrained[0])
            if dtype == "uint16" and vocab > 1 << 16:
                problems.append(f"tokenizer {tokenizer_path}: vocab_size={vocab} does not fit uint16 ids")
            tok_sha = hashlib.sha256(pretrained[0].to_str().encode()).hexdigest()
    if problems:
        raise DataError("\n".join(problems))
    source, files = source_inputs(inputs, fmt)
    request = {"listing_sha256": source["listing_sha256"], "tokenizer_sha256": tok_sha,
               "vocab_size": None if tokenizer_path else vocab_size, "seq_len": seq_len,
               "val_fraction": val_fraction, "test_fraction": test_fraction, "seed": seed,
               "max_bytes": max_bytes, "format": fmt, "text_field": text_field, "packing": packing,
               "compression": compression, "dtype": dtype, "eos_token": pretrained[1] if pretrained else None,
               "skip_bad_records": skip_bad_records, "remote": remote_out,
               "tokenizer_sample_bytes": None if tokenizer_path else tokenizer_sample_bytes}
    return request, source, files, pretrained


def _check_heads(files: list[Input], text_field: str, strict: bool, workers: int) -> None:
    """The first records of every input parse and hold the text field; every problem, one line each."""
    def check(item: Input) -> str | None:
        try:
            if item.remote is None:
                readers.check_head(Path(item.path), item.format, text_field=text_field, records=HEAD_RECORDS)
                return None
            with tempfile.TemporaryDirectory() as tmp:
                local = Path(tmp, item.path.rstrip("/").rsplit("/", 1)[-1])
                truncated = store.read_head(item.remote, HEAD_BYTES, local)
                try:
                    readers.check_head(local, item.format, text_field=text_field, records=HEAD_RECORDS,
                                       truncated=truncated)
                except DataError as exc:
                    raise DataError(str(exc).replace(str(local), item.path)) from None
        except DataError as exc:
            return str(exc)
        return None

    if not strict:  # the stdlib demo: lenient, undecodable files are skipped
        return
    with ThreadPoolExecutor(max(4, min(workers, 32))) as pool:
        problems = [p for p in pool.map(check, files) if p]
    if problems:
        more = f"\n... and {len(problems) - 20} more inputs fail" if len(problems) > 20 else ""
        raise DataError("\n".join(problems[:20]) + more)


def _complete_manifest(out: Path) -> dict[str, Any] | None:
    """The manifest of a complete prep at `out`, None if there is none; DataError if `out` is a file."""
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a directory")
    try:
        return json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def _check_output(out: Path, remote_out: str | None, request: dict[str, Any], overwrite: bool) -> None:
    """The target holds no other complete prep (unless overwrite) and the remote is writable."""
    held = _complete_manifest(out)
    if not overwrite and held is not None:
        if held.get("format") in READABLE_FORMATS and held.get("format") != FORMAT:
            log.warning("%s holds a prep in the older format %s; replacing it", out, held.get("format"))
        else:
            same = held.get("request") == request
            raise DataError(f"{out}: already holds a complete prep"
                            f"{' of this request' if same else ' of a different request'}; "
                            "pass overwrite=True (fwpkm-prep --overwrite) to replace it")
    elif not overwrite and out.is_dir() and any(out.iterdir()):
        raise DataError(f"{out}: exists, is not empty and holds no {MANIFEST}; refusing to replace "
                        "it without overwrite=True")
    if remote_out is not None:
        store.check_writable(remote_out)
        if not overwrite and store.read_remote_json(f"{remote_out}/{MANIFEST}") is not None:
            raise DataError(f"{remote_out}: already holds a complete prep ({MANIFEST}); pass overwrite=True "
                            "(fwpkm-prep --overwrite) to replace it")


def existing_prep(out_dir: str | os.PathLike, *, inputs: list[str] | None = None,
                  tokenizer_path: str | None = None, vocab_size: int = 4096, seq_len: int = 256,
                  val_fraction: float = 0.02, seed: int = 0, max_bytes: int | None = None,
                  **options: Any) -> dict | None:
    """The manifest at `out_dir` if it is complete and was made by the same request, else None.

    "Same" means the same source listing (paths, formats, sizes; ETags of remote inputs), tokenizer
    and parameters (`options`: the keyword arguments of prepare_corpus that shape the result), so a
    rerun of `make demo` reuses the data. Costs a stat per source file (a listing for remote ones).
    """
    manifest = _complete_manifest(Path(out_dir))
    if manifest is None:
        return None
    options = {k: v for k, v in options.items() if k not in ("workers", "overwrite", "progress")}
    if "remote" in options:
        options["remote_out"] = options.pop("remote")
    request, _, _, _ = _request(inputs, tokenizer_path, vocab_size, seq_len, val_fraction, seed, max_bytes,
                                **options)
    return manifest if manifest.get("format") == FORMAT and manifest.get("request") == request else None


# ---------------------------------------------------------------- the pipeline

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


def _splitter(held: dict[str, list[int]]):
    arrays = {s: np.asarray(ids, dtype=np.int64) for s, ids in held.items()}

    def split_of(ids: np.ndarray) -> np.ndarray:
        """Split index (position in ALL_SPLITS) of each document id."""
        out = np.zeros(len(ids), dtype=np.int8)
        for s, split in enumerate(ALL_SPLITS[1:], start=1):
            if split in arrays:
                out[np.isin(ids, arrays[split])] = s
        return out
    return split_of


def _units(scanned: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One unit per non-empty chunk, in document order, with its first global document id."""
    units, first = [], 0
    for file in scanned:
        for c, chunk in enumerate(file["chunks"]):
            if chunk[3]:
                units.append({"id": f"{file['key']}-{c:05d}", "path": file["path"], "local": file["local"],
                              "format": file["format"], "chunk": chunk, "first_doc": first})
                first += chunk[3]
    return units


def _tokenizer(partial: Partial, pretrained: tuple | None, vocab_size: int, sample_bytes: int,
               units: list[dict[str, Any]], split_of: Any, text_field: str, skip_bad: bool, seed: int,
               key: str, progress: bool) -> tuple[Path, str, int]:
    """The tokenizer file in the partial (loaded if a killed prep got that far), its EOS token and id."""
    if pretrained is not None:
        tok, eos_token, eos_id = pretrained
        path = partial.root / "tokenizers" / f"{hashlib.sha256(tok.to_str().encode()).hexdigest()[:20]}.json"
    else:
        eos_token, path = bpe.EOS_TOKEN, partial.root / "tokenizers" / f"trained-{key}.json"
    if not path.is_file():
        if pretrained is None:
            texts, total = [], 0
            order = list(range(len(units)))
            random.Random(f"{seed}/tokenizer-sample").shuffle(order)
            bar = Progress("tokenizer sample", min(sample_bytes, sum(u["chunk"][4] for u in units)), 0, progress)
            for u in order:  # whole units in a seeded order, train documents only, until the sample is full
                unit = units[u]
                docs = readers.read_chunk(Path(unit["local"]), unit["format"], readers.Chunk.from_json(unit["chunk"]),
                                          text_field=text_field, skip_bad=skip_bad)
                is_train = split_of(np.arange(unit["first_doc"], unit["first_doc"] + unit["chunk"][3])) == 0
                for text, train in zip(docs, is_train):
                    if train:
                        texts.append(text)
                        total += len(text)
                bar.update(unit["chunk"][4], docs=unit["chunk"][3])
                if total >= sample_bytes:
                    break
            bar.close()
            tok = bpe.train_bpe(texts, vocab_size, progress=progress)  # tokenizers' own bars
        part = path.with_name(f".{path.name}.part")
        tok.save(str(part))
        os.replace(part, path)
    eos_id = Tokenizer.from_file(str(path)).token_to_id(eos_token)  # what the workers and a resume load
    return path, eos_token, eos_id


def prepare_corpus(out_dir: str | os.PathLike, *, inputs: list[str] | None = None,
                   tokenizer_path: str | None = None, vocab_size: int = 4096, seq_len: int = 256,
                   val_fraction: float = 0.02, seed: int = 0, max_bytes: int | None = None,
                   overwrite: bool = False, progress: bool = True, fmt: str = "auto",
                   text_field: str = "text", test_fraction: float = 0.0, packing: str = "concat",
                   compression: str | None = None, dtype: str | None = None, workers: int = 1,
                   tokenizer_sample_bytes: int = TOKENIZER_SAMPLE_BYTES, eos_token: str | None = None,
                   skip_bad_records: bool = False, remote: str | None = None) -> dict[str, Any]:
    """Tokenize a corpus into packed MDS shards per split (stages and resume in the module docstring).

    Args:
        out_dir: local target directory; appears complete or not at all.
        inputs: paths, globs, object URLs or s3:// globs of text files (one document each), JSON Lines,
            Parquet files, or datasets save_to_disk directories; text and JSON Lines may be .gz/.zst.
            None = the running Python's standard library (`*.py`, no site-packages or test dirs).
        tokenizer_path: a pretrained tokenizer (tokenizer.json or a Hugging Face tokenizer directory)
            instead of training one; `vocab_size` is then ignored.
        eos_token: the pretrained tokenizer's EOS (default: its tokenizer_config.json, else one of
            tokenizer.EOS_CANDIDATES).
        vocab_size: BPE vocab to train (including the byte alphabet and EOS). A small corpus may
            yield fewer; the manifest holds the real size.
        seq_len: tokens per training input; samples hold seq_len + 1 (inputs plus shifted labels).
        val_fraction, test_fraction: shares of documents held out (val gets at least one; test only
            if test_fraction > 0).
        seed: fixes the max_bytes file selection, the split and the tokenizer sample.
        max_bytes: cap on source file bytes, filled greedily in a seeded file order (quick demos).
        overwrite: replace an existing prep (or other content) at out_dir and remote.
        progress: show progress bars (else a log line every 10 s).
        fmt: "auto" (by suffix; a directory with state.json is "hf"), "text", "jsonl", "parquet", "hf".
        text_field: JSON key or column holding the text (jsonl, parquet, hf).
        packing: "concat" or "window" (assemble.py).
        compression: MDS shard compression, e.g. "zstd"; None = uncompressed.
        dtype: token dtype; None = uint16 if the vocab fits, else uint32.
        workers: processes for the scan and tokenization (1 = in this process).
        tokenizer_sample_bytes: train text the BPE is trained on (whole units, seeded order).
        skip_bad_records: skip and count malformed JSON lines, lines without a string text field and
            non-UTF-8 text files instead of stopping (manifest `report.bad_records`).
        remote: also upload the prepared directory to this object-store prefix (s3://bucket/path, ...).

    Returns:
        The manifest dict (also written to out_dir/manifest.json, and to remote).

    Raises:
        DataError: each message names the file (and line) and the rule: no files matched, an
            unreadable file or record, a missing text field, an empty corpus, a split too short for one
            sample, a vocab that does not fit the dtype, a tokenizer without EOS, an output that is
            occupied, not writable or being written by another prep.
    """
    t0 = time.perf_counter()
    out = Path(out_dir).expanduser().absolute()
    if workers < 1:
        raise DataError(f"workers={workers}: must be >= 1")
    request, source, files, pretrained = _request(
        inputs, tokenizer_path, vocab_size, seq_len, val_fraction, seed, max_bytes, fmt=fmt,
        text_field=text_field, test_fraction=test_fraction, packing=packing, compression=compression,
        dtype=dtype, tokenizer_sample_bytes=tokenizer_sample_bytes, eos_token=eos_token,
        skip_bad_records=skip_bad_records, remote_out=remote.rstrip("/") if remote else None)
    _check_output(out, request["remote"], request, overwrite)
    chosen = select_inputs(files, max_bytes, seed)
    strict = source["kind"] != "stdlib"
    if not skip_bad_records:
        _check_heads(chosen, text_field, strict, workers)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"{out}: output location not writable ({exc.strerror})") from None
    remove_dead_temps(out)
    partial = Partial(out)
    seconds = {"validate": time.perf_counter() - t0}
    try:
        manifest = _prepare(out, partial, request, source, files, chosen, pretrained, seconds,
                            tokenizer_path=tokenizer_path, workers=workers, progress=progress, strict=strict)
    except DataError:
        if partial.has_work():
            log.info("keeping finished work in %s for the next run", partial.root)
            partial.close()
        else:
            partial.remove()
        raise
    except BaseException:
        partial.close()   # killed or crashed: keep the finished work for the next run
        raise
    partial.remove()
    log.info("prepared %s in %.1fs", out, time.perf_counter() - t0)
    return manifest


def _prepare(out: Path, partial: Partial, request: dict[str, Any], source: dict[str, Any], files: list[Input],
             chosen: list[Input], pretrained: tuple | None, seconds: dict[str, float], *,
             tokenizer_path: str | None, workers: int, progress: bool, strict: bool) -> dict[str, Any]:
    """Scan, split, tokenizer, units, assembly, upload, install (module docstring)."""
    text_field, skip_bad, seed = request["text_field"], request["skip_bad_records"], request["seed"]
    jobs = []
    for index, item in enumerate(chosen):
        # skip mode is not in the key: a file without bad records scans the same either way
        key = _key(item.path, item.format, item.bytes, item.stamp, text_field, UNIT_BYTES, strict)
        local = (partial.root / "inputs" / key / item.path.rstrip("/").rsplit("/", 1)[-1]) if item.remote else item.path
        jobs.append({"index": index, "path": item.path, "local": str(local), "format": item.format,
                     "bytes": item.bytes, "key": key, "text_field": text_field, "chunk_bytes": UNIT_BYTES,
                     "strict": strict, "skip_bad": skip_bad, "out": str(partial.root / "scan" / f"{key}.json"),
                     "remote": asdict(item.remote) if item.remote else None})
    seconds["scan"] = scan_files(jobs, workers, progress)
    scanned = [json.loads(Path(j["out"]).read_text()) for j in jobs]
    if not skip_bad:  # a scan reused from a --skip-bad-records run may hold skipped records
        for f in scanned:
            for reason, entry in f["bad"].items():
                raise DataError(f"{entry['first']}: bad record ({reason.replace('_', ' ')}; {entry['count']} in "
                                "this file); fix it or pass --skip-bad-records")

    n_docs = sum(f["documents"] for f in scanned)
    where = source.get("root") or ", ".join(source["inputs"])
    if not n_docs:
        raise DataError(f"empty corpus: no non-empty documents in {where}"
                        + (f" within max_bytes={request['max_bytes']}" if request["max_bytes"] else ""))
    if n_docs < 2:
        only = next(f["path"] for f in scanned if f["documents"])
        raise DataError(f"corpus has 1 document ({only}); need >= 2 to split train/val by document")
    for f in scanned:
        if f["undecodable"]:
            log.warning("skipped %s: not UTF-8", f["path"])
    bad: dict[str, dict[str, Any]] = {}
    for f in scanned:
        for reason, entry in f["bad"].items():
            bad.setdefault(reason, {"count": 0, "first": entry["first"]})["count"] += entry["count"]
    if bad:
        log.warning("skipped bad records: %s", ", ".join(f"{r} {e['count']} (first {e['first']})" for r, e in bad.items()))
    text_bytes = sum(f["text_bytes"] for f in scanned)
    if pretrained is None and text_bytes + n_docs < request["seq_len"] + 1:  # byte-level BPE: <= 1 token per byte
        raise DataError(f"seq_len={request['seq_len']}: the corpus holds at most {text_bytes + n_docs} tokens, "
                        "fewer than one sample; use a smaller seq_len or more data")
    held = _held_out(n_docs, request["val_fraction"], request["test_fraction"], seed)
    split_of = _splitter(held)
    units = _units(scanned)

    t = time.perf_counter()
    tok_key = _key([f["key"] for f in scanned], request["vocab_size"], request["tokenizer_sample_bytes"], held)
    tok_path, eos_token, eos_id = _tokenizer(partial, pretrained, request["vocab_size"],
                                             request["tokenizer_sample_bytes"], units, split_of, text_field,
                                             skip_bad, seed, tok_key, progress)
    vocab = bpe.vocab_size_of(Tokenizer.from_file(str(tok_path)))
    token_type = request["dtype"] or token_dtype(vocab)
    if vocab > 1 << (16 if token_type == "uint16" else 32):
        raise DataError(f"tokenizer {tokenizer_path or 'trained'}: vocab_size={vocab} does not fit {token_type} ids")
    seconds["tokenizer"] = time.perf_counter() - t

    units_key = f"{tok_path.stem}-{token_type}"
    partial.prune_units(units_key)
    units_dir = partial.root / "units" / units_key
    stats = tokenize_units(units, tokenizer=tok_path, eos_id=eos_id, dtype=token_type, units_dir=units_dir,
                           text_field=text_field, skip_bad=skip_bad, unit_bytes=UNIT_BYTES, workers=workers,
                           show_bar=progress)
    readers.close_cursors()  # the tokenizer sample or a one-worker tokenization may hold one open
    seconds["tokenize"] = stats["seconds"]
    log.info("tokenized %d units: %.0f docs/s, %.0f tok/s (%d workers)", len(units), stats["docs_per_s"],
             stats["tokens_per_s"], workers)

    final = partial.root / "final"
    shutil.rmtree(final, ignore_errors=True)  # a killed assembly restarts from the units
    final.mkdir()
    seq_len, packing, remote_out = request["seq_len"], request["packing"], request["remote"]
    splits = ("train", *held)
    counts, seconds["assemble"] = write_splits(
        final, [(units_dir / f"{u['id']}.npz", u["first_doc"]) for u in units], split_of, splits,
        dtype=token_type, sample_len=seq_len + 1, packing=packing, compression=request["compression"],
        remote=remote_out, show_bar=progress)
    for split, c in counts.items():
        if not c["samples"]:
            hint = "a larger val_fraction" if split != "train" else "more data"
            raise DataError(f"{split} split: {c['tokens']} tokens from {c['documents']} documents, fewer than "
                            f"one sample of seq_len+1={seq_len + 1}{' per document' if packing == 'window' else ''}; "
                            f"use {hint} or a smaller seq_len (the tokenized units are kept: a rerun only "
                            "reassembles)")
        c["dropped_tokens"] = c["tokens"] - c["samples"] * (seq_len + 1)

    t = time.perf_counter()
    shutil.copyfile(tok_path, final / TOKENIZER)
    write_json(final / DOCUMENTS, {"held_out": held, "documents": n_docs,
                                   "files": [{k: f[k] for k in ("path", "format", "documents")} for f in scanned]})
    content = hashlib.sha256("".join(f["sha256"] for f in scanned).encode()).hexdigest()
    seconds["upload"] = 0.0
    manifest = {
        "format": FORMAT, "seq_len": seq_len, "sample_len": seq_len + 1, "dtype": token_type,
        "vocab_size": vocab, "eos_id": eos_id, "eos_token": eos_token, "packing": packing,
        "compression": request["compression"], "remote": remote_out,
        "tokenizer": {"trained": tokenizer_path is None, "from": tokenizer_path,
                      "sha256": hashlib.sha256((final / TOKENIZER).read_bytes()).hexdigest()},
        "source": {**source, "candidate_files": len(files), "files": len(scanned),
                   "bytes": sum(max(f["bytes"], 0) for f in scanned), "text_bytes": text_bytes,
                   "documents": n_docs, "content_sha256": content, "text_field": text_field,
                   "skipped_empty": sum(f["empty"] for f in scanned),
                   "skipped_undecodable": [f["path"] for f in scanned if f["undecodable"]],
                   "file_list": [{k: f[k] for k in ("path", "format", "bytes", "sha256", "documents")}
                                 for f in scanned]},
        "splits": counts, "seed": seed, "seeds": {"select": f"{seed}/select", "split": [seed, 0x5b1],
                                                  "tokenizer_sample": f"{seed}/tokenizer-sample"},
        "val_fraction": request["val_fraction"], "test_fraction": request["test_fraction"],
        "max_bytes": request["max_bytes"], "request": request,
        "report": {"documents": n_docs, "tokens": sum(c["tokens"] for c in counts.values()),
                   "samples": sum(c["samples"] for c in counts.values()), "workers": workers,
                   "skipped": {"empty": sum(f["empty"] for f in scanned),
                               "undecodable_files": sum(bool(f["undecodable"]) for f in scanned),
                               **{reason: e["count"] for reason, e in bad.items()}},
                   "bad_records": bad, "seconds": seconds},
    }
    if remote_out is not None:
        up = store.uploader(final, remote_out)
        for name in (TOKENIZER, DOCUMENTS):
            up.upload_file(name)
        seconds["upload"] = time.perf_counter() - t
        write_json(final / MANIFEST, manifest)
        up.upload_file(MANIFEST)  # last: its presence marks the remote prefix complete
    else:
        write_json(final / MANIFEST, manifest)  # last: its presence marks the directory complete
    install(final, out)
    log.info("prep report: %s", json.dumps(manifest["report"], sort_keys=True))
    return manifest
