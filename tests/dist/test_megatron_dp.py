"""megatron-core's DistributedDataParallel, its DistributedOptimizer (ZeRO-1) and bf16 on gloo (CPU).

What this proves:
- the plain engine (megatron DDP, bucketed grad all-reduce overlapped with the backward, megatron's
  fp32 optimizer) reproduces the losses and grad norms of the earlier engine (one flat all-reduce after
  the backward, torch AdamW), stored in tests/assets/losses/parallel_fp32.json, within 1e-5 relative
  at DP=2 (the other layouts are checked against one process in test_parallel.py, through this engine);
- `optimizer.distributed=true` (megatron's DistributedOptimizer: grads reduce-scattered, master weights,
  AdamW state and the update sharded over DP, parameters all-gathered) matches the same numbers at DP=2;
- `train.precision=bf16` with the distributed optimizer (Float16Module, fp32 main grads and master weights)
  trains at DP=2: fast weights stay fp32 and identical across replicas, parameters are bf16, losses within
  2% of fp32 (bf16 rounding; measured ~0.2% over these 5 steps).
The reference file is written by the earlier engine: `python tests/dist/test_megatron_dp.py --write-golden`
run from a checkout of commit 217c41b (the code just before megatron DDP: flat all-reduce + torch AdamW,
column-seeded memory tables), see docs/validation.md.
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


def _assert_matches_golden(name, got):
    ref = [(loss, grad_norm, 0) for loss, grad_norm in _golden()[name]]
    assert_metrics_close(ref, got, name)


def test_megatron_ddp_matches_the_earlier_engine():
    # TP=2, PP=2 and the other layouts also match one process in test_parallel.py (the same engine)
    for name in ("dp2_per_sequence",):
        ranks = _metrics(name)
        _assert_matches_golden(name, ranks[0][0])
        assert ranks[0][0] == ranks[1][0], f"{name}: ranks report different metrics"


def test_distributed_optimizer_matches_the_earlier_engine():
    for name in ("dp2_persistent",):
        ranks = _metrics(name, ["optimizer.distributed=true"])
        _assert_matches_golden(name, ranks[0][0])
        for key, value in ranks[0][1].items():  # persistent: replicas' fast weights identical after the steps
            assert torch.equal(value, ranks[1][1][key]), key


def _train_with_dtypes(rank, overrides, sequences):
    """test_parallel.train's steps, also returning the parameter dtypes and the optimizer's main-param dtypes."""
    from test_parallel import build, fast_weights, global_batches

    run, groups, engine = build(overrides)
    out = []
    for step, batch in enumerate(global_batches(sequences)):
        for chunk in engine.chunks:
            chunk.window_control.begin_step(step, 1234, True)
        m = engine.train_step([batch.chunk(groups.dp)[groups.dp_rank]])
        out.append((m["train/loss"], m["train/grad_norm"], 0))
    params = {p.dtype for p in engine.model.parameters()}
    main = {p.dtype for g in engine.optimizer.param_groups for p in g["params"]}
    return out, fast_weights(engine), params, main


def test_bf16_with_distributed_optimizer_trains_close_to_fp32():
    bf16 = LAYOUTS["dp2_persistent"][1] + ["train.precision=bf16", "optimizer.distributed=true"]
    ranks = run_ranks(_train_with_dtypes, 2, bf16, 4)
    ref = _golden()["dp2_persistent"]
    for step, ((loss, _, _), (ref_loss, _)) in enumerate(zip(ranks[0][0], ref)):
        assert abs(loss - ref_loss) <= 0.02 * ref_loss, f"step {step}: bf16 loss {loss} vs fp32 {ref_loss}"
    for key, value in ranks[0][1].items():  # fast weights: fp32, identical replicas
        assert value.dtype == torch.float32 and torch.equal(value, ranks[1][1][key]), key
    assert ranks[0][2] == {torch.bfloat16} and ranks[0][3] == {torch.float32}  # bf16 model, fp32 master weights


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
