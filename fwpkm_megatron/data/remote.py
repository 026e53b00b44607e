"""Object-store access for prep: list and fetch remote inputs, check and upload a remote output.

Shard uploads go through mosaicml-streaming's MDSWriter and its storage layer (`CloudUploader`), and so
do downloads on schemes other than s3:// (`CloudDownloader`), so every scheme streaming supports works
for single input files and outputs: s3://, gs://, oci://, azure://, hf://, dbfs:/, sftp://. On s3://
(or any S3-compatible store) boto3 is used directly for downloads, listing (globs, HF-on-disk
prefixes, sizes and ETags) and ranged reads, which keeps the scan workers free of the streaming
import; on other schemes give exact object URLs. Endpoints and credentials
come from the usual environment, the same variables streaming reads: `S3_ENDPOINT_URL` for an
S3-compatible store (MinIO, Ceph, R2, a local test server), AWS_* for credentials.
"""
from __future__ import annotations

import fnmatch
import os
import re
import tempfile
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fwpkm_megatron.data.readers import HF_STATE, DataError
from fwpkm_megatron.data.streaming_compat import import_streaming

_GLOB = re.compile(r"[*?\[]")


def is_url(path: str | os.PathLike) -> bool:
    """True for an object-store URL (a scheme of two or more letters, not file://)."""
    scheme = urllib.parse.urlparse(str(path)).scheme
    return len(scheme) > 1 and scheme != "file"


@dataclass(frozen=True)
class RemoteInput:
    """One matched remote input: an object, or (is_dir) an HF save_to_disk prefix."""
    url: str
    size: int            # bytes (all objects of a directory); -1 when the scheme cannot list
    etag: str            # the store's version tag ("" when unknown): the input's identity with size
    is_dir: bool = False


def _split(url: str) -> tuple[str, str]:
    parsed = urllib.parse.urlparse(url)
    return parsed.netloc, parsed.path.lstrip("/")


def s3_client() -> Any:
    """A boto3 S3 client on S3_ENDPOINT_URL (as streaming's own S3 client)."""
    import boto3

    return boto3.session.Session().client("s3", endpoint_url=os.environ.get("S3_ENDPOINT_URL"))


def _listing(client: Any, bucket: str, prefix: str) -> list[dict[str, Any]]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [obj for page in pages for obj in page.get("Contents", [])]


def _glob_regex(pattern: str) -> re.Pattern:
    """Shell glob on object keys: `*` and `?` stay within one path segment, `**/` spans any."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            j = i
            while j < len(pattern) and pattern[j] not in "*?":
                j += 1
            out, i = out + fnmatch.translate(pattern[i:j])[4:-3], j
    return re.compile(out + r"\Z")


def match_remote(pattern: str) -> list[RemoteInput]:
    """The inputs a remote path or glob names, sorted; DataError naming the pattern if none."""
    scheme = urllib.parse.urlparse(pattern).scheme
    if scheme != "s3":
        if _GLOB.search(pattern):
            raise DataError(f"input {pattern}: globs need s3:// (or an S3-compatible store); list the "
                            f"{scheme}:// objects one by one")
        return [RemoteInput(pattern.rstrip("/"), -1, "")]
    bucket, key = _split(pattern)
    try:
        client = s3_client()
        if _GLOB.search(key):
            prefix = key[: _GLOB.search(key).start()]
            regex = _glob_regex(key)
            objects = [o for o in _listing(client, bucket, prefix) if regex.match(o["Key"])]
            found = [RemoteInput(f"s3://{bucket}/{o['Key']}", o["Size"], o["ETag"].strip('"')) for o in objects]
        else:
            key = key.rstrip("/")
            objects = _listing(client, bucket, key)
            exact = [o for o in objects if o["Key"] == key]
            inside = [o for o in objects if o["Key"].startswith(key + "/") and "/" not in o["Key"][len(key) + 1:]]
            if exact:
                o = exact[0]
                found = [RemoteInput(f"s3://{bucket}/{key}", o["Size"], o["ETag"].strip('"'))]
            elif any(o["Key"] == f"{key}/{HF_STATE}" for o in inside):
                found = [RemoteInput(f"s3://{bucket}/{key}", sum(o["Size"] for o in inside),
                                     ",".join(o["ETag"].strip('"') for o in inside), is_dir=True)]
            elif any(o["Key"].startswith(key + "/") for o in objects):
                raise DataError(f"input {pattern}: is a prefix; pass a glob such as '{pattern.rstrip('/')}/*.jsonl.zst' "
                                f"or a datasets save_to_disk directory (with {HF_STATE})")
            else:
                found = []
    except DataError:
        raise
    except Exception as exc:  # botocore raises many types; all mean the store could not be listed
        raise DataError(f"input {pattern}: cannot list ({exc})") from None
    if not found:
        raise DataError(f"input {pattern}: no objects matched")
    return sorted(found, key=lambda r: r.url)


def fetch(item: RemoteInput, dest: Path) -> Path:
    """Download an input into `dest` (a file, or a directory for an HF prefix) unless it is there;
    appears by an atomic rename. DataError naming the URL on failure."""
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(f".{dest.name}.{os.getpid()}.part")
    try:
        if urllib.parse.urlparse(item.url).scheme == "s3":
            client = s3_client()
            bucket, key = _split(item.url)
            if item.is_dir:
                part.mkdir(exist_ok=True)
                for o in _listing(client, bucket, key + "/"):
                    name = o["Key"][len(key) + 1:]
                    if "/" not in name:
                        client.download_file(bucket, o["Key"], str(part / name))
            else:
                client.download_file(bucket, key, str(part))
        else:
            import_streaming().base.storage.CloudDownloader.direct_download(item.url, str(part))
        os.replace(part, dest)
    except Exception as exc:  # each cloud SDK raises its own types
        raise DataError(f"{item.url}: cannot download ({exc})") from None
    return dest


def read_head(item: RemoteInput, nbytes: int, dest: Path) -> bool:
    """Write the first `nbytes` of an s3 object to `dest`; True if that is not the whole object.
    Other schemes (and HF prefixes) are downloaded whole into `dest`."""
    if urllib.parse.urlparse(item.url).scheme != "s3" or item.is_dir:
        fetch(item, dest)
        return False
    bucket, key = _split(item.url)
    try:
        body = s3_client().get_object(Bucket=bucket, Key=key, Range=f"bytes=0-{nbytes - 1}")["Body"].read()
    except Exception as exc:
        raise DataError(f"{item.url}: cannot read ({exc})") from None
    dest.write_bytes(body)
    return item.size > len(body)


def _missing(exc: BaseException) -> bool:
    """Whether a storage error means "no such object" (each SDK words it differently)."""
    text = str(exc).lower()
    return isinstance(exc, FileNotFoundError) or any(k in text for k in ("404", "nosuchkey", "not found"))


def read_remote_json(url: str) -> Any:
    """Fetch and parse a small JSON object (a remote manifest); None if it does not exist."""
    import json

    with tempfile.TemporaryDirectory() as tmp:
        try:
            fetch(RemoteInput(url, -1, ""), Path(tmp, "obj"))
            return json.loads(Path(tmp, "obj").read_text())
        except DataError as exc:
            if _missing(exc):
                return None
            raise DataError(f"{url}: cannot reach the output location ({str(exc).split('(', 1)[-1]}") from None
        except ValueError:
            return None
        except Exception as exc:
            if _missing(exc):
                return None
            raise DataError(f"{url}: cannot reach the output location ({exc})") from None


def check_writable(remote: str) -> None:
    """The bucket or container of `remote` exists and we may write there; DataError naming it if not."""
    if urllib.parse.urlparse(remote).scheme == "s3":
        bucket, key = _split(remote)
        probe = f"{key.rstrip('/')}/.fwpkm-prep-write-probe".lstrip("/")
        try:
            client = s3_client()
            client.put_object(Bucket=bucket, Key=probe, Body=b"")
            client.delete_object(Bucket=bucket, Key=probe)
        except Exception as exc:
            raise DataError(f"{remote}: output location not writable ({exc})") from None
        return
    with tempfile.TemporaryDirectory() as tmp:
        uploader(Path(tmp), remote)


def uploader(local: Path, remote: str) -> Any:
    """streaming's uploader of files under `local` to `remote` (keeps the local copies); checks the
    bucket or container exists. DataError naming `remote` if the store refuses."""
    import logging

    quiet = logging.getLogger("streaming.base.storage.upload")  # warns that `local` is not empty: intended
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        return import_streaming().base.storage.CloudUploader.get((str(local), remote), keep_local=True,
                                                                 exist_ok=True)
    except Exception as exc:
        raise DataError(f"{remote}: output location not writable ({exc})") from None
    finally:
        quiet.setLevel(level)
