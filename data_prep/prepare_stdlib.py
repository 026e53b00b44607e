"""Prepare the default demo corpus: 8 MB of the running Python's stdlib into data/stdlib.

    python data_prep/prepare_stdlib.py [extra fwpkm-prep flags, e.g. --max-mb 2 --overwrite]

Same as `fwpkm-prep --out data/stdlib --max-mb 8`; later flags override these defaults.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from fwpkm_megatron.cli.prep import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["--out", "data/stdlib", "--max-mb", "8", *sys.argv[1:]]))
