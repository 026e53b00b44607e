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


def val_segments(data_path: str | Path, split: str = "val", limit: int | None = None) -> Iterator[torch.Tensor]:
    """The split's samples in storage order (documents in order), int64 [seq_len + 1] each."""
    from fwpkm_megatron.data.layout import read_manifest
    from fwpkm_megatron.data.stream import storage_order_samples

    read_manifest(data_path)
    for tokens in storage_order_samples(Path(data_path) / split, limit):
        yield torch.as_tensor(tokens.astype("int64"))


@torch.no_grad()
def streaming_perplexity(model, segments: Iterable[torch.Tensor], *, policy: str = "persistent",
                         update_chunk: int | None = None, carry_lookahead: bool = False, progress: bool = True,
                         observer=None, desc: str = "ppl") -> dict[str, Any]:
    """Mean next-token loss of a segment stream under one fast-weight policy.

    Args:
        model: an exported FwPKMForCausalLM (eval mode).
        segments: int64 [L + 1] token tensors (inputs [:-1], labels [1:]).
        observer: optional callable(model) after each segment (memory statistics).
    Returns:
        {"policy", "update_chunk", "carry_lookahead", "segments", "tokens", "loss", "ppl",
         "loss_by_position": mean loss at each position of a segment}
    """
    device = next(model.parameters()).device
    snapshot = model.snapshot_fast_weights()
    memory = None
    sums: torch.Tensor | None = None
    counts: torch.Tensor | None = None
    total, tokens, n_segments = 0.0, 0, 0
    try:
        for seg in tqdm(segments, desc=desc, disable=not progress, leave=False):
            seg = seg.to(device)
            ids, labels = seg[None, :-1], seg[None, 1:]
            if memory is None or policy == "per_sequence":
                memory = model.new_memory(1, policy=policy, update_chunk=update_chunk, carry_lookahead=carry_lookahead)
            logits = model(ids, memory=memory, use_cache=False, flush_memory=not carry_lookahead).logits
            nll = F.cross_entropy(logits[0].float(), labels[0], reduction="none").double().cpu()
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
