"""Core attention cost, fused (`FusedWindowedAttention`) vs megatron's unfused one, in one run.

    .venv/bin/python bench/attention.py [--lengths 1024 4096 16384] [--window 32] [--unfused-max 4096]

Each (attention, length) runs forward + backward on random [T, b, heads, head_dim] inputs (defaults:
the paper's 12 query heads, 4 KV groups, head dim 64, batch 1, fp32) in a fresh process, and reports its
peak memory above the inputs and its median time. The unfused attention holds T x T scores, so it runs
only up to --unfused-max tokens. Peak memory: CUDA's max_memory_allocated on a GPU; on CPU the rise of the
process's peak RSS (ru_maxrss), which also counts allocator slack. Writes a JSON of the rows to
$OUT/attention.json when OUT is set.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch


def measure(impl: str, T: int, args) -> dict:
    """Peak bytes and median seconds of one attention's forward + backward (run in this process)."""
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.enums import AttnMaskType

    from fwpkm_megatron.model.attention import FusedWindowedAttention, WindowControl, WindowedDotProductAttention
    from fwpkm_megatron.parallel.groups import init_single_process

    init_single_process(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # one process, one device
    config = TransformerConfig(num_layers=1, hidden_size=args.heads * args.head_dim, num_attention_heads=args.heads,
                               num_query_groups=args.groups, attention_dropout=0.0, masked_softmax_fusion=False,
                               use_cpu_initialization=True)
    cls = FusedWindowedAttention if impl == "fused" else WindowedDotProductAttention
    module = cls(config=config, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self",
                 window_control=WindowControl("swa", args.window))
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(T, args.batch, args.heads, args.head_dim, device=device, generator=g, requires_grad=True)
    k, v = (torch.randn(T, args.batch, args.groups, args.head_dim, device=device, generator=g, requires_grad=True)
            for _ in range(2))
    cotangent = torch.randn(T, args.batch, args.heads * args.head_dim, device=device, generator=g)
    cuda = device.type == "cuda"

    def step():
        out = module(q, k, v, attention_mask=None)
        torch.autograd.grad(out, (q, k, v), cotangent)
        if cuda:
            torch.cuda.synchronize(device)

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # CPU: peak RSS so far (imports, inputs)
    step()  # warm-up (kernel choice, block-mask cache, allocator)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base = rss
    times = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated(device) if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) - base
    return {"impl": impl, "T": T, "peak_bytes": max(peak, 0), "seconds": statistics.median(times),
            "device": str(device)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 16384])
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--groups", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--unfused-max", type=int, default=4096)
    parser.add_argument("--one", nargs=2, metavar=("IMPL", "T"), help=argparse.SUPPRESS)  # child process
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.one:
        print(json.dumps(measure(args.one[0], int(args.one[1]), args)))
        return
    rows = {}
    base = sys.argv[1:]
    for T in args.lengths:
        for impl in ("fused", "unfused"):
            if impl == "unfused" and T > args.unfused_max:
                continue
            done = subprocess.run([sys.executable, __file__, *base, "--one", impl, str(T)], check=True,
                                  capture_output=True, text=True)
            rows[impl, T] = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"window {args.window}, {args.heads} heads / {args.groups} KV groups x {args.head_dim}, batch {args.batch}, "
          f"fp32, fwd+bwd, {rows[next(iter(rows))]['device']}")
    print(f"{'T':>6} | {'fused MiB':>9} | {'unfused MiB':>11} | {'mem ratio':>9} | {'fused ms':>9} | "
          f"{'unfused ms':>10} | {'time ratio':>10}")
    for T in args.lengths:
        f, u = rows[("fused", T)], rows.get(("unfused", T))
        mib = lambda r: r["peak_bytes"] / 2**20
        line = f"{T:>6} | {mib(f):>9.1f} | "
        if u:
            line += (f"{mib(u):>11.1f} | {mib(u) / max(mib(f), 1e-9):>8.1f}x | {f['seconds'] * 1e3:>9.1f} | "
                     f"{u['seconds'] * 1e3:>10.1f} | {u['seconds'] / f['seconds']:>9.1f}x")
        else:
            line += f"{'(T x T: skipped)':>11} | {'':>9} | {f['seconds'] * 1e3:>9.1f} | {'':>10} | {'':>10}"
        print(line)
    if os.environ.get("OUT"):
        path = Path(os.environ["OUT"]) / "attention.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(list(rows.values()), indent=1))
        tmp.replace(path)


if __name__ == "__main__":
    main()
