"""The Triton scan equals the reference scan, forward and backward through >= 3 chunks, for every option.

Every case checks v_hat, keys and the new table, and the gradients to q, v, g, keys and values from
random cotangents on all three outputs (so the paths through the writes and the key steps of earlier
chunks are covered). T is never a multiple of C. A new scan option gets a case in CASES.
Below: the rows form, no_grad, bitwise reproducibility, the dispatcher, the layers on the kernels, and
(without a GPU) a compile of every kernel for sm_90a, which the interpreter never does.
Tolerance: 1e-5 of the largest reference magnitude (fp32 round-off compounds over 3 chunks of writes;
observed <= 3e-6).
"""
import dataclasses
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from fwpkm_megatron import ops
from fwpkm_megatron.config import FwPKMConfig, PKMConfig
from fwpkm_megatron.ops.testing import random_scan_inputs
from fwpkm_megatron.memory import PKMMLP, FwPKMBlock
from fwpkm_megatron.ops import reference
from fwpkm_megatron.ops.triton import scan

RATIO = 1e-5
REPO = Path(__file__).resolve().parents[2]

CASES = {  # B, T, H, R, d_k, d_v, scan options
    "B2-T11-C4-H1-R5-k3-idw": (2, 11, 1, 5, 6, 4, dict(top_k=3, chunk_size=4)),
    "B2-T10-C3-H2-R6-k3-dot": (2, 10, 2, 6, 8, 5, dict(top_k=3, chunk_size=3, score="dot")),
    "B1-T9-C4-H4-R9-k8-idw": (1, 9, 4, 9, 4, 6, dict(top_k=8, chunk_size=4)),
    "B2-T10-C3-H2-R5-k2-noaddr": (2, 10, 2, 5, 6, 4, dict(top_k=2, chunk_size=3, addr_loss=False)),
    "B3-T8-C3-H1-R5-k1-lahd0": (3, 8, 1, 5, 6, 4, dict(top_k=1, chunk_size=3, lookahead=0)),
    "B2-T9-C4-H1-R5-k2-detach": (2, 9, 1, 5, 6, 4, dict(top_k=2, chunk_size=4, detach_writes=True)),
    "B3-T9-C4-H2-R5-k2-perseq": (3, 9, 2, 5, 6, 4, dict(top_k=2, chunk_size=4, per_sequence=True)),
}


def make_inputs(B, T, H, R, d_k, d_v, device, seed=0):
    return [t.to(device).requires_grad_() for t in random_scan_inputs(B, T, H, R, d_k, d_v, seed=seed)]


def grads(outs, cots, inputs):
    pairs = [(o, c) for o, c in zip(outs, cots) if o.requires_grad]
    return torch.autograd.grad([o for o, _ in pairs], inputs, [c for _, c in pairs], allow_unused=True)


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_triton_scan_matches_reference(case, device, assert_close):
    *shape, options = case
    inputs = make_inputs(*shape, device)
    kw = dict(options, value_lr=0.7, key_lr=0.9)
    ref = reference.fwpkm_scan(*inputs, **kw)
    tri = scan.fwpkm_scan(*inputs, **kw)
    for name, a, b in zip(("v_hat", "keys", "values"), ref, tri):
        assert a.requires_grad == b.requires_grad, name
        assert_close(name, a, b, RATIO)
    gen = torch.Generator().manual_seed(1)
    cots = [torch.randn(o.shape, generator=gen).to(device) for o in ref]
    for name, a, b in zip(("dq", "dv", "dg", "dkeys", "dvalues"), grads(ref, cots, inputs), grads(tri, cots, inputs)):
        assert (a is None) == (b is None), name
        if a is not None:
            assert_close(name, a, b, RATIO)


def test_triton_scan_rows_match_reference(device, assert_close):
    inputs = [t.detach() for t in make_inputs(2, 12, 1, 6, 6, 5, device)]
    ref = reference.fwpkm_scan_rows(*inputs, top_k=3, chunk_size=5)
    tri = scan.fwpkm_scan_rows(*inputs, top_k=3, chunk_size=5)
    assert torch.equal(tri.rows, ref.rows) and torch.equal(tri.idx, ref.idx)
    assert_close("row_values", ref.row_values, tri.row_values, RATIO)


@pytest.mark.parametrize("per_sequence", [False, True], ids=["shared", "perseq"])
def test_triton_scan_diagnostics_match_reference(per_sequence, device, assert_close):
    """ScanResult.diagnostics (addr_loss, fw_mse) agree, and the scan still differentiates with them on."""
    inputs = make_inputs(2, 11, 2, 5, 6, 4, device)
    kw = dict(top_k=2, chunk_size=4, per_sequence=per_sequence, diagnostics=True)
    ref, tri = reference.fwpkm_scan_rows(*inputs, **kw), scan.fwpkm_scan_rows(*inputs, **kw)
    assert set(ref.diagnostics) == set(tri.diagnostics) == {"addr_loss", "fw_mse"}
    for name in ref.diagnostics:
        assert not tri.diagnostics[name].requires_grad
        assert_close(name, ref.diagnostics[name], tri.diagnostics[name], RATIO)
    assert_close("dq", *(torch.autograd.grad(r.v_hat.sum(), inputs[0])[0] for r in (ref, tri)), RATIO)
    assert scan.fwpkm_scan_rows(*inputs, top_k=2, chunk_size=4).diagnostics is None


def test_triton_scan_under_no_grad_matches_and_builds_no_graph(device, assert_close):
    inputs = make_inputs(2, 10, 2, 5, 6, 4, device)
    ref = reference.fwpkm_scan(*inputs, top_k=2, chunk_size=4)
    with torch.no_grad():
        tri = scan.fwpkm_scan(*inputs, top_k=2, chunk_size=4)
    for name, a, b in zip(("v_hat", "keys", "values"), ref, tri):
        assert not b.requires_grad
        assert_close(name, a, b, RATIO)


def test_triton_scan_is_bitwise_reproducible(device):
    """Forward and backward give the same bits twice: no float atomics anywhere in the scan."""
    inputs = make_inputs(3, 11, 2, 4, 6, 5, device)  # R=4: 16 slots, many reads per row
    cots = None
    results = []
    for _ in range(2):
        out = scan.fwpkm_scan(*inputs, top_k=3, chunk_size=4)
        cots = cots or [torch.randn(o.shape, generator=torch.Generator().manual_seed(1)).to(device) for o in out]
        results.append((*out, *grads(out, cots, inputs)))
    for a, b in zip(*results):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------- dispatch


def test_auto_backend_is_reference_on_cpu_and_triton_on_cuda():
    assert ops.resolve_backend("auto", torch.device("cpu")) == "reference"
    assert ops.resolve_backend("auto", torch.device("cuda")) == "triton"


def test_env_forces_either_backend(monkeypatch, device):
    inputs = [t.detach() for t in make_inputs(2, 9, 1, 5, 6, 4, device)]
    kw = dict(top_k=2, chunk_size=4)
    ref, tri = reference.fwpkm_scan(*inputs, **kw), scan.fwpkm_scan(*inputs, **kw)
    monkeypatch.setenv("FWPKM_BACKEND", "reference")
    for a, b in zip(ops.fwpkm_scan(*inputs, backend="triton", **kw), ref):
        assert torch.equal(a, b)
    monkeypatch.setenv("FWPKM_BACKEND", "triton")
    for a, b in zip(ops.fwpkm_scan(*inputs, backend="reference", **kw), tri):
        assert torch.equal(a, b)


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(NotImplementedError, match="TRITON_INTERPRET"):
        ops.resolve_backend("triton", torch.device("cpu"))


# ----------------------------------------------------------------------------------- layers on kernels

MEGATRON_CFG = types.SimpleNamespace(hidden_size=16, init_method_std=0.2, layernorm_epsilon=1e-5)


def _layer_grads(module, x):
    out = module(x)
    out = out[0] if isinstance(out, tuple) else out
    cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to(out.device)
    params = [p for p in module.parameters() if p.requires_grad]
    return out, torch.autograd.grad(out, [x, *params], cot)


def test_fwpkm_block_on_triton_matches_reference(device, assert_close):
    """Two forwards (the state carries, and each commits its writes in place before the backward)."""
    cfg = FwPKMConfig(num_slots=36, d_k=8, d_v=12, topk=2, chunk_size=4)
    blocks = {}
    for backend in ("reference", "triton"):
        torch.manual_seed(0)
        blocks[backend] = FwPKMBlock(MEGATRON_CFG, dataclasses.replace(cfg, backend=backend), layer_id=1).to(device)
    x = torch.randn(11, 2, 16, generator=torch.Generator().manual_seed(1)).to(device).requires_grad_()
    for step in range(2):
        (ref_out, ref_g), (tri_out, tri_g) = (_layer_grads(blocks[b], x) for b in ("reference", "triton"))
        assert_close(f"out{step}", ref_out, tri_out, RATIO)
        # A gradient that nearly cancels (the gate bias's at step 1: 0.078, summed from terms of up to ~10) carries
        # the round-off of its terms, not of its sum: it is judged against 1 % of the step's largest gradient.
        floor = 0.01 * max(float(a.abs().max()) for a in ref_g)
        for i, (a, b) in enumerate(zip(ref_g, tri_g)):
            assert_close(f"grad{step}.{i}", a, b, RATIO * max(1.0, floor / max(float(a.abs().max()), 1e-30)))
        for name in ("keys", "values"):
            assert_close(name, getattr(blocks["reference"].state, name), getattr(blocks["triton"].state, name), RATIO)


def test_static_pkm_on_triton_matches_reference(monkeypatch, device, assert_close):
    cfg = PKMConfig(num_slots=49, d_k=8, d_v=12, heads=2, topk=3)
    torch.manual_seed(0)
    layer = PKMMLP(MEGATRON_CFG, cfg).to(device)
    x = torch.randn(7, 2, 16, generator=torch.Generator().manual_seed(1)).to(device).requires_grad_()
    monkeypatch.setenv("FWPKM_BACKEND", "reference")
    ref_out, ref_g = _layer_grads(layer, x)
    monkeypatch.setenv("FWPKM_BACKEND", "triton")
    tri_out, tri_g = _layer_grads(layer, x)
    assert_close("out", ref_out, tri_out, RATIO)
    for i, (a, b) in enumerate(zip(ref_g, tri_g)):
        assert_close(f"grad{i}", a, b, RATIO)


# ---------------------------------------------------------------------------------- compiles for a GPU


def test_every_kernel_compiles_for_sm90_without_a_gpu(tmp_path):
    """The interpreter checks the arithmetic, not compilation: build every kernel for an H100/H200 (sm_90a)
    down to a cubin with Triton's bundled ptxas, at the paper's FwPKM and static-PKM sizes."""
    if torch.cuda.is_available():
        pytest.skip("on a GPU the tests above compile and run every kernel")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path), TMPDIR=str(tmp_path), TRITON_DEFAULT_FP_FUSION="1",  # ptxas scratch
               PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]))
    code = f"import runpy; runpy.run_path({str(Path(__file__))!r}, run_name='__compile__')"
    res = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=240)
    print(res.stdout[-4000:])
    if "no CUDA backend" in res.stdout:
        pytest.skip("this triton build has no CUDA backend")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]


def _compile_all_for_sm90():
    """Run in a fresh process without TRITON_INTERPRET: compile each kernel variant the scan and layers launch."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fwpkm_megatron.ops.triton import address as A
    from fwpkm_megatron.ops.triton import read as Rd
    from fwpkm_megatron.ops.triton import write as W

    if "nvidia" not in triton.backends.backends:
        print("no CUDA backend")
        return
    f32, i64 = "*fp32", "*i64"

    def build(fn, types, consts, num_warps=4):
        sig = {n: ("constexpr" if n in consts else types.get(n, "i32")) for n in fn.arg_names}
        src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(n),): v for n, v in consts.items()})
        triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})

    ptrs = lambda *names, t=f32: {n: t for n in names}  # noqa: E731
    for H, R, DH, K, idw, joint, elem in ((1, 512, 256, 8, True, True, f32), (4, 512, 256, 32, False, False, "*bf16")):
        BK, HK = triton.next_power_of_2(K), H * K
        sizes = dict(H=H, R=R, DH=DH, K=K)
        build(A._address_fwd_kernel, {**ptrs("q_ptr", "k_ptr", "w_ptr", t=elem), **ptrs("idx_ptr", "top_ptr", t=i64),
                                      "tops_ptr": f32, "eps": "fp32"},
              dict(sizes, IDW=idw, JOINT=joint, BLOCK_M=16, BLOCK_R=R, BLOCK_D=A._block_d(DH), BLOCK_K=BK,
                   BLOCK_HK=triton.next_power_of_2(HK)), num_warps=8)
        gather = dict(BLOCK_M=A._gather_block_m(K, DH), BLOCK_K=BK, BLOCK_D=A._block_d(DH))
        sub = {**ptrs("q_ptr", "k_ptr", "u_ptr", "d_ptr", "b_ptr", "x_ptr", "y_ptr", "z_ptr", "dq_ptr", "dk_ptr"),
               "sub_ptr": i64}
        for has in (False, True):
            build(A._subkey_dot_kernel, sub, dict(sizes, IDW=idw, HAS_U=has, **gather))
            build(A._subkey_dq_kernel, sub, dict(sizes, HAS_X=has, HAS_Z=has, **gather))
            build(A._subkey_dk_kernel, sub, dict(sizes, HAS_X=has, HAS_Z=has, BLOCK_M=16, BLOCK_R=64,
                                                 BLOCK_D=A._block_d(DH)))
        rows = {**ptrs("base_ptr", "store_ptr", "w_ptr", "dout_ptr", "vhat_ptr", "tgt_ptr", "r_ptr", "g_ptr", "dw_ptr",
                       "dvhat_ptr", "dr_ptr", "coef_ptr", "x_ptr", "dbase_ptr", "dstore_ptr", "out_ptr"),
                **ptrs("idx_ptr", "ptr_ptr", "inv_ptr", "cnt_ptr", "perm_ptr", "start_ptr", "key_ptr", "rows_ptr",
                       "old_ptr", t=i64), "g_off": "i64", "out_off": "i64", "scale": "fp32"}
        bm, bhk, bd = Rd._token_blocks(HK, 512)
        for has_store in (False, True):
            build(Rd._read_fwd_kernel, rows, dict(HK=HK, HAS_STORE=has_store, BLOCK_M=bm, BLOCK_HK=bhk, BLOCK_D=bd))
        bm, bhk, bd = Rd._token_blocks(HK, 512, budget=2048)
        for store, dout, rd, wr in ((False, True, True, False), (True, True, True, True), (False, False, False, True)):
            build(Rd._token_bwd_kernel, rows, dict(HK=HK, HAS_STORE=store, HAS_DOUT=dout, READ=rd, WRITE=wr,
                                                   BLOCK_M=bm, BLOCK_HK=bhk, BLOCK_D=bd))
        build(Rd._scatter_rows_kernel, rows, dict(HK=HK, HAS_BASE=True, HAS_STORE=True, BLOCK_S=16, BLOCK_D=128))
        for commit in (False, True):
            build(W._write_rows_kernel, rows, dict(HK=HK, COMMIT=commit, BLOCK_S=16, BLOCK_D=128))
        print(f"compiled H={H} k={K} kernels for sm_90a")


if __name__ == "__compile__":
    _compile_all_for_sm90()
