"""Import `streaming` on stacks whose torchvision binary cannot load.

PyPI ships torchvision only as a CUDA build; with CPU torch its `_C` extension fails to register
`torchvision::nms`/`qnms`, and `import streaming` (which imports `streaming.vision`, hence torchvision)
dies with `RuntimeError: operator torchvision::nms does not exist`. Defining the two op schemas first
lets torchvision's Python side import. The ops still have no kernel; nothing here calls them.
"""
from __future__ import annotations

import types

import torch

_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_library: torch.library.Library | None = None  # must stay referenced, or the schemas are dropped


def import_streaming() -> types.ModuleType:
    """Return the `streaming` module, defining the missing torchvision op schemas first if needed.

    Idempotent and harmless where torchvision loads normally (the schemas then already exist).
    """
    global _library
    for name, schema in _SCHEMAS.items():
        try:
            getattr(torch.ops.torchvision, name)
        except (AttributeError, RuntimeError):
            if _library is None:
                _library = torch.library.Library("torchvision", "FRAGMENT")
            _library.define(schema)
    import streaming

    return streaming
