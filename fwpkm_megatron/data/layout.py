"""The on-disk contract of a prepared directory (written by prepare.py), and its checked readers.

    DIR/manifest.json, tokenizer.json, documents.json, train/ val/ [test/] (MDS shards + index.json)

Everything that reads a prepared directory (training streams, NIAH, evaluation) goes through
`read_manifest`, `load_tokenizer` and `split_documents`, which check what they read and raise a
DataError naming the file.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from fwpkm_megatron.data import readers
from fwpkm_megatron.data import tokenizer as bpe
from fwpkm_megatron.data.readers import DataError

FORMAT = "fwpkm-megatron/packed-tokens-v2"
READABLE_FORMATS = ("fwpkm-megatron/packed-tokens-v1", FORMAT)  # v1: train/val only, same shard layout
SPLITS = ("train", "val")               # every prepared directory has these
ALL_SPLITS = ("train", "val", "test")   # test only when test_fraction > 0
MANIFEST, TOKENIZER, DOCUMENTS, INDEX = "manifest.json", "tokenizer.json", "documents.json", "index.json"
UNIT_BYTES = 1 << 20       # text per work unit: the grain of parallelism, progress and resume


def sha256_file(path: Path) -> str:
    """sha256 of a file, or of a directory's files in name order (HF on-disk datasets)."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    try:
        for file in files:
            with open(file, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror})") from None
    return digest.hexdigest()


def split_documents(data_path: str | os.PathLike, split: str) -> Iterator[str]:
    """The documents of one split of a prepared directory, in packing order, re-read from the sources.

    Raises:
        DataError: a source file is gone or no longer matches its manifest checksum.
    """
    from fwpkm_megatron.data import remote

    manifest = parse_manifest(data_path)
    documents = json.loads((Path(data_path) / DOCUMENTS).read_text())
    held = {s: set(ids) for s, ids in documents["held_out"].items()}
    text_field = manifest["source"]["text_field"]
    skip_bad = bool(manifest.get("request", {}).get("skip_bad_records"))
    doc_id = 0
    with tempfile.TemporaryDirectory() as tmp:
        for file in manifest["source"]["file_list"]:
            path = Path(file["path"])
            if remote.is_url(file["path"]):  # a remote input: read a fresh copy
                path = remote.fetch(remote.RemoteInput(file["path"], -1, "", is_dir=file["format"] == "hf"),
                                    Path(tmp, str(doc_id), file["path"].rsplit("/", 1)[-1]))
            if sha256_file(path) != file["sha256"]:
                raise DataError(f"{file['path']}: changed since the prep at {data_path} (sha256 differs)")
            bad = {} if skip_bad else None
            scan = readers.scan_file(path, file["format"], text_field=text_field, chunk_bytes=UNIT_BYTES,
                                     strict=False, bad=bad)
            for chunk in scan.chunks:
                for text in readers.read_chunk(path, file["format"], chunk, text_field=text_field, skip_bad=skip_bad):
                    in_split = next((s for s, ids in held.items() if doc_id in ids), "train")
                    if in_split == split:
                        yield text
                    doc_id += 1


# ---------------------------------------------------------------- reading a prepared directory

_REQUIRED = ("format", "seq_len", "sample_len", "dtype", "vocab_size", "eos_id", "splits")


def parse_manifest(data_path: str | os.PathLike) -> dict[str, Any]:
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
    if manifest["format"] not in READABLE_FORMATS:
        raise DataError(f"{path}: format {manifest['format']!r}, expected {FORMAT!r}; re-run fwpkm-prep")
    if not set(SPLITS) <= set(manifest["splits"]) <= set(ALL_SPLITS):
        raise DataError(f"{path}: corrupt, splits {sorted(manifest['splits'])} are not {list(SPLITS)} "
                        "(+ test)")
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
    column = f"ndarray:{manifest['dtype']}:{manifest['sample_len']}"
    for shard in shards:
        if shard.get("column_encodings", [column]) != [column]:
            raise DataError(f"{index_path}: shards hold {shard['column_encodings']}, the manifest says {column}")
        stored = shard.get("zip_data") or shard["raw_data"]  # compressed shards keep only the zip file
        file = data_path / split / stored["basename"]
        if not file.is_file() or file.stat().st_size != stored["bytes"]:
            raise DataError(f"{file}: shard missing or truncated (expected {stored['bytes']} bytes)")


def read_manifest(data_path: str | os.PathLike, *, check_shards: bool = True) -> dict[str, Any]:
    """The manifest of a prepared directory, after checking the shard indexes and files agree with it.

    `check_shards=False` checks manifest.json alone, for a directory whose shards are still remote.

    Raises:
        DataError: manifest missing or corrupt, shard index missing, sample counts or shard sizes off.
    """
    manifest = parse_manifest(data_path)
    if check_shards:
        for split in manifest["splits"]:
            _check_shards(Path(data_path), split, manifest)
    return manifest


def load_tokenizer(data_path: str | os.PathLike) -> Tokenizer:
    """The tokenizer of a prepared directory, checked against its manifest (vocab size and EOS id).

    Raises:
        DataError: tokenizer.json missing or corrupt, or disagreeing with manifest.json.
    """
    manifest = parse_manifest(data_path)
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
