"""Memory parallel (parallel.memory_parallel = M): one FwPKM table per memory group of M DP ranks.

What this proves, on the 2-layer GPT of test_parallel.py (FwPKM layer 0, static PKM layer 1):
- DP=2 x M=2 with micro-batch b is one process with micro-batch 2b: losses, gradients (every slow
  weight's, first step) and the final memory (columns gathered) within 1e-5;
  `per_sequence` too, and perturbing one sequence changes no other sequence's output (no information
  between sequences, across ranks included);
- TP=2 x M=2 (4 ranks) equals TP=1; PP=2 x M=2 (1F1B) equals one process with the group's micro-batches; DP=4 x M=2 (two groups, `persistent`) equals one process that runs
  the two group batches from one state and averages grads and states (the sparse sync of written rows);
- a checkpoint saved at M=2 loads at M=1 and at TP=2 x M=2 with the same memory, bit for bit, and
  fwpkm-export's loader consolidates it in one process; `persistent_local` keeps (and reloads) one
  memory per group;
- no rank allocates a tensor of the full table's size (build, steps with full recompute, the sync,
  a validation snapshot, checkpoint save and load), and full recompute under M=2 equals no recompute;
- every rank holds 1/(TP*M) of the table (values bytes), and the exchange reports its bytes;
- the Trainer at DP=2 x M=2 (micro-batch 2 per rank), resumed from its step-2 checkpoint in one process
  with micro-batch 4 (the same computation), gives every loss and the val loss of the uninterrupted M=2 run.
The static PKM table (layer 1) is split over TP x M too: its values, their first-step gradients (reduced
only over the ranks holding the same columns) and their AdamW moments are compared gathered, like the
fast weights; megatron's DistributedOptimizer at DP=2 x M=2 equals the plain one-process run as well.
Ranks are forked from this process, which imported megatron-core once (tests/dist/spawn.py).
"""
from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import megatron.core  # noqa: F401  imported once here, inherited by every forked rank
from fwpkm_megatron.config import ConfigError, layout_problems, load_config

from spawn import run_ranks
from test_parallel import BASE, SEED, SEQ, VOCAB, build, emulate_dp2, global_batches

RTOL = 1e-5
STEPS = 3


def batches(sequences: int, steps: int = STEPS) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    return [torch.randint(0, VOCAB, (sequences, SEQ + 1), generator=g) for _ in range(steps)]


def train(overrides: list[str], sequences: int, data: list[torch.Tensor] | None = None, save_to=None,
          split=None) -> dict:
    """One step per global batch (default `batches(sequences)`) on this rank's share; what the comparisons
    need. `save_to`: then write a distributed checkpoint (model, fast weights, AdamW) there.
    `split(batch, groups)`: this rank's micro-batches (default: its share as one micro-batch)."""
    from fwpkm_megatron.parallel.apply import exchanges
    from fwpkm_megatron.parallel.sharding import table_shards

    run, groups, engine = build(overrides)
    metrics = []
    for step, batch in enumerate(batches(sequences) if data is None else data):
        for chunk in engine.chunks:
            chunk.window_control.begin_step(step, SEED, True)
        m = engine.train_step(split(batch, groups) if split else [batch.chunk(groups.dp)[groups.dp_rank]])
        metrics.append((m["train/loss"], m["train/grad_norm"], m["train/fast_weight_sync_bytes"]))
        if step == 0:  # the first step's (clipped) gradients, before the weights can drift apart
            grads = {n: p.grad.clone() for n, p in engine.model.named_parameters() if p.grad is not None}
    if save_to is not None:
        from fwpkm_megatron.parallel.dist_checkpoint import save_distributed

        save_distributed(save_to, engine.chunks, engine.optimizer)
    return {"metrics": metrics, "fast": memory_tensors(engine.model), "shard": table_shards(groups)[0].index,
            "grads": grads, "moments": pkm_moments(engine),
            "sent": [dict(ex.sent) for ex in exchanges(engine.chunks)], "tp": groups.tp}


def memory_tensors(model) -> dict[str, torch.Tensor]:
    """The memory tables: FwPKM fast weights (buffers) and static PKM values (a Parameter), named by the
    global layer id (a pipeline stage numbers its layers from 0)."""
    tensors = {n: b for n, b in model.named_buffers() if ".state." in n}
    tensors.update({n: p for n, p in model.named_parameters() if n.endswith("mlp.values")})
    layers = {f"{n}.": f"{n.rsplit('.', 1)[0]}.{m.layer_number - 1}." for n, m in model.named_modules()
              if hasattr(m, "layer_number") and n.rsplit(".", 1)[-1].isdigit()}
    out = {}
    for name, t in tensors.items():
        local = next(prefix for prefix in layers if name.startswith(prefix))
        out[layers[local] + name[len(local):]] = t.detach().clone()
    return out


def pkm_moments(engine) -> dict[str, torch.Tensor]:
    """AdamW's exp_avg of each static PKM table (plain engine; {} for the distributed optimizer)."""
    from fwpkm_megatron.parallel.dist_checkpoint import adamw_views

    names = {id(p): n for n, p in engine.model.named_parameters() if n.endswith("mlp.values")}
    return {names[id(model)]: adamw.state[main]["exp_avg"].clone()
            for adamw, pairs in adamw_views(engine.optimizer) or []
            for model, main in pairs if id(model) in names and main in adamw.state}


def per_token_loss(engine, batch: torch.Tensor) -> torch.Tensor:
    model = engine.chunks[0]
    model.eval()
    with torch.no_grad():
        inputs, labels = batch[:, :-1], batch[:, 1:]
        return model(inputs, torch.arange(SEQ).expand_as(inputs), attention_mask=None, labels=labels)


def perturbation(overrides: list[str], sequences: int) -> tuple[torch.Tensor, torch.Tensor]:
    """per_sequence: this rank's per-token losses, then again with the global batch's sequence 2 changed."""
    run, groups, engine = build(overrides)
    batch = batches(sequences, 1)[0]
    before = per_token_loss(engine, batch.chunk(groups.dp)[groups.dp_rank])
    changed = batch.clone()
    changed[2, SEQ // 2:] = (changed[2, SEQ // 2:] + 1) % VOCAB
    after = per_token_loss(engine, changed.chunk(groups.dp)[groups.dp_rank])
    return before, after


def two_microbatches(batch, groups):
    """This rank's 2 sequences as 2 micro-batches of 1."""
    return list(batch.chunk(groups.dp)[groups.dp_rank].chunk(2))


def group_microbatches(batch, groups):
    """What a memory group of 2 ranks with `two_microbatches` computes, in one process: micro-batch i
    is sequence i of both ranks (global sequences i and 2 + i)."""
    return [batch[[0, 2]], batch[[1, 3]]]


def reference_worker(rank):
    persistent = train([], 4)
    per_seq = train(["fwpkm.policy=per_sequence"], 4)
    emulated = emulate_dp2(rank, [], 8)  # two group batches of 4 from one state, averaged (test_parallel)
    pipelined = train(["parallel.num_microbatches=2"], 4, split=group_microbatches)
    return persistent, per_seq, emulated, pipelined


def dp2_worker(rank):
    mp = ["parallel.memory_parallel=2"]
    persistent = train(mp, 4)
    per_seq = train(mp + ["fwpkm.policy=per_sequence"], 4)
    distributed = train(mp + ["optimizer.distributed=true"], 4)
    return persistent, per_seq, perturbation(mp + ["fwpkm.policy=per_sequence"], 4), distributed


def loaded(overrides: list[str], directory) -> dict:
    """This rank's fast weights after loading `directory` at the layout `overrides` describes."""
    from fwpkm_megatron.parallel.dist_checkpoint import load_distributed
    from fwpkm_megatron.parallel.sharding import table_shards

    run, groups, engine = build(overrides)
    assert load_distributed(directory, engine.chunks, engine.optimizer)
    return {"fast": memory_tensors(engine.model), "moments": pkm_moments(engine),
            "shard": table_shards(groups)[0].index}


class LargeTensors(TorchDispatchMode):
    """Records every dense op output with at least `limit` elements (recorded, not raised: a raise inside one
    rank's collective would hang the others). A sparse tensor (the CPU read's CSR matrix of [tokens, N])
    stores only its entries, which are dense outputs of their own."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit, self.seen = limit, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta" and t.layout == torch.strided \
                    and t.numel() >= self.limit:
                self.seen.append((str(func), tuple(t.shape)))
        return out


def no_full_tables(directory) -> tuple[list, list, list]:
    """DP=4 x M=2 with FwPKM and PKM tables larger than all other slow weights together: build, 2 steps
    with full recompute (the sparse sync between the 2 groups after each), a validation snapshot + eval +
    restore, checkpoint save and load, all while recording tensors of the full table's size. Returns (what was recorded,
    what a plain M=1 build records (the control), recompute vs no recompute metrics)."""
    from fwpkm_megatron.memory import restore_fast_weights, snapshot_fast_weights
    from fwpkm_megatron.model import build_model
    from fwpkm_megatron.parallel.dist_checkpoint import load_distributed, save_distributed

    big = ["fwpkm.num_slots=1024", "fwpkm.d_v=128", "parallel.memory_parallel=2", "pkm.num_slots=1024", "pkm.d_v=128"]
    # > all slow weights but the PKM table (~90K) together, so a flat gradient buffer is not mistaken for a
    # table; the PKM table (a Parameter of the same size) must stay split too: values, grads, AdamW moments
    full = 1024 * 128
    guard, metrics = LargeTensors(full), []
    with guard:
        run, groups, engine = build(big + ["parallel.recompute=true"])
        for step, batch in enumerate(global_batches(8)[:2]):
            engine.chunks[0].window_control.begin_step(step, SEED, True)
            m = engine.train_step([batch.chunk(groups.dp)[groups.dp_rank]])
            metrics.append((m["train/loss"], m["train/grad_norm"]))
        snap = snapshot_fast_weights(engine.model)
        engine.eval_loss(global_batches(8)[2].chunk(groups.dp)[groups.dp_rank])
        restore_fast_weights(engine.model, snap)
        save_distributed(directory, engine.chunks, engine.optimizer)
        load_distributed(directory, engine.chunks, engine.optimizer)
    plain = train(big, 8, global_batches(8)[:2])
    control = LargeTensors(full)
    with control:
        build_model(load_config(None, BASE + big[:2]), VOCAB)
    return guard.seen, control.seen, [metrics, plain["metrics"]]


def four_rank_worker(rank, directory):
    tp2 = train(["parallel.tp=2", "parallel.memory_parallel=2"], 4)
    # emulate_dp2's batches; the checkpoint of M=2 reloads at M=1 and at TP=2 x M=2
    ckpt = f"{directory}/step/dist"
    two_groups = train(["parallel.memory_parallel=2"], 8, global_batches(8), save_to=ckpt)
    pp2 = train(["parallel.pp=2", "parallel.memory_parallel=2", "parallel.num_microbatches=2"], 4,
                split=two_microbatches)
    local = ["parallel.memory_parallel=2", "fwpkm.policy=persistent_local"]  # one memory per group
    per_group = train(local, 8, global_batches(8)[:2], save_to=f"{directory}/local")
    return (tp2, two_groups, loaded([], ckpt), loaded(["parallel.tp=2", "parallel.memory_parallel=2"], ckpt),
            no_full_tables(f"{directory}/big"), pp2, per_group, loaded(local, f"{directory}/local"))


def export_worker(rank, step_dir):
    """What fwpkm-export reads from a distributed checkpoint: its memory in one TP=1 process."""
    from pathlib import Path

    from fwpkm_megatron.export.layout import build_from_distributed

    config = load_config(None, BASE + ["parallel.memory_parallel=2"]).to_dict()
    model = build_from_distributed(Path(step_dir), config)[0]
    return memory_tensors(model)


def gathered(results: list[dict], name: str, what: str = "fast") -> torch.Tensor:
    """A memory tensor (or its grad, moment) as one process would hold it: values' column shards in shard order."""
    ordered = sorted(results, key=lambda r: r["shard"])
    if name.endswith("values"):
        return torch.cat([r[what][name] for r in ordered], 1)
    return ordered[0][what][name]


def assert_close(ref, got, what, atol=1e-6):
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} vs {tuple(ref.shape)}"
    err = (got - ref).abs().max().item()
    assert torch.allclose(got, ref, rtol=RTOL, atol=atol), f"{what}: max abs error {err}"


def assert_adam_close(ref, got, what, lr: float = 3e-3):
    """Parameters after a few AdamW steps: AdamW divides each gradient by its running RMS, so a slot whose
    gradient is near zero in some step (few tokens read it and their sums cancel) turns fp32 rounding noise
    into a step of up to lr for its whole row. Hence: every row but at most one in 16 (at least one) within
    1e-5, every element within the STEPS * lr an AdamW run can move it. Measured, DP=2 x M=2 per_sequence
    after 3 steps: 3 of 64 rows off by 1.0e-3, 9.3e-4 and 1.0e-4, every other row within 1e-7 (with the
    autograd key step, one row at 9.8e-5: the summation order moved the noise), while the first-step
    gradients agree within 1e-11 and every loss within 1e-5 (`assert_same_run` checks both)."""
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} vs {tuple(ref.shape)}"
    err = (got - ref).abs()
    rows_off = int((err > 1e-5).any(1).sum())
    assert rows_off <= max(1, ref.shape[0] // 16) and err.max() <= STEPS * lr, \
        f"{what}: {rows_off} of {ref.shape[0]} rows have elements off by > 1e-5, max {err.max():.3g}"


def assert_same_run(ref: dict, ranks: list[dict], what: str, grads: bool = True) -> None:
    for step, (a, b) in enumerate(zip(ref["metrics"], ranks[0]["metrics"])):
        for name, x, y in (("loss", a[0], b[0]), ("grad_norm", a[1], b[1])):
            assert abs(x - y) <= RTOL * abs(x), f"{what}: step {step} {name} {y} vs one process {x}"
    for name in ref["fast"]:
        check = assert_adam_close if name.endswith("mlp.values") else partial(assert_close, atol=1e-5)
        check(ref["fast"][name], gathered(ranks, name), f"{what}: final {name}")
    pkm = [name for name in ref["fast"] if name.endswith("mlp.values")]
    assert pkm and all(ranks[0]["fast"][n].shape[1] * len(ranks) == ref["fast"][n].shape[1] for n in pkm), \
        f"{what}: the static PKM table is not split over the {len(ranks)} ranks"
    for name in pkm if ranks[0]["grads"] else []:  # reduced over the ranks holding the same columns only
        assert_close(ref["grads"][name], gathered(ranks, name, "grads"), f"{what}: grad of {name}")
    if grads:
        for name, g in ref["grads"].items():
            if name not in pkm:
                assert_close(g, ranks[0]["grads"][name], f"{what}: grad of {name}")


@pytest.fixture(scope="module")
def reference():
    return run_ranks(reference_worker, 1)[0]


def test_dp2_memory_parallel2_is_one_process_with_twice_the_micro_batch(reference):
    persistent, per_seq, emulated, _ = reference
    ranks = run_ranks(dp2_worker, 2)
    assert_same_run(persistent, [r[0] for r in ranks], "DP=2 x M=2 persistent")
    assert_same_run(per_seq, [r[1] for r in ranks], "DP=2 x M=2 per_sequence")
    distributed = [r[3] for r in ranks]  # megatron's DistributedOptimizer: grads not kept on the parameters
    assert_same_run(persistent, [dict(r, grads={}) for r in distributed], "DP=2 x M=2 distributed optimizer",
                    grads=False)
    # each rank holds half of the table's columns (keys are replicated)
    values = [n for n in persistent["fast"] if n.endswith("values")]
    for name in values:
        assert ranks[0][0]["fast"][name].shape[1] * 2 == persistent["fast"][name].shape[1]
    sent = ranks[0][0]["sent"][0]
    assert sent[("read", "forward")] > 0 and sent[("write", "forward")] > 0 and sent[("read", "backward")] > 0
    assert sent[("pkm", "forward")] > 0 and sent[("pkm", "backward")] > 0
    # per_sequence: global sequence 2 (rank 1's first) changed; every other sequence reads exactly as before
    (before0, after0), (before1, after1) = ranks[0][2], ranks[1][2]
    assert torch.equal(before0, after0), "rank 0's sequences saw rank 1's changed sequence"
    assert torch.equal(before1[1], after1[1]), "rank 1's other sequence saw the changed one"
    assert not torch.equal(before1[0, SEQ // 2:], after1[0, SEQ // 2:])


def test_tp2_memory_parallel2_two_memory_groups_and_checkpoints(reference, tmp_path):
    persistent, _, emulated, pipelined = reference
    (tmp_path / "step" / "dist").mkdir(parents=True)
    (tmp_path / "big").mkdir()
    (tmp_path / "local").mkdir()
    ranks = run_ranks(four_rank_worker, 4, str(tmp_path))
    tp2 = [r[0] for r in ranks]
    assert_same_run(persistent, tp2, "TP=2 x M=2", grads=False)
    for r in tp2:  # a quarter of every table's columns on each rank
        for name, full in persistent["fast"].items():
            if name.endswith("values"):
                assert r["fast"][name].shape[1] * 4 == full.shape[1]

    groups = [r[1] for r in ranks]  # DP=4, M=2: ranks (0, 1) and (2, 3) are the two memory groups
    ref_metrics, ref_fast, _ = emulated
    for step, (a, b) in enumerate(zip(ref_metrics, groups[0]["metrics"])):
        for name, x, y in (("loss", a[0], b[0]), ("grad_norm", a[1], b[1])):
            assert abs(x - y) <= RTOL * abs(x), f"2 memory groups: step {step} {name} {y} vs emulation {x}"
    for name, full in ref_fast.items():
        assert_close(full, gathered(groups[:2], name), f"2 memory groups: {name}", atol=1e-5)
    for name in groups[0]["fast"]:
        for a, b in ((groups[0], groups[2]), (groups[1], groups[3])):  # the groups' copies are identical
            assert torch.equal(a["fast"][name], b["fast"][name]), f"{name}: memory groups differ"
    synced = [m[2] for m in groups[0]["metrics"]]
    assert all(0 < s for s in synced), synced  # the written rows are synced, each step

    # the checkpoint written at DP=4 x M=2 holds the same memory (and the PKM tables' AdamW moments) at M=1
    # and at TP=2 x M=2, bit for bit
    for name in groups[0]["fast"]:
        saved = gathered(groups[:2], name)
        for r in ranks:
            assert torch.equal(r[2]["fast"][name], saved), f"M=2 -> M=1: {name} differs"
        assert torch.equal(gathered([r[3] for r in ranks], name), saved), f"M=2 -> TP=2 x M=2: {name} differs"
    for name in groups[0]["moments"]:
        saved = gathered(groups[:2], name, "moments")
        assert torch.equal(ranks[0][2]["moments"][name], saved), f"M=2 -> M=1: AdamW moment of {name} differs"
        assert torch.equal(gathered([r[3] for r in ranks], name, "moments"), saved), f"M=2 -> TP=2 x M=2: {name}"
    # PP=2 x M=2 (1F1B, 2 micro-batches of 1 per rank) = one process with micro-batches of 2
    pp2 = [r[5] for r in ranks]
    for step, (a, b) in enumerate(zip(pipelined["metrics"], pp2[0]["metrics"])):
        for name, x, y in (("loss", a[0], b[0]), ("grad_norm", a[1], b[1])):
            assert abs(x - y) <= RTOL * abs(x), f"PP=2 x M=2: step {step} {name} {y} vs one process {x}"
    for name, full in pipelined["fast"].items():  # stage 0 holds layer 0's FwPKM, stage 1 layer 1's PKM
        holders = [r for r in pp2 if name in r["fast"]]
        assert len(holders) == 2, f"PP=2 x M=2: {name} on {len(holders)} ranks"
        check = assert_adam_close if name.endswith("mlp.values") else partial(assert_close, atol=1e-5)
        check(full, gathered(holders, name), f"PP=2 x M=2: {name}")
    # persistent_local: the two groups' memories differ and each comes back to its own group
    values = [n for n in ref_fast if n.endswith("values")]
    assert not torch.equal(ranks[0][6]["fast"][values[0]], ranks[2][6]["fast"][values[0]])
    for r in ranks:
        for name, saved in r[6]["fast"].items():
            assert torch.equal(r[7]["fast"][name], saved), f"persistent_local M=2 reload: {name}"
    exported = run_ranks(export_worker, 1, str(tmp_path / "step"))[0]  # fwpkm-export's loader, one process
    for name in groups[0]["fast"]:
        assert torch.equal(exported[name.removeprefix("0.")], gathered(groups[:2], name)), f"export: {name}"

    # no rank ever held a tensor of the full table's size; a plain M=1 build does (the guard works)
    for rank, r in enumerate(ranks):
        seen, control, (recomputed, plain) = r[4]
        assert not seen, f"rank {rank} allocated full-table-sized tensors: {seen[:5]}"
        assert control, "the allocation guard missed a full table"
        for a, b in zip(plain, recomputed):  # full recompute under M=2 writes once: same steps
            assert abs(a[0] - b[0]) <= RTOL * abs(a[0]) and abs(a[1] - b[1]) <= RTOL * abs(a[1]), (plain, recomputed)


def test_memory_parallel_config_errors_name_the_keys():
    with pytest.raises(ConfigError) as info:
        load_config(None, BASE + ["parallel.memory_parallel=3", "parallel.tp=2", "fwpkm.addr_loss=false",
                                  "fwpkm.backend=triton"])
    text = str(info.value)
    for expected in ("parallel.memory_parallel=3 with parallel.tp=2: fwpkm.d_v=32 must be divisible by "
                     "tp * memory_parallel = 6",
                     "parallel.memory_parallel=3: fwpkm.addr_loss=false",
                     "parallel.memory_parallel=3: fwpkm.backend=triton"):
        assert expected in text, f"{expected!r} missing from:\n{text}"
    with pytest.raises(ConfigError) as info:  # static PKM tables split over M: megatron DDP only, d_v divisible
        load_config(None, BASE + ["parallel.memory_parallel=2", "deepspeed.zero_stage=1", "pkm.d_v=33"])
    text = str(info.value)
    for expected in ("parallel.memory_parallel=2 with pkm.layers and deepspeed.zero_stage=1: the static PKM tables "
                     "are split over the memory group",
                     "parallel.memory_parallel=2 with parallel.tp=1: pkm.d_v=33 must be divisible by "
                     "tp * memory_parallel = 2"):
        assert expected in text, f"{expected!r} missing from:\n{text}"
    problems = layout_problems(load_config(None, BASE + ["parallel.memory_parallel=2"]), 3)
    assert "parallel.memory_parallel=2: must divide the data-parallel size 3" in "\n".join(problems)
    with pytest.raises(ConfigError, match="parallel.memory_parallel=0: must be >= 1"):
        load_config(None, BASE + ["parallel.memory_parallel=0"])
    # the docs' example (docs/parallelism.md, "Growing the memory with the cluster") is a valid layout
    paper = Path(__file__).resolve().parents[2] / "configs" / "paper-112m.yaml"
    scaled = load_config(str(paper), ["fwpkm.num_slots=1048576", "fwpkm.d_v=1024", "parallel.tp=4",
                                      "parallel.memory_parallel=8", "deepspeed.zero_stage=-1",
                                      "optimizer.distributed=true"])
    assert layout_problems(scaled, 32) == []


def test_trainer_at_memory_parallel2_resumes_in_one_process(tiny_run, tmp_path):
    """Losses and the final val loss (2 val batches, each split over the group's DP ranks, the second
    reading what the first wrote) equal one process with the group's micro-batch."""
    import json
    import shutil

    from test_dist_checkpoint import _trainer

    common = ["train.steps=4", "train.eval_batches=2"]
    group = [*common, "parallel.memory_parallel=2", "train.micro_batch_size=2", "train.save_every=2"]
    full, _, _ = run_ranks(_trainer, 2, tiny_run(tmp_path / "m2", *group))[0]  # 2 x 2 = one process's 4
    checkpoints = tmp_path / "single" / "checkpoints"
    shutil.copytree(tmp_path / "m2", tmp_path / "single")
    shutil.rmtree(checkpoints / "step_00000004")
    (checkpoints / "latest").write_text("step_00000002")  # resume from the M=2 run's step 2
    # the plain one-process trainer: dist checkpoint -> its own format; one AdamW over every parameter and
    # the M=2 run's two (dense, PKM table), LR schedule from the dense one
    losses, _, console = run_ranks(_trainer, 1, tiny_run(tmp_path / "single", *common))[0]
    assert "another layout" in console, console
    assert len(full) == len(losses) == 4
    for i, (a, b) in enumerate(zip(full, losses)):
        assert abs(a - b) <= RTOL * abs(a), f"M=2 -> one process: loss {i + 1}: {b} vs {a}"
    val_m2, val_single = (json.loads((tmp_path / name / "summary.json").read_text())["val_loss"]
                          for name in ("m2", "single"))
    assert abs(val_m2 - val_single) <= RTOL * abs(val_single), f"val loss: M=2 {val_m2}, one process {val_single}"
