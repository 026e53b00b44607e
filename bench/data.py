"""Data-path throughput: prep tokens/s (1 and 2 tokenizer workers) and streaming read tokens/s per rank.

    .venv/bin/python bench/data.py [--max-mb 8] [--seq-len 256] [--batch-size 8] [--read-batches 400]

On the default corpus (the running Python's stdlib, as `make demo`): a tokenizer is trained once, then
each prep run reuses it (`--tokenizer`), so the prep numbers are scan + tokenize + shard writing, not
BPE training. Reads: 1 process, then 2 ranks (gloo, FileStore) each reading its own share; tokens are
batch_size x (seq_len + 1) per batch, timed after the first batch (which pays for the shard index).
Prints one table; results go into docs/performance.md ("Data") with the command line.
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


def _read_rate(path: str, batch_size: int, seq_len: int, n: int, rank: int = 0, world: int = 1) -> float:
    from fwpkm_megatron.config import DataConfig
    from fwpkm_megatron.data import build_loader

    with build_loader(DataConfig(path=path), "train", batch_size=batch_size, seq_len=seq_len, seed=0, rank=rank,
                      world_size=world) as s:
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
    from fwpkm_megatron.data.streaming_compat import import_streaming

    torch.set_num_threads(1)
    import_streaming()  # pay the import before timing
    max_bytes = int(args.max_mb * 1e6)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base = prepare_corpus(Path(tmp, "base"), max_bytes=max_bytes, vocab_size=args.vocab_size,
                              seq_len=args.seq_len, progress=False)
        tokens = sum(s["tokens"] for s in base["splits"].values())
        for workers in (1, 2):
            start = time.perf_counter()
            prepare_corpus(Path(tmp, f"w{workers}"), max_bytes=max_bytes, seq_len=args.seq_len, progress=False,
                           tokenizer_path=str(Path(tmp, "base", "tokenizer.json")), workers=workers)
            seconds = time.perf_counter() - start
            rows.append((f"prep, {workers} worker{'s' * (workers > 1)}", tokens / seconds,
                         f"{tokens:,} tokens, {base['source']['bytes'] / 1e6:.1f} MB in {seconds:.1f} s"))
        data = str(Path(tmp, "base"))
        rate = _read_rate(data, args.batch_size, args.seq_len, args.read_batches)
        rows.append(("stream read, 1 rank", rate, f"{args.read_batches} batches of {args.batch_size}"))
        mp.start_processes(_rank, args=(data, str(Path(tmp, "store")), tmp, args.batch_size, args.seq_len,
                                        args.read_batches // 2), nprocs=2, join=True, start_method="spawn")
        rates = [float(Path(tmp, f"rate{r}").read_text()) for r in (0, 1)]
        rows.append(("stream read, 2 ranks (per rank)", min(rates),
                     f"ranks {rates[0]:,.0f} / {rates[1]:,.0f} tok/s, {args.read_batches // 2} batches each"))
    print(f"{'what':<34} {'tokens/s':>12}  notes")
    for what, rate, note in rows:
        print(f"{what:<34} {rate:>12,.0f}  {note}")
    print(json.dumps({what: round(rate) for what, rate, _ in rows}))


if __name__ == "__main__":
    main()
