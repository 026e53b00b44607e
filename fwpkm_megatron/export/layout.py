"""Read a training checkpoint into ONE consolidated megatron-named state dict, whatever its layout.

A layout reader turns a checkpoint directory into `(state, config, meta)`: the full (unsharded)
megatron `model.state_dict()` with CPU tensors, the run config dict and {step, tokens_seen}. The rest
of the export (name mapping, HF directory) only ever sees that consolidated dict, so a sharded layout
(TP x PP x ZeRO shards, per-rank fast-weight states; the parallel-training issue) plugs in as one more
reader here that gathers its shards, without touching `convert.py` or `writer.py`.

Readers present now: `single_process` (trainer checkpoints `step_XXXXXXXX/{model.pt, trainer.pt,
config.json, manifest.json}`). Every file is size-checked against the checkpoint manifest and loaded with
`torch.load(weights_only=True)`; the optimizer state is never read.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch

from fwpkm_megatron.training.checkpoint import FORMAT_VERSION, CheckpointError, latest_checkpoint


class ExportError(RuntimeError):
    """The checkpoint cannot be exported (layout unknown or unsupported, names it does not map, ...)."""


def resolve_checkpoint(path: str | Path) -> Path:
    """A step directory, given itself, a `checkpoints/` root (its `latest`) or a run dir."""
    path = Path(path)
    if (path / "manifest.json").is_file():
        return path
    for root in (path, path / "checkpoints"):
        found = latest_checkpoint(root) if root.is_dir() else None
        if found is not None:
            return found
    raise ExportError(f"{path}: not a checkpoint step directory, checkpoints root or run dir "
                      "(no manifest.json and no `latest`)")


def _manifest(step_dir: Path) -> dict[str, Any]:
    path = step_dir / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
        manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: unreadable ({exc})") from None
    if manifest.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format {manifest.get('format')!r}, this version reads {FORMAT_VERSION}")
    return manifest


def _load(step_dir: Path, name: str, sizes: dict[str, int]) -> Any:
    file = step_dir / name
    if name not in sizes or not file.is_file():
        raise CheckpointError(f"{file}: missing")
    if file.stat().st_size != sizes[name]:
        raise CheckpointError(f"{file}: {file.stat().st_size} bytes, manifest says {sizes[name]} (truncated or corrupt)")
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types on corrupt files
        raise CheckpointError(f"{file}: cannot be loaded (corrupt?): {type(exc).__name__}: {exc}") from None


def read_single_process(step_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """The single-process trainer layout: model.pt is already the full megatron state dict."""
    sizes = _manifest(step_dir)["files"]
    state = _load(step_dir, "model.pt", sizes)
    trainer = _load(step_dir, "trainer.pt", sizes) if "trainer.pt" in sizes else {}
    try:
        config = json.loads((step_dir / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{step_dir / 'config.json'}: unreadable ({exc})") from None
    meta = {"step": int(trainer.get("step", -1)), "tokens_seen": int(trainer.get("tokens_seen", -1)),
            "layout": "single_process", "checkpoint": str(step_dir.resolve())}
    return state, config, meta


# name -> (detector, reader). A sharded layout adds an entry; detectors must not overlap.
LAYOUTS: dict[str, tuple[Callable[[Path], bool], Callable]] = {
    "single_process": (lambda d: (d / "model.pt").is_file(), read_single_process),
}


def read_checkpoint(path: str | Path):
    """(consolidated megatron state dict, run config dict, meta) of any supported checkpoint layout.

    Raises:
        ExportError: no reader recognises the directory (e.g. a sharded TP/PP checkpoint: not built yet).
        CheckpointError: a file is missing, truncated or corrupt.
    """
    step_dir = resolve_checkpoint(path)
    for name, (detect, reader) in LAYOUTS.items():
        if detect(step_dir):
            return reader(step_dir)
    raise ExportError(f"{step_dir}: no reader for this checkpoint layout (known: {', '.join(LAYOUTS)}); "
                      "sharded TP/PP checkpoints are read once parallel training lands")
