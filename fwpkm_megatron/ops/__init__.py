"""Memory ops behind one dispatcher: the only place that picks a backend.

`backend="auto"` uses Triton kernels on CUDA tensors (and their fakes on meta tensors, ops/library.py)
and the reference on CPU; `FWPKM_BACKEND`
(`reference` | `triton`) overrides it, as an escape hatch for Triton versions that miscompile.
Layers import from here, never from `ops.reference` or `ops.triton` directly.
"""
from __future__ import annotations

import os

import torch

from . import library, reference
from .fast_mlp import FastMLP, fwmlp_scan  # FwMLP: dense, one reference implementation on every device
from .reference import Address, ScanResult, TokenExchange, addressing_loss

BACKENDS = ("auto", "reference", "triton")
_TRUE = ("1", "true", "yes", "on")


def _interpreter_on() -> bool:
    """TRITON_INTERPRET is set: Triton kernels run on CPU tensors (slowly; tests only)."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in _TRUE


def resolve_backend(backend: str, device) -> str:
    """The backend that will actually run for tensors on `device`.

    `auto` is Triton on CUDA tensors and the reference elsewhere. `triton` on CPU tensors needs the
    Triton interpreter (TRITON_INTERPRET=1, set before triton is first imported).
    """
    forced = os.environ.get("FWPKM_BACKEND")
    choice = forced or backend
    source = "FWPKM_BACKEND" if forced else "config"
    if choice not in BACKENDS:
        raise ValueError(f"memory-op backend {choice!r} (from {source}): must be one of {BACKENDS}")
    device_type = torch.device(device).type
    if device_type == "meta":  # the device audit's stand-in for CUDA: the kernels' fakes run (ops/library.py)
        device_type = "cuda"
    if choice == "auto":
        return "triton" if device_type == "cuda" else "reference"
    if choice == "triton" and device_type != "cuda" and not _interpreter_on():
        raise NotImplementedError(
            f"memory-op backend 'triton' (from {source}) runs on CUDA tensors, or on CPU only under "
            f"TRITON_INTERPRET=1 set before triton is imported; got {device_type} tensors. "
            f"Use backend 'reference' or 'auto' here")
    return choice


def _kernels():
    """The Triton ops, imported on first use (the import decides compiled vs interpreted kernels)."""
    from . import triton as kernels

    return kernels


def pkm_address(q, keys, *, topk: int, score: str = "idw", eps: float = 1e-3, joint_softmax: bool = True,
                backend: str = "auto") -> Address:
    """Product-key top-k lookup (see `reference.pkm_address`). The Triton version leaves top_scores None."""
    if resolve_backend(backend, q.device) == "triton":
        return _kernels().pkm_address(q, keys, topk=topk, score=score, eps=eps, joint_softmax=joint_softmax)
    return reference.pkm_address(q, keys, topk=topk, score=score, eps=eps, joint_softmax=joint_softmax)


def pkm_read(values, idx, weight, *, backend: str = "auto"):
    """Weighted sum of the addressed rows (see `reference.pkm_read`)."""
    if resolve_backend(backend, values.device) == "triton":
        return _kernels().pkm_read(values, idx, weight)
    return reference.pkm_read(values, idx, weight)


def fwpkm_scan_rows(q, v, g, keys, values, *, backend: str = "auto", **kw) -> ScanResult:
    """Chunked FwPKM scan returning written rows (see `reference.fwpkm_scan_rows`).

    A memory group (`exchange`, M > 1) runs the reference scan: `auto` picks it on any device; an
    explicit `triton` is refused (the kernels have no group exchange yet). Tensors without storage (meta)
    take the `fwpkm::scan_rows` custom op, whose fake gives the outputs.
    """
    if kw.get("exchange") is not None:
        if backend == "triton" or os.environ.get("FWPKM_BACKEND") == "triton":
            raise NotImplementedError("a memory group (parallel.memory_parallel > 1) runs the reference scan; "
                                      "use fwpkm.backend=auto or reference")
        return reference.fwpkm_scan_rows(q, v, g, keys, values, **kw)
    if q.device.type == "meta" and kw.get("written") is None:
        return library.fwpkm_scan_rows(q, v, g, keys, values, **{k: x for k, x in kw.items() if k not in ("written", "diagnostics")})
    if resolve_backend(backend, q.device) == "triton":
        if kw.get("written") is not None:
            raise NotImplementedError("continuing from `written` rows is reference-only; use backend='reference'")
        return _kernels().fwpkm_scan_rows(q, v, g, keys, values, **{k: x for k, x in kw.items() if k not in ("written", "diagnostics")})
    return reference.fwpkm_scan_rows(q, v, g, keys, values, **kw)


def fwpkm_scan(q, v, g, keys, values, *, backend: str = "auto", **kw):
    """Chunked FwPKM scan returning (v_hat, keys, values) (see `reference.fwpkm_scan`)."""
    if resolve_backend(backend, q.device) == "triton":
        return _kernels().fwpkm_scan(q, v, g, keys, values, **kw)
    return reference.fwpkm_scan(q, v, g, keys, values, **kw)


__all__ = ["Address", "FastMLP", "ScanResult", "TokenExchange", "addressing_loss", "fwmlp_scan", "fwpkm_scan",
           "fwpkm_scan_rows", "pkm_address", "pkm_read", "resolve_backend"]
