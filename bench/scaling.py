"""How the memory's CPU hot path scales: the FwPKM scan against softmax attention, and the training step.

    .venv/bin/python bench/scaling.py [--tokens 256] [--slots 4096] [--token-mults 1 2 4 8 16 32]
                                      [--slot-mults 1 4 16] [--repeats 7] [--steps 10] [--step-runs 3]
                                      [--skip-scan | --skip-step] [--compare-with REV]

Scan: `ops.fwpkm_scan_rows` forward + backward as the FwPKM layer calls it (q, v, g and the keys require
grad, the value table is a buffer; the loss covers the reads, the new keys and the written rows), with
B=2, H=2, d_k=32, d_v=64, C=64, k=8, at `--tokens` x each token multiple (N = `--slots`) and at `--slots` x
each slot multiple (T = `--tokens`). Beside it, causal softmax attention of the same width (2 heads of 32 =
d_v; `scaled_dot_product_attention`, forward + backward) at the same token counts: the core op of each
layer, projections left out of both. Step: bench/step.py's configs/tiny.yaml variants (forward + backward +
AdamW on synthetic tokens), throughput relative to the model without memory layers, in `--step-runs` fresh
processes (their median is the number to quote).

Timing: CPU seconds of this process (`time.process_time`, one intra-op thread), every variant interleaved
with the others in each round, the median over rounds (the first round, two for the step, warm up). On a
shared machine CPU time is far steadier than wall time. Scan ratios come from one process; the step's
ratios also move with the process (where its tensors land), so the step runs in `--step-runs` processes.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

from fwpkm_megatron import ops
from fwpkm_megatron.benign import silence

B, H, D_K, D_V, CHUNK, TOP_K = 2, 2, 32, 64, 64, 8


def reference_at(rev: str):
    """`ops/reference.py` as of git revision `rev` (with the `addressing.py` and `row_products.py` beside it, where
    they exist), imported as a package of its own (for --compare-with)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    name = "reference_at_" + "".join(c if c.isalnum() else "_" for c in rev)
    package = os.path.join(tempfile.mkdtemp(), name)
    os.makedirs(package)
    open(os.path.join(package, "__init__.py"), "w").close()
    for file in ("reference.py", "addressing.py", "row_products.py"):
        shown = subprocess.run(["git", "show", f"{rev}:fwpkm_megatron/ops/{file}"], cwd=root, capture_output=True,
                               text=True)
        if shown.returncode == 0:
            with open(os.path.join(package, file), "w") as f:
                f.write(shown.stdout)
        elif file == "reference.py":
            raise SystemExit(f"--compare-with {rev}: {shown.stderr.strip()}")
    sys.path.insert(0, os.path.dirname(package))
    try:
        return importlib.import_module(f"{name}.reference")
    finally:
        sys.path.pop(0)


TINY_LAYER = dict(B=8, H=1, D_K=64, D_V=128)  # configs/tiny.yaml's FwPKM layer: 8 x 256 tokens, N = 4,096


def scan_case(T: int, N: int, seed: int = 0, module=None, B=B, H=H, D_K=D_K, D_V=D_V):
    """A closure running one scan forward + backward on fixed random inputs (with `module`'s reference scan)."""
    gen = torch.Generator().manual_seed(seed)
    R = int(N ** 0.5)
    if R * R != N:
        raise ValueError(f"--slots x multiple = {N} must be a perfect square (two codebooks of sqrt(N) sub-keys)")
    q = torch.randn(B, T, H, D_K, generator=gen).requires_grad_()
    v = torch.randn(B, T, D_V, generator=gen).requires_grad_()
    g = torch.rand(B, T, generator=gen).requires_grad_()
    keys = ((torch.rand(H, 2, R, D_K // 2, generator=gen) * 2 - 1) * D_K ** -0.5).requires_grad_()
    values = torch.randn(N, D_V, generator=gen) * D_V ** -0.5

    def run():
        if module is None:
            res = ops.fwpkm_scan_rows(q, v, g, keys, values, backend="reference", top_k=TOP_K, chunk_size=CHUNK)
        else:
            res = module.fwpkm_scan_rows(q, v, g, keys, values, top_k=TOP_K, chunk_size=CHUNK)
        (res.v_hat.square().sum() + res.keys.square().sum() + res.row_values.square().sum()).backward()
    return run


def attention_case(T: int, seed: int = 0):
    """A closure running causal softmax attention forward + backward, [B, heads, T, head_dim] = [2, 2, T, 32]."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, T, D_V // H, generator=gen).requires_grad_() for _ in range(3))

    def run():
        F.scaled_dot_product_attention(q, k, v, is_causal=True).square().sum().backward()
    return run


def interleaved(cases: dict, rounds: int) -> dict:
    """Median CPU seconds of each case over `rounds` rounds (after one warm-up round), cases interleaved."""
    times = {name: [] for name in cases}
    for r in range(rounds + 1):
        for name, run in cases.items():
            t0 = time.process_time()
            run()
            if r:
                times[name].append(time.process_time() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def scan_table(args) -> None:
    cases = {}
    for m in args.token_mults:
        cases["scan", "T", m] = scan_case(args.tokens * m, args.slots)
        cases["attention", "T", m] = attention_case(args.tokens * m)
    for m in args.slot_mults[1:]:
        cases["scan", "N", m] = scan_case(args.tokens, args.slots * m)
    if args.compare_with:  # the same scans with the reference of that revision, alternating with these
        old = reference_at(args.compare_with)
        for kind, m in [k[1:] for k in list(cases) if k[0] == "scan"]:
            T, N = (args.tokens * m, args.slots) if kind == "T" else (args.tokens, args.slots * m)
            cases["before", kind, m] = scan_case(T, N, module=old)
        cases["scan", "tiny", 1] = scan_case(256, 4096, **TINY_LAYER)    # and the tiny config's layer
        cases["before", "tiny", 1] = scan_case(256, 4096, module=old, **TINY_LAYER)
    t = interleaved(cases, args.repeats)
    if args.compare_with:
        print(f"scan at revision {args.compare_with} (before) and now (after), alternating, CPU ms, median of "
              f"{args.repeats}")
        print(f"{'tokens':>8} {'slots':>8} {'before':>9} {'x before':>9} {'after':>9} {'x after':>8} {'after/before':>13}")
        b0, a0 = t["before", "T", 1], t["scan", "T", 1]
        rows = [("T", m, args.tokens * m, args.slots) for m in args.token_mults]
        rows += [("N", m, args.tokens, args.slots * m) for m in args.slot_mults[1:]]
        for kind, m, T, N in rows:
            b, a = t["before", kind, m], t["scan", kind, m]
            print(f"{T:>8} {N:>8} {b * 1e3:>9.1f} {b / b0:>9.2f} {a * 1e3:>9.1f} {a / a0:>8.2f} {a / b:>13.2f}")
        b, a = t["before", "tiny", 1], t["scan", "tiny", 1]
        print(f"configs/tiny.yaml's layer (B=8, H=1, d_k=64, d_v=128, 256 tokens, 4096 slots): before {b * 1e3:.1f} "
              f"ms, after {a * 1e3:.1f} ms, after/before {a / b:.2f}\n")
    t0 = t["scan", "T", 1]
    a0 = t["attention", "T", 1]
    t["scan", "N", 1] = t0
    print(f"FwPKM scan (B={B}, H={H}, d_k={D_K}, d_v={D_V}, C={CHUNK}, k={TOP_K}) vs causal softmax attention "
          f"(2 heads x {D_V // H}), forward + backward, CPU ms, median of {args.repeats}")
    print(f"{'tokens':>8} {'slots':>8} {'scan ms':>9} {'x scan':>7} {'attn ms':>9} {'x attn':>7} {'attn/scan':>10}")
    for m in args.token_mults:
        s, a = t["scan", "T", m], t["attention", "T", m]
        print(f"{args.tokens * m:>8} {args.slots:>8} {s * 1e3:>9.1f} {s / t0:>7.2f} {a * 1e3:>9.1f} {a / a0:>7.2f} "
              f"{a / s:>10.2f}")
    for m in args.slot_mults[1:]:
        s = t["scan", "N", m]
        print(f"{args.tokens:>8} {args.slots * m:>8} {s * 1e3:>9.1f} {s / t0:>7.2f}")


def step_table(args) -> None:
    """bench/step.py's tiny-config variants in this process; prints one STEP_JSON line for `step_runs`."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from step import VARIANTS, make_step, time_interleaved

    from fwpkm_megatron.config import load_config
    from fwpkm_megatron.parallel.groups import init_single_process

    init_single_process(0)
    names = ["no memory", "FwPKM only", "FwPKM + PKM (config)", "FwPKM + PKM, per_sequence"]
    steps = {name: make_step(load_config(args.config, VARIANTS[name]), args.vocab) for name in names}
    t = time_interleaved(steps, args.steps, clock=time.process_time)
    print("STEP_JSON " + json.dumps({name: t[name] for name in names}))


def step_runs(args) -> None:
    """The step table in `--step-runs` fresh processes: one process's ratios move by up to +-8 % on a shared
    VM (where its tensors land), far more than between the rounds inside it, so each run is printed and the
    median over runs is the number to quote."""
    from fwpkm_megatron.config import load_config

    cmd = [sys.executable, os.path.abspath(__file__), "--skip-scan", "--step-runs", "0", "--steps", str(args.steps),
           "--config", args.config, "--vocab", str(args.vocab)]
    runs = []
    for _ in range(args.step_runs):
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        runs.append(json.loads(next(line for line in out.splitlines() if line.startswith("STEP_JSON "))[10:]))
    run = load_config(args.config)
    tok = run.train.micro_batch_size * run.train.seq_len
    print(f"\nTraining step, {args.config} ({tok} tokens/step), CPU ms (median of {args.steps} interleaved rounds "
          f"per process), {len(runs)} processes")
    print(f"{'variant':<28} {'ms/step (median)':>17} {'tokens/s':>10}   throughput x no-memory: per process -> median")
    for name in runs[0]:
        ms = statistics.median(r[name] for r in runs)
        ratios = [r["no memory"] / r[name] for r in runs]
        print(f"{name:<28} {ms * 1e3:>17.1f} {tok / ms:>10,.0f}   {' '.join(f'{x:.2f}' for x in ratios)} -> "
              f"{statistics.median(ratios):.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--slots", type=int, default=4096)
    parser.add_argument("--token-mults", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--slot-mults", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--skip-step", action="store_true", help="only the scan table")
    parser.add_argument("--skip-scan", action="store_true", help="only the step table")
    parser.add_argument("--compare-with", metavar="REV", help="also run the scans with ops/reference.py of this git "
                        "revision, alternating (a before/after in one process)")
    parser.add_argument("--step-runs", type=int, default=3, help="fresh processes for the step table (0: this one, raw)")
    args = parser.parse_args()
    silence()
    if args.token_mults[0] != 1 or args.slot_mults[0] != 1:
        parser.error("--token-mults and --slot-mults start at 1 (the base every ratio divides by)")
    torch.set_num_threads(1)
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if not args.skip_scan:
        scan_table(args)
    if not args.skip_step:
        step_runs(args) if args.step_runs else step_table(args)
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
