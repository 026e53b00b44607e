"""Sparse write: the closed-form value step of one chunk (method Eqs. 13-15), and its backward.

Mirrors `reference.value_write`:

    delta_i = -value_lr (k H) (B C / M) (1 / N_read_i) sum_{e reads i} r_t(e) w_e (v_hat_t(e) - target_t(e))

with r_t = gate_t * has_t, N_read_i counting all B*C*H*k reads of row i, M the tokens with a target.
The per-row sums are a segmented reduction over the entries sorted by row (stable sort, one program per
row block summing in a fixed order): no float atomics, bitwise reproducible, which exact resume needs.
The read counts are the segment lengths. In a scan the same kernel also adds delta to the row's current
value (base row, or its latest version in the scan's row store) and writes the new version, so a chunk
update is one pass over the touched rows.

Backward (ops/README.md, "Backward through the write"): with G_i the cotangent of delta_i (or of the
new row) and a_i = value_lr (kH)(BC/M) / N_read_i,
    dv_hat_t = -dtarget_t = -r_t sum_e a_i w_e G_i,   dw_e = -a_i r_t <v_hat_t - target_t, G_i>,
    dgate_t = has_t sum_e w_e (-a_i <v_hat_t - target_t, G_i>),
a gather of G at the read indices plus per-entry dot products: `read.token_bwd` with WRITE on.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .read import Segments, pow2, segment_acc, segments, token_bwd

# ---------------------------------------------------------------------------------------------- kernels


@triton.jit
def _write_rows_kernel(perm_ptr, start_ptr, coef_ptr, vhat_ptr, tgt_ptr, rows_ptr, old_ptr, base_ptr, store_ptr,
                       out_ptr, out_off, scale, S, D, HK: tl.constexpr, COMMIT: tl.constexpr,
                       BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """delta[s] = (-scale * sum_{e in s} coef_e (vhat - tgt)[e // HK]) / count_s for BLOCK_S touched rows.

    COMMIT: out[out_off + s] = current row + delta, the current row being store[old[s]] when old[s] >= 0
    (written by an earlier chunk) else base[rows[s]]. Otherwise out[s] = delta.
    """
    rs = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    smask = rs < S
    rd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = rd < D
    acc, n = segment_acc(perm_ptr, start_ptr, coef_ptr, vhat_ptr, tgt_ptr, rs, smask, rd, dmask, D, HK, True,
                         BLOCK_S, BLOCK_D)
    delta = (-scale * acc) / tl.maximum(n, 1).to(tl.float32)[:, None]  # same operation order as the reference
    m2 = smask[:, None] & dmask[None, :]
    if COMMIT:
        row = tl.load(rows_ptr + rs, mask=smask, other=0)
        old = tl.load(old_ptr + rs, mask=smask, other=-1)
        cur = tl.load(base_ptr + row[:, None] * D + rd[None, :], mask=m2 & (old < 0)[:, None], other=0.0)
        cur = cur.to(tl.float32) + tl.load(store_ptr + old[:, None] * D + rd[None, :],
                                           mask=m2 & (old >= 0)[:, None], other=0.0).to(tl.float32)
        tl.store(out_ptr + (out_off + rs.to(tl.int64))[:, None] * D + rd[None, :],
                 (cur + delta).to(out_ptr.dtype.element_ty), mask=m2)
    else:
        tl.store(out_ptr + rs.to(tl.int64)[:, None] * D + rd[None, :], delta.to(out_ptr.dtype.element_ty), mask=m2)


# --------------------------------------------------------------------------------------------- launchers


def write_scale(value_lr: float, B: int, C: int, H: int, k: int, num_targets: int) -> float:
    """value_lr * (k H) * (B C / M): the chunk's scaling of the per-row mean residual (method 3.4)."""
    return value_lr * (k * H) * (B * C / num_targets)


def write_fwd(seg: Segments, coef, v_hat, target, scale: float, HK: int, *, out=None, commit=None):
    """Kernel launch: per touched row (segment) delta, or with commit=(base, store, old, offset) the new rows.

    coef [E] fp32 = (gate * has) * weight per entry; v_hat, target [M, d_v] (token of entry e is e // HK).
    Without commit returns delta [U, d_v] in v_hat's dtype; with it writes store[offset:offset+U] in place.
    """
    U = seg.keys.numel()
    D = v_hat.shape[1]
    if commit is None:
        out = torch.empty(U, D, dtype=v_hat.dtype, device=v_hat.device) if out is None else out
        base = store = old = out
        offset = 0
    else:
        base, store, old, offset = commit
        out = store
    if U == 0:
        return out
    block_s, block_d = 16, min(pow2(D), 128)
    _write_rows_kernel[(triton.cdiv(U, block_s), triton.cdiv(D, block_d))](
        seg.perm, seg.start, coef, v_hat, target, seg.keys, old, base, store, out, offset, scale, U, D,
        HK=HK, COMMIT=commit is not None, BLOCK_S=block_s, BLOCK_D=block_d)
    return out


def write_bwd(seg: Segments, idx, weight, v_hat, target, r, grad, scale: float, grad_offset: int = 0):
    """Kernel launch: (dweight [M, H*k], dv_hat [M, d_v], dr [M]) from the written rows' cotangents.

    grad[grad_offset + u] is the cotangent of touched row u; dtarget = -dv_hat, dgate = dr * has.
    """
    return token_bwd(grad, idx, weight, None, read=False,
                     write=dict(vhat=v_hat, target=target, r=r, inverse=seg.inverse, counts=seg.counts, grad=grad,
                                grad_offset=grad_offset, scale=scale))


# ----------------------------------------------------------------------------------------------- autograd


class ValueWriteFunction(torch.autograd.Function):
    """(idx, weight, v_hat, target, gate, has_target) -> (rows, delta); gradients to weight, v_hat, target, gate."""

    @staticmethod
    def forward(ctx, idx, weight, v_hat, target, gate, has_target, value_lr, num_targets):
        B, C, H, k = idx.shape
        D = v_hat.shape[-1]
        seg = segments(idx.reshape(-1))
        r = (gate * has_target).reshape(-1).float().contiguous()
        coef = ((gate * has_target)[:, :, None, None] * weight).reshape(-1).float().contiguous()  # reference order
        scale = write_scale(value_lr, B, C, H, k, num_targets)
        v2, t2 = v_hat.reshape(B * C, D).contiguous(), target.reshape(B * C, D).contiguous()
        delta = write_fwd(seg, coef, v2, t2, scale, H * k)
        ctx.save_for_backward(idx, weight, v2, t2, r, has_target, seg.inverse, seg.counts)
        ctx.scale = scale
        ctx.mark_non_differentiable(seg.keys)
        return seg.keys, delta

    @staticmethod
    def backward(ctx, _drows, ddelta):
        idx, weight, v2, t2, r, has, inverse, counts = ctx.saved_tensors
        B, C, H, k = idx.shape
        seg = Segments(None, None, None, inverse, counts)
        dw, dres, dr = write_bwd(seg, idx.reshape(B * C, H, k), weight.reshape(B * C, H, k).contiguous(), v2, t2, r,
                                 ddelta.contiguous(), ctx.scale)
        dweight = dw.view(B, C, H, k).to(weight.dtype)
        dv_hat = dres.view(B, C, -1)
        dgate = (dr.view(B, C) * has).to(r.dtype)
        return (None, dweight, dv_hat.to(v2.dtype), (-dv_hat).to(t2.dtype), dgate, None, None, None)


# ------------------------------------------------------------------------------------------------- public


def value_write(idx, weight, v_hat, target, gate, has_target, *, value_lr: float = 1.0):
    """Closed-form value step of one chunk, fused and deterministic (same contract as `reference.value_write`).

    Args:
        idx, weight: [B, C, H, k] slots read and their read weights.
        v_hat, target: [B, C, d_v] reads and value targets; gate: [B, C]; has_target: [B, C] bool.
        value_lr: the fast-weight SGD step on values.
    Returns:
        (rows [U] sorted unique int64, delta [U, d_v]), or None when no token has a target (host sync).
        delta is differentiable to weight, v_hat, target and gate.
    """
    if idx.dim() != 4 or weight.shape != idx.shape or v_hat.shape[:2] != idx.shape[:2]:
        raise ValueError(f"value_write: idx {tuple(idx.shape)} and weight {tuple(weight.shape)} must be "
                         f"[B, C, H, k] and v_hat {tuple(v_hat.shape)} [B, C, d_v]")
    num_targets = int(has_target.sum())  # host sync, as in the reference
    if num_targets == 0:
        return None
    return ValueWriteFunction.apply(idx.contiguous(), weight.contiguous(), v_hat, target, gate, has_target,
                                    value_lr, num_targets)


__all__ = ["ValueWriteFunction", "value_write", "write_bwd", "write_fwd", "write_scale"]
