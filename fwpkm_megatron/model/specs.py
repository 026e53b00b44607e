"""Layer specs: how the memory layers and the attention window enter megatron-core's GPT.

Everything starts from megatron's `get_gpt_layer_local_spec(qk_layernorm=model.qk_norm)` (per-head
RMSNorm on q and k when on) and changes three slots (style.md 10):
- every layer's `self_attention.submodules.core_attention` becomes `FusedWindowedAttention`
  (O(T * W) memory) bound to the model's shared `WindowControl`;
- the `mlp` slot of the layers in `run.pkm.layers` becomes the static PKM (`PKMMLP`, the MLP contract);
- with `model.mixer: gdn`, the `self_attention` slot of every layer not in `model.attention_layers` becomes
  megatron's `GatedDeltaNet` (`gdn.gdn_spec`); the layer's `input_layernorm` stays its pre-norm;
- the layer class becomes `MemoryTransformerLayer`, which adds the FwPKM residual branch *before* the
  token mixer in the layers of `run.fwpkm.layers` (method notes 3.10):
      h = h + FwPKM(h);  h = h + (Attn or GDN)(norm(h));  h = h + (PKM or MLP)(norm(h))
  and, in the layers of `run.fwmlp.layers`, the FwMLP baseline's branch in the same place.

All layer ids in the config are 0-indexed and global (megatron's `layer_number` is 1-based and already
includes the pipeline offset). megatron 0.16.1 does not slice a `TransformerBlockSubmodules` list for
pipeline stages (`_get_block_submodules` returns it as is and `TransformerBlock` builds every entry),
so `block_spec` slices the full per-layer list to this stage's layers itself, as megatron's own
`get_gpt_decoder_block_spec` does. The FwPKM branch needs no slicing: the layer decides from its own
global `layer_number`.

The memory modules are imported lazily, so this package imports without `fwpkm_megatron.memory`.
"""
from __future__ import annotations

import dataclasses

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.enums import LayerType
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_layer import TransformerLayer, get_transformer_layer_offset

from fwpkm_megatron.config import FwMLPConfig, FwPKMConfig, RunConfig
from fwpkm_megatron.model.attention import FusedWindowedAttention, WindowControl
from fwpkm_megatron.model.gdn import gdn_spec


class MemoryTransformerLayer(TransformerLayer):
    """megatron's `TransformerLayer` with an optional FwPKM residual branch before self-attention.

    The branch exists when this layer's 0-indexed global id (`layer_number - 1`) is in `fwpkm.layers`;
    otherwise `self.fwpkm` is None and the layer is exactly a `TransformerLayer`. Likewise `self.fwmlp`
    (the FwMLP baseline) for `fwmlp.layers`. Input and output are [s, b, h] as for the parent.
    """

    def __init__(self, config: TransformerConfig, submodules, layer_number: int = 1, hidden_dropout=None,
                 pg_collection=None, vp_stage=None, *, fwpkm: FwPKMConfig, fwpkm_shard=None,
                 fwmlp: FwMLPConfig | None = None):
        super().__init__(config, submodules, layer_number=layer_number, hidden_dropout=hidden_dropout,
                         pg_collection=pg_collection, vp_stage=vp_stage)
        self.layer_id = self.layer_number - 1  # 0-indexed, global (pipeline offset included)
        self.fwpkm = None
        if self.layer_id in fwpkm.layers:
            from fwpkm_megatron.memory.fwpkm import FwPKMBlock
            self.fwpkm = FwPKMBlock(config, fwpkm, self.layer_id, shard=fwpkm_shard)
        self.fwmlp = None
        if fwmlp is not None and self.layer_id in fwmlp.layers:
            from fwpkm_megatron.memory.fwmlp import FwMLPBlock
            self.fwmlp = FwMLPBlock(config, fwmlp, self.layer_id)

    def forward(self, hidden_states, *args, **kwargs):
        if self.fwpkm is not None:
            hidden_states = hidden_states + self.fwpkm(hidden_states)  # [s, b, h]
        if self.fwmlp is not None:
            hidden_states = hidden_states + self.fwmlp(hidden_states)
        return super().forward(hidden_states, *args, **kwargs)


def _pkm_mlp_spec(run: RunConfig, shard=None) -> ModuleSpec:
    """The static PKM for the MLP slot (imported here, only when a layer needs it)."""
    from fwpkm_megatron.memory.pkm import PKMMLP
    return ModuleSpec(module=PKMMLP, params={"cfg": run.pkm, "shard": shard})


def layer_specs(run: RunConfig, window_control: WindowControl, shards=(None, None),
                config: TransformerConfig | None = None) -> list[ModuleSpec]:
    """One layer spec per global layer (index = 0-indexed layer id), before any pipeline slicing.

    `config` (the model's TransformerConfig) is needed only with `model.mixer: gdn`.

    `shards` = the (FwPKM, PKM) `memory.comm.TableShard` this rank builds its tables as (None: whole)."""
    base = get_gpt_layer_local_spec(normalization="RMSNorm", qk_layernorm=run.model.qk_norm)
    attention = base.submodules.self_attention
    attention = dataclasses.replace(attention, submodules=dataclasses.replace(
        attention.submodules,
        core_attention=ModuleSpec(module=FusedWindowedAttention, params={"window_control": window_control}),
    ))
    # megatron's MLP wants its width from the spec (it warns when it falls back to the config's)
    ffn = run.model.ffn_hidden_size or 4 * run.model.hidden_size
    mlp = dataclasses.replace(base.submodules.mlp, params={**base.submodules.mlp.params, "ffn_hidden_size": ffn})
    dense = dataclasses.replace(base.submodules, self_attention=attention, mlp=mlp)
    pkm = dataclasses.replace(dense, mlp=_pkm_mlp_spec(run, shards[1])) if run.pkm.layers else None
    params = {"fwpkm": run.fwpkm, "fwpkm_shard": shards[0], "fwmlp": run.fwmlp}
    gdn_ids = run.model.gdn_layers()
    gdn = gdn_spec(config) if gdn_ids else None
    specs = []
    for layer_id in range(run.model.num_layers):
        submodules = pkm if layer_id in run.pkm.layers else dense
        if layer_id in gdn_ids:
            submodules = dataclasses.replace(submodules, self_attention=gdn)
        specs.append(ModuleSpec(module=MemoryTransformerLayer, params=params, submodules=submodules))
    return specs


def block_spec(run: RunConfig, config: TransformerConfig, window_control: WindowControl,
               vp_stage: int | None = None, pp_rank: int | None = None, shards=(None, None)) -> TransformerBlockSubmodules:
    """The decoder block spec for this pipeline stage: its slice of `layer_specs` and the final norm.

    Args:
        vp_stage: virtual pipeline stage, or None without interleaving.
        pp_rank: pipeline rank; None reads it from megatron's parallel state.
    """
    full = layer_specs(run, window_control, shards, config)
    if config.pipeline_model_parallel_layout is not None:
        ids = config.pipeline_model_parallel_layout.get_layer_id_list(
            layer_type=LayerType.decoder, vp_stage=vp_stage, pp_rank=pp_rank)
        local = [full[i] for i in ids]
    else:
        offset = get_transformer_layer_offset(config, vp_stage=vp_stage, pp_rank=pp_rank)
        local = full[offset:offset + get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)]
    final_norm = full[0].submodules.input_layernorm  # the local spec's RMSNorm class
    return TransformerBlockSubmodules(layer_specs=local, layer_norm=final_norm)
