"""Build the NIAH evaluation set from the demo corpus: data/stdlib's val split -> eval/niah.jsonl.

    python data_prep/make_niah.py [extra `fwpkm-prep niah` flags, e.g. --lengths 4096 8192 --per-length 5]

Same as `fwpkm-prep niah --data data/stdlib --out eval/niah.jsonl`; later flags override these defaults.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from fwpkm_megatron.cli.prep import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["niah", "--data", "data/stdlib", "--out", "eval/niah.jsonl", *sys.argv[1:]]))
