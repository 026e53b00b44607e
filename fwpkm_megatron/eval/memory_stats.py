"""Memory statistics of FwPKM layers during an evaluation (method notes 5.7 D.3, Fig. 3).

`MemoryStats` is an observer: call it with the model after each forward and it accumulates, per FwPKM
layer, the slots read (all H*k reads of every real token) and the gates. `summary()` gives slot
coverage, collision rate and KL(usage || uniform) over everything observed, plus gate statistics and a
histogram; `write()` saves JSON + PNG and, given a log dir, TensorBoard scalars and histograms under
`memory/layer{i}/...` (the trainer's tags).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

GATE_BINS = 20


def usage_statistics(counts: torch.Tensor) -> dict[str, float]:
    """coverage = #{N_i > 0}/N, collision rate = sum_{N_i > 1} N_i / sum N_i, KL(usage || uniform)."""
    counts = counts.double()
    total = counts.sum()
    p = counts / total
    used = p > 0
    return {"coverage": float(used.double().mean()), "collision_rate": float(counts[counts > 1].sum() / total),
            "kl_uniform": float((p[used] * torch.log(p[used] * counts.numel())).sum()), "reads": int(total)}


class MemoryStats:
    def __init__(self, model):
        self.layers = {lid: model.config.fwpkm["num_slots"] for lid in model.config.fwpkm.get("layers", [])}
        self.counts = {lid: torch.zeros(n, dtype=torch.long) for lid, n in self.layers.items()}
        self.gates: dict[int, list[torch.Tensor]] = {lid: [] for lid in self.layers}

    def __call__(self, model) -> None:
        for layer in model.model.layers:
            branch = layer.fwpkm
            if branch is None:
                continue
            for idx in branch.last_reads:
                self.counts[branch.layer_id] += torch.bincount(idx.reshape(-1).cpu(), minlength=self.layers[branch.layer_id])
            if branch.last_gate is not None:
                self.gates[branch.layer_id].append(branch.last_gate.flatten().float().cpu())

    def summary(self) -> dict[str, Any]:
        out = {}
        for lid in self.layers:
            entry: dict[str, Any] = usage_statistics(self.counts[lid]) if self.counts[lid].sum() else {}
            if self.gates[lid]:
                g = torch.cat(self.gates[lid])
                hist = torch.histc(g, bins=GATE_BINS, min=0, max=1)
                entry.update(gate_mean=float(g.mean()), gate_std=float(g.std()) if g.numel() > 1 else 0.0,
                             gate_histogram=hist.long().tolist())
            out[f"layer{lid}"] = entry
        return out

    def write(self, out_dir: str | Path, *, tensorboard_dir: str | Path | None = None, step: int = 0) -> dict[str, Any]:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        summary = self.summary()
        (out_dir / "memory_stats.json").write_text(json.dumps(summary, indent=1) + "\n")
        self._plot(summary, out_dir / "memory_stats.png")
        if tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(tensorboard_dir))
            try:
                for layer, entry in summary.items():
                    for key in ("coverage", "collision_rate", "kl_uniform", "gate_mean"):
                        if key in entry:
                            writer.add_scalar(f"memory/{layer}/{key}", entry[key], step)
                    lid = int(layer[len("layer"):])
                    if self.gates[lid]:
                        writer.add_histogram(f"memory/{layer}/gate", torch.cat(self.gates[lid]), step)
            finally:
                writer.close()
        return summary

    def _plot(self, summary: dict[str, Any], path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        layers = list(summary)
        fig, axes = plt.subplots(2, max(len(layers), 1), figsize=(4 * max(len(layers), 1), 6), squeeze=False)
        for col, layer in enumerate(layers):
            entry = summary[layer]
            ax = axes[0][col]
            if "gate_histogram" in entry:
                ax.bar([(i + .5) / GATE_BINS for i in range(GATE_BINS)], entry["gate_histogram"], width=1 / GATE_BINS)
            ax.set_title(f"{layer} gate (mean {entry.get('gate_mean', float('nan')):.2f})")
            ax.set_xlabel("gate")
            ax = axes[1][col]
            counts = self.counts[int(layer[len("layer"):])].sort(descending=True).values
            ax.plot(counts.numpy())
            ax.set_yscale("symlog")
            ax.set_title(f"coverage {entry.get('coverage', 0):.2f}, collisions {entry.get('collision_rate', 0):.2f}, "
                         f"KL {entry.get('kl_uniform', 0):.2f}", fontsize=8)
            ax.set_xlabel("slots by read count")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
