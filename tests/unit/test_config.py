"""Config loading rejects every bad key at once, naming each, and the CLI fails fast on them.

What this proves: unknown keys, wrong types and out-of-range values raise one `ConfigError` that names
every offending `section.key`; `fwpkm-train` turns that into a non-zero exit with the key on stderr
before importing megatron-core. A new validation rule gets a case in `test_bad_values_...` (or its own
test when it has several messages).
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fwpkm_megatron.config import ConfigError, RunConfig, load_config

REPO = Path(__file__).resolve().parents[2]


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_defaults_and_yaml_round_trip(tmp_path):
    path = _write(tmp_path, "model:\n  num_layers: 2\ntrain:\n  steps: 7\n  betas: [0.9, 0.99]\n")
    run = load_config(path, ["train.lr=1e-3", "fwpkm.layers=[1]"])
    assert isinstance(run, RunConfig)
    assert (run.model.num_layers, run.train.steps, run.train.lr) == (2, 7, 1e-3)
    assert run.train.betas == [0.9, 0.99] and run.fwpkm.layers == [1]
    assert run.to_dict()["train"]["steps"] == 7


def test_unknown_keys_and_wrong_types_are_all_named_in_one_error(tmp_path):
    path = _write(tmp_path, "train:\n  stepz: 3\nmodel:\n  hidden_size: big\nbogus:\n  a: 1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, ["fwpkm.num_slotz=4", "train.seed=abc"])
    message = str(info.value)
    for key in ("train.stepz", "model.hidden_size", "bogus", "fwpkm.num_slotz", "train.seed"):
        assert key in message, (key, message)
    assert len(info.value.problems) == 5


def test_bad_values_are_all_named_in_one_error():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["model.num_layers=4", "fwpkm.num_slots=1000", "train.steps=0",
                           "fwpkm.layers=[9]", "pkm.topk=600", "train.seq_len=512"])
    message = str(info.value)
    for key in ("fwpkm.num_slots", "train.steps", "fwpkm.layers", "pkm.topk", "train.seq_len"):
        assert key in message, (key, message)


def test_unknown_keys_and_rule_violations_come_in_one_error():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["train.stepz=3", "train.steps=0", "model.hidden_size=big", "fwpkm.policy=magic"])
    message = str(info.value)
    for key in ("train.stepz", "train.steps", "model.hidden_size", "fwpkm.policy"):
        assert key in message, (key, message)


def test_malformed_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="train.steps"):
        load_config(None, ["train.steps"])
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_cli_rejects_bad_key_before_slow_imports(tmp_path):
    path = _write(tmp_path, "train:\n  steps: 3\n")
    # -X importtime lists every module imported, so "before megatron" is checked exactly, not by timing.
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "fwpkm_megatron.cli.train",
                           "--config", str(path), "bad.key=1", "train.stepz=2"],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2, proc.stderr
    message = [line for line in proc.stderr.splitlines() if not line.startswith("import time:")]
    message = "\n".join(message)
    assert "bad" in message and "train.stepz" in message, message
    assert "Traceback" not in message
    imported = [line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines()
                if line.startswith("import time:")]
    slow = [m for m in imported if m.split(".")[0] in ("megatron", "streaming", "torch")]
    assert not slow, f"config errors must be reported before heavy imports, yet imported {slow[:5]}"


def test_sequence_parallel_and_partial_rope_rules_name_the_key():
    # sequence_parallel: one rule without TP, another (not supported, with the reason) with TP
    with pytest.raises(ConfigError) as info:
        load_config(None, ["parallel.sequence_parallel=true", "model.rotary_percent=0.3"])
    assert len(info.value.problems) == 2
    assert "parallel.sequence_parallel=true: splits the sequence over the tensor-parallel group, so it needs " \
           "parallel.tp > 1 (got 1)" in info.value.problems
    assert "model.rotary_percent=0.3" in str(info.value)  # head_dim 32 * 0.3 is not an even integer
    with pytest.raises(ConfigError, match="sequence_parallel=true: not supported: .*local layer spec"):
        load_config(None, ["parallel.sequence_parallel=true", "parallel.tp=2"])
    run = load_config(None, ["model.rotary_percent=0.25", "model.qk_norm=true", "model.attention_output_gate=true"])
    assert (run.model.rotary_percent, run.model.qk_norm, run.model.attention_output_gate) == (0.25, True, True)


def test_paper_config_validates_with_128_sequences_of_4096_per_step():
    run = load_config(REPO / "configs" / "paper-112m.yaml")
    dp = 8  # 1 node x 8 GPUs, TP = PP = 1
    assert run.train.micro_batch_size * run.parallel.num_microbatches * dp == 128 and run.train.seq_len == 4096
    m = run.model
    assert (m.attention_output_gate, m.qk_norm, m.rotary_percent) == (True, True, 0.25)
    four_nodes = load_config(REPO / "configs" / "paper-112m.yaml",
                             ["train.micro_batch_size=4", "parallel.num_microbatches=1"])  # DP = 32
    assert four_nodes.train.micro_batch_size * four_nodes.parallel.num_microbatches * 32 == 128
