"""Which files a prep reads: local paths and globs, object URLs and s3:// globs, or the running Python's
standard library; each becomes an `Input` with its format and identity (path, size, mtime or ETag)."""
from __future__ import annotations

import hashlib
import random
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fwpkm_megatron.data import readers
from fwpkm_megatron.data import remote as store
from fwpkm_megatron.data.readers import DataError

_STDLIB_SKIP_DIRS = {"site-packages", "test", "tests", "idle_test"}


def stdlib_files() -> tuple[Path, list[Path]]:
    """The running Python's standard-library `*.py` files (no site-packages, no test dirs), sorted."""
    root = Path(sysconfig.get_paths()["stdlib"]).resolve()
    files = [p for p in root.rglob("*.py")
             if p.is_file() and not _STDLIB_SKIP_DIRS & set(p.relative_to(root).parts[:-1])]
    return root, sorted(files)


@dataclass(frozen=True)
class Input:
    """One input file (or HF directory), local or remote."""
    path: str                 # absolute local path, or the object URL
    format: str
    bytes: int                # -1: a remote object on a scheme that cannot list
    stamp: str                # mtime_ns (local) or ETag (remote): with path and size, the file's identity
    remote: store.RemoteInput | None = None


def _local_inputs(pattern: str, fmt: str) -> dict[Path, str]:
    path = Path(pattern).expanduser()
    if path.is_dir():
        if fmt not in ("auto", "hf"):
            raise DataError(f"input {pattern}: is a directory; pass a glob such as '{pattern}/**/*.txt'")
        return {path.resolve(): readers.detect_format(path)}
    import glob

    matches = [Path(m) for m in glob.glob(str(path), recursive=True)]
    files = [m.resolve() for m in matches if m.is_file() or (m.is_dir() and (m / readers.HF_STATE).is_file())]
    if not files:
        raise DataError(f"input {pattern}: no files matched")
    return {file: readers.detect_format(file) if fmt == "auto" else fmt for file in files}


def _stat(path: Path) -> tuple[int, str]:
    try:
        if path.is_dir():
            stats = [p.stat() for p in sorted(path.iterdir()) if p.is_file()]
            return sum(s.st_size for s in stats), ",".join(str(s.st_mtime_ns) for s in stats)
        st = path.stat()
        return st.st_size, str(st.st_mtime_ns)
    except OSError as exc:
        raise DataError(f"{path}: cannot stat ({exc.strerror})") from None


def _match_inputs(inputs: list[str], fmt: str) -> list[Input]:
    """Expand local paths/globs (`**` recursive) and object URLs/globs into sorted unique inputs."""
    found: dict[str, Input] = {}
    for pattern in inputs:
        if store.is_url(pattern):
            for item in store.match_remote(pattern):
                kind = "hf" if item.is_dir else (readers.detect_format(Path(item.url.rsplit("/", 1)[-1]))
                                                if fmt == "auto" else fmt)
                found[item.url] = Input(item.url, kind, item.size, item.etag, item)
            continue
        for path, kind in _local_inputs(pattern, fmt).items():
            if kind == "hf" and not (path / readers.HF_STATE).is_file():
                raise DataError(f"{path}: format hf needs a datasets save_to_disk directory (with {readers.HF_STATE})")
            found[str(path)] = Input(str(path), kind, *_stat(path))
    return [found[k] for k in sorted(found)]


def source_inputs(inputs: list[str] | None, fmt: str) -> tuple[dict[str, Any], list[Input]]:
    """Candidate inputs, plus the manifest's source description."""
    if inputs is None:
        root, files = stdlib_files()
        matched = [Input(str(p), "text", *_stat(p)) for p in files]
        desc: dict[str, Any] = {"kind": "stdlib", "root": str(root)}
    else:
        matched = _match_inputs(list(inputs), fmt)
        desc = {"kind": "files", "inputs": list(inputs)}
    if not matched:
        raise DataError(f"no source files found under {desc.get('root', inputs)}")
    # cheap identity: paths, formats, sizes (and remote ETags); mtimes only key the partial's caches
    listing = "".join(f"{i.path}\t{i.format}\t{i.bytes}" + (f"\t{i.stamp}" if i.remote else "") + "\n"
                      for i in matched).encode()
    desc["listing_sha256"] = hashlib.sha256(listing).hexdigest()
    return desc, matched


def select_inputs(files: list[Input], max_bytes: int | None, seed: int) -> list[Input]:
    """Files up to `max_bytes` in total, taken greedily in a seeded order (files that would overflow
    the cap are skipped, later smaller ones still fit), returned in sorted order."""
    if max_bytes is None:
        return files
    order = list(files)
    random.Random(f"{seed}/select").shuffle(order)
    chosen, total = [], 0
    for item in order:
        if total + max(item.bytes, 0) <= max_bytes:
            chosen.append(item)
            total += max(item.bytes, 0)
    return sorted(chosen, key=lambda i: i.path)
