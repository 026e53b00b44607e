"""Write an export directory from a training checkpoint.

    DIR/
        config.json            FwPKMConfig (model_type "fwpkm", auto_map -> the remote code below)
        generation_config.json eos/pad ids
        model.safetensors      slow weights `model.*` (and `lm_head.*` when untied) in --dtype;
                               fast weights `fast_weights.layer_{i}.{keys,values}` in fp32
        tokenizer.json, tokenizer_config.json
        configuration_fwpkm.py, modeling_fwpkm.py, fwpkm_integrity.py,
        fwpkm_attention.py, fwpkm_gdn.py, fwpkm_memory.py               (copied from export/hf/)
        fwpkm_reference.py     byte-identical copy of fwpkm_megatron/ops/reference.py
        addressing.py,         byte-identical copies of fwpkm_megatron/ops/addressing.py and row_products.py
        row_products.py        (reference.py imports them)
        fwpkm_training.json    run config, step, tokens seen, data manifest sha256, source checkpoint
        README.md              the same, for people
        fwpkm_index.json       size + sha256 of every file above; written last

The directory is built in a hidden sibling and renamed into place, so DIR is complete or absent.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import secrets
from pathlib import Path
from typing import Any

import torch

from fwpkm_megatron.config import from_dict
from fwpkm_megatron.export.convert import FAST_PREFIX, hf_config_fields, megatron_to_hf
from fwpkm_megatron.export.hf.fwpkm_integrity import write_index
from fwpkm_megatron.export.layout import ExportError, read_checkpoint
from fwpkm_megatron.export.runtime import DTYPES, ensure_transformers_importable, tokenizer_identity

HF_DIR = Path(__file__).parent / "hf"
HF_CODE_FILES = ("configuration_fwpkm.py", "modeling_fwpkm.py", "fwpkm_integrity.py", "fwpkm_attention.py",
                 "fwpkm_gdn.py", "fwpkm_memory.py")
OPS_DIR = Path(__file__).parents[1] / "ops"
# the one definition of the memory math, shipped byte-identical: source in ops/ -> name in the export
REFERENCE_FILES = {OPS_DIR / "reference.py": "fwpkm_reference.py", OPS_DIR / "addressing.py": "addressing.py",
                   OPS_DIR / "row_products.py": "row_products.py"}
AUTO_MAP = {"AutoConfig": "configuration_fwpkm.FwPKMConfig",
            "AutoModelForCausalLM": "modeling_fwpkm.FwPKMForCausalLM"}


def _tokenizer_file(run, tokenizer: str | Path | None) -> tuple[Path, dict[str, Any] | None]:
    """tokenizer.json to ship and the prepared data's manifest (None when a bare tokenizer file is given)."""
    source = Path(tokenizer) if tokenizer is not None else Path(run.data.path)
    if source.is_file():
        return source, None
    manifest_path = source / "manifest.json"
    if not (source / "tokenizer.json").is_file():
        raise ExportError(f"{source}: no tokenizer.json (the run's data.path); pass tokenizer= / --tokenizer "
                          "with a prepared data dir or a tokenizer.json")
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else None
    if manifest is not None:
        manifest["_sha256"] = hashlib.sha256(manifest_path.read_bytes()).hexdigest()
    return source / "tokenizer.json", manifest


def _check_tokenizer(run, given, tok_file: Path, rows: int) -> dict[str, Any]:
    """The shipped tokenizer's identity, after checking it is the run's and fits the embedding (one error).

    A tokenizer given explicitly must equal the one at the run's data.path when that is reachable.
    Embedding rows past the tokenizer's vocabulary (TP padding) stay in the weights, and the exported
    model masks their logits (`tokenizer_vocab_size`).
    """
    ident = tokenizer_identity(tok_file.parent if tok_file.name == "tokenizer.json" and
                               (tok_file.parent / "manifest.json").is_file() else tok_file)
    problems = []
    if ident["vocab_size"] > rows:
        problems.append(f"its vocabulary ({ident['vocab_size']}) exceeds the checkpoint's embedding rows ({rows})")
    trained = Path(run.data.path) / "tokenizer.json"
    if given is not None and trained.is_file() and trained.resolve() != tok_file.resolve():
        trained_sha = tokenizer_identity(trained)["sha256"]
        if trained_sha != ident["sha256"]:
            problems.append(f"its sha256 {ident['sha256'][:12]}... differs from the tokenizer the run was trained "
                            f"with ({trained}, {trained_sha[:12]}...)")
    if problems:
        raise ExportError(f"tokenizer {tok_file}: {'; '.join(problems)}")
    return ident


def _readme(info: dict[str, Any]) -> str:
    cfg = info["run_config"]
    return f"""# FwPKM GPT export (step {info['step']})

Exported by `fwpkm-export` from `{info['checkpoint']}` ({info['layout']} layout{_written_at(info)}).

| | |
|---|---|
| step | {info['step']} |
| tokens seen | {info['tokens_seen']:,} |
| data manifest sha256 | `{info['data_manifest_sha256']}` |
| slow-weight dtype | {info['dtype']} (fast weights: float32) |
| default test-time policy | {info['policy']} |
| fast-weight memory | {_memory_source(info)} |
| FwPKM layers / PKM layers | {cfg['fwpkm']['layers']} / {cfg['pkm']['layers']} |

`model.safetensors`: `model.*` (and `lm_head.*`) are slow weights; `fast_weights.layer_<i>.keys|values`
are the FwPKM fast-weight state of layer i after training, rewritten at test time.
`fwpkm_index.json` holds the size and sha256 of every file; the model class checks them before loading.

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)   # fwpkm_policy="persistent" etc.
tok = AutoTokenizer.from_pretrained(DIR, trust_remote_code=True)
```

Training config:
```json
{json.dumps(cfg, indent=1, sort_keys=True)}
```
"""


def _written_at(info: dict[str, Any]) -> str:
    lay = info.get("source_layout")
    return f", written at TP={lay['tp']} x PP={lay['pp']} x DP={lay['dp']}" if lay else ""


def _memory_source(info: dict[str, Any]) -> str:
    if info.get("fast_weight_replicas", 1) <= 1:
        return "the one memory of the run (shared by every DP rank)"
    return (f"DP rank {info['memory_dp_rank']}'s, one of {info['fast_weight_replicas']} per-DP-rank memories "
            "(persistent_local; `fwpkm-export --dp-rank R` exports another)")


def export_checkpoint(checkpoint: str | Path, out: str | Path, *, dtype: str = "fp32", policy: str = "per_sequence",
                      tokenizer: str | Path | None = None, overwrite: bool = False, dp_rank: int | None = None) -> Path:
    """Export a training checkpoint into a self-contained Hugging Face directory (layout in the module doc).

    Args:
        checkpoint: step dir, checkpoints root or run dir (its latest checkpoint).
        out: target directory (must not exist unless overwrite).
        dtype: "fp32" | "bf16" for slow weights; fast weights always fp32.
        policy: default test-time fast-weight policy written to config.json.
        tokenizer: a prepared data dir or tokenizer.json (default: the run's data.path).
        dp_rank: persistent_local checkpoints hold one memory per DP rank: whose to export (None = rank 0;
            recorded in README.md and fwpkm_training.json either way).
    Returns:
        The export directory.
    Raises:
        ExportError / CheckpointError: unsupported layout, unmapped tensors, missing tokenizer, bad files.

    A training checkpoint for continued training at another TP x PP layout: `export/reshard.py`.
    """
    if dtype not in ("fp32", "bf16"):
        raise ExportError(f"dtype={dtype!r}: must be fp32 or bf16")
    out = Path(out).absolute()
    if out.exists() and not overwrite:
        raise ExportError(f"{out}: exists; pass overwrite=True (--overwrite) to replace it")
    state, config_dict, meta = read_checkpoint(checkpoint, dp_rank=dp_rank)
    run = from_dict(config_dict)
    if run.fwmlp.layers:
        raise ExportError(f"{checkpoint}: has FwMLP layers (fwmlp.layers={run.fwmlp.layers}); the Hugging Face "
                          "export implements FwPKM, PKM and dense layers only, not the FwMLP baseline")
    vocab_size = int(state["embedding.word_embeddings.weight"].shape[0])
    tensors = megatron_to_hf(state, run)
    tok_file, data_manifest = _tokenizer_file(run, tokenizer)
    tok_id = _check_tokenizer(run, tokenizer, tok_file, vocab_size)

    ensure_transformers_importable()
    from safetensors.torch import save_file
    from transformers import GenerationConfig, PreTrainedTokenizerFast

    from fwpkm_megatron.export.hf.configuration_fwpkm import FwPKMConfig

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        slow_dtype = DTYPES[dtype]
        final = {name: (t.float() if name.startswith(FAST_PREFIX) else t.to(slow_dtype)).contiguous().clone()
                 for name, t in tensors.items()}
        save_file(final, str(tmp / "model.safetensors"), metadata={
            "format": "pt",
            "fwpkm_fast_weights": f"{FAST_PREFIX}layer_<i>.keys|values: FwPKM fast-weight state, float32",
            "fwpkm_slow_weights": "model.*, lm_head.*: trained slow weights",
            "fwpkm_step": str(meta["step"]),
        })
        hf_tok = PreTrainedTokenizerFast(tokenizer_file=str(tok_file))
        eos = (data_manifest or {}).get("eos_token") or _find_eos(hf_tok)
        hf_tok.eos_token = hf_tok.bos_token = hf_tok.pad_token = eos
        hf_tok.save_pretrained(str(tmp))
        eos_id = hf_tok.convert_tokens_to_ids(eos)

        config = FwPKMConfig(**hf_config_fields(run, vocab_size, policy=policy), bos_token_id=eos_id,
                             eos_token_id=eos_id, pad_token_id=eos_id, tokenizer_vocab_size=tok_id["vocab_size"],
                             fwpkm_tokenizer_sha256=tok_id["sha256"])
        config.auto_map = dict(AUTO_MAP)
        config.architectures = ["FwPKMForCausalLM"]
        config.dtype = slow_dtype
        config.save_pretrained(str(tmp))
        GenerationConfig(bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id).save_pretrained(str(tmp))

        for name in HF_CODE_FILES:
            shutil.copyfile(HF_DIR / name, tmp / name)
        for source, name in REFERENCE_FILES.items():
            shutil.copyfile(source, tmp / name)

        info = {**meta, "dtype": dtype, "policy": policy, "run_config": config_dict,
                "data_manifest_sha256": (data_manifest or {}).get("_sha256"),
                "tokenizer_source": str(tok_file), "tokenizer_sha256": tok_id["sha256"],
                "tokenizer_vocab_size": tok_id["vocab_size"], "vocab_size": vocab_size}
        (tmp / "fwpkm_training.json").write_text(json.dumps(info, indent=1, sort_keys=True) + "\n")
        (tmp / "README.md").write_text(_readme({**info, "tokens_seen": max(info["tokens_seen"], 0)}))
        write_index(str(tmp))  # last: its presence marks a complete export
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _find_eos(tok) -> str:
    from fwpkm_megatron.data.tokenizer import EOS_CANDIDATES

    vocab = tok.get_vocab()
    for candidate in EOS_CANDIDATES:
        if candidate in vocab:
            return candidate
    raise ExportError(f"tokenizer has none of the EOS tokens {EOS_CANDIDATES}")


def load_megatron_state(export_dir: str | Path) -> dict[str, torch.Tensor]:
    """Megatron-named (TP=1, PP=1) state dict of an export, for continued training (inverse of the export)."""
    from safetensors.torch import load_file

    from fwpkm_megatron.export.convert import hf_to_megatron
    from fwpkm_megatron.export.hf.fwpkm_integrity import verify_index

    export_dir = Path(export_dir)
    verify_index(str(export_dir))
    info = json.loads((export_dir / "fwpkm_training.json").read_text())
    return hf_to_megatron(load_file(str(export_dir / "model.safetensors")), from_dict(info["run_config"]))
