"""Reference definition of the FwPKM memory ops (docs/method.md; method notes section 3).

Pure PyTorch, dtype-generic (runs in float64 for gradient checks), written for reading, not speed.
Every kernel in `ops/triton/` must match these functions forward and backward.

Shape letters: B batch, T tokens, H heads, N = R*R slots, R sub-keys per codebook, k top-k,
C chunk, d_k query width (each codebook sees d_k/2), d_v value width, M = any flat token count.

The value table is never copied per chunk: a scan keeps the rows it has written in a small
`RowOverlay` (rows touched so far and their current, differentiable values) on top of the untouched
base table, so memory is O(rows touched), not O(N) per chunk (design decision 9). The single-process
scans hold the same state in a `RowStore`, written in place, whose backward costs O(rows read + written)
per chunk (docs/performance.md, "Scaling of the memory's hot path"). The product-key addressing is in
`addressing.py`, the read and the write themselves are sparse products in `row_products.py` (both shipped
with this file in every export).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

# the addressing is a module of its own; its names stay part of this one's interface
from .addressing import (ENTROPY_EPS, Address, addressing_key_grad, addressing_loss,  # noqa: F401
                         candidate_pairs, pkm_address, subkey_scores, topk_scores)
from .row_products import row_sum, token_sum


def pkm_read(values: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Weighted sum of the addressed rows, summed over heads: values [N, d_v], idx/weight [M, H, k] -> [M, d_v].

    Mixed dtypes (a bf16 table, fp32 weights) compute in the promoted dtype, as the Triton read does."""
    dtype = torch.promote_types(weight.dtype, values.dtype)
    return token_sum(weight.to(dtype), idx, values.to(dtype))


class RowOverlay:
    """A value table seen as an untouched base plus the rows written so far.

    `rows` is sorted and unique; `row_values[r]` is the current (differentiable) value of slot rows[r].
    With `streams` S > 1 it is S private tables over one base (per-sequence memories written as one
    batch): row id s*N + i is slot i of stream s.
    """

    def __init__(self, base: torch.Tensor, streams: int = 1):
        self.base = base
        self.num_slots, self.streams = base.shape[0], streams
        self.rows = torch.empty(0, dtype=torch.long, device=base.device)
        self.row_values = base.new_empty(0, base.shape[1])

    def base_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Untouched rows for flat row ids [M] -> [M, d_v]."""
        return self.base[ids if self.streams == 1 else ids % self.num_slots]

    def gather(self, idx: torch.Tensor) -> torch.Tensor:
        """Current rows for any index tensor: idx [...] -> [..., d_v]."""
        flat = idx.reshape(-1)
        out = self.base_rows(flat)
        if self.rows.numel():
            pos = torch.searchsorted(self.rows, flat).clamp_max(self.rows.numel() - 1)
            hit = self.rows[pos] == flat
            out = torch.where(hit[:, None], self.row_values[pos], out)
        return out.view(*idx.shape, -1)

    def add(self, rows: torch.Tensor, delta: torch.Tensor) -> None:
        """values[rows] += delta for sorted unique `rows` (out of place, so autograd sees every write)."""
        held = self.rows.numel()
        merged, at = torch.unique(torch.cat([self.rows, rows]), return_inverse=True)
        current = self.base_rows(merged)
        if held:
            current = current.index_copy(0, at[:held], self.row_values)
        self.row_values = current.index_add(0, at[held:], delta)
        self.rows = merged

    def materialize(self) -> torch.Tensor:
        """The full table with the overlay applied (one O(N) copy, at the end of a scan; one stream)."""
        if not self.rows.numel():
            return self.base
        return self.base.index_copy(0, self.rows, self.row_values)


class _StoreStep(torch.autograd.Function):
    """store[pos_i] += x_i in place for each pending (pos_i, x_i), then reads = store[read_pos]: one link
    of a `RowStore`'s chain.

    Each version of the store has exactly one consumer (the next link), so the backward owns the
    store's gradient: it adds the reads' gradients into it at read_pos and hands it on, O(reads + writes)
    per link instead of a dense [U, d_v] gradient per gather. Under create_graph the same sums run out
    of place as recorded ops, so the second-order path stays exact (the link is linear in store and x).
    """

    @staticmethod
    def forward(ctx, store, read_pos, *pending):  # pending: pos_0, x_0, pos_1, x_1, ...
        for pos, x in zip(pending[::2], pending[1::2]):
            store.index_add_(0, pos, x)
        ctx.mark_dirty(store)
        ctx.save_for_backward(read_pos, *pending[::2])
        return store, store.index_select(0, read_pos)

    @staticmethod
    def backward(ctx, grad_store, grad_reads):
        read_pos, *write_pos = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: differentiable, out of place
            grad_store = grad_store.index_add(0, read_pos, grad_reads)
        else:
            if grad_store._base is not None or not grad_store.is_contiguous():
                grad_store = grad_store.contiguous().clone()
            grad_store.index_add_(0, read_pos, grad_reads)
        grads = [grad for pos in write_pos for grad in (None, grad_store.index_select(0, pos))]
        return grad_store, None, *grads


class RowStore:
    """`RowOverlay`'s state for a scan: the rows read or written so far in one growing, in-place store.

    Row id r (s*N + i with `streams` S > 1) lives at store position `slot[r]` (-1: untouched, still in
    the base). A read first copies the untouched rows it needs from the base into the store, so every
    read is one `index_select` of the store (no per-read choice between store and base). A write is held
    back and applied, with those copies, by the next read (`_StoreStep`), so autograd sees a chain of
    in-place links whose backward costs O(rows read + written) per chunk, not O(rows touched).
    `capacity` sizes the store up front (a scan passes the most rows it can touch: its reads plus `written`,
    at most S*N), so it is zero-filled once; should more rows come, it doubles (a `cat`, O(U) per doubling).
    A base that requires grad (a trained table) is instead copied whole into the store, once: its gradient is
    then one [N, d_v] sum per scan, where copying rows in as they are first read would make one per chunk.
    The same values as `RowOverlay`, forward and backward; `state()` lists the rows written.
    """

    def __init__(self, base: torch.Tensor, streams: int = 1,
                 written: tuple[torch.Tensor, torch.Tensor] | None = None, capacity: int = 1):
        self.base = base
        self.num_slots, self.streams = base.shape[0], streams
        rows = self.num_slots * streams
        whole = base.requires_grad and torch.is_grad_enabled()
        self.store = base.repeat(streams, 1) if whole else base.new_zeros(max(1, min(capacity, rows)), base.shape[1])
        self.written = torch.zeros(self.store.shape[0], dtype=torch.bool, device=base.device)  # per store position
        self.slot = torch.arange(rows, device=base.device) if whole else torch.full(
            (rows,), -1, dtype=torch.long, device=base.device)
        self.used = rows if whole else 0
        self.pending: list[tuple[torch.Tensor, torch.Tensor]] = []            # (positions, rows to add)
        if written is not None and written[0].numel():
            pos = self._place(written[0])[0]
            start = written[1].to(self.store.dtype)
            self.pending.append((pos, start - self.base_rows(written[0]).to(start.dtype) if whole else start))
            self.written[pos] = True

    def base_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Untouched rows for flat row ids [M] -> [M, d_v] (index_select: far cheaper than [] on CPU)."""
        return self.base.index_select(0, ids if self.streams == 1 else ids % self.num_slots)

    def _place(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(store positions of unique `rows`, mask of the untouched ones or None if there are none); the
        untouched rows get new positions, whose content the caller makes pending."""
        pos = self.slot[rows]
        new = pos < 0
        count = int(new.sum())
        if not count:
            return pos, None
        if self.used + count > self.store.shape[0]:
            grow = max(self.store.shape[0], self.used + count - self.store.shape[0])
            self.store = torch.cat([self.store, self.store.new_zeros(grow, self.store.shape[1])])
            self.written = torch.cat([self.written, self.written.new_zeros(grow)])
        pos = pos.masked_scatter(new, torch.arange(self.used, self.used + count, device=pos.device))
        self.slot[rows] = pos
        self.used += count
        return pos, new

    def weighted_read(self, row_ids: torch.Tensor, weight: torch.Tensor):
        """One chunk's reads: row_ids, weight [M, H, k] -> (sum_{h,j} weight * current row [M, d_v], the chunk's
        (rows, inverse) from its one sort, which the write reuses)."""
        touched = torch.unique(row_ids.reshape(-1), return_inverse=True)
        return token_sum(weight, touched[1].view_as(row_ids), self.read(touched[0])), touched

    def read(self, rows: torch.Tensor) -> torch.Tensor:
        """Current values of unique `rows`: [len(rows), d_v]; copies untouched rows in first."""
        pos, new = self._place(rows)
        if new is not None:
            self.pending.append((pos[new], self.base_rows(rows[new]).to(self.store.dtype)))
        return self._step(pos)

    def _step(self, read_pos: torch.Tensor) -> torch.Tensor:
        """Apply the pending writes, then read the store at read_pos (one autograd link)."""
        pending = [t for pair in self.pending for t in pair]
        self.pending = []
        self.store, reads = _StoreStep.apply(self.store, read_pos, *pending)
        return reads

    def gather(self, idx: torch.Tensor) -> torch.Tensor:
        """Current rows for any index tensor: idx [...] -> [..., d_v]."""
        rows, inverse = torch.unique(idx.reshape(-1), return_inverse=True)
        return self.read(rows)[inverse].view(*idx.shape, -1)

    def add(self, rows: torch.Tensor, delta: torch.Tensor) -> None:
        """values[rows] += delta for unique `rows` (applied by the next read)."""
        pos, new = self._place(rows)
        delta = delta.to(self.store.dtype)
        if new is not None:  # untouched rows start from the base
            delta = delta.index_add(0, new.nonzero().view(-1), self.base_rows(rows[new]).to(delta.dtype))
        self.pending.append((pos, delta))
        self.written[pos] = True

    def state(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows [U] sorted unique, their values [U, d_v]) of the rows written so far."""
        rows = (self.slot >= 0).nonzero().view(-1)
        rows = rows[self.written[self.slot[rows]]]
        return rows, self._step(self.slot[rows])


def value_write(idx, weight, v_hat, target, gate, has_target, *, value_lr: float = 1.0, unique=None):
    """Closed-form value step of one chunk (method Eqs. 13-15 and 3.4, "exact value step").

    dV_i = -value_lr * (k*H) * (B*C / M) * (1 / N_read_i) * sum_{(b,t) reading i, with target} g_bt * w_bti * (v_hat_bt - target_bt)

    idx, weight [B, C, H, k]; v_hat, target [B, C, d_v]; gate [B, C]; has_target [B, C] bool.
    N_read counts all B*C*H*k reads of the chunk; M counts the tokens with a target.
    `unique` = torch.unique(idx.reshape(-1), return_inverse=True) when the caller has it already.
    Returns (rows [U] sorted unique, delta [U, d_v]), or None when no token has a target.
    """
    B, C, H, k = idx.shape
    num_targets = int(has_target.sum())
    if num_targets == 0:
        return None
    rows, inverse = torch.unique(idx.reshape(-1), return_inverse=True) if unique is None else unique
    reads = torch.bincount(inverse, minlength=rows.numel()).to(v_hat.dtype)         # N_read per touched row
    coef = ((gate * has_target)[:, :, None, None] * weight).reshape(B * C, H, k)
    sums = row_sum(coef, inverse.view(B * C, H, k), (v_hat - target).reshape(B * C, -1), rows.numel())
    scale = value_lr * (k * H) * (B * C / num_targets)
    return rows, sums * (-scale / reads)[:, None]


class ScanResult(NamedTuple):
    v_hat: torch.Tensor        # [B, T, d_v] reads, each with the state from before its chunk
    keys: torch.Tensor         # [H, 2, R, d_k/2] sub-keys after the last chunk
    rows: torch.Tensor         # [U] slots written during the scan (sorted unique)
    row_values: torch.Tensor   # [U, d_v] their values after the last chunk
    idx: torch.Tensor          # [B, T, H, k] slots read by each token
    group_idx: torch.Tensor | None = None  # [M*B, T, H, k] slots read by the memory group's tokens (M > 1)
    # with diagnostics=True (else None), detached fp32 scalars, means over the scan's chunks:
    # addr_loss, the unweighted L_addr (Eqs. 16-18) each chunk's keys saw; fw_mse, mean (v_hat - target)^2
    # over d_v and the tokens with a target, read before the chunk's write (what the write then reduces)
    diagnostics: dict[str, torch.Tensor] | None = None


def scan_targets(v: torch.Tensor, chunk_size: int, lookahead: int):
    """Every chunk's targets v_{t+lookahead} and the mask of tokens whose target lies inside their chunk, in
    one pass over v [B, T, d_v]: per-chunk tuples (target [B, C, d_v], has [C] bool).

    A token without a target (the last `lookahead` of its chunk) holds some row of v: every use masks it by
    `has` (weight 0 in the write, the key-step MSE and the diagnostics).
    """
    T = v.shape[1]
    pos = torch.arange(T, device=v.device)
    src = pos + lookahead
    has = src < ((pos // chunk_size + 1) * chunk_size).clamp_max(T)
    target = v.index_select(1, src.clamp_max(T - 1))
    return target.split(chunk_size, 1), has.split(chunk_size)


class ScanDiagnostics:
    """Running sums of `ScanResult.diagnostics` over a scan's chunks (both backends use it)."""

    def __init__(self, device):
        self.addr = torch.zeros((), device=device)
        self.sq_err = torch.zeros((), device=device)
        self.count = torch.zeros((), device=device)
        self.chunks = 0

    @torch.no_grad()
    def add(self, addr_loss, v_hat, target, has) -> None:
        """addr_loss 0-dim; v_hat, target [B, C, d_v]; has [C] bool (token has a target in the chunk)."""
        self.addr += addr_loss.float()
        self.sq_err += ((v_hat.float() - target.float()).square().mean(-1) * has).sum()
        self.count += has.sum() * v_hat.shape[0]
        self.chunks += 1

    def result(self) -> dict[str, torch.Tensor]:
        mse = torch.where(self.count > 0, self.sq_err / self.count.clamp_min(1), torch.nan)
        return {"addr_loss": self.addr / max(self.chunks, 1), "fw_mse": mse}


def mean_diagnostics(parts: list[ScanResult]) -> dict[str, torch.Tensor] | None:
    """Per-sequence scans: the mean of each sequence's diagnostics."""
    if not parts or parts[0].diagnostics is None:
        return None
    return {key: torch.stack([p.diagnostics[key] for p in parts]).mean() for key in parts[0].diagnostics}


def _rows_touched_at_most(q: torch.Tensor, top_k: int, written, group_size: int = 1) -> int:
    """The reads of a scan over q [B, T, H, d_k] (times the memory group's size) plus the rows it starts from."""
    B, T, H, _ = q.shape
    return group_size * B * T * H * top_k + (0 if written is None else written[0].numel())


def _scan_shared(q, v, g, keys, values, *, top_k, chunk_size, lookahead, eps, addr_loss_weight,
                 value_lr, key_lr, score, addr_loss, detach_writes, written=None, diagnostics=False,
                 streams: int = 1) -> ScanResult:
    """One state shared by the whole batch, read-then-write per chunk (starting from `written` rows, if any).

    With `streams` = B every sequence has its own state instead (per_sequence), all run as one batch:
    keys [B, H, 2, R, d_k/2] and a B-stream `RowStore`; the result then holds those private states
    (row ids s*N + i). The inputs are split into chunks once, so no chunk costs O(T).
    """
    B, T, H, _ = q.shape
    differentiable = torch.is_grad_enabled() and any(t.requires_grad for t in (q, v, g, keys, values))
    if streams > 1:
        keys = keys.unsqueeze(0).repeat(streams, *([1] * keys.dim()))        # [B, H, 2, R, d_k/2]
        offsets = (torch.arange(B, device=q.device) * values.shape[0]).view(B, 1, 1, 1)
    if written is not None and streams > 1:
        rows, row_values = written
        written = ((offsets.view(B, 1) + rows).reshape(-1), row_values.repeat(streams, 1))
    table = RowStore(values, streams, written=written, capacity=_rows_touched_at_most(q, top_k, written))
    outs, idxs = [], []
    diag = ScanDiagnostics(q.device) if diagnostics else None
    chunks = zip(q.split(chunk_size, 1), g.split(chunk_size, 1), *scan_targets(v, chunk_size, lookahead))
    for q_c, gate, target, has in chunks:
        C = q_c.shape[1]
        qc = q_c.reshape(B * C, H, -1) if streams == 1 else q_c              # [B*C | B, C, H, d_k]
        with torch.enable_grad():  # the ablation's key step needs autograd even in eval (then first-order only)
            k_in = keys if addr_loss or (differentiable and keys.requires_grad) else keys.detach().requires_grad_()
            addr = pkm_address(qc, k_in, topk=top_k, score=score, eps=eps)
            idx = addr.idx.reshape(B, C, H, top_k)
            rows_at = idx if streams == 1 else idx + offsets                  # row ids in the store
            v_hat, touched = table.weighted_read(rows_at.reshape(B * C, H, top_k), addr.weight.reshape(B * C, H, top_k))
            v_hat = v_hat.view(B, C, -1)
            if not addr_loss:  # ablation: no addressing loss, the memorization MSE moves the keys as well
                m = max(int(has.sum()) * B, 1)
                key_loss = 0.5 * (B * C / m) * ((gate * has)[..., None] * (v_hat - target).square()).sum()
                (key_grad,) = torch.autograd.grad(key_loss, k_in, retain_graph=differentiable,
                                                  create_graph=differentiable and not detach_writes)
        if addr_loss:  # streams: the gradient of each stream's loss (its keys see only its own)
            with torch.set_grad_enabled(differentiable and not detach_writes):
                key_grad = addressing_key_grad(addr, qc, k_in, weight=addr_loss_weight, score=score)
        if diag is not None:
            diag.add(addressing_loss(addr).detach().mean(), v_hat.detach(), target, has)
        weight = addr.weight.reshape(B, C, H, top_k)
        if not differentiable:
            v_hat, weight = v_hat.detach(), weight.detach()
        w_in = (weight, v_hat, target, gate)
        if detach_writes:  # ablation: first-order fast weights, the LM loss does not see through writes
            w_in = tuple(t.detach() for t in w_in)
        # streams: B*C/M = C/M_s and N_read counts each stream's own reads (distinct row ids)
        write = value_write(rows_at, *w_in, has.expand(B, C), value_lr=value_lr, unique=touched)
        if write is not None:
            table.add(*write)
        keys = k_in - key_lr * key_grad
        if not differentiable or detach_writes:
            keys = keys.detach()
        outs.append(v_hat)
        idxs.append(idx)
    return ScanResult(torch.cat(outs, 1), keys, *table.state(), torch.cat(idxs, 1),
                      diagnostics=None if diag is None else diag.result())


class TokenExchange:
    """The memory group of a scan: M processes whose token batches read and write one table together.

    Each process holds the same keys and columns `d/M` of the table (its slice of the value width d it
    would otherwise hold); tokens are ordered by process, then batch. The parallel layer supplies the
    communicating implementation (parallel/sharding.py); every method here is the M = 1 identity.
    Floating-point methods are differentiable: their backward is the transposed exchange.
    """

    size = 1

    def gather_tokens(self, x: torch.Tensor, what: str = "") -> torch.Tensor:
        """[B, ...] of this process -> [M*B, ...] of the group (the same on every process)."""
        return x

    def tokens_to_columns(self, x: torch.Tensor, what: str = "") -> torch.Tensor:
        """[B, C, d] of this process's tokens -> [M*B, C, d/M]: the group's tokens, this process's columns."""
        return x

    def columns_to_tokens(self, x: torch.Tensor, what: str = "") -> torch.Tensor:
        """The inverse of `tokens_to_columns`: [M*B, C, d/M] -> [B, C, d]."""
        return x

    def sum(self, x: torch.Tensor, what: str = "") -> torch.Tensor:
        """Sum over the group (differentiable: the backward sums the gradients too)."""
        return x


def _scan_group(q, v, g, keys, values, exchange: TokenExchange, *, private: bool, top_k, chunk_size, lookahead,
                eps, addr_loss_weight, value_lr, key_lr, score, addr_loss, detach_writes, written=None) -> ScanResult:
    """`_scan_shared` for a memory group: the M processes' B sequences each, read and written as one batch.

    This process holds columns d/M of the table (`values`) and its tokens' q, v columns d and gates.
    Per chunk: addresses and gates are gathered over the group, targets scattered to their columns'
    owners; each process reads and writes its columns for all M*B sequences (`value_write`, counts and
    the B*C/M factor over the group), and the reads go back to their tokens. With `private` every
    group sequence is a stream with its own rows (row id s*N + i) and moves its own keys (per_sequence, B = 1).
    """
    if not addr_loss:
        raise ValueError("a memory group (M > 1) needs the addressing loss (addr_loss=True)")
    B, T, H, _ = q.shape
    differentiable = torch.is_grad_enabled() and any(t.requires_grad for t in (q, v, g, keys, values))
    group_size = exchange.size * B
    offsets = (torch.arange(group_size, device=q.device) * values.shape[0]).view(-1, 1, 1, 1)
    if written is not None and private:
        written = ((offsets.view(-1, 1) + written[0]).reshape(-1), written[1].repeat(group_size, 1))
    table = RowStore(values, group_size if private else 1, written=written,
                     capacity=_rows_touched_at_most(q, top_k, written, exchange.size))
    outs, idxs, group_idxs = [], [], []
    chunks = zip(q.split(chunk_size, 1), g.split(chunk_size, 1), *scan_targets(v, chunk_size, lookahead))
    for q_c, g_c, target, has in chunks:
        C = q_c.shape[1]
        qc = q_c.reshape(B * C, H, -1)
        addr = pkm_address(qc, keys, topk=top_k, score=score, eps=eps)
        with torch.set_grad_enabled(differentiable and not detach_writes):
            key_grad = addressing_key_grad(addr, qc, keys, weight=addr_loss_weight, score=score,
                                           exchange=None if private else exchange)
        idx = addr.idx.view(B, C, H, top_k)
        weight = addr.weight.view(B, C, H, top_k)
        if not differentiable:
            weight = weight.detach()
        idx_all = exchange.gather_tokens(idx, "read")                    # [M*B, C, H, k]
        weight_all = exchange.gather_tokens(weight, "read")
        rows_at = idx_all + offsets if private else idx_all
        v_cols, touched = table.weighted_read(rows_at.reshape(-1, H, top_k), weight_all.reshape(-1, H, top_k))
        v_cols = v_cols.view(group_size, C, -1)
        v_hat = exchange.columns_to_tokens(v_cols, "read")               # [B, C, d]
        gate_all = exchange.gather_tokens(g_c, "write")
        target_cols = exchange.tokens_to_columns(target, "write")
        w_in = (weight_all, v_cols, target_cols, gate_all)
        if detach_writes or not differentiable:
            w_in = tuple(t.detach() for t in w_in)
        # private: B*C/M = C/M_s and N_read counts each stream's own reads (distinct row ids)
        write = value_write(rows_at, *w_in, has.expand(group_size, C), value_lr=value_lr, unique=touched)
        if write is not None:
            table.add(*write)
        keys = keys - key_lr * key_grad
        if not differentiable or detach_writes:
            keys = keys.detach()
        outs.append(v_hat if differentiable else v_hat.detach())
        idxs.append(idx)
        group_idxs.append(idx_all)
    rows, row_values = table.state() if not private else (
        torch.empty(0, dtype=torch.long, device=values.device), values.new_empty(0, values.shape[1]))
    return ScanResult(torch.cat(outs, 1), keys, rows, row_values, torch.cat(idxs, 1), torch.cat(group_idxs, 1))


def fwpkm_scan_rows(q, v, g, keys, values, *, top_k: int, chunk_size: int, lookahead: int = 1,
                    eps: float = 1e-3, addr_loss_weight: float = 1.0, value_lr: float = 1.0,
                    key_lr: float = 1.0, score: str = "idw", addr_loss: bool = True,
                    per_sequence: bool = False, detach_writes: bool = False,
                    written: tuple[torch.Tensor, torch.Tensor] | None = None,
                    exchange: TokenExchange | None = None, diagnostics: bool = False) -> ScanResult:
    """The chunked FwPKM scan, returning the written rows instead of a new full table.

    With `per_sequence`, every sequence starts from (keys, values) and its writes are private: the
    returned keys/rows describe no change to the shared state (keys is the input, rows empty).
    With `detach_writes` the writes carry no gradient (a first-order ablation; the paper has none).
    `written` = (rows, row_values) from an earlier scan continues that state without materializing it
    (a sequence-private memory kept as O(rows touched)); the result's rows then include them.
    With an `exchange` (a memory group of M > 1 processes) `values` holds this process's columns of the
    table and the group's sequences are one batch (`_scan_group`); v and the reads keep the full width.
    `diagnostics` fills `ScanResult.diagnostics` (a few extra reductions per chunk, no host sync; one
    process's scans only: a memory group's scan leaves it None).
    """
    kw = dict(top_k=top_k, chunk_size=chunk_size, lookahead=lookahead, eps=eps, addr_loss_weight=addr_loss_weight,
              value_lr=value_lr, key_lr=key_lr, score=score, addr_loss=addr_loss, detach_writes=detach_writes,
              written=written)
    if exchange is not None:  # no diagnostics in the group scan
        if not per_sequence:
            return _scan_group(q, v, g, keys, values, exchange, private=False, **kw)
        parts = [_scan_group(q[b:b + 1], v[b:b + 1], g[b:b + 1], keys, values, exchange, private=True, **kw)
                 for b in range(q.shape[0])]  # every process has B sequences: the loop runs in lockstep
    elif not per_sequence:
        return _scan_shared(q, v, g, keys, values, diagnostics=diagnostics, **kw)
    else:  # every sequence its own stream, all in one batched scan; the shared state is unchanged
        res = _scan_shared(q, v, g, keys, values, diagnostics=diagnostics, streams=q.shape[0], **kw)
        return ScanResult(res.v_hat, keys, torch.empty(0, dtype=torch.long, device=values.device),
                          values.new_empty(0, values.shape[1]), res.idx, diagnostics=res.diagnostics)
    no_rows = torch.empty(0, dtype=torch.long, device=values.device)
    group_idx = None if exchange is None else torch.cat([p.group_idx for p in parts])
    return ScanResult(torch.cat([p.v_hat for p in parts]), keys, no_rows, values.new_empty(0, values.shape[1]),
                      torch.cat([p.idx for p in parts]), group_idx, mean_diagnostics(parts))


def fwpkm_scan(q, v, g, keys, values, *, top_k: int, chunk_size: int, lookahead: int = 1, eps: float = 1e-3,
               addr_loss_weight: float = 1.0, value_lr: float = 1.0, key_lr: float = 1.0, **options):
    """Read-then-write FwPKM scan over chunks of one sequence batch (method 3.6, Algorithm 1).

    Args:
        q: [B, T, H, d_k] queries.
        v: [B, T, d_v] value targets (already z-scored when that is on).
        g: [B, T] per-token loss weights (the gate, or ones when gate-weighting is off).
        keys: [H, 2, R, d_k/2] sub-key codebooks; values: [N, d_v] value table, N = R*R.
        top_k, chunk_size, lookahead, eps: k, C, target offset, IDW epsilon.
        addr_loss_weight, value_lr, key_lr: addressing-loss weight and the fast-weight SGD steps.
        options: score ("idw"|"dot"), addr_loss, per_sequence, detach_writes (bools); see fwpkm_scan_rows.
    Returns:
        (v_hat [B, T, d_v], keys [H, 2, R, d_k/2], values [N, d_v]) - the reads and the state after the
        last chunk. Differentiable end to end when any input requires grad (no stop-gradient);
        under torch.no_grad the writes are first-order and carry no graph.
    """
    res = fwpkm_scan_rows(q, v, g, keys, values, top_k=top_k, chunk_size=chunk_size, lookahead=lookahead, eps=eps,
                          addr_loss_weight=addr_loss_weight, value_lr=value_lr, key_lr=key_lr, **options)
    new_values = values.index_copy(0, res.rows, res.row_values) if res.rows.numel() else values
    return res.v_hat, res.keys, new_values
