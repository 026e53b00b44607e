"""Device audit on a CPU-only machine: the training step keeps every tensor on the target device and dtype.

What this proves: with the device rule's target declared as `meta` (a stand-in for `cuda:LOCAL_RANK`:
no storage, so any tensor made on the host shows up), the single-process model - GPT with an FwPKM branch,
a static PKM MLP and pSWA - runs its forward, backward, gradient clipping and AdamW step with every
parameter, gradient, optimizer state, fast weight and intermediate on the target device, fast weights
in fp32, and no float64 anywhere. `DeviceAudit` checks every aten op, inputs and outputs (an elementwise
op on meta and CPU tensors raises by itself; a matmul does not, hence the mode). The memory ops run
through their custom ops' fakes (fwpkm_megatron/ops/library.py), as the Triton path would on CUDA.
The parallel engine's scalars (loss averaging over PP and DP, with no losses on non-last stages) are
audited the same way, each tensor handed to `torch.distributed` checked against the target device.

Why not FakeTensorMode with device="cuda": on a CPU-only build it aborts the process at aten::embedding
(shared docs, gpu-notes.md). Not covered here: megatron's DDP and optimizer (their scalars use
`torch.cuda.current_device()`, right on a GPU by construction) and the Triton scan's internals.
A new model component gets exercised by adding it to `RUN`.
"""
from __future__ import annotations

import pytest
import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from fwpkm_megatron.config import FwPKMConfig, ModelConfig, PKMConfig, RunConfig, TrainConfig
from fwpkm_megatron.parallel import groups
from fwpkm_megatron.training import device

TARGET = torch.device("meta")
SEED, VOCAB, B, S = 1234, 64, 2, 24
RUN = RunConfig(
    model=ModelConfig(num_layers=3, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64, max_seq_len=32,
                      attention="pswa", window=8, pswa_prob=0.5, vocab_size=VOCAB),
    fwpkm=FwPKMConfig(layers=[0, 2], num_slots=64, d_k=16, d_v=16, topk=2, chunk_size=8),
    pkm=PKMConfig(layers=[1], num_slots=64, d_k=16, d_v=16, heads=2, topk=2),
    train=TrainConfig(steps=2, warmup_steps=1, seq_len=S))


_TRANSFERS = (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default)


class DeviceAudit(TorchDispatchMode):
    """Records every aten op that mixes tensors on `device` with tensors elsewhere, or touches float64.

    Exempt: CPU 0-dim scalars (CUDA kernels take them as values, e.g. AdamW's step counter), transfers
    *to* the device (batches, RoPE's one-time move), and host-only ops (megatron's RNG tracker compares
    CPU generator states on every machine). A transfer *off* the device (`.cpu()`) is flagged."""

    def __init__(self, device: torch.device):
        super().__init__()
        self.device, self.problems, self.ops = device, [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops += 1
        ins = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if func is torch.ops.aten._to_copy.default and ins[0].device == self.device \
                and torch.device(kwargs.get("device", self.device)) != self.device:  # meta cannot copy out
            self.problems.append(f"{func}: {tuple(ins[0].shape)} {ins[0].dtype} copied off {self.device} "
                                 f"to {kwargs['device']}")
            return torch.empty(ins[0].shape, dtype=kwargs.get("dtype") or ins[0].dtype, device=kwargs["device"])
        out = func(*args, **kwargs)
        outs = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        on_target = [t.device == self.device for t in ins + outs]
        if func in _TRANSFERS and outs and all(t.device == self.device for t in outs):
            return out
        strays = [t for t in ins + outs if t.device != self.device and not (t.device.type == "cpu" and t.dim() == 0)]
        if strays and any(on_target):
            self.problems += [f"{func}: {tuple(t.shape)} {t.dtype} on {t.device}" for t in strays]
        self.problems += [f"{func}: float64 {tuple(t.shape)}" for t in ins + outs if t.dtype == torch.float64]
        return out


@pytest.fixture
def target():
    device.declare(TARGET)
    try:
        yield TARGET
    finally:
        device.declare(None)
        groups.teardown()


def _step(model, optimizer, params, batch):
    """The single-process trainer's step (training/trainer.py::_train_step) without its host syncs."""
    inputs, labels = batch[:, :-1], batch[:, 1:]
    positions = torch.arange(inputs.shape[1], device=inputs.device).expand_as(inputs)
    loss = model(inputs, positions, attention_mask=None, labels=labels).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(params, RUN.train.grad_clip)  # clip_grad_norm without .item()
    optimizer.step()
    return loss, grad_norm


def test_device_audit_single_process_step_stays_on_the_target_device(target):
    from fwpkm_megatron.memory import fast_weight_states
    from fwpkm_megatron.model import build_model
    from fwpkm_megatron.training.optim import build_optimizer

    groups.init_single_process(SEED)
    model = build_model(RUN, VOCAB).to(device.rank_device())  # host init, then moved (the trainer's rule)
    optimizer, scheduler = build_optimizer(model, RUN.train)
    params = [p for p in model.parameters() if p.requires_grad]
    batch = torch.randint(0, VOCAB, (B, S + 1)).to(device.rank_device())
    audit = DeviceAudit(target)
    for step in range(2):
        model.window_control.begin_step(step, SEED, training=True)
        with audit:
            loss, grad_norm = _step(model, optimizer, params, batch)
        scheduler.step()
    assert audit.ops > 1000, audit.ops  # the whole step ran under the audit
    assert not audit.problems, "tensors off the target device:\n" + "\n".join(audit.problems[:20])
    assert loss.device == grad_norm.device == target
    for p in params:
        assert p.device == target and p.grad is not None and p.grad.device == target
        assert all(v.device == target or v.dim() == 0 for v in optimizer.state[p].values())
    states = fast_weight_states(model)
    assert len(states) == 2
    for state in states.values():
        for buf in (state.keys, state.values):
            assert buf.device == target and buf.dtype == torch.float32


def test_device_audit_engine_loss_scalars_and_collectives_on_the_target_device(target, monkeypatch):
    """Loss averaging over PP (non-last stages contribute zeros) and DP hands only target tensors over."""
    from fwpkm_megatron.training import engine as engine_module

    handed = []

    def all_reduce(tensor, group=None, **kw):
        handed.append((tensor.device, tensor.dtype))

    monkeypatch.setattr(engine_module.dist, "all_reduce", all_reduce)
    monkeypatch.setattr(engine_module.devices, "host_float", lambda t: (t.device, t.dtype))
    engine = engine_module.ParallelEngine.__new__(engine_module.ParallelEngine)
    engine.device = device.rank_device()

    class Groups:  # a PP=2 x DP=2 rank; the groups are only handed to the (patched) collective
        pp_group, dp_group, dp = object(), object(), 2

    engine.groups = Groups()
    audit = DeviceAudit(target)
    with audit:
        middle = engine._mean_loss([])  # a non-last pipeline stage: no losses
        last = engine._mean_loss([{"loss": torch.full((), 2.0, device=target)}] * 2)
    assert handed == [(target, torch.float32)] * 4, f"tensors handed to all_reduce: {handed}"
    assert middle == last == (target, torch.float32)
    assert not audit.problems, "\n".join(audit.problems)


def test_precision_sets_parameter_and_pipeline_dtypes():
    """PP send/receive buffers use the compute dtype (megatron allocates them with config.pipeline_dtype)."""
    from fwpkm_megatron.training.engine import build_chunks

    groups.init_single_process(SEED)
    try:
        for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            run = RunConfig(model=RUN.model, fwpkm=RUN.fwpkm, pkm=RUN.pkm,
                            train=TrainConfig(steps=2, seq_len=S, precision=precision))
            (chunk,) = build_chunks(run, VOCAB, groups.current_groups())
            assert chunk.config.params_dtype == chunk.config.pipeline_dtype == dtype
            assert chunk.config.bf16 == (precision == "bf16")
    finally:
        groups.teardown()
