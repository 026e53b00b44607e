"""Placeholders for entry points that later work replaces: each says so and exits with status 2."""
from __future__ import annotations

import sys


def _not_yet(name: str, what: str) -> int:
    print(f"{name}: not implemented yet ({what}); fwpkm-train already evaluates validation perplexity",
          file=sys.stderr)
    return 2


def eval_main(argv: list[str] | None = None) -> int:
    return _not_yet("fwpkm-eval", "streaming perplexity, NIAH and lm-eval arrive with the evaluation work")


def export_main(argv: list[str] | None = None) -> int:
    return _not_yet("fwpkm-export", "export to transformers arrives with the evaluation work")

