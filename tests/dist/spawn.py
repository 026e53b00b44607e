"""Run a function on N forked ranks of a gloo world (megatron already imported by the parent).

`run_ranks(fn, nproc, *args)` forks `nproc` children that each see RANK, WORLD_SIZE, MASTER_ADDR and
MASTER_PORT, run `fn(rank, *args)` with one intra-op thread, and return what `fn` returned, as a list
indexed by rank. Forking from a parent that already imported megatron-core saves the ~4 s import per
process (cpu-stack-notes.md, Q6); an exception in any rank fails the call with that rank's traceback.
"""
from __future__ import annotations

import os
import pickle
import socket
import tempfile
import traceback

import torch
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(index, fn, nproc, port, out_dir, args):
    os.environ.update(RANK=str(index), WORLD_SIZE=str(nproc), LOCAL_RANK=str(index),
                      LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    _forget_parent_state()
    try:
        result = ("ok", fn(index, *args))
    except BaseException:
        result = ("error", traceback.format_exc())
    with open(os.path.join(out_dir, f"{index}.pkl"), "wb") as f:
        pickle.dump(result, f)


def _forget_parent_state():
    """Drop process-group and megatron state inherited through fork (it belongs to the parent)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:
            pass


def run_ranks(fn, nproc: int, *args):
    """fn(rank, *args) on nproc forked gloo ranks; returns [result of rank 0, ...].

    Forking a parent that holds a live process group (an earlier single-process test made one) copies
    gloo's threads in an undefined state and crashes the children; such a parent spawns fresh ones.
    """
    import torch.distributed as dist

    method = "spawn" if dist.is_initialized() else "fork"
    with tempfile.TemporaryDirectory(prefix="fwpkm_ranks_") as out_dir:
        ctx = mp.start_processes(_child, args=(fn, nproc, _free_port(), out_dir, args), nprocs=nproc,
                                 join=False, start_method=method)
        while not ctx.join():
            pass
        outcomes = []
        for index in range(nproc):
            with open(os.path.join(out_dir, f"{index}.pkl"), "rb") as f:
                outcomes.append(pickle.load(f))
        failures = [f"rank {i} of {nproc} failed:\n{value}" for i, (status, value) in enumerate(outcomes)
                    if status != "ok"]
        if failures:
            raise AssertionError("\n".join(failures))
        return [value for _, value in outcomes]
