"""Import `streaming` on stacks whose torchvision binary cannot load.

PyPI ships torchvision only as a CUDA build; with CPU torch its `_C` extension fails to register
`torchvision::nms`/`qnms`, and `import streaming` (which imports `streaming.vision`, hence torchvision)
dies with `RuntimeError: operator torchvision::nms does not exist`. Defining the two op schemas first
lets torchvision's Python side import. The ops still have no kernel; nothing here calls them.
"""
from __future__ import annotations

import types

from fwpkm_megatron._torchvision_cpu import define_missing_schemas


def import_streaming() -> types.ModuleType:
    """Return the `streaming` module, defining the missing torchvision op schemas first if needed.

    Idempotent and harmless where torchvision loads normally (the schemas then already exist); the
    schemas are the ones `make env`'s import hook defines (fwpkm_megatron/_torchvision_cpu.py).
    """
    define_missing_schemas()
    import streaming

    return streaming
