"""The one device rule (style.md 11): every rank computes on `cuda:LOCAL_RANK` with NCCL when CUDA is
present, on the CPU with gloo otherwise. Everything else asks here (or takes `x.device` from a tensor).

The model is initialised on the host (megatron's `use_cpu_initialization=True`, so the initial weights
are the same numbers on CPU and GPU) and then moved to `rank_device()` before any wrapper (Float16Module,
DDP, DeepSpeed) sees it. Fast-weight state, batches, loss and grad-norm scalars and every buffer handed
to a collective live on that device.

`declare(device)` lets a test substitute another target (the device audit runs the model on the `meta`
device as a stand-in for CUDA, tests/unit/test_device_audit.py); production code never calls it.
"""
from __future__ import annotations

import os

import torch

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}

_declared: torch.device | None = None


def rank_device() -> torch.device:
    """This rank's device: `cuda:LOCAL_RANK` when CUDA is available, else the CPU (or the declared one)."""
    if _declared is not None:
        return _declared
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % max(torch.cuda.device_count(), 1))
    return torch.device("cpu")


def declare(device: str | torch.device | None) -> None:
    """Override `rank_device()` (tests only: the device audit's stand-in target); None restores the rule."""
    global _declared
    _declared = None if device is None else torch.device(device)


def dist_backend(choice: str = "auto") -> str:
    """`parallel.dist_backend`: auto = NCCL with CUDA, gloo on the CPU."""
    if choice != "auto":
        return choice
    return "nccl" if torch.cuda.is_available() else "gloo"


def select_device() -> torch.device:
    """Make `rank_device()` the current CUDA device (megatron allocates on `torch.cuda.current_device()`)."""
    device = rank_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def compute_dtype(precision: str) -> torch.dtype:
    """`train.precision` -> the dtype of parameters, activations and pipeline buffers."""
    return PRECISIONS[precision]


def precision_problem(precision: str, device: torch.device | None = None) -> str | None:
    """Why `train.precision` cannot run on `device` (None when it can).

    bf16 is probed with a small matmul and its backward: CUDA before Ampere and CPU builds without
    bf16 kernels fail there, well before a process group or a model exists.
    """
    if precision == "fp32":
        return None
    device = device or rank_device()
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return f"train.precision={precision}: {torch.cuda.get_device_name(device)} has no bf16 support; use fp32"
    if device.type == "meta":
        return None
    error = _bf16_matmul_error(device)
    if error:
        return f"train.precision={precision}: this {device.type} build has no bf16 matmul ({error}); use fp32"
    return None


def _bf16_matmul_error(device: torch.device) -> str | None:
    """Why a tiny bf16 matmul and its backward fail on `device` (None when they run)."""
    try:
        a = torch.ones(4, 4, dtype=torch.bfloat16, device=device, requires_grad=True)
        (a @ a).float().sum().backward()
    except (RuntimeError, NotImplementedError) as exc:
        return str(exc).splitlines()[0]
    return None


def host_float(t: torch.Tensor) -> float:
    """host sync: a device scalar as a Python float (the one place the engine's metrics leave the device)."""
    return float(t)


def collective_device(group=None) -> torch.device:
    """The device a tensor handed to a collective over `group` must be on (CUDA for NCCL, else the CPU)."""
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu") if _declared is None else _declared
