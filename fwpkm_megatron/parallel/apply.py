"""Parallelism applied in one place (style.md 9): `parallelize(chunks, groups, run)` after the build.

Order: the memory layers get their collectives (TP group, memory-group exchange) and their TP slices of
slow weights; their tables were built as this rank's TP x M column slice (`table_shards`); the
recompute-safe state handling is already inside the FwPKM block (it needs no group).
`sync_fast_weights` keeps the `persistent` memories of the memory groups identical.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from fwpkm_megatron.parallel.groups import ParallelGroups
from fwpkm_megatron.parallel.sharding import GroupExchange, apply_memory_sharding


def parallelize(chunks: list[nn.Module], groups: ParallelGroups, run) -> None:
    """Apply every parallel transformation our code owns to this rank's model chunks (in place).

    Each fast-weight state and static PKM table learns its memory group (index, count). Under
    `persistent_local` with more than one group each state is marked as its group's own (`replica`), so
    checkpoints keep one memory per group (parallel/dist_checkpoint.py); under `persistent` the states remember their written rows
    for the sparse sync between groups.
    """
    from fwpkm_megatron.config import fast_weight_policy
    from fwpkm_megatron.memory import PKMMLP, FwMLPState, fast_weight_states

    policy, count = fast_weight_policy(run), groups.num_mem_groups
    for chunk in chunks:
        exchange = GroupExchange(groups.mp_group, groups.mp, groups.mp_rank) if groups.mp > 1 else None
        apply_memory_sharding(chunk, groups, exchange)
        for pkm in (m for m in chunk.modules() if isinstance(m, PKMMLP)):  # its table: one copy per group
            pkm.group = (groups.mem_group_index, count)
        for state in fast_weight_states(chunk).values():
            if isinstance(state, FwMLPState):  # dense FwMLP: one copy per DP rank (memory_parallel is 1)
                if policy == "persistent_local" and groups.dp > 1:
                    state.replica = (groups.dp_rank, groups.dp)
                continue
            state.group = (groups.mem_group_index, count)
            if policy == "persistent_local" and count > 1:
                state.replica = state.group
            state.track_writes = policy == "persistent" and count > 1


def exchanges(chunks: list[nn.Module]) -> list[GroupExchange]:
    """The memory-group exchanges of the chunks' FwPKM layers (their byte counters)."""
    from fwpkm_megatron.memory import fwpkm_blocks

    found = {id(b.comm.exchange): b.comm.exchange for c in chunks for b in fwpkm_blocks(c)
             if b.comm.exchange is not None}  # one per chunk, shared by its layers
    return list(found.values())


def fast_weight_states_sorted(chunks: list[nn.Module]) -> list:
    from fwpkm_megatron.memory import fast_weight_states

    return [state for chunk in chunks for _, state in sorted(fast_weight_states(chunk).items())]


def fast_weight_sync_bytes(chunks: list[nn.Module], groups: ParallelGroups | None = None) -> int:
    """Upper bound of the bytes one `sync_fast_weights` sends per rank: every row written (ring all-gather
    of int64 row ids and fp32 columns to G-1 groups) plus the keys' all-reduce. Real steps send the rows
    they wrote (`train/fast_weight_sync_bytes`)."""
    from fwpkm_megatron.memory import FwMLPState

    n = 1 if groups is None else groups.num_mem_groups
    total = 0
    for state in fast_weight_states_sorted(chunks):
        if isinstance(state, FwMLPState):  # dense all-reduce of every buffer
            total += sum(b.numel() * 4 for b in state.buffers()) * 2 * (n - 1) // max(n, 1)
            continue
        rows, cols = state.values.shape
        total += rows * (8 + 4 * cols) * (n - 1) + state.keys.numel() * 4 * 2 * (n - 1) // max(n, 1)
    return total


@torch.no_grad()
def sync_fast_weights(chunks: list[nn.Module], groups: ParallelGroups, policy: str) -> int:
    """Make the memory groups' `persistent` states equal again (call at each optimizer-step boundary).

    Every group starts a step from the same state S0 and writes its own rows. Afterwards every group
    holds S0 + (sum over groups of their value deltas) / G on the rows any group wrote (and untouched
    rows stay S0), i.e. the average of the groups' states, computed from the written rows alone: each
    rank all-gathers (rows, new - old) of its column shard from the same shard of every other group.
    Keys (small, replicated) are averaged densely. `persistent_local` (one memory per group) and
    `per_sequence` (no shared writes) are not synchronised. Returns the bytes this rank sent.
    """
    group, count = groups.mem_sync_group if groups.mp > 1 else groups.dp_group, groups.num_mem_groups
    if policy != "persistent" or group is None or count == 1:
        return 0
    from fwpkm_megatron.memory import FwMLPState

    sent = 0
    for state in fast_weight_states_sorted(chunks):
        if isinstance(state, FwMLPState):  # a dense fast MLP: every weight changes, average it whole
            sent += _average_dense(state, group, count)
            continue
        sent += _sync_rows(state, group, count)
        keys = state.keys.clone()
        dist.all_reduce(keys, group=group)
        state.keys = keys / count  # rebind, as commit() does
        sent += keys.numel() * keys.element_size() * 2 * (count - 1) // count
    return sent


def _average_dense(state, group, count: int) -> int:
    """Average every buffer of a dense fast-weight state over the group (one all-reduce)."""
    buffers = list(state.named_buffers(recurse=False))
    flat = torch.cat([b.reshape(-1) for _, b in buffers])  # fp32
    dist.all_reduce(flat, group=group)
    flat /= count
    offset = 0
    for name, current in buffers:
        setattr(state, name, flat[offset:offset + current.numel()].view_as(current).clone())  # rebind
        offset += current.numel()
    return flat.numel() * flat.element_size() * 2 * (count - 1) // count


def _sync_rows(state, group, count: int) -> int:
    """Sparse all-gather of this step's written rows and their deltas; apply the groups' mean delta."""
    values, rows = state.values, state.written_rows
    delta = values[rows] - state.written_base                        # [U, cols]
    sizes = [torch.zeros(1, dtype=torch.long, device=values.device) for _ in range(count)]
    dist.all_gather(sizes, torch.tensor([rows.numel()], device=values.device), group=group)
    sizes = [int(n) for n in sizes]
    most = max(sizes)
    if most == 0:
        return 0
    pad_rows = torch.full((most,), -1, dtype=torch.long, device=values.device)
    pad_rows[:rows.numel()] = rows
    pad_delta = values.new_zeros(most, values.shape[1])
    pad_delta[:rows.numel()] = delta
    all_rows = [torch.empty_like(pad_rows) for _ in range(count)]
    all_delta = [torch.empty_like(pad_delta) for _ in range(count)]
    dist.all_gather(all_rows, pad_rows, group=group)
    dist.all_gather(all_delta, pad_delta, group=group)
    union = torch.unique(torch.cat([r[:n] for r, n in zip(all_rows, sizes)]))
    total = values.new_zeros(union.numel(), values.shape[1])
    for r, d, n in zip(all_rows, all_delta, sizes):  # group by group: the same sum, bit for bit, everywhere
        total[torch.searchsorted(union, r[:n])] += d[:n]            # a group's rows are unique
    start = values[union]                                             # S0, except this rank's rows
    if rows.numel():
        start[torch.searchsorted(union, rows)] = state.written_base  # S0 exactly, on every group
    values.index_copy_(0, union, start + total / count)
    state.clear_written()
    return (pad_rows.numel() * 8 + pad_delta.numel() * 4) * (count - 1) + 8 * (count - 1)
