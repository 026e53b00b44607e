"""Model FLOPs per training token, and the peak FLOP/s that turn them into MFU.

FLOPs are *model* FLOPs (what the math needs, as in the PaLM/Megatron MFU convention): one
multiply-add = 2 FLOPs; masked attention scores, activation recompute, the backward's re-reads and
non-matmul work (norms, softmax, top-k selection, sorting) are not counted. docs/performance.md has the
formula with a worked example.
"""
from __future__ import annotations

import math

from fwpkm_megatron.config import FwPKMConfig, PKMConfig, RunConfig

BACKWARD_FACTOR = 2  # backward = 2 x forward (the input and the weight gradient of every matmul)


def _mean_keys_attended(seq_len: int, window: int | None) -> float:
    """Mean over the s positions of the keys a causal query sees: t + 1, capped at the window W."""
    if window is None or window >= seq_len:
        return (seq_len + 1) / 2
    return (window * (window + 1) / 2 + (seq_len - window) * window) / seq_len


def attention_keys_per_query(run: RunConfig) -> float:
    """Mean keys attended per query in training: full causal, the window, or pSWA's expectation."""
    m, s = run.model, run.train.seq_len
    full, windowed = _mean_keys_attended(s, None), _mean_keys_attended(s, m.window)
    return {"full": full, "swa": windowed, "pswa": m.pswa_prob * windowed + (1 - m.pswa_prob) * full}[m.attention]


def fwpkm_forward_flops(cfg: FwPKMConfig, hidden: int) -> float:
    """Forward FLOPs per token of one FwPKM branch (method 3.1-3.6).

    projections  2h(H d_k) + 2h d_v + 2h [gate] + 2 d_v h
    addressing   2 H R d_k        (both codebooks: R sub-keys of d_k/2 each; IDW via the dot product)
    read         2 H k d_v        (weighted sum of the H*k rows)
    value write  2 H k d_v        (each read entry's weighted residual scattered into its row)
    key step     2 H k d_k        (the addressing-loss gradient reaches only the top-k sub-keys)
    """
    H, k, d_k, d_v, R = cfg.heads, cfg.topk, cfg.d_k, cfg.d_v, math.isqrt(cfg.num_slots)
    projections = 2 * hidden * (H * d_k) + 2 * hidden * d_v + (2 * hidden if cfg.gate else 0) + 2 * d_v * hidden
    return projections + 2 * H * R * d_k + 2 * H * k * d_v + 2 * H * k * d_v + 2 * H * k * d_k


def pkm_forward_flops(cfg: PKMConfig, hidden: int) -> float:
    """Forward FLOPs per token of one static PKM (method 2.4): query 2h(H d_k), addressing 2 H R d_k,
    read 2 H k d_v, swilu and value projections 2h d_v + 2 d_v h."""
    H, k, d_k, d_v, R = cfg.heads, cfg.topk, cfg.d_k, cfg.d_v, math.isqrt(cfg.num_slots)
    return 2 * hidden * H * d_k + 2 * H * R * d_k + 2 * H * k * d_v + 4 * hidden * d_v


def gdn_forward_flops(m, hidden: int) -> float:
    """Forward FLOPs per token of one Gated DeltaNet mixer (model/gdn.py), counted as the recurrence:

    in_proj      2h (2 Hk dk + 2 Hv dv + 2 Hv)   (q, k, v, output gate z, beta, alpha)
    conv         2 K (2 Hk dk + Hv dv)          (depthwise, kernel K, over q, k, v)
    recurrence   6 Hv dk dv                     (S^T k, the rank-1 write, S^T q; the chunked form's
                                                 intra-chunk matmuls are an implementation cost)
    out_proj     2 Hv dv h
    """
    qk, v = m.gdn_num_key_heads * m.gdn_key_head_dim, m.gdn_num_value_heads * m.gdn_value_head_dim
    return (2 * hidden * (2 * qk + 2 * v + 2 * m.gdn_num_value_heads) + 2 * m.gdn_conv_kernel * (2 * qk + v)
            + 6 * m.gdn_num_value_heads * m.gdn_key_head_dim * m.gdn_value_head_dim + 2 * v * hidden)


def forward_flops_per_token(run: RunConfig) -> float:
    """Forward FLOPs per token of the whole model (see `training_flops_per_token`)."""
    m = run.model
    h, L = m.hidden_size, m.num_layers
    head_dim = h // m.num_attention_heads
    groups = m.num_query_groups or m.num_attention_heads
    ffn = m.ffn_hidden_size or 4 * h
    attention = (2 * h * (h + 2 * groups * head_dim) + 2 * h * h              # QKV and output projections
                 + 4 * h * attention_keys_per_query(run))                      # scores and weighted values
    mlp = 3 * 2 * h * ffn                                                       # SwiGLU: fc1 (2 ffn wide), fc2
    gdn = len(m.gdn_layers())
    total = (L - gdn) * attention + gdn * gdn_forward_flops(m, h)
    total += sum(pkm_forward_flops(run.pkm, h) if i in run.pkm.layers else mlp for i in range(L))
    total += len(run.fwpkm.layers) * fwpkm_forward_flops(run.fwpkm, h)
    return total + 2 * h * _vocab_size(run)                                     # LM head (embedding: a lookup)


def training_flops_per_token(run: RunConfig) -> float:
    """Forward + backward model FLOPs per training token, memory ops included.

    F = L [2h(h + 2 g d_h) + 2h^2 + 4h c]            attention (g KV groups of width d_h; c = mean keys
                                                     attended per query: (s+1)/2 causal, less with a window,
                                                     pSWA's expectation over windowed/full steps); a GDN
                                                     layer counts `gdn_forward_flops` instead
      + sum over layers of 6 h f (SwiGLU MLP) or the static PKM's FLOPs (`pkm_forward_flops`)
      + per FwPKM layer `fwpkm_forward_flops`         (projections, addressing, read, value write, key step)
      + 2 h V                                         LM head
    training FLOPs per token = (1 + BACKWARD_FACTOR) * F = 3F.

    The backward through the fast-weight writes (second order) is counted by the same factor 2, as for
    every other op: a convention, not a measurement of the reverse scan's work.

    Raises:
        ValueError: model.vocab_size is unset and the prepared data's manifest cannot be read.
    """
    return (1 + BACKWARD_FACTOR) * forward_flops_per_token(run)


def _vocab_size(run: RunConfig) -> int:
    if run.model.vocab_size:
        return run.model.vocab_size
    from fwpkm_megatron.data.layout import parse_manifest

    path = run.data.mixture[0]["path"] if run.data.mixture else run.data.path
    try:
        return int(parse_manifest(path)["vocab_size"])
    except Exception as exc:  # DataError and friends: say which key would have avoided the read
        raise ValueError(f"model.vocab_size is unset and the vocab size of {path} cannot be read "
                         f"({exc}); set model.vocab_size") from None


# Dense (no sparsity) peak TFLOP/s per GPU from the vendor datasheets, by the compute dtype of the
# matmuls; matched in order against torch.cuda.get_device_name(). A device not listed gets no MFU
# (train.peak_tflops supplies its peak).
PEAK_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H100 PCIe", {"bf16": 756.0, "tf32": 378.0, "fp32": 51.2}),
    ("H100 NVL", {"bf16": 835.0, "tf32": 418.0, "fp32": 60.0}),
    ("H100", {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}),       # SXM5
    ("H200", {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}),       # SXM; same compute as H100 SXM
    ("A100", {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    ("L4", {"bf16": 121.0, "tf32": 60.0, "fp32": 30.3}),
)


def peak_dtype_name(param_dtype, device_type: str) -> str:
    """"bf16" | "tf32" | "fp32": the dtype whose peak applies to the matmuls of this run."""
    import torch

    if param_dtype in (torch.bfloat16, torch.float16):
        return "bf16"
    if device_type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "fp32"


def peak_tflops(device, dtype: str, override: float | None = None) -> tuple[float | None, str]:
    """(peak TFLOP/s of one device for `dtype`, where it came from); (None, why) when unknown.

    Args:
        device: the torch device the model runs on.
        dtype: "bf16" | "tf32" | "fp32" (see `peak_dtype_name`).
        override: train.peak_tflops; wins over the table.
    """
    import torch

    if override:
        return float(override), "train.peak_tflops"
    device = torch.device(device)
    if device.type != "cuda":
        return None, f"no peak known for {device.type}: TFLOP/s only, no MFU (set train.peak_tflops)"
    name = torch.cuda.get_device_name(device)
    for key, peaks in PEAK_TFLOPS:
        if key in name:
            return peaks[dtype], f"{name}, {dtype} dense datasheet peak"
    return None, f"{name} is not in flops.PEAK_TFLOPS: TFLOP/s only, no MFU (set train.peak_tflops)"


__all__ = ["PEAK_TFLOPS", "attention_keys_per_query", "peak_dtype_name", "forward_flops_per_token",
           "fwpkm_forward_flops", "peak_tflops", "pkm_forward_flops", "training_flops_per_token"]
