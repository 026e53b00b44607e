"""Data-path throughput: prep tokens/s (1 and 2 workers) and streaming read tokens/s, from local disk and
from a local S3-compatible endpoint (moto's server on 127.0.0.1, fwpkm_megatron/data/testing.py).

    .venv/bin/python bench/data.py [--max-mb 8] [--seq-len 256] [--batch-size 8] [--read-batches 400]

Corpus: `--max-mb` of the running Python's stdlib (as `make demo`), written as 8 zstd JSON Lines files
(`*.jsonl.zst`), once on local disk and once uploaded to the endpoint. A tokenizer is trained once;
every timed prep uses it (`--tokenizer`), so the prep numbers are validation + scan + tokenize + shard
writing (+ download of the inputs and upload of the shards for S3), not BPE training. Reads: one
process, 1 rank, then 2 ranks (gloo, FileStore) on the local copy; the S3 read streams the uploaded
dataset through an empty local cache. Tokens are batch_size x (seq_len + 1) per batch, timed after
the first batch (which pays for the shard index). Prints one table; results go into
docs/performance.md ("Data") with the command line.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def _read_rate(path: str, batch_size: int, seq_len: int, n: int, rank: int = 0, world: int = 1,
               remote: str | None = None, local: str | None = None) -> float:
    from fwpkm_megatron.config import DataConfig
    from fwpkm_megatron.data import build_loader

    with build_loader(DataConfig(path=path, remote=remote, local=local), "train", batch_size=batch_size,
                      seq_len=seq_len, seed=0, rank=rank, world_size=world) as s:
        s.next_batch()
        start = time.perf_counter()
        for _ in range(n):
            s.next_batch()
        return n * batch_size * (seq_len + 1) / (time.perf_counter() - start)


def _rank(rank: int, path: str, store: str, out: str, batch_size: int, seq_len: int, n: int) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2")
    dist.init_process_group("gloo", store=dist.FileStore(store, 2), rank=rank, world_size=2)
    rate = _read_rate(path, batch_size, seq_len, n, rank, 2)
    Path(out, f"rate{rank}").write_text(str(rate))
    dist.barrier()
    dist.destroy_process_group()


def _write_corpus(root: Path, max_bytes: int, n_files: int = 8) -> int:
    """The stdlib selection as n_files zstd JSON Lines files; returns the source bytes."""
    import zstandard

    from fwpkm_megatron.data.sources import select_inputs, source_inputs

    _, files = source_inputs(None, "auto")
    chosen = select_inputs(files, max_bytes, 0)
    root.mkdir(parents=True)
    lines = [json.dumps({"text": Path(f.path).read_text(errors="replace")}) + "\n" for f in chosen]
    for i in range(n_files):
        body = "".join(lines[i::n_files]).encode()
        (root / f"part{i}.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(body))
    return sum(f.bytes for f in chosen)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--max-mb", type=float, default=8.0)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--read-batches", type=int, default=400)
    args = p.parse_args()

    import torch
    import torch.multiprocessing as mp

    from fwpkm_megatron.data import prepare_corpus
    from fwpkm_megatron.data.remote import s3_client
    from fwpkm_megatron.data.streaming_compat import import_streaming
    from fwpkm_megatron.data.testing import local_s3

    torch.set_num_threads(1)
    import_streaming()  # pay the import before timing
    rows = []
    kw = dict(seq_len=args.seq_len, progress=False, val_fraction=0.02)
    with tempfile.TemporaryDirectory() as tmp, local_s3(("bench",)):
        source_bytes = _write_corpus(Path(tmp, "corpus"), int(args.max_mb * 1e6))
        client = s3_client()
        for f in sorted(Path(tmp, "corpus").iterdir()):
            client.upload_file(str(f), "bench", f"corpus/{f.name}")
        base = prepare_corpus(Path(tmp, "base"), inputs=[str(Path(tmp, "corpus/*.jsonl.zst"))],
                              vocab_size=args.vocab_size, **kw)
        tok = str(Path(tmp, "base", "tokenizer.json"))
        tokens = sum(s["tokens"] for s in base["splits"].values())
        what = f"{tokens:,} tokens, {source_bytes / 1e6:.1f} MB"
        for where in ("local", "S3"):
            for workers in (1, 2):
                out, extra = Path(tmp, f"{where}{workers}"), {}
                inputs = [str(Path(tmp, "corpus/*.jsonl.zst"))]
                if where == "S3":
                    inputs, extra = ["s3://bench/corpus/*.jsonl.zst"], {"remote": f"s3://bench/data{workers}"}
                start = time.perf_counter()
                prepare_corpus(out, inputs=inputs, tokenizer_path=tok, workers=workers, **kw, **extra)
                seconds = time.perf_counter() - start
                rows.append((f"prep {where}, {workers} worker{'s' * (workers > 1)}", tokens / seconds,
                             f"{what} in {seconds:.1f} s" + (" (inputs in, shards out)" if where == "S3" else "")))
        data = str(Path(tmp, "local1"))
        rate = _read_rate(data, args.batch_size, args.seq_len, args.read_batches)
        rows.append(("stream read local, 1 rank", rate, f"{args.read_batches} batches of {args.batch_size}"))
        rate = _read_rate(str(Path(tmp, "cache")), args.batch_size, args.seq_len, args.read_batches,
                          remote="s3://bench/data1", local=str(Path(tmp, "cache")))
        rows.append(("stream read S3, 1 rank", rate, "empty cache: shards downloaded as read"))
        mp.start_processes(_rank, args=(data, str(Path(tmp, "store")), tmp, args.batch_size, args.seq_len,
                                        args.read_batches // 2), nprocs=2, join=True, start_method="spawn")
        rates = [float(Path(tmp, f"rate{r}").read_text()) for r in (0, 1)]
        rows.append(("stream read local, 2 ranks", min(rates),
                     f"slower rank; ranks {rates[0]:,.0f} / {rates[1]:,.0f} tok/s, {args.read_batches // 2} batches each"))
    print(f"{'what':<30} {'tokens/s':>12}  notes")
    for what, rate, note in rows:
        print(f"{what:<30} {rate:>12,.0f}  {note}")
    print(json.dumps({what: round(rate) for what, rate, _ in rows}))


if __name__ == "__main__":
    main()
