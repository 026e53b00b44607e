"""Memory ops behind one dispatcher: the only place that picks a backend.

`backend="auto"` uses Triton kernels on CUDA tensors and the reference on CPU; `FWPKM_BACKEND`
(`reference` | `triton`) overrides it, as an escape hatch for Triton versions that miscompile.
Layers import from here, never from `ops.reference` or `ops.triton` directly.
"""
from __future__ import annotations

import os

from . import reference
from .reference import Address, ScanResult, addressing_loss, pkm_address, pkm_read

BACKENDS = ("auto", "reference", "triton")


def resolve_backend(backend: str, device) -> str:
    """The backend that will actually run for tensors on `device`."""
    forced = os.environ.get("FWPKM_BACKEND")
    choice = forced or backend
    if choice not in BACKENDS:
        raise ValueError(f"memory-op backend {choice!r} (from {'FWPKM_BACKEND' if forced else 'config'}): "
                         f"must be one of {BACKENDS}")
    if choice == "auto":
        # Triton kernels land with the kernels issue; until then every device runs the reference.
        return "reference"
    if choice == "triton":
        raise NotImplementedError("memory-op backend 'triton' is not built yet; use 'reference' or 'auto'")
    return choice


def fwpkm_scan_rows(q, v, g, keys, values, *, backend: str = "auto", **kw) -> ScanResult:
    """Chunked FwPKM scan returning written rows (see `reference.fwpkm_scan_rows`)."""
    resolve_backend(backend, q.device)
    return reference.fwpkm_scan_rows(q, v, g, keys, values, **kw)


def fwpkm_scan(q, v, g, keys, values, *, backend: str = "auto", **kw):
    """Chunked FwPKM scan returning (v_hat, keys, values) (see `reference.fwpkm_scan`)."""
    resolve_backend(backend, q.device)
    return reference.fwpkm_scan(q, v, g, keys, values, **kw)


__all__ = ["Address", "ScanResult", "addressing_loss", "fwpkm_scan", "fwpkm_scan_rows", "pkm_address", "pkm_read",
           "resolve_backend"]
