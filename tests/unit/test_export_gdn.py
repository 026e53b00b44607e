"""Export of a Gated DeltaNet hybrid (`model.mixer: gdn`) to transformers (CPU, one process).

What this proves:
- the export's two forms of the gated delta rule (chunked WY form from any state, token-by-token
  recurrence) equal each other and megatron's `torch_chunk_gated_delta_rule`, on odd lengths, fwd + bwd;
- the exported model's logits equal the in-training megatron model's within 1e-5 (fp32): GDN at layers
  0-1 (FwPKM branch before layer 0's GDN mixer, static PKM at layer 1), attention at layer 2, on 70 tokens
  (more than one 64-token GDN chunk);
- token-by-token decoding, blockwise prefill and `generate` through the cache (conv + recurrent state)
  equal one pass; a left-padded row equals the row alone;
- megatron -> export -> megatron names round-trip exactly.
Attention-only exports: tests/unit/test_export.py.
"""
from __future__ import annotations


import pytest
import torch

from fwpkm_megatron.export.hf.fwpkm_gdn import chunked_delta_rule, l2norm, recurrent_delta_rule

GDN = ("model.num_layers=3", "model.mixer=gdn", "model.attention_layers=[2]", "model.max_seq_len=96",
       "model.gdn_num_key_heads=2", "model.gdn_num_value_heads=4", "model.gdn_key_head_dim=8",
       "model.gdn_value_head_dim=6", "train.steps=2", "train.eval_batches=1")
SEQ = 70


def _inputs(B, T, H, dk, dv, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q, k = (l2norm(torch.randn(B, T, H, dk, generator=g, dtype=dtype)) for _ in range(2))
    v = torch.randn(B, T, H, dv, generator=g, dtype=dtype)
    gate = -torch.rand(B, T, H, generator=g, dtype=dtype) * 2   # log decay in (-2, 0]
    beta = torch.rand(B, T, H, generator=g, dtype=dtype)
    state = torch.randn(B, H, dk, dv, generator=g, dtype=dtype)
    return q, k, v, gate, beta, state


@pytest.mark.parametrize("T", [1, 37, 130], ids=["T1", "T37", "T130"])
def test_chunked_delta_rule_matches_recurrence_and_megatron(T):
    from megatron.core.ssm.gated_delta_net import torch_chunk_gated_delta_rule

    q, k, v, g, beta, state = _inputs(2, T, 3, 8, 5, seed=T)
    for tensor in (q, k, v, g, beta, state):
        tensor.requires_grad_(True)
    ref, ref_state = recurrent_delta_rule(q, k, v, g, beta, state)
    got, got_state = chunked_delta_rule(q, k, v, g, beta, state, chunk=16)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got_state, ref_state, rtol=1e-10, atol=1e-10)
    cot = torch.randn_like(ref), torch.randn_like(ref_state)
    grads_ref = torch.autograd.grad((ref * cot[0]).sum() + (ref_state * cot[1]).sum(), (q, k, v, g, beta, state))
    grads = torch.autograd.grad((got * cot[0]).sum() + (got_state * cot[1]).sum(), (q, k, v, g, beta, state))
    for name, a, b in zip("q k v g beta state".split(), grads_ref, grads):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-9, msg=name)
    with torch.no_grad():  # megatron's own torch form (zero initial state, fp32 inside)
        mega, _ = torch_chunk_gated_delta_rule(q.float(), k.float(), v.float(), g=g.float(), beta=beta.float())
        ours, _ = chunked_delta_rule(q, k, v, g, beta, torch.zeros_like(state))
    torch.testing.assert_close(mega.double(), ours, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def exported(tiny_run, train_and_export, tmp_path_factory):
    """(run, checkpoint step dir, export dir) of a 2-step GDN hybrid run."""
    root = tmp_path_factory.mktemp("export_gdn")
    run = tiny_run(root / "run", *GDN)
    return (run, *train_and_export(run, root / "hf"))


def _hf(path, **overrides):
    from fwpkm_megatron.export import load_model

    return load_model(path, **overrides)[0]


def _tokens(b, s, vocab, seed):
    return torch.randint(0, vocab, (b, s), generator=torch.Generator().manual_seed(seed))


def _close(ref, got, what):
    diff = (ref - got).abs().max().item()
    assert diff < 1e-5, f"{what}: max |diff| {diff:.3g}"


def test_gdn_export_logits_match_megatron(exported):
    from fwpkm_megatron.model import build_model
    from fwpkm_megatron.parallel.groups import init_single_process

    run, step_dir, out = exported
    init_single_process(run.train.seed)
    state = torch.load(step_dir / "model.pt", weights_only=True)
    mega = build_model(run, state["embedding.word_embeddings.weight"].shape[0])
    mega.load_state_dict(state)
    mega.eval()
    mega.window_control.begin_step(0, run.train.seed, training=False)
    hf = _hf(out, fwpkm_policy="persistent")
    assert hf.config.gdn["layers"] == [0, 1] and hasattr(hf.model.layers[2], "self_attn")
    for call in range(2):  # persistent: the second call starts from the memory the first one wrote
        ids = _tokens(2, SEQ, hf.config.vocab_size, seed=call)
        with torch.no_grad():
            ref = mega(ids, torch.arange(SEQ).expand_as(ids), attention_mask=None).float()
            got = hf(ids).logits
        _close(ref, got, f"logits, call {call}")


def test_gdn_decoding_prefill_and_padding_match_one_pass(exported):
    _, _, out = exported
    hf = _hf(out)  # per_sequence
    ids = _tokens(2, SEQ, hf.config.vocab_size, seed=3)
    with torch.no_grad():
        whole = hf(ids, use_cache=True)
        cache, steps = None, []
        for t in range(SEQ):
            o = hf(ids[:, t:t + 1], cache=cache, use_cache=True)
            cache, _ = o.cache, steps.append(o.logits)
        _close(whole.logits, torch.cat(steps, 1), "logits token by token")
        for block in (5, 16):
            blocks = hf(ids, use_cache=True, prefill_block=block)
            _close(whole.logits, blocks.logits, f"logits, prefill block {block}")
        for n in (0, 1):  # GDN layers: conv window and recurrent state
            for a, b, c in zip(whole.cache.kv[n], cache.kv[n], blocks.cache.kv[n]):
                _close(a, b, f"layer {n} GDN state, token by token")
                _close(a, c, f"layer {n} GDN state, blockwise")
        mask = torch.ones(2, SEQ, dtype=torch.long)
        mask[1, :9] = 0  # row 1 left-padded: equals its last SEQ - 9 tokens alone
        padded = hf(ids, attention_mask=mask).logits
        alone = hf(ids[1:, 9:]).logits
        _close(padded[1:, 9:], alone, "left-padded row vs the row alone")
        gen = hf.generate(ids[:1, :20], max_new_tokens=5, do_sample=False, attention_mask=torch.ones(1, 20))
        seq = ids[:1, :20]
        for _ in range(5):
            seq = torch.cat([seq, hf(seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(gen, seq), "generate through the GDN cache differs from full re-reads"


def test_gdn_megatron_names_round_trip_through_the_export(exported):
    from fwpkm_megatron.export import load_megatron_state

    _, step_dir, out = exported
    ref = {k: v for k, v in torch.load(step_dir / "model.pt", weights_only=True).items()
           if not k.endswith("_extra_state")}
    got = load_megatron_state(out)
    assert ref.keys() == got.keys() and any(".self_attention.in_proj." in k for k in ref)
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
