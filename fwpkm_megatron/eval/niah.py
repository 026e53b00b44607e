"""Needle-in-a-haystack with n-iter reads and greedy decoding (method notes 3.9 and 5.2).

Protocol per record and n in `n_iters`:
    memory = fresh (per_sequence, default) or carried over from the previous record (carry_over: the
             paper's protocol, one memory per (length, n) setting starting from the exported state)
    n - 1 pre-reads of `context` alone, each with a fresh attention context, one memory write per read
    final read of `context + prompt`, then the write (the first answer token is read before it)
    greedy decoding of the answer through the KV cache; no writes while decoding
The update chunk is "one read": the queue never fills inside a read and each read ends with a flush.
A record counts as correct when the decoded text, stripped, starts with `answer` (exact match of the
6 digits). Records are JSON objects with `context`, `prompt`, `answer` (and optionally `length`,
`depths` + `target_index` or `depth`), as written by `fwpkm-prep niah` (fwpkm_megatron.data.niah), or
generated on the fly from a prepared corpus with that module.
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

ONE_READ = 1 << 62   # update chunk that never fills within a read; reads end with a flush
DEPTH_BINS = 5


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """NIAH records from a JSON Lines file; each needs `context`, `prompt` and `answer`."""
    records = []
    for lineno, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        rec = json.loads(line)
        missing = [k for k in ("context", "prompt", "answer") if k not in rec]
        if missing:
            raise ValueError(f"{path}:{lineno}: record lacks {missing}")
        records.append(rec)
    return records


def generate_records(data_path: str | Path, *, lengths, per_length: int, seed: int = 0, num_needles: int = 5,
                     split: str = "val") -> list[dict[str, Any]]:
    """Records generated on the fly from a prepared corpus (the data package's NIAH generator)."""
    from fwpkm_megatron.data import load_tokenizer
    from fwpkm_megatron.data.niah import haystack_ids, make_record

    tok = load_tokenizer(data_path)
    hay = haystack_ids(data_path, split)
    return [make_record(tok, hay, length=L, index=i, seed=seed, num_needles=num_needles,
                        source={"data": str(data_path), "split": split})
            for L in lengths for i in range(per_length)]


def _depth(rec: dict[str, Any]) -> float | None:
    if "depths" in rec and "target_index" in rec:
        return float(rec["depths"][rec["target_index"]])
    return float(rec["depth"]) if "depth" in rec else None


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def evaluate_niah(model, tokenizer, records: list[dict[str, Any]], *, n_iters=(1, 2), carry_over: bool = False,
                  max_new_tokens: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Exact-match accuracy per n (reads), per length and per depth bin, and every sample's output."""
    device = next(model.parameters()).device
    snapshot = model.snapshot_fast_weights()
    samples = []
    try:
        for n in n_iters:
            if n < 1:
                raise ValueError(f"n_iters: {n} < 1 (1 = the plain NIAH, one read)")
            memory = None
            for rec in tqdm(records, desc=f"niah {n}-iter", disable=not progress, leave=False):
                if memory is None or not carry_over:
                    memory = model.new_memory(1, policy="per_sequence", update_chunk=ONE_READ)
                ctx = torch.tensor([_encode(tokenizer, rec["context"])], device=device)
                final = torch.tensor([_encode(tokenizer, rec["context"] + rec["prompt"])], device=device)
                for _ in range(n - 1):  # pre-reads: fresh attention context, one write per read
                    model(ctx, memory=memory, use_cache=False, flush_memory=True)
                out = model(final, memory=memory, use_cache=True, flush_memory=True)
                budget = max_new_tokens or len(_encode(tokenizer, " " + str(rec["answer"]))) + 2
                generated = []
                for step in range(budget):
                    token = out.logits[:, -1].argmax(-1, keepdim=True)
                    generated.append(int(token))
                    if step + 1 < budget:
                        out = model(token, cache=out.cache, use_cache=True)
                text = tokenizer.decode(generated, skip_special_tokens=True)
                samples.append({"id": rec.get("id"), "n_iter": n, "length": rec.get("length", final.shape[1]),
                                "depth": _depth(rec), "answer": str(rec["answer"]), "output": text,
                                "correct": text.strip().startswith(str(rec["answer"]))})
    finally:
        model.restore_fast_weights(snapshot)
    return {"n_iters": list(n_iters), "carry_over": carry_over, "samples": samples, **summarize(samples)}


def summarize(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """accuracy[n], accuracy_by_length[n][L], accuracy_by_length_depth[n][L][bin] (bin = depth quintile)."""
    groups: dict[tuple, list[bool]] = defaultdict(list)
    for s in samples:
        n, L = str(s["n_iter"]), str(s["length"])
        b = None if s["depth"] is None else min(int(s["depth"] * DEPTH_BINS), DEPTH_BINS - 1)
        for key in ((n,), (n, L), (n, L, str(b))):
            groups[key].append(s["correct"])
    acc = {k: sum(v) / len(v) for k, v in groups.items()}
    out: dict[str, Any] = {"accuracy": {}, "accuracy_by_length": {}, "accuracy_by_length_depth": {}}
    for key, value in sorted(acc.items()):
        if len(key) == 1:
            out["accuracy"][key[0]] = value
        elif len(key) == 2:
            out["accuracy_by_length"].setdefault(key[0], {})[key[1]] = value
        else:
            out["accuracy_by_length_depth"].setdefault(key[0], {}).setdefault(key[1], {})[key[2]] = value
    return out


def plot_niah(result: dict[str, Any], path: str | Path) -> Path:
    """PNG: a length x depth heatmap per n, and accuracy vs number of reads per length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    ns = [str(n) for n in result["n_iters"]]
    lengths = sorted({str(s["length"]) for s in result["samples"]}, key=int)
    fig, axes = plt.subplots(1, len(ns) + 1, figsize=(3.2 * (len(ns) + 1), 3.2), squeeze=False)
    for ax, n in zip(axes[0], ns):
        grid = np.full((len(lengths), DEPTH_BINS), np.nan)
        for i, L in enumerate(lengths):
            for b, value in result["accuracy_by_length_depth"].get(n, {}).get(L, {}).items():
                if b != "None":
                    grid[i, int(b)] = value
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="lower")
        ax.set_xticks(range(DEPTH_BINS), [f"{(b + .5) / DEPTH_BINS:.1f}" for b in range(DEPTH_BINS)])
        ax.set_yticks(range(len(lengths)), lengths)
        ax.set_xlabel("needle depth")
        ax.set_ylabel("context tokens")
        ax.set_title(f"{n}-iter: acc {result['accuracy'][n]:.2f}")
    fig.colorbar(im, ax=axes[0][len(ns) - 1])
    ax = axes[0][-1]
    for L in lengths:
        ax.plot([int(n) for n in ns], [result["accuracy_by_length"][n].get(L, np.nan) for n in ns], marker="o", label=L)
    ax.set_xlabel("reads (n-iter)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.05, 1.05)
    ax.legend(title="length")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
