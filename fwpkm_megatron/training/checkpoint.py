"""Atomic, self-validating checkpoints for an exact resume (design decision 8).

Layout under `run_dir/checkpoints/`:

    step_00000123/
        model.pt        model.state_dict(): slow weights and the fast-weight buffers (fp32)
        optimizer.pt    AdamW state
        trainer.pt      everything else the trainer's state_dict() holds: step, tokens_seen, losses,
                        scheduler, train-stream position, RNG states (torch, random, numpy, megatron)
        config.json     RunConfig.to_dict() of the run that wrote it
        manifest.json   format version, step and the byte size of every file above; written last
    latest              text file naming the newest complete step directory

Parallel runs (the ParallelEngine) write a distributed checkpoint (`save_sharded_checkpoint` with
`write_dist`):

    step_00000123/
        dist/           megatron dist_checkpointing: the model with its fast weights and (plain AdamW)
                        the optimizer moments, each tensor once under a global key
                        (parallel/dist_checkpoint.py); loads at any TP x PP x DP layout
        rank_00000/ ... rank_{W-1}/   trainer.pt (+ optimizer.pt under ZeRO: its partition), manifest.json
        config.json     the run config
        manifest.json   kind "distributed", step, layout (world size, tp, pp, vpp, dp); written last

At the same layout every rank reads its own trainer.pt; at another layout every rank reads rank 0's
(step, scheduler, data position and loss history are the same on every rank; the RNG states are rank
0's). The older kind "sharded" (model.pt per rank instead of dist/) still resumes at the same layout.

A checkpoint is written into `step_00000123.tmp/` and `os.replace`d into place, then `latest` is
rewritten through a temporary file, so a crash at any point leaves the previous checkpoint intact and
`latest` pointing at a complete directory; the leftovers of an interrupted save (`step_*.tmp`) are
reported and removed on the next start. Every file is loaded with `torch.load(weights_only=True)`, so
a checkpoint directory can never run code: RNG states are stored as tensors and plain numbers, never as
pickled numpy objects, and a ZeRO optimizer state's few plain-data DeepSpeed classes are allowlisted.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT_VERSION = 1
LATEST = "latest"
STEP_DIR = re.compile(r"^step_(\d{8})$")
# Top-level keys of the trainer state that get a file of their own; the rest goes to trainer.pt.
SEPARATE_FILES = ("model", "optimizer")
DIST_DIR = "dist"  # the dist_checkpointing part of a distributed checkpoint


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or unreadable; the message names the offending file."""


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


# ----------------------------------------------------------------------------------------- RNG state

def capture_rng_state() -> dict[str, Any]:
    """RNG states of torch, python `random`, numpy and megatron's tracker, as weights_only-safe objects."""
    version, mt_state, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": {"version": version, "state": torch.tensor(mt_state, dtype=torch.int64), "gauss": gauss},
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
    }
    tracker = _megatron_rng_tracker()
    if tracker is not None:
        state["megatron"] = {k: v.clone() for k, v in tracker.get_states().items()}
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of `capture_rng_state`."""
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    nps = state["numpy"]
    np.random.set_state((nps["name"], nps["keys"].numpy().astype(np.uint32), nps["pos"],
                         nps["has_gauss"], nps["cached"]))
    tracker = _megatron_rng_tracker()
    if tracker is not None and "megatron" in state:
        tracker.set_states({k: v.clone() for k, v in state["megatron"].items()})


def _megatron_rng_tracker():
    """megatron's model-parallel RNG tracker when megatron is in use and seeded, else None."""
    if "megatron.core" not in sys.modules:  # never import megatron just to look at its RNG
        return None
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
    tracker = get_cuda_rng_tracker()
    return tracker if tracker.get_states() else None


# ------------------------------------------------------------------------------------------- saving

def save_checkpoint(root: str | Path, step: int, state: dict[str, Any], config: dict[str, Any],
                    *, keep_last: int) -> Path:
    """Write `state` (a trainer state_dict) atomically as `root/step_{step:08d}` and point `latest` at it.

    Args:
        root: the checkpoints directory (`run_dir/checkpoints`), created if missing.
        step: completed optimizer steps; names the directory.
        state: nested dict of tensors and plain values; `model` and `optimizer` get their own files.
        config: `RunConfig.to_dict()`, stored as JSON for readers and for resume checks.
        keep_last: how many step directories to keep (older ones are deleted after `latest` moves).
    Returns:
        The path of the finished step directory.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    tmp = root / (final.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)  # leftover of a save that crashed; never referenced by `latest`
    tmp.mkdir()

    sizes = _write_state_files(tmp, state)
    _write_text(tmp / "config.json", json.dumps(config, indent=2, sort_keys=True))
    manifest = {"format": FORMAT_VERSION, "step": step, "files": sizes}
    _write_text(tmp / "manifest.json", json.dumps(manifest, indent=2))
    _publish(root, tmp, final, keep_last)
    return final


def _write_state_files(directory: Path, state: dict[str, Any]) -> dict[str, int]:
    """torch.save `model`/`optimizer` into their own files and the rest into trainer.pt, fsynced; -> sizes."""
    files = {f"{key}.pt": state[key] for key in SEPARATE_FILES if key in state}
    files["trainer.pt"] = {k: v for k, v in state.items() if k not in SEPARATE_FILES}
    sizes = {}
    for name, obj in files.items():
        with open(directory / name, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        sizes[name] = (directory / name).stat().st_size
    return sizes


def _publish(root: Path, tmp: Path, final: Path, keep_last: int) -> None:
    """Rename a finished temporary step directory into place, move `latest` to it, prune old steps."""
    pointer = root / LATEST
    if final.exists() and pointer.is_file() and pointer.read_text().strip() == final.name:
        shutil.rmtree(tmp)  # `latest` already names this complete step: never move a directory it names
        return
    if final.exists():  # re-saving a step that `latest` does not name (written before a crash moved it)
        stale = root / (final.name + ".old")
        shutil.rmtree(stale, ignore_errors=True)
        os.replace(final, stale)
        os.replace(tmp, final)
        shutil.rmtree(stale)
    else:
        os.replace(tmp, final)
    _fsync_dir(root)
    write_atomic(root / LATEST, final.name + "\n")
    _prune(root, keep_last, keep=final.name)


def write_atomic(path: str | Path, text: str) -> None:
    """Write a text file through `path.tmp` + `os.replace`, so readers see the old or the new file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    _write_text(tmp, text)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _write_text(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _prune(root: Path, keep_last: int, keep: str) -> None:
    """Delete all but the newest `keep_last` step directories (never `keep`)."""
    steps = sorted(p.name for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name))
    for name in steps[:-keep_last] if keep_last > 0 else steps:
        if name != keep:
            shutil.rmtree(root / name)


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def save_sharded_checkpoint(root: str | Path, step: int, state: dict[str, Any], config: dict[str, Any], *,
                            keep_last: int, rank: int, world_size: int, layout: dict[str, int],
                            write_dist=None) -> Path:
    """Collective: every rank writes its trainer state into `root/step_{step}/rank_{rank}` (atomic as a whole).

    Rank 0 creates the temporary directory, every rank writes and fsyncs its files, rank 0 writes the
    manifest last, renames the directory into place and moves `latest`.

    Args:
        write_dist: `write_dist(directory)`, collective, writes the dist_checkpointing part into the
            (empty) `dist/` directory; the checkpoint is then of kind "distributed".
    """
    root = Path(root)
    final = root / step_dir_name(step)
    tmp = root / (final.name + ".tmp")
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        if write_dist is not None:
            (tmp / DIST_DIR).mkdir()
    _barrier()
    if write_dist is not None:
        write_dist(tmp / DIST_DIR)
    own = tmp / f"rank_{rank:05d}"
    own.mkdir()
    sizes = _write_state_files(own, state)
    _write_text(own / "manifest.json", json.dumps({"format": FORMAT_VERSION, "step": step, "files": sizes}))
    _barrier()
    if rank == 0:
        _write_text(tmp / "config.json", json.dumps(config, indent=2, sort_keys=True))
        kind = "sharded" if write_dist is None else "distributed"
        manifest = {"format": FORMAT_VERSION, "kind": kind, "step": step, "layout": layout}
        _write_text(tmp / "manifest.json", json.dumps(manifest, indent=2))
        _publish(root, tmp, final, keep_last)
    _barrier()
    return final


def checkpoint_kind(path: str | Path) -> str:
    """"single", "sharded" or "distributed"; "single" also when the manifest is missing or unreadable
    (then `load_checkpoint` reports the damage, naming the file)."""
    try:
        return checkpoint_manifest(path)["kind"]
    except (CheckpointError, TypeError):
        return "single"


def checkpoint_manifest(path: str | Path) -> dict[str, Any]:
    """The top-level manifest of a step directory; `kind` is "single" (one process), "sharded" or
    "distributed"."""
    path = Path(path)
    try:
        top = json.loads((path / "manifest.json").read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path / 'manifest.json'}: unreadable ({exc})") from None
    top.setdefault("kind", "single")
    return top


def load_distributed_checkpoint(path: str | Path, rank: int, layout: dict[str, int]
                                ) -> tuple[dict[str, Any], dict[str, Any], bool]:
    """The trainer state of a "distributed" checkpoint for this rank (the model is in `path/dist`).

    Returns:
        (state, config, same_layout): this rank's own files when the layout equals the saving run's,
        else rank 0's.
    Raises:
        CheckpointError: not a distributed checkpoint, or a missing/corrupt file.
    """
    path = Path(path)
    top = checkpoint_manifest(path)
    if top["kind"] != "distributed":
        raise CheckpointError(f"{path}: a {top['kind']!r} checkpoint, not a distributed one")
    if not (path / DIST_DIR / "metadata.json").is_file():
        raise CheckpointError(f"{path / DIST_DIR}: missing or incomplete (no metadata.json)")
    same = top["layout"] == layout
    state, _ = load_checkpoint_dir(path / f"rank_{rank if same else 0:05d}")
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path / 'config.json'}: unreadable ({exc})") from None
    return state, config, same


def load_sharded_checkpoint(path: str | Path, rank: int, world_size: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """This rank's state from a "sharded" checkpoint (per-rank model.pt) written at the same world size.

    Raises:
        CheckpointError: not a sharded checkpoint, another world size, or a missing/corrupt file.
    """
    path = Path(path)
    top = checkpoint_manifest(path)
    if top.get("kind") != "sharded":
        raise CheckpointError(f"{path}: a single-process checkpoint; a run on {world_size} processes resumes "
                              "only from a sharded checkpoint of the same layout")
    saved_world = top["layout"]["world_size"]
    if saved_world != world_size:
        raise CheckpointError(f"{path}: written by {saved_world} processes (layout {top['layout']}), "
                              f"this run has {world_size}; resume at the same layout")
    state, _ = load_checkpoint_dir(path / f"rank_{rank:05d}")
    config = json.loads((path / "config.json").read_text())
    return state, config


# ------------------------------------------------------------------------------------------ loading

def discard_partial_checkpoints(root: str | Path) -> list[str]:
    """Delete the leftovers of saves that a crash interrupted (`step_*.tmp`, `step_*.old`); one line each.

    `latest` never names them (it moves only after a step directory is complete and renamed), so they
    hold nothing a resume could use. Called by rank 0 before anything reads the checkpoints.
    """
    root = Path(root)
    if not root.is_dir():
        return []
    notes = []
    for path in sorted(root.iterdir()):
        if path.is_dir() and path.suffix in (".tmp", ".old") and STEP_DIR.match(path.stem):
            shutil.rmtree(path, ignore_errors=True)
            notes.append(f"ignored and removed {path}: an incomplete checkpoint (a save was interrupted)")
    return notes


def latest_checkpoint(root: str | Path) -> Path | None:
    """The step directory `root/latest` points at, or None when there is no `latest` file.

    Raises:
        CheckpointError: `latest` names a directory that does not exist.
    """
    pointer = Path(root) / LATEST
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    if not STEP_DIR.match(name) or not (Path(root) / name).is_dir():
        raise CheckpointError(f"{pointer}: points at {name!r}, which is not a checkpoint directory")
    return Path(root) / name


def load_checkpoint(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read and validate a step directory written by `save_checkpoint`.

    Returns:
        (state, config): the trainer state_dict (tensors on CPU) and the stored config dict.
    Raises:
        CheckpointError: a file is missing, has the wrong size (truncated) or cannot be decoded;
            the message names the file.
    """
    path = Path(path)
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        raise CheckpointError(f"{manifest_path}: missing (incomplete checkpoint)")
    try:
        manifest = json.loads(manifest_path.read_text())
        sizes = manifest["files"]
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{manifest_path}: unreadable ({exc})") from None
    if manifest.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{manifest_path}: format {manifest.get('format')!r}, "
                              f"this version reads {FORMAT_VERSION}")

    loaded = {}
    for name, size in sizes.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file}: missing")
        actual = file.stat().st_size
        if actual != size:
            raise CheckpointError(f"{file}: {actual} bytes, manifest says {size} (truncated or corrupt)")
        try:
            loaded[name] = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises several types (RuntimeError, UnpicklingError, EOFError)
            raise CheckpointError(f"{file}: cannot be loaded (corrupt?): {type(exc).__name__}: {exc}") from None
    config_path = path / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{config_path}: unreadable ({exc})") from None

    state = dict(loaded.pop("trainer.pt", {}))
    for key in SEPARATE_FILES:
        if f"{key}.pt" in loaded:
            state[key] = loaded.pop(f"{key}.pt")
    return state, config


def load_checkpoint_dir(path: Path) -> tuple[dict[str, Any], None]:
    """The files of one rank directory of a sharded checkpoint (validated against its manifest)."""
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        raise CheckpointError(f"{manifest_path}: missing (incomplete checkpoint)")
    sizes = json.loads(manifest_path.read_text())["files"]
    state: dict[str, Any] = {}
    for name, size in sizes.items():
        file = path / name
        if not file.is_file() or file.stat().st_size != size:
            raise CheckpointError(f"{file}: missing or not {size} bytes (truncated or corrupt)")
        try:
            with torch.serialization.safe_globals(_deepspeed_globals() if name == "optimizer.pt" else []):
                obj = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(f"{file}: cannot be loaded (corrupt?): {type(exc).__name__}: {exc}") from None
        if name == "trainer.pt":
            state.update(obj)
        else:
            state[name[:-3]] = obj
    return state, None


def _deepspeed_globals() -> list:
    """The plain-data classes a ZeRO optimizer state pickles (loss scaler, stage enum, fragment address):
    allowlisted for weights_only loading, so a checkpoint directory can still never run code."""
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address
    except ImportError:  # no DeepSpeed: its states cannot be loaded anyway
        return []
    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]
