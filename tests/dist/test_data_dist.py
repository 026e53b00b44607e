"""The data stream on 2 processes (gloo, FileStore): coverage, layout-independent resume, replication.

What is checked against what, in one launch of 2 ranks:
- DP=2: one epoch read by both ranks against the split: no sample twice, every sample but fewer than
  one global batch + num_canonical_nodes (streaming's padding) read, ranks disjoint;
- DP=2 -> DP=1: a DP=2 state saved after k steps, loaded by one process at twice the batch size,
  against the rest of the uninterrupted DP=2 run: each later batch is the union of the two ranks'
  batches of that step (the same samples, so the same global batch);
- DP=1 -> DP=2: the reverse, resumed by both ranks;
- TP=2 inside DP=1 (replication): both ranks read identical batches.
A new multi-rank data property goes into `_rank_main` (one launch costs about 10 s of imports).
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

SEQ_LEN = 16
BATCH = 4          # per rank at DP=2; the DP=1 side reads 2 * BATCH
STEPS = 7          # DP=2 steps saved at (k) before the resume point, then read on
K = 3


def _env(rank: int, world: int) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))


def _rank_main(rank: int, data: str, store_path: str, out: str, dp1_state: dict) -> None:
    torch.set_num_threads(1)
    _env(rank, 2)
    dist.init_process_group("gloo", store=dist.FileStore(store_path, 2), rank=rank, world_size=2)
    from fwpkm_megatron.config import DataConfig
    from fwpkm_megatron.data import build_loader

    cfg = DataConfig(path=data)
    result: dict = {}
    with build_loader(cfg, "train", batch_size=BATCH, seq_len=SEQ_LEN, seed=7, rank=rank, world_size=2) as s:
        epoch = [s.next_batch().tolist() for _ in range(s.batches_per_epoch)]
        result["epoch"], result["num_samples"] = epoch, s.num_samples
        result["batches_per_epoch"] = s.batches_per_epoch
    with build_loader(cfg, "train", batch_size=BATCH, seq_len=SEQ_LEN, seed=7, rank=rank, world_size=2) as s:
        steps = []
        for step in range(STEPS):
            if step == K:
                result["state"] = s.state_dict()
            steps.append(s.next_batch().tolist())
        result["steps"] = steps
    with build_loader(cfg, "train", batch_size=BATCH, seq_len=SEQ_LEN, seed=7, rank=rank, world_size=2) as s:
        s.load_state_dict(dp1_state)  # saved by a DP=1 stream at 2 * BATCH
        result["from_dp1"] = [s.next_batch().tolist() for _ in range(3)]
    with build_loader(cfg, "train", batch_size=BATCH, seq_len=SEQ_LEN, seed=7, rank=0, world_size=1) as s:
        result["replicated"] = [s.next_batch().tolist() for _ in range(3)]  # TP=2: both ranks data rank 0
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


def _rows(batch: list) -> list[tuple]:
    return sorted(map(tuple, batch))


def test_two_rank_loading_matches_single_rank(tmp_path):
    from fwpkm_megatron.config import DataConfig
    from fwpkm_megatron.data import build_loader, prepare_corpus
    from fwpkm_megatron.data.streaming_compat import import_streaming

    corpus = tmp_path / "corpus.jsonl"
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "x", "=", "(", ")", "\n", "中", "0", "1"]
    corpus.write_text("".join(json.dumps({"text": " ".join(rng.choices(words, k=rng.randint(40, 200)))}) + "\n"
                              for _ in range(40)))
    data = tmp_path / "data"
    prepare_corpus(data, inputs=[str(corpus)], vocab_size=300, seq_len=SEQ_LEN, val_fraction=0.1, progress=False)
    cfg = DataConfig(path=str(data))
    with build_loader(cfg, "train", batch_size=2 * BATCH, seq_len=SEQ_LEN, seed=7) as dp1:
        for _ in range(2):
            dp1.next_batch()
        dp1_state = dp1.state_dict()
        dp1_next = [dp1.next_batch().tolist() for _ in range(3)]

    mp.start_processes(_rank_main, args=(str(data), str(tmp_path / "store"), str(tmp_path), dp1_state),
                       nprocs=2, join=True, start_method="spawn")
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))

    # coverage: each sample at most once per epoch, all but the padding tail read, ranks disjoint
    ds = import_streaming().StreamingDataset(local=str(data / "train"), shuffle=False, batch_size=1)
    split = sorted(tuple(ds[i]["tokens"].tolist()) for i in range(ds.num_samples))
    read = sorted(tuple(r) for rank in (r0, r1) for b in rank["epoch"] for r in b)
    assert len(set(read)) == len(read) == r0["batches_per_epoch"] * 2 * BATCH
    assert set(read) <= set(split) and len(split) - len(read) < 2 * BATCH + 8
    assert len(set(split)) == len(split)  # rows are unique, so comparing rows compares samples

    # DP=2 -> DP=1: same global batches after the resume point
    with build_loader(cfg, "train", batch_size=2 * BATCH, seq_len=SEQ_LEN, seed=7) as resumed:
        resumed.load_state_dict(r0["state"])
        for step in range(K, STEPS):
            assert _rows(resumed.next_batch().tolist()) == _rows(r0["steps"][step] + r1["steps"][step]), step
    assert r0["state"] == r1["state"]

    # DP=1 -> DP=2 and replication
    for step in range(3):
        assert _rows(dp1_next[step]) == _rows(r0["from_dp1"][step] + r1["from_dp1"][step])
    assert r0["replicated"] == r1["replicated"]
    with build_loader(cfg, "train", batch_size=BATCH, seq_len=SEQ_LEN, seed=7) as single:
        assert [single.next_batch().tolist() for _ in range(3)] == r0["replicated"]


if not dist.is_available():  # pragma: no cover
    pytest.skip("torch.distributed unavailable", allow_module_level=True)
