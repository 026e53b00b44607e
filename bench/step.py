"""Training-step cost of the memory layers: the same GPT with and without FwPKM / PKM, in one run.

    .venv/bin/python bench/step.py [--config configs/tiny.yaml] [--steps 10] [--threads 1]

Prints a table of median forward+backward+AdamW step times and their ratio to the plain model; the
variants take turns step by step. With a GDN config (configs/tiny-gdn.yaml) an all-attention variant of
the same model is added. Synthetic token batches (the data path is measured by bench/data.py).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from fwpkm_megatron.benign import silence

silence()  # before megatron-core is imported: its fallback warnings fire at import
from fwpkm_megatron.config import load_config  # noqa: E402
from fwpkm_megatron.model import build_model  # noqa: E402
from fwpkm_megatron.parallel.groups import init_single_process  # noqa: E402

VARIANTS = {
    "no memory": ["fwpkm.layers=[]", "pkm.layers=[]"],
    "PKM only": ["fwpkm.layers=[]"],
    "FwPKM only": ["pkm.layers=[]"],
    "FwPKM + PKM (config)": [],
    "FwPKM + PKM, per_sequence": ["fwpkm.policy=per_sequence"],
}


def make_step(run, vocab: int):
    """A closure running one forward+backward+AdamW step of a fresh model for `run` (seeded tokens and weights)."""
    torch.manual_seed(0)
    model = build_model(run, vocab)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    b, s = run.train.micro_batch_size, run.train.seq_len
    tokens = torch.randint(0, vocab, (b, s + 1), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(s).expand(b, s)
    model.window_control.begin_step(0, 0, training=True)

    def step() -> None:
        loss = model(tokens[:, :-1], positions, None, labels=tokens[:, 1:]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return step


def time_interleaved(steps_by_name: dict, rounds: int, clock=time.perf_counter) -> dict:
    """Median seconds per call of each closure, taking turns call by call (a shared machine's load then hits
    them alike); the first two rounds warm allocators and are dropped."""
    times = {name: [] for name in steps_by_name}
    for _ in range(rounds + 2):
        for name, step in steps_by_name.items():
            t0 = clock()
            step()
            times[name].append(clock() - t0)
    return {name: statistics.median(t[2:]) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--vocab", type=int, default=4096)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    init_single_process(0)
    variants = dict(VARIANTS)
    run = load_config(args.config)
    if run.model.mixer == "gdn":  # the same model with attention in every layer, for the backbone's cost
        variants["attention mixer, no memory"] = ["model.mixer=attention", "model.attention_layers=[]",
                                                  "fwpkm.layers=[]", "pkm.layers=[]"]
    steps = {name: make_step(load_config(args.config, overrides), args.vocab) for name, overrides in variants.items()}
    rows = list(time_interleaved(steps, args.steps).items())
    base = rows[0][1]
    tok = run.train.micro_batch_size * run.train.seq_len
    print(f"config {args.config}: {tok} tokens/step, {args.threads} thread(s), median of {args.steps} steps")
    print(f"{'variant':<28} {'ms/step':>9} {'tokens/s':>10} {'x no-memory':>12}")
    for name, t in rows:
        print(f"{name:<28} {t * 1e3:>9.1f} {tok / t:>10,.0f} {t / base:>12.2f}")
    print(f"load average {os.getloadavg()}")


if __name__ == "__main__":
    main()
