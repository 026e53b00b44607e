"""Placeholders for entry points that later work replaces: each says so and exits with status 2."""
from __future__ import annotations

import sys


def _not_yet(name: str) -> int:
    print(f"{name}: not implemented yet (see the open issue for {name})", file=sys.stderr)
    return 2


def eval_main(argv: list[str] | None = None) -> int:
    return _not_yet("fwpkm-eval")


def export_main(argv: list[str] | None = None) -> int:
    return _not_yet("fwpkm-export")


def launch_main(argv: list[str] | None = None) -> int:
    return _not_yet("fwpkm-launch")
