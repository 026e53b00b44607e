"""Run logging: TensorBoard event files under `run_dir/tensorboard/` plus short console lines.

TensorBoard tags are namespaced (`train/loss`, `val/ppl`, `memory/layer2/coverage`); one concept keeps
one name from the config key to the tag. The console gets one line per `log_every` steps.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter


class RunLogger:
    """A SummaryWriter plus console output.

    Args:
        tb_dir: directory for the event files (created if missing).
        purge_step: on resume, the first step this process will log. TensorBoard then discards events
            at or after it that an interrupted earlier process wrote, so every step has one value.
        stream: where console lines go (stdout by default).
        enabled: False on every rank but 0 of a parallel run: nothing is printed or written.
    """

    def __init__(self, tb_dir: str | Path, *, purge_step: int | None = None, stream=None, enabled: bool = True):
        self.tb_dir = Path(tb_dir)
        self.enabled = enabled
        self.writer = _NullWriter()
        if enabled:
            self.tb_dir.mkdir(parents=True, exist_ok=True)
            self.writer = SummaryWriter(log_dir=str(self.tb_dir), purge_step=purge_step)
        self.stream = stream if stream is not None else sys.stdout

    def console(self, message: str) -> None:
        if self.enabled:
            print(message, file=self.stream, flush=True)

    def scalars(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def histograms(self, values: dict[str, torch.Tensor], step: int) -> None:
        for tag, value in values.items():
            if value.numel():
                self.writer.add_histogram(tag, value.detach().float().cpu(), step)

    def text(self, tag: str, body: str, step: int = 0) -> None:
        """Text rendered as markdown; `body` is shown verbatim in a code block."""
        self.writer.add_text(tag, "```\n" + body + "\n```", step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _NullWriter:
    """SummaryWriter stand-in for ranks that do not log."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def format_step_line(step: int, steps: int, metrics: dict[str, float]) -> str:
    """`step   10/200 | loss 5.1234 | lr 3.00e-03 | grad_norm 1.234 | 12,345 tok/s`."""
    width = len(str(steps))
    return (f"step {step:>{width}}/{steps} | loss {metrics['train/loss']:.4f} | lr {metrics['train/lr']:.2e}"
            f" | grad_norm {metrics['train/grad_norm']:.3f} | {metrics['train/tokens_per_s']:,.0f} tok/s")


def format_count(n: float) -> str:
    """Human-readable count: 1234 -> '1.23K', 134217728 -> '134.22M'."""
    for unit, size in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


def format_bytes(n: float) -> str:
    """Human-readable bytes in binary units: 536870912 -> '512.0 MiB'."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"
