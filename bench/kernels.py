"""Memory-op benchmark: reference vs Triton for each op, on whatever device is present.

    python bench/kernels.py                      # time every op (paper size on a GPU, tiny on CPU)
    python bench/kernels.py --check              # also compare Triton with the reference (fp32, and bf16 inputs)
    python bench/kernels.py --bytes              # only print the HBM byte model per token (docs/kernels.md)

On a GPU each row gives the median time (CUDA events), the achieved bandwidth from the byte model
(`bytes_per_token`, minimum HBM traffic) and that as a fraction of the device's measured copy bandwidth.
On a CPU the Triton kernels run under the interpreter (TRITON_INTERPRET=1, set here before triton is
imported): those times say nothing about GPU performance, only that the path runs.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported anywhere
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fwpkm_megatron.ops import reference  # noqa: E402
from fwpkm_megatron.ops import triton as kernels  # noqa: E402
from fwpkm_megatron.ops.triton import address, read, write  # noqa: E402


@dataclass(frozen=True)
class Shape:
    B: int        # sequences
    T: int        # tokens per sequence (the scan)
    C: int        # chunk: single-chunk ops run on B * C tokens
    H: int
    R: int        # sub-keys per codebook, N = R^2
    d_k: int
    d_v: int
    k: int


PRESETS = {
    "paper": Shape(B=8, T=4096, C=512, H=1, R=512, d_k=512, d_v=512, k=8),  # method 4.1: N = 512^2
    "small": Shape(B=2, T=48, C=16, H=1, R=16, d_k=16, d_v=32, k=4),        # interpreter-sized
}


# ------------------------------------------------------------------------------------------ byte model


def bytes_per_token(s: Shape, elem: int = 4, unique: float = 1.0) -> dict[str, float]:
    """Minimum HBM bytes per token of each op (fp32 ids/weights; table rows `elem` bytes).

    Counting rules: table and row-store rows are counted per access (the 512 MiB table never fits in
    L2); a chunk's token-side rows (q, v_hat, targets, dout: B*C*d_v*4 = 8 MiB at the paper size) are
    counted once per token, as they stay L2-resident across their H*k re-reads; sub-key codebooks
    (1 MiB) are counted once per launch (negligible). `unique` = distinct rows / (H*k) per token in a
    chunk (1.0 is the worst case; about 0.94 at the paper size). Sorting E int64 keys ~ 16 E bytes per
    pass, about 8 passes.
    """
    E, D, dk = s.H * s.k, s.d_v, s.d_k
    row, grow = D * elem, D * 4              # a table row; a gradient row (fp32)
    sort = 8 * 16 * E + 32 * E                # sort + unique_consecutive + inverse
    U = unique * E
    m = {}
    m["address fwd"] = 4 * dk + 36 * E                               # q; idx, w, top ids, top scores
    m["read fwd"] = 24 * E + E * row + 4 * D                         # ptr lookup + ids/w; rows; out
    m["key step fwd"] = 8 * dk + 136 * E                             # q twice; [2, M, H, k] torch tensors
    m["write fwd"] = sort + 12 * E + 8 * D + 2 * U * row + 24 * U    # sort; perm/coef; v_hat+target; old+new rows
    m["snapshot fwd"] = sort + 2 * U * row                           # base rows read, kept for the backward
    m["token bwd"] = 36 * E + E * (row + grow) + 16 * D + 24 * D     # ids; rows + G rows; dout, v_hat, target, dres
    m["identity bwd"] = 3 * U * grow                                 # G -> the version each write replaced
    m["read scatter bwd"] = sort + 24 * E + 12 * E + 2 * U * grow    # dst keys; perm/w; RMW of each dest row
    m["address bwd"] = 16 * dk + 190 * E
    m["key step hvp bwd"] = 16 * dk + 350 * E
    m["dq accumulate bwd"] = 16 * dk
    m["forward total"] = sum(v for n, v in m.items() if n.endswith("fwd"))
    m["backward total"] = sum(v for n, v in m.items() if n.endswith("bwd"))
    m["train step total"] = m["forward total"] + m["backward total"]
    return m


def print_byte_model(s: Shape) -> None:
    m = bytes_per_token(s)
    tokens = s.B * s.T
    print(f"HBM bytes per token, one FwPKM layer (N={s.R}^2, d_v={s.d_v}, d_k={s.d_k}, H={s.H}, k={s.k}, fp32):")
    for name, b in m.items():
        print(f"  {name:<20} {b / 1024:8.1f} KiB")
    for dev, bw in (("H100 SXM (3.35 TB/s)", 3.35e12), ("H200 (4.8 TB/s)", 4.8e12)):
        t = m["train step total"] * tokens / bw
        print(f"  {dev}: {tokens} tokens -> {1e3 * t:.2f} ms at 100% of HBM bandwidth, "
              f"{1e3 * t / 0.6:.2f} ms at 60%")


# ------------------------------------------------------------------------------------------- timing


def timeit(fn, reps: int) -> float:
    """Median seconds of `fn()` (CUDA events on a GPU)."""
    fn()  # warm up / compile
    times = []
    for _ in range(reps):
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def copy_bandwidth(dev) -> float:
    """Bytes/s of a device-to-device copy of 1 GiB (read + write counted)."""
    x = torch.empty(2**28, dtype=torch.float32, device=dev)
    y = torch.empty_like(x)
    t = timeit(lambda: y.copy_(x), 10)
    return 2 * x.numel() * 4 / t


def make(s: Shape, dev, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(s.B, s.T, s.H, s.d_k, generator=gen)
    q = q / q.norm(dim=-1, keepdim=True) * s.d_k ** 0.5 * 0.5          # normed queries, as the layer's RMSNorm
    v = torch.randn(s.B, s.T, s.d_v, generator=gen)
    g = torch.rand(s.B, s.T, generator=gen)
    keys = torch.randn(s.H, 2, s.R, s.d_k // 2, generator=gen) * 0.5
    values = torch.randn(s.R * s.R, s.d_v, generator=gen) * s.d_v ** -0.5
    return [t.to(dev) for t in (q, v, g, keys, values)]


def ops_for(s: Shape, dev):
    """(name, byte-model key(s), reference fn, triton fn, tokens) for each op."""
    q, v, g, keys, values = make(s, dev)
    M = s.B * s.C
    qc = q[:, :s.C].reshape(M, s.H, s.d_k).contiguous()
    a = reference.pkm_address(qc, keys, topk=s.k)
    idx, w = a.idx, a.weight
    vh = reference.pkm_read(values, idx, w)
    tgt = torch.roll(v[:, :s.C], -1, 1).contiguous()
    has = torch.ones(s.B, s.C, dtype=torch.bool, device=dev)
    has[:, -1] = False
    idx4, w4 = idx.view(s.B, s.C, s.H, s.k), w.view(s.B, s.C, s.H, s.k)
    vh3, gate = vh.view(s.B, s.C, -1), g[:, :s.C]

    def grad_of(out_fn, inputs):
        def run():
            ins = [t.detach().requires_grad_() for t in inputs]
            out = out_fn(*ins)
            out = out[1] if isinstance(out, tuple) else out
            torch.autograd.grad(out, ins, torch.ones_like(out))
        return run

    def scan_fb(fn):
        def run():
            ins = [t.detach().requires_grad_() for t in (q, v, g)] + [keys, values]
            out = fn(*ins, top_k=s.k, chunk_size=s.C)
            torch.autograd.grad(out[0], ins[:3], torch.ones_like(out[0]))
        return run

    def scan_f(fn):
        def run():
            with torch.no_grad():
                fn(q, v, g, keys, values, top_k=s.k, chunk_size=s.C)
        return run

    return [
        ("address fwd", ["address fwd"], lambda: reference.pkm_address(qc, keys, topk=s.k),
         lambda: address.address_fwd(qc, keys, s.k), M),
        ("address fwd+bwd", ["address fwd", "address bwd"],
         grad_of(lambda x, K: reference.pkm_address(x, K, topk=s.k).weight, [qc, keys]),
         grad_of(lambda x, K: kernels.pkm_address(x, K, topk=s.k).weight, [qc, keys]), M),
        ("read fwd", ["read fwd"], lambda: reference.pkm_read(values, idx, w),
         lambda: read.pkm_read(values, idx, w), M),
        ("read fwd+bwd", ["read fwd", "token bwd", "read scatter bwd"],
         grad_of(lambda V, W: reference.pkm_read(V, idx, W), [values, w]),
         grad_of(lambda V, W: read.pkm_read(V, idx, W), [values, w]), M),
        ("write fwd", ["write fwd"], lambda: reference.value_write(idx4, w4, vh3, tgt, gate, has),
         lambda: write.value_write(idx4, w4, vh3, tgt, gate, has), M),
        ("write fwd+bwd", ["write fwd", "token bwd"],
         grad_of(lambda W, X, Y, G: reference.value_write(idx4, W, X, Y, G, has), [w4, vh3, tgt, gate]),
         grad_of(lambda W, X, Y, G: write.value_write(idx4, W, X, Y, G, has), [w4, vh3, tgt, gate]), M),
        ("scan fwd (no_grad)", ["forward total"], scan_f(reference.fwpkm_scan), scan_f(kernels.fwpkm_scan),
         s.B * s.T),
        ("scan fwd+bwd", ["train step total"], scan_fb(reference.fwpkm_scan), scan_fb(kernels.fwpkm_scan), s.B * s.T),
    ]


def bench(s: Shape, dev, reps: int, skip_reference: bool) -> None:
    model = bytes_per_token(s)
    bw = copy_bandwidth(dev) if dev.type == "cuda" else None
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU (Triton interpreter)"
    print(f"device: {name}" + (f", measured copy bandwidth {bw / 1e9:.0f} GB/s" if bw else ""))
    print(f"shape: {s}")
    print(f"{'op':<20}{'tokens':>8}{'reference ms':>14}{'triton ms':>11}{'speedup':>9}{'KiB/token':>11}"
          f"{'GB/s':>8}{'% copy':>8}")
    for op, keys_, ref_fn, tri_fn, tokens in ops_for(s, dev):
        ref_t = float("nan") if skip_reference else timeit(ref_fn, reps)
        tri_t = timeit(tri_fn, reps)
        per_tok = sum(model[k] for k in keys_)
        gbs = per_tok * tokens / tri_t / 1e9
        rate = f"{gbs:>8.0f}{100 * gbs * 1e9 / bw:>7.0f}%" if bw else f"{'-':>8}{'-':>8}"
        print(f"{op:<20}{tokens:>8}{1e3 * ref_t:>14.2f}{1e3 * tri_t:>11.2f}{ref_t / tri_t:>9.1f}"
              f"{per_tok / 1024:>11.1f}{rate}")
    if dev.type != "cuda":
        print("(CPU: Triton runs in the interpreter, and its numpy threads contend with torch's on few cores;\n"
              " these times only show that every path runs.)")


# -------------------------------------------------------------------------------------------- check


def _err(ref, tri) -> float:
    ref, tri = ref.double(), tri.double()
    return ((ref - tri).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def check(s: Shape, dev) -> bool:
    """Triton vs reference at this shape; prints one line per comparison and returns overall success."""
    ok = True

    def report(name, value, limit, kind="max err / max |ref|"):
        nonlocal ok
        good = value <= limit if kind != "agreement" else value >= limit
        ok &= good
        print(f"  {'ok  ' if good else 'FAIL'} {name:<34} {kind} {value:.2e} (limit {limit:.0e})")

    q, v, g, keys, values = make(s, dev)
    M = s.B * s.C
    qc = q[:, :s.C].reshape(M, s.H, s.d_k).contiguous()
    print(f"check at {s} on {dev}")
    for dtype in (torch.float32, torch.bfloat16):
        tag = "fp32" if dtype == torch.float32 else "bf16"
        x, K = qc.to(dtype).requires_grad_(), keys.to(dtype).requires_grad_()
        ref = reference.pkm_address(x.float() if dtype != torch.float32 else x,
                                    K.float() if dtype != torch.float32 else K, topk=s.k)
        tri = kernels.pkm_address(x, K, topk=s.k)
        same = (ref.idx == tri.idx).all(-1).all(-1)
        report(f"address idx [{tag} inputs]", same.float().mean().item(), 0.999 if tag == "fp32" else 0.99,
               "agreement")
        report(f"address weight [{tag}]", _err(ref.weight[same], tri.weight[same].float()),
               1e-5 if tag == "fp32" else 1e-2)
        V = values.to(dtype)
        rref = reference.pkm_read(V.float(), ref.idx, ref.weight.detach())
        rtri = read.pkm_read(V, ref.idx, ref.weight.detach())
        report(f"read out [{tag} table]", _err(rref, rtri), 1e-5)  # fp32 accumulation either way
    # write and scan: the FwPKM state is fp32 by design (docs/method.md), so fp32 only
    a = reference.pkm_address(qc, keys, topk=s.k)
    idx4, w4 = a.idx.view(s.B, s.C, s.H, s.k), a.weight.view(s.B, s.C, s.H, s.k).requires_grad_()
    vh = reference.pkm_read(values, a.idx, a.weight.detach()).view(s.B, s.C, -1).requires_grad_()
    tgt = torch.roll(v[:, :s.C], -1, 1).contiguous().requires_grad_()
    gate = g[:, :s.C].clone().requires_grad_()
    has = torch.ones(s.B, s.C, dtype=torch.bool, device=dev)
    has[:, -1] = False
    wr, wt = reference.value_write(idx4, w4, vh, tgt, gate, has), write.value_write(idx4, w4, vh, tgt, gate, has)
    report("write rows equal", float(torch.equal(wr[0], wt[0])), 1.0, "agreement")
    report("write delta [fp32]", _err(wr[1], wt[1]), 1e-5)
    cot = torch.randn_like(wr[1])
    for name, ga, gb in zip(("dweight", "dv_hat", "dtarget", "dgate"),
                            torch.autograd.grad(wr[1], (w4, vh, tgt, gate), cot),
                            torch.autograd.grad(wt[1], (w4, vh, tgt, gate), cot)):
        report(f"write {name} [fp32]", _err(ga, gb), 1e-5)
    ins = [t.clone().requires_grad_() for t in (q, v, g, keys)] + [values]
    outs = {}
    for label, fn in (("reference", reference.fwpkm_scan_rows), ("triton", kernels.fwpkm_scan_rows)):
        res = fn(*ins, top_k=s.k, chunk_size=s.C)
        grads = torch.autograd.grad(res.v_hat, ins[:4], torch.ones_like(res.v_hat))
        outs[label] = (res, grads)
    (r, rg), (t, tg) = outs["reference"], outs["triton"]
    # a near-tie in one chunk's top-k can flip a selection and change later chunks: report agreement first
    same_idx = (r.idx == t.idx).all(-1).all(-1)
    report("scan idx [fp32]", same_idx.float().mean().item(), 0.999, "agreement")
    if bool(same_idx.all()):
        report("scan v_hat [fp32]", _err(r.v_hat, t.v_hat), 1e-4)
        report("scan keys [fp32]", _err(r.keys, t.keys), 1e-4)
        report("scan row_values [fp32]", _err(r.row_values, t.row_values), 1e-4)
        for name, ga, gb in zip(("dq", "dv", "dg", "dkeys"), rg, tg):
            report(f"scan {name} [fp32]", _err(ga, gb), 1e-4)  # 8 chunks of fp32 round-off
    return ok


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=PRESETS, default=None, help="paper on a GPU, small on CPU by default")
    p.add_argument("--T", type=int, help="override tokens per sequence")
    p.add_argument("--B", type=int, help="override sequences")
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--check", action="store_true", help="compare Triton with the reference first")
    p.add_argument("--bytes", action="store_true", help="print the byte model only")
    p.add_argument("--skip-reference", action="store_true", help="time the Triton ops only")
    args = p.parse_args(argv)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    s = PRESETS[args.preset or ("paper" if dev.type == "cuda" else "small")]
    s = replace(s, **{k: getattr(args, k) for k in ("T", "B") if getattr(args, k)})
    if args.bytes:
        print_byte_model(s)
        return 0
    ok = check(s, dev) if args.check else True
    bench(s, dev, args.reps or (20 if dev.type == "cuda" else 1), args.skip_reference)
    print_byte_model(s)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
