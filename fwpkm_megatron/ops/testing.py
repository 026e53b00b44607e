"""Seeded random inputs for the memory ops, shared by the reference tests and the kernel tests."""
from __future__ import annotations

import torch


def random_scan_inputs(B: int, T: int, H: int, R: int, d_k: int, d_v: int, *, seed: int = 0):
    """(q [B,T,H,d_k], v [B,T,d_v], g [B,T] in (0.1, 0.9), keys [H,2,R,d_k/2], values [R*R,d_v]) in the
    default dtype, on CPU. Scales keep IDW distances O(1), so top-k sets have no near-ties."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, d_k, generator=gen) * 0.5
    v = torch.randn(B, T, d_v, generator=gen)
    g = torch.rand(B, T, generator=gen) * 0.8 + 0.1
    keys = torch.randn(H, 2, R, d_k // 2, generator=gen) * 0.5
    values = torch.randn(R * R, d_v, generator=gen)
    return q, v, g, keys, values
