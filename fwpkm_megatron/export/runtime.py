"""What both writing and loading an export need: dtypes, an importable transformers, tokenizer checks.

Import direction: `loading` -> `writer` -> `runtime` (and `loading` -> `runtime`); nothing here imports
either of them.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path
from typing import Any

import torch

from fwpkm_megatron.export.hf.fwpkm_integrity import INDEX
from fwpkm_megatron.export.layout import ExportError

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def ensure_transformers_importable() -> None:
    """Make `transformers`' model classes importable where an installed torchvision cannot load.

    The Makefile removes the CUDA torchvision wheel that mosaicml-streaming pulls in next to CPU torch,
    so a `make env` environment needs nothing here; an environment that still has a broken torchvision
    gets the data package's shim (the two op schemas transformers' import touches).
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


def tokenizer_identity(source: str | Path) -> dict[str, Any]:
    """{"sha256", "vocab_size", "path"} of a tokenizer: a prepared data dir (its manifest) or a tokenizer.json.

    The sha256 is of the tokenizer.json bytes the data was prepared with (what the manifest records),
    so a checkpoint, its export and any data can be compared.
    """
    source = Path(source)
    file = source if source.is_file() else source / "tokenizer.json"
    if not file.is_file():
        raise ExportError(f"{source}: no tokenizer.json")
    sha = hashlib.sha256(file.read_bytes()).hexdigest()
    vocab = None
    manifest = source / "manifest.json" if source.is_dir() else None
    if manifest is not None and manifest.is_file():
        info = json.loads(manifest.read_text())
        vocab = info.get("vocab_size")
        recorded = (info.get("tokenizer") or {}).get("sha256")
        if recorded and recorded != sha:
            raise ExportError(f"{file}: sha256 {sha[:12]}... differs from what {manifest} records "
                              f"({recorded[:12]}...): the tokenizer was replaced after the data was prepared")
    if vocab is None:
        from tokenizers import Tokenizer

        vocab = Tokenizer.from_file(str(file)).get_vocab_size(with_added_tokens=True)
    return {"sha256": sha, "vocab_size": int(vocab), "path": str(file)}


def check_data_fits(config, data_path: str | Path) -> None:
    """One clear error when prepared data was not tokenized for this model (another tokenizer, or ids
    beyond its vocabulary); silent otherwise. `config`: an exported FwPKMConfig."""
    data = tokenizer_identity(data_path)
    model_sha = getattr(config, "fwpkm_tokenizer_sha256", None)
    model_vocab = getattr(config, "tokenizer_vocab_size", None) or config.vocab_size
    problems = []
    if model_sha and data["sha256"] != model_sha:
        problems.append(f"it was tokenized with tokenizer sha256 {data['sha256'][:12]}..., the model with "
                        f"{model_sha[:12]}...")
    if data["vocab_size"] > model_vocab:
        problems.append(f"its vocabulary ({data['vocab_size']}) exceeds the model's ({model_vocab})")
    if problems:
        raise ExportError(f"{data_path}: does not fit the model: {'; '.join(problems)}")
