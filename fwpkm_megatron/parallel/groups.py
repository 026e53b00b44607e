"""Process groups and megatron's model-parallel state: one process, or a TP x PP x DP world.

`init_single_process(seed)` is what tests, tools and the single-process trainer call before building a
model: a world-size-1 group, gloo on CPU and NCCL with CUDA (rendezvous through an in-memory HashStore:
no port to race for and no file to leave behind), megatron's `parallel_state` with TP = PP = 1, and
megatron's RNG tracker seeded from `seed`. `teardown()` undoes it, so tests can start over.

`init_distributed(parallel, seed)` is the multi-process counterpart: it joins the world named by the
launcher's environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), checks the layout, builds megatron's
groups with data parallel outermost (order tp-cp-ep-pp-dp, so the consecutive ranks of one DP replica
share a data rank, as the streaming loader expects), adds the memory groups of `parallel.memory_parallel`
(`with_memory_groups`) and returns a `ParallelGroups`. Code outside
`parallel/` receives that dataclass and never reads megatron's `parallel_state` itself.
"""
from __future__ import annotations

import os
from datetime import timedelta
from dataclasses import dataclass

import torch.distributed as dist

from fwpkm_megatron.config import ParallelConfig, layout_problems
from fwpkm_megatron.parallel import mcore_cpu
from fwpkm_megatron.training.device import dist_backend, select_device


class LayoutError(ValueError):
    """The parallel layout does not fit the world size or the model; the message names the numbers."""


@dataclass(frozen=True)
class ParallelGroups:
    """This rank's place in the TP x PP x DP layout and the groups each axis talks over.

    Groups are None on an axis of size 1, so helpers can skip communication with `if group is None`.
    """

    world_size: int
    rank: int
    tp: int
    pp: int
    vpp: int
    dp: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    tp_group: object | None
    pp_group: object | None
    dp_group: object | None
    model_group: object | None      # TP x PP: one full model replica (grad norms sum over it)
    embedding_group: object | None  # first and last pipeline stage (tied embedding gradients)
    # memory parallel: DP is split into DP/M memory groups of M consecutive DP ranks sharing FwPKM tables
    mp: int = 1                     # M
    mp_rank: int = 0                # this rank's place in its memory group (dp_rank % M)
    mp_group: object | None = None  # the M ranks of the memory group with this TP rank and stage
    mem_sync_group: object | None = None  # the DP/M ranks holding this rank's table columns in the other groups
    # M > 1: the TP x PP x M ranks of this memory group (every column shard of every stage once: grad norms of
    # memory-sharded parameters sum over it); the sync group above is then a group even when it has one rank
    mem_model_group: object | None = None

    @property
    def num_mem_groups(self) -> int:
        return self.dp // self.mp

    @property
    def mem_group_index(self) -> int:
        return self.dp_rank // self.mp

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    def describe(self) -> str:
        return (f"{self.world_size} processes (TP={self.tp}, PP={self.pp}"
                f"{f', VPP={self.vpp}' if self.vpp > 1 else ''}, DP={self.dp}"
                f"{f', memory groups of M={self.mp}' if self.mp > 1 else ''})")


def init_distributed(parallel: ParallelConfig, seed: int, run=None) -> ParallelGroups:
    """Join the launcher's world and build megatron's TP/PP/DP groups for `parallel`.

    Args:
        parallel: the layout (tp, pp, vpp); DP = world size / (tp * pp).
        seed: seeds megatron's RNG tracker (per TP rank, as megatron does).
        run: the RunConfig, to check the model against the layout (named numbers) when given.
    Raises:
        LayoutError: the world size is not divisible by tp * pp, or the model does not fit the layout.
    """
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    mcore_cpu.apply()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    problems = layout_problems(run, world_size) if run is not None else []
    if world_size % (parallel.tp * parallel.pp) and not problems:
        problems.append(f"world size {world_size}: must be divisible by parallel.tp * parallel.pp = "
                        f"{parallel.tp} * {parallel.pp} = {parallel.tp * parallel.pp}")
    if problems:
        raise LayoutError("invalid parallel layout:\n  " + "\n  ".join(problems))
    if world_size == 1 and not dist.is_initialized():
        init_single_process(seed)
    elif not dist.is_initialized():
        select_device()  # cuda:LOCAL_RANK when CUDA is present (the one device rule, training/device.py)
        dist.init_process_group(backend=dist_backend(parallel.dist_backend), init_method="env://",
                                timeout=timedelta(minutes=parallel.collective_timeout_minutes))
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tp, pipeline_model_parallel_size=parallel.pp,
        virtual_pipeline_model_parallel_size=parallel.vpp if parallel.vpp > 1 else None,
        order="tp-cp-ep-pp-dp")
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return with_memory_groups(current_groups(parallel.vpp), parallel.memory_parallel)


def with_memory_groups(groups: ParallelGroups, mp: int) -> ParallelGroups:
    """Add the memory-parallel groups (collective: every rank creates every group, in one order).

    World ranks follow megatron's order tp-cp-ep-pp-dp: rank = tp_rank + tp * (pp_rank + pp * dp_rank).
    Memory group g of a (TP rank, stage) holds DP ranks [g*M, (g+1)*M); the sync group of a column shard
    holds the DP ranks with the same place in every memory group (the data-parallel group of the parameters
    sharded over the memory group, so it exists even with one rank); the memory-model group holds every
    (TP rank, stage, place) of memory group g.
    """
    import dataclasses

    if mp == 1:
        return dataclasses.replace(groups, mem_sync_group=groups.dp_group)  # every DP rank is its own group
    tp, pp, dp = groups.tp, groups.pp, groups.dp

    def world(t, p, d):
        return t + tp * (p + pp * d)

    if groups.dp_group is not None:
        mine = dist.get_process_group_ranks(groups.dp_group)
        expected = [world(groups.tp_rank, groups.pp_rank, d) for d in range(dp)]
        if mine != expected:
            raise LayoutError(f"megatron's data-parallel group {mine} is not {expected} (order tp-cp-ep-pp-dp)")
    mp_group = sync_group = model_group = None
    for t in range(tp):
        for p in range(pp):
            for g in range(dp // mp):
                ranks = [world(t, p, d) for d in range(g * mp, (g + 1) * mp)]
                handle = dist.new_group(ranks)
                if groups.rank in ranks:
                    mp_group = handle
            for j in range(mp):
                ranks = [world(t, p, d) for d in range(j, dp, mp)]
                handle = dist.new_group(ranks)
                if groups.rank in ranks:
                    sync_group = handle
    for g in range(dp // mp):
        ranks = sorted(world(t, p, d) for t in range(tp) for p in range(pp) for d in range(g * mp, (g + 1) * mp))
        handle = dist.new_group(ranks)
        if groups.rank in ranks:
            model_group = handle
    return dataclasses.replace(groups, mp=mp, mp_rank=groups.dp_rank % mp, mp_group=mp_group,
                               mem_sync_group=sync_group, mem_model_group=model_group)


def current_groups(vpp: int = 1) -> ParallelGroups:
    """The ParallelGroups of megatron's initialised parallel state."""
    from megatron.core import parallel_state as ps

    tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
    dp = ps.get_data_parallel_world_size()

    def group(size, getter):
        return getter() if size > 1 else None

    return ParallelGroups(
        world_size=dist.get_world_size(), rank=dist.get_rank(), tp=tp, pp=pp, vpp=vpp, dp=dp,
        tp_rank=ps.get_tensor_model_parallel_rank(), pp_rank=ps.get_pipeline_model_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(),
        tp_group=group(tp, ps.get_tensor_model_parallel_group),
        pp_group=group(pp, ps.get_pipeline_model_parallel_group),
        dp_group=group(dp, ps.get_data_parallel_group),
        model_group=group(tp * pp, ps.get_model_parallel_group),
        embedding_group=group(pp, ps.get_embedding_group))

_owns_process_group = False     # True when init_single_process started torch.distributed


def init_single_process(seed: int) -> None:
    """Make this process a world of one (gloo on CPU, NCCL with CUDA; on the rank's device), megatron parallel
    state (TP=PP=1) and a seeded RNG tracker.

    Each step is skipped when already done (e.g. torch.distributed started by torchrun), so calling it
    twice is harmless; the RNG tracker is reseeded every call.

    Args:
        seed: base seed for `model_parallel_cuda_manual_seed` (also seeds the default torch generator).
    """
    global _owns_process_group
    from megatron.core import parallel_state, tensor_parallel

    mcore_cpu.apply()
    select_device()
    if not dist.is_initialized():  # a world of one rendezvous with itself: an in-memory store, no file
        dist.init_process_group(backend=dist_backend(), store=dist.HashStore(), rank=0, world_size=1)  # NCCL with CUDA
        _owns_process_group = True
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def teardown() -> None:
    """Destroy megatron's parallel state and, if `init_single_process` started it, the process group."""
    global _owns_process_group
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if _owns_process_group and dist.is_initialized():
        dist.destroy_process_group()
    _owns_process_group = False
