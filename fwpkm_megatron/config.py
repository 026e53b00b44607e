"""Run configuration: typed dataclasses that mirror the YAML tree one-to-one.

A run is `RunConfig(model=..., fwpkm=..., pkm=..., fwmlp=..., data=..., train=...)`. `load_config(path, overrides)`
reads a YAML file, applies dotted `a.b=c` overrides, rejects unknown or misplaced keys and reports
*every* problem in one `ConfigError` naming the key and the rule. Each dataclass checks only its own
invariants in `problems()`; checks spanning components live in `validate(run)`, those between the
parallel layout, batch sizes and model in `config_rules.py` (re-exported here).
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from fwpkm_megatron.config_rules import (  # noqa: F401  re-exported: `from fwpkm_megatron.config import ...`
    data_parallel_size, fast_weight_policy, global_batch_problem, layout_problems, num_microbatches)

POLICIES = ("persistent", "persistent_local", "per_sequence")
DP_SYNC = ("step",)  # persistent under DP; persistent_local is the unsynchronised per-rank mode
ATTENTION_KINDS = ("full", "swa", "pswa")
MIXERS = ("attention", "gdn")
PRECISIONS = ("fp32", "bf16")
# Keys that moved: the loader names the new place instead of calling them unknown.
MOVED_KEYS = {"deepspeed.bf16": "train.precision (fp32 | bf16), used by every engine"}


class ConfigError(ValueError):
    """An invalid configuration; the message lists every offending key with its rule."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid config:\n  " + "\n  ".join(problems))


@dataclass(kw_only=True)
class ModelConfig:
    num_layers: int = 4
    hidden_size: int = 128
    num_attention_heads: int = 4
    num_query_groups: int | None = None  # GQA groups; None = multi-head attention
    ffn_hidden_size: int | None = None   # None = 4 * hidden_size
    vocab_size: int | None = None        # None = taken from the prepared data's tokenizer
    max_seq_len: int = 256               # RoPE table length; >= train.seq_len
    attention: str = "swa"               # full | swa (every layer windowed) | pswa (windowed with prob. p per step)
    window: int = 32                     # sliding window W: a query sees itself and W-1 previous tokens
    pswa_prob: float = 0.9               # pSWA: probability per step that full-attention layers use the window
    rope_base: float = 10000.0
    rotary_percent: float = 1.0          # RoPE on this fraction of each head's channels (paper: 0.25), rest unrotated
    qk_norm: bool = False                # RMSNorm per head on queries and keys before RoPE (paper: on)
    attention_output_gate: bool = False  # attention output * sigmoid(gate), gate from the qkv projection (paper: on)
    norm_eps: float = 1e-5
    init_std: float = 0.02
    tie_embeddings: bool = True
    mixer: str = "attention"             # token mixer: attention | gdn (megatron-core's Gated DeltaNet, model/gdn.py)
    attention_layers: list[int] = field(default_factory=list)  # mixer=gdn: 0-indexed layers that keep attention
                                         # (the hybrid; paper GDN+SWA: [3, 7, 11] of 12); empty = all GDN
    gdn_conv_kernel: int = 4             # GDN short causal conv over q, k, v (paper: 4)
    gdn_num_key_heads: int = 8           # GDN q/k heads (paper: 8)
    gdn_num_value_heads: int = 8         # GDN v/gate heads; a multiple of the key heads (paper: 8)
    gdn_key_head_dim: int = 64           # d_k of each GDN head's state (paper: 64)
    gdn_value_head_dim: int = 64         # d_v of each GDN head's state (paper: 64)

    def problems(self) -> list[str]:
        p = []
        for name in ("num_layers", "hidden_size", "num_attention_heads", "max_seq_len", "window"):
            if getattr(self, name) < 1:
                p.append(f"model.{name}={getattr(self, name)}: must be >= 1")
        if self.hidden_size % max(self.num_attention_heads, 1):
            p.append(f"model.hidden_size={self.hidden_size}: must be divisible by "
                     f"model.num_attention_heads={self.num_attention_heads}")
        if self.num_query_groups is not None and self.num_attention_heads % max(self.num_query_groups, 1):
            p.append(f"model.num_query_groups={self.num_query_groups}: must divide num_attention_heads")
        if self.attention not in ATTENTION_KINDS:
            p.append(f"model.attention={self.attention!r}: must be one of {ATTENTION_KINDS}")
        p += self._mixer_problems()
        if not 0.0 <= self.pswa_prob <= 1.0:
            p.append(f"model.pswa_prob={self.pswa_prob}: must be in [0, 1]")
        head_dim = self.hidden_size // max(self.num_attention_heads, 1)
        rotary_dim = head_dim * self.rotary_percent
        if not 0.0 < self.rotary_percent <= 1.0 or rotary_dim != int(rotary_dim) or int(rotary_dim) % 2:
            p.append(f"model.rotary_percent={self.rotary_percent}: must be in (0, 1] with head_dim * rotary_percent "
                     f"an even integer (head_dim={head_dim})")
        return p

    def gdn_layers(self) -> list[int]:
        """0-indexed layers whose mixer is GDN (none with mixer=attention)."""
        return [i for i in range(self.num_layers) if i not in self.attention_layers] if self.mixer == "gdn" else []

    def _mixer_problems(self) -> list[str]:
        if self.mixer not in MIXERS:
            return [f"model.mixer={self.mixer!r}: must be one of {MIXERS}"]
        if self.mixer == "attention":
            return [f"model.attention_layers={self.attention_layers}: only with model.mixer=gdn (the layers a "
                    "GDN hybrid keeps as attention); with model.mixer=attention every layer is attention"
                    ] if self.attention_layers else []
        p = [f"model.{n}={getattr(self, n)}: must be >= 1" for n in ("gdn_conv_kernel", "gdn_num_key_heads",
             "gdn_num_value_heads", "gdn_key_head_dim", "gdn_value_head_dim") if getattr(self, n) < 1]
        if not p and self.gdn_num_value_heads % self.gdn_num_key_heads:
            p.append(f"model.gdn_num_value_heads={self.gdn_num_value_heads}: must be a multiple of "
                     f"model.gdn_num_key_heads={self.gdn_num_key_heads} (each q/k head serves value heads)")
        bad = [i for i in self.attention_layers if not 0 <= i < self.num_layers]
        if bad or len(set(self.attention_layers)) != len(self.attention_layers):
            p.append(f"model.attention_layers={self.attention_layers}: must be distinct ids in "
                     f"[0, model.num_layers={self.num_layers})")
        return p


@dataclass(kw_only=True)
class FwPKMConfig:
    """Fast-weight PKM (method section 3). Defaults are the paper's; ablations of section 5.7 are switches."""

    layers: list[int] = field(default_factory=list)  # 0-indexed layers with an FwPKM branch before the mixer
    num_slots: int = 512**2      # N; a perfect square (two codebooks of R = sqrt(N) sub-keys)
    d_k: int = 512               # query/key width; each codebook sees d_k/2
    d_v: int = 512               # value row width
    heads: int = 1               # H query heads sharing one value table (ablation h4k8: 4)
    topk: int = 8                # k, per codebook and after merging the k*k candidates
    chunk_size: int = 512        # C; writes land once per chunk, reads see earlier chunks only
    lookahead: int = 1           # target of token t is v_{t+lookahead} (ablation lahd0: 0)
    score: str = "idw"           # idw: -log(eps + ||q-K||^2); dot: q.K (collapses per the paper)
    eps: float = 1e-3            # IDW epsilon
    addr_loss: bool = True       # marginal-entropy addressing loss on sub-keys (off: MSE updates keys too)
    addr_loss_weight: float = 1.0
    gate: bool = True            # learned scalar gate mixing memory and dense value (off: output = read)
    gate_weighted_loss: bool = True  # weight each token's memorization loss by its gate
    value_zscore: bool = True    # z-score the value targets along d_v (App. A.3)
    detach_writes: bool = False  # stop-gradient through the writes (first-order; the paper backprops through them)
    value_lr: float = 1.0        # fast-weight SGD step on values
    key_lr: float = 1.0          # fast-weight SGD step on sub-keys
    policy: str = "persistent"   # persistent | persistent_local | per_sequence
    backend: str = "auto"        # memory-op kernels: auto | reference | triton

    def problems(self, prefix: str = "fwpkm") -> list[str]:
        p = _table_problems(self, prefix)
        if self.chunk_size < 1:
            p.append(f"{prefix}.chunk_size={self.chunk_size}: must be >= 1")
        if self.lookahead not in (0, 1):
            p.append(f"{prefix}.lookahead={self.lookahead}: must be 0 or 1")
        if self.score not in ("idw", "dot"):
            p.append(f"{prefix}.score={self.score!r}: must be 'idw' or 'dot'")
        if self.policy not in POLICIES:
            p.append(f"{prefix}.policy={self.policy!r}: must be one of {POLICIES}")
        if self.backend not in ("auto", "reference", "triton"):
            p.append(f"{prefix}.backend={self.backend!r}: must be auto, reference or triton")
        return p


@dataclass(kw_only=True)
class FwMLPConfig:
    """Fast-weight SwiGLU MLP baseline (method notes 4.1 "FwMLP"): FwPKM's chunk rule and target with a
    dense fast MLP in place of the sparse table. Defaults are the paper's FwMLP row."""

    layers: list[int] = field(default_factory=list)  # 0-indexed layers with an FwMLP branch before the mixer
    d_in: int = 512              # query width (the fast MLP's input)
    d_hidden: int = 2304         # the fast SwiGLU's hidden width
    d_v: int = 512               # value/target width (the fast MLP's output)
    chunk_size: int = 512        # C; writes land once per chunk, reads see earlier chunks only
    lookahead: int = 1           # target of token t is v_{t+lookahead}
    lr: float = 0.1              # fast-weight SGD step on the mean-reduced memorization loss
    gate: bool = True            # learned scalar gate mixing the fast MLP's output and the dense value
    gate_weighted_loss: bool = False  # the paper's FwMLP row has no loss gating (FwPKM's does)
    value_zscore: bool = True    # z-score the value targets along d_v (App. A.3)
    detach_writes: bool = False  # stop-gradient through the writes (first-order ablation)
    policy: str = "persistent"   # persistent | persistent_local | per_sequence

    def problems(self, prefix: str = "fwmlp") -> list[str]:
        p = [f"{prefix}.{n}={getattr(self, n)}: must be >= 1"
             for n in ("d_in", "d_hidden", "d_v", "chunk_size") if getattr(self, n) < 1]
        if self.lookahead not in (0, 1):
            p.append(f"{prefix}.lookahead={self.lookahead}: must be 0 or 1")
        if self.lr < 0:
            p.append(f"{prefix}.lr={self.lr}: must be >= 0")
        if self.gate_weighted_loss and not self.gate:
            p.append(f"{prefix}.gate_weighted_loss=true: needs {prefix}.gate=true (the loss weight is the gate)")
        if self.policy not in POLICIES:
            p.append(f"{prefix}.policy={self.policy!r}: must be one of {POLICIES}")
        return p


@dataclass(kw_only=True)
class PKMConfig:
    """Static PKM replacing the MLP (method section 2.4: Memory+ swilu output, dot-product scores)."""

    layers: list[int] = field(default_factory=list)  # 0-indexed layers whose MLP is a static PKM
    num_slots: int = 512**2
    d_k: int = 512
    d_v: int = 512
    heads: int = 4
    topk: int = 32
    score: str = "dot"

    def problems(self, prefix: str = "pkm") -> list[str]:
        p = _table_problems(self, prefix)
        if self.score not in ("idw", "dot"):
            p.append(f"{prefix}.score={self.score!r}: must be 'idw' or 'dot'")
        return p


def _table_problems(cfg, prefix: str) -> list[str]:
    p = []
    root = math.isqrt(max(cfg.num_slots, 0))
    if cfg.num_slots < 4 or root * root != cfg.num_slots:
        p.append(f"{prefix}.num_slots={cfg.num_slots}: must be a perfect square >= 4 (two codebooks of sqrt(N))")
    if cfg.d_k < 2 or cfg.d_k % 2:
        p.append(f"{prefix}.d_k={cfg.d_k}: must be even (split into two halves)")
    if cfg.d_v < 1 or cfg.heads < 1:
        p.append(f"{prefix}.d_v and {prefix}.heads: must be >= 1")
    if not 1 <= cfg.topk <= max(root, 1):
        p.append(f"{prefix}.topk={cfg.topk}: must be in [1, sqrt(num_slots)={root}]")
    return p


@dataclass(kw_only=True)
class DataConfig:
    path: str = "data/stdlib"      # local directory written by fwpkm-prep (holds train/, val/, tokenizer.json)
    remote: str | None = None      # optional remote root (s3://, gs://, ...) the dataset is streamed from
    local: str | None = None       # with remote: the local cache directory; None = `path` (older configs)
    cache_limit: str | None = None  # with remote: cap on the cache of each split's stream ("50gb", "800mb");
                                    # least-recently-used shards are evicted; None = unbounded
    shuffle: bool = True
    num_workers: int = 0
    num_canonical_nodes: int | None = None  # fixes the sample order whatever the GPU count; None = 8
    mixture: list[dict] = field(default_factory=list)  # [{path, remote, weight}]; empty = the one dataset at path

    @property
    def cache_dir(self) -> str:
        """Where the dataset is read from locally: `local` when streaming from a remote, else `path`."""
        return self.local if self.remote is not None and self.local is not None else self.path

    def problems(self) -> list[str]:
        p = [] if self.num_workers >= 0 else [f"data.num_workers={self.num_workers}: must be >= 0"]
        if self.local is not None and self.remote is None:
            p.append(f"data.local={self.local!r}: is the cache of data.remote; without a remote set data.path")
        if self.cache_limit is not None:
            if self.remote is None:
                p.append(f"data.cache_limit={self.cache_limit!r}: needs data.remote (a local dataset has no cache)")
            elif not re.fullmatch(r"\d+(\.\d+)?\s*([kmgt]b)?", str(self.cache_limit).strip().lower()):
                p.append(f"data.cache_limit={self.cache_limit!r}: must be a size such as '50gb' or '800mb'")
        if self.num_canonical_nodes is not None and self.num_canonical_nodes < 1:
            p.append(f"data.num_canonical_nodes={self.num_canonical_nodes}: must be >= 1")
        for i, member in enumerate(self.mixture):
            if not isinstance(member, dict) or "path" not in member or set(member) - {"path", "remote", "weight"}:
                p.append(f"data.mixture[{i}]={member!r}: must be a mapping with path, optional remote and weight")
            elif not (isinstance(member.get("weight", 1.0), (int, float)) and member.get("weight", 1.0) > 0):
                p.append(f"data.mixture[{i}].weight={member.get('weight')!r}: must be a number > 0")
        return p


@dataclass(kw_only=True)
class TrainConfig:
    run_dir: str = "runs/tiny"
    steps: int = 200
    seed: int = 1234
    micro_batch_size: int = 8
    seq_len: int = 256
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 20
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    adam_eps: float = 1e-8
    grad_clip: float = 1.0           # slow weights only; fast weights are never clipped
    log_every: int = 10
    eval_every: int = 0              # 0 = only at the end
    eval_batches: int = 8            # val global batches per evaluation (micro_batch_size per DP rank each)
    save_every: int = 0              # 0 = only at the end
    keep_last: int = 2
    threads: int = 0                 # torch intra-op threads; 0 = leave torch's default
    precision: str = "fp32"          # fp32 | bf16: bf16 compute, fp32 master weights and grads; fast weights fp32
    global_batch_size: int = 0       # sequences per optimizer step, any layout (micro-batches per DP rank =
                                     # global / (micro_batch_size x DP)); 0 = micro_batch_size x num_microbatches x DP
    peak_tflops: float | None = None  # one device's peak TFLOP/s for MFU; None = training/flops.py's table
    exit_after_minutes: float = 0.0  # stop, checkpoint (and requeue under SLURM) after this long; 0 = never
    max_requeues: int = 20           # cap on SLURM requeues (SLURM_RESTART_COUNT) after SIGUSR2 / exit_after

    def problems(self) -> list[str]:
        p = []
        for name in ("steps", "micro_batch_size", "seq_len", "eval_batches", "keep_last", "log_every"):
            if getattr(self, name) < 1:
                p.append(f"train.{name}={getattr(self, name)}: must be >= 1")
        for name in ("warmup_steps", "eval_every", "save_every", "threads", "exit_after_minutes", "max_requeues"):
            if getattr(self, name) < 0:
                p.append(f"train.{name}={getattr(self, name)}: must be >= 0")
        if not 0 < self.lr or not 0 <= self.min_lr <= self.lr:
            p.append(f"train.lr={self.lr}, train.min_lr={self.min_lr}: need 0 < lr and 0 <= min_lr <= lr")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            p.append(f"train.betas={self.betas}: must be two numbers in [0, 1)")
        if self.grad_clip < 0:
            p.append(f"train.grad_clip={self.grad_clip}: must be >= 0 (0 disables)")
        if self.precision not in PRECISIONS:
            p.append(f"train.precision={self.precision!r}: must be one of {PRECISIONS}")
        if self.global_batch_size < 0 or (self.global_batch_size and self.micro_batch_size >= 1
                                          and self.global_batch_size % self.micro_batch_size):
            p.append(f"train.global_batch_size={self.global_batch_size}: must be 0 or a multiple of "
                     f"train.micro_batch_size={self.micro_batch_size}")
        if self.peak_tflops is not None and not self.peak_tflops > 0:
            p.append(f"train.peak_tflops={self.peak_tflops}: must be > 0 (or unset)")
        return p


@dataclass(kw_only=True)
class ParallelConfig:
    """Parallel layout (docs/parallelism.md). DP is inferred: world size / (tp * pp)."""

    tp: int = 1                  # tensor-parallel size; memory tables are column-sharded along d_v over it
    memory_parallel: int = 1     # M: data-parallel ranks sharing one FwPKM table (columns over TP x M), M | DP
    pp: int = 1                  # pipeline stages
    vpp: int = 1                 # virtual stages per pipeline rank (> 1: interleaved 1F1B)
    num_microbatches: int = 1    # micro-batches per step on each DP rank (a pipeline needs >= pp)
    dp_sync: str = "step"        # persistent policy under DP: step = average fast weights over DP once per step
    recompute: bool = False      # full activation recomputation of every layer (memory writes applied once)
    layout_independent_init: bool = True  # draw initial weights from one full build, equal at every TP/PP layout
    dist_backend: str = "auto"   # auto (nccl with CUDA, else gloo) | gloo | nccl
    sequence_parallel: bool = False  # megatron's SP over the TP group; not supported here (docs/parallelism.md)
    collective_timeout_minutes: float = 10.0  # a collective waiting longer (a peer died) raises instead of hanging

    def problems(self) -> list[str]:
        p = [f"parallel.{n}={getattr(self, n)}: must be >= 1"
             for n in ("tp", "pp", "vpp", "num_microbatches", "memory_parallel") if getattr(self, n) < 1]
        if self.dp_sync not in DP_SYNC:
            p.append(f"parallel.dp_sync={self.dp_sync!r}: must be one of {DP_SYNC}")
        if not self.collective_timeout_minutes > 0:
            p.append(f"parallel.collective_timeout_minutes={self.collective_timeout_minutes}: must be > 0")
        if self.dist_backend not in ("auto", "gloo", "nccl"):
            p.append(f"parallel.dist_backend={self.dist_backend!r}: must be auto, gloo or nccl")
        if self.vpp > 1 and self.pp < 2:
            p.append(f"parallel.vpp={self.vpp}: interleaving needs parallel.pp >= 2 (got {self.pp})")
        return p


@dataclass(kw_only=True)
class DeepSpeedConfig:
    """DeepSpeed ZeRO as the data-parallel optimizer engine (torch AdamW as its client optimizer)."""

    zero_stage: int = -1         # -1: no DeepSpeed (megatron DDP + megatron's optimizer); 1-3: ZeRO stage

    def problems(self) -> list[str]:
        if self.zero_stage not in (-1, 1, 2, 3):  # stage 0 refuses the schedules' direct backward calls
            return [f"deepspeed.zero_stage={self.zero_stage}: must be -1 (off) or 1, 2, 3"]
        return []


@dataclass(kw_only=True)
class OptimizerConfig:
    """megatron-core's optimizer on the plain (non-DeepSpeed) engine; AdamW hyperparameters are in `train`."""

    distributed: bool = False    # megatron's DistributedOptimizer (ZeRO-1): AdamW state and update sharded over DP


@dataclass(kw_only=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    fwpkm: FwPKMConfig = field(default_factory=FwPKMConfig)
    pkm: PKMConfig = field(default_factory=PKMConfig)
    fwmlp: FwMLPConfig = field(default_factory=FwMLPConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def validate(run: RunConfig) -> None:
    """Check every component and the rules that span components; raise one ConfigError listing all."""
    p = run.model.problems() + run.fwpkm.problems() + run.pkm.problems() + run.fwmlp.problems()
    p += run.data.problems() + run.train.problems()
    p += run.parallel.problems() + run.deepspeed.problems() + layout_problems(run)
    n = run.model.num_layers
    for name, layers in (("fwpkm.layers", run.fwpkm.layers), ("pkm.layers", run.pkm.layers),
                         ("fwmlp.layers", run.fwmlp.layers)):
        bad = [i for i in layers if not 0 <= i < n]
        if bad:
            p.append(f"{name}={layers}: ids {bad} outside [0, model.num_layers={n})")
        if len(set(layers)) != len(layers):
            p.append(f"{name}={layers}: duplicate layer ids")
    both = sorted(set(run.fwpkm.layers) & set(run.fwmlp.layers))
    if both:
        p.append(f"fwmlp.layers={run.fwmlp.layers}: layers {both} already have an FwPKM branch (fwpkm.layers); "
                 "a layer has at most one fast-weight branch")
    if run.fwpkm.layers and run.fwmlp.layers and run.fwpkm.policy != run.fwmlp.policy:
        p.append(f"fwmlp.policy={run.fwmlp.policy!r}: must equal fwpkm.policy={run.fwpkm.policy!r} when both have "
                 "layers (DP sync and checkpoints apply one fast-weight policy to the whole run)")
    if run.optimizer.distributed and run.deepspeed.zero_stage >= 0:
        p.append(f"optimizer.distributed=true with deepspeed.zero_stage={run.deepspeed.zero_stage}: pick one "
                 "(megatron's distributed optimizer is ZeRO-1 on the plain engine; DeepSpeed brings its own)")
    if run.train.seq_len > run.model.max_seq_len:
        p.append(f"train.seq_len={run.train.seq_len}: must be <= model.max_seq_len={run.model.max_seq_len}")
    if p:
        raise ConfigError(p)


_MISSING = object()


def _coerce(value: Any, hint: Any, key: str, problems: list[str]) -> Any:
    """Convert a YAML value to the annotated type, or record why it cannot be (returning _MISSING)."""
    hint_s = str(hint)
    if value is None:
        if "None" in hint_s:
            return None
        problems.append(f"{key}: null not allowed")
        return _MISSING
    if hint_s.startswith("list[dict"):
        if not isinstance(value, list):
            problems.append(f"{key}={value!r}: expected a list of mappings")
            return _MISSING
        return value
    if hint_s.startswith("list"):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                  for x in value):
            problems.append(f"{key}={value!r}: expected a list of numbers")
            return _MISSING
        return value
    name = getattr(hint, "__name__", hint_s.split(" |")[0])  # `int`, or "int | None"
    typ = {"bool": bool, "int": int, "float": float, "str": str}[name]
    if typ is float and not isinstance(value, bool):
        try:  # YAML reads 1e-3 (no dot) as a string
            return float(value)
        except (TypeError, ValueError):
            pass
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        problems.append(f"{key}={value!r}: expected {name}")
        return _MISSING
    return value


def from_dict(tree: dict[str, Any]) -> RunConfig:
    """Build a RunConfig from a nested dict; every unknown key, type error and rule violation in one error."""
    problems: list[str] = []
    if not isinstance(tree, dict):
        raise ConfigError([f"top level: expected a mapping, got {type(tree).__name__}"])
    sections = {}
    for f in dataclasses.fields(RunConfig):
        cls = get_type_hints(RunConfig)[f.name]
        raw = tree.get(f.name) or {}
        if not isinstance(raw, dict):
            problems.append(f"{f.name}: expected a mapping")
            raw = {}
        hints = get_type_hints(cls)
        kwargs = {}
        for key, value in raw.items():
            if f"{f.name}.{key}" in MOVED_KEYS:
                if value is not False:  # false (the old default, in older checkpoints' configs) changes nothing
                    problems.append(f"{f.name}.{key}: moved to {MOVED_KEYS[f'{f.name}.{key}']}")
                continue
            if key not in hints:
                problems.append(f"{f.name}.{key}: unknown key (known: {', '.join(sorted(hints))})")
                continue
            value = _coerce(value, hints[key], f"{f.name}.{key}", problems)
            if value is not _MISSING:  # a bad value keeps the default, so the remaining rules can still run
                kwargs[key] = value
        sections[f.name] = cls(**kwargs)
    for key in tree:
        if key not in sections:
            problems.append(f"{key}: unknown section (known: {', '.join(sections)})")
    run = RunConfig(**sections)
    try:
        validate(run)
    except ConfigError as err:
        problems += err.problems
    if problems:
        raise ConfigError(problems)
    return run


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` overrides (values parsed as YAML) to a nested dict, in order."""
    problems = []
    for item in overrides:
        dotted, sep, text = item.partition("=")
        parts = dotted.strip().split(".")
        if not sep or len(parts) != 2 or not all(parts):
            problems.append(f"override {item!r}: expected section.key=value")
            continue
        tree.setdefault(parts[0], {})
        if not isinstance(tree[parts[0]], dict):
            problems.append(f"override {item!r}: {parts[0]} is not a section")
            continue
        tree[parts[0]][parts[1]] = yaml.safe_load(text) if text.strip() else None
    if problems:
        raise ConfigError(problems)
    return tree


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML config (or the defaults when path is None), apply overrides, validate."""
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError([f"config file {path}: not found"])
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError([f"config file {path}: not valid YAML ({exc})"]) from None
    return from_dict(apply_overrides(tree, list(overrides)))
