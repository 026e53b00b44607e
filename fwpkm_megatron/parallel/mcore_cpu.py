"""megatron-core 0.16.1 on a CPU-only machine: the one place the project works around its CUDA assumptions.

`apply()` is idempotent and does nothing when CUDA is available, so the same code runs unchanged on GPUs.
It covers what a GPTModel built from the local spec needs for forward and backward, megatron's RNG
tracker (`model_parallel_cuda_manual_seed`, `get_cuda_rng_tracker().fork()`, the recompute RNG
save/restore). `parallel_state.initialize_model_parallel` on gloo needs no patch (its CUDA calls sit on
the NCCL/SHARP paths only). Nothing in `torch` itself is changed: the patches are scoped to the megatron
modules listed in `_MODULES` (see docs: cpu-stack-notes.md, section 2 and Appendix A).

Patches, each with the failure it removes:

1. The `torch` global of each module in `_MODULES` is replaced by `_CpuTorch`, a proxy that forwards every
   attribute to the real `torch` except two:
   - `torch.cuda` becomes `_CpuCuda`: `current_device()` returns the rank's device (the CPU), `synchronize()` and
     `empty_cache()` are no-ops, and `manual_seed`/`get_rng_state`/`set_rng_state` act on the CPU default
     generator. Without it, `RotaryEmbedding.__init__`/`get_emb` (inv_freq placement),
     `GlobalMemoryBuffer.get_tensor` (DotProductAttention's score buffer) and
     `model_parallel_cuda_manual_seed` fail with "Torch not compiled with CUDA enabled".
   - tensor factories (`zeros`, `empty`, `arange`, ...) map `device="cuda"` to the rank's device. Without it the stock
     causal mask (`transformer.utils.get_default_causal_mask`, used when no mask is passed) fails the same way.
   The CPU generator stands in for the CUDA one because on a CPU every random op (dropout, init) draws
   from it; the tracker's `fork()` must therefore swap *its* state. (Mapping `torch.cuda.manual_seed` to
   `torch.manual_seed` would recurse: `torch.manual_seed` calls `torch.cuda.manual_seed_all`.)
2. `tensor_parallel.random._get_cuda_rng_state` / `_set_cuda_rng_state` are replaced by CPU-generator
   versions. The originals index `torch.cuda.default_generators` and call `_C._cuda_setRNGState`; the
   tracker's `add`/`fork` and `CheckpointFunction` (full recompute) go through them.

3. `LanguageModule.setup_embeddings_and_output_layer` (tied embeddings with PP > 1) calls
   `weight.data.cuda()` before all-reducing the embedding over the embedding group; the wrapper makes
   `Tensor.cuda` the identity for the duration of that call only.
4. megatron's optimizers check `param.type()` against `'torch.cuda.FloatTensor'` (and the bf16/half names)
   while grouping parameters and before clipping; `_patched_during(..., "type", _cuda_type_names)` makes
   `Tensor.type()` report the CUDA name of a CPU tensor for the duration of those calls only
   (`Float16OptimizerWithFloat16Params` and `DistributedOptimizer` construction, `clip_grad_by_total_norm_fp32`).
   megatron's DDP, `finalize_model_grads`, clipping and optimizers are in `_MODULES` for their scalars and
   buffers on `current_device()` / `device="cuda"`.

`_CpuCuda.current_device()` answers `training.device.rank_device()` (the CPU, or the device a test
declares as the target), so megatron's allocations follow the model's device.

5. megatron's `GatedDeltaNet` (`model.mixer: gdn`) imports fla (Triton, CUDA only) and refuses to build
   without it, even though megatron ships pure-PyTorch paths. On CPU `_gdn_torch_paths` points the names
   its forward calls at torch: `chunk_gated_delta_rule` -> megatron's own `torch_chunk_gated_delta_rule`
   (the same chunked WY form, chunk 64), `l2norm` -> fla's formula x * rsqrt(sum x^2 + 1e-6) in torch,
   `causal_conv1d_fn` -> None (megatron then runs its torch `nn.Conv1d`), and unwraps `_apply_gated_norm`
   from megatron's `torch.compile` (an inductor C++ build per shape on a CPU, for one RMSNorm and a gate).
   fla-core is never installed on CPU (setup.py extra `gpu`).

Not covered (the project does not use it): `parallel_state.update_pg_timeout`.
"""
from __future__ import annotations

import importlib
import types

import torch

# megatron modules whose `torch` global is replaced by the proxy; each line names the call that needs it.
_MODULES = (
    "megatron.core.models.common.embeddings.rotary_pos_embedding",  # inv_freq on current_device()
    "megatron.core.utils",                                          # GlobalMemoryBuffer.get_tensor
    "megatron.core.tensor_parallel.random",                         # torch.cuda.manual_seed / get_rng_state
    "megatron.core.transformer.utils",                              # get_default_causal_mask(device="cuda")
    "megatron.core.pipeline_parallel.schedules",                    # total_num_tokens on device="cuda"
    "megatron.core.pipeline_parallel.p2p_communication",            # receive buffers on current_device()
    "megatron.core.dist_checkpointing.strategies.filesystem_async",  # torch.cuda.synchronize() before a save
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",  # failure flags on current_device()
    "megatron.core.dist_checkpointing.strategies.async_utils",       # the same, for async requests
    "megatron.core.distributed.param_and_grad_buffer",               # grad buffers on current_device()
    "megatron.core.distributed.distributed_data_parallel",           # DDP (buffers, sync hooks)
    "megatron.core.distributed.finalize_model_grads",                # embedding-grad all-reduce scalars
    "megatron.core.optimizer.clip_grads",                            # grad-norm scalars on device="cuda"
    "megatron.core.optimizer.optimizer",                             # found_inf / scale scalars
    "megatron.core.optimizer.distrib_optimizer",                     # shard buffers on current_device()
    "megatron.core.ssm.gated_delta_net",                             # conv / A_log / dt_bias on current_device()
)

_FACTORIES = frozenset({
    "arange", "as_tensor", "empty", "empty_like", "eye", "full", "full_like", "ones", "ones_like",
    "rand", "randint", "randn", "tensor", "tril", "triu", "zeros", "zeros_like",
})

_applied = False


def _to_cpu(device):
    """Map a CUDA device spec (str, torch.device, or bare index) to the rank's device (the CPU, or a test's
    declared target); leave anything else alone."""
    from fwpkm_megatron.training.device import rank_device

    if isinstance(device, str) and device.startswith("cuda"):
        return rank_device()
    if isinstance(device, torch.device) and device.type == "cuda":
        return rank_device()
    if isinstance(device, int) and not isinstance(device, bool):
        return rank_device()
    return device


def _cpu_factory(fn):
    """Wrap a torch tensor factory so that `device="cuda"` allocates on the CPU."""
    def factory(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _to_cpu(kwargs["device"])
        return fn(*args, **kwargs)
    factory.__name__ = getattr(fn, "__name__", "factory")
    return factory


def _cpu_get_rng_state(device="cuda", clone=False, graph_safe=False):
    """Stand-in for `_get_cuda_rng_state`: the CPU default generator's state."""
    state = torch.default_generator.get_state()
    return state.clone() if clone else state


def _cpu_set_rng_state(new_state, device=-1, graph_safe=False):
    """Stand-in for `_set_cuda_rng_state`: restore the CPU default generator."""
    torch.default_generator.set_state(new_state)


class _CpuCuda(types.ModuleType):
    """What `torch.cuda` looks like to the patched megatron modules: the CPU, with its generator as RNG."""

    def __init__(self):
        super().__init__("torch.cuda")

    @staticmethod
    def current_device():
        from fwpkm_megatron.training.device import rank_device

        return rank_device()

    @staticmethod
    def synchronize(device=None):
        return None

    @staticmethod
    def empty_cache():
        return None

    @staticmethod
    def manual_seed(seed):
        # Not torch.manual_seed: that calls torch.cuda.manual_seed_all and would recurse here.
        torch.default_generator.manual_seed(int(seed))

    @staticmethod
    def get_rng_state(device="cuda"):
        return torch.default_generator.get_state()

    @staticmethod
    def set_rng_state(new_state, device="cuda"):
        torch.default_generator.set_state(new_state)

    def __getattr__(self, name):
        return getattr(torch.cuda, name)


class _CpuTorch(types.ModuleType):
    """Stand-in for the `torch` global of the modules in `_MODULES`; see the module docstring."""

    def __init__(self):
        super().__init__("torch")
        self.__dict__["cuda"] = _CpuCuda()

    def __getattr__(self, name):
        obj = getattr(torch, name)
        return _cpu_factory(obj) if name in _FACTORIES else obj


def is_applied() -> bool:
    """True once `apply()` has patched megatron-core (always False on a CUDA machine)."""
    return _applied


def apply() -> None:
    """Patch megatron-core for CPU (see the module docstring). Idempotent; a no-op when CUDA is available."""
    global _applied
    if torch.cuda.is_available() or _applied:
        return
    proxy = _CpuTorch()
    for name in _MODULES:
        module = importlib.import_module(name)
        if getattr(module, "torch", None) is torch:
            module.torch = proxy
    from megatron.core.tensor_parallel import random as mcore_random
    mcore_random._get_cuda_rng_state = _cpu_get_rng_state
    mcore_random._set_cuda_rng_state = _cpu_set_rng_state
    from megatron.core.models.common.language_module.language_module import LanguageModule
    LanguageModule.setup_embeddings_and_output_layer = _patched_during(
        LanguageModule.setup_embeddings_and_output_layer, "cuda", _cuda_is_identity)
    from megatron.core.optimizer import clip_grads, distrib_optimizer, optimizer
    optimizer.Float16OptimizerWithFloat16Params.__init__ = _patched_during(
        optimizer.Float16OptimizerWithFloat16Params.__init__, "type", _cuda_type_names)
    distrib_optimizer.DistributedOptimizer.__init__ = _patched_during(
        distrib_optimizer.DistributedOptimizer.__init__, "type", _cuda_type_names)
    clip = _patched_during(clip_grads.clip_grad_by_total_norm_fp32, "type", _cuda_type_names)
    for module in (clip_grads, optimizer, distrib_optimizer):
        if hasattr(module, "clip_grad_by_total_norm_fp32"):
            module.clip_grad_by_total_norm_fp32 = clip
    _gdn_torch_paths()
    _applied = True


def l2norm(x: torch.Tensor, dim: int = -1, eps: float = 1e-6, output_dtype=None) -> torch.Tensor:
    """fla's `l2norm` in torch: x * rsqrt(sum(x^2) + eps) along `dim`, computed in fp32."""
    x32 = x.float()
    y = x32 * torch.rsqrt(x32.square().sum(dim, keepdim=True) + eps)
    return y.to(output_dtype or x.dtype)


def _gdn_torch_paths() -> None:
    """CPU only: megatron's GatedDeltaNet on its torch paths instead of fla's kernels (patch 5)."""
    from megatron.core.ssm import gated_delta_net as gdn

    gdn.HAVE_FLA = True
    gdn.l2norm = l2norm
    gdn.chunk_gated_delta_rule = gdn.torch_chunk_gated_delta_rule
    gdn.causal_conv1d_fn = None
    norm = gdn.GatedDeltaNet._apply_gated_norm
    gdn.GatedDeltaNet._apply_gated_norm = getattr(norm, "_torchdynamo_orig_callable", norm)


def _patched_during(fn, method: str, replacement):
    """Wrap `fn` so that `torch.Tensor.<method>` is `replacement(original)` while it runs (CPU only)."""
    def wrapped(*args, **kwargs):
        original = getattr(torch.Tensor, method)
        setattr(torch.Tensor, method, replacement(original))
        try:
            return fn(*args, **kwargs)
        finally:
            setattr(torch.Tensor, method, original)
    wrapped.__wrapped__ = fn
    return wrapped


def _cuda_type_names(original):
    """`Tensor.type()` naming CPU tensors as CUDA ones (megatron's optimizers group params by that name)."""
    def type_(self, dtype=None, non_blocking=False, **kw):
        name = original(self, dtype, non_blocking, **kw)
        if dtype is None and not kw and isinstance(name, str) and name.startswith("torch.") and ".cuda." not in name:
            return name.replace("torch.", "torch.cuda.", 1)
        return name
    return type_


def _cuda_is_identity(original):
    """`Tensor.cuda()` returning the tensor itself."""
    return lambda self, *args, **kwargs: self
