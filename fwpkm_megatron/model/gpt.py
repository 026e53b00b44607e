"""The GPT model: megatron-core's `GPTModel` built from the run config and the layer specs in `specs.py`.

Backbone (method notes 4.1, scaled by the config): pre-norm RMSNorm decoder, RoPE, SwiGLU MLP, no biases,
no dropout, optionally tied input/output embeddings, fp32 parameters. The paper's attention details are
switches handled by megatron itself: `model.attention_output_gate` (TransformerConfig
`attention_output_gate`: linear_qkv also emits a gate, output * sigmoid(gate) per head channel),
`model.qk_norm` (`qk_layernorm` with the local spec's RMSNorm over each head) and `model.rotary_percent`
(GPTModel's partial RoPE on the first fraction of each head's channels). Attention is full, SWA or pSWA
through the shared `WindowControl` that the returned model carries as `model.window_control`; the
trainer calls `model.window_control.begin_step(step, seed, model.training)` once per step.

Call convention (megatron's): `model(input_ids [b, s], position_ids [b, s], attention_mask=None,
labels=labels [b, s])` returns the per-token cross-entropy [b, s] in fp32; without labels it returns
the logits [b, s, V] (vocab-sharded under TP).

megatron-core must already be initialised: `parallel.groups.init_single_process(seed)` for one process.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer import TransformerConfig

from fwpkm_megatron.config import RunConfig
from fwpkm_megatron.model.attention import WindowControl
from fwpkm_megatron.model.gdn import transformer_config_fields as gdn_fields
from fwpkm_megatron.model.specs import block_spec


def transformer_config(run: RunConfig, **overrides) -> TransformerConfig:
    """megatron's TransformerConfig for `run.model`, with settings that run on CPU and GPU alike.

    Args:
        overrides: TransformerConfig fields set by the parallel layout or the trainer
            (e.g. `tensor_model_parallel_size`, `pipeline_model_parallel_size`, `recompute_granularity`).
    """
    m = run.model
    fields = dict(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        ffn_hidden_size=m.ffn_hidden_size,          # None: megatron's default 4 * hidden_size
        normalization="RMSNorm",                   # torch.nn.RMSNorm through the local spec
        layernorm_epsilon=m.norm_eps,
        qk_layernorm=m.qk_norm,                    # the spec's q/k norm slots are filled to match
        attention_output_gate=m.attention_output_gate,
        gated_linear_unit=True,                    # SwiGLU: fc1 emits [gate, up], 2 * ffn_hidden_size wide
        activation_func=F.silu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=m.init_std,
        params_dtype=torch.float32,
        pipeline_dtype=torch.float32,
        use_cpu_initialization=True,               # init on the host, then move; identical on CPU and GPU
        # Fused kernels need CUDA (or Apex/TE); the unfused paths are exact and device-agnostic.
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        # Layers may differ (FwPKM branch, PKM MLP), so dist_checkpointing keeps one entry per layer
        # instead of stacking them along a layer axis (megatron-deepspeed-notes.md Q3; the misspelling
        # is megatron's). Always on, so checkpoint keys do not depend on where the memories sit.
        hetereogenous_dist_checkpoint=True,
        cuda_graph_scope=[],                       # the whole layer, if graphs are on (megatron's "full" is deprecated)
        **gdn_fields(m),                           # model.mixer=gdn: megatron's GatedDeltaNet and its sizes
    )
    fields.update(overrides)
    return TransformerConfig(**fields)


def build_model(run: RunConfig, vocab_size: int, *, config: TransformerConfig | None = None,
                pre_process: bool = True, post_process: bool = True, vp_stage: int | None = None,
                shards=(None, None)) -> GPTModel:
    """Build the GPT for `run` (this pipeline stage's part of it).

    Args:
        run: the run config; `run.model`, `run.fwpkm` and `run.pkm` are read.
        vocab_size: tokenizer vocabulary size (divisible by the TP size under TP).
        config: a TransformerConfig to use instead of `transformer_config(run)` (the parallel layer's).
        pre_process / post_process: whether this stage holds the embedding / the output layer and loss.
        vp_stage: virtual pipeline stage, or None.
        shards: (FwPKM, PKM) `memory.comm.TableShard`: the table columns this rank allocates (parallel layer's).

    Returns:
        megatron's GPTModel, with the shared `WindowControl` as `model.window_control`.
    """
    config = config if config is not None else transformer_config(run)
    window_control = WindowControl.from_config(run.model)
    model = GPTModel(
        config=config,
        transformer_layer_spec=block_spec(run, config, window_control, vp_stage=vp_stage, shards=shards),
        vocab_size=vocab_size,
        max_sequence_length=run.model.max_seq_len,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=run.model.tie_embeddings,
        position_embedding_type="rope",
        rotary_base=run.model.rope_base,
        rotary_percent=run.model.rotary_percent,
        vp_stage=vp_stage,
    )
    model.window_control = window_control
    return model
