"""Reshard a checkpoint or an export into a run directory that resumes training at TP=K x PP=M.

    OUT/
        checkpoints/step_XXXXXXXX/   a "distributed" training checkpoint (training/checkpoint.py): dist/ holds
                                     model + fast weights (+ AdamW moments), rank_00000/ the trainer state
        checkpoints/latest
        config.yaml                  the run config with parallel.tp=K, parallel.pp=M, train.run_dir=OUT
        RESHARD.md                   source, what was carried, what restarted, how to resume

A distributed checkpoint loads at any TP x PP x DP layout (parallel/dist_checkpoint.py), so resharding
is a change of format, not a split per rank:
- a parallel run's checkpoint is copied as it is (every rank's files; exact, per-DP-rank memories and
  ZeRO partitions included), unless the target TP needs more vocab padding (below);
- a single-process checkpoint (model.pt, optimizer.pt, trainer.pt) is loaded into a one-process model
  and AdamW and saved as a distributed checkpoint: model, fast weights and AdamW moments carried exactly;
- an export directory (`fwpkm-export` output) is loaded back through `load_megatron_state`; the
  optimizer restarts (zero moments at AdamW step 0, exactly a fresh AdamW), the LR schedule continues
  at the exported step, and the data stream restarts at the beginning of the train split (an export
  keeps no data position). RESHARD.md and the console say so.

The target TP splits the vocab: megatron needs the embedding rows divisible by TP. `config.yaml` pins
`model.vocab_size` to the checkpoint's row count (padded up to a multiple of K with zero rows when
needed, Adam moments too), so every layout builds the same table.

OUT is built in a hidden sibling and renamed into place: complete or absent.
"""
from __future__ import annotations

import dataclasses
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

import torch
import yaml

from fwpkm_megatron.export.layout import (ExportError, build_from_distributed, distributed_vocab_rows,
                                          resolve_checkpoint, single_process_run)
from fwpkm_megatron.training import checkpoint as ckpt


def _target_config(config: dict[str, Any], *, tp: int, pp: int, vocab_rows: int, out: Path
                   ) -> tuple[dict[str, Any], list[str]]:
    """The run config for the target layout, and notes; raises ExportError when the model does not fit it."""
    from fwpkm_megatron.config import ConfigError, from_dict

    tree = json.loads(json.dumps(config))
    tree["parallel"].update(tp=tp, pp=pp, vpp=1)
    tree["model"]["vocab_size"] = vocab_rows
    tree["train"]["run_dir"] = str(out)
    notes = []
    if tree["parallel"]["num_microbatches"] < pp:  # a batch choice, not the checkpoint's: say, don't refuse
        notes.append(f"parallel.num_microbatches={tree['parallel']['num_microbatches']} < pp={pp}: set "
                     f"parallel.num_microbatches >= {pp} when launching (tokens per step scale with it)")
        checked = json.loads(json.dumps(tree))
        checked["parallel"]["num_microbatches"] = pp
    else:
        checked = tree
    try:
        from_dict(checked)
    except ConfigError as exc:
        raise ExportError(f"the model does not fit TP={tp} x PP={pp}: {exc}") from None
    return tree, notes


def _padded(rows: int, tp: int) -> int:
    return -(-rows // tp) * tp


def _pad_model_and_optimizer(model, optimizer, run, rows: int):
    """A copy of (model, AdamW) with the vocab tables grown to `rows` (zero rows, zero moments)."""
    from fwpkm_megatron.model import build_model
    from fwpkm_megatron.training.optim import build_optimizer

    bigger = build_model(run, rows)
    state = {}
    for name, value in model.state_dict().items():
        target = bigger.state_dict()[name]
        if torch.is_tensor(value) and torch.is_tensor(target) and value.shape != target.shape:
            value = torch.cat([value, value.new_zeros((target.shape[0] - value.shape[0], *value.shape[1:]))])
        state[name] = value
    bigger.load_state_dict(state)
    new_opt = build_optimizer(bigger, run.train)[0]
    if optimizer is not None:
        loaded = optimizer.state_dict()
        params = [p for g in new_opt.param_groups for p in g["params"]]
        for i, s in loaded["state"].items():
            for k in ("exp_avg", "exp_avg_sq"):
                v, shape = s[k], params[i].shape
                if v.shape != shape:
                    s[k] = torch.cat([v, v.new_zeros((shape[0] - v.shape[0], *v.shape[1:]))])
        new_opt.load_state_dict({"state": loaded["state"], "param_groups": new_opt.state_dict()["param_groups"]})
    return bigger, new_opt


def _fresh_trainer_state(run, step: int, scheduler) -> dict[str, Any]:
    """Trainer state for an export source: schedule at `step`, data stream at its start, fresh RNG."""
    from fwpkm_megatron.data import DataError, build_loader

    for _ in range(step):
        scheduler.step()
    try:
        stream = build_loader(run.data, "train", batch_size=run.train.micro_batch_size, seq_len=run.train.seq_len,
                              seed=run.train.seed, rank=0, world_size=1)
    except DataError as exc:
        raise ExportError(f"resharding an export needs the training data (for the data-stream state): {exc}") from None
    try:
        data = stream.state_dict()
    finally:
        stream.close()
    torch.manual_seed(run.train.seed)
    return {"scheduler": scheduler.state_dict(), "data": data, "rng": ckpt.capture_rng_state(), "step": step,
            "tokens_seen": 0, "losses": []}


def _load_source(source: Path, tp: int, dp_rank: int | None):
    """(model, optimizer or None, trainer state, config dict, meta, notes) of a single-process checkpoint
    or an export, loaded into one process."""
    from fwpkm_megatron.export.runtime import is_export_dir
    from fwpkm_megatron.export.writer import load_megatron_state
    from fwpkm_megatron.model import build_model
    from fwpkm_megatron.parallel.groups import init_single_process
    from fwpkm_megatron.training.optim import build_optimizer

    if dp_rank:
        raise ExportError(f"{source}: holds one fast-weight memory; dp_rank={dp_rank} does not exist")
    if is_export_dir(source):
        info = json.loads((source / "fwpkm_training.json").read_text())
        config, step = info["run_config"], int(info["step"])
        run = single_process_run(config)
        init_single_process(run.train.seed)
        state = load_megatron_state(source)
        model = build_model(run, int(state["embedding.word_embeddings.weight"].shape[0]))
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or [k for k in missing if not k.endswith("_extra_state")]:
            raise ExportError(f"{source}: does not fit the model of its own config "
                              f"(missing {missing[:4]}, unexpected {unexpected[:4]})")
        optimizer, scheduler = build_optimizer(model, run.train)
        trainer = _fresh_trainer_state(run, step, scheduler)
        trainer["tokens_seen"] = max(int(info.get("tokens_seen", 0)), 0)
        notes = ["optimizer state restarted: an export holds no AdamW moments (fresh AdamW at the next step)",
                 "data stream restarted at the beginning of the train split: an export holds no data position"]
        return model, optimizer, trainer, config, {"step": step, "kind": "export"}, notes
    state, config = ckpt.load_checkpoint(source)  # validated against the manifest, weights_only
    run = single_process_run(config)
    init_single_process(run.train.seed)
    model = build_model(run, int(state["model"]["embedding.word_embeddings.weight"].shape[0]))
    model.load_state_dict(state.pop("model"))
    optimizer = build_optimizer(model, run.train)[0]
    optimizer.load_state_dict(state.pop("optimizer"))
    return model, optimizer, state, config, {"step": int(state["step"]), "kind": "single-process"}, []


def reshard_checkpoint(source: str | Path, out: str | Path, *, tp: int, pp: int, overwrite: bool = False,
                       dp_rank: int | None = None) -> Path:
    """Write a run directory that `fwpkm-train` / `fwpkm-launch` resume at TP=tp x PP=pp (module doc).

    Args:
        source: a training checkpoint (step dir, checkpoints root or run dir) or an export directory.
        out: the run directory to create (must not exist unless overwrite).
        tp, pp: the target layout (any DP; checked against the model).
        dp_rank: only for the exceptional path below; per-DP-rank memories are otherwise copied whole.
    Returns:
        `out`.
    Raises:
        ExportError: the model does not fit the target layout, OUT exists, or the source cannot be resharded.
        CheckpointError: a source file is missing, truncated or corrupt.
    """
    from fwpkm_megatron.export.runtime import is_export_dir

    if tp < 1 or pp < 1:
        raise ExportError(f"tp={tp}, pp={pp}: must be >= 1")
    out = Path(out).absolute()
    if out.exists() and not overwrite:
        raise ExportError(f"{out}: exists; pass overwrite=True (--overwrite) to replace it")
    source = Path(source)
    if not is_export_dir(source):
        source = resolve_checkpoint(source)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        kind = "export" if is_export_dir(source) else ckpt.checkpoint_kind(source)
        notes: list[str] = []
        if kind == "distributed":
            config = json.loads((source / "config.json").read_text())
            rows = distributed_vocab_rows(source / ckpt.DIST_DIR)
            step = int(ckpt.checkpoint_manifest(source)["step"])
            if rows % tp == 0:  # copy as it is: loads at any layout, exactly
                shutil.copytree(source, tmp / "checkpoints" / source.name)
                ckpt.write_atomic(tmp / "checkpoints" / ckpt.LATEST, source.name + "\n")
                notes.append("distributed checkpoint copied unchanged (it loads at any TP x PP layout); "
                             "the optimizer state is carried as the source holds it")
                target, more = _target_config(config, tp=tp, pp=pp, vocab_rows=rows, out=out)
                notes += more
                _finish(tmp, source, target, notes, step)
                return _replace(tmp, out)
            model, optimizer, adamw, replicas, _ = build_from_distributed(source, config, dp_rank=dp_rank,
                                                                         with_optimizer=True)
            if replicas > 1:
                raise ExportError(f"{source}: persistent_local memories of {replicas} DP ranks and an embedding of "
                                  f"{rows} rows that TP={tp} cannot split: reshard to a TP that divides {rows}")
            from fwpkm_megatron.export.layout import read_rank0_trainer_state

            trainer = read_rank0_trainer_state(source)
            trainer.pop("optimizer", None)
            if not adamw:
                notes.append("optimizer state restarted: the source holds ZeRO partitions, not resharded")
        elif kind == "single":
            model, optimizer, trainer, config, meta, notes = _load_source(source, tp, dp_rank)
            step = meta["step"]
        elif kind == "export":
            model, optimizer, trainer, config, meta, notes = _load_source(source, tp, dp_rank)
            step = meta["step"]
        else:
            raise ExportError(f"{source}: a {kind!r} checkpoint (per-rank model.pt) resumes only at its own layout; "
                              "resume it and save again to get a distributed checkpoint")
        run = single_process_run(config)
        rows = int(model.state_dict()["embedding.word_embeddings.weight"].shape[0])
        if rows % tp:
            notes.append(f"vocab table padded from {rows} to {_padded(rows, tp)} rows (zeros) for TP={tp}")
            model, optimizer = _pad_model_and_optimizer(model, optimizer, run, _padded(rows, tp))
            rows = _padded(rows, tp)
        target, more = _target_config(config, tp=tp, pp=pp, vocab_rows=rows, out=out)
        notes += more
        _write_distributed(tmp / "checkpoints", model, optimizer, trainer, target, step)
        _finish(tmp, source, target, notes, step)
        return _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_distributed(root: Path, model, optimizer, trainer: dict[str, Any], config: dict[str, Any], step: int):
    """A "distributed" checkpoint from this one process (layout 1 x 1: every target rank reads rank 0's state)."""
    from fwpkm_megatron.parallel.dist_checkpoint import save_distributed

    state = {k: v for k, v in trainer.items() if k not in ckpt.SEPARATE_FILES}
    layout = {"world_size": 1, "tp": 1, "pp": 1, "vpp": 1, "dp": 1}
    ckpt.save_sharded_checkpoint(root, step, state, config, keep_last=1, rank=0, world_size=1, layout=layout,
                                 write_dist=lambda directory: save_distributed(directory, [model], optimizer))


def _finish(tmp: Path, source: Path, target: dict[str, Any], notes: list[str], step: int) -> None:
    par = target["parallel"]
    (tmp / "config.yaml").write_text(
        f"# written by fwpkm-export from {source}: resume at TP={par['tp']} x PP={par['pp']}\n"
        + yaml.safe_dump(target, sort_keys=False))
    lines = "\n".join(f"- {n}" for n in notes) or "- model, fast weights and optimizer state carried exactly"
    (tmp / "RESHARD.md").write_text(f"""# Resharded training checkpoint (step {step})

Source: `{source}`. Target layout: TP={par['tp']} x PP={par['pp']} (any DP that fits the world size).

{lines}

Resume (train.run_dir is this directory; any other TP x PP also loads):

```bash
fwpkm-launch local --nproc {par['tp'] * par['pp']} --config config.yaml      # or fwpkm-train --config config.yaml (TP=PP=1)
```
""")
    for note in notes:
        print(f"fwpkm-export: {note}")


def _replace(tmp: Path, out: Path) -> Path:
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out
