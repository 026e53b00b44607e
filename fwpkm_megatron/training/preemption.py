"""Stop requests (preemption, time limits) agreed on by every rank at a step boundary.

SLURM (and submitit) deliver SIGUSR2 before a job's wall time or on preemption (`--signal=USR2@90`),
SIGTERM on `scancel` and before killing a preempted job; a signal may reach only some ranks (submitit
acts on rank 0 only). The handler here just records the signal. After every optimizer step each rank
contributes its record and `train.exit_after_minutes` to one MAX all-reduce, so all ranks stop after
the same step, save one consistent checkpoint together and exit; `requeue_decision` then says whether
the job comes back (SIGUSR2 or the time budget, under `train.max_requeues`) or stays down (SIGTERM:
a cancel must not requeue; SLURM requeues a job it preempts with PreemptMode=REQUEUE itself).

A second SIGTERM while the first is pending kills the process at once (default action): a rank whose
peer died may be stuck in a collective, and the launcher's escalation must not wait for it.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from contextlib import contextmanager

import torch
import torch.distributed as dist

# Stop reasons, ordered: the all-reduce takes the largest any rank saw.
NONE, TIME_LIMIT, SIGTERM, SIGUSR2 = 0, 1, 2, 3
REASONS = {TIME_LIMIT: "train.exit_after_minutes reached", SIGTERM: "SIGTERM", SIGUSR2: "SIGUSR2"}
_SIGNALS = {signal.SIGUSR2: SIGUSR2, signal.SIGTERM: SIGTERM}


class StopRequests:
    """Records SIGUSR2/SIGTERM and a time budget; `agree()` is the collective step-boundary check.

    Args:
        exit_after_minutes: stop after this many minutes since `start_time` (0 = never).
        start_time: `time.monotonic()` at the start of the process's work (the trainer's construction).
    """

    def __init__(self, exit_after_minutes: float = 0.0, start_time: float | None = None):
        self.exit_after_s = exit_after_minutes * 60.0
        self.start_time = time.monotonic() if start_time is None else start_time
        self.pending = NONE
        self._previous: dict[int, object] = {}

    def install(self) -> "StopRequests":
        """Handle SIGUSR2 and SIGTERM (main thread only; elsewhere signals stay as they are)."""
        if threading.current_thread() is threading.main_thread():
            for sig in _SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    @contextmanager
    def held(self):
        """Hold SIGUSR2/SIGTERM in this thread while a checkpoint is written; a held signal is recorded
        when the block ends. SLURM signals every process of the step, and a helper spawned meanwhile
        (megatron's checkpoint writer queue) would die of SIGUSR2's default action; it inherits the
        blocked mask instead."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, set(_SIGNALS))
        try:
            yield
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)

    def _handle(self, signum: int, frame) -> None:
        reason = _SIGNALS[signum]
        if reason == SIGTERM and self.pending == SIGTERM:  # asked twice: stop waiting for a step boundary
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
        self.pending = max(self.pending, reason)

    def local_reason(self) -> int:
        if self.exit_after_s and time.monotonic() - self.start_time >= self.exit_after_s:
            return max(self.pending, TIME_LIMIT)
        return self.pending

    def agree(self, device: torch.device | str = "cpu") -> int:
        """Collective over the default group when initialised (every rank calls it after every step):
        the largest stop reason any rank has, NONE to go on. One 1-element all-reduce and a host sync."""
        reason = self.local_reason()
        if dist.is_initialized() and dist.get_world_size() > 1:
            flag = torch.tensor([reason], dtype=torch.int32, device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            reason = int(flag.item())  # host sync
        return reason


def restart_count(environ=None) -> int:
    """How many times SLURM has requeued this job (0 outside SLURM)."""
    env = os.environ if environ is None else environ
    return int(env.get("SLURM_RESTART_COUNT", "0") or 0)


def requeue_decision(reason: int, max_requeues: int, environ=None) -> tuple[bool, str]:
    """Whether a run stopped for `reason` should be requeued, and a sentence saying why (or why not)."""
    env = os.environ if environ is None else environ
    if "SLURM_JOB_ID" not in env:
        return False, "not a SLURM job: resume by running the same command again"
    if reason == SIGTERM:
        return False, "SIGTERM (cancelled, or preempted by SLURM, which requeues by itself when configured to)"
    if reason not in (SIGUSR2, TIME_LIMIT):
        return False, "no stop was requested"
    done = restart_count(env)
    if done >= max_requeues:
        return False, f"requeue cap reached: requeued {done} times, train.max_requeues={max_requeues}"
    return True, f"{REASONS[reason]}: requeue {done + 1} of at most {max_requeues}"
