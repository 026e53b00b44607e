"""The chunked FwPKM scan (method 3.6, Algorithm 1) on the Triton kernels, with a hand-written reverse pass.

Same semantics and signatures as `reference.fwpkm_scan_rows` / `reference.fwpkm_scan`, options included
(score, addr_loss, per_sequence, detach_writes, lookahead), differentiable end to end to q, v, g, keys
and values, through every chunk's writes.

State during a scan (the kernel-side `RowOverlay`). The base table is never copied or written. Every
chunk's write appends the new versions of its touched rows to a row store, and `latest[N]` maps a slot
to its newest version (-1: still the base row). A read records, per entry, the version it read (`ptr`),
so versions are immutable and the backward reads exactly what the forward read, with no recompute of
the table and no O(N) work per chunk. When the backward will run, the base rows the scan read are
copied into the store as well (`rptr` points every read into the store): the caller may then commit
the written rows into `values` in place, as the FwPKM layer does, without corrupting the gradients.
The store holds the rows touched per chunk plus those base rows: what the backward needs (design
decision 9), plus int ids.

Reverse pass, per chunk from the last (G = cotangent of a row version, accumulated in `dstore`, and of
the base rows in `dbase`):
  1. key step  K' = K - key_lr * grad_K L_addr: its second-order term, a Hessian-vector product with
     dK' (`address.addressing_key_hvp`: sub-key gather kernels plus torch on [2, M, H, k] numbers);
     skipped under detach_writes, like the reference's first-order key step.
  2. write     one token pass (`read.token_bwd`) gathers G of the chunk's new versions and the rows
               read, giving dweight (write + read parts), dv_hat's write part, dgate; the new versions'
               G also flows unchanged to the versions they replaced (identity through the add).
  3. read      drows += w * dv_hat, a segmented (sorted, deterministic) reduction into dstore / dbase.
  4. address   dweight -> dq and dK (address.py backward kernels).
The forward key step is `address.addressing_key_grad`: the loss from the per-codebook top-k scores the
addressing kernel already wrote (torch on [2, M, H, k] numbers; it equals `reference.addressing_loss`,
whose masked entries carry no value and no gradient), then the sub-key gradient kernels. The ablation
addr_loss=False (the memorization MSE moves the keys) runs its key step in torch, gathering the H*k
rows per token: correct, but not fused.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..reference import ScanDiagnostics, ScanResult, mean_diagnostics, scan_targets
from .address import _entropy_loss, address_bwd, address_fwd, addressing_key_grad, addressing_key_hvp
from .read import read_fwd, scatter_rows, segments, token_bwd
from .write import write_fwd, write_scale


@dataclass(frozen=True)
class _Options:
    top_k: int
    chunk_size: int
    lookahead: int
    eps: float
    addr_loss_weight: float
    value_lr: float
    key_lr: float
    score: str
    addr_loss: bool
    detach_writes: bool
    diagnostics: bool = False


# ------------------------------------------------------------- torch key step of the addr_loss=False ablation


def _scores_at(q, keys, sub, half: int, score: str, eps: float):
    """Scores of codebook `half`'s sub-keys `sub` [M, H, k] for q [M, H, d_k] -> [M, H, k] (as reference)."""
    H, _, R, dh = keys.shape
    qm = q[..., half * dh:(half + 1) * dh]                                        # [M, H, dh]
    km = keys[:, half][torch.arange(H, device=keys.device)[None, :, None], sub]   # [M, H, k, dh]
    dot = (qm[:, :, None, :] * km).sum(-1)
    if score == "dot":
        return dot
    dist2 = (qm.square().sum(-1, keepdim=True) - 2 * dot + km.square().sum(-1)).clamp_min(0)
    return -torch.log(eps + dist2)


def _gather_rows(base, store, idx, ptr):
    """The rows a chunk read, materialised: [M, H, k, d_v] (only the addr_loss=False ablation needs this)."""
    flat, fptr = idx.reshape(-1), ptr.reshape(-1)
    rows = base[flat]
    if store.shape[0]:
        rows = torch.where((fptr >= 0)[:, None], store[fptr.clamp_min(0)], rows)
    return rows.view(*idx.shape, -1)


def _mse_key_loss(o: _Options, qc, K, idx, rows, target, gate, has, B: int, C: int):
    """Ablation addr_loss=False: the memorization MSE of the chunk's reads, as a function of the sub-keys (torch)."""
    R = K.shape[2]
    best = _scores_at(qc, K, idx // R, 0, o.score, o.eps) + _scores_at(qc, K, idx % R, 1, o.score, o.eps)
    w = best.flatten(-2).softmax(-1).view_as(best)
    v_hat = torch.einsum("mhk,mhkd->md", w, rows).view(B, C, -1)
    m = max(int(has.sum()) * B, 1)
    return 0.5 * (B * C / m) * ((gate * has)[..., None] * (v_hat - target).square()).sum()


# ------------------------------------------------------------------------------------------ forward


class _RowStore:
    """Append-only row versions [S, d_v], grown geometrically (versions are never overwritten)."""

    def __init__(self, D: int, dtype, device):
        self.buf = torch.empty(0, D, dtype=dtype, device=device)
        self.size = 0

    def reserve(self, n: int) -> int:
        if self.size + n > self.buf.shape[0]:
            grown = torch.empty(max(2 * self.buf.shape[0], self.size + n, 64), self.buf.shape[1],
                                dtype=self.buf.dtype, device=self.buf.device)
            grown[:self.size] = self.buf[:self.size]
            self.buf = grown
        offset, self.size = self.size, self.size + n
        return offset


def _scan_forward(q, v, g, keys, values, o: _Options, save: bool, sink: list | None = None):
    """Run the scan; returns (v_hat, keys, rows, row_values, idx) and, with `save`, what the backward needs.
    With `o.diagnostics` the `ScanResult.diagnostics` dict is appended to `sink`."""
    q, v, g, keys, values = (t.detach() for t in (q, v, g, keys, values))
    B, T, H, d_k = q.shape
    N, D = values.shape
    k, HK = o.top_k, H * o.top_k
    dev = q.device
    values = values.contiguous()
    latest = torch.full((N,), -1, dtype=torch.long, device=dev)   # slot -> newest version in the store
    store = _RowStore(D, values.dtype, dev)
    v_hat = torch.empty(B, T, D, dtype=torch.promote_types(q.dtype, values.dtype), device=dev)
    idx_out = torch.empty(B, T, H, k, dtype=torch.long, device=dev)
    K = keys.clone() if save else keys  # saved per chunk: must not follow in-place changes of the caller's
    chunks = []
    diag = ScanDiagnostics(dev) if o.diagnostics else None
    targets = scan_targets(v, o.chunk_size, o.lookahead)
    for start in range(0, T, o.chunk_size):
        end = min(start + o.chunk_size, T)
        C = end - start
        M = B * C
        qc = q[:, start:end].reshape(M, H, d_k).contiguous()
        idx, w, tops, top_scores = address_fwd(qc, K, k, o.score, o.eps, True)
        ptr = latest[idx]                                                # the version each entry reads
        vh = read_fwd(values, idx, w, store.buf, ptr, out_dtype=v_hat.dtype)
        v_hat[:, start:end] = vh.view(B, C, D)
        idx_out[:, start:end] = idx.view(B, C, H, k)
        target, has = (t[start // o.chunk_size] for t in targets)
        gate = g[:, start:end]
        if diag is not None:
            diag.add(_entropy_loss(top_scores.detach().float(), tops, K.shape[2]), vh.view(B, C, D), target, has)

        if o.addr_loss:  # the key step (first order here; the backward adds its second-order term)
            key_grad = addressing_key_grad(qc, K, tops, top_scores, score=o.score, eps=o.eps,
                                           weight=o.addr_loss_weight)
        else:
            with torch.enable_grad():
                K_in = K.detach().requires_grad_()
                rows = _gather_rows(values, store.buf[:store.size], idx, ptr)
                (key_grad,) = torch.autograd.grad(_mse_key_loss(o, qc, K_in, idx, rows, target, gate, has, B, C), K_in)
        K_next = K - o.key_lr * key_grad.to(K.dtype)

        write = None
        num_targets = B * max(C - o.lookahead, 0)  # tokens whose target lies inside the chunk (no host sync)
        if num_targets:
            seg = segments(idx.reshape(-1))
            r = (gate * has).reshape(-1).float().contiguous()
            coef = ((gate * has)[:, :, None, None] * w.view(B, C, H, k)).reshape(-1).float().contiguous()
            scale = write_scale(o.value_lr, B, C, H, k, num_targets)
            old = latest[seg.keys]
            offset = store.reserve(seg.keys.numel())
            write_fwd(seg, coef, vh, target.reshape(M, D), scale, HK, commit=(values, store.buf, old, offset))
            latest[seg.keys] = offset + torch.arange(seg.keys.numel(), device=dev)
            write = (seg, old, offset, scale, r)
        if save:
            chunks.append(dict(start=start, end=end, K=K, idx=idx, w=w, ptr=ptr, tops=tops, write=write))
        K = K_next
    rows = (latest >= 0).nonzero().flatten()
    pos = latest[rows]
    row_values = store.buf[pos]
    out = (v_hat, K, rows, row_values, idx_out)
    if diag is not None and sink is not None:
        sink.append(diag.result())
    if not save:
        return out, None
    # Snapshot the base rows the scan read: the caller may commit the written rows into `values` in place
    # before the backward runs (the layer does), so the backward reads every row from the store (`rptr`).
    base_ids = torch.unique(torch.cat([ch["idx"][ch["ptr"] < 0] for ch in chunks] + [idx_out.new_empty(0)]))
    snap = store.reserve(base_ids.numel())
    store.buf[snap:snap + base_ids.numel()] = values[base_ids]
    for ch in chunks:
        ch["rptr"] = torch.where(ch["ptr"] >= 0, ch["ptr"], snap + torch.searchsorted(base_ids, ch["idx"]))
    return out, dict(store=store.buf[:store.size], pos=pos, chunks=chunks)


# ----------------------------------------------------------------------------------------- backward


def _scan_backward(o: _Options, q, v, g, keys, table, v_hat, saved, dv_hat, dkeys_out, drow_values, needs):
    """Gradients to (q, v, g, keys, values); `table` = (N, d_v, dtype) of values, whose rows are not re-read."""
    B, T, H, d_k = q.shape
    N, D, values_dtype = table
    k, HK = o.top_k, H * o.top_k
    dev = q.device
    store, pos = saved["store"], saved["pos"]
    dq = torch.zeros(B, T, H, d_k, dtype=torch.float32, device=dev)
    dv = torch.zeros(B, T, D, dtype=torch.float32, device=dev)
    dg = torch.zeros(B, T, dtype=torch.float32, device=dev)
    dstore = torch.zeros(store.shape, dtype=torch.float32, device=dev)
    dbase = torch.zeros(N, D, dtype=torch.float32, device=dev) if needs[4] else None
    if drow_values is not None and pos.numel():
        dstore[pos] = drow_values.float()  # the newest versions are what the scan returned
    second_order = not o.detach_writes
    dK = dkeys_out.float() if (second_order and dkeys_out is not None) else torch.zeros_like(keys, dtype=torch.float32)
    dv_hat = dv_hat.float() if dv_hat is not None else torch.zeros(B, T, D, device=dev)

    targets = scan_targets(v, o.chunk_size, o.lookahead)
    for ch in reversed(saved["chunks"]):
        start, end = ch["start"], ch["end"]
        C = end - start
        M = B * C
        n_tgt = max(C - o.lookahead, 0)
        idx, w, ptr, rptr, K_c = ch["idx"], ch["w"], ch["ptr"], ch["rptr"], ch["K"]  # ptr: written by, rptr: read from
        qc = q[:, start:end].reshape(M, H, d_k).contiguous()
        target, has = (t[start // o.chunk_size] for t in targets)
        gate = g[:, start:end]

        # 1. key step K' = K - key_lr * grad_K L_key: its Hessian-vector product with dK'
        dq_c = torch.zeros(M, H, d_k, dtype=torch.float32, device=dev)
        dK_c = torch.zeros_like(dK)
        if second_order and o.addr_loss:
            hq, hk = addressing_key_hvp(qc, K_c, ch["tops"], dK, score=o.score, eps=o.eps, weight=o.addr_loss_weight)
            dq_c -= o.key_lr * hq
            dK_c = dK - o.key_lr * hk
        elif second_order:  # ablation: torch double backward, the MSE also sees the rows, targets and gate
            with torch.enable_grad():
                q_ = qc.detach().requires_grad_()
                K_ = K_c.detach().requires_grad_()
                rows = store[rptr.reshape(-1)].view(M, H, k, D).requires_grad_()
                target = target.detach().requires_grad_()
                gate = gate.detach().requires_grad_()
                extra = [rows, target, gate]
                loss = _mse_key_loss(o, q_, K_, idx, rows, target, gate, has, B, C)
                (kg,) = torch.autograd.grad(loss, K_, create_graph=True)
                grads = torch.autograd.grad(kg, [q_, K_, *extra], grad_outputs=dK, allow_unused=True)
            zero = lambda t, like: torch.zeros_like(like) if t is None else t  # noqa: E731
            dq_c -= o.key_lr * zero(grads[0], q_).float()
            dK_c = dK - o.key_lr * zero(grads[1], K_).float()
            drows, dtgt, dgate = (-o.key_lr * zero(t, like).float() for t, like in zip(grads[2:], extra))
            dst = torch.where(ptr >= 0, N + ptr, idx).reshape(-1)
            ones = torch.ones(M * HK, device=dev)
            scatter_rows(segments(dst), ones, drows.reshape(M * HK, D).contiguous(), 1, N, dbase, dstore)
            dv[:, start + o.lookahead:end] += dtgt[:, :n_tgt]
            dg[:, start:end] += dgate
            target, gate = target.detach(), gate.detach()

        # 2. write (token side) fused with the read's weight gradient; identity through the add
        dout = dv_hat[:, start:end].reshape(M, D).contiguous()
        write = ch["write"]
        write_args = None
        if write is not None and not o.detach_writes:
            seg, old, offset, scale, r = write
            write_args = dict(vhat=v_hat[:, start:end].reshape(M, D).float().contiguous(),
                              target=target.reshape(M, D).float().contiguous(), r=r, inverse=seg.inverse,
                              counts=seg.counts, grad=dstore, grad_offset=offset, scale=scale)
        dw, dres, dr = token_bwd(store, idx, w, dout, store, rptr, read=True, write=write_args)
        dvh = dout
        if write_args is not None:
            dvh = dout + dres
            dv[:, start + o.lookahead:end] -= dres.view(B, C, D)[:, :n_tgt]
            dg[:, start:end] += dr.view(B, C) * has
        if write is not None:  # new_u = old_u + delta_u: G_u also belongs to the version it replaced
            seg, old, offset = write[0], write[1], write[2]
            G = dstore[offset:offset + seg.keys.numel()]
            hit = old >= 0
            dstore[old[hit]] += G[hit]
            if dbase is not None:
                dbase[seg.keys[~hit]] += G[~hit]

        # 3. read: drows += w * dv_hat, segmented by destination (base row or store version)
        dst = torch.where(ptr >= 0, N + ptr, idx).reshape(-1)
        scatter_rows(segments(dst), w, dvh, HK, N, dbase, dstore)

        # 4. address: dweight -> dq, dK
        need_keys = second_order or (start == 0 and needs[3])  # else this chunk's dK reaches nothing
        dqa, dKa = address_bwd(qc, K_c, idx, w, dw.view(M, H, k), o.score, o.eps, True, need_keys=need_keys)
        dq[:, start:end] += (dq_c + dqa.float()).view(B, C, H, d_k)
        dK = dK_c + dKa.float() if need_keys else dK_c
    return (dq.to(q.dtype), dv.to(v.dtype), dg.to(g.dtype), dK.to(keys.dtype),
            dbase.to(values_dtype) if dbase is not None else None)


# ----------------------------------------------------------------------------------------- autograd


class FwPKMScanFunction(torch.autograd.Function):
    """(q, v, g, keys, values) -> (v_hat, keys', row_values, rows, idx) of one shared-state scan."""

    @staticmethod
    def forward(ctx, q, v, g, keys, values, opts, sink):
        (v_hat, keys_out, rows, row_values, idx), saved = _scan_forward(q, v, g, keys, values, opts, save=True,
                                                                        sink=sink)
        ctx.save_for_backward(q, v, g, keys, v_hat)  # not values: its rows read are in the saved store
        ctx.saved = saved  # intermediates (row store, per-chunk ids and weights): not inputs or outputs
        ctx.table = (values.shape[0], values.shape[1], values.dtype)
        ctx.opts = opts
        ctx.mark_non_differentiable(rows, idx)
        if opts.detach_writes:  # the reference detaches the keys after every chunk
            ctx.mark_non_differentiable(keys_out)
        return v_hat, keys_out, row_values, rows, idx

    @staticmethod
    def backward(ctx, dv_hat, dkeys, drow_values, _drows, _didx):
        q, v, g, keys, v_hat = ctx.saved_tensors
        grads = _scan_backward(ctx.opts, q, v, g, keys, ctx.table, v_hat, ctx.saved, dv_hat, dkeys, drow_values,
                               ctx.needs_input_grad)
        ctx.saved = None
        # under detach_writes v and g reach nothing (as in the reference, where they leave the graph)
        unused = (1, 2) if ctx.opts.detach_writes else ()
        return (*(gr if need and i not in unused else None
                  for i, (gr, need) in enumerate(zip(grads, ctx.needs_input_grad))), None, None)


def _scan_shared(q, v, g, keys, values, o: _Options) -> ScanResult:
    differentiable = torch.is_grad_enabled() and any(t.requires_grad for t in (q, v, g, keys, values))
    sink: list = []  # the diagnostics dict, passed around autograd (not an output)
    if differentiable:
        v_hat, keys_out, row_values, rows, idx = FwPKMScanFunction.apply(q, v, g, keys, values, o, sink)
    else:
        (v_hat, keys_out, rows, row_values, idx), _ = _scan_forward(q, v, g, keys, values, o, save=False, sink=sink)
    return ScanResult(v_hat, keys_out, rows, row_values, idx, diagnostics=sink[0] if sink else None)


# ------------------------------------------------------------------------------------------- public


def fwpkm_scan_rows(q, v, g, keys, values, *, top_k: int, chunk_size: int, lookahead: int = 1,
                    eps: float = 1e-3, addr_loss_weight: float = 1.0, value_lr: float = 1.0,
                    key_lr: float = 1.0, score: str = "idw", addr_loss: bool = True,
                    per_sequence: bool = False, detach_writes: bool = False, diagnostics: bool = False) -> ScanResult:
    """The chunked FwPKM scan on the Triton kernels, returning the written rows (see `reference.fwpkm_scan_rows`).

    Args:
        q: [B, T, H, d_k] queries; v: [B, T, d_v] value targets; g: [B, T] per-token loss weights.
        keys: [H, 2, R, d_k/2] sub-key codebooks; values: [N, d_v] value table, N = R*R (fp32 state).
        top_k, chunk_size, lookahead, eps, addr_loss_weight, value_lr, key_lr, score, addr_loss,
        per_sequence, detach_writes, diagnostics: as in the reference.
    Returns:
        ScanResult(v_hat [B, T, d_v], keys [H, 2, R, d_k/2], rows [U], row_values [U, d_v], idx [B, T, H, k]).
        Differentiable end to end when any input requires grad; under no_grad the writes are first order.
    Raises:
        ValueError: on inconsistent shapes or an unknown score.
    """
    if q.dim() != 4 or keys.dim() != 4 or q.shape[2] != keys.shape[0] or q.shape[3] != 2 * keys.shape[3]:
        raise ValueError(f"fwpkm_scan: q {tuple(q.shape)} must be [B, T, H, d_k] and keys {tuple(keys.shape)} "
                         f"[H, 2, R, d_k/2]")
    if values.shape[0] != keys.shape[2] ** 2 or v.shape[:2] != q.shape[:2] or g.shape != q.shape[:2]:
        raise ValueError(f"fwpkm_scan: values {tuple(values.shape)} must be [R*R, d_v], v {tuple(v.shape)} "
                         f"[B, T, d_v], g {tuple(g.shape)} [B, T]")
    if score not in ("idw", "dot") or chunk_size < 1:
        raise ValueError(f"fwpkm_scan: score={score!r} must be 'idw' or 'dot', chunk_size={chunk_size} >= 1")
    o = _Options(top_k, chunk_size, lookahead, eps, addr_loss_weight, value_lr, key_lr, score, addr_loss,
                 detach_writes, diagnostics)
    if not per_sequence:
        return _scan_shared(q, v, g, keys, values, o)
    parts = [_scan_shared(q[b:b + 1], v[b:b + 1], g[b:b + 1], keys, values, o) for b in range(q.shape[0])]
    no_rows = torch.empty(0, dtype=torch.long, device=values.device)
    return ScanResult(torch.cat([p.v_hat for p in parts]), keys, no_rows, values.new_empty(0, values.shape[1]),
                      torch.cat([p.idx for p in parts]), diagnostics=mean_diagnostics(parts))


def fwpkm_scan(q, v, g, keys, values, *, top_k: int, chunk_size: int, lookahead: int = 1, eps: float = 1e-3,
               addr_loss_weight: float = 1.0, value_lr: float = 1.0, key_lr: float = 1.0, **options):
    """Read-then-write FwPKM scan on the Triton kernels: (v_hat, keys, values) (see `reference.fwpkm_scan`)."""
    res = fwpkm_scan_rows(q, v, g, keys, values, top_k=top_k, chunk_size=chunk_size, lookahead=lookahead, eps=eps,
                          addr_loss_weight=addr_loss_weight, value_lr=value_lr, key_lr=key_lr, **options)
    new_values = values.index_copy(0, res.rows, res.row_values) if res.rows.numel() else values
    return res.v_hat, res.keys, new_values


__all__ = ["FwPKMScanFunction", "fwpkm_scan", "fwpkm_scan_rows"]
