"""Long-context evaluation in bounded memory: peak RSS and time of one NIAH read and one perplexity segment.

    .venv/bin/python bench/long_context.py --model runs/demo/export --data data/stdlib \
        [--lengths 16384 32768 131072] [--prefill-block 2048] [--threads 1]

Each measurement runs in a fresh process (peak RSS = that process's ru_maxrss, which includes the
~0.5 GiB of torch + transformers + the model): NIAH = one generated record of L tokens, one read
(final read + its write + decoding, as `fwpkm-eval niah --n-iters 1`); ppl = one segment of L tokens
from the train split (the val split of a small corpus is shorter than 128K) under `persistent`, read in
blocks through the KV cache. Prints one markdown table; results go into docs/performance.md and
docs/evaluation.md with this command line.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def _measure(kind: str, model_dir: str, data: str, length: int, block: int) -> dict:
    import torch

    from fwpkm_megatron.eval import evaluate_niah, generate_records, streaming_perplexity, val_segments
    from fwpkm_megatron.export import load_model

    model, tok = load_model(model_dir)
    if kind == "niah":
        records = generate_records(data, lengths=[length], per_length=1, num_needles=1)
        start, cpu = time.perf_counter(), time.process_time()
        evaluate_niah(model, tok, records, n_iters=(1,), progress=False, prefill_block=block)
    else:
        segment = next(val_segments(data, "train", length=length))
        start, cpu = time.perf_counter(), time.process_time()
        streaming_perplexity(model, [segment], policy="persistent", progress=False, prefill_block=block)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {"kind": kind, "length": length, "threads": torch.get_num_threads(), "wall_s": round(wall, 1),
            "cpu_s": round(cpu, 1), "tokens_per_cpu_s": round(length / cpu),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--lengths", type=int, nargs="+", default=[16384, 32768, 131072])
    p.add_argument("--kinds", nargs="+", default=["niah", "ppl"], choices=("niah", "ppl"))
    p.add_argument("--prefill-block", type=int, default=2048)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--one", nargs=2, metavar=("KIND", "LENGTH"), help=argparse.SUPPRESS)  # child process
    args = p.parse_args()
    if args.one:
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(_measure(args.one[0], args.model, args.data, int(args.one[1]), args.prefill_block)))
        return 0
    print("| kind | tokens | wall s | CPU s | tokens / CPU s | peak RSS MiB |\n|---|---|---|---|---|---|")
    for kind in args.kinds:
        for length in args.lengths:
            out = subprocess.run([sys.executable, __file__, "--model", args.model, "--data", args.data,
                                  "--prefill-block", str(args.prefill_block), "--threads", str(args.threads),
                                  "--one", kind, str(length)], capture_output=True, text=True)
            if out.returncode != 0:
                print(out.stderr[-2000:], file=sys.stderr)
                return out.returncode
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"| {kind} | {length:,} | {r['wall_s']} | {r['cpu_s']} | {r['tokens_per_cpu_s']:,} | "
                  f"{r['peak_rss_mib']:,} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
