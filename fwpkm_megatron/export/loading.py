"""Load an export directory (or a training checkpoint, exported on the fly) with plain `transformers`.

`load_model(path)` is the one way evaluation gets a model: an export directory is verified against its
size/sha256 index and loaded with `AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)`;
a checkpoint (step dir, checkpoints root or run dir) is first exported into a temporary directory,
removed once the model is in memory.

What loading trusts: an export is read with safetensors (no pickle), JSON and tokenizers; its
`modeling_fwpkm.py` is Python and runs (`trust_remote_code`), so load exports you trust. A training
checkpoint's `.pt` files are read with `torch.load(weights_only=True)`; a distributed checkpoint's
`dist/` is read by megatron-core / torch distributed checkpointing, whose `.metadata` file IS a pickle
(unpickled in full): load distributed checkpoints only from sources you trust.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from fwpkm_megatron.export.hf.fwpkm_integrity import verify_index
from fwpkm_megatron.export.runtime import DTYPES, ensure_transformers_importable, is_export_dir  # noqa: F401
from fwpkm_megatron.export.writer import export_checkpoint


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
    if is_export_dir(path):
        return _load_export(path, device, dtype, verify_checksums, config_overrides)
    tmp = Path(tempfile.mkdtemp(prefix="fwpkm-export-"))
    try:  # the weights are in memory once loaded: the temporary export is removed either way
        return _load_export(export_checkpoint(path, tmp / "model"), device, dtype, False, config_overrides)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _load_export(path: Path, device: str, dtype: str | None, verify_checksums: bool, config_overrides: dict):
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
