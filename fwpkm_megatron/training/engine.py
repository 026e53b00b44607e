"""The parallel training step: megatron-core schedules over TP x PP x DP, megatron DDP or DeepSpeed ZeRO.

Used by the `Trainer` whenever the run is not a plain single-process fp32 step (world size > 1,
several micro-batches, bf16, megatron's distributed optimizer, or DeepSpeed). One step:

    fb = megatron's forward_backward_func (no pipelining, 1F1B, or interleaved 1F1B)
    fb(forward_step, this rank's wrapped chunks, num_microbatches)   # fast weights written in the forwards
    plain engine (training/megatron_dp.py): DDP reduces the fp32 main grads over DP in buckets during the
      backward; finalize_model_grads waits for them and sums the tied embedding's grads over the first
      and last stage and the q/k-norm grads over TP;
      megatron's optimizer computes the grad norm over the model-parallel group, clips,
      steps AdamW (fp32 master weights under bf16; sharded over DP with optimizer.distributed)
    DeepSpeed: tied-embedding grads summed here; engine.step() reduces (ZeRO), clips, steps
    sync_fast_weights over DP (`persistent` only; parallel/apply.py)

Chunks are built on the host and moved to the rank's device (training/device.py) before any wrapper.

Micro-batches of one step run in order through one fast-weight state (each sees the writes of the ones
before it); the loss is the mean over micro-batches and DP ranks, the same number on every rank.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from fwpkm_megatron.config import RunConfig, fast_weight_policy
from fwpkm_megatron.parallel.apply import fast_weight_sync_bytes, parallelize, sync_fast_weights
from fwpkm_megatron.parallel.groups import ParallelGroups
from fwpkm_megatron.training import device as devices
from fwpkm_megatron.training.device import compute_dtype, rank_device


def build_chunks(run: RunConfig, vocab_size: int, groups: ParallelGroups) -> list[nn.Module]:
    """This rank's model chunks (one per virtual stage), sharded and initialised layout-independently.

    Memory tables are built as this rank's column slice only (`table_shards`). With
    `parallel.layout_independent_init` and PP > 1, every rank first builds the whole model at PP = 1
    (same TP; its memory tables on the meta device, never allocated) and copies its layers' slow weights
    and table seeds from it, so every layout starts from the weights of a single-process run with the
    same seed (costs the slow weights of one full model of host memory during the build).
    """
    import dataclasses

    from fwpkm_megatron.model import build_model, transformer_config
    from fwpkm_megatron.parallel.sharding import table_shards

    par = run.parallel
    dtype = compute_dtype(run.train.precision)
    tp_overrides = dict(tensor_model_parallel_size=groups.tp, params_dtype=dtype, pipeline_dtype=dtype,
                        bf16=dtype == torch.bfloat16)
    shards = table_shards(groups)
    reference = None
    if groups.pp > 1 and par.layout_independent_init:
        shapes_only = tuple(dataclasses.replace(s, materialize=False) for s in shards)
        reference = build_model(run, vocab_size, config=transformer_config(run, **tp_overrides), shards=shapes_only)
    overrides = dict(tp_overrides, pipeline_model_parallel_size=groups.pp)
    if groups.vpp > 1:
        overrides["virtual_pipeline_model_parallel_size"] = groups.vpp
    if par.recompute:
        overrides.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    config = transformer_config(run, **overrides)
    chunks = []
    for vp in range(groups.vpp):
        pre = groups.is_first_stage and vp == 0
        post = groups.is_last_stage and vp == groups.vpp - 1
        chunk = build_model(run, vocab_size, config=config, pre_process=pre, post_process=post,
                            vp_stage=vp if groups.vpp > 1 else None, shards=shards)
        if reference is not None:
            _load_from_reference(chunk, reference)
        chunks.append(chunk)
    parallelize(chunks, groups, run)
    device = rank_device()
    return [chunk.to(device) for chunk in chunks]  # built on the host, computed on the rank's device


def _load_from_reference(chunk: nn.Module, reference_model: nn.Module) -> None:
    """Copy a PP=1 build's tensors into a stage chunk, mapping local layer indices to global ids.

    The reference's memory tables exist only as shapes: the chunk's tables are redrawn from the
    reference's seeds (each rank draws only its columns)."""
    reference = reference_model.state_dict()
    local_to_global = {i: layer.layer_number - 1 for i, layer in enumerate(chunk.decoder.layers)}

    def global_name(key: str) -> str:
        if key.startswith("decoder.layers."):
            parts = key.split(".")
            parts[2] = str(local_to_global[int(parts[2])])
            return ".".join(parts)
        return key

    out = {}
    for key in chunk.state_dict():
        src = global_name(key)
        if key == "output_layer.weight" and src not in reference:
            src = "embedding.word_embeddings.weight"  # tied: the last stage's copy of the embedding
        if src in reference:
            if not (isinstance(reference[src], torch.Tensor) and reference[src].is_meta):
                out[key] = reference[src]
        elif not key.endswith("_extra_state"):
            raise KeyError(f"{key}: no tensor {src!r} in the PP=1 reference build")
    chunk.load_state_dict(out, strict=False)
    modules = dict(reference_model.named_modules())
    for name, module in chunk.named_modules():
        ref = modules[global_name(name)] if hasattr(module, "init_seed") or hasattr(module, "values_seed") else None
        if hasattr(module, "init_seed"):    # FwPKM fast-weight state
            module.init_seed = ref.init_seed
            module.reset()
        elif hasattr(module, "values_seed"):  # static PKM value table
            module.redraw_values(ref.values_seed)


class ParallelEngine:
    """Model chunks, optimizer and the step of one rank.

    Args:
        run: the validated RunConfig.
        groups: this rank's ParallelGroups.
        vocab_size: padded vocabulary (divisible by TP).
    """

    def __init__(self, run: RunConfig, groups: ParallelGroups, vocab_size: int):
        self.run, self.groups = run, groups
        self.device = rank_device()
        self.chunks = build_chunks(run, vocab_size, groups)  # the GPTModels: state dicts, fast weights
        self.model = ChunkList(self.chunks)  # one module for DeepSpeed, state_dict() and statistics
        self.config = self.chunks[0].config
        self.deepspeed = None
        if run.deepspeed.zero_stage >= 0:
            from fwpkm_megatron.training.zero import build_deepspeed

            self.deepspeed, self.optimizer, self.scheduler = build_deepspeed(self, run)
            self.modules = self.chunks  # what the schedule runs
        else:
            from fwpkm_megatron.training.megatron_dp import build_optimizer, wrap_chunks

            self.modules = wrap_chunks(self.chunks, run, groups)
            self.optimizer, self.scheduler = build_optimizer(self.modules, run, groups)
        self.slow_params = [p for p in self.model.parameters() if p.requires_grad]
        self.sync_bytes = fast_weight_sync_bytes(self.chunks, groups) if (
            fast_weight_policy(run) == "persistent") else 0

    # ------------------------------------------------------------------------------------ the step

    def train_step(self, batches: list[torch.Tensor]) -> dict[str, float]:
        """One optimizer step over `batches` (num_microbatches tensors [b, s+1] of this DP rank)."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        groups = self.groups
        for module in self.modules:
            module.train()
        self.zero_grad()
        batches = [b.to(self.device, non_blocking=True) for b in batches]
        fb = get_forward_backward_func()
        iterators = [iter(batches) for _ in self.chunks] if len(self.chunks) > 1 else iter(batches)
        losses = fb(forward_step_func=self._forward_step, data_iterator=iterators,
                    model=self.modules if len(self.modules) > 1 else self.modules[0],
                    num_microbatches=len(batches), seq_length=batches[0].shape[1] - 1,
                    micro_batch_size=batches[0].shape[0], forward_only=False)
        lr = self.optimizer.param_groups[0]["lr"]
        if self.deepspeed is None:  # DP reduction and tied embeddings: finalize_model_grads, inside fb
            grad_norm = self.optimizer_step()
        else:
            self._allreduce_tied_embedding_grads()
            self._allreduce_qk_norm_grads()
            self.deepspeed.step()  # reduces over DP (ZeRO), clips, steps AdamW and the scheduler
            grad_norm = float(self.deepspeed.get_global_grad_norm())
        synced = sync_fast_weights(self.chunks, groups, fast_weight_policy(self.run))
        return {"train/loss": self._mean_loss(losses), "train/lr": lr, "train/grad_norm": grad_norm,
                "train/fast_weight_sync_bytes": synced}

    def zero_grad(self) -> None:
        """Clear the grads (megatron DDP: its fp32 main-grad buffers) before a step's backwards."""
        if self.deepspeed is not None:
            self.deepspeed.zero_grad()
            return
        for module in self.modules:
            module.zero_grad_buffer()
        self.optimizer.zero_grad()

    def optimizer_step(self) -> float:
        """megatron's optimizer step after the backwards (grads already reduced): clip, AdamW, LR schedule.

        Returns the pre-clip grad norm over the model-parallel group (each TP shard and PP stage once).
        """
        _, grad_norm, _ = self.optimizer.step()
        self.scheduler.step()
        return float(grad_norm)  # a Python float already (megatron synced for the clip)

    @torch.no_grad()
    def eval_loss(self, batch: torch.Tensor) -> float:
        """Mean per-token loss of one batch [b, s+1] of this DP rank, averaged over DP (forward only).

        The forward writes fast weights as a training step's does; afterwards the memory groups'
        `persistent` states are averaged as after a step, so consecutive eval batches see what
        training would (a no-op with one memory group). Callers snapshot and restore fast weights."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        batch = batch.to(self.device, non_blocking=True)
        iterators = [iter([batch]) for _ in self.chunks] if len(self.chunks) > 1 else iter([batch])
        losses = get_forward_backward_func()(
            forward_step_func=self._forward_step, data_iterator=iterators,
            model=self.modules if len(self.modules) > 1 else self.modules[0], num_microbatches=1,
            seq_length=batch.shape[1] - 1, micro_batch_size=batch.shape[0], forward_only=True)
        sync_fast_weights(self.chunks, self.groups, fast_weight_policy(self.run))
        return self._mean_loss(losses)

    def _mean_loss(self, losses: list[dict[str, torch.Tensor]]) -> float:
        """Mean micro-batch loss of the global batch, on every rank (host sync)."""
        groups = self.groups  # non-last stages have no losses: they add zeros on the device
        value = torch.stack([x["loss"] for x in losses]).mean() if losses else torch.zeros((), device=self.device)
        value = value.float().reshape(1).clone()
        if groups.pp_group is not None:  # only the last stage has losses
            dist.all_reduce(value, group=groups.pp_group)
        if groups.dp_group is not None:
            dist.all_reduce(value, group=groups.dp_group)
            value /= groups.dp
        return devices.host_float(value)

    def _allreduce_tied_embedding_grads(self) -> None:
        """With PP and tied embeddings, sum the embedding's grad (first stage) and the output layer's
        copy (last stage) over the embedding group, as megatron's finalize_model_grads does."""
        groups = self.groups
        if groups.embedding_group is None or not self.run.model.tie_embeddings:
            return
        chunk = self.chunks[0] if groups.is_first_stage else self.chunks[-1]
        if not (groups.is_first_stage or groups.is_last_stage):
            return
        weight = chunk.shared_embedding_or_output_weight()
        grad = weight.grad if weight.grad is not None else torch.zeros_like(weight)
        dist.all_reduce(grad, group=groups.embedding_group)
        weight.grad = grad

    def _allreduce_qk_norm_grads(self) -> None:
        """DeepSpeed path: under TP each rank normalises only its own heads with the replicated per-head q/k
        RMSNorm weights, so their grads are partial: sum them over the TP group, as megatron's
        finalize_model_grads does for `qk_layernorm` on the plain path."""
        if self.groups.tp_group is None or not self.run.model.qk_norm:
            return
        grads = [p.grad for chunk in self.chunks for name, p in chunk.named_parameters()
                 if p.grad is not None and ("q_layernorm" in name or "k_layernorm" in name)]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=self.groups.tp_group)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    # ---------------------------------------------------------------------------------- state

    def _forward_step(self, data_iterator, model):
        """Through the DeepSpeed engine when there is one (its forward arms ZeRO's backward hooks)."""
        if self.deepspeed is None:
            return _forward_step(data_iterator, model)
        index = next(i for i, c in enumerate(self.modules) if c is model)
        return _forward_step(data_iterator, model,
                             runner=lambda *a, **k: self.deepspeed(*a, chunk=index, **k))

    def optimizer_state(self) -> dict[str, Any]:
        """This rank's optimizer state (with ZeRO: its partition, as DeepSpeed's optimizer holds it)."""
        if self.deepspeed is None:
            return self.optimizer.state_dict()
        return self.deepspeed.optimizer.state_dict()

    def load_optimizer_state(self, state: dict[str, Any]) -> None:
        if self.deepspeed is None:
            self.optimizer.load_state_dict(state)
        else:
            # ZeRO-1/2 take every DP rank's state and pick their own by DP rank; each rank saved only its own
            stage12 = self.run.deepspeed.zero_stage in (1, 2)
            self.deepspeed.optimizer.load_state_dict([state] * self.groups.dp if stage12 else [state])


class ChunkList(nn.ModuleList):
    """This rank's model chunks as one module; `forward(..., chunk=i)` runs chunk i (DeepSpeed wraps this)."""

    def forward(self, *args, chunk: int = 0, **kwargs):
        return self[chunk](*args, **kwargs)


def _forward_step(data_iterator, model, runner=None):
    """megatron's forward_step_func: per-token loss of one micro-batch [b, s+1] and its loss function.

    `runner(inputs, positions, labels)` replaces `model(...)` (the DeepSpeed engine's forward)."""
    batch = next(data_iterator)
    inputs, labels = batch[:, :-1], batch[:, 1:]
    positions = torch.arange(inputs.shape[1], device=inputs.device).expand_as(inputs)
    if runner is None:
        output = model(inputs, positions, attention_mask=None, labels=labels)
    else:
        output = runner(inputs, positions, attention_mask=None, labels=labels)

    def loss_func(per_token_loss):
        loss = per_token_loss.float().mean()
        return loss, {"loss": loss.detach().clone()}  # the schedule divides `loss` in place

    return output, loss_func
