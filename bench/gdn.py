"""One Gated DeltaNet layer: megatron-core's GatedDeltaNet (the training path) against the export's torch form.

    .venv/bin/python bench/gdn.py [--device cuda] [--batch 4] [--seq 4096] [--json OUT]

Builds one GDN mixer at the paper's sizes (hidden 768, 8 + 8 heads of 64, conv 4) through `model/gdn.py`
and the same weights in `export/hf/fwpkm_gdn.py`, then, in fp32 and bf16: max |difference| of the outputs
and of the input gradients (random cotangent), relative to the largest reference value, and the median
forward + backward milliseconds of each. On CUDA megatron runs fla's chunked kernel (and causal-conv1d when
installed: `pip install '.[gpu]'`); on CPU its pure-PyTorch form (parallel/mcore_cpu.py), so the CPU run
checks the harness and the torch forms against each other.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from types import SimpleNamespace

import torch

from fwpkm_megatron.benign import silence

silence()  # before megatron-core is imported: its fallback warnings fire at import
from fwpkm_megatron.config import load_config  # noqa: E402
from fwpkm_megatron.export.hf.fwpkm_gdn import GatedDeltaNet as ExportGDN  # noqa: E402
from fwpkm_megatron.model import transformer_config  # noqa: E402
from fwpkm_megatron.parallel.groups import init_single_process  # noqa: E402

PAPER = ["model.num_layers=1", "model.hidden_size=768", "model.num_attention_heads=12", "model.mixer=gdn",
         "model.gdn_num_key_heads=8", "model.gdn_num_value_heads=8", "model.gdn_key_head_dim=64",
         "model.gdn_value_head_dim=64", "model.gdn_conv_kernel=4"]


def build(device: str):
    """(megatron's GDN mixer, the export's GDN layer with the same weights), both on `device`, fp32."""
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.spec_utils import build_module

    from fwpkm_megatron.model.gdn import gdn_spec

    run = load_config(None, PAPER)
    config = transformer_config(run)
    mega = build_module(gdn_spec(config), config=config, layer_number=1,
                        pg_collection=ProcessGroupCollection.use_mpu_process_groups())
    m = run.model
    export = ExportGDN(SimpleNamespace(hidden_size=m.hidden_size, rms_norm_eps=m.norm_eps, gdn={
        "num_key_heads": m.gdn_num_key_heads, "num_value_heads": m.gdn_num_value_heads,
        "key_head_dim": m.gdn_key_head_dim, "value_head_dim": m.gdn_value_head_dim, "conv_kernel": m.gdn_conv_kernel}))
    export.load_state_dict({k: v for k, v in mega.state_dict().items() if not k.endswith("_extra_state")})
    return mega.to(device), export.to(device)


def run_both(mega, export, x, cot):
    """Outputs and input gradients of both layers for x [b, s, h] (megatron takes [s, b, h])."""
    out = {}
    for name, fn in (("megatron", lambda t: mega(t.transpose(0, 1), None)[0].transpose(0, 1)),
                     ("export", lambda t: export(t, None, None)[0])):
        t = x.detach().clone().requires_grad_(True)
        y = fn(t)
        (y.float() * cot).sum().backward()
        out[name] = (y.detach().float(), t.grad.float())
    return out


def timed(fn, reps: int) -> float:
    times = []
    for _ in range(reps + 2):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # host sync: the kernels' end
        times.append(time.perf_counter() - t0)
    return statistics.median(times[2:]) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    init_single_process(0)
    mega, export = build(args.device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, args.seq, 768, generator=g).to(args.device)
    cot = torch.randn(args.batch, args.seq, 768, generator=g).to(args.device)
    result = {"device": args.device, "batch": args.batch, "seq": args.seq}
    for dtype in (torch.float32, torch.bfloat16):
        mega.to(dtype), export.to(dtype)
        outs = run_both(mega, export, x.to(dtype), cot)
        (y0, g0), (y1, g1) = outs["megatron"], outs["export"]
        name = str(dtype).removeprefix("torch.")
        result[name] = {
            "out_rel_diff": ((y0 - y1).abs().max() / y1.abs().max()).item(),
            "grad_rel_diff": ((g0 - g1).abs().max() / g1.abs().max()).item(),
            "megatron_ms": timed(lambda: _fwd_bwd(lambda t: mega(t.transpose(0, 1), None)[0], x.to(dtype)),
                                 args.reps),
            "export_ms": timed(lambda: _fwd_bwd(lambda t: export(t, None, None)[0], x.to(dtype)), args.reps),
        }
    print(json.dumps(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


def _fwd_bwd(fn, x):
    t = x.detach().clone().requires_grad_(True)
    fn(t).float().sum().backward()


if __name__ == "__main__":
    main()
