"""Memory layers (FwPKM, static PKM, the FwMLP baseline), their fast-weight states, and model-wide helpers."""
from __future__ import annotations

import torch
from torch import nn

from .fwmlp import FwMLPBlock, FwMLPState
from .fwpkm import FwPKMBlock, read_statistics
from .pkm import PKMMLP
from .state import FastWeightState


def fwpkm_blocks(model: nn.Module) -> list[FwPKMBlock]:
    """The FwPKM blocks of a model, in layer order."""
    return sorted((m for m in model.modules() if isinstance(m, FwPKMBlock)), key=lambda m: m.layer_id)


def fast_weight_states(model: nn.Module) -> dict[str, FastWeightState | FwMLPState]:
    """Module name -> fast-weight state (FwPKM's FastWeightState, FwMLP's FwMLPState) of every such layer."""
    return {name: m for name, m in model.named_modules() if isinstance(m, (FastWeightState, FwMLPState))}


def snapshot_fast_weights(model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    return {name: state.snapshot() for name, state in fast_weight_states(model).items()}


def restore_fast_weights(model: nn.Module, snap: dict[str, dict[str, torch.Tensor]]) -> None:
    for name, state in fast_weight_states(model).items():
        state.restore(snap[name])


def reset_fast_weights(model: nn.Module) -> None:
    for state in fast_weight_states(model).values():
        state.reset()


def fast_weight_numel(model: nn.Module) -> int:
    return sum(b.numel() for s in fast_weight_states(model).values() for b in s.buffers())


def set_memory_diagnostics(model: nn.Module, on: bool) -> None:
    """Have the FwPKM layers record addr_loss, fw_mse, read_abs_mean and write_abs_mean in their next
    forwards (for `memory_stats`); off, they skip that work. The trainer turns it on for logged steps."""
    for block in fwpkm_blocks(model):
        block.diagnostics = on


def memory_stats(model: nn.Module) -> dict[str, float]:
    """TensorBoard scalars of the last forward: memory/layer{i}/{coverage,collision_rate,kl_uniform,gate_mean},
    plus addr_loss, fw_mse, read_abs_mean, write_abs_mean when that forward ran with diagnostics on.

    Static PKM layers report their read statistics under memory/pkm_layer{i}/, FwMLP layers their gate
    under memory/fwmlp_layer{i}/.
    """
    out = {}
    for block in fwpkm_blocks(model):
        for key, value in block.statistics().items():
            out[f"memory/layer{block.layer_id}/{key}"] = value
    for block in _fwmlp_blocks(model):
        for key, value in block.statistics().items():
            out[f"memory/fwmlp_layer{block.layer_id}/{key}"] = value
    for name, m in model.named_modules():
        if isinstance(m, PKMMLP) and m.last_reads is not None:
            layer = _layer_id_from_name(name)
            for key, value in read_statistics(m.last_reads, m.cfg.num_slots).items():
                out[f"memory/pkm_layer{layer}/{key}"] = value
    return out


def gate_histograms(model: nn.Module) -> dict[str, torch.Tensor]:
    """memory/layer{i}/gate (FwPKM), memory/fwmlp_layer{i}/gate -> 1-D gate values of the last forward."""
    out = {f"memory/layer{b.layer_id}/gate": b.last_gate.flatten() for b in fwpkm_blocks(model)
           if b.last_gate is not None}
    out.update({f"memory/fwmlp_layer{b.layer_id}/gate": b.last_gate.flatten() for b in _fwmlp_blocks(model)
                if b.last_gate is not None})
    return out


def _fwmlp_blocks(model: nn.Module) -> list[FwMLPBlock]:
    return sorted((m for m in model.modules() if isinstance(m, FwMLPBlock)), key=lambda m: m.layer_id)


def _layer_id_from_name(name: str) -> str:
    parts = name.split(".")
    return parts[parts.index("layers") + 1] if "layers" in parts else name


__all__ = ["FastWeightState", "FwMLPBlock", "FwMLPState", "FwPKMBlock", "PKMMLP", "fast_weight_numel",
           "fast_weight_states", "fwpkm_blocks", "gate_histograms", "memory_stats", "reset_fast_weights",
           "restore_fast_weights", "set_memory_diagnostics", "snapshot_fast_weights"]
