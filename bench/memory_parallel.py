"""Communication of memory parallelism: bytes per token per FwPKM (and static PKM) layer, and bytes per rank.

    .venv/bin/python bench/memory_parallel.py [--m 1 2 4] [--d-v 512] [--slots 4096] [--topk 8]

For each M, starts M gloo ranks on this machine (DP = M, one memory group), runs one training step of a
small GPT with one FwPKM layer, and prints what the memory-group exchange counted (bytes this rank sent,
divided by its tokens): the read (addresses and read weights all-gathered, reads returned by
all-to-all), the write (gates all-gathered, targets sent to their columns' owners by all-to-all), the
key step (two small all-reduces per chunk), each forward and backward, next to the formulas of
docs/parallelism.md. Also the fast-weight bytes per rank, and the TP x M = 4 layout (TP=2, M=2) at M=4.
`--pkm`: instead, the static PKM layer that the same model has at layer 0 (same N, d_v, d_k, k, one head):
its read exchange (addresses and weights all-gathered, reads returned by all-to-all; backward: the
transposed exchange) and its table bytes per rank, also split over TP x M.
`--sync`: instead, DP=4 x M=2 (two memory groups, `persistent`): the bytes the sparse sync of the
written rows sent per step and rank, against a dense all-reduce of the rank's table slice.
CPU only: the byte counts are exact and independent of the device; times are not reported.
"""
from __future__ import annotations

import argparse
import os
import socket
import tempfile

import torch
import torch.multiprocessing as mp


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _overrides(args, m: int, tp: int) -> list[str]:
    return ["model.num_layers=1", "model.hidden_size=64", "model.num_attention_heads=4", "model.max_seq_len=512",
            f"model.vocab_size={args.vocab}", "fwpkm.layers=[0]", f"fwpkm.num_slots={args.slots}",
            f"fwpkm.d_k={args.d_k}", f"fwpkm.d_v={args.d_v}", f"fwpkm.topk={args.topk}",
            f"fwpkm.chunk_size={args.chunk}", f"train.seq_len={args.seq}", f"parallel.tp={tp}",
            f"parallel.memory_parallel={m}", "pkm.layers=[0]", f"pkm.num_slots={args.slots}", f"pkm.d_k={args.d_k}",
            f"pkm.d_v={args.d_v}", f"pkm.topk={args.topk}", "pkm.heads=1"]


def _rank(rank, world, port, args, m, tp, out_dir, dp=None):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from fwpkm_megatron.config import load_config
    from fwpkm_megatron.memory import fast_weight_states
    from fwpkm_megatron.parallel.apply import exchanges
    from fwpkm_megatron.parallel.groups import init_distributed
    from fwpkm_megatron.training.engine import ParallelEngine

    run = load_config(None, _overrides(args, m, tp))
    groups = init_distributed(run.parallel, 0, run)
    engine = ParallelEngine(run, groups, args.vocab)
    g = torch.Generator().manual_seed(0)
    batch = torch.randint(0, args.vocab, (world // tp * args.batch, args.seq + 1), generator=g)
    metrics = engine.train_step([batch.chunk(groups.dp)[groups.dp_rank]])
    sent = {}
    for ex in exchanges(engine.chunks):
        for key, n in ex.sent.items():
            sent[key] = sent.get(key, 0) + n
    fast = sum(b.numel() * b.element_size() for s in fast_weight_states(engine.model).values() for b in s.buffers())
    values = sum(s.values.numel() * 4 for s in fast_weight_states(engine.model).values())
    pkm = sum(p.numel() * p.element_size() for n, p in engine.model.named_parameters() if n.endswith("mlp.values"))
    torch.save({"sent": sent, "fast": fast, "tokens": args.batch * args.seq, "values": values, "pkm": pkm,
                "synced": metrics["train/fast_weight_sync_bytes"]}, f"{out_dir}/{rank}.pt")


def measure(args, m: int, tp: int = 1, world: int | None = None) -> dict:
    world = world or m * tp
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(_rank, args=(world, _port(), args, m, tp, out_dir), nprocs=world, start_method="spawn")
        results = [torch.load(f"{out_dir}/{r}.pt") for r in range(world)]
    return max(results, key=lambda r: sum(r["sent"].values()))  # the rank that sent the most


def predicted(args, m: int, tp: int = 1) -> dict[str, float]:
    """Bytes per token per rank from the formulas (docs/parallelism.md), forward pass."""
    hk, d = args.topk, args.d_v // tp  # H = 1 head
    read = (m - 1) * hk * (8 + 4) + 4 * d * (m - 1) / m
    write = (m - 1) * 4 + 4 * d * (m - 1) / m
    return {"read": read, "write": write}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--slots", type=int, default=4096)
    parser.add_argument("--d-k", type=int, default=64)
    parser.add_argument("--d-v", type=int, default=512)
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--sync", action="store_true", help="measure the sync between two memory groups")
    parser.add_argument("--pkm", action="store_true", help="report the static PKM layer's exchange")
    args = parser.parse_args()
    layouts = [(m, 1) for m in args.m] + ([(2, 2)] if 4 in args.m else [])
    if args.pkm:
        print(f"one static PKM layer: N={args.slots}, d_v={args.d_v}, d_k={args.d_k}, k={args.topk}, H=1; "
              f"{args.batch} x {args.seq} tokens per rank; bytes sent per token per rank")
        print(f"{'layout':<12} {'read fwd':>9} {'(formula)':>9} {'read bwd':>9} {'(formula)':>9} {'table/rank':>12}")
        for m, tp in layouts:
            r = measure(args, m, tp)
            per = {k: v / r["tokens"] for k, v in r["sent"].items()}
            d = args.d_v // tp
            fwd = (m - 1) * args.topk * (8 + 4) + 4 * d * (m - 1) / m  # as the FwPKM read, one head
            bwd = (m - 1) * args.topk * 4 + 4 * d * (m - 1) / m        # weight grads back, read grads to columns
            print(f"{f'TP={tp} x M={m}':<12} {per.get(('pkm', 'forward'), 0):>9.1f} {fwd:>9.1f} "
                  f"{per.get(('pkm', 'backward'), 0):>9.1f} {bwd:>9.1f} {r['pkm']:>12,}")
        return
    if args.sync:
        r = measure(args, 2, 1, world=4)
        dense = r["values"] * 2  # a ring all-reduce of the slice sends about twice its size
        print(f"DP=4 x M=2, persistent, N={args.slots}, d_v={args.d_v}, {args.batch} x {args.seq} tokens per rank: "
              f"sparse sync sent {r['synced']:,} B per rank in the step; a dense all-reduce of the "
              f"{r['values']:,} B slice would send about {dense:,} B")
        return
    print(f"one FwPKM layer: N={args.slots}, d_v={args.d_v}, d_k={args.d_k}, k={args.topk}, H=1, "
          f"C={args.chunk}; {args.batch} x {args.seq} tokens per rank; bytes sent per token per rank")
    print(f"{'layout':<12} {'read fwd':>9} {'(formula)':>9} {'write fwd':>9} {'(formula)':>9} {'read bwd':>9} "
          f"{'write bwd':>9} {'keys':>7} {'fast weights/rank':>18}")
    for m, tp in layouts:
        r = measure(args, m, tp)
        per = {k: v / r["tokens"] for k, v in r["sent"].items()}
        f = predicted(args, m, tp)
        keys = per.get(("keys", "forward"), 0) + per.get(("keys", "backward"), 0)
        print(f"{f'TP={tp} x M={m}':<12} {per.get(('read', 'forward'), 0):>9.1f} {f['read']:>9.1f} "
              f"{per.get(('write', 'forward'), 0):>9.1f} {f['write']:>9.1f} {per.get(('read', 'backward'), 0):>9.1f} "
              f"{per.get(('write', 'backward'), 0):>9.1f} {keys:>7.1f} {r['fast']:>18,}")


if __name__ == "__main__":
    main()
