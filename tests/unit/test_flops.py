"""training/flops.py: the model FLOP count behind perf/model_tflops_per_device and perf/mfu.

What this proves:
- on a model without memory layers the count equals torch's FlopCounterMode over a real forward +
  backward, once the attention scores the kernel computes but the mask discards are added back;
- the mean keys attended per query is the count of the model's own (windowed) causal mask;
- the peak table matches devices by name, an override wins, and CPU (or an unknown GPU) gets no MFU.
Memory-layer terms are the documented formula (docs/performance.md); the reference ops compute dense
sub-key gradients that the count deliberately leaves out, so FlopCounterMode is no reference for them.
"""
from __future__ import annotations

import pytest
import torch


def test_dense_model_flops_match_torch_flop_counter(tiny_run, tmp_path, monkeypatch):
    from torch.utils.flop_counter import FlopCounterMode

    from fwpkm_megatron.model import attention, build_model, specs

    # the unfused reference attention: its s x s matmuls are what FlopCounterMode can count exactly
    # (the fused SDPA blocks are counted by torch's own, kernel-specific formulas)
    monkeypatch.setattr(specs, "FusedWindowedAttention", attention.WindowedDotProductAttention)
    from fwpkm_megatron.parallel.groups import init_single_process
    from fwpkm_megatron.training.flops import BACKWARD_FACTOR, attention_keys_per_query, training_flops_per_token

    run = tiny_run(tmp_path, "fwpkm.layers=[]", "pkm.layers=[]", "model.vocab_size=512", "model.attention=full")
    init_single_process(0)
    model = build_model(run, 512)
    b, s = 2, run.train.seq_len
    tokens = torch.randint(0, 512, (b, s + 1), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(s).expand(b, s)
    with FlopCounterMode(display=False) as counter:
        model(tokens[:, :-1], positions, attention_mask=None, labels=tokens[:, 1:]).mean().backward()
    m = run.model
    # megatron's local attention computes all s x s scores and then masks; the count keeps the causal ones
    masked = (1 + BACKWARD_FACTOR) * m.num_layers * 4 * m.hidden_size * (s - attention_keys_per_query(run))
    assert counter.get_total_flops() / (b * s) == pytest.approx(training_flops_per_token(run) + masked, rel=1e-9)


@pytest.mark.parametrize("s,window", [(32, None), (32, 8), (31, 40), (7, 1)])
def test_mean_keys_attended_counts_the_models_mask(s, window):
    from fwpkm_megatron.model.attention import band_mask
    from fwpkm_megatron.training.flops import _mean_keys_attended

    visible = (~band_mask(s, s, window, torch.device("cpu"))).sum().item()
    assert _mean_keys_attended(s, window) == pytest.approx(visible / s, rel=1e-12)


def test_peak_table_override_and_no_mfu_without_a_known_peak(monkeypatch):
    from fwpkm_megatron.training import flops

    peak, why = flops.peak_tflops(torch.device("cpu"), "fp32")
    assert peak is None and "no MFU" in why
    assert flops.peak_tflops(torch.device("cpu"), "fp32", override=2.5) == (2.5, "train.peak_tflops")
    for name, dtype, expected in (("NVIDIA H100 80GB HBM3", "bf16", 989.4), ("NVIDIA H100 PCIe", "bf16", 756.0),
                                  ("NVIDIA H200", "tf32", 494.7), ("NVIDIA A100-SXM4-80GB", "bf16", 312.0),
                                  ("NVIDIA GeForce RTX 9999", "bf16", None)):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, name=name: name)
        assert flops.peak_tflops(torch.device("cuda", 0), dtype)[0] == expected, name
    assert flops.peak_dtype_name(torch.bfloat16, "cuda") == "bf16"
    assert flops.peak_dtype_name(torch.float32, "cpu") == "fp32"


def test_gdn_layers_count_their_projections_conv_and_recurrence():
    from pathlib import Path

    from fwpkm_megatron.config import load_config
    from fwpkm_megatron.training.flops import forward_flops_per_token, gdn_forward_flops

    config = Path(__file__).resolve().parents[2] / "configs" / "paper-gdn-112m-baseline.yaml"
    gdn = load_config(config, ["model.vocab_size=32000"])
    # h 768, 8 q/k and 8 v heads of 64, kernel 4: in_proj 2*768*(1024+1024+16), conv 2*4*(1024+512),
    # recurrence 6*8*64*64, out_proj 2*512*768
    assert gdn_forward_flops(gdn.model, 768) == 3_170_304 + 12_288 + 196_608 + 786_432
    hybrid = load_config(config, ["model.vocab_size=32000", "model.attention_layers=[3,7,11]"])
    attention = load_config(config, ["model.vocab_size=32000", "model.mixer=attention"])
    per_attention_layer = (forward_flops_per_token(attention) - forward_flops_per_token(gdn)) / 12 \
        + gdn_forward_flops(gdn.model, 768)
    assert forward_flops_per_token(hybrid) == pytest.approx(forward_flops_per_token(gdn) + 3 * (
        per_attention_layer - gdn_forward_flops(gdn.model, 768)), rel=1e-12)
