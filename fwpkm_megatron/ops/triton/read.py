"""Sparse read: the weighted sum of each token's H*k addressed rows (an embedding-bag), and its backward.

Mirrors `reference.pkm_read`: out[m] = sum_{h,j} weight[m,h,j] * values[idx[m,h,j]], accumulated in fp32
whatever the storage dtype (bf16 rows are loaded and cast, never computed on in bf16).

Inside a scan a row may have been rewritten by an earlier chunk: then `ptr >= 0` names its current
version in the scan's row store, and the row is read from there instead of the base table (the
kernel-side form of `reference.RowOverlay`).

Backward:
  dweight[m,e] = <dout[m], row_e>            one pass over the same rows as the forward (`token_bwd`)
  dvalues[i]  += sum_{e reads i} w_e dout[m(e)]  a segmented reduction: entries are sorted by destination
                                              row (stable sort), and one program sums each row's entries
                                              in that fixed order, so no float atomics and the result is
                                              bitwise reproducible.
`token_bwd` can also carry the token side of the write's backward (see write.py), so the scan's
backward gathers every row once per chunk.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .. import library


def pow2(n: int, at_least: int = 1) -> int:
    """The smallest power of two >= max(n, at_least): Triton block sizes."""
    return max(triton.next_power_of_2(max(int(n), 1)), at_least)


# ---------------------------------------------------------------------------------------------- kernels


@triton.jit
def _load_rows(base_ptr, store_ptr, idx, ptr, emask, rd, dmask, D, HAS_STORE: tl.constexpr):
    """Rows [BM, BHK, BD] in fp32: store[ptr] where ptr >= 0 (written during the scan), else base[idx]."""
    m3 = emask[:, :, None] & dmask[None, None, :]
    col = rd[None, None, :]
    if HAS_STORE:
        hit = (ptr >= 0)[:, :, None]
        x = tl.load(base_ptr + idx[:, :, None] * D + col, mask=m3 & (ptr < 0)[:, :, None], other=0.0).to(tl.float32)
        x += tl.load(store_ptr + ptr[:, :, None] * D + col, mask=m3 & hit, other=0.0).to(tl.float32)
    else:
        x = tl.load(base_ptr + idx[:, :, None] * D + col, mask=m3, other=0.0).to(tl.float32)
    return x


@triton.jit
def _read_fwd_kernel(base_ptr, store_ptr, idx_ptr, ptr_ptr, w_ptr, out_ptr, M, D,
                     HK: tl.constexpr, HAS_STORE: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_HK: tl.constexpr, BLOCK_D: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mmask = rm < M
    rm = rm.to(tl.int64)
    re = tl.arange(0, BLOCK_HK)
    rd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = rd < D
    emask = mmask[:, None] & (re < HK)[None, :]
    eo = rm[:, None] * HK + re[None, :]
    idx = tl.load(idx_ptr + eo, mask=emask, other=0)
    ptr = idx
    if HAS_STORE:
        ptr = tl.load(ptr_ptr + eo, mask=emask, other=-1)
    w = tl.load(w_ptr + eo, mask=emask, other=0.0).to(tl.float32)
    x = _load_rows(base_ptr, store_ptr, idx, ptr, emask, rd, dmask, D, HAS_STORE)
    out = tl.sum(w[:, :, None] * x, axis=1)
    tl.store(out_ptr + rm[:, None] * D + rd[None, :], out.to(out_ptr.dtype.element_ty),
             mask=mmask[:, None] & dmask[None, :])


@triton.jit
def _token_bwd_kernel(base_ptr, store_ptr, idx_ptr, ptr_ptr, w_ptr, dout_ptr,
                      vhat_ptr, tgt_ptr, r_ptr, inv_ptr, cnt_ptr, g_ptr, g_off, scale,
                      dw_ptr, dvhat_ptr, dr_ptr, M, D,
                      HK: tl.constexpr, HAS_STORE: tl.constexpr, HAS_DOUT: tl.constexpr, READ: tl.constexpr,
                      WRITE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_D: tl.constexpr):
    """Per token: dweight (read and/or write part), the write's part of dv_hat, and its d(gate*has).

    READ:  dw_e += <dvhat_m, row_e>, with dvhat_m = dout_m (+ the write part dres_m below).
    WRITE: the write made delta_u = -a_u sum_{e in u} r_m w_e (vhat_m - tgt_m), a_u = scale / count_u.
           With G_u its cotangent:  dres_m = -r_m sum_e a_u w_e G_u  (stored; dtgt_m = -dres_m)
                                    t_e = -a_u <vhat_m - tgt_m, G_u>,  dw_e += r_m t_e,  dr_m = sum_e w_e t_e.
    """
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mmask = rm < M
    rm = rm.to(tl.int64)
    re = tl.arange(0, BLOCK_HK)
    emask = mmask[:, None] & (re < HK)[None, :]
    eo = rm[:, None] * HK + re[None, :]
    w = tl.load(w_ptr + eo, mask=emask, other=0.0).to(tl.float32)
    dot_r = tl.zeros([BLOCK_M, BLOCK_HK], dtype=tl.float32)
    dot_w = tl.zeros([BLOCK_M, BLOCK_HK], dtype=tl.float32)
    if READ:
        idx = tl.load(idx_ptr + eo, mask=emask, other=0)
        ptr = idx
        if HAS_STORE:
            ptr = tl.load(ptr_ptr + eo, mask=emask, other=-1)
    if WRITE:
        inv = tl.load(inv_ptr + eo, mask=emask, other=0)
        cnt = tl.load(cnt_ptr + inv, mask=emask, other=1).to(tl.float32)
        a = scale / cnt
        r = tl.load(r_ptr + rm, mask=mmask, other=0.0).to(tl.float32)
        coef_g = -a * r[:, None] * w
    for d0 in range(0, D, BLOCK_D):
        rd = d0 + tl.arange(0, BLOCK_D)
        dmask = rd < D
        tmask = mmask[:, None] & dmask[None, :]
        to = rm[:, None] * D + rd[None, :]
        if HAS_DOUT:
            dv = tl.load(dout_ptr + to, mask=tmask, other=0.0).to(tl.float32)
        else:
            dv = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        if WRITE:
            resid = tl.load(vhat_ptr + to, mask=tmask, other=0.0).to(tl.float32) \
                - tl.load(tgt_ptr + to, mask=tmask, other=0.0).to(tl.float32)
            g = tl.load(g_ptr + (g_off + inv)[:, :, None] * D + rd[None, None, :],
                        mask=emask[:, :, None] & dmask[None, None, :], other=0.0).to(tl.float32)
            dot_w += tl.sum(resid[:, None, :] * g, axis=2)
            dres = tl.sum(coef_g[:, :, None] * g, axis=1)
            tl.store(dvhat_ptr + to, dres, mask=tmask)  # the write's part only: dtarget = -dres
            dv = dv + dres
        if READ:
            x = _load_rows(base_ptr, store_ptr, idx, ptr, emask, rd, dmask, D, HAS_STORE)
            dot_r += tl.sum(dv[:, None, :] * x, axis=2)
    dw = dot_r
    if WRITE:
        t = -a * dot_w
        dw += r[:, None] * t
        tl.store(dr_ptr + rm, tl.sum(w * t, axis=1), mask=mmask)
    tl.store(dw_ptr + eo, dw, mask=emask)


@triton.jit
def segment_acc(perm_ptr, start_ptr, coef_ptr, x_ptr, x2_ptr, rs, smask, rd, dmask, D,
                HK: tl.constexpr, SUB: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """For BLOCK_S segments: acc[s] = sum_{e in s, in sorted order} coef[e] * (x - x2)[e // HK]; and the counts."""
    start = tl.load(start_ptr + rs, mask=smask, other=0)
    n = tl.load(start_ptr + rs + 1, mask=smask, other=0) - start
    acc = tl.zeros([BLOCK_S, BLOCK_D], dtype=tl.float32)
    for j in range(0, tl.max(n, axis=0)):  # fixed order within each segment: deterministic
        live = j < n
        e = tl.load(perm_ptr + start + j, mask=live, other=0)
        c = tl.load(coef_ptr + e, mask=live, other=0.0).to(tl.float32)
        xo = (e // HK)[:, None] * D + rd[None, :]
        xm = live[:, None] & dmask[None, :]
        x = tl.load(x_ptr + xo, mask=xm, other=0.0).to(tl.float32)
        if SUB:
            x = x - tl.load(x2_ptr + xo, mask=xm, other=0.0).to(tl.float32)
        acc += c[:, None] * x
    return acc, n


@triton.jit
def _scatter_rows_kernel(perm_ptr, start_ptr, key_ptr, coef_ptr, x_ptr, dbase_ptr, dstore_ptr, S, D, N,
                         HK: tl.constexpr, HAS_BASE: tl.constexpr, HAS_STORE: tl.constexpr,
                         BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """d(rows) += segmented sums; key < N names base row key, key >= N names store row key - N."""
    rs = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    smask = rs < S
    rd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = rd < D
    acc, n = segment_acc(perm_ptr, start_ptr, coef_ptr, x_ptr, x_ptr, rs, smask, rd, dmask, D, HK, False,
                         BLOCK_S, BLOCK_D)
    key = tl.load(key_ptr + rs, mask=smask, other=0)
    m2 = smask[:, None] & dmask[None, :]
    if HAS_BASE:  # one program owns each destination row: a plain read-add-write, no race
        pb = dbase_ptr + key[:, None] * D + rd[None, :]
        mb = m2 & (key < N)[:, None]
        tl.store(pb, tl.load(pb, mask=mb, other=0.0) + acc, mask=mb)
    if HAS_STORE:
        ps = dstore_ptr + (key - N)[:, None] * D + rd[None, :]
        ms = m2 & (key >= N)[:, None]
        tl.store(ps, tl.load(ps, mask=ms, other=0.0) + acc, mask=ms)


# --------------------------------------------------------------------------------------------- launchers


class Segments(NamedTuple):
    """Entries grouped by a destination key (sorted, stable): the plan of a segmented reduction."""

    perm: torch.Tensor     # [E] entry ids in key order (ties keep entry order)
    start: torch.Tensor    # [S + 1] offsets of each segment in perm
    keys: torch.Tensor     # [S] sorted unique keys
    inverse: torch.Tensor  # [E] segment of each entry
    counts: torch.Tensor   # [S] entries per segment


def segments(keys: torch.Tensor) -> Segments:
    """Plan a deterministic segmented reduction over flat int64 `keys` (one sort, no float atomics)."""
    sorted_keys, perm = torch.sort(keys, stable=True)
    uniq, inv_sorted, counts = torch.unique_consecutive(sorted_keys, return_inverse=True, return_counts=True)
    start = torch.zeros(uniq.numel() + 1, dtype=torch.long, device=keys.device)
    torch.cumsum(counts, 0, out=start[1:])
    inverse = torch.empty_like(perm)
    inverse[perm] = inv_sorted
    return Segments(perm, start, uniq, inverse, counts)


def _token_blocks(HK: int, D: int, budget: int = 4096):
    """(BLOCK_M, BLOCK_HK, BLOCK_D) for [tokens, entries, columns] tiles of about `budget` elements."""
    block_hk = pow2(HK)
    block_d = min(pow2(D), 128, max(budget // block_hk, 16))
    block_m = max(1, min(16, budget // (block_hk * block_d)))
    return block_m, block_hk, block_d


def read_fwd(base, idx, weight, store=None, ptr=None, out_dtype=None):
    """Kernel launch: base [N, d_v], idx/weight [M, H, k] (+ store [*, d_v], ptr [M, H, k]) -> out [M, d_v]."""
    M = idx.shape[0]
    HK = idx.shape[1] * idx.shape[2]
    D = base.shape[1]
    out = torch.empty(M, D, dtype=out_dtype or torch.promote_types(weight.dtype, base.dtype), device=base.device)
    if M == 0:
        return out
    bm, bhk, bd = _token_blocks(HK, D)
    has_store = ptr is not None
    _read_fwd_kernel[(triton.cdiv(M, bm), triton.cdiv(D, bd))](
        base, store if has_store else base, idx, ptr if has_store else idx, weight, out, M, D,
        HK=HK, HAS_STORE=has_store, BLOCK_M=bm, BLOCK_HK=bhk, BLOCK_D=bd)
    return out


def token_bwd(base, idx, weight, dout, store=None, ptr=None, *, read: bool = True, write=None):
    """Kernel launch: dweight [M, H*k] fp32, and with `write` also dres [M, d_v] and dr [M] (fp32).

    dres is the write's part of dv_hat: the read part of dweight sees dout + dres, and a caller that
    needs that total computes `dout.float() + dres` (the same single fp32 rounding as the kernel).

    write: None, or a dict(vhat [M, d_v], target [M, d_v], r [M] (= gate * has), inverse [M*H*k],
    counts [U], grad [*, d_v] (cotangents of the written rows), grad_offset (row of segment 0), scale).
    """
    M = idx.shape[0]
    HK = idx.shape[1] * idx.shape[2]
    D = base.shape[1]
    dev = base.device
    dw = torch.empty(M, HK, dtype=torch.float32, device=dev)
    dvhat = torch.empty(M, D, dtype=torch.float32, device=dev) if write is not None else None
    dr = torch.empty(M, dtype=torch.float32, device=dev) if write is not None else None
    if M == 0:
        return dw, dvhat, dr
    bm, bhk, bd = _token_blocks(HK, D, budget=2048)  # more live [BM, BHK, BD] tiles than the forward
    has_store = ptr is not None
    wr = write or {}
    _token_bwd_kernel[(triton.cdiv(M, bm),)](
        base, store if has_store else base, idx, ptr if has_store else idx, weight,
        dout if dout is not None else dw,
        wr.get("vhat", dw), wr.get("target", dw), wr.get("r", dw), wr.get("inverse", idx), wr.get("counts", idx),
        wr.get("grad", dw), wr.get("grad_offset", 0), float(wr.get("scale", 0.0)),
        dw, dvhat if dvhat is not None else dw, dr if dr is not None else dw, M, D,
        HK=HK, HAS_STORE=has_store, HAS_DOUT=dout is not None, READ=read, WRITE=write is not None,
        BLOCK_M=bm, BLOCK_HK=bhk, BLOCK_D=bd)
    return dw, dvhat, dr


def scatter_rows(seg: Segments, coef, x, HK: int, N: int, dbase=None, dstore=None):
    """Kernel launch: for each segment key, d[key] += sum_e coef[e] * x[e // HK] (base if key < N, else store)."""
    S = seg.keys.numel()
    if S == 0 or (dbase is None and dstore is None):
        return
    D = x.shape[1]
    block_s, block_d = 16, min(pow2(D), 128)
    anyd = dbase if dbase is not None else dstore
    _scatter_rows_kernel[(triton.cdiv(S, block_s), triton.cdiv(D, block_d))](
        seg.perm, seg.start, seg.keys, coef, x, dbase if dbase is not None else anyd,
        dstore if dstore is not None else anyd, S, D, N, HK=HK, HAS_BASE=dbase is not None,
        HAS_STORE=dstore is not None, BLOCK_S=block_s, BLOCK_D=block_d)


# ----------------------------------------------------------------------------------------------- autograd


class PKMReadFunction(torch.autograd.Function):
    """(values, idx, weight) -> out; gradients to values (dense, fp32-accumulated) and weight."""

    @staticmethod
    def forward(ctx, values, idx, weight):
        values, idx, weight = values.contiguous(), idx.contiguous(), weight.contiguous()
        ctx.save_for_backward(values, idx, weight)
        return library.read_fwd(values, idx, weight)  # custom ops with fakes (ops/library.py)

    @staticmethod
    def backward(ctx, dout):
        values, idx, weight = ctx.saved_tensors
        dvalues, dweight = library.read_bwd(values, idx, weight, dout.contiguous(), ctx.needs_input_grad[0],
                                            ctx.needs_input_grad[2])
        return library.empty_to_none(dvalues), None, library.empty_to_none(dweight)


# ------------------------------------------------------------------------------------------------- public


def pkm_read(values: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Weighted sum of the addressed rows, summed over heads (same contract as `reference.pkm_read`).

    Args:
        values: [N, d_v] value table (fp32 or bf16 storage; accumulation is fp32).
        idx: [M, H, k] int64 slot ids; weight: [M, H, k] read weights.
    Returns:
        [M, d_v] in the promoted dtype of weight and values. Differentiable to values and weight.
    """
    if idx.shape != weight.shape or idx.dim() != 3 or values.dim() != 2:
        raise ValueError(f"pkm_read: values {tuple(values.shape)} must be [N, d_v] and idx {tuple(idx.shape)}, "
                         f"weight {tuple(weight.shape)} the same [M, H, k]")
    return PKMReadFunction.apply(values, idx, weight)


__all__ = ["PKMReadFunction", "Segments", "pkm_read", "pow2", "read_fwd", "scatter_rows", "segment_acc",
           "segments", "token_bwd"]
