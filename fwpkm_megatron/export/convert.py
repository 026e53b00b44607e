"""Megatron <-> exported (Hugging Face) tensor names and the exported config.

Only consolidated (TP=1, PP=1) state dicts appear here; `layout.py` gathers shards before this point.

| megatron (GPTModel.state_dict)                         | export                                         |
|--------------------------------------------------------|------------------------------------------------|
| embedding.word_embeddings.weight                       | model.embed_tokens.weight                      |
| decoder.layers.i.input_layernorm.weight                | model.layers.i.input_layernorm.weight          |
| decoder.layers.i.self_attention.linear_qkv.weight      | model.layers.i.self_attn.{q,k,v}_proj.weight   |
|   rows [ng, np/ng + 2, hn]: per query group its query heads, then k, then v                             |
|   with the output gate [ng, 2 np/ng + 2, hn]: query heads, gate heads, k, v -> also self_attn.gate_proj  |
| decoder.layers.i.self_attention.{q,k}_layernorm.weight | model.layers.i.self_attn.{q,k}_norm.weight     |
| decoder.layers.i.self_attention.linear_proj.weight     | model.layers.i.self_attn.o_proj.weight         |
| decoder.layers.i.pre_mlp_layernorm.weight              | model.layers.i.post_attention_layernorm.weight |
| decoder.layers.i.mlp.linear_fc1.weight ([gate; up])    | model.layers.i.mlp.{gate,up}_proj.weight       |
| decoder.layers.i.mlp.linear_fc2.weight                 | model.layers.i.mlp.down_proj.weight            |
| decoder.layers.i.self_attention.<GDN tensor>  (GDN)    | model.layers.i.linear_attn.<same>              |
|   in_proj rows [q k v z beta alpha], conv1d, A_log, dt_bias, out_norm, out_proj (TP=1 layout)            |
| decoder.layers.i.mlp.<PKM tensor>                      | model.layers.i.mlp.<same>                      |
| decoder.layers.i.fwpkm.<slow tensor>                   | model.layers.i.fwpkm.<same>                    |
| decoder.layers.i.fwpkm.state.{keys,values}  (fast)     | fast_weights.layer_i.{keys,values}             |
| decoder.final_layernorm.weight                         | model.norm.weight                              |
| output_layer.weight (untied only)                      | lm_head.weight                                 |

A megatron tensor the table does not cover is an error, never silently dropped.
"""
from __future__ import annotations

import re
from typing import Any

import torch

from fwpkm_megatron.config import RunConfig
from fwpkm_megatron.export.layout import ExportError

FAST_PREFIX = "fast_weights."
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_SIMPLE = {
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
    "self_attention.q_layernorm.weight": "self_attn.q_norm.weight",
    "self_attention.k_layernorm.weight": "self_attn.k_norm.weight",
}


def _heads(run: RunConfig) -> tuple[int, int, int]:
    m = run.model
    np_, ng = m.num_attention_heads, m.num_query_groups or m.num_attention_heads
    return np_, ng, m.hidden_size // np_


def _qkv_parts(run: RunConfig) -> list[str]:
    """Head blocks of one query group in linear_qkv's rows, in megatron's order (attention.py)."""
    np_, ng, _ = _heads(run)
    gate = ["gate_proj"] * (np_ // ng) if run.model.attention_output_gate else []
    return ["q_proj"] * (np_ // ng) + gate + ["k_proj", "v_proj"]


def _split_qkv(t: torch.Tensor, run: RunConfig) -> dict[str, torch.Tensor]:
    """linear_qkv.weight -> {q_proj, [gate_proj], k_proj, v_proj} weights (rows grouped per projection)."""
    _, ng, hn = _heads(run)
    parts = _qkv_parts(run)
    w = t.view(ng, len(parts), hn, t.shape[-1])
    return {name: w[:, [i for i, p in enumerate(parts) if p == name]].reshape(-1, t.shape[-1])
            for name in dict.fromkeys(parts)}


def _join_qkv(projections: dict[str, torch.Tensor], run: RunConfig) -> torch.Tensor:
    """Inverse of `_split_qkv`."""
    _, ng, hn = _heads(run)
    parts = _qkv_parts(run)
    blocks = {name: iter(w.view(ng, -1, hn, w.shape[-1]).unbind(1)) for name, w in projections.items()}
    return torch.stack([next(blocks[name]) for name in parts], 1).reshape(-1, projections["q_proj"].shape[-1])


def megatron_to_hf(state: dict[str, Any], run: RunConfig) -> dict[str, torch.Tensor]:
    """Consolidated megatron state dict -> export names (see the module table); q/k/v/gate are copies."""
    out: dict[str, torch.Tensor] = {}
    unknown = []
    gdn = set(run.model.gdn_layers())
    for name, t in state.items():
        if name.endswith("._extra_state") or t is None:
            continue
        if name == "embedding.word_embeddings.weight":
            out["model.embed_tokens.weight"] = t
        elif name == "decoder.final_layernorm.weight":
            out["model.norm.weight"] = t
        elif name == "output_layer.weight":
            if not run.model.tie_embeddings:
                out["lm_head.weight"] = t
        elif (m := _LAYER.match(name)) is not None:
            i, rest = m.group(1), m.group(2)
            pre = f"model.layers.{i}."
            if rest.startswith("self_attention.") and int(i) in gdn:
                out[pre + "linear_attn." + rest.removeprefix("self_attention.")] = t
            elif rest in _SIMPLE:
                out[pre + _SIMPLE[rest]] = t
            elif rest == "self_attention.linear_qkv.weight":
                for proj, w in _split_qkv(t, run).items():
                    out[pre + f"self_attn.{proj}.weight"] = w
            elif rest == "mlp.linear_fc1.weight":
                gate, up = t.chunk(2, dim=0)
                out[pre + "mlp.gate_proj.weight"], out[pre + "mlp.up_proj.weight"] = gate, up
            elif rest in ("fwpkm.state.keys", "fwpkm.state.values"):
                out[f"{FAST_PREFIX}layer_{i}.{rest.rsplit('.', 1)[1]}"] = t
            elif rest.startswith("fwpkm.") or (rest.startswith("mlp.") and int(i) in run.pkm.layers):
                out[pre + rest] = t
            else:
                unknown.append(name)
        else:
            unknown.append(name)
    if unknown:
        raise ExportError(f"megatron tensors with no export name (model changed? update export/convert.py): "
                          f"{', '.join(unknown)}")
    return out


def hf_to_megatron(state: dict[str, torch.Tensor], run: RunConfig) -> dict[str, torch.Tensor]:
    """Inverse of `megatron_to_hf` (tensor entries only; megatron's `_extra_state` entries are None anyway).

    Loading the result into a freshly built single-process model (`strict=False`, missing only
    `_extra_state`) continues training from an export; sharded layouts split it per rank (parallel issue).
    """
    out: dict[str, torch.Tensor] = {}
    inverse_simple = {v: k for k, v in _SIMPLE.items()}
    layer = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
    fast = re.compile(r"^fast_weights\.layer_(\d+)\.(keys|values)$")
    for name, t in state.items():
        if name == "model.embed_tokens.weight":
            out["embedding.word_embeddings.weight"] = t
        elif name == "model.norm.weight":
            out["decoder.final_layernorm.weight"] = t
        elif name == "lm_head.weight":
            out["output_layer.weight"] = t
        elif (m := fast.match(name)) is not None:
            out[f"decoder.layers.{m.group(1)}.fwpkm.state.{m.group(2)}"] = t
        elif (m := layer.match(name)) is not None:
            i, rest = m.group(1), m.group(2)
            pre = f"decoder.layers.{i}."
            if rest.startswith("linear_attn."):
                out[pre + "self_attention." + rest.removeprefix("linear_attn.")] = t
            elif rest in inverse_simple:
                out[pre + inverse_simple[rest]] = t
            elif rest == "self_attn.q_proj.weight":
                projections = {p: state[f"model.layers.{i}.self_attn.{p}.weight"]
                               for p in dict.fromkeys(_qkv_parts(run))}
                out[pre + "self_attention.linear_qkv.weight"] = _join_qkv(projections, run)
            elif rest in ("self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.gate_proj.weight",
                          "mlp.up_proj.weight"):
                continue  # consumed with q_proj / mlp.gate_proj
            elif rest == "mlp.gate_proj.weight":
                out[pre + "mlp.linear_fc1.weight"] = torch.cat([t, state[f"model.layers.{i}.mlp.up_proj.weight"]])
            else:
                out[pre + rest] = t
        else:
            raise ExportError(f"exported tensor {name!r} has no megatron name")
    return out


def hf_config_fields(run: RunConfig, vocab_size: int, *, policy: str) -> dict[str, Any]:
    """Keyword arguments of the exported `FwPKMConfig` for a training run."""
    m = run.model
    fwpkm = {k: v for k, v in run.fwpkm.__dict__.items() if k not in ("policy", "backend")}
    pkm = dict(run.pkm.__dict__)
    return dict(
        vocab_size=vocab_size, hidden_size=m.hidden_size, num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_attention_heads, num_key_value_heads=m.num_query_groups or m.num_attention_heads,
        intermediate_size=m.ffn_hidden_size or 4 * m.hidden_size, max_position_embeddings=m.max_seq_len,
        rope_theta=m.rope_base, rms_norm_eps=m.norm_eps, rotary_percent=m.rotary_percent, qk_norm=m.qk_norm,
        attention_output_gate=m.attention_output_gate,
        # swa windows every step; pswa and full attend fully at evaluation (model/attention.py)
        attention_window=m.window if m.attention == "swa" else None,
        tie_embeddings=m.tie_embeddings, initializer_range=m.init_std, fwpkm=fwpkm, pkm=pkm,
        gdn={"layers": m.gdn_layers(), "conv_kernel": m.gdn_conv_kernel, "num_key_heads": m.gdn_num_key_heads,
             "num_value_heads": m.gdn_num_value_heads, "key_head_dim": m.gdn_key_head_dim,
             "value_head_dim": m.gdn_value_head_dim},
        fwpkm_policy=policy, fwpkm_update_chunk=None, fwpkm_carry_lookahead=False,
    )
