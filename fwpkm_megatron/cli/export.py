"""fwpkm-export: a training checkpoint -> a self-contained Hugging Face directory, or -> a training
checkpoint for another TP x PP layout.

    fwpkm-export --checkpoint RUN_DIR/checkpoints/step_00000300 --out exports/tiny [--dtype bf16|fp32]
                 [--policy per_sequence|persistent|frozen] [--tokenizer DATA_DIR] [--dp-rank R] [--overwrite]
    fwpkm-export --checkpoint RUN_DIR_or_EXPORT_DIR --out runs/resharded --tp K --pp M [--overwrite]

`--checkpoint` may be a step dir, a run dir or its checkpoints/ root (the latest checkpoint), from any
TP x PP x DP layout. With `--tp/--pp` the output is a run directory that `fwpkm-train`/`fwpkm-launch`
resume at K x M (`--checkpoint` may then also be an export directory; the optimizer restarts). Loading an
export: `AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True)`; see docs/evaluation.md.
"""
from __future__ import annotations

import argparse
import sys

from fwpkm_megatron.benign import silence


def main(argv: list[str] | None = None) -> int:
    silence()  # known-benign library warnings (fwpkm_megatron/benign.py)
    parser = argparse.ArgumentParser(prog="fwpkm-export", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="step dir, checkpoints/ root or run dir "
                        "(with --tp/--pp also an export dir)")
    parser.add_argument("--out", required=True, help="export directory (or, with --tp/--pp, run dir) to create")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="slow weights (fast: fp32)")
    parser.add_argument("--policy", choices=("per_sequence", "persistent", "frozen"), default="per_sequence",
                        help="default test-time fast-weight policy written to config.json")
    parser.add_argument("--tokenizer", help="prepared data dir or tokenizer.json (default: the run's data.path)")
    parser.add_argument("--dp-rank", type=int, help="persistent_local: export this DP rank's memory (default 0)")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--tp", type=int, help="reshard: write a training checkpoint for this TP size")
    parser.add_argument("--pp", type=int, help="reshard: write a training checkpoint for this PP size")
    args = parser.parse_args(argv)

    from fwpkm_megatron.export import ExportError, export_checkpoint, reshard_checkpoint
    from fwpkm_megatron.training.checkpoint import CheckpointError

    try:
        if args.tp is None and args.pp is None:
            out = export_checkpoint(args.checkpoint, args.out, dtype=args.dtype, policy=args.policy,
                                    tokenizer=args.tokenizer, overwrite=args.overwrite, dp_rank=args.dp_rank)
        else:
            out = reshard_checkpoint(args.checkpoint, args.out, tp=args.tp or 1, pp=args.pp or 1,
                                     overwrite=args.overwrite, dp_rank=args.dp_rank)
    except (ExportError, CheckpointError) as exc:
        print(f"fwpkm-export: {exc}", file=sys.stderr)
        return 2
    print(f"exported {args.checkpoint} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
