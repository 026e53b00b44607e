"""The single-process training loop: one `Trainer` owning data, model, optimizer, logging and checkpoints.

One step (method section 4.3; design decisions 3, 7, 8):

    model.window_control.begin_step(step, seed, training=True)   # pSWA picks this step's window
    loss = model(inputs, positions, labels=labels).mean()         # fast weights are written in the forward
    loss.backward(); clip slow weights; AdamW step; scheduler step

The trainer is Stateful: `state_dict()` holds everything an exact resume needs (model incl. fast-weight
buffers, optimizer, scheduler, train-stream position, RNG states, counters, the loss history), and
`checkpoint.py` writes it atomically. A run whose `run_dir/checkpoints/latest` exists resumes from it
automatically; save -> load -> continue equals uninterrupted training bit for bit on CPU.

Evaluation never changes training: fast weights are snapshotted before and restored after, the
RNG is forked, and the val stream is rebuilt from scratch, so every evaluation sees the same batches.

Parallel runs (world size > 1, `parallel.num_microbatches` > 1 or DeepSpeed on; launched by
`fwpkm-launch`) take the same loop with `training/engine.py`'s `ParallelEngine` doing the step: megatron's
schedules over TP x PP x DP, DP-averaged grads (or ZeRO), the DP sync of fast weights. Each DP rank
reads its own share of the train and val streams. Parallel runs write distributed checkpoints (model, fast weights and
AdamW moments through megatron `dist_checkpointing`, the rest per rank; `checkpoint.py`), which resume
at any layout, also in one process; a single-process run keeps the single-process format.
"""
from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch

from fwpkm_megatron.benign import silence
from fwpkm_megatron.config import ConfigError, RunConfig, num_microbatches
from fwpkm_megatron.training import checkpoint as ckpt
from fwpkm_megatron.training.device import precision_problem, rank_device
from fwpkm_megatron.training.flops import peak_dtype_name, peak_tflops, training_flops_per_token
from fwpkm_megatron.training.logging import RunLogger, format_bytes, format_count, format_step_line
from fwpkm_megatron.training.optim import build_optimizer, clip_grad_norm

FINAL_LOSS_WINDOW = 10  # summary.json's final_loss_mean_last_10 averages this many last steps


class Trainer:
    """Builds a run from its config and trains it.

    Args:
        run: a validated RunConfig.
        console: where console lines go (stdout by default).

    Raises:
        fwpkm_megatron.data.DataError: the prepared data is missing or does not fit the config.
        CheckpointError: `latest` exists but the checkpoint it names is incomplete or corrupt.
    """

    def __init__(self, run: RunConfig, *, console: TextIO | None = None):
        silence()  # known-benign library warnings (benign.py), also for ranks and library users
        from fwpkm_megatron.data import DataError, build_loader
        from fwpkm_megatron.model import build_model
        from fwpkm_megatron.parallel.groups import init_single_process
        from fwpkm_megatron.training.preemption import StopRequests
        from fwpkm_megatron.training.slurm_env import apply_launcher_env

        self.stops = StopRequests(run.train.exit_after_minutes)  # the time budget counts from here
        self.stop_reason = 0   # preemption.NONE; set when train() stopped on a signal or the time budget
        apply_launcher_env()   # RANK, WORLD_SIZE, ... from SLURM inside `srun` (torchrun's win)
        self.run = run
        cfg = run.train
        self.run_dir = Path(cfg.run_dir)
        self.ckpt_root = self.run_dir / "checkpoints"
        self.tb_dir = self.run_dir / "tensorboard"
        self.step = 0             # completed optimizer steps
        self.tokens_seen = 0
        self.losses: list[float] = []
        self.last_checkpoint: Path | None = None
        self.val_loss: float | None = None
        self._noted_val_size = False  # evaluate() says once when eval_batches re-read the val split

        self.engine = None   # ParallelEngine of a parallel run; None for the plain single-process step
        self.groups = None
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        problem = precision_problem(cfg.precision, rank_device())  # before any process group starts
        if problem:
            raise ConfigError([problem])
        _seed_everything(cfg.seed)
        if uses_parallel_engine(run):
            from fwpkm_megatron.parallel.groups import init_distributed
            self.groups = init_distributed(run.parallel, cfg.seed, run)
        else:
            init_single_process(cfg.seed)
        rank, world = (0, 1) if self.groups is None else (self.groups.rank, self.groups.world_size)

        resume_from = ckpt.latest_checkpoint(self.ckpt_root)  # read and validate before building anything
        kind = ckpt.checkpoint_kind(resume_from) if resume_from is not None else None
        same_layout = True
        self._resume_notes: list[str] = []  # printed once the logger exists
        if rank == 0:
            self._resume_notes += ckpt.discard_partial_checkpoints(self.ckpt_root)
        if resume_from is None:
            state, saved_config = None, None
        elif kind == "distributed":
            state, saved_config, same_layout = ckpt.load_distributed_checkpoint(
                resume_from, rank, _layout_record(self.groups))
        elif self.groups is None:
            state, saved_config = ckpt.load_checkpoint(resume_from)
        else:
            state, saved_config = ckpt.load_sharded_checkpoint(resume_from, rank, world)

        dp_rank, dp = (0, 1) if self.groups is None else (self.groups.dp_rank, self.groups.dp)
        self.dp_rank, self.dp = dp_rank, dp  # train and val streams are split over DP alike
        self.train_stream = build_loader(run.data, "train", batch_size=cfg.micro_batch_size,
                                         seq_len=cfg.seq_len, seed=cfg.seed, rank=dp_rank, world_size=dp)
        try:
            self.vocab_size = run.model.vocab_size or self.train_stream.vocab_size
            if self.vocab_size < self.train_stream.vocab_size:
                raise DataError(f"model.vocab_size={self.vocab_size} is smaller than the vocab "
                                f"({self.train_stream.vocab_size}) of the data at {run.data.path}")
            if self.groups is None:
                self.model = build_model(run, self.vocab_size).to(rank_device())  # host init, then moved
                self.optimizer, self.scheduler = build_optimizer(self.model, cfg)
                self.window_controls = [self.model.window_control]
            else:
                from fwpkm_megatron.training.engine import ParallelEngine
                tp = self.groups.tp  # megatron's vocab-parallel embedding needs a multiple of TP
                self.vocab_size = -(-self.vocab_size // tp) * tp
                self.engine = ParallelEngine(run, self.groups, self.vocab_size)
                self.model, self.optimizer, self.scheduler = (self.engine.model, self.engine.optimizer,
                                                              self.engine.scheduler)
                self.window_controls = [chunk.window_control for chunk in self.engine.chunks]
            self.device = next(self.model.parameters()).device  # batches follow the model
            self.slow_params = [p for p in self.model.parameters() if p.requires_grad]
            # sequences per step = micro_batch_size x micro-batches x DP ranks (= train.global_batch_size if set)
            self.num_microbatches = num_microbatches(run, world)
            self.tokens_per_step = cfg.micro_batch_size * cfg.seq_len * self.num_microbatches * dp
            if state is not None:
                if kind == "distributed":
                    self._load_distributed(resume_from, state, same_layout)
                self._load_checkpoint_state(state, resume_from)
                self.last_checkpoint = resume_from
        except BaseException:
            self.train_stream.close()
            raise
        self.world_size = world
        sized = dataclasses.replace(run, model=dataclasses.replace(run.model, vocab_size=self.vocab_size))
        self.flops_per_token = training_flops_per_token(sized)
        dtype = peak_dtype_name(next(self.model.parameters()).dtype, self.device.type)
        self.peak_tflops, source = peak_tflops(self.device, dtype, cfg.peak_tflops)
        self.peak_note = (f"peak {self.peak_tflops:g} TFLOP/s per device ({source}): MFU logged"
                          if self.peak_tflops is not None else source)
        quiet = rank != 0  # one console and one event file per run: rank 0 logs
        self.logger = RunLogger(self.tb_dir, purge_step=self.step + 1 if resume_from else None,
                                stream=console, enabled=not quiet)
        if resume_from is not None:
            self.logger.console(f"resuming from {resume_from} at step {self.step}/{cfg.steps}")
            for note in self._resume_notes:
                self.logger.console(note)
            changed = _changed_keys(saved_config, run.to_dict())
            if changed:
                self.logger.console(f"config differs from the checkpoint's in: {', '.join(changed)}")
        self._log_derived(fresh=resume_from is None)

    # ---------------------------------------------------------------------------------- Stateful

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self._optimizer_state(),
            "scheduler": self.scheduler.state_dict(),
            "data": self.train_stream.state_dict(),
            "rng": ckpt.capture_rng_state(),
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "losses": list(self.losses),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a `state_dict()`. Without "model" / "optimizer" (a distributed checkpoint, loaded by
        `_load_distributed`), those are left as they are."""
        if "model" in state:
            self.model.load_state_dict(state["model"])
        if "optimizer" not in state:
            pass
        elif self.engine is not None and self.engine.deepspeed is not None:
            self.engine.load_optimizer_state(state["optimizer"])
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if "optimizer" not in state:  # the LR lives in the param groups; take the schedule's
            for group, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr()):
                group["lr"] = lr
        self.train_stream.load_state_dict(state["data"])
        ckpt.restore_rng_state(state["rng"])
        self.step = int(state["step"])
        self.tokens_seen = int(state["tokens_seen"])
        self.losses = [float(x) for x in state["losses"]]

    def _optimizer_state(self) -> dict[str, Any]:
        if self.engine is not None and self.engine.deepspeed is not None:
            return self.engine.optimizer_state()
        return self.optimizer.state_dict()

    def _begin_step(self, step: int, training: bool) -> int | None:
        """Set the attention window of every model chunk for this step; return it."""
        windows = [wc.begin_step(step, self.run.train.seed, training=training) for wc in self.window_controls]
        return windows[0]

    def _load_distributed(self, path: Path, state: dict[str, Any], same_layout: bool) -> None:
        """Load the dist_checkpointing part of a distributed checkpoint (collective), at any layout.

        The model and its fast weights load exactly. Plain AdamW moments are resharded with the model.
        ZeRO partitions are per-rank files: they load at the same layout; at another layout the
        optimizer state restarts (moments zero, said on the console).
        """
        from fwpkm_megatron.parallel.dist_checkpoint import load_distributed

        chunks = self.engine.chunks if self.engine is not None else [self.model]
        plain = self.engine is None or self.engine.deepspeed is None
        try:
            adamw = load_distributed(path / ckpt.DIST_DIR, chunks, self.optimizer if plain else None)
        except Exception as exc:  # megatron raises CheckpointingException and others
            raise ckpt.CheckpointError(f"{path / ckpt.DIST_DIR}: cannot be loaded into this run's model "
                                       f"({type(exc).__name__}: {exc})") from None
        if plain:
            state.pop("optimizer", None)  # a ZeRO run's partition (per-rank file); plain AdamW reads dist/ only
        if plain and not adamw:
            self._resume_notes.append("optimizer state restarted: the checkpoint holds no per-parameter AdamW "
                                      "state this run can use (ZeRO partitions, or megatron's distributed "
                                      "optimizer, whose state is not saved yet); model and fast weights "
                                      "loaded exactly")
        elif not plain and not (same_layout and "optimizer" in state):
            state.pop("optimizer", None)
            self._resume_notes.append("optimizer state restarted: ZeRO partitions resume only at the layout "
                                      "that wrote them (or the checkpoint holds plain AdamW moments); "
                                      "model and fast weights loaded exactly")
        if not same_layout:
            self._resume_notes.append("checkpoint written at another layout: resharded; step, schedule, "
                                      "data position and RNG states taken from its rank 0")

    def _load_checkpoint_state(self, state: dict[str, Any], path: Path) -> None:
        """load_state_dict, with a model that does not fit the checkpoint reported as a CheckpointError."""
        try:
            self.load_state_dict(state)
        except (RuntimeError, KeyError, ValueError) as exc:
            raise ckpt.CheckpointError(f"{path}: does not fit this run's model/optimizer/data "
                                       f"(config changed?): {exc}") from None

    # -------------------------------------------------------------------------------------- loop

    def train(self, stop_at: int | None = None) -> dict[str, Any] | None:
        """Train until `train.steps`, then save, evaluate and write `summary.json`.

        SIGUSR2, SIGTERM and `train.exit_after_minutes` stop the loop at the next step boundary on
        every rank at once (training/preemption.py); the checkpoint is saved and `stop_reason` set.

        Args:
            stop_at: stop early after this many completed steps and save a checkpoint (as a preempted
                run would); the next Trainer on the same run_dir resumes from it.
        Returns:
            The summary dict when the run reached `train.steps`, else None.
        """
        self.stops.install()  # recorded signals act at step boundaries only; none kills a final save
        try:
            return self._train(stop_at)
        finally:
            self.stops.uninstall()

    def _train(self, stop_at: int | None) -> dict[str, Any] | None:
        from fwpkm_megatron.training.preemption import REASONS

        cfg = self.run.train
        end = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
        start_time, start_step = time.perf_counter(), self.step
        self._loop(end)
        if self.stop_reason:
            self.logger.console(f"stop requested ({REASONS[self.stop_reason]}) after step {self.step}")
        if self.last_checkpoint is None or self.last_checkpoint.name != ckpt.step_dir_name(self.step):
            self.save()
        if self.step < cfg.steps:
            self.logger.console(f"stopped at step {self.step}/{cfg.steps}; checkpoint {self.last_checkpoint}")
            self.logger.flush()
            return None
        self.evaluate()
        summary = self._summary(time.perf_counter() - start_time, start_step)
        if self.groups is None or self.groups.rank == 0:
            ckpt.write_atomic(self.run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        self.logger.flush()
        return summary

    def _loop(self, end: int) -> None:
        from fwpkm_megatron.memory import set_memory_diagnostics

        cfg = self.run.train
        while self.step < end:
            logged = (self.step + 1) % cfg.log_every == 0 or self.step + 1 == cfg.steps
            set_memory_diagnostics(self.model, logged)  # addr loss, MSE, |dV| of this step (memory/)
            metrics = self._train_step()
            self._log_throughput(metrics)
            if logged:
                self._log_memory(self.step)
                set_memory_diagnostics(self.model, False)
                self.logger.console(format_step_line(self.step, cfg.steps, metrics))
            if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.steps:
                self.evaluate()
            if cfg.save_every and self.step % cfg.save_every == 0 and self.step < end:
                self.save()
            if self.step < end:
                self.stop_reason = self.stops.agree(self.device)  # collective: every rank, every step
                if self.stop_reason:
                    return

    def _train_step(self) -> dict[str, float]:
        if self.engine is not None:
            return self._parallel_train_step()
        cfg = self.run.train
        t0 = time.perf_counter()
        self.model.train()
        window = self.model.window_control.begin_step(self.step, cfg.seed, training=True)
        batch = self.train_stream.next_batch()                               # [b, s+1]
        loss = self._forward(batch).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = clip_grad_norm(self.slow_params, cfg.grad_clip)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        loss_value = loss.item()  # host sync
        self.step += 1
        self.tokens_seen += self.tokens_per_step
        self.losses.append(loss_value)
        metrics = {
            "train/loss": loss_value,
            "train/lr": lr,
            "train/grad_norm": grad_norm,
            "train/tokens_per_s": self.tokens_per_step / max(time.perf_counter() - t0, 1e-9),
            "train/window": window or 0,  # attention window this step (pSWA draw); 0 = full attention
        }
        self.logger.scalars(metrics, self.step)
        return metrics

    def _parallel_train_step(self) -> dict[str, float]:
        """One step through the ParallelEngine: num_microbatches batches of this DP rank."""
        t0 = time.perf_counter()
        window = self._begin_step(self.step, training=True)
        batches = [self.train_stream.next_batch() for _ in range(self.num_microbatches)]
        metrics = self.engine.train_step(batches)
        self.step += 1
        self.tokens_seen += self.tokens_per_step
        self.losses.append(metrics["train/loss"])
        metrics["train/tokens_per_s"] = self.tokens_per_step / max(time.perf_counter() - t0, 1e-9)
        metrics["train/window"] = window or 0
        self.logger.scalars(metrics, self.step)
        return metrics

    def _forward(self, batch: torch.Tensor) -> torch.Tensor:
        """Per-token loss [b, s] of a [b, s+1] token batch (inputs = [:, :-1], labels = [:, 1:])."""
        batch = batch.to(self.device, non_blocking=True)
        inputs, labels = batch[:, :-1], batch[:, 1:]
        positions = torch.arange(inputs.shape[1], device=inputs.device).expand_as(inputs)
        return self.model(inputs, positions, attention_mask=None, labels=labels)

    # -------------------------------------------------------------------------------- evaluation

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean val loss over `eval_batches` global batches of a freshly built val stream; logs val/loss, val/ppl.

        The val stream is split over DP as the train stream is: each DP rank evaluates its
        `micro_batch_size` sequences of a global batch of micro_batch_size x DP, so a memory group
        (`parallel.memory_parallel`) reads and writes the group's batch as one process with the group's
        micro-batch would; the loss is averaged over DP ranks (equal token counts: token-weighted), and
        the memory groups' `persistent` states are averaged after each batch as after a training step.
        Fast weights, RNG states and the train/eval mode are restored afterwards, so evaluating
        never changes the training trajectory.
        """
        from fwpkm_megatron.data import build_loader
        from fwpkm_megatron.memory import restore_fast_weights, snapshot_fast_weights

        cfg = self.run.train
        val_stream = build_loader(self.run.data, "val", batch_size=cfg.micro_batch_size,
                                  seq_len=cfg.seq_len, seed=cfg.seed, rank=self.dp_rank, world_size=self.dp)
        if cfg.eval_batches > val_stream.batches_per_epoch and not self._noted_val_size:
            self._noted_val_size = True  # once per run: the numbers do not change between evaluations
            self.logger.console(
                f"note: train.eval_batches={cfg.eval_batches} exceeds the {val_stream.batches_per_epoch} val "
                f"global batches of micro_batch_size x DP = {val_stream.global_batch} sequences the val split "
                "holds: later batches re-read its sequences (a persistent memory has seen them)")
        snapshot = snapshot_fast_weights(self.model)
        was_training = self.model.training
        total = 0.0
        try:
            with torch.random.fork_rng(devices=[]):
                self.model.eval()
                self._begin_step(self.step, training=False)
                for _ in range(cfg.eval_batches):
                    batch = val_stream.next_batch()
                    if self.engine is not None:
                        total += self.engine.eval_loss(batch)
                    else:
                        total += self._forward(batch).float().mean().item()  # host sync
        finally:
            restore_fast_weights(self.model, snapshot)
            self.model.train(was_training)
            val_stream.close()
        self.val_loss = total / cfg.eval_batches
        ppl = math.exp(min(self.val_loss, 80.0))  # clamp: exp overflows past ~709; ppl e^80 is "diverged"
        self.logger.scalars({"val/loss": self.val_loss, "val/ppl": ppl}, self.step)
        self.logger.console(f"eval step {self.step} | val_loss {self.val_loss:.4f} | val_ppl {ppl:.2f}")
        return self.val_loss

    # ------------------------------------------------------------------------------ checkpoints

    def save(self) -> Path:
        """Write a checkpoint of the current state (atomic; prunes to `keep_last`)."""
        with self.stops.held():  # a signal during the save is taken after it (training/preemption.py)
            return self._save()

    def _save(self) -> Path:
        if self.groups is None:
            self.last_checkpoint = ckpt.save_checkpoint(self.ckpt_root, self.step, self.state_dict(),
                                                        self.run.to_dict(), keep_last=self.run.train.keep_last)
        else:  # distributed: model, fast weights (and plain AdamW moments) through dist_checkpointing
            from fwpkm_megatron.parallel.dist_checkpoint import save_distributed

            plain = self.engine.deepspeed is None
            optimizer = self.optimizer if plain else None
            drop = ("model", "optimizer") if plain else ("model",)
            state = {k: v for k, v in self.state_dict().items() if k not in drop}
            self.last_checkpoint = ckpt.save_sharded_checkpoint(
                self.ckpt_root, self.step, state, self.run.to_dict(), keep_last=self.run.train.keep_last,
                rank=self.groups.rank, world_size=self.groups.world_size, layout=_layout_record(self.groups),
                write_dist=lambda directory: save_distributed(directory, self.engine.chunks, optimizer))
        self.logger.console(f"saved checkpoint {self.last_checkpoint}")
        return self.last_checkpoint

    def close(self) -> None:
        """Release the train stream's readers and flush the event files."""
        self.train_stream.close()
        self.logger.close()

    # ---------------------------------------------------------------------------------- logging

    def _log_throughput(self, metrics: dict[str, float]) -> None:
        """perf/model_tflops_per_device and, where the device's peak is known, perf/mfu (training/flops.py)."""
        tflops = self.flops_per_token * metrics["train/tokens_per_s"] / self.world_size / 1e12
        perf = {"perf/model_tflops_per_device": tflops}
        if self.peak_tflops is not None:
            perf["perf/mfu"] = tflops / self.peak_tflops
        self.logger.scalars(perf, self.step)

    def _log_memory(self, step: int) -> None:
        from fwpkm_megatron.memory import gate_histograms, memory_stats

        self.logger.scalars(memory_stats(self.model), step)
        self.logger.histograms(gate_histograms(self.model), step)

    def _log_derived(self, fresh: bool) -> None:
        """Derived numbers of the run (style item 8): console always, TensorBoard text on a fresh run."""
        from fwpkm_megatron.memory import fast_weight_states

        cfg = self.run.train
        from fwpkm_megatron.parallel.sharding import memory_bytes

        fast = [b for state in fast_weight_states(self.model).values() for b in state.buffers()]
        fast_numel = sum(b.numel() for b in fast)
        fast_bytes = sum(b.numel() * b.element_size() for b in fast)
        self.fast_weight_bytes_per_rank = self._max_over_ranks(fast_bytes)
        slow_numel = sum(p.numel() for p in self.model.parameters())
        lines = [
            f"tokens per step: {self.tokens_per_step:,} ({cfg.micro_batch_size} seqs x {cfg.seq_len} tok"
            f" x {self.num_microbatches} micro-batches x DP={1 if self.groups is None else self.groups.dp});"
            f" {cfg.steps} steps = {self.tokens_per_step * cfg.steps:,} tokens; precision {cfg.precision}",
            f"slow parameters: {slow_numel:,} ({format_count(slow_numel)}), optimized by AdamW",
            f"fast weights: {fast_numel:,} ({format_count(fast_numel)}) in {len(fast)} buffers,"
            f" {format_bytes(fast_bytes)} (never in the optimizer)",
            f"vocab size: {self.vocab_size:,}; parallel layout: "
            + ("1 process (TP=1, PP=1, DP=1)" if self.groups is None else self.groups.describe()),
        ]
        lines.append(f"fast weights per rank: {format_bytes(self.fast_weight_bytes_per_rank)} (the largest rank's)")
        if self.groups is not None:
            g = self.groups
            lines.append(f"memory tables on this rank: {format_bytes(memory_bytes(self.model))}"
                         f" (FwPKM columns over TP x M = {g.tp} x {g.mp}, static PKM over TP={g.tp})")
            if self.engine.sync_bytes:
                lines.append(f"fast-weight sync between {g.num_mem_groups} memory groups: the rows written in a step,"
                             f" at most {format_bytes(self.engine.sync_bytes)} per step per rank (persistent policy)")
        lines.append(f"model FLOPs per token: {format_count(self.flops_per_token)} (forward + backward, memory ops"
                     f" included; docs/performance.md); {self.peak_note}")
        for line in lines:
            self.logger.console(line)
        if fresh:
            self.logger.text("run/derived", "\n".join(lines))
            self.logger.text("run/config", json.dumps(self.run.to_dict(), indent=2))
            self.logger.scalars({"run/tokens_per_step": self.tokens_per_step,
                                 "run/slow_params": slow_numel, "run/fast_params": fast_numel,
                                 "run/fast_bytes": fast_bytes, "run/flops_per_token": self.flops_per_token}, 0)

    def _max_over_ranks(self, value: int) -> int:
        """The largest `value` over all ranks (collective in a parallel run)."""
        if self.groups is None or self.groups.world_size == 1:
            return value
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.float64, device=next(self.model.parameters()).device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def _summary(self, wall_seconds: float, start_step: int) -> dict[str, Any]:
        tail = self.losses[-FINAL_LOSS_WINDOW:]
        return {
            "steps": self.step,
            "tokens_seen": self.tokens_seen,
            "losses": self.losses,
            "first_loss": self.losses[0],
            "final_loss": self.losses[-1],
            f"final_loss_mean_last_{FINAL_LOSS_WINDOW}": sum(tail) / len(tail),
            "val_loss": self.val_loss,
            "val_ppl": math.exp(min(self.val_loss, 80.0)),
            "checkpoint": str(self.last_checkpoint),
            "tensorboard_dir": str(self.tb_dir),
            "wall_seconds": wall_seconds,  # this process's train(): its steps, evals and saves (not the build)
            "resumed_from_step": start_step,  # 0 for a fresh run; wall_seconds covers steps after this one
            "fast_weight_bytes_per_rank": self.fast_weight_bytes_per_rank,  # FwPKM state, the largest rank's
        }


def uses_parallel_engine(run: RunConfig) -> bool:
    """True when the run needs the ParallelEngine (several processes or micro-batches, bf16 through
    megatron's Float16Module, megatron's distributed optimizer, ZeRO)."""
    import os

    par, world = run.parallel, int(os.environ.get("WORLD_SIZE", "1"))
    return (world > 1 or par.tp > 1 or par.pp > 1 or num_microbatches(run, world) > 1
            or run.deepspeed.zero_stage >= 0 or run.train.precision != "fp32" or run.optimizer.distributed)


def _layout_record(groups) -> dict[str, int]:
    if groups is None:
        return {"world_size": 1, "tp": 1, "pp": 1, "vpp": 1, "dp": 1}
    record = {"world_size": groups.world_size, "tp": groups.tp, "pp": groups.pp, "vpp": groups.vpp, "dp": groups.dp}
    if groups.mp > 1:
        record["memory_parallel"] = groups.mp
    return record


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _changed_keys(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Dotted `section.key` names whose values differ between two RunConfig dicts."""
    changed = []
    for section in sorted(set(old) | set(new)):
        a, b = old.get(section, {}), new.get(section, {})
        changed += [f"{section}.{k}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return changed
