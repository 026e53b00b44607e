"""Rules between the parallel layout, the batch sizes and the model, and the numbers derived from them.

Pure functions of a `RunConfig` (and the world size when known), returning problems as strings that
name the keys; `config.validate` collects them, and `fwpkm-launch` / the process groups call
`layout_problems` again once the world size is known. Re-exported by `fwpkm_megatron.config`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # no runtime import: config.py imports this module
    from fwpkm_megatron.config import RunConfig


def layout_problems(run: RunConfig, world_size: int | None = None) -> list[str]:
    """Rules between the parallel layout and the model, naming the numbers; `world_size` when known."""
    par, m, p = run.parallel, run.model, []
    tp, pp, vpp = par.tp, par.pp, par.vpp
    if tp >= 1:
        groups = m.num_query_groups or m.num_attention_heads
        if m.num_attention_heads % tp or groups % tp:
            p.append(f"parallel.tp={tp}: must divide model.num_attention_heads={m.num_attention_heads}"
                     f" and the query groups ({groups})")
        if m.mixer == "gdn" and (m.gdn_num_key_heads % tp or m.gdn_num_value_heads % tp):
            p.append(f"parallel.tp={tp}: must divide model.gdn_num_key_heads={m.gdn_num_key_heads} and "
                     f"model.gdn_num_value_heads={m.gdn_num_value_heads} (GDN heads are split over TP)")
        ffn = m.ffn_hidden_size or 4 * m.hidden_size
        if ffn % tp:
            p.append(f"parallel.tp={tp}: must divide the MLP width {ffn}")
        for name, cfg in (("fwpkm", run.fwpkm), ("pkm", run.pkm)):
            if cfg.layers and cfg.d_v % tp:
                p.append(f"parallel.tp={tp}: must divide {name}.d_v={cfg.d_v} (value tables are column-sharded)")
        if tp > 1 and run.fwpkm.layers and not run.fwpkm.addr_loss:
            p.append(f"parallel.tp={tp}: fwpkm.addr_loss=false (keys moved by the MSE over d_v) is only "
                     "supported at tp=1")
        if run.fwmlp.layers and run.fwmlp.d_hidden % tp:
            p.append(f"parallel.tp={tp}: must divide fwmlp.d_hidden={run.fwmlp.d_hidden} (the fast MLP's hidden "
                     "dim is split)")
        if m.vocab_size is not None and m.vocab_size % tp:
            p.append(f"parallel.tp={tp}: must divide model.vocab_size={m.vocab_size}")
        if par.memory_parallel > 1:
            p += _memory_parallel_problems(run, tp, par.memory_parallel, world_size)
    if pp >= 1 and vpp >= 1 and m.num_layers % (pp * vpp):
        p.append(f"model.num_layers={m.num_layers}: must be divisible by parallel.pp * parallel.vpp = "
                 f"{pp} * {vpp} = {pp * vpp}")
    if par.sequence_parallel and tp <= 1:
        p.append(f"parallel.sequence_parallel=true: splits the sequence over the tensor-parallel group, so it "
                 f"needs parallel.tp > 1 (got {tp})")
    elif par.sequence_parallel:
        p.append("parallel.sequence_parallel=true: not supported: megatron-core's local layer spec (torch RMSNorm, "
                 "no TransformerEngine) has no sequence-parallel norms, and the FwPKM branch before the mixer scans "
                 "the whole sequence (docs/parallelism.md, 'Attention under TP; sequence parallelism'); "
                 "use parallel.tp alone")
    if tp > 1 and m.qk_norm and run.deepspeed.zero_stage in (2, 3):
        p.append(f"model.qk_norm=true with parallel.tp={tp} and deepspeed.zero_stage={run.deepspeed.zero_stage}: "
                 "the q/k norm grads must be summed over TP after the backward, but ZeRO-2/3 partition them "
                 "during it; use zero_stage=1 (or -1)")
    batch_problem = global_batch_problem(run, world_size)
    if batch_problem:
        p.append(batch_problem)
    derived = bool(run.train.global_batch_size)  # micro-batches known only with the world size
    micro = num_microbatches(run, world_size)
    where = "micro-batches per DP rank (from train.global_batch_size)" if derived else "parallel.num_microbatches"
    checkable = not batch_problem and (not derived or data_parallel_size(run, world_size) is not None)
    if checkable and pp > 1 and micro < pp:
        p.append(f"{where}={micro}: must be >= parallel.pp={pp}")
    if checkable and vpp > 1 and micro % pp:
        p.append(f"{where}={micro}: interleaving needs a multiple of parallel.pp={pp}")
    if pp > 1 and run.deepspeed.zero_stage in (2, 3):
        p.append(f"deepspeed.zero_stage={run.deepspeed.zero_stage} with parallel.pp={pp}: DeepSpeed allows only "
                 "ZeRO-1 with pipeline parallelism (2/3 partition gradients during the backward, before the "
                 "cross-stage tied-embedding sum); use zero_stage=1")
    if world_size is not None and tp >= 1 and pp >= 1 and world_size % (tp * pp):
        p.append(f"world size {world_size}: must be divisible by parallel.tp * parallel.pp = {tp} * {pp} = {tp * pp}")
    return p


def _memory_parallel_problems(run: RunConfig, tp: int, mp: int, world_size: int | None) -> list[str]:
    """Rules of parallel.memory_parallel = M > 1 (memory groups of M data-parallel ranks)."""
    par, f, p = run.parallel, run.fwpkm, []
    key = f"parallel.memory_parallel={mp}"
    if not f.layers:
        p.append(f"{key}: shards FwPKM tables, but fwpkm.layers is empty")
        return p
    if run.fwmlp.layers:
        p.append(f"{key} with fwmlp.layers={run.fwmlp.layers}: the dense FwMLP has no memory-group exchange; "
                 "use memory_parallel=1")
    if f.d_v % (tp * mp):
        p.append(f"{key} with parallel.tp={tp}: fwpkm.d_v={f.d_v} must be divisible by tp * memory_parallel = "
                 f"{tp * mp} (tables are column-sharded over TP x M)")
    if run.pkm.layers and run.pkm.d_v % (tp * mp):
        p.append(f"{key} with parallel.tp={tp}: pkm.d_v={run.pkm.d_v} must be divisible by tp * memory_parallel = "
                 f"{tp * mp} (static PKM tables are column-sharded over TP x M)")
    if run.pkm.layers and run.deepspeed.zero_stage >= 0:
        p.append(f"{key} with pkm.layers and deepspeed.zero_stage={run.deepspeed.zero_stage}: the static PKM "
                 "tables are split over the memory group, so their gradients may be summed only over the ranks "
                 "holding the same columns, but ZeRO reduces every gradient over the whole data-parallel group "
                 "(its only other path, DeepSpeed MoE expert groups, is not wired); use zero_stage=-1 (megatron "
                 "DDP, optionally optimizer.distributed=true)")
    if not f.addr_loss:
        p.append(f"{key}: fwpkm.addr_loss=false (keys moved by the MSE over d_v) is only supported at "
                 "memory_parallel=1")
    if f.backend == "triton":
        p.append(f"{key}: fwpkm.backend=triton has no memory-group exchange; use auto or reference")
    if world_size is not None and par.tp >= 1 and par.pp >= 1 and world_size % (par.tp * par.pp) == 0:
        dp = world_size // (par.tp * par.pp)
        if dp % mp:
            p.append(f"{key}: must divide the data-parallel size {dp} (world size {world_size} / "
                     f"(parallel.tp * parallel.pp = {par.tp * par.pp}))")
    return p


def fast_weight_policy(run: RunConfig) -> str:
    """The run's fast-weight policy: fwpkm.policy, or fwmlp.policy when only FwMLP layers exist
    (validate() makes the two agree when both have layers)."""
    return run.fwmlp.policy if run.fwmlp.layers and not run.fwpkm.layers else run.fwpkm.policy


def data_parallel_size(run: RunConfig, world_size: int | None) -> int | None:
    """DP = world size / (tp * pp), or None when the world size is unknown or does not divide."""
    model_parallel = run.parallel.tp * run.parallel.pp
    if world_size is None or model_parallel < 1 or world_size % model_parallel:
        return None
    return world_size // model_parallel


def global_batch_problem(run: RunConfig, world_size: int | None) -> str | None:
    """Why `train.global_batch_size` does not fit the layout (None when it does or is unset)."""
    t, par = run.train, run.parallel
    dp = data_parallel_size(run, world_size)
    if not t.global_batch_size or dp is None or t.micro_batch_size < 1:
        return None
    per_pass = t.micro_batch_size * dp
    if t.global_batch_size % per_pass:
        return (f"train.global_batch_size={t.global_batch_size}: must be a multiple of train.micro_batch_size "
                f"x DP = {t.micro_batch_size} x {dp} = {per_pass} (DP = world size {world_size} / "
                f"(parallel.tp * parallel.pp = {par.tp * par.pp}))")
    derived = t.global_batch_size // per_pass
    if par.num_microbatches not in (1, derived):
        return (f"parallel.num_microbatches={par.num_microbatches} with train.global_batch_size="
                f"{t.global_batch_size}: the global batch gives {derived} micro-batches per DP rank "
                f"({t.global_batch_size} / ({t.micro_batch_size} x DP={dp})); set only one of the two")
    return None


def num_microbatches(run: RunConfig, world_size: int | None = 1) -> int:
    """Micro-batches per DP rank and step: from `train.global_batch_size` when set (it must divide, see
    `global_batch_problem`), else `parallel.num_microbatches`."""
    dp = data_parallel_size(run, world_size)
    if not run.train.global_batch_size or dp is None:
        return run.parallel.num_microbatches
    return max(run.train.global_batch_size // (run.train.micro_batch_size * dp), 1)
