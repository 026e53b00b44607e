"""Associative recall on held-out documents (`fwpkm-prep recall`): loss and top-1 accuracy on the queried
value tokens, under a chosen fast-weight policy.

Runs on the training model (megatron's GPTModel, the trainer's call convention), in eval mode, so a
checkpoint's memory branch is measured exactly as it trained. Policies, as `fwpkm-eval`'s:
    per_sequence  each document starts from the stored memory; its writes are private
    persistent    one memory for the whole stream of documents, written as it reads
    frozen        no writes (fast-weight steps set to 0 for the evaluation; App. D.2)
The stored fast weights and each block's settings are restored afterwards.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as F

POLICIES = ("per_sequence", "persistent", "frozen")


@contextlib.contextmanager
def memory_policy(model, policy: str):
    """Every FwPKM block of `model` evaluates under `policy` inside the context (module docstring)."""
    from fwpkm_megatron.memory import fwpkm_blocks, restore_fast_weights, snapshot_fast_weights

    if policy not in POLICIES:
        raise ValueError(f"policy={policy!r}: must be one of {POLICIES}")
    blocks = fwpkm_blocks(model)
    saved = [b.cfg for b in blocks]
    snapshot = snapshot_fast_weights(model)
    for block in blocks:
        if policy == "frozen":  # a zero SGD step on values and sub-keys: reads see the stored memory only
            block.cfg = dataclasses.replace(block.cfg, policy="per_sequence", value_lr=0.0, key_lr=0.0)
        else:
            block.cfg = dataclasses.replace(block.cfg, policy=policy)
    try:
        yield
    finally:
        for block, cfg in zip(blocks, saved):
            block.cfg = cfg
        restore_fast_weights(model, snapshot)


class _SlotCounts:
    """Slots read by every FwPKM block over an evaluation, and its gates (eval/memory_stats.py's statistics)."""

    def __init__(self, model):
        from fwpkm_megatron.memory import fwpkm_blocks

        self.blocks = fwpkm_blocks(model)
        self.counts = {b.layer_id: torch.zeros(b.cfg.num_slots, dtype=torch.long) for b in self.blocks}
        self.gates: dict[int, list[torch.Tensor]] = {b.layer_id: [] for b in self.blocks}

    def observe(self) -> None:
        for b in self.blocks:
            self.counts[b.layer_id] += torch.bincount(b.last_reads.reshape(-1).cpu(), minlength=b.cfg.num_slots)
            if b.last_gate is not None:
                self.gates[b.layer_id].append(b.last_gate.flatten().float().cpu())

    def summary(self) -> dict[str, dict[str, float]]:
        from fwpkm_megatron.eval.memory_stats import usage_statistics

        out = {}
        for lid, counts in self.counts.items():
            entry = usage_statistics(counts)
            if self.gates[lid]:
                entry["gate_mean"] = float(torch.cat(self.gates[lid]).mean())
            out[f"layer{lid}"] = entry
        return out


def token_losses(model, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [b, s, V] fp32, per-token loss [b, s]) of a [b, s+1] batch, the trainer's call convention."""
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    positions = torch.arange(inputs.shape[1], device=tokens.device).expand_as(inputs)
    logits = model(inputs, positions, None).float()                                   # [b, s, V]
    return logits, F.cross_entropy(logits.transpose(1, 2), labels, reduction="none")   # [b, s]


@torch.no_grad()
def recall_metrics(model, records: list[dict[str, Any]], *, policy: str = "per_sequence",
                   batch_size: int = 16) -> dict[str, Any]:
    """Mean loss (nats) and top-1 accuracy on the target tokens of `records` (data.recall.read_eval_records).

    Under `persistent` the documents are read in order, batch 1 (one shared memory, as a stream);
    otherwise in batches of `batch_size`.

    Returns:
        {"policy", "loss", "accuracy", "targets", "loss_all", "memory"}: loss_all is the mean loss over
        every token; memory, per FwPKM layer, the slot coverage, collision rate, KL(usage || uniform) and
        mean gate over the evaluation's reads.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    model.window_control.begin_step(0, 0, training=False)
    step = 1 if policy == "persistent" else batch_size
    loss_sum, correct, count, all_sum, all_count = 0.0, 0, 0, 0.0, 0
    slots = _SlotCounts(model)
    try:
        with memory_policy(model, policy):
            for start in range(0, len(records), step):
                batch = records[start:start + step]
                tokens = torch.tensor([r["tokens"] for r in batch], device=device)        # [b, s+1]
                labels = tokens[:, 1:]
                logits, nll = token_losses(model, tokens)
                slots.observe()
                all_sum += float(nll.sum())
                all_count += nll.numel()
                for row, rec in enumerate(batch):
                    at = torch.tensor(rec["targets"], device=device) - 1  # input position predicting it
                    loss_sum += float(nll[row, at].sum())
                    correct += int((logits[row, at].argmax(-1) == labels[row, at]).sum())
                    count += len(rec["targets"])
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("no target tokens in the records")
    return {"policy": policy, "loss": loss_sum / count, "accuracy": correct / count, "targets": count,
            "loss_all": all_sum / all_count, "memory": slots.summary()}


@torch.no_grad()
def loss_by_position(model, segments: list[torch.Tensor], *, policy: str, batch_size: int = 8) -> dict[str, Any]:
    """Mean loss and its curve over positions of [s+1]-token segments (a prepared split, in storage order).

    `persistent` reads batch 1 in order (one memory across segments, the paper's stream); others batch.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    model.window_control.begin_step(0, 0, training=False)
    step = 1 if policy == "persistent" else batch_size
    sums, n = None, 0
    try:
        with memory_policy(model, policy):
            for start in range(0, len(segments), step):
                tokens = torch.stack(segments[start:start + step]).to(device)
                nll = token_losses(model, tokens)[1].double().cpu()
                sums = nll.sum(0) if sums is None else sums + nll.sum(0)
                n += nll.shape[0]
    finally:
        model.train(was_training)
    curve = sums / n
    return {"policy": policy, "loss": float(curve.mean()), "ppl": math.exp(float(curve.mean())),
            "segments": n, "loss_by_position": curve.tolist()}


def chance_loss(num_values: int) -> float:
    """The loss of a uniform guess over the value pool: what a model without recall can reach at best."""
    return math.log(num_values)
