"""Let a CUDA torchvision wheel import beside a CPU torch (installed into site-packages by `make env`).

PyPI ships torchvision only as a CUDA build. With CPU torch its C++ extension cannot register the
`torchvision::nms` / `qnms` operators, so `import torchvision` fails, and with it
`from transformers import AutoModelForCausalLM` (transformers imports torchvision when it is installed)
and `import streaming`. The Makefile copies this file to site-packages as `fwpkm_torchvision_cpu.py`
with a `fwpkm_torchvision_cpu.pth` that imports it at start-up. It only registers an import hook
(no torch import at start-up); the first `import torchvision` then defines the two operator schemas,
and only when torch is a CPU build and torchvision a CUDA one. The operators still have no kernel:
nothing in this project calls them. Standalone: imports only the standard library (and torch, lazily).
"""
from __future__ import annotations

import importlib.util
import re
import sys

_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_library = None  # must stay referenced, or the schemas are dropped


def _torchvision_is_cuda_build() -> bool:
    for finder in sys.meta_path:
        if isinstance(finder, _Hook):
            continue
        spec = finder.find_spec("torchvision", None) if hasattr(finder, "find_spec") else None
        if spec is not None and spec.submodule_search_locations:
            for root in spec.submodule_search_locations:
                try:
                    text = open(f"{root}/version.py").read()
                except OSError:
                    continue
                match = re.search(r"^__version__\s*=\s*['\"]([^'\"]+)['\"]", text, re.M)
                return bool(match) and "+cu" in match.group(1)
            return False
    return False


def define_missing_schemas() -> None:
    global _library
    import torch

    if torch.version.cuda is not None or not _torchvision_is_cuda_build():
        return  # matching builds: torchvision's own extension registers the operators
    for name, schema in _SCHEMAS.items():
        try:
            getattr(torch.ops.torchvision, name)
        except (AttributeError, RuntimeError):
            if _library is None:
                _library = torch.library.Library("torchvision", "FRAGMENT")
            _library.define(schema)


class _Hook:
    """Runs `define_missing_schemas` once, just before torchvision is first imported."""

    def find_spec(self, name, path=None, target=None):
        if name == "torchvision":
            sys.meta_path.remove(self)
            try:
                define_missing_schemas()
            except Exception as exc:  # never break an import because of this hook
                print(f"fwpkm_torchvision_cpu: {exc}", file=sys.stderr)
        return None


if importlib.util.find_spec("torchvision") is not None and not any(isinstance(f, _Hook) for f in sys.meta_path):
    sys.meta_path.insert(0, _Hook())
