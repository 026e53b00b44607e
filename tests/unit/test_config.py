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
    from fwpkm_megatron.config import layout_problems, num_microbatches

    run = load_config(REPO / "configs" / "paper-112m.yaml")
    assert run.train.global_batch_size == 128 and run.train.seq_len == 4096 and run.train.precision == "bf16"
    assert layout_problems(run, 8) == [] and run.train.micro_batch_size * num_microbatches(run, 8) * 8 == 128
    m = run.model
    assert (m.attention_output_gate, m.qk_norm, m.rotary_percent) == (True, True, 0.25)
    assert "train.global_batch_size=128" in layout_problems(run, 32)[0]  # 8 x 32 > 128: named, not run
    four_nodes = load_config(REPO / "configs" / "paper-112m.yaml", ["train.micro_batch_size=4"])  # DP = 32
    assert layout_problems(four_nodes, 32) == [] and num_microbatches(four_nodes, 32) == 1


def test_layout_that_does_not_divide_the_global_batch_fails_before_any_process_group(monkeypatch):
    import torch.distributed as dist

    from fwpkm_megatron.parallel.groups import LayoutError, init_distributed

    monkeypatch.setenv("WORLD_SIZE", "3")
    run = load_config(None, ["train.micro_batch_size=4", "train.global_batch_size=8"])
    was_initialized = dist.is_initialized()
    with pytest.raises(LayoutError, match=r"train.global_batch_size=8: must be a multiple of "
                                          r"train.micro_batch_size x DP = 4 x 3 = 12"):
        init_distributed(run.parallel, 0, run)
    assert dist.is_initialized() == was_initialized


def test_precision_and_optimizer_keys(monkeypatch, tmp_path):
    import torch

    from fwpkm_megatron.training import device

    with pytest.raises(ConfigError, match=r"deepspeed.bf16: moved to train.precision"):
        load_config(None, ["deepspeed.bf16=true"])
    assert load_config(None, ["deepspeed.bf16=false"]).train.precision == "fp32"  # older checkpoints' configs
    with pytest.raises(ConfigError, match=r"train.precision='fp16': must be one of \('fp32', 'bf16'\)"):
        load_config(None, ["train.precision=fp16"])
    with pytest.raises(ConfigError, match=r"optimizer.distributed=true with deepspeed.zero_stage=1: pick one"):
        load_config(None, ["optimizer.distributed=true", "deepspeed.zero_stage=1"])
    assert device.precision_problem("fp32") is None
    monkeypatch.setattr(device, "_bf16_matmul_error", lambda dev: "no bf16 kernel")
    message = device.precision_problem("bf16", torch.device("cpu"))
    assert message == "train.precision=bf16: this cpu build has no bf16 matmul (no bf16 kernel); use fp32"
    # the Trainer checks it before it starts a process group or reads data
    from fwpkm_megatron.training import trainer

    run = load_config(None, ["train.precision=bf16", f"data.path={tmp_path / 'none'}",
                             f"train.run_dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match="train.precision=bf16: this cpu build has no bf16 matmul"):
        trainer.Trainer(run)


def test_gdn_mixer_rules_name_the_key():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["model.mixer=mamba"])
    assert "model.mixer='mamba': must be one of ('attention', 'gdn')" in info.value.problems
    with pytest.raises(ConfigError) as info:
        load_config(None, ["model.attention_layers=[1]"])
    assert "model.attention_layers=[1]: only with model.mixer=gdn" in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_config(None, ["model.mixer=gdn", "model.attention_layers=[1, 1, 9]", "model.gdn_num_key_heads=3",
                           "model.gdn_num_value_heads=4", "model.gdn_key_head_dim=0"])
    text = str(info.value)
    assert "model.gdn_key_head_dim=0: must be >= 1" in text
    assert "model.attention_layers=[1, 1, 9]: must be distinct ids in [0, model.num_layers=4)" in text
    with pytest.raises(ConfigError) as info:
        load_config(None, ["model.mixer=gdn", "model.gdn_num_key_heads=3", "model.gdn_num_value_heads=4"])
    assert "model.gdn_num_value_heads=4: must be a multiple of model.gdn_num_key_heads=3" in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_config(None, ["model.mixer=gdn", "model.gdn_num_key_heads=2", "model.gdn_num_value_heads=6",
                           "parallel.tp=4", "model.num_attention_heads=4", "model.hidden_size=128"])
    assert "parallel.tp=4: must divide model.gdn_num_key_heads=2 and model.gdn_num_value_heads=6" in str(info.value)
    run = load_config(None, ["model.mixer=gdn", "model.attention_layers=[3]"])
    assert (run.model.mixer, run.model.attention_layers) == ("gdn", [3])


def test_gdn_configs_validate_with_the_paper_layouts():
    from fwpkm_megatron.config import layout_problems

    rows = {"paper-gdn-112m.yaml": ([2, 10], [6], []), "paper-gdn-112m-baseline.yaml": ([], [], []),
            "paper-gdn-112m-pkm.yaml": ([], [2, 6, 10], []), "paper-gdn-fwmlp-112m.yaml": ([], [], [2, 6, 10])}
    for name, (fwpkm, pkm, fwmlp) in rows.items():
        run = load_config(REPO / "configs" / name)
        assert run.model.gdn_layers() == list(range(12)), name  # the paper's all-GDN layout
        assert (run.fwpkm.layers, run.pkm.layers, run.fwmlp.layers) == (fwpkm, pkm, fwmlp), name
        assert layout_problems(run, 8) == [] and run.train.global_batch_size == 128, name
    hybrid = load_config(REPO / "configs" / "paper-gdn-112m.yaml", ["model.attention_layers=[3,7,11]"])
    assert hybrid.model.gdn_layers() == [0, 1, 2, 4, 5, 6, 8, 9, 10]  # GDN+SWA: memories at GDN layers
    tiny = load_config(REPO / "configs" / "tiny-gdn.yaml")
    assert tiny.model.gdn_layers() == [0, 1, 2] and tiny.fwpkm.layers == [1, 2]
