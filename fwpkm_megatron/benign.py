"""Known-benign library warnings and log lines, filtered in one place so our own output stays readable.

Each entry names what it matches and why it is harmless here. Anything not listed still prints, so a
new warning (or one of these from a code path not named here) shows as before. Warnings that pointed
at our own calls are fixed at the call instead (megatron's `cuda_graph_scope` default in model/gpt.py,
the dense MLP's `ffn_hidden_size` in model/specs.py).

`silence()` is called first by every `fwpkm-*` command line and by the Trainer (so the ranks of a
parallel run and library users get it too), before megatron-core, DeepSpeed or streaming is imported:
several of these fire at import time. It only adds filters, idempotently; FWPKM_SHOW_ALL_WARNINGS=1
turns it off to see everything.
"""
from __future__ import annotations

import logging
import os
import re
import warnings
from typing import NamedTuple


class BenignWarning(NamedTuple):
    category: type[Warning]
    message: str  # regex matched at the start of the warning text (no ":", so pytest's ini syntax takes it)
    why: str


class BenignLog(NamedTuple):
    logger: str   # the library's logger name (a filter on a logger sees only its own records)
    message: str  # regex matched at the start of the formatted message
    why: str


WARNINGS: tuple[BenignWarning, ...] = (
    BenignWarning(UserWarning, r"(Transformer Engine and Apex are|Apex is) not installed",
                  "megatron-core without its optional fused kernels (CPU, or an image without Apex/TE): "
                  "the torch fallbacks are the paths we run and test"),
    BenignWarning(DeprecationWarning, r".*tp_group is None, using default tp group",
                  "megatron-core 0.16.1's own RowParallelLinear.forward passes tp_group=None to its matmul "
                  "(no collective there); our modules get their groups explicitly"),
    BenignWarning(DeprecationWarning, r"The 'megatron.core.transformer.custom_layers.transformer_engine'",
                  "megatron-core imports its own deprecated module"),
    BenignWarning(DeprecationWarning, r"The following imports from `dynamic_context.py`",
                  "megatron-core's inference package, imported by megatron-core itself"),
    BenignWarning(DeprecationWarning, r"`torch.jit.script_method` is deprecated",
                  "megatron-core's jit-scripted fusions, defined at import"),
    BenignWarning(FutureWarning, r"`load_state_dict` is deprecated",
                  "megatron dist_checkpointing calls torch.distributed.checkpoint.load_state_dict"),
    BenignWarning(FutureWarning, r"`torch.distributed.all_gather_into_tensor` is deprecated",
                  "DeepSpeed ZeRO's parameter all-gather"),
    BenignWarning(UserWarning, r"Sparse CSR tensor support is in beta state",
                  "the reference memory ops' CPU read and write (ops/reference.py) are CSR products; "
                  "tested equal to the gather form, forward and backward"),
)

LOGS: tuple[BenignLog, ...] = (
    BenignLog("megatron.core.transformer.transformer_layer", r"Unknown MLP type: .* Using default kwargs",
              "megatron logs this for any MLP slot that is not its own MLP/MoE class; the static PKM "
              "(memory/pkm.py) takes its arguments from its spec's params"),
    BenignLog("DeepSpeed", r"Setting accelerator to CPU",
              "DeepSpeed on a machine without CUDA: the CPU is the intended accelerator"),
    BenignLog("streaming.base.dataset", r"The `replication` arg has been set",
              "streaming warns at every start of a replicated (TP/PP) stream; data/stream.py resumes from "
              "its own sample position, which accounts for replication"),
)

_installed = False


class _DropMatching(logging.Filter):
    def __init__(self, patterns: list[str]):
        super().__init__()
        self.pattern = re.compile("|".join(f"(?:{p})" for p in patterns))

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.match(record.getMessage())


def silence() -> None:
    """Install the filters for `WARNINGS` and `LOGS` (once per process)."""
    global _installed
    if _installed or os.environ.get("FWPKM_SHOW_ALL_WARNINGS", "") not in ("", "0"):
        return
    _installed = True
    for entry in WARNINGS:
        warnings.filterwarnings("ignore", message=entry.message, category=entry.category)
    by_logger: dict[str, list[str]] = {}
    for entry in LOGS:
        by_logger.setdefault(entry.logger, []).append(entry.message)
    for name, patterns in by_logger.items():
        logging.getLogger(name).addFilter(_DropMatching(patterns))


__all__ = ["LOGS", "WARNINGS", "BenignLog", "BenignWarning", "silence"]
