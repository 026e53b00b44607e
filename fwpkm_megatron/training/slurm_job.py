"""What runs inside a SLURM job: submitit's `TrainingJob`, and the requeue of a bare `srun fwpkm-train`.

submitit starts `TrainingJob()` on every task of the job (srun, one task per GPU); the Trainer derives
its rank from SLURM's variables (training/slurm_env.py). When the trainer stops on SIGUSR2 or the time
budget (every rank at the same step, after one consistent checkpoint; training/preemption.py), rank 0
hands over to submitit's own preemption handler, which calls `checkpoint()` (resubmit this same job,
which resumes from `latest`), requeues the job with `scontrol requeue` and exits. Calling it only here,
after the save, is what makes every rank's state part of the checkpoint (submitit alone would act on
rank 0 only, in the middle of a step).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from submitit.helpers import Checkpointable

STOPPED_EXIT = 3  # fwpkm-train's exit status when it stopped early with a checkpoint (resume: same command)


class TrainingJob(Checkpointable):
    """The submitit callable: train the run described by `run_dict` (a RunConfig.to_dict()).

    Returns (per task): {"status": "completed", "steps", "final_loss", "val_loss"} when the run reached
    `train.steps`; {"status": "stopped", "step", "reason"} when it stopped without a requeue; a requeued
    job does not return on rank 0 (submitit exits it).
    """

    def __init__(self, run_dict: dict[str, Any]):
        self.run_dict = run_dict

    def __call__(self) -> dict[str, Any]:
        from fwpkm_megatron.config import from_dict
        from fwpkm_megatron.training import Trainer
        from fwpkm_megatron.training.preemption import requeue_decision

        run = from_dict(self.run_dict)
        submitit_handler = signal.getsignal(signal.SIGUSR2)  # submitit's checkpoint-and-requeue
        rank = int(os.environ.get("SLURM_PROCID", "0"))
        log = _RankLog(Path(run.train.run_dir) / "logs" / "train.log") if rank == 0 else None
        trainer = None
        try:
            trainer = Trainer(run, console=log)
            summary = trainer.train()
        finally:
            if trainer is not None:
                trainer.close()
        if summary is not None:
            _say(log, f"finished: {summary['steps']} steps, final loss {summary['final_loss']:.4f}")
            return {"status": "completed", "steps": summary["steps"], "final_loss": summary["final_loss"],
                    "val_loss": summary["val_loss"]}
        requeue, why = requeue_decision(trainer.stop_reason, run.train.max_requeues)
        _say(log, f"{'requeueing' if requeue else 'not requeueing'}: {why}")
        if not requeue or rank != 0:
            return {"status": "requeued" if requeue else "stopped", "step": trainer.step, "reason": why}
        if _is_submitit_handler(submitit_handler):
            submitit_handler(signal.SIGUSR2, None)  # checkpoint() -> same job; scontrol requeue; exits
        requeue_current_job()
        return {"status": "requeued", "step": trainer.step, "reason": why}

    def checkpoint(self, *args: Any, **kwargs: Any):
        """Resubmit this same job: the trainer already saved `latest`, and the new job resumes from it."""
        return super().checkpoint(*args, **kwargs)


def after_stop(stop_reason: int, max_requeues: int) -> int:
    """For `fwpkm-train` under a bare srun: requeue the SLURM job when the stop calls for it (rank 0);
    returns the exit status (STOPPED_EXIT)."""
    from fwpkm_megatron.training.preemption import requeue_decision

    requeue, why = requeue_decision(stop_reason, max_requeues)
    if os.environ.get("RANK", "0") == "0":
        print(f"fwpkm-train: {'requeueing' if requeue else 'not requeueing'}: {why}", flush=True)
        if requeue:
            requeue_current_job()
    return STOPPED_EXIT


def requeue_current_job() -> None:
    """`scontrol requeue $SLURM_JOB_ID` (the job must be requeueable: sbatch --requeue)."""
    job = os.environ["SLURM_JOB_ID"]
    if os.environ.get("SLURM_ARRAY_JOB_ID"):
        job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    subprocess.run(["scontrol", "requeue", job], check=True, timeout=60)


def _is_submitit_handler(handler) -> bool:
    from submitit.core.job_environment import SignalHandler

    return isinstance(getattr(handler, "__self__", None), SignalHandler)


def _say(log, line: str) -> None:
    if log is not None:
        log.write(line + "\n")
        log.flush()


class _RankLog:
    """Console lines to stdout (SLURM's output file) and appended to `path` (survives requeues)."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "a", buffering=1)

    def write(self, text: str) -> None:
        sys.stdout.write(text)
        self.file.write(text)

    def flush(self) -> None:
        sys.stdout.flush()
        self.file.flush()
