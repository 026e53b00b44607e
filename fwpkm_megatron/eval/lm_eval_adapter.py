"""lm-evaluation-harness model `fwpkm`: an exported FwPKM model with its memory writing as it reads.

    fwpkm-eval lm-eval --model fwpkm --model_args path=DIR[,policy=per_sequence,update_chunk=512,
                       carry_lookahead=False,dtype=fp32] --tasks ... [--device cpu|cuda]
    (`--model hf --model_args pretrained=DIR,trust_remote_code=True` also works on an export.)

`path` may also be a training checkpoint (exported on the fly). lm-eval sorts requests by length and
batches them; under `per_sequence` (the default here) every request starts from the exported memory and
rows of a batch never see each other's writes (padding is not written), so scores do not depend on the
batch size or request order. `persistent` / `frozen` are available when asked for; under `persistent`
results do depend on request order and batching.

The `fwpkm-eval lm-eval` wrapper registers this class and runs lm-eval's own command line (needed
because lm-eval discovers models only from its own registry). Without `--device` it runs on the device
that exists (CUDA when available, else CPU), not lm-eval's `cuda:0` default; an explicit `--device` wins.
"""
from __future__ import annotations

import sys

import torch

from fwpkm_megatron.export.loading import ensure_transformers_importable, load_model

ensure_transformers_importable()

from lm_eval.api.registry import register_model  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402


def _bool(value) -> bool:
    return value if isinstance(value, bool) else str(value).strip().lower() in ("1", "true", "yes", "on")


@register_model("fwpkm")
class FwPKMLM(HFLM):
    """HFLM over an exported FwPKM model, with the test-time memory policy as model_args."""

    def __init__(self, path: str | None = None, pretrained: str | None = None, policy: str = "per_sequence",
                 update_chunk: int | str | None = None, carry_lookahead: bool | str = False, device: str | None = None,
                 dtype: str | None = None, batch_size: int | str = 1, **kwargs):
        path, device = path or pretrained, device or default_device()
        if path is None:
            raise ValueError("model_args: path=<export dir or checkpoint> is required")
        model, tokenizer = load_model(
            path, device=device, dtype=None if dtype in (None, "auto") else dtype, fwpkm_policy=policy,
            fwpkm_update_chunk=None if update_chunk in (None, "", "None") else int(update_chunk),
            fwpkm_carry_lookahead=_bool(carry_lookahead))
        kwargs.pop("trust_remote_code", None)
        super().__init__(pretrained=model, tokenizer=tokenizer, backend="causal", device=device,
                         batch_size=batch_size, **kwargs)


def default_device() -> str:
    """The accelerator when there is one, else the CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def run_cli(argv: list[str]) -> int:
    """lm-eval's command line with the `fwpkm` model registered (`fwpkm-eval lm-eval ARGS`)."""
    from lm_eval.__main__ import cli_evaluate

    runs = not argv or argv[0] == "run" or argv[0].startswith("-")  # not `ls` / `validate`
    if runs and not any(a == "--device" or a.startswith("--device=") for a in argv):
        argv = [*argv, "--device", default_device()]  # lm-eval itself would pick cuda:0
    saved = sys.argv
    sys.argv = ["lm_eval", *argv]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved
    return 0
