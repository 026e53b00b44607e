"""Parallelism applied in one place (style.md 9): `parallelize(chunks, groups, run)` after the build.

Order: memory-table column sharding over the TP group (megatron's own TP linears come from the spec),
then the recompute-safe state handling is already inside the FwPKM block (it needs no group).
`sync_fast_weights` keeps the `persistent` memories of data-parallel replicas identical.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from fwpkm_megatron.parallel.groups import ParallelGroups
from fwpkm_megatron.parallel.sharding import apply_memory_sharding


def parallelize(chunks: list[nn.Module], groups: ParallelGroups, run) -> None:
    """Apply every parallel transformation our code owns to this rank's model chunks (in place).

    Under `persistent_local` with DP > 1 each fast-weight state is marked as its replica's own
    (`replica = (dp_rank, dp)`), so checkpoints keep one memory per DP rank (parallel/dist_checkpoint.py).
    """
    from fwpkm_megatron.config import fast_weight_policy
    from fwpkm_megatron.memory import fast_weight_states

    for chunk in chunks:
        apply_memory_sharding(chunk, groups.tp_group, groups.tp_rank, groups.tp)
        if fast_weight_policy(run) == "persistent_local" and groups.dp > 1:
            for state in fast_weight_states(chunk).values():
                state.replica = (groups.dp_rank, groups.dp)


def fast_weight_tensors(chunks: list[nn.Module]) -> list[tuple[object, str]]:
    """(FastWeightState, buffer name) for every fast-weight buffer of the chunks, in a fixed order."""
    from fwpkm_megatron.memory import fast_weight_states

    out = []
    for chunk in chunks:
        for _, state in sorted(fast_weight_states(chunk).items()):
            out += [(state, name) for name, _ in state.named_buffers(recurse=False)]  # FwPKM: keys, values
    return out


def fast_weight_sync_bytes(chunks: list[nn.Module]) -> int:
    """Bytes each rank contributes to one `sync_fast_weights` all-reduce (ring traffic is ~2x this)."""
    return sum(getattr(s, n).numel() * getattr(s, n).element_size() for s, n in fast_weight_tensors(chunks))


@torch.no_grad()
def sync_fast_weights(chunks: list[nn.Module], groups: ParallelGroups, policy: str) -> int:
    """Average the fast-weight states over the DP group (call at each optimizer-step boundary).

    Under `persistent` every replica starts a step from the same state, so the average of the states is
    the start state plus the average of the replicas' accumulated writes: the replicas end every step
    identical. `persistent_local` (the paper code's per-rank memories) and `per_sequence` (no shared
    writes) are not synchronised. Returns the bytes this rank all-reduced (0 when nothing was synced).
    """
    if policy != "persistent" or groups.dp_group is None:
        return 0
    tensors = fast_weight_tensors(chunks)
    if not tensors:
        return 0
    flat = torch.cat([getattr(s, n).reshape(-1) for s, n in tensors])  # fp32; one collective per step
    dist.all_reduce(flat, group=groups.dp_group)
    flat /= groups.dp
    offset = 0
    for state, name in tensors:
        current = getattr(state, name)
        piece = flat[offset:offset + current.numel()].view_as(current)
        offset += current.numel()
        setattr(state, name, piece.clone())  # rebind, as commit() does for keys
    return flat.numel() * flat.element_size()
