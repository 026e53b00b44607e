"""File index of an export directory: byte size and sha256 of every file, checked before any load.

Copied verbatim into every export directory (standard library only). `fwpkm_index.json` is written
last by the exporter; a directory without it is incomplete. A truncated or corrupt file is reported by
name and nothing is loaded.
"""
from __future__ import annotations

import hashlib
import json
import os

INDEX = "fwpkm_index.json"
INDEX_FORMAT = "fwpkm-export-index-v1"
_BLOCK = 1 << 22


class ExportIntegrityError(RuntimeError):
    """An export directory is incomplete, or one of its files is truncated or corrupt."""


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def write_index(directory: str) -> dict:
    """Index every regular file of `directory` (but the index itself) and write it atomically."""
    files = {}
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if name == INDEX or not os.path.isfile(path):
            continue
        files[name] = {"bytes": os.path.getsize(path), "sha256": sha256_file(path)}
    index = {"format": INDEX_FORMAT, "files": files}
    tmp = os.path.join(directory, INDEX + ".tmp")
    with open(tmp, "w") as f:
        json.dump(index, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(directory, INDEX))
    return index


def verify_index(directory: str, *, checksums: bool = True) -> dict:
    """Check that every indexed file exists with its size (and sha256 unless `checksums=False`).

    Raises:
        ExportIntegrityError: the index is missing/unreadable, or a file is missing, truncated or corrupt.
    """
    index_path = os.path.join(directory, INDEX)
    try:
        with open(index_path) as f:
            index = json.load(f)
        files = index["files"]
    except FileNotFoundError:
        raise ExportIntegrityError(f"{index_path}: missing; {directory} is not a complete fwpkm export") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ExportIntegrityError(f"{index_path}: unreadable ({exc})") from None
    if index.get("format") != INDEX_FORMAT:
        raise ExportIntegrityError(f"{index_path}: format {index.get('format')!r}, expected {INDEX_FORMAT!r}")
    for name, entry in files.items():
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            raise ExportIntegrityError(f"{path}: missing (listed in {INDEX})")
        size = os.path.getsize(path)
        if size != entry["bytes"]:
            raise ExportIntegrityError(f"{path}: {size} bytes, {INDEX} says {entry['bytes']} (truncated or corrupt)")
        if checksums and sha256_file(path) != entry["sha256"]:
            raise ExportIntegrityError(f"{path}: sha256 differs from {INDEX} (corrupt); refusing to load it")
    return index
