"""Configuration of an exported FwPKM GPT (Hugging Face `transformers` remote code).

Copied verbatim into every export directory by `fwpkm-export`; imports only `transformers`.
The backbone fields use the usual transformers names; `fwpkm` and `pkm` hold the memory layers'
settings exactly as the training config (`fwpkm_megatron.config.FwPKMConfig` / `PKMConfig`) had them;
`gdn` lists the Gated DeltaNet layers and their sizes ({"layers": [...], "conv_kernel", "num_key_heads",
"num_value_heads", "key_head_dim", "value_head_dim"}; no layers: every mixer is attention).

Test-time memory behaviour (override with `from_pretrained(DIR, trust_remote_code=True, fwpkm_policy=...)`):
    fwpkm_policy           "per_sequence": every new sequence starts from the exported fast weights and
                           keeps its writes private (deterministic, batch-independent; the default);
                           "persistent": writes go into the model's fast-weight buffers and carry over
                           to every later call (the paper's streaming protocol);
                           "frozen": no writes at all (the paper's App. D.2 ablation).
    fwpkm_update_chunk     C used at test time; None = the training chunk size. A chunk is written once
                           all its tokens (and, with carry, its lookahead target) have arrived.
    prefill_block          feed inputs longer than this through the KV cache in blocks of this many
                           tokens (equal to one pass, O(block) activations); None = one pass.
    fwpkm_rope_scaling     None, {"type": "linear", "factor": s} or {"type": "yarn", "factor": s,
                           "original_max_position_embeddings": L} for full-attention layers read past
                           the training length (sliding-window layers never see far positions).
    fwpkm_carry_lookahead  False: a chunk's last `lookahead` tokens get no target, exactly as in training
                           (the exported model then reproduces the in-training model's logits);
                           True: they stay queued until their target token arrives (method notes 3.9).
"""
from __future__ import annotations

import transformers
from transformers import PretrainedConfig

POLICIES = ("per_sequence", "persistent", "frozen")
TRANSFORMERS_RANGE = ((4, 57), (6, 0))   # tested: 4.57 and 5.x; setup.py declares the same range


def check_transformers_version() -> None:
    """Refuse a transformers outside the tested range with one clear error (instead of a TypeError later)."""
    version = tuple(int(p) for p in transformers.__version__.split(".")[:2] if p.isdigit())
    lo, hi = TRANSFORMERS_RANGE
    if not lo <= version < hi:
        raise ImportError(f"the FwPKM export runs on transformers >= {lo[0]}.{lo[1]}, < {hi[0]}.{hi[1]}; "
                          f"this is transformers {transformers.__version__}")


class FwPKMConfig(PretrainedConfig):
    model_type = "fwpkm"

    def __init__(self, vocab_size: int = 512, hidden_size: int = 128, num_hidden_layers: int = 4,
                 num_attention_heads: int = 4, num_key_value_heads: int | None = None,
                 intermediate_size: int | None = None, max_position_embeddings: int = 256,
                 rope_theta: float = 10000.0, rms_norm_eps: float = 1e-5, attention_window: int | None = None,
                 rotary_percent: float = 1.0, qk_norm: bool = False, attention_output_gate: bool = False,
                 tie_embeddings: bool = True, initializer_range: float = 0.02, fwpkm: dict | None = None,
                 pkm: dict | None = None, gdn: dict | None = None, fwpkm_policy: str = "per_sequence", fwpkm_update_chunk: int | None = None,
                 fwpkm_carry_lookahead: bool = False, use_cache: bool = True, prefill_block: int | None = None,
                 fwpkm_rope_scaling: dict | None = None, tokenizer_vocab_size: int | None = None,
                 fwpkm_tokenizer_sha256: str | None = None, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.intermediate_size = intermediate_size or 4 * hidden_size
        self.max_position_embeddings = max_position_embeddings  # training length of the RoPE table (not a hard cap)
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps
        self.attention_window = attention_window  # W: a query sees itself and W-1 earlier tokens; None = full
        self.rotary_percent = rotary_percent      # RoPE on the first rotary_percent of each head's channels
        self.qk_norm = bool(qk_norm)              # RMSNorm per head on q and k (before RoPE)
        self.attention_output_gate = bool(attention_output_gate)  # attention output * sigmoid(gate_proj(x))
        self.tie_embeddings = tie_embeddings      # output layer = embedding matrix (no lm_head tensor)
        self.initializer_range = initializer_range
        self.fwpkm = dict(fwpkm or {"layers": []})
        self.pkm = dict(pkm or {"layers": []})
        self.gdn = dict(gdn or {"layers": []})
        if fwpkm_policy not in POLICIES:
            raise ValueError(f"fwpkm_policy={fwpkm_policy!r}: must be one of {POLICIES}")
        if fwpkm_update_chunk is not None and int(fwpkm_update_chunk) < 1:
            raise ValueError(f"fwpkm_update_chunk={fwpkm_update_chunk}: must be >= 1 or None")
        self.fwpkm_policy = fwpkm_policy
        self.fwpkm_update_chunk = fwpkm_update_chunk
        self.fwpkm_carry_lookahead = bool(fwpkm_carry_lookahead)
        if prefill_block is not None and int(prefill_block) < 1:
            raise ValueError(f"prefill_block={prefill_block}: must be >= 1 or None")
        self.prefill_block = None if prefill_block is None else int(prefill_block)
        self.fwpkm_rope_scaling = dict(fwpkm_rope_scaling) if fwpkm_rope_scaling else None
        # the tokenizer's vocabulary; embedding rows past it are TP padding and their logits are masked
        self.tokenizer_vocab_size = None if tokenizer_vocab_size is None else int(tokenizer_vocab_size)
        self.fwpkm_tokenizer_sha256 = fwpkm_tokenizer_sha256  # sha256 of the tokenizer.json trained with
        self.use_cache = use_cache  # forward returns an FwPKMCache (KV + memory) unless told otherwise
        kwargs["tie_word_embeddings"] = False  # tying is done in forward; transformers must not tie anything
        super().__init__(**kwargs)
