"""A GPT with Fast-weight Product Key Memory, self-contained for Hugging Face `transformers` (remote code).

Copied verbatim into every export directory by `fwpkm-export` with its siblings: `configuration_fwpkm.py`,
`fwpkm_integrity.py`, `fwpkm_attention.py` (attention, RoPE, SwiGLU), `fwpkm_gdn.py` (Gated DeltaNet),
`fwpkm_memory.py` (FwPKM branches, test-time memory, static PKM) and `fwpkm_reference.py` (a
byte-identical copy of the training code's `fwpkm_megatron/ops/reference.py`, the one definition of the
memory math). Imports only torch and transformers: no megatron-core and no fwpkm_megatron are needed.

The backbone mirrors the training model (megatron-core GPT): pre-norm RMSNorm decoder, RoPE, SwiGLU MLP,
no biases, optional sliding-window attention, tied or untied output layer. Per layer:
    h = h + FwPKM(h)                      (layers in config.fwpkm["layers"]; method notes 3.10)
    h = h + (Attention or GDN)(RMSNorm(h))   (GDN: layers in config.gdn["layers"])
    h = h + (static PKM or SwiGLU)(RMSNorm(h))

The memory of one batch lives in an `FwPKMMemory` (fwpkm_memory.py), returned inside the cache, so
`generate` continues the same memory; pass `memory=` to carry it across calls that do not share a KV
cache (the n-iter NIAH protocol).

Names in model.safetensors: `model.*` are slow weights; `fast_weights.layer_{i}.keys|values` are the
FwPKM fast-weight state of layer i (fp32 always).

transformers notes (4.57 and 5.x, `configuration_fwpkm.TRANSFORMERS_RANGE`): the cache is our own
object (per attention layer its keys/values, per GDN layer its conv and recurrent state, plus the
memory), returned as `cache` (5.x) or `past_key_values` (4.x) and fed back by generate;
`prepare_inputs_for_generation` slices the unprocessed tokens itself, so generation is exact.
Long inputs: `prefill_block` feeds them through the cache in blocks (equal to one pass); attention runs
through SDPA with masks of bounded size, and a sliding-window layer keeps only its last W-1 keys/values.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_fwpkm import FwPKMConfig, check_transformers_version
from .fwpkm_attention import Attention, SwiGLU, rope_cos_sin, rotary_dim
from .fwpkm_gdn import GatedDeltaNet
from .fwpkm_integrity import verify_index
from .fwpkm_memory import FastWeightState, FwPKMBranch, FwPKMMemory, PKMMLP, ZeroCenteredRMSNorm
# transformers 4.57 copies into its module cache only the sibling files this file imports, not theirs:
# fwpkm_memory.py's math modules are named here for that reason alone
from .addressing import pkm_address  # noqa: F401
from .fwpkm_reference import fwpkm_scan_rows  # noqa: F401
from .row_products import token_sum  # noqa: F401

check_transformers_version()
# transformers 5 renamed the cache field/argument `past_key_values` to `cache`; forward accepts both
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def _output(loss, logits, cache) -> CausalLMOutputWithPast:
    return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: cache})


class FwPKMCache:
    """Per layer (k, v) (attention) or (conv, S) (GDN), plus the batch's FwPKMMemory; `seen` = tokens processed."""

    def __init__(self, num_layers: int, memory: FwPKMMemory):
        self.kv: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * num_layers
        self.memory = memory
        self.seen = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    def reorder(self, index) -> "FwPKMCache":
        out = FwPKMCache(len(self.kv), self.memory.reorder(index))
        out.kv = [None if kv is None else (kv[0][index], kv[1][index]) for kv in self.kv]
        out.seen = self.seen
        return out

class DecoderLayer(nn.Module):
    def __init__(self, config: FwPKMConfig, layer_id: int):
        super().__init__()
        self.fwpkm = FwPKMBranch(config, layer_id) if layer_id in config.fwpkm.get("layers", []) else None
        self.input_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        if layer_id in config.gdn.get("layers", []):
            self.linear_attn = GatedDeltaNet(config)  # the token mixer is GDN (Qwen3-Next's name)
        else:
            self.self_attn = Attention(config)
        self.post_attention_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = PKMMLP(config) if layer_id in config.pkm.get("layers", []) else SwiGLU(config)

    def forward(self, h, cos, sin, past, q0, key_valid, memory, row_mask, flush):
        """Returns the new hidden states and this layer's cache entry: (k, v) (attention) or (conv, S) (GDN)."""
        if self.fwpkm is not None:
            h = h + self.fwpkm(h, memory, row_mask, flush)
        if hasattr(self, "linear_attn"):
            mixed, kv = self.linear_attn(self.input_layernorm(h), past, row_mask)
        else:
            mixed, kv = self.self_attn(self.input_layernorm(h), cos, sin, past, q0, key_valid)
        h = h + mixed
        return h + self.mlp(self.post_attention_layernorm(h)), kv


# ----------------------------------------------------------------------------------------- models

class FwPKMPreTrainedModel(PreTrainedModel):
    config_class = FwPKMConfig
    base_model_prefix = "model"
    _no_split_modules = ["DecoderLayer"]

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, ZeroCenteredRMSNorm):
            nn.init.zeros_(module.weight)
        elif isinstance(module, nn.RMSNorm):
            nn.init.ones_(module.weight)


class FwPKMModel(FwPKMPreTrainedModel):
    def __init__(self, config: FwPKMConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_init()


class FwPKMForCausalLM(FwPKMPreTrainedModel, GenerationMixin):
    # fp32 fast weights always (bf16 would round writes away): FastWeightState refuses other dtypes, and
    # transformers 5 is told as well (4.x checks this list against parameters and has none to find here)
    _keep_in_fp32_modules = ["fast_weights"] if CACHE_FIELD == "cache" else None

    def __init__(self, config: FwPKMConfig):
        super().__init__(config)
        self.model = FwPKMModel(config)
        f = config.fwpkm
        self.fast_weights = nn.ModuleDict({f"layer_{i}": FastWeightState(f["heads"], f["num_slots"], f["d_k"], f["d_v"])
                                           for i in f.get("layers", [])})
        self.lm_head = None if config.tie_embeddings else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, verify_checksums: bool = True, **kwargs):
        """transformers' loader, after checking every file of a local export against its size/sha256 index."""
        path = os.fspath(pretrained_model_name_or_path)
        if os.path.isdir(path):
            verify_index(path, checksums=verify_checksums)
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    def get_input_embeddings(self):
        return self.model.embed_tokens

    # --- memory API -----------------------------------------------------------------------------

    def new_memory(self, batch_size: int = 1, *, policy: str | None = None, update_chunk: int | None = None,
                   carry_lookahead: bool | None = None) -> FwPKMMemory:
        """A fresh test-time memory for a batch; unset arguments come from the config."""
        c = self.config
        return FwPKMMemory(self, batch_size, policy or c.fwpkm_policy,
                           update_chunk if update_chunk is not None else c.fwpkm_update_chunk,
                           c.fwpkm_carry_lookahead if carry_lookahead is None else carry_lookahead)

    @torch.no_grad()
    def flush_memory(self, memory: FwPKMMemory) -> None:
        """Write what every FwPKM layer's queue holds now (see `FwPKMBranch.flush`), e.g. at a read's end."""
        for layer in self.model.layers:
            if layer.fwpkm is not None:
                for stream in memory.streams[layer.fwpkm.layer_id]:
                    layer.fwpkm.flush(stream, memory)

    def snapshot_fast_weights(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.fast_weights.state_dict().items()}

    @torch.no_grad()
    def restore_fast_weights(self, snapshot: dict[str, torch.Tensor]) -> None:
        for name, buf in self.fast_weights.state_dict().items():
            buf.copy_(snapshot[name])

    # --- forward --------------------------------------------------------------------------------

    def forward(self, input_ids=None, attention_mask=None, cache=None, use_cache=None, position_ids=None,
                labels=None, memory: FwPKMMemory | None = None, flush_memory: bool | None = None,
                logits_to_keep: int = 0, prefill_block: int | None = None, return_dict=None, past_key_values=None,
                **kwargs):
        """Logits [B, T, V] for `input_ids` [B, T] that follow the `cache.seen` tokens already processed.

        Args:
            attention_mask: [B, seen + T] (1 = token, 0 = padding), covering the cached tokens too.
            cache: an FwPKMCache from a previous call (KV + memory), or None to start a new sequence
                (`past_key_values` is the same argument under transformers 4.x).
            memory: an FwPKMMemory to read and write (default: the cache's, or a new one per the config).
            flush_memory: write the queued tokens at the end of this call. Default: only when a call on
                a new sequence without caching runs under the persistent policy (then the state left in
                the buffers equals the training model's after the same forward).
            logits_to_keep: return only the last this many positions' logits (0 = all).
            prefill_block: feed the tokens in blocks of this many through the KV cache and the memory
                queue (default `config.prefill_block`; None = one pass). The result equals one pass;
                activations are O(block), so long contexts fit in bounded memory (keep logits_to_keep
                small too: all logits of a long input are [T, V]).
        """
        cache = cache if cache is not None else past_key_values
        if cache is not None and not isinstance(cache, FwPKMCache):
            if cache.get_seq_length() != 0:
                raise TypeError(f"FwPKMForCausalLM needs its own FwPKMCache, got {type(cache).__name__}")
            cache = None
        B, T = input_ids.shape
        past = cache.seen if cache is not None else 0
        if memory is None:
            memory = cache.memory if cache is not None else self.new_memory(B)
            if flush_memory is None:
                flush_memory = cache is None and use_cache is not True and memory.policy == "persistent"
        if memory.batch_size != B:
            raise ValueError(f"memory was built for batch size {memory.batch_size}, the input has {B} rows")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if attention_mask is not None and attention_mask.shape[1] != past + T:
            raise ValueError(f"attention_mask covers {attention_mask.shape[1]} tokens, expected seen + new = {past + T}")
        block = self.config.prefill_block if prefill_block is None else prefill_block
        if block and T > block:
            return self._forward_blocks(input_ids, attention_mask, cache, use_cache, position_ids, labels, memory,
                                        bool(flush_memory), logits_to_keep, block)
        h, new_cache = self._decode(input_ids, attention_mask, cache, position_ids, memory, bool(flush_memory))
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        logits = self._logits(h)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
        return _output(loss, logits, new_cache if use_cache else None)

    def _logits(self, h):
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        logits = F.linear(h, weight).float()
        used = self.config.tokenizer_vocab_size
        if used is not None and used < logits.shape[-1]:  # padded rows (TP) are no tokens: never predicted
            logits[..., used:] = torch.finfo(logits.dtype).min
        return logits

    def _decode(self, input_ids, attention_mask, cache, position_ids, memory, flush):
        """The decoder stack over one call's tokens: (final hidden states, the cache extended by them)."""
        B, T = input_ids.shape
        past = cache.seen if cache is not None else 0
        gdn = set(self.config.gdn.get("layers", []))
        first_attention = next((n for n in range(len(self.model.layers)) if n not in gdn), None)
        kv = None if cache is None or first_attention is None else cache.kv[first_attention]
        kept = 0 if kv is None else kv[0].shape[2]  # keys an attention layer kept from earlier calls
        if position_ids is None:
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)[:, past:]
            else:
                position_ids = torch.arange(past, past + T, device=input_ids.device).expand(B, T)
        key_valid = row_mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            key_valid = attention_mask[:, past - kept:].bool()
            row_mask = attention_mask[:, past:]
            if bool(row_mask.all()):
                row_mask = None
        c = self.config
        scaling = None  # full-attention layers only; YaRN's original length defaults to the training length
        if c.fwpkm_rope_scaling and c.attention_window is None:
            scaling = {"original_max_position_embeddings": c.max_position_embeddings, **c.fwpkm_rope_scaling}
        cos, sin = rope_cos_sin(position_ids, rotary_dim(c), c.rope_theta, scaling)
        h = self.model.embed_tokens(input_ids)
        new_cache = FwPKMCache(len(self.model.layers), memory)
        for n, layer in enumerate(self.model.layers):
            h, new_cache.kv[n] = layer(h, cos, sin, cache.kv[n] if cache is not None else None, past, key_valid,
                                       memory, row_mask, flush)
        new_cache.seen = past + T
        return self.model.norm(h), new_cache

    def _forward_blocks(self, input_ids, attention_mask, cache, use_cache, position_ids, labels, memory, flush,
                        logits_to_keep, block):
        """`forward` over blocks of `block` tokens (a multiple of the update chunk when it is finite)."""
        chunk = memory.update_chunk or self.config.fwpkm.get("chunk_size") or 1
        if chunk < block:
            block = block // chunk * chunk
        B, T = input_ids.shape
        past = cache.seen if cache is not None else 0
        kept_logits, loss_sum, loss_count = [], 0.0, 0
        for a in range(0, T, block):
            b = min(a + block, T)
            h, cache = self._decode(input_ids[:, a:b], None if attention_mask is None else attention_mask[:, :past + b],
                                    cache, None if position_ids is None else position_ids[:, a:b], memory,
                                    flush and b == T)
            if not logits_to_keep or b > T - logits_to_keep:
                logits = self._logits(h if not logits_to_keep else h[:, max(T - logits_to_keep - a, 0):])
                kept_logits.append(logits)
            if labels is not None:  # position t predicts labels[t + 1] (the whole input's shift)
                nxt = labels[:, a + 1:b + 1]
                lg = self._logits(h[:, :nxt.shape[1]]) if logits_to_keep else kept_logits[-1][:, :nxt.shape[1]]
                loss_sum = loss_sum + F.cross_entropy(lg.reshape(-1, lg.shape[-1]), nxt.reshape(-1),
                                                      ignore_index=-100, reduction="sum")
                loss_count += int((nxt != -100).sum())
        loss = None if labels is None else loss_sum / max(loss_count, 1)
        return _output(loss, torch.cat(kept_logits, 1), cache if use_cache else None)

    # --- generation (transformers 4.57+ and 5.x) --------------------------------------------------------

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # our own FwPKMCache; the prefill gets cache=None

    def prepare_inputs_for_generation(self, input_ids, next_sequence_length=None, cache=None, attention_mask=None,
                                      memory=None, past_key_values=None, **kwargs):
        cache = cache if cache is not None else past_key_values
        seen = cache.seen if isinstance(cache, FwPKMCache) else 0
        return {"input_ids": input_ids[:, seen:], "attention_mask": attention_mask, CACHE_FIELD: cache,
                "use_cache": True, "memory": memory}

    def _reorder_cache(self, cache, beam_idx):
        return cache.reorder(beam_idx)
