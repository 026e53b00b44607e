"""The memory ops as torch custom ops (`torch.library.custom_op`), each with a fake implementation.

A fake (`register_fake`) gives an op's output shapes, dtypes and device without running it. That makes
the ops opaque, traceable units for FakeTensorMode and `torch.compile`, and lets the device audit run
the whole model on the `meta` device (tests/unit/test_device_audit.py): Triton cannot launch on meta
tensors, and the fakes say exactly what the kernels would return.

    fwpkm::address_fwd / address_bwd   Triton product-key addressing and its backward (triton/address.py)
    fwpkm::read_fwd / read_bwd         Triton sparse read and its backward (triton/read.py)
    fwpkm::scan_rows / scan_rows_bwd   the chunked FwPKM scan as one op, for tensors without storage
                                       (meta / fake): the Triton scan's row bookkeeping (nonzero, unique)
                                       has data-dependent shapes. Its real implementation is the reference
                                       math, the backward recomputing the forward under autograd.

The Triton autograd Functions call the address and read ops for every launch, so their contracts are
the ones the kernels run under. Triton is imported inside the real implementations only: importing this
module never decides between compiled and interpreted kernels.
"""
from __future__ import annotations

import torch
from torch import Tensor

_F32 = torch.float32


def _none_to_empty(t: Tensor | None, like: Tensor) -> Tensor:
    """Custom ops return tensors only: an unneeded gradient is an empty fp32 tensor."""
    return like.new_empty(0, dtype=_F32) if t is None else t


def empty_to_none(t: Tensor) -> Tensor | None:
    return None if t.numel() == 0 and t.dim() == 1 else t


# ------------------------------------------------------------------------------------------ addressing

@torch.library.custom_op("fwpkm::address_fwd", mutates_args=())
def address_fwd(q: Tensor, keys: Tensor, topk: int, score: str, eps: float,
                joint_softmax: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(idx [M,H,k] int64, weight [M,H,k], tops [2,M,H,k] int64, top_scores [2,M,H,k] fp32)."""
    from .triton.address import address_fwd as launch

    return tuple(launch(q, keys, topk, score, eps, joint_softmax))


@address_fwd.register_fake
def _(q, keys, topk, score, eps, joint_softmax):
    M, H, _ = q.shape
    weight_dtype = torch.promote_types(q.dtype, keys.dtype)
    return (q.new_empty(M, H, topk, dtype=torch.long), q.new_empty(M, H, topk, dtype=weight_dtype),
            q.new_empty(2, M, H, topk, dtype=torch.long), q.new_empty(2, M, H, topk, dtype=_F32))


@torch.library.custom_op("fwpkm::address_bwd", mutates_args=())
def address_bwd(q: Tensor, keys: Tensor, idx: Tensor, weight: Tensor, dweight: Tensor, score: str, eps: float,
                joint_softmax: bool, need_q: bool, need_keys: bool) -> tuple[Tensor, Tensor]:
    """(dq [M,H,d_k] fp32, dkeys [H,2,R,d_k/2] fp32); an unneeded one is empty."""
    from .triton.address import address_bwd as launch

    dq, dk = launch(q, keys, idx, weight, dweight, score, eps, joint_softmax, need_q=need_q, need_keys=need_keys)
    return _none_to_empty(dq, q), _none_to_empty(dk, q)


@address_bwd.register_fake
def _(q, keys, idx, weight, dweight, score, eps, joint_softmax, need_q, need_keys):
    return (q.new_empty(q.shape if need_q else (0,), dtype=_F32),
            q.new_empty(keys.shape if need_keys else (0,), dtype=_F32))


# ------------------------------------------------------------------------------------------------ read

@torch.library.custom_op("fwpkm::read_fwd", mutates_args=())
def read_fwd(values: Tensor, idx: Tensor, weight: Tensor) -> Tensor:
    """[M, d_v] in the promoted dtype of weight and values (fp32 accumulation)."""
    from .triton.read import read_fwd as launch

    return launch(values, idx, weight)


@read_fwd.register_fake
def _(values, idx, weight):
    return values.new_empty(idx.shape[0], values.shape[1], dtype=torch.promote_types(weight.dtype, values.dtype))


@torch.library.custom_op("fwpkm::read_bwd", mutates_args=())
def read_bwd(values: Tensor, idx: Tensor, weight: Tensor, dout: Tensor, need_values: bool,
             need_weight: bool) -> tuple[Tensor, Tensor]:
    """(dvalues [N, d_v] in values' dtype, dweight [M,H,k] in weight's dtype); an unneeded one is empty."""
    from .triton.read import scatter_rows, segments, token_bwd

    M, H, k = idx.shape
    dvalues = dweight = None
    if need_weight:
        dw, _, _ = token_bwd(values, idx, weight, dout)
        dweight = dw.view(M, H, k).to(weight.dtype)
    if need_values:
        acc = torch.zeros(values.shape, dtype=_F32, device=values.device)
        scatter_rows(segments(idx.reshape(-1)), weight, dout, H * k, values.shape[0], dbase=acc)
        dvalues = acc.to(values.dtype)
    return _none_to_empty(dvalues, values), _none_to_empty(dweight, values)


@read_bwd.register_fake
def _(values, idx, weight, dout, need_values, need_weight):
    return (values.new_empty(values.shape if need_values else (0,), dtype=values.dtype if need_values else _F32),
            values.new_empty(idx.shape if need_weight else (0,), dtype=weight.dtype if need_weight else _F32))


# ------------------------------------------------------------------------------------------------ scan

_SCAN_OPTS = ("top_k", "chunk_size", "lookahead", "eps", "addr_loss_weight", "value_lr", "key_lr", "score",
              "addr_loss", "per_sequence", "detach_writes")


def _reference_scan(q, v, g, keys, values, opts: dict):
    """The reference scan with autograd back on: a custom op's implementation runs below the autograd
    dispatch keys, and the scan's key step takes `torch.autograd.grad` of the addressing loss."""
    from . import reference

    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(),
                                         torch._C._dispatch_tls_local_exclude_set() - _autograd_keys()):
        return reference.fwpkm_scan_rows(q, v, g, keys, values, **opts)


def _autograd_keys():
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.AutogradCPU)
    for name in ("AutogradCUDA", "AutogradMeta", "ADInplaceOrView", "AutogradOther", "AutogradFunctionality"):
        key = getattr(torch._C.DispatchKey, name, None)
        if key is not None:
            keys = keys | torch._C.DispatchKeySet(key)
    return keys


@torch.library.custom_op("fwpkm::scan_rows", mutates_args=())
def scan_rows(q: Tensor, v: Tensor, g: Tensor, keys: Tensor, values: Tensor, top_k: int, chunk_size: int,
              lookahead: int, eps: float, addr_loss_weight: float, value_lr: float, key_lr: float, score: str,
              addr_loss: bool, per_sequence: bool, detach_writes: bool
              ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(v_hat [B,T,d_v], keys [H,2,R,d_k/2], rows [U] int64, row_values [U,d_v], idx [B,T,H,k] int64)."""
    opts = dict(zip(_SCAN_OPTS, (top_k, chunk_size, lookahead, eps, addr_loss_weight, value_lr, key_lr, score,
                                 addr_loss, per_sequence, detach_writes)))
    with torch.no_grad():
        res = _reference_scan(q, v, g, keys, values, opts)
    return tuple(t.clone() for t in res[:5])  # outputs of a custom op never alias its inputs (the optional
    # group_idx / diagnostics fields stay None: no memory group, no diagnostics through the op)


@scan_rows.register_fake
def _(q, v, g, keys, values, top_k, chunk_size, lookahead, eps, addr_loss_weight, value_lr, key_lr, score,
      addr_loss, per_sequence, detach_writes):
    B, T, H, _ = q.shape
    if per_sequence:
        written = 0
    else:
        try:  # FakeTensorMode: a data-dependent size
            written = torch.library.get_ctx().new_dynamic_size()
        except Exception:  # plain meta tensors: the most rows a scan can write
            written = min(values.shape[0], B * T * H * top_k)
    dtype = torch.promote_types(torch.promote_types(q.dtype, keys.dtype), values.dtype)
    return (v.new_empty(B, T, values.shape[1], dtype=dtype), torch.empty_like(keys, dtype=_F32),
            q.new_empty(written, dtype=torch.long), values.new_empty(written, values.shape[1]),
            q.new_empty(B, T, H, top_k, dtype=torch.long))


@torch.library.custom_op("fwpkm::scan_rows_bwd", mutates_args=())
def scan_rows_bwd(q: Tensor, v: Tensor, g: Tensor, keys: Tensor, values: Tensor, dv_hat: Tensor, dkeys: Tensor,
                  drow_values: Tensor, top_k: int, chunk_size: int, lookahead: int, eps: float,
                  addr_loss_weight: float, value_lr: float, key_lr: float, score: str, addr_loss: bool,
                  per_sequence: bool, detach_writes: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients to (q, v, g, keys, values): the forward recomputed under autograd."""
    opts = dict(zip(_SCAN_OPTS, (top_k, chunk_size, lookahead, eps, addr_loss_weight, value_lr, key_lr, score,
                                 addr_loss, per_sequence, detach_writes)))
    inputs = [t.detach().requires_grad_() for t in (q, v, g, keys, values)]
    with torch.enable_grad():
        res = _reference_scan(*inputs, opts)
        outs, cots = [], []
        for out, cot in ((res.v_hat, dv_hat), (res.keys, dkeys), (res.row_values, drow_values)):
            if out.requires_grad and cot.numel() == out.numel() and cot.numel():
                outs.append(out)
                cots.append(cot.view_as(out).to(out.dtype))
        grads = torch.autograd.grad(outs, inputs, cots, allow_unused=True) if outs else [None] * 5
    return tuple(torch.zeros_like(x) if gr is None else gr for gr, x in zip(grads, inputs))


@scan_rows_bwd.register_fake
def _(q, v, g, keys, values, dv_hat, dkeys, drow_values, *opts):
    return tuple(torch.empty_like(t) for t in (q, v, g, keys, values))


def _scan_setup_context(ctx, inputs, output):
    q, v, g, keys, values = inputs[:5]
    # the layer commits the written rows into `values` in place after the forward: keep the pre-scan table
    ctx.save_for_backward(q, v, g, keys, values.detach().clone())
    ctx.opts = inputs[5:]


def _scan_backward(ctx, dv_hat, dkeys, _drows, drow_values, _didx):
    q, v, g, keys, values = ctx.saved_tensors
    cots = [x if x is not None else q.new_zeros(0) for x in (dv_hat, dkeys, drow_values)]
    grads = torch.ops.fwpkm.scan_rows_bwd(q, v, g, keys, values, *cots, *ctx.opts)
    return (*grads, *([None] * len(ctx.opts)))


scan_rows.register_autograd(_scan_backward, setup_context=_scan_setup_context)


def fwpkm_scan_rows(q, v, g, keys, values, *, top_k: int, chunk_size: int, lookahead: int = 1, eps: float = 1e-3,
                    addr_loss_weight: float = 1.0, value_lr: float = 1.0, key_lr: float = 1.0, score: str = "idw",
                    addr_loss: bool = True, per_sequence: bool = False, detach_writes: bool = False):
    """`reference.fwpkm_scan_rows`'s contract through the `fwpkm::scan_rows` op -> ScanResult."""
    from .reference import ScanResult

    out = scan_rows(q, v, g, keys, values, top_k, chunk_size, lookahead, float(eps), float(addr_loss_weight),
                    float(value_lr), float(key_lr), score, addr_loss, per_sequence, detach_writes)
    return ScanResult(*out)


__all__ = ["address_bwd", "address_fwd", "empty_to_none", "fwpkm_scan_rows", "read_bwd", "read_fwd", "scan_rows",
           "scan_rows_bwd"]
