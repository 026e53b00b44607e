"""Parallel layout: megatron-core's CPU compatibility patch and process-group setup.

Only this package imports `megatron.core.parallel_state`; see `groups.py` and `mcore_cpu.py`.
"""
