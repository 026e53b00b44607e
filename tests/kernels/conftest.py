"""Kernel tier: the Triton ops against `ops/reference.py`, on a GPU when present, else under the interpreter.

Without CUDA the kernels run under TRITON_INTERPRET=1, which Triton reads when a kernel is *defined*:
so this file sets it, imports the kernels, and puts the environment back, and a fixture sets it again
around each kernel test (the dispatcher checks it). Other test tiers never see the interpreter.

Fixtures: `nan_fill` (autouse) makes torch.empty/empty_like return NaN-filled float tensors and
sentinel-filled int tensors during kernel tests, so a kernel that leaves part of its output unwritten
fails loudly; `assert_close` compares with a stated ratio and logs the errors.
"""
from __future__ import annotations

import os

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRET = DEVICE == "cpu"

if INTERPRET:
    _before = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    from triton.runtime.interpreter import InterpretedFunction

    from fwpkm_megatron.ops.triton import address as _address

    if not isinstance(_address._address_fwd_kernel, InterpretedFunction):
        raise RuntimeError("fwpkm_megatron.ops.triton was imported before TRITON_INTERPRET=1 was set; "
                           "run the kernel tests in a fresh process")
    if _before is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = _before

INT_SENTINEL = -987_654_321  # an id no kernel produces: unwritten int outputs never look valid


@pytest.fixture(autouse=True)
def triton_interpreter(monkeypatch):
    if INTERPRET:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("FWPKM_BACKEND", raising=False)


def _fill(t: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        if t.is_floating_point():
            t.fill_(float("nan"))
        elif t.dtype in (torch.int32, torch.int64):
            t.fill_(INT_SENTINEL)
    return t


@pytest.fixture(autouse=True)
def nan_fill(monkeypatch):
    """Scratch allocations come back NaN (float) or INT_SENTINEL (int32/int64) instead of stale memory."""
    empty, empty_like = torch.empty, torch.empty_like
    monkeypatch.setattr(torch, "empty", lambda *a, **k: _fill(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: _fill(empty_like(*a, **k)))


def _assert_close(name: str, ref: torch.Tensor, tri: torch.Tensor, ratio: float) -> None:
    """max|ref - tri| <= ratio * max|ref| (a norm-wise relative error); NaN anywhere fails."""
    assert ref.shape == tri.shape, f"{name}: shape {tuple(tri.shape)} != reference {tuple(ref.shape)}"
    assert not torch.isnan(tri).any(), f"{name}: NaN in the Triton result (an unwritten output?)"
    ref, tri = ref.detach().double().cpu(), tri.detach().double().cpu()
    err = (ref - tri).abs().max().item() if ref.numel() else 0.0
    scale = ref.abs().max().item() if ref.numel() else 0.0
    rms = ((ref - tri).square().mean().sqrt() / ref.square().mean().sqrt().clamp_min(1e-300)).item() \
        if ref.numel() else 0.0
    print(f"{name:>12}: max abs err {err:.2e}, max |ref| {scale:.2e}, rms rel {rms:.2e}")
    assert err <= ratio * scale + 1e-30, f"{name}: max abs err {err:.3e} > {ratio} * max |ref| {scale:.3e}"


@pytest.fixture
def assert_close():
    return _assert_close


@pytest.fixture
def device():
    return DEVICE
