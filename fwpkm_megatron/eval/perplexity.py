"""Streaming perplexity with test-time memorization (method notes 5.1, 3.9; App. D.2).

Segments (the prepared val split's samples: seq_len + 1 tokens each, documents in storage order) are
read one after another, batch 1. Each segment is a fresh attention context; only FwPKM memory can carry
information between segments. Fast-weight policies:
    persistent    one memory for the whole stream, never reset (the paper's protocol)
    per_sequence  every segment starts from the exported memory
    frozen        no writes (App. D.2 ablation)
`update_chunk` sets the write cadence C (default: the training chunk). With the training cadence each
segment ends with a flush of its partial chunk, as in training; with `carry_lookahead` the queue
(including the lookahead token) carries into the next segment instead, as in the paper's streaming code.
The model's stored fast weights are restored afterwards.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm


PREFILL_BLOCK = 2048  # tokens per forward call inside a segment (through the KV cache; equal to one pass)


def val_segments(data_path: str | Path, split: str = "val", limit: int | None = None,
                 length: int | None = None) -> Iterator[torch.Tensor]:
    """A split's tokens in storage order (documents in order) as int64 segments.

    length None: the prepared samples, seq_len + 1 tokens each. length L: the samples joined (they are
    consecutive pieces of one token stream) and cut into disjoint segments of L + 1 tokens, so one
    segment can be far longer than the training length (long-context perplexity).
    """
    from fwpkm_megatron.data.layout import read_manifest
    from fwpkm_megatron.data.stream import storage_order_samples

    manifest = read_manifest(data_path)
    if split not in manifest["splits"]:
        raise ValueError(f"{data_path}: has no {split!r} split (has {', '.join(manifest['splits'])})")
    samples = storage_order_samples(Path(data_path) / split, limit if length is None else None)
    if length is None:
        for tokens in samples:
            yield torch.as_tensor(tokens.astype("int64"))
        return
    buffer: list[torch.Tensor] = []
    held, produced = 0, 0
    for tokens in samples:
        if limit is not None and produced >= limit:
            return
        piece = torch.as_tensor(tokens.astype("int64"))
        buffer.append(piece)
        held += piece.numel()
        if held >= length + 1:
            flat = torch.cat(buffer)
            yield flat[:length + 1]
            produced += 1
            buffer, held = [flat[length + 1:]], flat.numel() - length - 1


@torch.no_grad()
def streaming_perplexity(model, segments: Iterable[torch.Tensor], *, policy: str = "persistent",
                         update_chunk: int | None = None, carry_lookahead: bool = False, progress: bool = True,
                         observer=None, desc: str = "ppl", prefill_block: int | None = PREFILL_BLOCK) -> dict[str, Any]:
    """Mean next-token loss of a segment stream under one fast-weight policy.

    Args:
        model: an exported FwPKMForCausalLM (eval mode).
        segments: int64 [L + 1] token tensors (inputs [:-1], labels [1:]).
        observer: optional callable(model) after each segment (memory statistics).
        prefill_block: a segment is read through the KV cache in blocks of this many tokens (rounded
            down to a multiple of the update chunk), so memory stays bounded for long segments.
    Returns:
        {"policy", "update_chunk", "carry_lookahead", "segments", "tokens", "loss", "ppl",
         "loss_by_position": mean loss at each position of a segment}
    """
    device = next(model.parameters()).device
    snapshot = model.snapshot_fast_weights()
    chunk = update_chunk or model.config.fwpkm.get("chunk_size") or 1
    block = None if not prefill_block else max(prefill_block // chunk * chunk, chunk)
    memory = None
    sums: torch.Tensor | None = None
    counts: torch.Tensor | None = None
    total, tokens, n_segments = 0.0, 0, 0
    try:
        for seg in tqdm(segments, desc=desc, disable=not progress, leave=False):
            seg = seg.to(device)
            if memory is None or policy == "per_sequence":
                memory = model.new_memory(1, policy=policy, update_chunk=update_chunk, carry_lookahead=carry_lookahead)
            nll = _segment_nll(model, seg, memory, block or seg.numel(), flush=not carry_lookahead)
            if observer is not None:
                observer(model)
            L = nll.shape[0]
            if sums is None or sums.shape[0] < L:
                grow = L - (0 if sums is None else sums.shape[0])
                sums = torch.cat([sums, torch.zeros(grow, dtype=torch.float64)]) if sums is not None else torch.zeros(L, dtype=torch.float64)
                counts = torch.cat([counts, torch.zeros(grow, dtype=torch.float64)]) if counts is not None else torch.zeros(L, dtype=torch.float64)
            sums[:L] += nll
            counts[:L] += 1
            total += float(nll.sum())
            tokens += L
            n_segments += 1
    finally:
        model.restore_fast_weights(snapshot)
    if tokens == 0:
        raise ValueError("no segments to evaluate")
    loss = total / tokens
    return {"policy": policy, "update_chunk": update_chunk or model.config.fwpkm.get("chunk_size"),
            "carry_lookahead": carry_lookahead, "segments": n_segments, "tokens": tokens, "loss": loss,
            "ppl": math.exp(min(loss, 80.0)), "loss_by_position": (sums / counts.clamp_min(1)).tolist()}


def _segment_nll(model, seg: torch.Tensor, memory, block: int, *, flush: bool) -> torch.Tensor:
    """Per-token loss [L] of one segment (a fresh attention context), read in blocks through the KV cache."""
    ids, labels = seg[None, :-1], seg[None, 1:]
    L = ids.shape[1]
    cache, parts = None, []
    for a in range(0, L, block):
        b = min(a + block, L)
        out = model(ids[:, a:b], cache=cache, memory=memory, use_cache=True, flush_memory=flush and b == L,
                    prefill_block=0)
        cache = out.cache
        parts.append(F.cross_entropy(out.logits[0].float(), labels[0, a:b], reduction="none").double().cpu())
    return torch.cat(parts)


def plot_loss_curves(results: dict[str, dict[str, Any]], path: str | Path, title: str = "loss by position") -> Path:
    """One PNG: mean loss at each segment position, one line per result (e.g. per policy)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, res in results.items():
        ax.plot(res["loss_by_position"], label=f"{name} (ppl {res['ppl']:.2f})", linewidth=1)
    ax.set_xlabel("position in segment")
    ax.set_ylabel("mean next-token loss (nats)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
