"""fwpkm-eval: evaluate an exported model (or a checkpoint) with test-time memorization.

    fwpkm-eval ppl  --model DIR --data DATA_DIR [DATA_DIR ...] [--policies persistent frozen per_sequence]
                    [--update-chunk C] [--carry-lookahead] [--limit N] [--tensorboard TB_DIR] --out OUT
    fwpkm-eval niah --model DIR (--records niah.jsonl | --data DATA_DIR --lengths 256 512 --per-length 10)
                    [--n-iters 1 2 3 4] [--carry-over] --out OUT
    fwpkm-eval lm-eval --model fwpkm --model_args path=DIR --tasks ...   (lm-eval's own arguments)

Common: --device cpu|cuda, --dtype fp32|bf16. Results are printed and written under OUT as JSON and PNG
(ppl.json, ppl_<data>.png, memory_stats.json/png; niah.json, niah.png). See docs/evaluation.md.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fwpkm_megatron.benign import silence


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="export dir, or a checkpoint (step dir, checkpoints/ or run dir)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default=None)
    p.add_argument("--no-progress", action="store_true")


def _ppl(args) -> dict:
    from fwpkm_megatron.eval import MemoryStats, plot_loss_curves, streaming_perplexity, val_segments
    from fwpkm_megatron.export import load_model

    model, _ = load_model(args.model, device=args.device, dtype=args.dtype)
    report = {}
    for data in args.data:
        name = Path(data).name
        results = {}
        for i, policy in enumerate(args.policies):
            stats = MemoryStats(model) if i == 0 else None
            results[policy] = streaming_perplexity(
                model, val_segments(data, limit=args.limit), policy=policy, update_chunk=args.update_chunk,
                carry_lookahead=args.carry_lookahead, progress=not args.no_progress, observer=stats,
                desc=f"{name} {policy}")
            print(f"{name} {policy:>12}: ppl {results[policy]['ppl']:.3f} (loss {results[policy]['loss']:.4f}, "
                  f"{results[policy]['tokens']:,} tokens)")
            if stats is not None:
                stats.write(Path(args.out) / f"memory_{name}", tensorboard_dir=args.tensorboard)
        plot_loss_curves(results, Path(args.out) / f"ppl_{name}.png", title=f"{name}: loss by position")
        report[name] = results
    return report


def _niah(args) -> dict:
    from fwpkm_megatron.eval import evaluate_niah, generate_records, plot_niah, read_jsonl
    from fwpkm_megatron.export import load_model

    if args.records:
        records = read_jsonl(args.records)
    elif args.data:
        records = generate_records(args.data, lengths=args.lengths, per_length=args.per_length, seed=args.seed,
                                   num_needles=args.needles)
    else:
        raise SystemExit("fwpkm-eval niah: give --records FILE or --data DATA_DIR")
    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype)
    result = evaluate_niah(model, tokenizer, records, n_iters=args.n_iters, carry_over=args.carry_over,
                           progress=not args.no_progress)
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
    p.add_argument("--carry-over", action="store_true", help="no memory reset between records (paper protocol)")
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
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
