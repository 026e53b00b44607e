"""fwpkm-prep: tokenize a corpus into packed train/val shards (see fwpkm_megatron/data/prepare.py).

    fwpkm-prep --out data/stdlib --max-mb 8                  # the running Python's stdlib, 8 MB of it
    fwpkm-prep --out data/mine --input 'corpus/**/*.txt' --vocab-size 8192 --seq-len 512

Rerunning with the same arguments on a complete prep reuses it (exit 0); a different request needs
--overwrite. Data errors print one line to stderr and exit 2.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time

from fwpkm_megatron.data import DataError, existing_prep, prepare_corpus


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fwpkm-prep", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="directory to write (DataConfig path)")
    p.add_argument("--input", action="extend", nargs="+", metavar="PATH_OR_GLOB",
                   help="text files or globs, one document per file (default: the Python stdlib)")
    p.add_argument("--tokenizer", help="use this tokenizer.json (must have an EOS token) instead of training")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--val-fraction", type=float, default=0.02)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-mb", type=float, help="cap on source text in MB (10^6 bytes), for quick demos")
    p.add_argument("--overwrite", action="store_true", help="replace an existing prep at --out")
    return p


def _summary(manifest: dict) -> str:
    src, splits = manifest["source"], manifest["splits"]
    lines = [f"  source   {src['files']} files, {src['bytes'] / 1e6:.2f} MB ({src['kind']})",
             f"  vocab    {manifest['vocab_size']} ({manifest['dtype']}), eos {manifest['eos_token']}="
             f"{manifest['eos_id']}, seq_len {manifest['seq_len']}"]
    for name, s in splits.items():
        lines.append(f"  {name:<8} {s['documents']} docs, {s['tokens']:,} tokens, {s['samples']:,} samples")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    kwargs = dict(inputs=args.input, tokenizer_path=args.tokenizer, vocab_size=args.vocab_size,
                  seq_len=args.seq_len, val_fraction=args.val_fraction, seed=args.seed,
                  max_bytes=None if args.max_mb is None else int(args.max_mb * 1e6))
    start = time.perf_counter()
    try:
        manifest = None if args.overwrite else existing_prep(args.out, **kwargs)
        if manifest is not None:
            print(f"fwpkm-prep: reusing {args.out} (complete, same request)\n{_summary(manifest)}")
            return 0
        manifest = prepare_corpus(args.out, overwrite=args.overwrite, progress=sys.stderr.isatty(), **kwargs)
    except DataError as exc:
        print(f"fwpkm-prep: error: {exc}", file=sys.stderr)
        return 2
    print(f"fwpkm-prep: wrote {args.out} in {time.perf_counter() - start:.1f}s\n{_summary(manifest)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
