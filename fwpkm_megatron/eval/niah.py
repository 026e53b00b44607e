"""Needle-in-a-haystack with n-iter reads and greedy decoding (method notes 3.9 and 5.2).

Protocol per record and n in `n_iters`:
    memory = fresh (per_sequence, default) or carried over from the previous record of the same length
             (carry_over: the paper's protocol, one memory per (length, n) setting starting from the
             exported state)
    n - 1 pre-reads of `context` alone, each with a fresh attention context, one memory write per read
    final read of `context + prompt`, then the write (the first answer token is read before it)
    greedy decoding of the answer through the KV cache, reading the memory read-only: the answer
             tokens are never queued or written (nothing leaks into the next record's first write)
Reads go through the KV cache in blocks of `prefill_block` tokens, so a 128K-token read needs memory
for one block's activations, the queue of the read's memory inputs and (full attention) its keys.
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
PREFILL_BLOCK = 2048  # tokens per block of a long read through the KV cache (bounded memory, equal to one pass)


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """NIAH records from a JSON Lines file; each needs `context`, `prompt` and `answer`.

    Raises:
        ValueError: naming the file and line of a line that is not JSON or lacks a field.
    """
    records = []
    for lineno, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{lineno}: not JSON ({exc.msg} at column {exc.colno})") from None
        missing = [k for k in ("context", "prompt", "answer") if not isinstance(rec, dict) or k not in rec]
        if missing:
            raise ValueError(f"{path}:{lineno}: record lacks {missing}")
        records.append(rec)
    return records


def generate_records(data_path: str | Path, *, lengths, per_length: int, seed: int = 0, num_needles: int = 5,
                     split: str = "val") -> list[dict[str, Any]]:
    """Records generated on the fly from a prepared corpus: exactly those `fwpkm-prep niah` writes."""
    from fwpkm_megatron.data.niah import iter_records

    return list(iter_records(data_path, lengths=lengths, per_length=per_length, seed=seed, split=split,
                             num_needles=num_needles))


def _depth(rec: dict[str, Any]) -> float | None:
    if "depths" in rec and "target_index" in rec:
        return float(rec["depths"][rec["target_index"]])
    return float(rec["depth"]) if "depth" in rec else None


def _encode(tokenizer, text: str) -> list[int]:
    """Token ids as the record generator counts them: text that spells a special token stays text."""
    backend = tokenizer.backend_tokenizer
    saved = backend.encode_special_tokens
    backend.encode_special_tokens = True
    try:
        return backend.encode(text, add_special_tokens=False).ids
    finally:
        backend.encode_special_tokens = saved


def _key(rec: dict[str, Any], index: int, n: int) -> str:
    return f"{rec.get('id', index)}|{n}"


def _load_partial(path: Path | None) -> dict[str, dict[str, Any]]:
    """Samples already done by an interrupted run (one JSON object per line; a torn last line is dropped)."""
    done: dict[str, dict[str, Any]] = {}
    if path is None or not path.is_file():
        return done
    for line in path.read_text().splitlines():
        try:
            sample = json.loads(line)
        except json.JSONDecodeError:
            break
        done[sample["key"]] = sample
    return done


@torch.no_grad()
def evaluate_niah(model, tokenizer, records: list[dict[str, Any]], *, n_iters=(1, 2), carry_over: bool = False,
                  max_new_tokens: int | None = None, progress: bool = True, prefill_block: int | None = PREFILL_BLOCK,
                  partial: str | Path | None = None, check_vocab: bool = True) -> dict[str, Any]:
    """Exact-match accuracy per n (reads), per length and per depth bin, and every sample's output.

    Args:
        carry_over: one memory per (length, n) setting, carried from record to record (the paper);
            otherwise a fresh memory per record.
        prefill_block: reads longer than this go through the KV cache in blocks (bounded memory).
        partial: a JSONL file that receives each sample as it is done (each (length, n) group at its end
            under carry_over); an interrupted run given the same file resumes after the samples it holds.
    """
    device = next(model.parameters()).device
    partial = Path(partial) if partial is not None else None
    done = _load_partial(partial)
    sink = open(partial, "a") if partial is not None else None
    snapshot = model.snapshot_fast_weights()
    samples = []
    vocab = getattr(model.config, "tokenizer_vocab_size", None) or model.config.vocab_size
    try:
        for n in n_iters:
            if n < 1:
                raise ValueError(f"n_iters: {n} < 1 (1 = the plain NIAH, one read)")
            groups: dict[Any, list[int]] = defaultdict(list)
            for i, rec in enumerate(records):
                groups[rec.get("length")].append(i)
            for length, members in groups.items():
                keys = [_key(records[i], i, n) for i in members]
                if all(k in done for k in keys):  # resumed: this setting is complete
                    samples += [done[k] for k in keys]
                    continue
                memory, group = None, []
                for i, key in zip(tqdm(members, desc=f"niah {n}-iter L={length}", disable=not progress,
                                       leave=False), keys):
                    if key in done and not carry_over:
                        samples.append(done[key])
                        continue
                    if memory is None or not carry_over:
                        memory = model.new_memory(1, policy="per_sequence", update_chunk=ONE_READ)
                    sample = _one(model, tokenizer, records[i], n, memory, device, max_new_tokens, prefill_block,
                                  vocab if check_vocab else None)
                    sample["key"] = key
                    group.append(sample)
                    if not carry_over and sink is not None:
                        sink.write(json.dumps(sample) + "\n")
                        sink.flush()
                if carry_over and sink is not None:
                    sink.write("".join(json.dumps(s) + "\n" for s in group))
                    sink.flush()
                samples += group
    finally:
        model.restore_fast_weights(snapshot)
        if sink is not None:
            sink.close()
    return {"n_iters": list(n_iters), "carry_over": carry_over, "samples": samples, **summarize(samples)}


def _one(model, tokenizer, rec, n: int, memory, device, max_new_tokens, prefill_block, vocab) -> dict[str, Any]:
    """One record at n reads: n - 1 pre-reads, the final read, greedy decoding that writes nothing."""
    ctx_ids = _encode(tokenizer, rec["context"])
    final_ids = _encode(tokenizer, rec["context"] + rec["prompt"])
    if vocab is not None and max(final_ids, default=0) >= vocab:
        raise ValueError(f"record {rec.get('id')!r}: token id {max(final_ids)} >= the model's vocabulary ({vocab}); "
                         "the records were tokenized for another model")
    ctx, final = torch.tensor([ctx_ids], device=device), torch.tensor([final_ids], device=device)
    for _ in range(n - 1):  # pre-reads: fresh attention context, one write per read
        model(ctx, memory=memory, use_cache=False, flush_memory=True, logits_to_keep=1, prefill_block=prefill_block)
    out = model(final, memory=memory, use_cache=True, flush_memory=True, logits_to_keep=1, prefill_block=prefill_block)
    budget = max_new_tokens or len(_encode(tokenizer, " " + str(rec["answer"]))) + 2
    reader = memory.frozen_view()  # the answer is read with the memory as written, and never enters it
    generated, cache = [], out.cache
    logits = out.logits
    for step in range(budget):
        token = logits[:, -1].argmax(-1, keepdim=True)
        generated.append(int(token))
        if step + 1 < budget:
            nxt = model(token, cache=cache, memory=reader, use_cache=True)
            cache, logits = nxt.cache, nxt.logits
    text = tokenizer.decode(generated, skip_special_tokens=True)
    return {"id": rec.get("id"), "n_iter": n, "length": rec.get("length", final.shape[1]), "depth": _depth(rec),
            "answer": str(rec["answer"]), "output": text, "correct": text.strip().startswith(str(rec["answer"]))}


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
