"""Process groups and megatron's model-parallel state for one process.

`init_single_process(seed)` is what tests, tools and the single-process trainer call before building a
model: a world-size-1 gloo group (rendezvous through a FileStore in a temporary directory, so parallel
test runs never race for a port), megatron's `parallel_state` with TP = PP = 1, and megatron's RNG
tracker seeded from `seed`. `teardown()` undoes it, so tests can start over.
"""
from __future__ import annotations

import shutil
import tempfile

import torch
import torch.distributed as dist

from fwpkm_megatron.parallel import mcore_cpu

_store_dir: str | None = None   # FileStore directory created here; removed by teardown()
_owns_process_group = False     # True when init_single_process started torch.distributed


def init_single_process(seed: int) -> None:
    """Make this process a world of one: gloo group, megatron parallel state (TP=PP=1), seeded RNG tracker.

    Each step is skipped when already done (e.g. torch.distributed started by torchrun), so calling it
    twice is harmless; the RNG tracker is reseeded every call.

    Args:
        seed: base seed for `model_parallel_cuda_manual_seed` (also seeds the default torch generator).
    """
    global _store_dir, _owns_process_group
    from megatron.core import parallel_state, tensor_parallel

    mcore_cpu.apply()
    if not dist.is_initialized():
        _store_dir = tempfile.mkdtemp(prefix="fwpkm_store_")
        store = dist.FileStore(f"{_store_dir}/store", 1)
        dist.init_process_group(backend="gloo", store=store, rank=0, world_size=1)
        _owns_process_group = True
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def teardown() -> None:
    """Destroy megatron's parallel state and, if `init_single_process` started it, the process group."""
    global _store_dir, _owns_process_group
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if _owns_process_group and dist.is_initialized():
        dist.destroy_process_group()
    _owns_process_group = False
    if _store_dir is not None:
        shutil.rmtree(_store_dir, ignore_errors=True)
        _store_dir = None
