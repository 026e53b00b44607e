"""FwMLP (the paper's dense fast-weight baseline): a SwiGLU MLP rewritten per chunk, read-then-write.

    FwMLP(q) = W2 (silu(W1 q + b1) * (W3 q + b3)) + b2        fast weights theta = (w1, b1, w3, b3, w2, b2)

Per chunk c (method notes 3.6 with the FwMLP row of 4.1): read y = FwMLP(q; theta_c), then one SGD step
theta_{c+1} = theta_c - lr * grad L on the mean-reduced memorization loss

    L = 1/2 * (1/M) * sum_{(b,t) with a target} w_bt * mean_d (y_btd - v*_btd)^2,   v*_bt = v_{b,t+lookahead}

with M the (b, t) pairs whose target lies inside the chunk and w_bt the loss weight (the gate, or 1:
the paper's FwMLP row has no loss gating). No per-row aggregation (a dense MLP has no rows).

Tensor parallelism (like a megatron MLP): with a TP `group`, w1/b1/w3/b3 hold this rank's rows of the
hidden dim and w2 its columns; b2 and everything else is replicated. A rank's partial W2 u is summed
over the group (`reduce_from`), and replicated tensors entering rank-local work (q, the residual r) go
through `copy_to`, so every replicated tensor gets its full gradient on every rank. Each rank's rows after
a step are exactly those rows of the unsharded step. With group None the helpers are the identity.

The inner gradient is written out in closed form (`fast_mlp_grad`), not taken with `autograd.grad`: the
LM loss then backpropagates through every write with one ordinary first-order backward (no double
backward), as through FwPKM's closed-form value step (ops/README.md). The test suite checks it
against `torch.autograd.grad` of L and the whole scan with float64 `gradcheck`.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F



def copy_to(x: torch.Tensor, group) -> torch.Tensor:
    """Identity forward, sum over the TP group backward (the identity with no group)."""
    if group is None:
        return x
    from ..parallel.sharding import copy_to as tp_copy_to  # imported at call time: ops never import parallel/
    return tp_copy_to(x, group)


def reduce_from(x: torch.Tensor, group) -> torch.Tensor:
    """Sum over the TP group forward, identity backward (the identity with no group)."""
    if group is None:
        return x
    from ..parallel.sharding import reduce_from as tp_reduce_from
    return tp_reduce_from(x, group)


class FastMLP(NamedTuple):
    """A SwiGLU MLP's weights: w1, w3 [F, d_in] (silu / linear branch), w2 [d_v, F], biases b1, b3 [F], b2 [d_v]."""

    w1: torch.Tensor
    b1: torch.Tensor
    w3: torch.Tensor
    b3: torch.Tensor
    w2: torch.Tensor
    b2: torch.Tensor


def _forward(x: torch.Tensor, p: FastMLP, group):
    """y = FwMLP(x) and the activations (a, c, sigmoid(a), silu(a), u) its gradient needs."""
    a, c = F.linear(x, p.w1, p.b1), F.linear(x, p.w3, p.b3)
    sig = torch.sigmoid(a)
    s = a * sig
    u = s * c
    return reduce_from(F.linear(u, p.w2), group) + p.b2, (a, c, sig, s, u)


def swiglu(x: torch.Tensor, p: FastMLP, group=None) -> torch.Tensor:
    """FwMLP(x) for x [..., d_in] -> [..., d_v] (x already through `copy_to` when sharded)."""
    return _forward(x, p, group)[0]


def fast_mlp_grad(x: torch.Tensor, p: FastMLP, target: torch.Tensor, weight: torch.Tensor, group=None,
                  forward=None) -> FastMLP:
    """Closed-form gradient of 1/2 * sum_m weight_m * ||FwMLP(x_m) - target_m||^2 w.r.t. every weight.

    x [..., d_in], target [..., d_v], weight [...] (the caller folds in has-target, the gate and 1/(M*d_v));
    `forward` = `_forward(x, p, group)` when the read already computed it (the scan reuses its read).
    With a = W1 x + b1, c = W3 x + b3, s = silu(a), u = s * c, y = W2 u + b2, r = weight * (y - target):
        dW2 = r^T u, db2 = sum r;  du = r W2;  dc = du * s;  da = du * c * silu'(a)
        dW1 = da^T x, db1 = sum da;  dW3 = dc^T x, db3 = sum dc;   silu'(a) = sig(a) (1 + a (1 - sig(a)))
    """
    y, (a, c, sig, s, u) = _forward(x, p, group) if forward is None else forward
    r = weight[..., None] * (y - target)                                   # replicated
    r_local = copy_to(r, group)
    du = r_local @ p.w2
    dc = du * s
    da = du * c * sig * (1 + a * (1 - sig))
    x, r, r_local, u, dc, da = (t.reshape(-1, t.shape[-1]) for t in (x, r, r_local, u, dc, da))
    return FastMLP(w1=da.T @ x, b1=da.sum(0), w3=dc.T @ x, b3=dc.sum(0), w2=r_local.T @ u, b2=r.sum(0))


def _scan_shared(q, v, lw, p: FastMLP, *, chunk_size: int, lookahead: int, lr: float, detach_writes: bool,
                 group):
    B, T, d_v = v.shape
    outs = []
    for start in range(0, T, chunk_size):
        end = min(start + chunk_size, T)
        x = q[:, start:end]
        y, acts = _forward(x, p, group)  # the read, with the weights from before this chunk
        outs.append(y)
        n = end - start - lookahead      # tokens whose target v_{t+lookahead} is inside the chunk
        if n <= 0 or lr == 0:
            continue
        target = v[:, start + lookahead:end]
        weight = lw[:, start:start + n] / (B * n * d_v)  # 1/2 * mean over tokens and features
        if detach_writes:  # ablation: the LM loss does not see through the writes
            grad = fast_mlp_grad(x[:, :n].detach(), FastMLP(*(t.detach() for t in p)), target.detach(),
                                 weight.detach(), group)
        else:  # the step's prediction is the read of the chunk's first n tokens
            grad = fast_mlp_grad(x[:, :n], p, target, weight, group,
                                 forward=(y[:, :n], tuple(t[:, :n] for t in acts)))
        p = FastMLP(*(w - lr * g for w, g in zip(p, grad)))
    return torch.cat(outs, 1), p


def fwmlp_scan(q: torch.Tensor, v: torch.Tensor, lw: torch.Tensor, fast: FastMLP, *, chunk_size: int,
               lookahead: int = 1, lr: float = 0.1, per_sequence: bool = False, detach_writes: bool = False,
               group=None) -> tuple[torch.Tensor, FastMLP]:
    """The chunked FwMLP scan (read with theta_c, then step on the chunk's loss).

    Args:
        q: [B, T, d_in] fast-MLP inputs; v: [B, T, d_v] values (the targets, z-scored when that is on);
        lw: [B, T] per-token loss weights; fast: the state before the first chunk.
        per_sequence: each sequence starts from `fast` with private writes; the returned state is `fast`.
        group: TP group the hidden dim of `fast` is split over (None: unsharded); q, v, lw are replicated.
    Returns:
        (y [B, T, d_v], the state after the last chunk). One state is shared by the batch otherwise (its
        step averages over all B sequences' tokens). Differentiable end to end when an input requires grad.
    """
    kw = dict(chunk_size=chunk_size, lookahead=lookahead, lr=lr, detach_writes=detach_writes, group=group)
    q = copy_to(q, group)  # replicated input of rank-local work
    if not per_sequence:
        return _scan_shared(q, v, lw, fast, **kw)
    outs = [_scan_shared(q[b:b + 1], v[b:b + 1], lw[b:b + 1], fast, **kw)[0] for b in range(q.shape[0])]
    return torch.cat(outs), fast


__all__ = ["FastMLP", "fast_mlp_grad", "fwmlp_scan", "swiglu"]
