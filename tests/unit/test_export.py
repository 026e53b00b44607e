"""Export of a trained tiny run to a Hugging Face directory, loaded with plain transformers (CPU, one process).

What this proves:
- the exported model's logits equal the in-training megatron model's within 1e-5 (fp32), with the
  paper's attention output gate, per-head q/k RMSNorm and partial RoPE on, on a sequence
  spanning several chunks and a partial one, over consecutive calls (persistent: the fast-weight state
  evolves identically and equals megatron's buffers after every call) and under per_sequence;
- feeding tokens one at a time through the cache (and `generate`) gives the same logits and memory state
  as one chunked call, with the training cadence and with the lookahead carried across chunks (method 3.9);
- the shipped `fwpkm_reference.py`, `addressing.py` and `row_products.py` are byte-identical to their sources in `ops/`;
- a corrupt or truncated file is reported by name before anything loads;
- megatron -> export -> megatron names round-trip exactly (the basis of resharding).

Parallel (TP/PP) sources and resharding for continued training: tests/dist/test_export_parallel.py.
The trained run and its export are built once per module (`exported`); new checks on them go here.
"""
from __future__ import annotations

import ast
import shutil

import pytest
import torch

# The paper's attention details are on here (output gate, q/k norm, RoPE on a quarter of each head), so every
# check below covers them; tests/dist/test_export_parallel.py exports runs with them off.
TRAIN = ("train.steps=3", "model.attention=swa", "model.window=12", "model.num_query_groups=2",
         "train.eval_batches=1", "model.attention_output_gate=true", "model.qk_norm=true",
         "model.rotary_percent=0.25")
SEQ = 29  # 3 full chunks of 8 and a partial one of 5


@pytest.fixture(scope="module")
def exported(tiny_run, train_and_export, tmp_path_factory):
    """(run, checkpoint step dir, export dir) of a 3-step tiny run (FwPKM at layer 0, PKM at layer 1)."""
    root = tmp_path_factory.mktemp("export")
    run = tiny_run(root / "run", *TRAIN)
    return (run, *train_and_export(run, root / "hf"))


def _megatron(run, step_dir, policy="persistent"):
    """The in-training model, rebuilt from the checkpoint, in eval mode."""
    import dataclasses

    from fwpkm_megatron.model import build_model
    from fwpkm_megatron.parallel.groups import init_single_process

    run = dataclasses.replace(run, fwpkm=dataclasses.replace(run.fwpkm, policy=policy))
    init_single_process(run.train.seed)
    state = torch.load(step_dir / "model.pt", weights_only=True)
    model = build_model(run, state["embedding.word_embeddings.weight"].shape[0])
    model.load_state_dict(state)
    model.eval()
    model.window_control.begin_step(0, run.train.seed, training=False)
    return model


def _hf(path, **overrides):
    from fwpkm_megatron.export import load_model

    model, tok = load_model(path, **overrides)
    return model


def _tokens(b, s, vocab, seed):
    return torch.randint(0, vocab, (b, s), generator=torch.Generator().manual_seed(seed))


def _megatron_logits(model, ids):
    pos = torch.arange(ids.shape[1]).expand_as(ids)
    with torch.no_grad():
        return model(ids, pos, attention_mask=None).float()


def _close(ref, got, what):
    diff = (ref - got).abs().max().item()
    assert diff < 1e-5, f"{what}: max |diff| {diff:.3g}"


def test_exported_logits_match_megatron_over_several_writes(exported):
    from fwpkm_megatron.memory import fwpkm_blocks

    run, step_dir, out = exported
    mega = _megatron(run, step_dir)
    hf = _hf(out, fwpkm_policy="persistent")
    block = fwpkm_blocks(mega)[0]
    start = block.state.values.clone()
    for call in range(3):  # persistent: every call starts from the state the previous one left
        ids = _tokens(2, SEQ, hf.config.vocab_size, seed=call)
        ref = _megatron_logits(mega, ids)
        with torch.no_grad():
            got = hf(ids).logits
        _close(ref, got, f"logits, call {call}")
        _close(block.state.keys, hf.fast_weights.layer_0.keys, f"fast keys after call {call}")
        _close(block.state.values, hf.fast_weights.layer_0.values, f"fast values after call {call}")
    assert (block.state.values - start).abs().max() > 1e-3, "the memory was never written"


def test_exported_logits_match_megatron_per_sequence(exported):
    run, step_dir, out = exported
    mega = _megatron(run, step_dir, policy="per_sequence")
    hf = _hf(out)  # per_sequence is the export's default policy
    before = hf.snapshot_fast_weights()
    ids = _tokens(3, SEQ, hf.config.vocab_size, seed=7)
    with torch.no_grad():
        got = hf(ids).logits
        single = hf(ids[1:2]).logits  # a row alone equals the same row in a batch
    _close(_megatron_logits(mega, ids), got, "per_sequence logits")
    _close(got[1:2], single, "row 1 alone vs in the batch")
    assert all(torch.equal(before[k], v) for k, v in hf.snapshot_fast_weights().items()), \
        "per_sequence changed the stored fast weights"


def test_per_sequence_memory_keeps_only_the_rows_it_wrote(exported):
    """A sequence-private memory is the shared table plus its written rows: O(rows touched), never a copy."""
    _, _, out = exported
    hf = _hf(out)
    ids = _tokens(2, SEQ, hf.config.vocab_size, seed=11)
    with torch.no_grad():
        memory = hf(ids, use_cache=True).cache.memory
    shared = hf.fast_weights["layer_0"].values
    for stream in memory.streams[0]:
        rows, row_values = stream.written
        assert stream.values is shared and 0 < rows.numel() <= SEQ * hf.config.fwpkm["topk"]
        assert row_values.shape == (rows.numel(), shared.shape[1])
        assert not torch.equal(stream.table()[rows], shared[rows])


@pytest.mark.parametrize("carry", [False, True], ids=["training-cadence", "carry-lookahead"])
def test_token_by_token_matches_one_chunked_call(exported, carry):
    run, _, out = exported
    hf = _hf(out, fwpkm_carry_lookahead=carry)
    ids = _tokens(1, SEQ, hf.config.vocab_size, seed=3)
    with torch.no_grad():
        whole = hf(ids, use_cache=True)
        cache, steps = None, []
        for t in range(SEQ):
            o = hf(ids[:, t:t + 1], cache=cache, use_cache=True)
            cache = o.cache
            steps.append(o.logits)
    _close(whole.logits, torch.cat(steps, 1), "logits token by token")
    for mem in (whole.cache.memory, cache.memory):
        assert mem.pending(0) == (SEQ % 8 if not carry else (SEQ - 1) % 8 + 1)
    a, b = whole.cache.memory.state(0), cache.memory.state(0)
    _close(a[0], b[0], "keys")
    _close(a[1], b[1], "values")
    # a flush writes the queued partial chunk identically on both sides
    with torch.no_grad():
        for c in (whole.cache, cache):
            hf.flush_memory(c.memory)
    _close(whole.cache.memory.state(0)[1], cache.memory.state(0)[1], "values after flush")


def test_generate_continues_the_chunked_memory(exported):
    run, _, out = exported
    hf = _hf(out)
    ids = _tokens(1, 14, hf.config.vocab_size, seed=5)
    with torch.no_grad():
        gen = hf.generate(ids, max_new_tokens=6, do_sample=False, attention_mask=torch.ones_like(ids))
        cache, seq = None, ids
        for _ in range(6):  # manual greedy decoding through the cache
            o = hf(seq if cache is None else seq[:, -1:], cache=cache, use_cache=True)
            cache = o.cache
            seq = torch.cat([seq, o.logits[:, -1].argmax(-1, keepdim=True)], 1)
        full = hf(seq, use_cache=True)  # one chunked call over the same tokens
    assert torch.equal(gen, seq)
    _close(full.cache.memory.state(0)[1], cache.memory.state(0)[1], "memory after generate vs one call")


def test_reference_math_is_shipped_byte_identical(exported):
    from fwpkm_megatron.export.writer import HF_CODE_FILES, REFERENCE_FILES

    _, _, out = exported
    for source, name in REFERENCE_FILES.items():
        assert (out / name).read_bytes() == source.read_bytes(), name
    for name in (*HF_CODE_FILES, *REFERENCE_FILES.values()):
        tree = ast.parse((out / name).read_text())
        imported = {n.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for n in node.names}
        imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                     if isinstance(node, ast.ImportFrom) and node.level == 0}
        assert imported <= {"__future__", "copy", "functools", "hashlib", "json", "math", "os", "typing", "torch", "transformers"}, \
            f"{name} imports {sorted(imported)}"


def test_export_names_fast_and_slow_weights_apart(exported):
    from safetensors import safe_open

    _, _, out = exported
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        meta = f.metadata()
    assert {"fast_weights.layer_0.keys", "fast_weights.layer_0.values"} <= names
    attn = "model.layers.1.self_attn."  # the paper's attention details travel as their own tensors
    assert {attn + "gate_proj.weight", attn + "q_norm.weight", attn + "k_norm.weight"} <= names
    assert all(n.startswith(("model.", "fast_weights.", "lm_head.")) for n in names)
    assert "fwpkm_fast_weights" in meta
    readme = (out / "README.md").read_text()
    assert "tokens seen" in readme and "data manifest sha256" in readme


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_corrupt_safetensors_is_detected_before_loading(exported, tmp_path, damage):
    from fwpkm_megatron.export import ExportIntegrityError

    _, _, out = exported
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    path = bad / "model.safetensors"
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
    else:
        data = data[:-100]
    path.write_bytes(bytes(data))
    with pytest.raises(ExportIntegrityError, match="model.safetensors"):
        _hf(bad)
    from transformers import AutoModelForCausalLM  # the plain transformers entry point checks too

    with pytest.raises(RuntimeError, match="model.safetensors") as err:  # the class of the exported copy
        AutoModelForCausalLM.from_pretrained(str(bad), trust_remote_code=True)
    assert type(err.value).__name__ == "ExportIntegrityError"


def test_megatron_names_round_trip_through_the_export(exported):
    from fwpkm_megatron.export import load_megatron_state

    run, step_dir, out = exported
    ref = {k: v for k, v in torch.load(step_dir / "model.pt", weights_only=True).items()
           if not k.endswith("_extra_state")}
    got = load_megatron_state(out)
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]), k


def test_dp_rank_and_unfit_layouts_are_refused_clearly(exported, tmp_path):
    from fwpkm_megatron.export import ExportError, export_checkpoint, reshard_checkpoint

    run, step_dir, _ = exported
    with pytest.raises(ExportError, match="one memory"):  # a single-process run has no per-DP-rank memories
        export_checkpoint(step_dir, tmp_path / "x", dp_rank=1)
    with pytest.raises(ExportError, match="num_attention_heads"):  # 4 heads do not split over TP=3
        reshard_checkpoint(step_dir, tmp_path / "y", tp=3, pp=1)
    assert not (tmp_path / "y").exists() and not list(tmp_path.glob(".y.tmp-*"))


@pytest.mark.parametrize("policy", ["per_sequence", "persistent"])
def test_blockwise_prefill_equals_one_pass(exported, policy):
    """Blocks through the KV cache and the memory queue give one pass's logits, loss, memory and KV cache.

    Block 5 is not a multiple of the chunk (8): the queue carries partial chunks between blocks; 16 is.
    The window (12) is shorter than the input: every windowed layer keeps only its last 11 keys.
    """
    _, _, out = exported
    hf = _hf(out, fwpkm_policy=policy)
    ids = _tokens(2, 3 * SEQ, hf.config.vocab_size, seed=21)
    mask = torch.ones_like(ids)
    if policy == "per_sequence":
        mask[1, :7] = 0  # a left-padded row: padding is neither attended to nor written
    runs = {}
    with torch.no_grad():
        for block in (None, 5, 16):
            start = hf.snapshot_fast_weights()
            memory = hf.new_memory(2)
            o = hf(ids[:, :-4], attention_mask=mask[:, :-4], memory=memory, use_cache=True, labels=ids[:, :-4],
                   prefill_block=block)
            more = hf(ids[:, -4:], attention_mask=mask, cache=o.cache, use_cache=True, flush_memory=True)
            runs[block] = (o, more, memory.state(0, 1), hf.snapshot_fast_weights())
            hf.restore_fast_weights(start)
    ref = runs[None]
    for block in (5, 16):
        o, more, state, fast = runs[block]
        _close(ref[0].logits, o.logits, f"logits, block {block}")
        _close(ref[0].loss, o.loss, f"loss, block {block}")
        _close(ref[1].logits, more.logits, f"logits after the prefill, block {block}")
        _close(ref[2][1], state[1], f"memory values, block {block}")
        _close(ref[3]["layer_0.values"], fast["layer_0.values"], f"stored fast weights, block {block}")
        for (k0, v0), (k1, v1) in zip(ref[1].cache.kv, more.cache.kv):
            assert k1.shape[2] == hf.config.attention_window - 1
            _close(k0, k1, "kept keys")
            _close(v0, v1, "kept values")
    with torch.no_grad():
        whole = hf(ids, memory=hf.new_memory(2, policy="frozen")).logits
        keep = hf(ids, memory=hf.new_memory(2, policy="frozen"), prefill_block=16, logits_to_keep=3).logits
    _close(whole[:, -3:], keep, "logits_to_keep over blocks")


def _attention_module(out):
    """The exported copy of fwpkm_attention.py, as transformers imported it (with modeling_fwpkm.py)."""
    import sys

    modeling = sys.modules[type(_hf(out)).__module__]
    return sys.modules[modeling.Attention.__module__]


def test_sdpa_attention_matches_explicit_scores(exported, monkeypatch):
    """causal_attention (SDPA, query blocks) equals softmax over an explicit masked score matrix."""
    modeling = _attention_module(exported[2])
    g = torch.Generator().manual_seed(4)
    B, nh, nkv, T, hd, kept = 2, 6, 3, 13, 8, 9
    q = torch.randn(B, nh, T, hd, generator=g)
    k, v = torch.randn(B, nkv, kept + T, hd, generator=g), torch.randn(B, nkv, kept + T, hd, generator=g)
    valid = torch.ones(B, kept + T, dtype=torch.bool)
    valid[0, :5] = False
    q0, k0 = 20, 20 - kept
    for window in (None, 4):
        i = torch.arange(q0, q0 + T)[:, None]
        j = torch.arange(k0, q0 + T)[None]
        vis = (j <= i) & ((j > i - window) if window else True) & valid[:, None, None, :]
        scores = q @ k.repeat_interleave(2, 1).transpose(-1, -2) / hd ** 0.5
        ref = scores.masked_fill(~vis, float("-inf")).softmax(-1) @ v.repeat_interleave(2, 1)
        for elements in (1 << 24, 40):  # one call, and query blocks of a few rows
            monkeypatch.setattr(modeling, "MASK_ELEMENTS", elements)
            got = modeling.causal_attention(q, k, v, q0=q0, k0=k0, window=window, key_valid=valid)
            _close(ref, got, f"window {window}, mask elements {elements}")


def test_rope_scaling_linear_and_yarn(exported):
    rope_inv_freq = _attention_module(exported[2]).rope_inv_freq

    base, _ = rope_inv_freq(64, 10000.0)
    lin, f = rope_inv_freq(64, 10000.0, {"type": "linear", "factor": 4})
    assert f == 1.0 and torch.allclose(lin, base / 4)
    yarn, f = rope_inv_freq(64, 10000.0, {"type": "yarn", "factor": 4, "original_max_position_embeddings": 4096})
    assert abs(f - (0.1 * torch.log(torch.tensor(4.0)).item() + 1)) < 1e-6
    assert torch.equal(yarn[:8], base[:8]), "fast dimensions keep their frequency"
    assert torch.allclose(yarn[-4:], base[-4:] / 4), "slow dimensions are interpolated"
    with pytest.raises(ValueError, match="linear' or 'yarn"):
        rope_inv_freq(64, 10000.0, {"type": "ntk", "factor": 2})


TRANSFORMERS_4 = ("transformers==4.57.6", "tokenizers==0.22.2", "huggingface-hub==0.36.2")


def test_export_runs_on_transformers_4_57_and_5(exported, tmp_path):
    """The same export gives the same logits, greedy and beam generations under transformers 4.57 and 5.x.

    transformers 4.57 is installed once (pip --target, no dependencies) into a cache directory,
    $FWPKM_TEST_CACHE or ~/.cache/fwpkm-tests, and put first on the probe process's path.
    """
    import os
    import subprocess
    import sys
    from pathlib import Path

    import transformers

    cache = Path(os.environ.get("FWPKM_TEST_CACHE", Path.home() / ".cache" / "fwpkm-tests")) / "transformers-4.57"
    if not (cache / "transformers-4.57.6.dist-info").is_dir():
        pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(cache),
                              *TRANSFORMERS_4], capture_output=True, text=True, timeout=900)
        assert pip.returncode == 0, f"installing {TRANSFORMERS_4} into {cache} failed:\n{pip.stderr[-2000:]}"
    probe = Path(__file__).with_name("hf_compat_probe.py")
    results = {}
    for name, extra in (("4", str(cache)), ("5", None)):
        env = dict(os.environ, HF_HOME=str(tmp_path / "hf_home"))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (extra, env.get("PYTHONPATH")) if p)
        run = subprocess.run([sys.executable, str(probe), str(exported[2]), str(tmp_path / f"{name}.pt")],
                             capture_output=True, text=True, timeout=600, env=env)
        assert run.returncode == 0, f"transformers {name}.x: {run.stderr[-3000:]}"
        results[name] = torch.load(tmp_path / f"{name}.pt")
    assert results["4"]["version"] == "4.57.6" and results["5"]["version"] == transformers.__version__
    _close(results["5"]["logits"], results["4"]["logits"], "logits, transformers 4.57 vs 5")
    for key in ("greedy", "beam"):
        assert torch.equal(results["4"][key], results["5"][key]), key
    assert results["4"]["bf16_fast_dtype"] == results["5"]["bf16_fast_dtype"] == "torch.float32"


def test_tokenizer_identity_vocab_fit_and_padded_rows(exported, tiny_data, tmp_path, monkeypatch):
    """Another tokenizer than the run's is refused at export and at evaluation (one error naming both);
    padded embedding rows are never predicted; loading a checkpoint leaves no temporary export behind."""
    import json
    import tempfile

    from fwpkm_megatron.export import ExportError, export_checkpoint, load_model
    from fwpkm_megatron.export.runtime import check_data_fits

    run, step_dir, out = exported
    other = tmp_path / "other"
    shutil.copytree(tiny_data, other)
    (other / "tokenizer.json").write_text(json.dumps(json.loads((other / "tokenizer.json").read_text()),
                                                     indent=3))  # other bytes: another sha256
    (tmp_path / "tok").mkdir()
    shutil.copyfile(other / "tokenizer.json", tmp_path / "tok" / "tokenizer.json")
    with pytest.raises(ExportError, match="differs from the tokenizer the run was trained with"):
        export_checkpoint(step_dir, tmp_path / "x", tokenizer=tmp_path / "tok" / "tokenizer.json")
    with pytest.raises(ExportError, match="replaced after the data was prepared"):
        export_checkpoint(step_dir, tmp_path / "x", tokenizer=other)
    assert not (tmp_path / "x").exists()
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["tokenizer"] = {"sha256": None}
    (other / "manifest.json").write_text(json.dumps(manifest))
    hf = _hf(out)
    check_data_fits(hf.config, tiny_data)
    with pytest.raises(ExportError, match="does not fit the model: it was tokenized with tokenizer sha256"):
        check_data_fits(hf.config, other)

    hf.config.tokenizer_vocab_size = hf.config.vocab_size - 5  # as if the last 5 rows were TP padding
    with torch.no_grad():
        logits = hf(_tokens(1, 9, hf.config.vocab_size - 5, seed=2)).logits
    assert int(logits.argmax(-1).max()) < hf.config.vocab_size - 5
    assert torch.all(logits[..., -5:] == torch.finfo(logits.dtype).min)

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    model, _ = load_model(step_dir)
    assert model.config.fwpkm_tokenizer_sha256 == json.loads((tiny_data / "manifest.json").read_text())["tokenizer"]["sha256"]
    assert not list((tmp_path / "tmp").iterdir()), "load_model left its temporary export behind"
