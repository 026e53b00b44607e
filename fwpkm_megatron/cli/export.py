"""fwpkm-export: a training checkpoint -> a self-contained Hugging Face directory.

    fwpkm-export --checkpoint RUN_DIR/checkpoints/step_00000300 --out exports/tiny [--dtype bf16|fp32]
                 [--policy per_sequence|persistent|frozen] [--tokenizer DATA_DIR] [--overwrite] [--tp 1 --pp 1]

`--checkpoint` may also be a run dir or its checkpoints/ root (the latest checkpoint). Loading:
`AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True)`; see docs/evaluation.md.
"""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fwpkm-export", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="step dir, checkpoints/ root or run dir")
    parser.add_argument("--out", required=True, help="export directory to create")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="slow weights (fast: fp32)")
    parser.add_argument("--policy", choices=("per_sequence", "persistent", "frozen"), default="per_sequence",
                        help="default test-time fast-weight policy written to config.json")
    parser.add_argument("--tokenizer", help="prepared data dir or tokenizer.json (default: the run's data.path)")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--tp", type=int, default=1, help="target tensor-parallel size (only 1 for now)")
    parser.add_argument("--pp", type=int, default=1, help="target pipeline-parallel size (only 1 for now)")
    args = parser.parse_args(argv)

    from fwpkm_megatron.export import ExportError, export_checkpoint
    from fwpkm_megatron.training.checkpoint import CheckpointError

    try:
        out = export_checkpoint(args.checkpoint, args.out, dtype=args.dtype, policy=args.policy,
                                tokenizer=args.tokenizer, overwrite=args.overwrite, tp=args.tp, pp=args.pp)
    except (ExportError, CheckpointError) as exc:
        print(f"fwpkm-export: {exc}", file=sys.stderr)
        return 2
    print(f"exported {args.checkpoint} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
