"""fwpkm-eval: evaluate an exported model (or a checkpoint) with test-time memorization.

    fwpkm-eval ppl  --model DIR --data DATA_DIR [DATA_DIR ...] [--policies persistent frozen per_sequence]
                    [--split val] [--segment-len L] [--update-chunk C] [--carry-lookahead] [--limit N]
                    [--tensorboard TB_DIR] --out OUT
    fwpkm-eval niah --model DIR (--records niah.jsonl | --data DATA_DIR --lengths 256 512 --per-length 10)
                    [--n-iters 1 2 3 4] [--carry-over] --out OUT
    fwpkm-eval lm-eval --model fwpkm --model_args path=DIR --tasks ...   (lm-eval's own arguments)

Common: --device cpu|cuda, --dtype fp32|bf16, --prefill-block N (long reads in blocks through the KV
cache), --rope-scaling linear:S|yarn:S. A killed run resumes from OUT/<command>.partial.jsonl. Results are printed and written under OUT as JSON and PNG
(ppl.json, ppl_<data>.png, memory_stats.json/png; niah.json, niah.png). See docs/evaluation.md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from fwpkm_megatron.benign import silence


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="export dir, or a checkpoint (step dir, checkpoints/ or run dir)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default=None)
    p.add_argument("--prefill-block", type=int, default=2048,
                   help="read long inputs through the KV cache in blocks of this many tokens (0 = one pass)")
    p.add_argument("--rope-scaling", default=None, metavar="TYPE:FACTOR",
                   help="linear:S or yarn:S for full-attention layers past the training length")
    p.add_argument("--no-progress", action="store_true")


def _load(args):
    from fwpkm_megatron.export import load_model

    overrides = {}
    if args.rope_scaling:
        kind, _, factor = args.rope_scaling.partition(":")
        if kind not in ("linear", "yarn") or not factor:
            raise ValueError(f"--rope-scaling {args.rope_scaling!r}: must be linear:FACTOR or yarn:FACTOR")
        overrides["fwpkm_rope_scaling"] = {"type": kind, "factor": float(factor)}
    return load_model(args.model, device=args.device, dtype=args.dtype, **overrides)


class _Partial:
    """Results written as they come (OUT/<command>.partial.jsonl), so a killed long run resumes."""

    def __init__(self, out: Path, command: str):
        self.path = out / f"{command}.partial.jsonl"

    def load(self) -> dict[str, dict]:
        done = {}
        if self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    break  # a line torn by the kill
                done[row["key"]] = row["value"]
        return done

    def add(self, key: str, value: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"key": key, "value": value}) + "\n")


def _ppl(args) -> dict:
    from fwpkm_megatron.eval import MemoryStats, plot_loss_curves, streaming_perplexity, val_segments
    from fwpkm_megatron.export.runtime import check_data_fits

    model, _ = _load(args)
    partial = _Partial(Path(args.out), "ppl")
    done = partial.load()
    report = {}
    for data in args.data:
        check_data_fits(model.config, data)
        name = Path(data).name
        results = {}
        for i, policy in enumerate(args.policies):
            key = f"{data}|{args.split}|{policy}"
            if key in done:
                results[policy] = done[key]
                print(f"{name} {policy:>12}: resumed from {partial.path}")
                continue
            stats = MemoryStats(model) if i == 0 else None
            results[policy] = streaming_perplexity(
                model, val_segments(data, args.split, limit=args.limit, length=args.segment_len), policy=policy,
                update_chunk=args.update_chunk, carry_lookahead=args.carry_lookahead, progress=not args.no_progress,
                observer=stats, desc=f"{name} {policy}", prefill_block=args.prefill_block)
            results[policy]["split"] = args.split
            partial.add(key, results[policy])
            print(f"{name} {policy:>12}: ppl {results[policy]['ppl']:.3f} (loss {results[policy]['loss']:.4f}, "
                  f"{results[policy]['tokens']:,} tokens)")
            if stats is not None:
                stats.write(Path(args.out) / f"memory_{name}", tensorboard_dir=args.tensorboard)
        plot_loss_curves(results, Path(args.out) / f"ppl_{name}.png", title=f"{name}: loss by position")
        report[name] = results
    return report


def _niah(args) -> dict:
    from fwpkm_megatron.eval import evaluate_niah, generate_records, plot_niah, read_jsonl
    from fwpkm_megatron.export.runtime import check_data_fits

    if not args.records and not args.data:
        raise SystemExit("fwpkm-eval niah: give --records FILE or --data DATA_DIR")
    model, tokenizer = _load(args)
    if args.records:
        records = read_jsonl(args.records)
    else:
        check_data_fits(model.config, args.data)
        records = generate_records(args.data, lengths=args.lengths, per_length=args.per_length, seed=args.seed,
                                   num_needles=args.needles)
    result = evaluate_niah(model, tokenizer, records, n_iters=args.n_iters, carry_over=args.carry_over,
                           progress=not args.no_progress, prefill_block=args.prefill_block or None,
                           partial=Path(args.out) / "niah.partial.jsonl")
    plot_niah(result, Path(args.out) / "niah.png")
    for n, acc in result["accuracy"].items():
        print(f"niah {n}-iter: accuracy {acc:.3f} over {len(records)} records")
    return result


def main(argv: list[str] | None = None) -> int:
    silence()  # known-benign library warnings (fwpkm_megatron/benign.py)
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["lm-eval"]:
        from fwpkm_megatron.eval.lm_eval_adapter import run_cli

        return run_cli(argv[1:])
    parser = argparse.ArgumentParser(prog="fwpkm-eval", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("ppl", help="streaming perplexity")
    _common(p)
    p.add_argument("--data", nargs="+", required=True, help="prepared data dirs (val split)")
    p.add_argument("--policies", nargs="+", default=["persistent", "frozen"],
                   choices=("persistent", "per_sequence", "frozen"))
    p.add_argument("--update-chunk", type=int, default=None, help="write cadence C (default: training chunk)")
    p.add_argument("--carry-lookahead", action="store_true", help="queue the lookahead across chunks/segments")
    p.add_argument("--limit", type=int, default=None, help="at most this many segments per dataset")
    p.add_argument("--split", default="val", help="prepared split to read (val, test, train)")
    p.add_argument("--segment-len", type=int, default=None,
                   help="tokens per segment (default: the prepared samples, the training length)")
    p.add_argument("--tensorboard", default=None, help="also log memory statistics here")
    p = sub.add_parser("niah", help="needle in a haystack")
    _common(p)
    p.add_argument("--records", help="JSONL records {context, prompt, answer} (fwpkm-prep niah)")
    p.add_argument("--data", help="prepared data dir to generate records from")
    p.add_argument("--lengths", type=int, nargs="+", default=[4096])
    p.add_argument("--per-length", type=int, default=10)
    p.add_argument("--needles", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-iters", type=int, nargs="+", default=[1, 2, 3, 4])
    p.add_argument("--carry-over", action="store_true",
                   help="one memory per (length, n), carried from record to record (paper protocol)")
    args = parser.parse_args(argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)

    from fwpkm_megatron.data import DataError
    from fwpkm_megatron.export import ExportError, ExportIntegrityError

    try:
        result = _ppl(args) if args.command == "ppl" else _niah(args)
    except (DataError, ExportError, ExportIntegrityError, ValueError) as exc:
        print(f"fwpkm-eval: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out) / f"{args.command}.json"
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, out)
    (Path(args.out) / f"{args.command}.partial.jsonl").unlink(missing_ok=True)  # complete: nothing to resume
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
