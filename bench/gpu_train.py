"""Training on the rank's device (CUDA when present): the checks and measurements `bench/gpu_check.sh` runs.

    python bench/gpu_train.py tiny  [--device cpu|cuda] [--write FILE] [--json FILE]
        configs/tiny.yaml in fp32 for 5 steps on synthetic tokens (seeded), the single-process trainer's step;
        prints the losses; --write stores them as the CPU reference (bench/assets/tiny_cpu_losses.json:
        `python bench/gpu_train.py tiny --device cpu --write bench/assets/tiny_cpu_losses.json`),
        otherwise they are compared with that reference (1e-3 relative) and the process fails on a mismatch.
    python bench/gpu_train.py paper [--no-memory] [--steps 20] [--seq-len 4096] [--micro-batch 4] [--json FILE]
        a paper-width model (12 x 768, FwPKM@2,10 + PKM@6, configs/paper-112m.yaml's memory sizes) in bf16
        through the parallel engine (megatron Float16Module + DDP + fp32 master weights), world size 1:
        tokens/s (median step after 3 warm-up steps), MFU, peak memory.

Synthetic tokens: no data preparation on the GPU machine; the CPU reference uses the same generator.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO / "bench" / "assets" / "tiny_cpu_losses.json"
VOCAB = 4096
# dense bf16 peak FLOP/s by device name (vendor datasheets, SXM parts, no sparsity)
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12}
PAPER = ["model.num_layers=12", "model.hidden_size=768", "model.num_attention_heads=12",
         "model.num_query_groups=4", "model.ffn_hidden_size=2304", "model.attention=pswa", "model.window=512",
         "fwpkm.layers=[2,10]", "fwpkm.num_slots=262144", "fwpkm.d_k=512", "fwpkm.d_v=512", "fwpkm.topk=8",
         "fwpkm.chunk_size=512", "pkm.layers=[6]", "pkm.num_slots=262144", "pkm.d_k=512", "pkm.d_v=512",
         "pkm.heads=4", "pkm.topk=32", "train.precision=bf16", "train.lr=3e-4", "train.warmup_steps=10"]


def tokens(batch: int, seq: int, steps: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    return [torch.randint(0, VOCAB, (batch, seq + 1), generator=g) for _ in range(steps)]


def tiny(args) -> dict:
    """The single-process trainer's step (training/trainer.py) on configs/tiny.yaml, fp32."""
    from fwpkm_megatron.config import load_config
    from fwpkm_megatron.model import build_model
    from fwpkm_megatron.parallel.groups import init_single_process
    from fwpkm_megatron.training.device import declare, rank_device
    from fwpkm_megatron.training.optim import build_optimizer, clip_grad_norm

    if args.device == "cpu":
        declare("cpu")
    run = load_config(REPO / "configs" / "tiny.yaml", [f"model.vocab_size={VOCAB}", "train.steps=100"])
    torch.manual_seed(run.train.seed)
    init_single_process(run.train.seed)
    device = rank_device()
    model = build_model(run, VOCAB).to(device)
    optimizer, scheduler = build_optimizer(model, run.train)
    params = [p for p in model.parameters() if p.requires_grad]
    losses = []
    for step, batch in enumerate(tokens(run.train.micro_batch_size, run.train.seq_len, args.steps)):
        model.window_control.begin_step(step, run.train.seed, training=True)
        batch = batch.to(device)
        inputs, labels = batch[:, :-1], batch[:, 1:]
        positions = torch.arange(inputs.shape[1], device=device).expand_as(inputs)
        loss = model(inputs, positions, attention_mask=None, labels=labels).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip_grad_norm(params, run.train.grad_clip)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
    result = {"device": str(device), "losses": losses}
    if args.write:
        Path(args.write).parent.mkdir(parents=True, exist_ok=True)
        Path(args.write).write_text(json.dumps(result, indent=1) + "\n")
        return result
    ref = json.loads(REFERENCE.read_text())["losses"]
    worst = max(abs(a - b) / abs(b) for a, b in zip(losses, ref))
    result.update(reference=ref, max_rel_diff=worst, ok=worst <= 1e-3)
    return result


def paper(args) -> dict:
    """Paper-width model in bf16 through the ParallelEngine at world size 1."""
    from fwpkm_megatron.config import load_config
    from fwpkm_megatron.parallel.groups import current_groups, init_single_process
    from fwpkm_megatron.training.engine import ParallelEngine

    overrides = PAPER + [f"model.max_seq_len={args.seq_len}", f"train.seq_len={args.seq_len}",
                         f"train.micro_batch_size={args.micro_batch}", f"model.vocab_size={32000}",
                         f"train.steps={args.steps + 3}"]
    if args.no_memory:
        overrides += ["fwpkm.layers=[]", "pkm.layers=[]"]
    if args.smoke:  # a CPU check of this script: small tables, few layers
        overrides += ["fwpkm.num_slots=4096", "pkm.num_slots=4096", "model.num_layers=12"]
    cuda = torch.cuda.is_available()
    run = load_config(None, overrides)
    init_single_process(run.train.seed)
    engine = ParallelEngine(run, current_groups(), 32000)
    batches = tokens(args.micro_batch, args.seq_len, args.steps + 3)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    times, losses = [], []
    for step, batch in enumerate(batches):
        for chunk in engine.chunks:
            chunk.window_control.begin_step(step, run.train.seed, training=True)
        sync()
        t0 = time.perf_counter()
        metrics = engine.train_step([batch])
        sync()
        times.append(time.perf_counter() - t0)
        losses.append(metrics["train/loss"])
    step_s = statistics.median(times[3:])
    tok_s = args.micro_batch * args.seq_len / step_s
    result = {"memory_layers": not args.no_memory, "seq_len": args.seq_len, "micro_batch": args.micro_batch,
              "steps_timed": len(times) - 3, "step_seconds": step_s, "tokens_per_s": tok_s, "losses": losses,
              "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
              "device_name": torch.cuda.get_device_name() if cuda else "cpu"}
    peak = next((v for k, v in PEAK_BF16.items() if k in result["device_name"]), None)
    try:
        from fwpkm_megatron.training.flops import training_flops_per_token
    except ImportError as exc:
        result["mfu"], result["mfu_error"] = None, f"fwpkm_megatron.training.flops missing ({exc})"
    else:
        flops = training_flops_per_token(run)
        result["flops_per_token"] = flops
        result["mfu"] = flops * tok_s / peak if peak else None
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=("tiny", "paper"))
    p.add_argument("--device", choices=("auto", "cpu"), default="auto", help="tiny: cpu forces the host")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--write", help="tiny: write the losses as the reference file")
    p.add_argument("--no-memory", action="store_true", help="paper: the same model without FwPKM/PKM layers")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--smoke", action="store_true", help="paper: small tables (a CPU check of the script)")
    p.add_argument("--json", help="also write the result here")
    args = p.parse_args(argv)
    args.steps = args.steps or (5 if args.what == "tiny" else 20)
    result = tiny(args) if args.what == "tiny" else paper(args)
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0 if result.get("ok", True) else 1


if __name__ == "__main__":
    sys.exit(main())
