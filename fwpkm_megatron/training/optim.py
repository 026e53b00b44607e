"""Slow-weight optimizer: AdamW, linear warmup + cosine decay, gradient clipping.

Design decision 7 and method section 4.3 / 7.4: only slow weights are optimized. Fast weights are
buffers written inside the forward (plain SGD, lr 1, never clipped), so they never reach this module:
parameter groups are built from `model.named_parameters()` alone. Norms, biases and every other 1-D
parameter get no weight decay.
"""
from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from fwpkm_megatron.config import TrainConfig


def _no_decay(name: str, param: torch.Tensor) -> bool:
    """Norm weights, biases and other 1-D tensors are not decayed."""
    return param.ndim < 2 or name.endswith("bias") or "norm" in name.lower()


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Split the trainable parameters into a decayed and an undecayed AdamW group.

    Returns:
        `[{"params", "weight_decay", "names"}, ...]`, decayed group first; empty groups are dropped.
    """
    decay, no_decay = ([], []), ([], [])
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        names, params = no_decay if _no_decay(name, param) else decay
        names.append(name)
        params.append(param)
    groups = [
        {"params": decay[1], "weight_decay": weight_decay, "names": decay[0]},
        {"params": no_decay[1], "weight_decay": 0.0, "names": no_decay[0]},
    ]
    return [g for g in groups if g["params"]]


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of 0-indexed optimizer step `step`: linear warmup, then cosine to `min_lr`.

    Warmup reaches `lr` at step `warmup_steps - 1`; the cosine ends at `min_lr` on the last step.
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    decay_steps = max(cfg.steps - cfg.warmup_steps - 1, 1)
    progress = min((step - cfg.warmup_steps) / decay_steps, 1.0)
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(
    model: torch.nn.Module, cfg: TrainConfig
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over the slow weights of `model` and its warmup-cosine scheduler (stepped once per step)."""
    groups = param_groups(model, cfg.weight_decay)
    optimizer = torch.optim.AdamW(
        [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in groups],
        lr=cfg.lr,
        betas=tuple(cfg.betas),
        eps=cfg.adam_eps,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, cfg) / cfg.lr)
    return optimizer, scheduler


def clip_grad_norm(params: Iterable[torch.nn.Parameter], max_norm: float) -> float:
    """Clip the slow-weight gradients to `max_norm` (0 disables clipping); return the pre-clip norm.

    Fast weights are buffers and never appear here, so they are never clipped (method App. A.3).
    """
    params = [p for p in params if p.grad is not None]
    if not params:
        return 0.0
    limit = max_norm if max_norm > 0 else math.inf
    return float(torch.nn.utils.clip_grad_norm_(params, limit))  # host sync: .item() of the norm
