"""fwpkm-prep: tokenize a corpus into packed MDS shards (fwpkm_megatron/data/prepare.py), build a
NIAH evaluation set from a prepared corpus (fwpkm_megatron/data/niah.py), or generate and prepare a
synthetic associative-recall corpus (fwpkm_megatron/data/recall.py).

    fwpkm-prep --out data/stdlib --max-mb 8                  # the running Python's stdlib, 8 MB of it
    fwpkm-prep --out data/web --input 'corpus/*.jsonl' --text-field text --tokenizer tokenizer.json \\
               --seq-len 2048 --workers 16 --compression zstd
    fwpkm-prep --out /nvme/web --remote s3://bucket/datasets/web --input 's3://bucket/corpus/*.jsonl.zst' \\
               --tokenizer path/to/hf_tokenizer_dir --eos-token '</s>' --workers 32
    fwpkm-prep niah --data data/web --out eval/niah.jsonl --lengths 4096 8192 --per-length 20
    fwpkm-prep recall --out data/recall --docs 4000 --min-gap 32 --seed 0 --eval-seed 1

Rerunning with the same arguments on a complete prep reuses it (exit 0); a different request needs
--overwrite. A killed prep resumes where it stopped when rerun with the same arguments. Data errors
print one line per problem to stderr (naming the file, line or row, and the rule) and exit 2; finished
work is kept for the rerun.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time

from fwpkm_megatron.benign import silence
from fwpkm_megatron.data import DataError, existing_prep, prepare_corpus


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fwpkm-prep", description=__doc__.split("\n")[0],
                                epilog="fwpkm-prep niah --help: the NIAH generator; "
                                       "fwpkm-prep recall --help: the associative-recall corpus")
    p.add_argument("--out", required=True, help="local directory to write (DataConfig path, or data.local)")
    p.add_argument("--remote", help="also upload the prepared directory here (s3://bucket/prefix, gs://...; "
                                    "DataConfig data.remote)")
    p.add_argument("--input", action="extend", nargs="+", metavar="PATH_OR_GLOB",
                   help="text files, JSONL (.gz/.zst too), Parquet or save_to_disk dirs; local globs or object "
                        "URLs, s3:// globs (default: the Python stdlib)")
    p.add_argument("--format", default="auto", choices=["auto", "text", "jsonl", "parquet", "hf"])
    p.add_argument("--text-field", default="text", help="JSON key / column holding the text")
    p.add_argument("--tokenizer", help="a pretrained tokenizer.json or Hugging Face tokenizer directory "
                                       "(offline) instead of training one")
    p.add_argument("--eos-token", help="the pretrained tokenizer's EOS (default: its tokenizer_config.json, "
                                       "else <|endoftext|>, </s>, <eos>, ...)")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--tokenizer-sample-mb", type=float, default=256.0,
                   help="train text the BPE is trained on, MB (10^6 bytes)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--packing", default="concat", choices=["concat", "window"],
                   help="concat: documents + EOS back to back; window: samples never cross documents")
    p.add_argument("--val-fraction", type=float, default=0.02)
    p.add_argument("--test-fraction", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-mb", type=float, help="cap on source files in MB (10^6 bytes), for quick demos")
    p.add_argument("--dtype", choices=["uint16", "uint32"], help="token dtype (default: by vocab size)")
    p.add_argument("--compression", choices=["zstd", "gz", "bz2", "br", "snappy"], help="shard compression")
    p.add_argument("--workers", type=int, default=1, help="processes for the scan and tokenization")
    p.add_argument("--skip-bad-records", action="store_true",
                   help="skip and count malformed or text-less JSON lines and non-UTF-8 files instead of stopping")
    p.add_argument("--overwrite", action="store_true", help="replace an existing prep at --out")
    return p


def _niah_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fwpkm-prep niah", description="Write a NIAH evaluation set (JSON Lines).")
    p.add_argument("--data", required=True, help="a prepared directory (haystack text and tokenizer)")
    p.add_argument("--out", required=True, help="the .jsonl file to write")
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384, 32768, 65536, 131072],
                   help="context lengths in tokens")
    p.add_argument("--per-length", type=int, default=10)
    p.add_argument("--needles", type=int, default=5, help="needles per record: one target, the rest distractors")
    p.add_argument("--split", default="val", help="haystack split (default: the held-out val)")
    p.add_argument("--seed", type=int, default=0)
    return p


def _recall_parser() -> argparse.ArgumentParser:
    from fwpkm_megatron.data.recall import RecallSpec

    d = RecallSpec()
    p = argparse.ArgumentParser(prog="fwpkm-prep recall", description="Generate and prepare an associative-recall "
                                "corpus: key->value items, filler longer than the attention reach, queries.")
    p.add_argument("--out", required=True, help="the prepared directory to write")
    p.add_argument("--docs", type=int, default=d.docs, help="training documents (train + val split)")
    p.add_argument("--eval-docs", type=int, default=d.eval_docs, help="held-out documents (recall_eval.jsonl)")
    p.add_argument("--seq-len", type=int, default=d.seq_len, help="words = tokens per document (+ EOS)")
    p.add_argument("--keys", type=int, default=d.keys, help="key pool size")
    p.add_argument("--values", type=int, default=d.values, help="value pool size (chance loss ln(values))")
    p.add_argument("--filler", type=int, default=d.filler, help="filler pool size")
    p.add_argument("--pairs", type=int, nargs=2, default=[d.min_pairs, d.max_pairs], metavar=("MIN", "MAX"),
                   help="pairs defined per document")
    p.add_argument("--gap", type=int, nargs=2, default=[d.min_gap, d.max_gap], metavar=("MIN", "MAX"),
                   help="filler words before each query block; MIN above the attention reach")
    p.add_argument("--seed", type=int, default=d.seed, help="training documents")
    p.add_argument("--eval-seed", type=int, default=d.eval_seed, help="held-out documents (must differ)")
    p.add_argument("--val-fraction", type=float, default=d.val_fraction)
    p.add_argument("--overwrite", action="store_true")
    return p


def _recall(argv: list[str]) -> int:
    from fwpkm_megatron.data.recall import RecallSpec, write_recall

    a = _recall_parser().parse_args(argv)
    spec = RecallSpec(docs=a.docs, eval_docs=a.eval_docs, seq_len=a.seq_len, keys=a.keys, values=a.values,
                      filler=a.filler, min_pairs=a.pairs[0], max_pairs=a.pairs[1], min_gap=a.gap[0],
                      max_gap=a.gap[1], seed=a.seed, eval_seed=a.eval_seed, val_fraction=a.val_fraction)
    try:
        manifest = write_recall(a.out, spec, overwrite=a.overwrite, progress=sys.stderr.isatty())
    except DataError as exc:
        for line in str(exc).splitlines():
            print(f"fwpkm-prep recall: error: {line}", file=sys.stderr)
        return 2
    print(f"fwpkm-prep recall: wrote {a.out}\n{_summary(manifest)}")
    return 0


def _summary(manifest: dict) -> str:
    src, splits = manifest["source"], manifest["splits"]
    lines = [f"  source   {src['files']} files, {src['bytes'] / 1e6:.2f} MB ({src['kind']})",
             f"  vocab    {manifest['vocab_size']} ({manifest['dtype']}), eos {manifest['eos_token']}="
             f"{manifest['eos_id']}, seq_len {manifest['seq_len']}"]
    for name, s in splits.items():
        lines.append(f"  {name:<8} {s['documents']} docs, {s['tokens']:,} tokens, {s['samples']:,} samples")
    report = manifest.get("report")
    if report:
        skipped = ", ".join(f"{k} {v}" for k, v in report["skipped"].items() if v) or "none"
        lines.append(f"  skipped  {skipped}")
        lines.append("  seconds  " + ", ".join(f"{k} {v:.1f}" for k, v in report["seconds"].items()))
    if manifest.get("remote"):
        lines.append(f"  remote   {manifest['remote']}")
    return "\n".join(lines)


def _niah(argv: list[str]) -> int:
    from fwpkm_megatron.data.niah import write_niah

    args = _niah_parser().parse_args(argv)
    try:
        n = write_niah(args.data, args.out, lengths=args.lengths, per_length=args.per_length, seed=args.seed,
                       split=args.split, num_needles=args.needles)
    except DataError as exc:
        print(f"fwpkm-prep niah: error: {exc}", file=sys.stderr)
        return 2
    print(f"fwpkm-prep niah: wrote {n} records to {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    silence()  # known-benign library warnings (fwpkm_megatron/benign.py)
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if argv[:1] == ["niah"]:
        return _niah(argv[1:])
    if argv[:1] == ["recall"]:
        return _recall(argv[1:])
    args = _parser().parse_args(argv)
    kwargs = dict(inputs=args.input, tokenizer_path=args.tokenizer, vocab_size=args.vocab_size,
                  seq_len=args.seq_len, val_fraction=args.val_fraction, seed=args.seed,
                  max_bytes=None if args.max_mb is None else int(args.max_mb * 1e6), fmt=args.format,
                  text_field=args.text_field, test_fraction=args.test_fraction, packing=args.packing,
                  compression=args.compression, dtype=args.dtype,
                  tokenizer_sample_bytes=int(args.tokenizer_sample_mb * 1e6), eos_token=args.eos_token,
                  skip_bad_records=args.skip_bad_records, remote=args.remote)
    start = time.perf_counter()
    try:
        manifest = None if args.overwrite else existing_prep(args.out, **kwargs)
        if manifest is not None:
            print(f"fwpkm-prep: reusing {args.out} (complete, same request)\n{_summary(manifest)}")
            return 0
        manifest = prepare_corpus(args.out, overwrite=args.overwrite, progress=sys.stderr.isatty(),
                                  workers=args.workers, **kwargs)
    except DataError as exc:
        for line in str(exc).splitlines():  # one line per problem
            print(f"fwpkm-prep: error: {line}", file=sys.stderr)
        return 2
    print(f"fwpkm-prep: wrote {args.out} in {time.perf_counter() - start:.1f}s\n{_summary(manifest)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
