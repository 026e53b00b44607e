"""fwpkm-train: train a GPT with FwPKM memory layers on one process.

    fwpkm-train --config configs/tiny.yaml [section.key=value ...]
    python -m fwpkm_megatron.cli.train --config configs/tiny.yaml train.steps=50 train.run_dir=runs/try

A run whose `train.run_dir` already holds `checkpoints/latest` resumes from it. The config is validated
before megatron-core and the data stack are imported, so a bad key fails in well under a second.
Under torchrun, `fwpkm-launch local` or a bare `srun` (SLURM's variables) every process is one rank.
SIGUSR2, SIGTERM or `train.exit_after_minutes` stop all ranks after the same step with a checkpoint
(exit status 3); inside a SLURM job SIGUSR2 and the time budget also requeue it (docs/slurm.md).
"""
from __future__ import annotations

import argparse
import os
import sys

from fwpkm_megatron.benign import silence
from fwpkm_megatron.config import ConfigError, load_config


def main(argv: list[str] | None = None) -> int:
    silence()  # known-benign library warnings (fwpkm_megatron/benign.py)
    parser = argparse.ArgumentParser(prog="fwpkm-train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML run config (see configs/)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    args = parser.parse_args(argv)
    try:
        run = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"fwpkm-train: {exc}", file=sys.stderr)
        return 2

    from fwpkm_megatron.data import DataError          # slow imports start here
    from fwpkm_megatron.training import CheckpointError, Trainer

    trainer = None
    try:
        trainer = Trainer(run)
        summary = trainer.train()
    except (ConfigError, DataError, CheckpointError) as exc:  # ConfigError: e.g. bf16 on a device without it
        print(f"fwpkm-train: {exc}", file=sys.stderr)
        return 2
    finally:
        if trainer is not None:
            trainer.close()
    if summary is None:  # stopped on a signal or the time budget, with a checkpoint
        from fwpkm_megatron.training.slurm_job import after_stop

        return after_stop(trainer.stop_reason, run.train.max_requeues)
    if os.environ.get("RANK", "0") != "0":  # a parallel run (fwpkm-launch): rank 0 reports
        return 0
    print(f"loss {summary['first_loss']:.4f} -> {summary['final_loss']:.4f} over {summary['steps']} steps"
          f" ({summary['tokens_seen']:,} tokens, {summary['wall_seconds']:.1f} s)")
    print(f"val loss {summary['val_loss']:.4f}, val ppl {summary['val_ppl']:.2f}")
    print(f"checkpoint:  {summary['checkpoint']}")
    print(f"tensorboard: {summary['tensorboard_dir']}  (tensorboard --logdir {summary['tensorboard_dir']})")
    print(f"summary:     {run.train.run_dir}/summary.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
