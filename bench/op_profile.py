"""Where the memory's CPU time goes: torch.profiler's top operators for the scan and the training step.

    .venv/bin/python bench/op_profile.py [--case step|scan|table|all] [--top 12] [--steps 3]

Cases (one intra-op thread, self CPU time of each operator over `--steps` forward + backward passes after
one warm-up, printed as a table sorted by time):
  step   configs/tiny.yaml's model (FwPKM at layers 1 and 3, PKM at 2) against the same model without
         memory layers; the memory's extra time is the difference, and the table lists both.
  scan   `ops.fwpkm_scan_rows` as the FwPKM layer calls it (table a buffer), T = 2,048, N = 4,096.
  table  `ops.fwpkm_scan` on a table that requires grad, T = 256, N = 65,536.
The profiler adds per-op overhead, so the totals are higher than bench/step.py's; compare shares.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scaling import scan_case  # noqa: E402  (the same inputs as the scaling table)
from step import make_step  # noqa: E402

from fwpkm_megatron import ops  # noqa: E402
from fwpkm_megatron.benign import silence  # noqa: E402
from fwpkm_megatron.config import load_config  # noqa: E402
from fwpkm_megatron.parallel.groups import init_single_process  # noqa: E402


def table_case(T: int = 256, N: int = 65536):
    """`ops.fwpkm_scan` with the value table itself requiring grad (a static table trained through the scan)."""
    gen = torch.Generator().manual_seed(0)
    R = int(N ** 0.5)
    q = torch.randn(2, T, 2, 32, generator=gen).requires_grad_()
    v = torch.randn(2, T, 64, generator=gen).requires_grad_()
    g = torch.rand(2, T, generator=gen).requires_grad_()
    keys = ((torch.rand(2, 2, R, 16, generator=gen) * 2 - 1) * 32 ** -0.5).requires_grad_()
    values = (torch.randn(N, 64, generator=gen) * 0.125).requires_grad_()

    def run():
        v_hat, new_keys, new_values = ops.fwpkm_scan(q, v, g, keys, values, backend="reference", top_k=8, chunk_size=64)
        (v_hat.square().sum() + new_keys.square().sum() + new_values.square().sum()).backward()
    return run


def top_ops(run, steps: int, top: int) -> tuple[float, list[tuple[str, float, int]]]:
    """(total self CPU ms per pass, [(op, self CPU ms per pass, calls per pass)]) of the `top` costliest ops."""
    run()  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            run()
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events) / 1e3 / steps
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    return total, [(e.key, e.self_cpu_time_total / 1e3 / steps, e.count // steps) for e in events[:top]]


def print_table(title: str, total: float, rows) -> None:
    print(f"\n{title}: {total:.1f} ms self CPU per pass")
    print(f"{'operator':<44} {'ms':>8} {'share':>7} {'calls':>7}")
    for name, ms, calls in rows:
        print(f"{name[:44]:<44} {ms:>8.1f} {ms / total:>7.1%} {calls:>7}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=["step", "scan", "table", "all"], default="all")
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--config", default="configs/tiny.yaml")
    args = parser.parse_args()
    silence()
    torch.set_num_threads(1)
    cases = {}
    if args.case in ("step", "all"):
        init_single_process(0)
        cases["step, no memory"] = make_step(load_config(args.config, ["fwpkm.layers=[]", "pkm.layers=[]"]), 4096)
        cases["step, with memory (the config)"] = make_step(load_config(args.config), 4096)
    if args.case in ("scan", "all"):
        cases["fwpkm_scan_rows, T=2048, N=4096"] = scan_case(2048, 4096)
    if args.case in ("table", "all"):
        cases["fwpkm_scan, table requires grad, T=256, N=65536"] = table_case()
    for name, run in cases.items():
        print_table(name, *top_ops(run, args.steps, args.top))


if __name__ == "__main__":
    main()
