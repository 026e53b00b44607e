"""Product-key addressing of the FwPKM memory (method 2.2, Eqs. 11 and 16-18; docs/method.md): the sub-key
scores, the top-k lookup, the addressing loss and its closed-form key step.

Part of the reference definition (`reference.py` imports it; the Triton kernels must match it), shipped
byte-identical with every export, so it imports only torch. Shape letters as in `reference.py`.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch

# sub-keys per codebook above which the addressing's graph holds only the picked ones (R > this * k): the
# top-k scores are recomputed from the k picked sub-keys and the key step sums over the picks; below it the
# dense [M, H, R] forms (a matmul each) are cheaper (docs/performance.md, "Fourth step")
GATHER_SCORES_ABOVE = 8
ENTROPY_EPS = 1e-8  # inside log() of the addressing entropy, as in the method notes (3.5)


class Address(NamedTuple):
    """Result of a product-key lookup for M query rows (codebook c = 0, 1 first in the per-codebook fields)."""

    idx: torch.Tensor         # [M, H, k] int64 slot ids (i * R + j)
    weight: torch.Tensor      # [M, H, k] read weights (softmax jointly over H*k, or per head)
    top_scores: torch.Tensor  # [2, M, H, k] scores of each codebook's top-k sub-keys (differentiable)
    sub_topk: torch.Tensor    # [2, M, H, k] top-k sub-key ids of each codebook
    num_subkeys: int = 0      # R, the sub-keys per codebook


def _query_halves(q: torch.Tensor) -> torch.Tensor:
    """q [..., M, H, d_k] -> its codebook halves [2, ..., M, H, d_k/2] (a view)."""
    return q.unflatten(-1, (2, q.shape[-1] // 2)).movedim(-2, 0)


def _picks_only(num_subkeys: int, topk: int) -> bool:
    """Whether the addressing's graph holds only the picked sub-keys (large R; `GATHER_SCORES_ABOVE`)."""
    return num_subkeys > GATHER_SCORES_ABOVE * topk


def _codebook_operands(q: torch.Tensor, keys: torch.Tensor):
    """q [..., M, H, d_k], keys [..., H, 2, R, d_k/2] -> both codebooks as one batched matmul's operands:
    query halves [2, ..., H, M, d_k/2] and sub-keys [2, ..., H, R, d_k/2] (views)."""
    return _query_halves(q).transpose(-3, -2), keys.movedim(-3, 0)


def subkey_scores(q: torch.Tensor, keys: torch.Tensor, *, score: str = "idw", eps: float = 1e-3) -> torch.Tensor:
    """Scores of each query half against its codebook (method Eq. 11 / App. A.2), both codebooks at once.

    q [M, H, d_k], keys [H, 2, R, d_k/2] -> [2, M, H, R] (codebook c scores q[..., c*d_k/2:(c+1)*d_k/2]).
    Leading dims S... on both (q [S, M, H, d_k], keys [S, H, 2, R, d_k/2]) score independent streams, each
    with its own keys: [2, S, M, H, R]. idw: -log(eps + ||q_c - K_c,i||^2); dot: q_c . K_c,i.
    """
    qc, kc = _codebook_operands(q, keys)
    if score == "dot":
        return torch.matmul(qc, kc.transpose(-1, -2)).transpose(-3, -2)
    # ||q - K||^2 expanded (one batched matmul); clamp guards tiny negative round-off (smooth, unlike cdist at 0)
    norms = qc.square().sum(-1, keepdim=True) + kc.square().sum(-1).unsqueeze(-2)     # [2, ..., H, M, R]
    dist2 = norms.add(torch.matmul(qc, kc.transpose(-1, -2)), alpha=-2).clamp_min(0)
    return torch.log(dist2 + eps).neg().transpose(-3, -2)


@functools.lru_cache(maxsize=None)
def candidate_pairs(topk: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The (i, j) ranks of the two codebooks' sorted top-k whose sum can be among the k best: (i+1)(j+1) <= k.

    Pair (i, j) is beaten by every (i', j') with i' <= i and j' <= j ((i+1)(j+1) - 1 others), so only
    these k*H_k (harmonic number; 20 of 64 pairs for k = 8) can be selected; ties aside, the same top-k as
    scoring all k*k pairs. In row-major (i, j) order, as the full k*k list.
    """
    pairs = [(i, j) for i in range(topk) for j in range(topk) if (i + 1) * (j + 1) <= topk]
    a, b = torch.tensor(pairs, dtype=torch.long, device=device).unbind(1)
    return a, b


def _subkey_rows(tops: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Rows of `keys.reshape(-1, d_k/2)` (keys [..., H, 2, R, d_k/2]) holding the sub-keys tops [2, ..., M, H, k]
    picks."""
    R, lead = keys.shape[-2], keys.shape[:-3]                                  # lead = (..., H)
    heads = torch.arange(math.prod(lead), device=tops.device).view(*lead[:-1], 1, lead[-1], 1) * (2 * R)
    books = torch.arange(2, device=tops.device).view(2, *([1] * (tops.dim() - 1))) * R
    return tops + heads + books


def topk_scores(q: torch.Tensor, keys: torch.Tensor, tops: torch.Tensor, *, score: str = "idw",
                eps: float = 1e-3) -> torch.Tensor:
    """`subkey_scores(q, keys).gather(-1, tops)` computed for the picked sub-keys only: [2, ..., M, H, k].

    The distance is taken directly (||q_c - K||^2, not expanded), so values agree with `subkey_scores` to
    round-off; the graph holds k sub-keys per row instead of R, so its backward costs O(M H k d_k), not
    O(M H R d_k) (the addressing's only part that grew with N = R^2 besides the no-grad top-k).
    """
    half = keys.shape[-1]
    picked = keys.reshape(-1, half).index_select(0, _subkey_rows(tops, keys).reshape(-1)).view(*tops.shape, half)
    qc = _query_halves(q).unsqueeze(-2)                                        # [2, ..., M, H, 1, d_k/2]
    if score == "dot":
        return (qc * picked).sum(-1)
    return torch.log((qc - picked).square().sum(-1) + eps).neg()


def pkm_address(q: torch.Tensor, keys: torch.Tensor, *, topk: int, score: str = "idw", eps: float = 1e-3,
                joint_softmax: bool = True) -> Address:
    """Product-key top-k lookup (method 2.2 and Eq. 11).

    Top-k sub-keys per codebook, the k*k candidate sums, top-k of those, then softmax (temperature 1)
    jointly over the H*k entries (FwPKM) or within each head (static PKM, `joint_softmax=False`).
    q [M, H, d_k], keys [H, 2, R, d_k/2]; or per stream, q [S, M, H, d_k] and keys [S, H, 2, R, d_k/2].
    The selection runs without a graph on all R scores; the selected scores are then recomputed
    differentiably from the k picked sub-keys (`topk_scores`): a top-k's gradient reaches only those.
    """
    R = keys.shape[-2]
    gathered = _picks_only(R, topk)
    with torch.set_grad_enabled(torch.is_grad_enabled() and not gathered):
        sorted_scores, tops = subkey_scores(q, keys, score=score, eps=eps).topk(topk, dim=-1)  # [2, ..., M, H, k]
    with torch.no_grad():
        a, b = candidate_pairs(topk, q.device)
        cand = sorted_scores[0][..., a] + sorted_scores[1][..., b]    # [..., M, H, P]: pairs that can make the top-k
        pos = cand.topk(topk, dim=-1).indices                         # [..., M, H, k]
        rank1, rank2 = a[pos], b[pos]
    idx = tops[0].gather(-1, rank1) * R + tops[1].gather(-1, rank2)
    top_scores = topk_scores(q, keys, tops, score=score, eps=eps) if gathered else sorted_scores
    best = top_scores[0].gather(-1, rank1) + top_scores[1].gather(-1, rank2)
    if joint_softmax:
        weight = best.flatten(-2).softmax(-1).view_as(best)
    else:
        weight = best.softmax(-1)
    return Address(idx, weight, top_scores, tops, R)


def addressing_loss(address: Address) -> torch.Tensor:
    """Marginal-entropy addressing loss (method Eqs. 16-18): -H(p1_bar) - H(p2_bar).

    Each row's sub-scores outside its codebook top-k are masked and the rest softmaxed over R, i.e. a
    softmax over its k top-k scores placed at their sub-keys; p_bar averages these over all M*H rows of
    the chunk (every token, including those without a target). An address of S streams ([2, S, M, H, k]
    top-k scores) gives each stream's loss, [S].
    """
    probs, usage = _codebook_usage(address, address.num_subkeys)
    p_bar = usage / (probs.shape[-3] * probs.shape[-2])
    return (p_bar * torch.log(p_bar + ENTROPY_EPS)).sum(-1).sum(0)  # = -H(p1_bar) - H(p2_bar)


def _codebook_usage(address: Address, num_subkeys: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(probs [2, ..., M, H, k]: each row's softmax over its top-k scores, usage [2, ..., R]: probs summed over
    the rows at their sub-keys)."""
    probs, tops = address.top_scores.softmax(-1), address.sub_topk
    usage = probs.new_zeros(*probs.shape[:-3], num_subkeys).scatter_add(-1, tops.flatten(-3), probs.flatten(-3))
    return probs, usage


def addressing_key_grad(address: Address, q: torch.Tensor, keys: torch.Tensor, *, weight: float = 1.0,
                        score: str = "idw", exchange: "TokenExchange | None" = None) -> torch.Tensor:
    """d(weight * addressing_loss(address))/d keys in closed form: the key step of a chunk.

    Equals `autograd.grad(weight * addressing_loss(address).sum(), keys, create_graph=True)` (tested to
    1e-12, first and second order) with a fraction of its ops: only the k top-k entries of a row carry
    probability, so the slope dL/ds is k numbers per row, and ds/dK_i is q - K_i times 2/(eps + ||q - K_i||^2)
    = 2 exp(s) (idw) or q (dot). It is built from differentiable ops, so the backward through a key step is
    ordinary first-order autograd, not a double backward of the loss. q [..., M, H, d_k] and keys
    [..., H, 2, R, d_k/2] as `pkm_address` took them (leading stream dims: each stream's own loss); both
    codebooks run as one batch, and the sums over the rows picking a sub-key are index_adds (O(M H k d_k)).
    With a memory group's `exchange`, p_bar averages the rows of all M processes (their top-k usage is
    summed over the group) and the keys, replicated over the group, get the sum of every process's
    gradient. Both sums sit in the forward graph, so the second-order path through them stays exact.
    """
    R = keys.shape[-2]
    tops, top_scores = address.sub_topk, address.top_scores                          # [2, ..., M, H, k]
    probs, usage = _codebook_usage(address, R)
    rows = q.shape[-3] * q.shape[-2]
    if exchange is not None:
        usage = exchange.sum(usage, "keys")
        rows *= exchange.size
    p_bar = usage / rows
    slope = weight * (torch.log(p_bar + ENTROPY_EPS) + p_bar / (p_bar + ENTROPY_EPS)) / rows  # dL/dp, [2, ..., R]
    a = slope.gather(-1, tops.flatten(-3)).view_as(tops)
    ds = probs * (a - (probs * a).sum(-1, keepdim=True))                             # dL/ds at the top-k
    coef = 2 * ds * top_scores.exp() if score == "idw" else ds
    # dL/dK_i = sum over the rows picking i of coef * (q - K_i) (idw) or coef * q (dot)
    if _picks_only(R, tops.shape[-1]):  # large R: index_adds over the M*H*k picks
        half = keys.shape[-1]
        flat_keys, picks = keys.reshape(-1, half), _subkey_rows(tops, keys).reshape(-1)
        qc = _query_halves(q).unsqueeze(-2)                                          # [2, ..., M, H, 1, d_k/2]
        grad = torch.zeros_like(flat_keys).index_add(0, picks, (coef.unsqueeze(-1) * qc).reshape(-1, half))
        if score == "idw":
            picked = coef.new_zeros(flat_keys.shape[0]).index_add(0, picks, coef.reshape(-1))
            grad = grad - picked.unsqueeze(-1) * flat_keys
        grad = grad.view_as(keys)
    else:  # small R: coef scattered into [M, H, R] rows, then one matmul per codebook and head
        dense = coef.new_zeros(*coef.shape[:-1], R).scatter(-1, tops, coef).transpose(-3, -2)  # [2, ..., H, M, R]
        qc, kc = _codebook_operands(q, keys)
        grad = torch.matmul(dense.transpose(-1, -2), qc)                             # [2, ..., H, R, d_k/2]
        if score == "idw":
            grad = grad - dense.sum(-2).unsqueeze(-1) * kc
        grad = grad.movedim(0, -3)                                                   # [..., H, 2, R, d_k/2]
    return grad if exchange is None else exchange.sum(grad, "keys")
