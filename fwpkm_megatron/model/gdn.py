"""Gated DeltaNet (GDN) token mixer: megatron-core's own `GatedDeltaNet`, entered through its layer spec.

`model.mixer: gdn` makes every layer a GDN layer except `model.attention_layers` (the hybrid pattern: the
paper's GDN+SWA / GDN+FA layouts keep (windowed) attention at layers 3, 7, 11 of 12). Per GDN layer
(Yang et al. 2025; Qwen3-Next; method notes 4.1), with x = RMSNorm(h) [s, b, h]:

    q, k, v, z, beta, alpha = in_proj(x)                       # one ColumnParallelLinear, [q k v z b a] rows
    q, k, v = silu(causal_conv1d([q k v]))                     # depthwise, kernel `gdn_conv_kernel`
    q, k = l2norm(q), l2norm(k)                                # per head: x * rsqrt(sum x^2 + 1e-6)
    g = -exp(A_log) * softplus(alpha + dt_bias);  b = sigmoid(beta)          # per value head
    S_t = exp(g_t) S_{t-1} + b_t k_t (v_t - exp(g_t) S_{t-1}^T k_t)^T         # state [d_k, d_v] per head
    o_t = S_t^T q_t / sqrt(d_k)                                 # chunked (WY) form in megatron / fla
    out = out_proj(RMSNorm_per_head(o) * silu(z))              # RowParallelLinear

megatron builds the module; this file only (1) assembles its spec for the local (non-TransformerEngine)
backend, whose missing fused norm+linear becomes a plain `ColumnParallelLinear` (the layer's own
`input_layernorm` is the norm), (2) gives the per-head output norm a TP-correct gradient
(`HeadRMSNorm`), and (3) makes the initial weights independent of the TP layout.

Why (2): the output RMSNorm's weight [d_v] is replicated over TP but each rank normalises only its own
heads, so its gradient is partial per rank. megatron's `finalize_model_grads` sums only q/k-layernorm
grads over TP (0.16.1), so TP=2 drifted from TP=1 after one step. `HeadRMSNorm` reads its weight through
`copy_to_tensor_model_parallel_region` (identity forward, TP all-reduce backward): every rank gets the
full gradient, on megatron's optimizer and DeepSpeed alike.

Why (3): under TP megatron slices `in_proj` per rank as [q_r k_r v_r z_r b_r a_r] (each rank's heads of
every part), not as a contiguous block of the TP=1 matrix, and draws the conv weights and `A_log` at
local size. A plain build would therefore start TP=2 from other weights than TP=1. `GatedDeltaNetMixer`
redraws every GDN tensor from one full-size (TP=1) draw on the host generator and keeps its rank's slice,
consuming the same random numbers at every layout, so every later layer's draw is unchanged too.
Checkpoints are unaffected: megatron's `sharded_state_dict` already names the per-part slices.

On CPU megatron's pure-PyTorch paths run (`parallel/mcore_cpu.py` points the fla names at them); on
CUDA fla's chunked kernels (`pip install '.[gpu]'`: fla-core, causal-conv1d).
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn
from megatron.core.models.backends import LocalSpecProvider
from megatron.core.models.gpt.experimental_attention_variant_module_specs import get_gated_delta_net_module_spec
from megatron.core.ssm import gated_delta_net as mcore_gdn
from megatron.core.tensor_parallel import ColumnParallelLinear, copy_to_tensor_model_parallel_region
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.spec_utils import ModuleSpec

from fwpkm_megatron.config import ModelConfig


def transformer_config_fields(model: ModelConfig) -> dict:
    """TransformerConfig fields that select megatron's GDN (`experimental_attention_variant`) and size it.

    `linear_attention_freq` is megatron's per-layer pattern (1 = GDN, 0 = attention); megatron checks the
    head counts against TP and marks the block heterogeneous for checkpoints from it."""
    if model.mixer != "gdn":
        return {}
    ids = set(model.gdn_layers())
    return dict(
        experimental_attention_variant="gated_delta_net",
        linear_attention_freq=[int(i in ids) for i in range(model.num_layers)],
        linear_conv_kernel_dim=model.gdn_conv_kernel,
        linear_key_head_dim=model.gdn_key_head_dim,
        linear_value_head_dim=model.gdn_value_head_dim,
        linear_num_key_heads=model.gdn_num_key_heads,
        linear_num_value_heads=model.gdn_num_value_heads,
    )


class HeadRMSNorm(nn.Module):
    """RMSNorm over one GDN head's d_v channels whose TP-replicated weight gets the TP-summed gradient (why (2)).

    Same math and state-dict name (`weight`) as megatron's local-spec `torch.nn.RMSNorm`."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        self.tp_group = None  # set by GatedDeltaNetMixer; None or size 1: a plain RMSNorm

    def forward(self, x):
        weight = self.weight
        if self.tp_group is not None and self.tp_group.size() > 1:
            weight = copy_to_tensor_model_parallel_region(weight, group=self.tp_group)
        return F.rms_norm(x, (x.shape[-1],), weight, self.eps)


class GatedDeltaNetMixer(mcore_gdn.GatedDeltaNet):
    """megatron's `GatedDeltaNet` whose initial weights do not depend on the TP layout (module docstring)."""

    def __init__(self, config: TransformerConfig, submodules, layer_number: int = None, **kwargs):
        if not mcore_gdn.HAVE_FLA:
            raise ImportError("model.mixer=gdn on CUDA runs fla's kernels: install fla-core "
                              "(pip install 'fwpkm-megatron[gpu]')")
        start = torch.default_generator.get_state()
        super().__init__(config, submodules, layer_number=layer_number, **kwargs)
        end = torch.default_generator.get_state()
        self.out_norm.tp_group = self.pg_collection.tp
        if config.perform_initialization:
            torch.default_generator.set_state(start)  # rewind: the full-size draws below replace megatron's
            self._draw_full_and_slice()
        else:
            torch.default_generator.set_state(end)

    def reset_parameters(self):
        """No-op: megatron's reset (local-size `A_log` from the per-rank tracker) is redone in `__init__`."""

    def parts(self) -> tuple[list[int], list[int]]:
        """Full (TP=1) row counts of in_proj's [q k v z beta alpha] and of the conv's [q k v]."""
        qk, v, hv = self.qk_dim, self.v_dim, self.num_value_heads
        return [qk, qk, v, v, hv, hv], [qk, qk, v]

    @torch.no_grad()
    def _draw_full_and_slice(self) -> None:
        """Draw every tensor at TP=1 size, in a fixed order, on the host generator; keep this rank's rows."""
        rank, size = self.pg_collection.tp.rank(), self.tp_size
        in_parts, conv_parts = self.parts()
        in_w = torch.empty(sum(in_parts), self.hidden_size)
        self.config.init_method(in_w)                                     # as megatron's CPU init
        bound = 1.0 / math.sqrt(self.conv_kernel_dim)                     # nn.Conv1d's default (fan_in = K)
        conv_w = torch.empty(sum(conv_parts), 1, self.conv_kernel_dim).uniform_(-bound, bound)
        if self.conv_init is not None:
            conv_w.uniform_(-self.conv_init, self.conv_init)
        conv_b = torch.empty(sum(conv_parts)).uniform_(-bound, bound) if self.conv_bias else None
        a_log = torch.empty(self.num_value_heads).uniform_(*self.A_init_range).log()
        out_w = torch.empty(self.hidden_size, self.v_dim)
        self.config.output_layer_init_method(out_w)
        self.in_proj.weight.copy_(tp_rows(in_w, in_parts, rank, size))
        self.conv1d.weight.copy_(tp_rows(conv_w, conv_parts, rank, size))
        if conv_b is not None:
            self.conv1d.bias.copy_(tp_rows(conv_b, conv_parts, rank, size))
        self.A_log.copy_(a_log.chunk(size)[rank])
        self.dt_bias.fill_(1.0)
        self.out_proj.weight.copy_(out_w.chunk(size, dim=1)[rank])


def tp_rows(full: torch.Tensor, parts: list[int], rank: int, size: int) -> torch.Tensor:
    """Rank `rank`'s rows of a [part_0; part_1; ...] tensor in megatron's GDN TP layout: each part's
    rank-th block, concatenated (the layout `GatedDeltaNet.forward` splits its local in_proj output by)."""
    return torch.cat([p.chunk(size)[rank] for p in full.split(parts)])


def gdn_spec(config: TransformerConfig) -> ModuleSpec:
    """megatron's GDN module spec for the local backend, with `GatedDeltaNetMixer`, a plain column-parallel
    `in_proj` (the local backend has no fused norm+linear; the layer's `input_layernorm` applies the norm)
    and `HeadRMSNorm` as the output norm."""
    spec = get_gated_delta_net_module_spec(config, backend=LocalSpecProvider())
    return dataclasses.replace(spec, module=GatedDeltaNetMixer, submodules=dataclasses.replace(
        spec.submodules, in_proj=ColumnParallelLinear, out_norm=HeadRMSNorm))
