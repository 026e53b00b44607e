"""lm-evaluation-harness model `fwpkm`: an exported FwPKM model with its memory writing as it reads.

    fwpkm-eval lm-eval --model fwpkm --model_args path=DIR[,policy=per_sequence,update_chunk=512,
                       carry_lookahead=False,dtype=fp32] --tasks ... [--device cpu|cuda]
    (`--model hf --model_args pretrained=DIR,trust_remote_code=True` also works on an export.)

`path` may also be a training checkpoint (exported on the fly). lm-eval sorts requests by length and
batches them; under `per_sequence` (the default here) every request starts from the exported memory and
rows of a batch never see each other's writes (padding is not written), so scores do not depend on the
batch size or request order; a `loglikelihood_rolling` request longer than the context is read as its
windows in order with one memory, so later windows read what earlier ones wrote. `persistent` / `frozen`
are available when asked for. Under `persistent` one memory takes every request's writes in lm-eval's
order; HFLM scores loglikelihood batches without an attention mask (right padding), so this adapter runs
`persistent` at batch size 1 and padding is never written (results then do not depend on --batch_size,
only on the request order). `--model hf` has no such guard: use it with per_sequence or frozen.

The `fwpkm-eval lm-eval` wrapper registers this class and runs lm-eval's own command line (needed
because lm-eval discovers models only from its own registry). Without `--device` it runs on the device
that exists (CUDA when available, else CPU), not lm-eval's `cuda:0` default; an explicit `--device` wins.
"""
from __future__ import annotations

import logging
import sys

import torch

from fwpkm_megatron.export.loading import ensure_transformers_importable, load_model

ensure_transformers_importable()

import torch  # noqa: E402
from lm_eval.api.registry import register_model  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402

eval_logger = logging.getLogger(__name__)


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
        self.policy = policy
        if policy == "persistent" and str(batch_size) != "1":
            eval_logger.warning("fwpkm: policy=persistent runs at batch size 1 (padding would be written into "
                                "the shared memory); batch_size=%s ignored", batch_size)
            batch_size = 1
        super().__init__(pretrained=model, tokenizer=tokenizer, backend="causal", device=device,
                         batch_size=batch_size, **kwargs)
        self._memory = None  # set while the windows of one rolling request are read

    def _model_call(self, inps, attn_mask=None, labels=None):
        if self._memory is None:
            return super()._model_call(inps, attn_mask, labels)
        with torch.no_grad():
            return self.model(inps, memory=self._memory, use_cache=False).logits

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        """Under per_sequence, each request's windows share one memory (read in order, batch size 1)."""
        if self.policy != "per_sequence":
            return super().loglikelihood_rolling(requests, disable_tqdm)
        saved, out = self.batch_size_per_gpu, []
        self.batch_size_per_gpu = 1
        try:
            for req in requests:
                self._memory = self.model.new_memory(1, policy="per_sequence")
                out += super().loglikelihood_rolling([req], disable_tqdm=True)
        finally:
            self._memory, self.batch_size_per_gpu = None, saved
        return out


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
