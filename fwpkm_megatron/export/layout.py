"""Read a training checkpoint into ONE consolidated megatron-named state dict, whatever its layout.

A layout reader turns a checkpoint directory into `(state, config, meta)`: the full (unsharded)
megatron `model.state_dict()` with CPU tensors, the run config dict and {step, tokens_seen}. The rest
of the export (name mapping, HF directory) only ever sees that consolidated dict, so a sharded layout
(TP x PP x ZeRO shards, per-rank fast-weight states; the parallel-training issue) plugs in as one more
reader here that gathers its shards, without touching `convert.py` or `writer.py`.

Readers (the `LAYOUTS` table):
- `single_process`: trainer checkpoints `step_XXXXXXXX/{model.pt, trainer.pt, config.json, manifest.json}`;
  model.pt is already the consolidated dict.
- `distributed`: parallel runs' `step_XXXXXXXX/{dist/, rank_XXXXX/, config.json, manifest.json}` from any
  TP x PP x DP layout; `dist/` (megatron dist_checkpointing) is loaded into a TP=1, PP=1 model built in this
  process (`build_from_distributed`), whose `state_dict()` is the consolidated dict. Under `persistent_local`
  each DP rank kept its own memory: the export takes DP rank 0's unless `dp_rank` says otherwise, and `meta`
  records which (`fast_weight_replicas`, `memory_dp_rank`).
Every file is size-checked against its manifest and loaded with `torch.load(weights_only=True)` (dist/
through megatron's reader); the optimizer state is never read here.
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


def read_single_process(step_dir: Path, dp_rank: int | None = None
                        ) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """The single-process trainer layout: model.pt is already the full megatron state dict."""
    if dp_rank:
        raise ExportError(f"{step_dir}: a single-process checkpoint has one memory; dp_rank={dp_rank} does not exist")
    sizes = _manifest(step_dir)["files"]
    state = _load(step_dir, "model.pt", sizes)
    trainer = _load(step_dir, "trainer.pt", sizes) if "trainer.pt" in sizes else {}
    try:
        config = json.loads((step_dir / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{step_dir / 'config.json'}: unreadable ({exc})") from None
    meta = {"step": int(trainer.get("step", -1)), "tokens_seen": int(trainer.get("tokens_seen", -1)),
            "layout": "single_process", "checkpoint": str(step_dir.resolve()),
            "fast_weight_replicas": 1, "memory_dp_rank": None}
    return state, config, meta


def single_process_run(config: dict[str, Any]):
    """The RunConfig of `config` with the parallel layout reset to one process (TP = PP = VPP = 1, no ZeRO)."""
    import dataclasses

    from fwpkm_megatron.config import DeepSpeedConfig, ParallelConfig, from_dict

    run = from_dict(config)
    return dataclasses.replace(run, parallel=ParallelConfig(), deepspeed=DeepSpeedConfig())


def distributed_vocab_rows(dist_dir: Path) -> int:
    """Rows of the (TP-padded) embedding table stored in a dist_checkpointing directory."""
    from megatron.core import dist_checkpointing

    meta = dist_checkpointing.load_tensors_metadata(str(dist_dir))
    return int(meta["embedding.word_embeddings.weight"].global_shape[0])


def build_from_distributed(step_dir: Path, config: dict[str, Any], *, dp_rank: int | None = None,
                           with_optimizer: bool = False):
    """A TP=1, PP=1 model in this process loaded from `step_dir/dist` (written at any layout).

    Args:
        step_dir: a "distributed" step directory.
        config: its run config dict.
        dp_rank: which replica's memory to load when the fast weights are per DP rank (persistent_local);
            None = 0. Must be None or 0 otherwise.
        with_optimizer: also build the run's AdamW and load its moments (when the checkpoint has them).
    Returns:
        (model, optimizer or None, adamw_loaded, replicas, dp_rank used or None when the memory is shared).
    Raises:
        ExportError: dp_rank out of range; CheckpointError: dist/ missing or not loadable.
    """
    from fwpkm_megatron.memory import fast_weight_states
    from fwpkm_megatron.model import build_model
    from fwpkm_megatron.parallel.dist_checkpoint import load_distributed
    from fwpkm_megatron.parallel.groups import init_single_process
    from fwpkm_megatron.training.checkpoint import DIST_DIR
    from fwpkm_megatron.training.optim import build_optimizer

    from megatron.core import dist_checkpointing

    dist_dir = step_dir / DIST_DIR
    if not (dist_dir / "metadata.json").is_file():
        raise CheckpointError(f"{dist_dir}: missing or incomplete (no metadata.json)")
    run = single_process_run(config)
    init_single_process(run.train.seed)
    replicas = int((dist_checkpointing.load_content_metadata(str(dist_dir)) or {}).get("fast_weight_replicas", 1))
    if replicas == 1 and dp_rank:
        raise ExportError(f"{step_dir}: the fast weights are shared by all DP ranks (one memory); "
                          f"dp_rank={dp_rank} does not exist")
    chosen = None if replicas == 1 else (dp_rank or 0)
    if chosen is not None and not 0 <= chosen < replicas:
        raise ExportError(f"{step_dir}: dp_rank={chosen}: the checkpoint holds {replicas} per-DP-rank memories "
                          f"(persistent_local), ranks 0..{replicas - 1}")
    model = build_model(run, distributed_vocab_rows(dist_dir))
    if chosen is not None and with_optimizer:
        raise ExportError(f"{step_dir}: per-DP-rank memories ({replicas}) cannot be merged into one process "
                          "with their optimizer state")
    optimizer = build_optimizer(model, run.train)[0] if with_optimizer else None
    try:
        if chosen is None:
            adamw = load_distributed(dist_dir, [model], optimizer)
        else:
            _load_one_replica(dist_dir, model, chosen, replicas)
            adamw = False
    except ExportError:
        raise
    except Exception as exc:  # megatron raises CheckpointingException and others
        raise CheckpointError(f"{dist_dir}: cannot be loaded into a one-process model "
                              f"({type(exc).__name__}: {exc})") from None
    for state in fast_weight_states(model).values():
        state.replica = None
    return model, optimizer, adamw, replicas, chosen


def _load_one_replica(dist_dir: Path, model, dp_rank: int, replicas: int) -> None:
    """Load `model` with DP rank `dp_rank`'s fast weights of a persistent_local checkpoint.

    The fast-weight tensors carry a leading DP axis of `replicas` entries; this one process reads the whole
    axis (megatron's torch reader wants every stored shard read by someone) and keeps entry `dp_rank`.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor

    from fwpkm_megatron.memory import fast_weight_states
    from fwpkm_megatron.parallel.dist_checkpoint import model_sharded_state_dict

    sharded = model_sharded_state_dict([model])
    fast = {f"{name}.{k}": t for name, state in fast_weight_states(model).items()
            for k, t in state.state_dict().items()}
    whole = {}
    for name, t in fast.items():
        key = name  # fast-weight keys are their module paths (no layer renumbering at PP=1)
        whole[name] = ShardedTensor.from_rank_offsets(key, torch.empty(replicas, *t.shape, dtype=t.dtype),
                                                      replica_id=0)
        sharded["chunk0"].pop(name, None)
    loaded = dist_checkpointing.load({"model": sharded, "fast": whole}, str(dist_dir))
    state = dict(loaded["model"]["chunk0"])
    state.update({name: t[dp_rank] for name, t in loaded["fast"].items()})
    model.load_state_dict(state, strict=True)


def read_rank0_trainer_state(step_dir: Path) -> dict[str, Any]:
    """rank_00000/trainer.pt of a distributed checkpoint (step, schedule, data position, RNG, losses)."""
    rank_dir = step_dir / "rank_00000"
    return _load(rank_dir, "trainer.pt", _manifest(rank_dir)["files"])


def read_distributed(step_dir: Path, dp_rank: int | None = None
                     ) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """A parallel run's checkpoint (any TP x PP x DP): dist/ loaded into one TP=1, PP=1 model."""
    from fwpkm_megatron.training.checkpoint import checkpoint_manifest

    top = checkpoint_manifest(step_dir)
    try:
        config = json.loads((step_dir / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{step_dir / 'config.json'}: unreadable ({exc})") from None
    trainer = read_rank0_trainer_state(step_dir)
    model, _, _, replicas, chosen = build_from_distributed(step_dir, config, dp_rank=dp_rank)
    state = {k: (v.detach().cpu().clone() if torch.is_tensor(v) else v) for k, v in model.state_dict().items()}
    meta = {"step": int(trainer.get("step", -1)), "tokens_seen": int(trainer.get("tokens_seen", -1)),
            "layout": "distributed", "checkpoint": str(step_dir.resolve()), "source_layout": top.get("layout"),
            "fast_weight_replicas": replicas, "memory_dp_rank": chosen}
    return state, config, meta


# name -> (detector, reader). A sharded layout adds an entry; detectors must not overlap.
LAYOUTS: dict[str, tuple[Callable[[Path], bool], Callable]] = {
    "single_process": (lambda d: (d / "model.pt").is_file(), read_single_process),
    "distributed": (lambda d: (d / "dist").is_dir() and not (d / "model.pt").is_file(), read_distributed),
}


def read_checkpoint(path: str | Path, *, dp_rank: int | None = None):
    """(consolidated megatron state dict, run config dict, meta) of any supported checkpoint layout.

    Args:
        path: step dir, checkpoints root or run dir.
        dp_rank: under persistent_local (one memory per DP rank), whose memory to take; None = DP rank 0.
    Raises:
        ExportError: no reader recognises the directory (e.g. the older per-rank "sharded" kind), or
            dp_rank does not exist.
        CheckpointError: a file is missing, truncated or corrupt.
    """
    step_dir = resolve_checkpoint(path)
    for name, (detect, reader) in LAYOUTS.items():
        if detect(step_dir):
            return reader(step_dir, dp_rank)
    raise ExportError(f"{step_dir}: no reader for this checkpoint layout (known: {', '.join(LAYOUTS)}); "
                      "per-rank model.pt checkpoints (kind \"sharded\") resume only at their own layout: "
                      "resume and save again to get a distributed checkpoint")
