"""Load an export directory (or a training checkpoint, exported on the fly) with plain `transformers`.

`load_model(path)` is the one way evaluation gets a model: an export directory is verified against its
size/sha256 index and loaded with `AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)`;
a checkpoint (step dir, checkpoints root or run dir) is first exported into a temporary directory.
"""
from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path
from typing import Any

import torch

from fwpkm_megatron.export.hf.fwpkm_integrity import INDEX, verify_index

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def ensure_transformers_importable() -> None:
    """Make `transformers`' model classes importable where the installed torchvision cannot load.

    With CPU torch, PyPI's (CUDA) torchvision fails at import and takes `transformers.PreTrainedModel`
    down with it (transformers imports torchvision when it is installed). The data package's
    streaming shim defines the two missing op schemas; it is only needed when torchvision is present.
    """
    if importlib.util.find_spec("torchvision") is None:
        return
    try:
        torch.ops.torchvision.nms  # noqa: B018  (present when torchvision's C++ ops loaded)
        return
    except (AttributeError, RuntimeError):
        pass
    from fwpkm_megatron.data.streaming_compat import import_streaming

    import_streaming()


def is_export_dir(path: str | Path) -> bool:
    return (Path(path) / INDEX).is_file() or ((Path(path) / "config.json").is_file() and
                                             (Path(path) / "model.safetensors").is_file())


def load_model(path: str | Path, *, device: str = "cpu", dtype: str | None = None, verify_checksums: bool = True,
               **config_overrides: Any):
    """(model, tokenizer) from an export directory or a checkpoint.

    Args:
        path: export directory, or a checkpoint step dir / checkpoints root / run dir.
        device: "cpu" or "cuda" (or any torch device string).
        dtype: "fp32" | "bf16" for the slow weights (fast weights stay fp32); None = as exported.
        config_overrides: config fields, e.g. fwpkm_policy="persistent", fwpkm_update_chunk=512,
            fwpkm_carry_lookahead=True.
    Raises:
        fwpkm_megatron.export.hf.fwpkm_integrity.ExportIntegrityError: a file is missing, truncated or corrupt.
    """
    path = Path(path)
    if not is_export_dir(path):  # export to a temporary directory, loaded from and then removed
        from fwpkm_megatron.export.writer import export_checkpoint

        with tempfile.TemporaryDirectory(prefix="fwpkm-export-") as tmp:
            return load_model(export_checkpoint(path, Path(tmp) / "model"), device=device, dtype=dtype,
                              verify_checksums=verify_checksums, **config_overrides)
    verify_index(str(path), checksums=verify_checksums)
    ensure_transformers_importable()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = dict(config_overrides)
    if dtype is not None:
        kwargs["dtype"] = DTYPES[dtype]
    model = AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=True, verify_checksums=False, **kwargs)
    model.to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=True)
    return model, tokenizer
