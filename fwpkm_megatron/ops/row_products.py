"""The read and the write of the memory as one family of sparse products (method 3.2-3.4; docs/method.md).

A chunk's reads are a sparse [M, U] matrix A with k entries per token and head: A[r, cols[r, h, j]] +=
a[r, h, j] (a the read weights, cols the rows read, U the rows the chunk touches). The read is
`token_sum` = A X, the write `row_sum` = A^T Y, and their gradients the sampled dot D[r, h, j] =
<P[r], Q[cols[r, h, j]]>. Each backward is built from the other two, so every order of derivative stays
exact (the LM loss reaches through the writes with first-order autograd, gradcheck runs second order).

Shipped byte-identical with every export (export/writer.py), so it imports only torch, as `reference.py`.
"""
from __future__ import annotations

import torch

# On CPU the read and the sampled dot run as CSR products with one row per (token, head), whose k columns are
# distinct (one head's top-k slots), as `sampled_addmm` needs: no [M*H*k, d] temporary, 2-7x faster there
# (docs/performance.md). The write, once its [M*H*k, d] outer products outgrow the cache (CSR_WRITE_ABOVE
# elements), runs as the CSR product of the transpose, built by one sort of the slot ids (a CSC product, the
# transpose as it stands, is slower on CPU); below that the sort costs more than it saves. Elsewhere all three
# are gathers and index_adds.
CSR_ON_CPU = True  # tests switch it off to check the CSR form against the gather form
CSR_WRITE_ABOVE = 1 << 18  # tests set 0 to run the transposed CSR form on small inputs


def _csr(a: torch.Tensor, cols: torch.Tensor, n_cols: int) -> torch.Tensor:
    """[M*H, n_cols] CSR matrix with row (r, h) holding a[r, h, :] at columns cols[r, h, :]."""
    k = a.shape[-1]
    crow = torch.arange(0, a.numel() + 1, k, device=a.device)
    return torch.sparse_csr_tensor(crow, cols.reshape(-1), a.reshape(-1), size=(a.numel() // k, n_cols),
                                   check_invariants=False)


def _csr_transposed(a: torch.Tensor, cols: torch.Tensor, n_rows: int) -> torch.Tensor:
    """The transpose of `_csr(a, cols, n_rows)` as a [n_rows, M*H] CSR matrix: row u holds a[r, h, j] at column
    (r, h) for every cols[r, h, j] = u. A stable sort of the slot ids orders it, so each row's columns ascend
    (and the sums run in one fixed order); no row holds a column twice (one head's k slots are distinct)."""
    k = a.shape[-1]
    flat = cols.reshape(-1)
    order = flat.argsort(stable=True)
    crow = flat.new_zeros(n_rows + 1)
    torch.cumsum(torch.bincount(flat, minlength=n_rows), 0, out=crow[1:])
    return torch.sparse_csr_tensor(crow, order // k, a.reshape(-1)[order], size=(n_rows, a.numel() // k),
                                   check_invariants=False)


def _on_csr(t: torch.Tensor) -> bool:
    """CSR products on CPU in fp32/fp64 (torch has no CPU CSR matmul for bf16/fp16)."""
    return CSR_ON_CPU and t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64)


class _TokenSum(torch.autograd.Function):
    """out[r] = sum_{h, j} a[r, h, j] X[cols[r, h, j]]: a, cols [M, H, k], X [U, d] -> [M, d]."""

    @staticmethod
    def forward(ctx, a, cols, X):
        ctx.save_for_backward(a, cols, X)
        M, H, k = a.shape
        if _on_csr(X):
            out = _csr(a, cols, X.shape[0]) @ X
            return out if H == 1 else out.view(M, H, -1).sum(1)
        return torch.bmm(a.view(M, 1, H * k), X.index_select(0, cols.reshape(-1)).view(M, H * k, -1)).view(M, -1)

    @staticmethod
    def backward(ctx, grad):
        a, cols, X = ctx.saved_tensors
        grad_a = _SampledDot.apply(grad, X, cols) if ctx.needs_input_grad[0] else None
        grad_X = _RowSum.apply(a, cols, grad, X.shape[0]) if ctx.needs_input_grad[2] else None
        return grad_a, None, grad_X


class _RowSum(torch.autograd.Function):
    """S[u] = sum over (r, h, j) with cols[r, h, j] = u of a[r, h, j] Y[r]: a, cols [M, H, k], Y [M, d] -> [U, d]."""

    @staticmethod
    def forward(ctx, a, cols, Y, num_rows):
        ctx.save_for_backward(a, cols, Y)
        M, H, k = a.shape
        if _on_csr(Y) and a.numel() * Y.shape[1] > CSR_WRITE_ABOVE:  # Y repeated per head: columns are (token, head)
            return _csr_transposed(a, cols, num_rows) @ (Y if H == 1 else Y.repeat_interleave(H, 0))
        outer = (a.view(M, H * k, 1) * Y.view(M, 1, -1)).view(M * H * k, -1)  # broadcast: faster than a 1-wide bmm
        return Y.new_zeros(num_rows, Y.shape[1]).index_add(0, cols.reshape(-1), outer)

    @staticmethod
    def backward(ctx, grad):
        a, cols, Y = ctx.saved_tensors
        grad_a = _SampledDot.apply(Y, grad, cols) if ctx.needs_input_grad[0] else None
        grad_Y = _TokenSum.apply(a, cols, grad) if ctx.needs_input_grad[2] else None
        return grad_a, None, grad_Y, None


class _SampledDot(torch.autograd.Function):
    """D[r, h, j] = <P[r], Q[cols[r, h, j]]>: P [M, d], Q [U, d], cols [M, H, k] -> [M, H, k]."""

    @staticmethod
    def forward(ctx, P, Q, cols):
        ctx.save_for_backward(P, Q, cols)
        M, H, k = cols.shape
        if _on_csr(P):
            rows = P if H == 1 else P.repeat_interleave(H, 0)                     # one row per (token, head)
            pattern = _csr(P.new_ones(cols.shape), cols, Q.shape[0])
            return torch.sparse.sampled_addmm(pattern, rows, Q.t(), beta=0.0).values().view(cols.shape)
        return torch.bmm(Q.index_select(0, cols.reshape(-1)).view(M, H * k, -1), P.view(M, -1, 1)).view(M, H, k)

    @staticmethod
    def backward(ctx, grad):
        P, Q, cols = ctx.saved_tensors
        grad_P = _TokenSum.apply(grad, cols, Q) if ctx.needs_input_grad[0] else None
        grad_Q = _RowSum.apply(grad, cols, P, Q.shape[0]) if ctx.needs_input_grad[1] else None
        return grad_P, grad_Q, None


def token_sum(a: torch.Tensor, cols: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """The read: out[r] = sum_{h, j} a[r, h, j] X[cols[r, h, j]] (a, cols [M, H, k], X [U, d] -> [M, d]);
    the k columns of one (r, h) must be distinct (one head's top-k)."""
    return _TokenSum.apply(a.contiguous(), cols.contiguous(), X.contiguous())


def row_sum(a: torch.Tensor, cols: torch.Tensor, Y: torch.Tensor, num_rows: int) -> torch.Tensor:
    """The write, `token_sum`'s transpose: S[u] = sum of a[r, h, j] Y[r] over cols[r, h, j] = u
    (Y [M, d] -> [num_rows, d])."""
    return _RowSum.apply(a.contiguous(), cols.contiguous(), Y.contiguous(), num_rows)


__all__ = ["CSR_ON_CPU", "CSR_WRITE_ABOVE", "row_sum", "token_sum"]
