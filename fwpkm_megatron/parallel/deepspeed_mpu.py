"""The `mpu` object DeepSpeed asks for, answered from megatron's parallel state.

DeepSpeed's "model parallel" group is megatron's TP x PP group: ZeRO then counts TP-replicated
parameters once, sums the grad norm over every stage and names checkpoint files per stage
(megatron-deepspeed-notes.md Q1, item 4). Its data-parallel group is megatron's.
"""
from __future__ import annotations

import torch.distributed as dist


class MegatronMPU:
    """get_{model,tensor_model,pipe,data}_parallel_{rank,world_size,group} over megatron's groups."""

    def __init__(self):
        from megatron.core import parallel_state as ps

        self._ps = ps

    def get_model_parallel_group(self):
        return self._ps.get_model_parallel_group()

    def get_model_parallel_rank(self):
        return dist.get_rank(group=self.get_model_parallel_group())

    def get_model_parallel_world_size(self):
        return dist.get_world_size(group=self.get_model_parallel_group())

    def get_model_parallel_src_rank(self):
        return dist.get_global_rank(self.get_model_parallel_group(), 0)

    def get_tensor_model_parallel_rank(self):
        return self._ps.get_tensor_model_parallel_rank()

    def get_tensor_model_parallel_world_size(self):
        return self._ps.get_tensor_model_parallel_world_size()

    def get_tensor_model_parallel_group(self):
        return self._ps.get_tensor_model_parallel_group()

    def get_pipeline_model_parallel_rank(self):
        return self._ps.get_pipeline_model_parallel_rank()

    def get_pipeline_model_parallel_world_size(self):
        return self._ps.get_pipeline_model_parallel_world_size()

    def get_pipeline_model_parallel_group(self):
        return self._ps.get_pipeline_model_parallel_group()

    def get_data_parallel_group(self):
        return self._ps.get_data_parallel_group()

    def get_data_parallel_rank(self):
        return self._ps.get_data_parallel_rank()

    def get_data_parallel_world_size(self):
        return self._ps.get_data_parallel_world_size()


def mpu_adapter() -> MegatronMPU:
    return MegatronMPU()
