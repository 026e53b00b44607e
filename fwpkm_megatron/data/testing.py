"""A real S3-compatible endpoint on 127.0.0.1 for tests and benchmarks: moto's standalone server
(`moto[server]`), a separate process speaking the S3 HTTP API, so boto3 and streaming's storage layer
run unmodified against it (no in-process mock)."""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator

_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def local_s3(buckets: tuple[str, ...] = ("fwpkm",), timeout: float = 30.0) -> Iterator[str]:
    """Start the server, create `buckets`, point this process's environment at it (S3_ENDPOINT_URL and
    dummy credentials, inherited by child processes), yield the endpoint URL; stop it and restore the
    environment on exit."""
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-c", "from moto.server import main; main()", "-H", "127.0.0.1",
                             "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    saved = {k: os.environ.get(k) for k in (*_ENV, "S3_ENDPOINT_URL")}
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the local S3 server on {endpoint} did not start") from None
                time.sleep(0.1)
        os.environ.update(_ENV, S3_ENDPOINT_URL=endpoint)
        from fwpkm_megatron.data.remote import s3_client

        client = s3_client()
        for bucket in buckets:
            client.create_bucket(Bucket=bucket)
        yield endpoint
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
