"""Prepare a token corpus: text files -> byte-level BPE -> packed fixed-length samples in MDS shards.

A prepared directory (the DataConfig `path`):

    DIR/
        manifest.json    written last: format, vocab_size, eos_id, dtype, seq_len, per-split counts,
                         source fingerprint and the request that produced it (read_manifest)
        tokenizer.json   HF `tokenizers` file (load_tokenizer)
        documents.json   per split, the documents in packing order: path, bytes, sha256
        train/, val/     MDS shards + index.json; one column "tokens": ndarray [seq_len + 1] of `dtype`

Packing: a split's documents, in documents.json order, each followed by EOS, form one token stream
that is cut into samples of seq_len + 1 tokens (inputs s[:-1], labels s[1:]); the tail shorter than
seq_len + 1 is dropped and counted. Documents are split by document, so no val text is trained on.

Everything is written into a hidden sibling `.DIR.tmp-<pid>-<hex>` and renamed into place at the end,
so a directory holding manifest.json is always complete; an interrupted prep leaves nothing at DIR.
The corpus is held in memory: this is sized for corpora of up to a few GB of text.
"""
from __future__ import annotations

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
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from fwpkm_megatron.data import tokenizer as bpe
from fwpkm_megatron.data.streaming_compat import import_streaming

log = logging.getLogger(__name__)

FORMAT = "fwpkm-megatron/packed-tokens-v1"
SPLITS = ("train", "val")
MANIFEST, TOKENIZER, DOCUMENTS, INDEX = "manifest.json", "tokenizer.json", "documents.json", "index.json"
SHARD_BYTES = 1 << 25  # 32 MiB shards: a few per GB of tokens, small enough to stream from a remote
_STDLIB_SKIP_DIRS = {"site-packages", "test", "tests", "idle_test"}


class DataError(ValueError):
    """Bad data input or a broken prepared directory; the message names the file or number at fault."""


# ---------------------------------------------------------------- sources

def stdlib_files() -> tuple[Path, list[Path]]:
    """The running Python's standard-library `*.py` files (no site-packages, no test dirs), sorted."""
    root = Path(sysconfig.get_paths()["stdlib"]).resolve()
    files = [p for p in root.rglob("*.py")
             if p.is_file() and not _STDLIB_SKIP_DIRS & set(p.relative_to(root).parts[:-1])]
    return root, sorted(files)


def _match_inputs(inputs: list[str]) -> list[Path]:
    """Expand file paths and globs (`**` recursive) into sorted unique files; each must match something."""
    found: set[Path] = set()
    for pattern in inputs:
        path = Path(pattern).expanduser()
        if path.is_dir():
            raise DataError(f"input {pattern}: is a directory; pass a glob such as '{pattern}/**/*.txt'")
        matches = [Path(m) for m in glob.glob(str(path), recursive=True)]
        files = [m.resolve() for m in matches if m.is_file()]
        if not files:
            raise DataError(f"input {pattern}: no files matched")
        found.update(files)
    return sorted(found)


def _sources(inputs: list[str] | None) -> tuple[dict[str, Any], list[tuple[Path, int]]]:
    """Candidate files with their sizes, plus the manifest's source description."""
    if inputs is None:
        root, files = stdlib_files()
        desc: dict[str, Any] = {"kind": "stdlib", "root": str(root)}
    else:
        files = _match_inputs(list(inputs))
        desc = {"kind": "files", "inputs": list(inputs)}
    sized = []
    for path in files:
        try:
            sized.append((path, path.stat().st_size))
        except OSError as exc:
            raise DataError(f"{path}: cannot stat ({exc.strerror})") from None
    if not sized:
        raise DataError(f"no source files found under {desc.get('root', inputs)}")
    listing = "".join(f"{p}\t{n}\n" for p, n in sized).encode()
    desc["listing_sha256"] = hashlib.sha256(listing).hexdigest()  # cheap identity: paths and sizes
    return desc, sized


def _select(sized: list[tuple[Path, int]], max_bytes: int | None, seed: int) -> list[tuple[Path, int]]:
    """Files up to `max_bytes` in total, taken greedily in a seeded order (files that would overflow
    the cap are skipped, later smaller ones still fit), returned in sorted order."""
    if max_bytes is None:
        return sized
    order = list(sized)
    random.Random(f"{seed}/select").shuffle(order)
    chosen, total = [], 0
    for path, size in order:
        if total + size <= max_bytes:
            chosen.append((path, size))
            total += size
    return sorted(chosen)


def _read(files: list[tuple[Path, int]], *, strict: bool) -> tuple[list[dict[str, Any]], list[str], int]:
    """Read UTF-8 documents exactly (no newline translation). Empty files are skipped; undecodable
    files raise when `strict`, else are skipped and listed (the stdlib may carry odd encodings)."""
    docs, undecodable, empty = [], [], 0
    for path, _ in files:
        try:
            raw = path.read_bytes()
            text = raw.decode("utf-8")
        except OSError as exc:
            raise DataError(f"{path}: cannot read ({exc.strerror})") from None
        except UnicodeDecodeError as exc:
            if strict:
                raise DataError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason})") from None
            undecodable.append(str(path))
            continue
        if not text:
            empty += 1
            continue
        docs.append({"path": str(path), "bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest(),
                     "text": text})
    return docs, undecodable, empty


def _split(n_docs: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded document split; val gets round(val_fraction * n), at least 1, and train keeps >= 1."""
    order = list(range(n_docs))
    random.Random(f"{seed}/split").shuffle(order)
    n_val = min(n_docs - 1, max(1, round(val_fraction * n_docs)))
    return sorted(order[n_val:]), sorted(order[:n_val])


# ---------------------------------------------------------------- packing and writing

def token_dtype(vocab_size: int) -> str:
    """Narrowest unsigned dtype holding ids [0, vocab_size)."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def _pack(ids: list[list[int]], eos_id: int, sample_len: int, dtype: str) -> tuple[np.ndarray, int]:
    """Documents + EOS each, concatenated, cut into rows of sample_len -> (samples [S, sample_len], tokens)."""
    eos = np.array([eos_id], dtype=dtype)
    parts = []
    for doc in ids:
        parts += [np.asarray(doc, dtype=dtype), eos]
    stream = np.concatenate(parts)
    n_samples = len(stream) // sample_len
    return stream[: n_samples * sample_len].reshape(n_samples, sample_len), len(stream)


def _write_shards(split_dir: Path, samples: np.ndarray) -> None:
    """One MDS column `tokens` of fixed shape [sample_len]; sha1 per shard for later validation."""
    streaming = import_streaming()
    column = f"ndarray:{samples.dtype.name}:{samples.shape[1]}"
    with streaming.MDSWriter(out=str(split_dir), columns={"tokens": column}, compression=None,
                             hashes=["sha1"], size_limit=SHARD_BYTES) as writer:
        for row in samples:
            writer.write({"tokens": row})


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_dead_temps(out: Path) -> None:
    """Delete temp siblings left by preps that were killed (their pid is gone)."""
    for tmp in out.parent.glob(f".{out.name}.tmp-*"):
        pid = tmp.name.rsplit(".tmp-", 1)[1].split("-")[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            log.warning("removing %s, left by an interrupted prep", tmp)
            shutil.rmtree(tmp, ignore_errors=True)


def _install(tmp: Path, out: Path) -> None:
    """Rename the finished temp dir to `out`, replacing whatever the caller agreed to replace."""
    if out.exists():
        old = out.parent / f".{out.name}.tmp-{os.getpid()}-old-{secrets.token_hex(4)}"
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)


# ---------------------------------------------------------------- requests and reuse

def _request(inputs: list[str] | None, tokenizer_path: str | None, vocab_size: int, seq_len: int,
             val_fraction: float, seed: int, max_bytes: int | None) -> tuple[dict[str, Any], dict, list]:
    """Validate arguments and resolve sources -> (request as stored in the manifest, source, files)."""
    problems = []
    if seq_len < 1:
        problems.append(f"seq_len={seq_len}: must be >= 1")
    if not 0.0 <= val_fraction < 1.0:
        problems.append(f"val_fraction={val_fraction}: must be in [0, 1) (val gets >= 1 document anyway)")
    if max_bytes is not None and max_bytes < 1:
        problems.append(f"max_bytes={max_bytes}: must be >= 1 or None")
    if seed < 0:
        problems.append(f"seed={seed}: must be >= 0 (streaming shuffles with it)")
    if tokenizer_path is None and not bpe.MIN_VOCAB_SIZE <= vocab_size <= 1 << 32:
        problems.append(f"vocab_size={vocab_size}: does not fit; a byte-level BPE needs "
                        f">= {bpe.MIN_VOCAB_SIZE} (256 bytes + EOS) and ids must fit uint32")
    if problems:
        raise DataError("; ".join(problems))
    tok_sha = None
    if tokenizer_path is not None:
        try:
            tok_sha = hashlib.sha256(Path(tokenizer_path).read_bytes()).hexdigest()
        except OSError as exc:
            raise DataError(f"tokenizer {tokenizer_path}: cannot read ({exc.strerror})") from None
    source, sized = _sources(inputs)
    request = {"listing_sha256": source["listing_sha256"], "tokenizer_sha256": tok_sha,
               "vocab_size": None if tokenizer_path else vocab_size, "seq_len": seq_len,
               "val_fraction": val_fraction, "seed": seed, "max_bytes": max_bytes}
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
                  val_fraction: float = 0.02, seed: int = 0, max_bytes: int | None = None) -> dict | None:
    """The manifest at `out_dir` if it is complete and was made by the same request, else None.

    "Same" means the same source listing (paths and sizes), tokenizer file bytes and parameters, so a
    rerun of `make demo` reuses the data. Costs a stat per source file, no reads.
    """
    manifest = _complete_manifest(Path(out_dir))
    if manifest is None:
        return None
    request, _, _ = _request(inputs, tokenizer_path, vocab_size, seq_len, val_fraction, seed, max_bytes)
    return manifest if manifest.get("format") == FORMAT and manifest.get("request") == request else None


# ---------------------------------------------------------------- the pipeline

def prepare_corpus(out_dir: str | os.PathLike, *, inputs: list[str] | None = None,
                   tokenizer_path: str | None = None, vocab_size: int = 4096, seq_len: int = 256,
                   val_fraction: float = 0.02, seed: int = 0, max_bytes: int | None = None,
                   overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Tokenize a text corpus into packed train/val MDS shards (layout in the module docstring).

    Args:
        out_dir: target directory; written atomically (temp sibling + rename).
        inputs: file paths or globs of UTF-8 text files, one document per file; None = the running
            Python's standard library (`*.py`, no site-packages or test dirs).
        tokenizer_path: an existing tokenizer.json to use instead of training one; it must hold an EOS
            token (one of tokenizer.EOS_CANDIDATES). `vocab_size` is then ignored.
        vocab_size: BPE vocab to train (including the byte alphabet and EOS). A small corpus may
            yield fewer; the manifest holds the real size.
        seq_len: tokens per training input; samples hold seq_len + 1 (inputs plus shifted labels).
        val_fraction: share of documents held out for val (at least one document).
        seed: fixes the max_bytes file selection and the train/val split.
        max_bytes: cap on source bytes, filled greedily in a seeded file order (quick demos).
        overwrite: replace an existing prep (or other content) at out_dir.
        progress: show a tqdm bar while tokenizing.

    Returns:
        The manifest dict (also written to out_dir/manifest.json).

    Raises:
        DataError: no files matched, unreadable or non-UTF-8 input, empty corpus, a split too short
            for one sample, vocab_size that does not fit, tokenizer without EOS, out_dir occupied.
    """
    t0 = time.perf_counter()
    out = Path(out_dir).expanduser().absolute()
    request, source, sized = _request(inputs, tokenizer_path, vocab_size, seq_len, val_fraction, seed,
                                      max_bytes)
    if not overwrite:
        held = _complete_manifest(out)
        if held is not None:
            same = held.get("request") == request
            raise DataError(f"{out}: already holds a complete prep"
                            f"{' of this request' if same else ' of a different request'}; "
                            "pass overwrite=True (fwpkm-prep --overwrite) to replace it")
        if out.is_dir() and any(out.iterdir()):
            raise DataError(f"{out}: exists, is not empty and holds no {MANIFEST}; refusing to replace "
                            "it without overwrite=True")

    chosen = _select(sized, max_bytes, seed)
    docs, undecodable, empty = _read(chosen, strict=inputs is not None)
    where = source.get("root") or ", ".join(source["inputs"])
    if not docs:
        raise DataError(f"empty corpus: no non-empty UTF-8 documents in {where}"
                        + (f" within max_bytes={max_bytes}" if max_bytes else ""))
    if len(docs) < 2:
        raise DataError(f"corpus has 1 document ({docs[0]['path']}); need >= 2 to split train/val by document")
    for path in undecodable:
        log.warning("skipped %s: not UTF-8", path)
    train_idx, val_idx = _split(len(docs), val_fraction, seed)
    split_docs = {"train": [docs[i] for i in train_idx], "val": [docs[i] for i in val_idx]}

    if tokenizer_path is None:
        tok = bpe.train_bpe([d["text"] for d in split_docs["train"]], vocab_size)
    else:
        try:
            tok = Tokenizer.from_file(str(tokenizer_path))
        except Exception as exc:  # tokenizers raises a bare Exception on parse errors
            raise DataError(f"tokenizer {tokenizer_path}: cannot load ({exc})") from None
    eos = bpe.find_eos(tok)
    if eos is None:
        raise DataError(f"tokenizer {tokenizer_path}: has no EOS token (looked for "
                        f"{', '.join(bpe.EOS_CANDIDATES)})")
    eos_token, eos_id = eos
    vocab = bpe.vocab_size_of(tok)
    if vocab > 1 << 32:
        raise DataError(f"tokenizer {tokenizer_path}: vocab_size={vocab} does not fit uint32 ids")
    dtype = token_dtype(vocab)
    t_tok = time.perf_counter()

    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_temps(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        splits = {}
        for split in SPLITS:
            ids = bpe.encode_documents(tok, [d["text"] for d in split_docs[split]], desc=f"tokenize {split}",
                                       progress=progress)
            samples, n_tokens = _pack(ids, eos_id, seq_len + 1, dtype)
            if not len(samples):
                hint = "a larger val_fraction" if split == "val" else "more data"
                raise DataError(f"{split} split: {n_tokens} tokens from {len(split_docs[split])} documents, "
                                f"fewer than one sample of seq_len+1={seq_len + 1}; use {hint} or a smaller "
                                "seq_len")
            _write_shards(tmp / split, samples)
            splits[split] = {"documents": len(split_docs[split]), "tokens": n_tokens,
                             "samples": len(samples), "dropped_tokens": n_tokens - samples.size}
        tok.save(str(tmp / TOKENIZER))
        _write_json(tmp / DOCUMENTS, {s: [{k: d[k] for k in ("path", "bytes", "sha256")} for d in split_docs[s]]
                                      for s in SPLITS})
        content = hashlib.sha256("".join(d["sha256"] for d in docs).encode()).hexdigest()
        manifest = {
            "format": FORMAT, "seq_len": seq_len, "sample_len": seq_len + 1, "dtype": dtype,
            "vocab_size": vocab, "eos_id": eos_id, "eos_token": eos_token,
            "tokenizer": {"trained": tokenizer_path is None, "from": tokenizer_path,
                          "sha256": hashlib.sha256((tmp / TOKENIZER).read_bytes()).hexdigest()},
            "source": {**source, "candidate_files": len(sized), "files": len(docs),
                       "bytes": sum(d["bytes"] for d in docs), "content_sha256": content,
                       "skipped_empty": empty, "skipped_undecodable": undecodable},
            "splits": splits, "seed": seed, "val_fraction": val_fraction, "max_bytes": max_bytes,
            "request": request,
        }
        _write_json(tmp / MANIFEST, manifest)  # last: its presence marks the directory complete
        _install(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    t1 = time.perf_counter()
    log.info("prepared %s in %.1fs (read + tokenizer %.1fs, encode + write %.1fs)", out, t1 - t0, t_tok - t0,
             t1 - t_tok)
    return manifest


# ---------------------------------------------------------------- reading a prepared directory

_REQUIRED = ("format", "seq_len", "sample_len", "dtype", "vocab_size", "eos_id", "splits")


def _parse_manifest(data_path: str | os.PathLike) -> dict[str, Any]:
    """Parse and sanity-check manifest.json alone."""
    path = Path(data_path) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: missing; {data_path} is not a prepared dataset "
                        f"(run fwpkm-prep --out {data_path})") from None
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: unreadable or corrupt ({exc})") from None
    missing = [k for k in _REQUIRED if k not in manifest] if isinstance(manifest, dict) else list(_REQUIRED)
    if missing:
        raise DataError(f"{path}: corrupt, missing keys {missing}")
    if manifest["format"] != FORMAT:
        raise DataError(f"{path}: format {manifest['format']!r}, expected {FORMAT!r}; re-run fwpkm-prep")
    if set(manifest["splits"]) != set(SPLITS):
        raise DataError(f"{path}: corrupt, splits {sorted(manifest['splits'])} != {list(SPLITS)}")
    return manifest


def _check_shards(data_path: Path, split: str, manifest: dict[str, Any]) -> None:
    """index.json exists, its sample count matches the manifest, every shard file has its size."""
    index_path = data_path / split / INDEX
    try:
        index = json.loads(index_path.read_text())
        shards = index["shards"]
    except FileNotFoundError:
        raise DataError(f"{index_path}: shard index missing; the prep at {data_path} is incomplete") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{index_path}: unreadable or corrupt ({exc})") from None
    n_samples = sum(s["samples"] for s in shards)
    if n_samples != manifest["splits"][split]["samples"]:
        raise DataError(f"{index_path}: {n_samples} samples, manifest says {manifest['splits'][split]['samples']}")
    for shard in shards:
        file = data_path / split / shard["raw_data"]["basename"]
        if not file.is_file() or file.stat().st_size != shard["raw_data"]["bytes"]:
            raise DataError(f"{file}: shard missing or truncated (expected {shard['raw_data']['bytes']} bytes)")


def read_manifest(data_path: str | os.PathLike, *, check_shards: bool = True) -> dict[str, Any]:
    """The manifest of a prepared directory, after checking the shard indexes and files agree with it.

    `check_shards=False` checks manifest.json alone, for a directory whose shards are still remote.

    Raises:
        DataError: manifest missing or corrupt, shard index missing, sample counts or shard sizes off.
    """
    manifest = _parse_manifest(data_path)
    if check_shards:
        for split in SPLITS:
            _check_shards(Path(data_path), split, manifest)
    return manifest


def load_tokenizer(data_path: str | os.PathLike) -> Tokenizer:
    """The tokenizer of a prepared directory, checked against its manifest (vocab size and EOS id).

    Raises:
        DataError: tokenizer.json missing or corrupt, or disagreeing with manifest.json.
    """
    manifest = _parse_manifest(data_path)
    path = Path(data_path) / TOKENIZER
    if not path.is_file():
        raise DataError(f"{path}: missing")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception on parse errors
        raise DataError(f"{path}: corrupt ({exc})") from None
    vocab = bpe.vocab_size_of(tok)
    if vocab != manifest["vocab_size"]:
        raise DataError(f"{path}: vocab size {vocab} != manifest vocab_size {manifest['vocab_size']}")
    if tok.token_to_id(manifest.get("eos_token", bpe.EOS_TOKEN)) != manifest["eos_id"]:
        raise DataError(f"{path}: EOS id differs from manifest eos_id {manifest['eos_id']}")
    return tok
