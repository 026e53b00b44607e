"""Product-key addressing in one kernel (sub-key scores, top-k per codebook, k*k merge, top-k, softmax),
its backward, and the sub-key step of the addressing loss, all without the [M, H, R] score matrix.

Mirrors `reference.pkm_address` (method 2.2 and Eq. 11). The forward keeps each token's [R] score rows
in registers and writes only what later ops need: idx and weight, and per codebook the top-k sub-key
ids and scores (the addressing loss needs nothing else). `Address.top_scores` is None here.

Backward. Every gradient here is a sum over *selected* (token, head, sub-key) entries e of a
coefficient times one of three rows: the query half q_e, the sub-key K_r(e), or a cotangent row U_r(e):
    dq[m, h, half] = sum_e (x_e q + y_e K_r + z_e U_r),
    dK[h, half, r] = sum_{e: r(e)=r} (x_e K_r + y_e q_e + z_e U_r).
`subkey_dq` / `subkey_dk` compute these sums (dK as a deterministic per-sub-key loop over tokens, no
atomics); the coefficients are elementwise torch on [2, M, H, k] tensors (a few bytes per token).
  * address backward: softmax backward -> score gradient ds_e of entry (i, j) = (idx // R, idx % R),
    passed to sub-key i of codebook 1 and j of codebook 2; IDW adds c = ds * f'(d), f(d) = -log(eps + d).
  * addressing-loss key gradient (first order, the key step of every chunk): ds from the entropy of the
    top-k softmax (torch, tiny), then the same sums.
  * its Hessian-vector product (the backward through a key step; derived in docs/kernels.md): with U the
    cotangent of the step, a_e = <U_r, d s_e / d K_r>, g = (d^2 L / ds^2) a (torch double backward on
    [2, M, H, k] numbers):
      IDW: alpha = 2 g f' + 4 F f'' b, beta = -2 F f', b = <U_r, K_r - q>, F = dL/ds
           Hq = sum_e alpha (q - K_r) + beta U_r,   HK_r = sum_e alpha (K_r - q) - beta U_r
      dot: Hq = sum_e g K_r + F U_r,                 HK_r = sum_e g q_e
Layout: q [M, H, d_k], keys [H, 2, R, d_k/2], idx/weight [M, H, k], per-codebook tensors [2, M, H, k].
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import library
from ..reference import ENTROPY_EPS, Address
from .read import pow2

# ieee: exact fp32 FMA scores, so the top-k matches the reference. "tf32x3" runs on tensor cores at nearly
# fp32 accuracy (not yet measured on a GPU); plain "tf32" rounds scores enough to change selections.
DOT_PRECISION: tl.constexpr = tl.constexpr("ieee")

# ---------------------------------------------------------------------------------------------- kernels


@triton.jit
def _subkey_topk(q_ptr, k_ptr, rm, mmask, eps, h, half: tl.constexpr, H: tl.constexpr, R: tl.constexpr,
                 DH: tl.constexpr, K: tl.constexpr, IDW: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr):
    """Top-K scores and sub-key ids of one codebook for BLOCK_M tokens: ([BM, BK] fp32, [BM, BK] int32)."""
    rr = tl.arange(0, BLOCK_R)
    rmask = rr < R
    dot = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    qq = tl.zeros([BLOCK_M], dtype=tl.float32)
    kk = tl.zeros([BLOCK_R], dtype=tl.float32)
    for d0 in range(0, DH, BLOCK_D):
        rd = d0 + tl.arange(0, BLOCK_D)
        dmask = rd < DH
        qh = tl.load(q_ptr + (rm[:, None] * H + h) * (2 * DH) + half * DH + rd[None, :],
                     mask=mmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        kh = tl.load(k_ptr + ((h * 2 + half) * R + rr[:, None]) * DH + rd[None, :],
                     mask=rmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        dot += tl.dot(qh, tl.trans(kh), input_precision=DOT_PRECISION)
        if IDW:
            qq += tl.sum(qh * qh, axis=1)
            kk += tl.sum(kh * kh, axis=1)
    if IDW:  # -log(eps + ||q - K||^2), expanded and clamped exactly as the reference
        dist2 = tl.maximum(qq[:, None] - 2 * dot + kk[None, :], 0.0)
        s = -tl.log(eps + dist2)
    else:
        s = dot
    s = tl.where(rmask[None, :], s, float("-inf"))
    kc = tl.arange(0, BLOCK_K)
    vals = tl.full([BLOCK_M, BLOCK_K], float("-inf"), dtype=tl.float32)
    ids = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.int32)
    for a in range(K):  # selection, descending like torch.topk
        mx = tl.max(s, axis=1)
        am = tl.argmax(s, axis=1)
        vals = tl.where(kc[None, :] == a, mx[:, None], vals)
        ids = tl.where(kc[None, :] == a, am[:, None], ids)
        s = tl.where(rr[None, :] == am[:, None], float("-inf"), s)
    return vals, ids


@triton.jit
def _address_fwd_kernel(q_ptr, k_ptr, idx_ptr, w_ptr, top_ptr, tops_ptr, M, eps,
                        H: tl.constexpr, R: tl.constexpr, DH: tl.constexpr, K: tl.constexpr,
                        IDW: tl.constexpr, JOINT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
                        BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_HK: tl.constexpr):
    HK: tl.constexpr = H * K
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mmask = rm < M
    rm = rm.to(tl.int64)
    kc = tl.arange(0, BLOCK_K)
    hk = tl.arange(0, BLOCK_HK)
    cc = tl.arange(0, BLOCK_K * BLOCK_K)
    best = tl.full([BLOCK_M, BLOCK_HK], float("-inf"), dtype=tl.float32)
    slot = tl.zeros([BLOCK_M, BLOCK_HK], dtype=tl.int64)
    kmask = mmask[:, None] & (kc < K)[None, :]
    for h in range(H):
        v1, i1 = _subkey_topk(q_ptr, k_ptr, rm, mmask, eps, h, 0, H, R, DH, K, IDW,
                              BLOCK_M, BLOCK_R, BLOCK_D, BLOCK_K)
        v2, i2 = _subkey_topk(q_ptr, k_ptr, rm, mmask, eps, h, 1, H, R, DH, K, IDW,
                              BLOCK_M, BLOCK_R, BLOCK_D, BLOCK_K)
        eo = rm[:, None] * HK + h * K + kc[None, :]  # [2, M, H, k] layouts: codebook 2 starts at M * HK
        tl.store(top_ptr + eo, i1.to(tl.int64), mask=kmask)
        tl.store(top_ptr + M * HK + eo, i2.to(tl.int64), mask=kmask)
        tl.store(tops_ptr + eo, v1, mask=kmask)
        tl.store(tops_ptr + M * HK + eo, v2, mask=kmask)
        # the k*k candidate sums, row-major (i, j) like the reference; padding lanes are -inf
        cand = v1[:, :, None] + v2[:, None, :]
        cand = tl.reshape(cand, [BLOCK_M, BLOCK_K * BLOCK_K])
        for j in range(K):
            mx = tl.max(cand, axis=1)
            am = tl.argmax(cand, axis=1)
            a = am // BLOCK_K
            b = am % BLOCK_K
            r1 = tl.sum(tl.where(kc[None, :] == a[:, None], i1, 0), axis=1)
            r2 = tl.sum(tl.where(kc[None, :] == b[:, None], i2, 0), axis=1)
            col = hk[None, :] == h * K + j
            best = tl.where(col, mx[:, None], best)
            slot = tl.where(col, r1.to(tl.int64)[:, None] * R + r2.to(tl.int64)[:, None], slot)
            cand = tl.where(cc[None, :] == am[:, None], float("-inf"), cand)
    valid = hk < HK
    if JOINT:  # softmax over all H*k entries of the token (FwPKM)
        mx = tl.max(best, axis=1)
        p = tl.where(valid[None, :], tl.exp(best - mx[:, None]), 0.0)
        w = p / tl.sum(p, axis=1)[:, None]
    else:  # softmax within each head (static PKM)
        mxc = tl.zeros([BLOCK_M, BLOCK_HK], dtype=tl.float32)
        for h in range(H):
            seg = (hk >= h * K) & (hk < h * K + K)
            mxh = tl.max(tl.where(seg[None, :], best, float("-inf")), axis=1)
            mxc = tl.where(seg[None, :], mxh[:, None], mxc)
        p = tl.where(valid[None, :], tl.exp(best - mxc), 0.0)
        den = tl.zeros([BLOCK_M, BLOCK_HK], dtype=tl.float32)
        for h in range(H):
            seg = (hk >= h * K) & (hk < h * K + K)
            sh = tl.sum(tl.where(seg[None, :], p, 0.0), axis=1)
            den = tl.where(seg[None, :], sh[:, None], den)
        w = p / tl.where(valid[None, :], den, 1.0)
    emask = mmask[:, None] & valid[None, :]
    offs = rm[:, None] * HK + hk[None, :]
    tl.store(idx_ptr + offs, slot, mask=emask)
    tl.store(w_ptr + offs, w.to(w_ptr.dtype.element_ty), mask=emask)


@triton.jit
def _subkey_dot_kernel(q_ptr, k_ptr, u_ptr, sub_ptr, d_ptr, b_ptr, M,
                       H: tl.constexpr, R: tl.constexpr, DH: tl.constexpr, K: tl.constexpr, IDW: tl.constexpr,
                       HAS_U: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """Per selected entry: d = ||q - K_r||^2 (expanded, unclamped; IDW) or q.K_r (dot), and
    b = <U_r, K_r - q> (IDW) or <U_r, q> (dot) when HAS_U."""
    HK: tl.constexpr = H * K
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mmask = rm < M
    rm = rm.to(tl.int64)
    kc = tl.arange(0, BLOCK_K)
    kmask = mmask[:, None] & (kc < K)[None, :]
    for h in range(H):
        for half in range(2):
            eo = half * M * HK + rm[:, None] * HK + h * K + kc[None, :]
            r = tl.load(sub_ptr + eo, mask=kmask, other=0)
            krow = ((h * 2 + half) * R + r) * DH                          # [BM, BK] row offsets
            qoff = (rm * H + h) * (2 * DH) + half * DH                     # [BM]
            dot = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
            kk = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
            qq = tl.zeros([BLOCK_M], dtype=tl.float32)
            uk = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
            uq = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
            for d0 in range(0, DH, BLOCK_D):
                rd = d0 + tl.arange(0, BLOCK_D)
                dmask = rd < DH
                m3 = kmask[:, :, None] & dmask[None, None, :]
                qh = tl.load(q_ptr + qoff[:, None] + rd[None, :], mask=mmask[:, None] & dmask[None, :],
                             other=0.0).to(tl.float32)
                kr = tl.load(k_ptr + krow[:, :, None] + rd[None, None, :], mask=m3, other=0.0).to(tl.float32)
                dot += tl.sum(qh[:, None, :] * kr, axis=2)
                if IDW:
                    kk += tl.sum(kr * kr, axis=2)
                    qq += tl.sum(qh * qh, axis=1)
                if HAS_U:
                    ur = tl.load(u_ptr + krow[:, :, None] + rd[None, None, :], mask=m3, other=0.0).to(tl.float32)
                    uq += tl.sum(qh[:, None, :] * ur, axis=2)
                    if IDW:
                        uk += tl.sum(kr * ur, axis=2)
            if IDW:  # the reference's expanded form ||q||^2 - 2 q.K + ||K||^2
                tl.store(d_ptr + eo, qq[:, None] - 2 * dot + kk, mask=kmask)
            else:
                tl.store(d_ptr + eo, dot, mask=kmask)
            if HAS_U:
                if IDW:
                    tl.store(b_ptr + eo, uk - uq, mask=kmask)
                else:
                    tl.store(b_ptr + eo, uq, mask=kmask)


@triton.jit
def _subkey_dq_kernel(q_ptr, k_ptr, u_ptr, sub_ptr, x_ptr, y_ptr, z_ptr, dq_ptr, M,
                      H: tl.constexpr, R: tl.constexpr, DH: tl.constexpr, K: tl.constexpr, HAS_X: tl.constexpr,
                      HAS_Z: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """dq[m, h, half] = (sum_e x_e) q + sum_e y_e K_r(e) + sum_e z_e U_r(e) over the token's entries e."""
    HK: tl.constexpr = H * K
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mmask = rm < M
    rm = rm.to(tl.int64)
    kc = tl.arange(0, BLOCK_K)
    kmask = mmask[:, None] & (kc < K)[None, :]
    for h in range(H):
        for half in range(2):
            eo = half * M * HK + rm[:, None] * HK + h * K + kc[None, :]
            r = tl.load(sub_ptr + eo, mask=kmask, other=0)
            krow = ((h * 2 + half) * R + r) * DH
            qoff = (rm * H + h) * (2 * DH) + half * DH
            y = tl.load(y_ptr + eo, mask=kmask, other=0.0)
            if HAS_X:
                xs = tl.sum(tl.load(x_ptr + eo, mask=kmask, other=0.0), axis=1)
            if HAS_Z:
                z = tl.load(z_ptr + eo, mask=kmask, other=0.0)
            for d0 in range(0, DH, BLOCK_D):
                rd = d0 + tl.arange(0, BLOCK_D)
                dmask = rd < DH
                m3 = kmask[:, :, None] & dmask[None, None, :]
                qmask = mmask[:, None] & dmask[None, :]
                kr = tl.load(k_ptr + krow[:, :, None] + rd[None, None, :], mask=m3, other=0.0).to(tl.float32)
                dq = tl.sum(y[:, :, None] * kr, axis=1)
                if HAS_X:
                    qh = tl.load(q_ptr + qoff[:, None] + rd[None, :], mask=qmask, other=0.0).to(tl.float32)
                    dq += xs[:, None] * qh
                if HAS_Z:
                    ur = tl.load(u_ptr + krow[:, :, None] + rd[None, None, :], mask=m3, other=0.0).to(tl.float32)
                    dq += tl.sum(z[:, :, None] * ur, axis=1)
                tl.store(dq_ptr + qoff[:, None] + rd[None, :], dq.to(dq_ptr.dtype.element_ty), mask=qmask)


@triton.jit
def _subkey_dk_kernel(q_ptr, k_ptr, u_ptr, sub_ptr, x_ptr, y_ptr, z_ptr, dk_ptr, M,
                      H: tl.constexpr, R: tl.constexpr, DH: tl.constexpr, K: tl.constexpr, HAS_X: tl.constexpr,
                      HAS_Z: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """dK[h, half, r] = (sum x) K_r + sum y q_e + (sum z) U_r over the entries selecting r.

    One program per [sub-key block, d block] loops over all tokens in a fixed order: deterministic, no
    atomics, and every sub-key row is written (zero where nothing selected it).
    """
    HK: tl.constexpr = H * K
    hh = tl.program_id(0)  # h * 2 + half
    h = hh // 2
    half = hh % 2
    rr = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    rd = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    rmask = rr < R
    dmask = rd < DH
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    colx = tl.zeros([BLOCK_R], dtype=tl.float32)
    colz = tl.zeros([BLOCK_R], dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        mmask = rm < M
        rm = rm.to(tl.int64)
        ay = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)  # token x sub-key coefficient matrices
        ax = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
        az = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
        for j in range(K):
            eo = half * M * HK + rm * HK + h * K + j
            hit = tl.load(sub_ptr + eo, mask=mmask, other=-1)[:, None] == rr[None, :]
            ay += tl.where(hit, tl.load(y_ptr + eo, mask=mmask, other=0.0)[:, None], 0.0)
            if HAS_X:
                ax += tl.where(hit, tl.load(x_ptr + eo, mask=mmask, other=0.0)[:, None], 0.0)
            if HAS_Z:
                az += tl.where(hit, tl.load(z_ptr + eo, mask=mmask, other=0.0)[:, None], 0.0)
        qh = tl.load(q_ptr + (rm[:, None] * H + h) * (2 * DH) + half * DH + rd[None, :],
                     mask=mmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        acc += tl.dot(tl.trans(ay), qh, input_precision=DOT_PRECISION)
        colx += tl.sum(ax, axis=0)
        colz += tl.sum(az, axis=0)
    ko = ((h * 2 + half) * R + rr[:, None]) * DH + rd[None, :]
    km = rmask[:, None] & dmask[None, :]
    if HAS_X:
        acc += colx[:, None] * tl.load(k_ptr + ko, mask=km, other=0.0).to(tl.float32)
    if HAS_Z:
        acc += colz[:, None] * tl.load(u_ptr + ko, mask=km, other=0.0).to(tl.float32)
    tl.store(dk_ptr + ko, acc.to(dk_ptr.dtype.element_ty), mask=km)


# --------------------------------------------------------------------------------------------- launchers

_BLOCK_M = 16   # tokens per program; tl.dot wants every block dim >= 16


def _check(q, keys, topk):
    if q.dim() != 3 or keys.dim() != 4 or keys.shape[1] != 2 or q.shape[1] != keys.shape[0]:
        raise ValueError(f"pkm_address: q {tuple(q.shape)} must be [M, H, d_k] and keys {tuple(keys.shape)} "
                         f"[H, 2, R, d_k/2] with the same H")
    if q.shape[2] != 2 * keys.shape[3]:
        raise ValueError(f"pkm_address: d_k={q.shape[2]} must equal 2 * keys.shape[3]={2 * keys.shape[3]}")
    if not 1 <= topk <= keys.shape[2]:
        raise ValueError(f"pkm_address: topk={topk} must be in [1, R={keys.shape[2]}]")


def _block_d(DH: int) -> int:
    return min(pow2(DH, 16), 32)


def _gather_block_m(k: int, DH: int) -> int:
    """Tokens per program of the sub-key gather kernels: [BM, k, BD] tiles of ~2K elements (no spills at sm_90)."""
    return max(1, min(16, 2048 // (pow2(k) * _block_d(DH))))


def address_fwd(q, keys, topk: int, score: str = "idw", eps: float = 1e-3, joint_softmax: bool = True):
    """Kernel launch: q [M, H, d_k], keys [H, 2, R, d_k/2] ->
    idx [M, H, k], weight [M, H, k], tops [2, M, H, k] (per-codebook top-k ids), top_scores [2, M, H, k] fp32."""
    _check(q, keys, topk)
    q, keys = q.contiguous(), keys.contiguous()
    M, H, d_k = q.shape
    R, DH = keys.shape[2], keys.shape[3]
    dev = q.device
    idx = torch.empty(M, H, topk, dtype=torch.long, device=dev)
    tops = torch.empty(2, M, H, topk, dtype=torch.long, device=dev)
    top_scores = torch.empty(2, M, H, topk, dtype=torch.float32, device=dev)
    weight = torch.empty(M, H, topk, dtype=torch.promote_types(q.dtype, keys.dtype), device=dev)
    if M:
        _address_fwd_kernel[(triton.cdiv(M, _BLOCK_M),)](
            q, keys, idx, weight, tops, top_scores, M, eps, H=H, R=R, DH=DH, K=topk, IDW=score == "idw",
            JOINT=joint_softmax, BLOCK_M=_BLOCK_M, BLOCK_R=pow2(R, 16), BLOCK_D=_block_d(DH),
            BLOCK_K=pow2(topk), BLOCK_HK=pow2(H * topk), num_warps=8)
    return idx, weight, tops, top_scores


def subkey_dot(q, keys, sub, u=None, score: str = "idw"):
    """Kernel launch: per entry of sub [2, M, H, k]: d ([2, M, H, k] fp32: ||q - K_r||^2 unclamped, or q.K_r
    for dot) and, with u [H, 2, R, d_k/2], b = <U_r, K_r - q> (IDW) or <U_r, q> (dot)."""
    _, M, H, k = sub.shape
    R, DH = keys.shape[2], keys.shape[3]
    d = torch.empty(sub.shape, dtype=torch.float32, device=q.device)
    b = torch.empty(sub.shape, dtype=torch.float32, device=q.device) if u is not None else None
    if M:
        bm = _gather_block_m(k, DH)
        _subkey_dot_kernel[(triton.cdiv(M, bm),)](
            q, keys, u if u is not None else keys, sub, d, b if b is not None else d, M, H=H, R=R, DH=DH, K=k,
            IDW=score == "idw", HAS_U=u is not None, BLOCK_M=bm, BLOCK_K=pow2(k), BLOCK_D=_block_d(DH))
    return d, b


def subkey_dq(q, keys, sub, y, x=None, z=None, u=None):
    """Kernel launch: dq [M, H, d_k] fp32 = sum over each token's entries of x q + y K_r + z U_r."""
    _, M, H, k = sub.shape
    R, DH = keys.shape[2], keys.shape[3]
    dq = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    if M:
        bm = _gather_block_m(k, DH)
        _subkey_dq_kernel[(triton.cdiv(M, bm),)](
            q, keys, u if u is not None else keys, sub, x if x is not None else y, y, z if z is not None else y, dq,
            M, H=H, R=R, DH=DH, K=k, HAS_X=x is not None, HAS_Z=z is not None, BLOCK_M=bm,
            BLOCK_K=pow2(k), BLOCK_D=_block_d(DH))
    return dq


def subkey_dk(q, keys, sub, y, x=None, z=None, u=None):
    """Kernel launch: dK [H, 2, R, d_k/2] fp32 = sum over entries selecting r of x K_r + y q_e + z U_r."""
    _, M, H, k = sub.shape
    R, DH = keys.shape[2], keys.shape[3]
    dk = torch.empty(keys.shape, dtype=torch.float32, device=keys.device)
    block_r, block_d = min(pow2(R, 16), 64), _block_d(DH)
    _subkey_dk_kernel[(2 * H, triton.cdiv(R, block_r), triton.cdiv(DH, block_d))](
        q, keys, u if u is not None else keys, sub, x if x is not None else y, y, z if z is not None else y, dk,
        M, H=H, R=R, DH=DH, K=k, HAS_X=x is not None, HAS_Z=z is not None, BLOCK_M=_BLOCK_M,
        BLOCK_R=block_r, BLOCK_D=block_d)
    return dk


def _idw_derivatives(d, eps: float):
    """f'(d), f''(d) of f(d) = -log(eps + max(d, 0)); zero where the clamp is active (as autograd of clamp_min)."""
    live = d >= 0
    inv = 1.0 / (eps + d.clamp_min(0))
    return torch.where(live, -inv, 0.0), torch.where(live, inv * inv, 0.0)


def subkey_grads(q, keys, sub, ds, score: str = "idw", eps: float = 1e-3, need_q: bool = True,
                 need_keys: bool = True):
    """Backpropagate score gradients ds [2, M, H, k] of the sub-keys sub [2, M, H, k] to (dq, dK), fp32."""
    q, keys, sub, ds = q.contiguous(), keys.contiguous(), sub.contiguous(), ds.float().contiguous()
    if score == "idw":
        fp, _ = _idw_derivatives(subkey_dot(q, keys, sub, score=score)[0], eps)
        c2 = 2 * ds * fp            # d dist2/dq = 2 q - 2 K_r, d dist2/dK_r = 2 K_r - 2 q
        x, y = c2, (-c2).contiguous()
    else:
        x, y = None, ds
    dq = subkey_dq(q, keys, sub, y, x=x) if need_q else None
    dk = subkey_dk(q, keys, sub, y, x=x) if need_keys else None
    return dq, dk


def _softmax_bwd(weight, dweight, joint_softmax: bool):
    """The score gradient of the read weights: w * (dw - sum w dw) over H*k (joint) or k (per head)."""
    w, dw = weight.float(), dweight.float()
    dims = (-2, -1) if joint_softmax else (-1,)
    return w * (dw - (w * dw).sum(dims, keepdim=True))


def address_bwd(q, keys, idx, weight, dweight, score: str = "idw", eps: float = 1e-3, joint_softmax: bool = True,
                need_q: bool = True, need_keys: bool = True):
    """The gradients (dq [M, H, d_k], dkeys [H, 2, R, d_k/2], fp32) from dweight [M, H, k]."""
    R = keys.shape[2]
    ds = _softmax_bwd(weight, dweight, joint_softmax)
    sub = torch.stack([idx // R, idx % R])        # entry (i, j) scores s1[i] + s2[j]
    return subkey_grads(q, keys, sub, torch.stack([ds, ds]), score, eps, need_q, need_keys)


# --------------------------------------------------------------------------- the addressing loss's key step


def _entropy_loss(top_scores, tops, R: int):
    """-H(p1_bar) - H(p2_bar) from the per-codebook top-k scores (== reference.addressing_loss).

    Outside its top-k a row's masked softmax is exactly zero, so p_bar only gathers the k entries.
    index_put(accumulate=True) is a sorted (deterministic) reduction on CUDA, unlike index_add.
    """
    loss = top_scores.new_zeros(())
    for s, top in zip(top_scores, tops):
        p = s.softmax(-1)                                                         # [M, H, k]
        p_bar = p.new_zeros(R).index_put((top.reshape(-1),), p.reshape(-1), accumulate=True) \
            / (top.shape[0] * top.shape[1])
        loss = loss + (p_bar * torch.log(p_bar + ENTROPY_EPS)).sum()
    return loss


def addressing_loss_topk(q, keys, tops, *, score: str = "idw", eps: float = 1e-3) -> torch.Tensor:
    """The marginal-entropy addressing loss from the per-codebook top-k only, in torch (differentiable twice).

    Equals `reference.addressing_loss(reference.pkm_address(q, keys, ...))`. q [M, H, d_k],
    keys [H, 2, R, d_k/2], tops [2, M, H, k] (from `address_fwd`, or `Address.sub_topk`).
    The scan does not use it (it runs `addressing_key_grad` / `addressing_key_hvp`); it is the readable
    definition the kernels are tested against.
    """
    H, _, R, dh = keys.shape
    heads = torch.arange(H, device=keys.device)[None, :, None]
    scores = []
    for half in range(2):
        qm = q[..., half * dh:(half + 1) * dh]                                    # [M, H, dh]
        km = keys[:, half][heads, tops[half]]                                     # [M, H, k, dh]
        dot = (qm[:, :, None, :] * km).sum(-1)
        if score == "idw":
            dot = -torch.log(eps + (qm.square().sum(-1, keepdim=True) - 2 * dot + km.square().sum(-1)).clamp_min(0))
        scores.append(dot)
    return _entropy_loss(torch.stack(scores), tops, R)


def addressing_key_grad(q, keys, tops, top_scores, *, score: str = "idw", eps: float = 1e-3,
                        weight: float = 1.0) -> torch.Tensor:
    """d(weight * addressing loss)/d keys, fp32 [H, 2, R, d_k/2]: the first-order key step of a chunk."""
    with torch.enable_grad():
        s = top_scores.detach().float().requires_grad_()
        (ds,) = torch.autograd.grad(weight * _entropy_loss(s, tops, keys.shape[2]), s)
    return subkey_grads(q, keys, tops, ds, score, eps, need_q=False)[1]


def addressing_key_hvp(q, keys, tops, u, *, score: str = "idw", eps: float = 1e-3, weight: float = 1.0,
                       need_q: bool = True):
    """(Hq [M, H, d_k], HK [H, 2, R, d_k/2]) = the derivatives of <u, addressing_key_grad(q, keys)> (fp32).

    The backward through a key step K' = K - key_lr * addressing_key_grad: dK += -key_lr * HK, dq += -key_lr * Hq.
    """
    q, keys, tops, u = q.contiguous(), keys.contiguous(), tops.contiguous(), u.float().contiguous()
    d, b = subkey_dot(q, keys, tops, u, score)
    if score == "idw":
        fp, fpp = _idw_derivatives(d, eps)
        s = -torch.log(eps + d.clamp_min(0))
        a = 2 * fp * b                                 # a_e = <U_r, ds_e/dK_r>
    else:
        s, a = d, b
    with torch.enable_grad():
        s = s.detach().requires_grad_()
        (F,) = torch.autograd.grad(weight * _entropy_loss(s, tops, keys.shape[2]), s, create_graph=True)
        (g,) = torch.autograd.grad(F, s, a)            # (d^2 L / ds^2) a
    F = F.detach()
    if score == "idw":
        alpha = 2 * g * fp + 4 * F * fpp * b
        beta = -2 * F * fp
        na = (-alpha).contiguous()
        hq = subkey_dq(q, keys, tops, na, x=alpha, z=beta, u=u) if need_q else None
        hk = subkey_dk(q, keys, tops, na, x=alpha, z=(-beta).contiguous(), u=u)
    else:
        hq = subkey_dq(q, keys, tops, g.contiguous(), z=F.contiguous(), u=u) if need_q else None
        hk = subkey_dk(q, keys, tops, g.contiguous())
    return hq, hk


# ----------------------------------------------------------------------------------------------- autograd


class PKMAddressFunction(torch.autograd.Function):
    """(q, keys) -> (idx, weight, tops, top_scores); only weight carries a gradient."""

    @staticmethod
    def forward(ctx, q, keys, topk, score, eps, joint_softmax):  # through the custom op: it has a fake (library.py)
        idx, weight, tops, top_scores = library.address_fwd(q, keys, topk, score, float(eps), joint_softmax)
        ctx.save_for_backward(q, keys, idx, weight)
        ctx.opts = (score, eps, joint_softmax)
        ctx.mark_non_differentiable(idx, tops, top_scores)
        return idx, weight, tops, top_scores

    @staticmethod
    def backward(ctx, _didx, dweight, _dtops, _dtop_scores):
        q, keys, idx, weight = ctx.saved_tensors
        score, eps, joint = ctx.opts
        dq, dkeys = library.address_bwd(q, keys, idx, weight, dweight.contiguous(), score, float(eps), joint,
                                        ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        dq, dkeys = library.empty_to_none(dq), library.empty_to_none(dkeys)
        return (dq.to(q.dtype) if dq is not None else None, dkeys.to(keys.dtype) if dkeys is not None else None,
                None, None, None, None)


# ------------------------------------------------------------------------------------------------- public


def pkm_address(q: torch.Tensor, keys: torch.Tensor, *, topk: int, score: str = "idw", eps: float = 1e-3,
                joint_softmax: bool = True) -> Address:
    """Product-key top-k lookup (method 2.2 and Eq. 11), fused; same contract as `reference.pkm_address`.

    Args:
        q: [M, H, d_k] queries (fp32 or bf16; computed in fp32).
        keys: [H, 2, R, d_k/2] sub-key codebooks.
        topk: k, per codebook and after merging the k*k candidates (1 <= k <= R).
        score: "idw" (-log(eps + ||q - K||^2)) or "dot".
        joint_softmax: softmax over all H*k entries of a token (FwPKM), else within each head (static PKM).
    Returns:
        Address(idx [M, H, k] int64, weight [M, H, k], top_scores=None, sub_topk [2, M, H, k]).
        Only `weight` is differentiable (to q and keys). `top_scores` is not returned; the addressing loss is
        computed from the top-k (`addressing_loss_topk`, `addressing_key_grad`).
    Raises:
        ValueError: on shape mismatches or topk outside [1, R].
    """
    if score not in ("idw", "dot"):
        raise ValueError(f"pkm_address: score={score!r} must be 'idw' or 'dot'")
    idx, weight, tops, _ = PKMAddressFunction.apply(q, keys, topk, score, eps, joint_softmax)
    return Address(idx, weight, None, tops)


__all__ = ["DOT_PRECISION", "PKMAddressFunction", "address_bwd", "address_fwd", "addressing_key_grad",
           "addressing_key_hvp", "addressing_loss_topk", "pkm_address", "subkey_dk", "subkey_dot", "subkey_dq",
           "subkey_grads"]
