"""torch.distributed's rendezvous variables from the launcher's environment, so a bare `srun fwpkm-train` works.

torchrun and `fwpkm-launch local` set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; srun
sets none of them. Inside an srun step (SLURM_STEP_NUM_TASKS is set; a batch script alone has only the
job's variables, so `fwpkm-train` run there without srun stays a single process) they are derived:

    RANK = SLURM_PROCID, WORLD_SIZE = SLURM_STEP_NUM_TASKS, LOCAL_RANK = SLURM_LOCALID
    MASTER_ADDR = the first node of SLURM_STEP_NODELIST (rank 0 runs there under srun's block distribution)
    MASTER_PORT = 20000 + SLURM_JOB_ID % 10000 (below Linux's ephemeral range; jobs sharing a node differ)

MASTER_ADDR / MASTER_PORT (and LOCAL_RANK / LOCAL_WORLD_SIZE) already in the environment win: the
override, e.g. from a site's TaskProlog. The backend (NCCL on GPUs,
gloo on CPU) is chosen where the process group is created, from `parallel.dist_backend`.
"""
from __future__ import annotations

import os
import re
import socket
import subprocess
from collections.abc import Mapping

PORT_BASE, PORT_SPAN = 20000, 10000
TORCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class LaunchEnvError(RuntimeError):
    """The SLURM environment cannot be turned into a rendezvous; the message names the variable."""


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's compact host list -> host names: `gpu[01-03,07],cpu5` -> gpu01 gpu02 gpu03 gpu07 cpu5.

    Raises:
        LaunchEnvError: an unbalanced bracket or a malformed range.
    """
    hosts: list[str] = []
    for group in re.findall(r"[^,\[]+(?:\[[^\]]*\][^,\[]*)*|,", nodelist):
        if group == ",":
            continue
        names = [""]
        for literal, ranges in re.findall(r"([^\[\]]*)(?:\[([^\]]*)\])?", group):
            suffixes = [""] if not ranges else _expand_ranges(ranges, nodelist)
            names = [n + literal + s for n in names for s in suffixes]
        hosts += names
    if not hosts or nodelist.count("[") != nodelist.count("]"):
        raise LaunchEnvError(f"node list {nodelist!r}: not a SLURM host list")
    return hosts


def _expand_ranges(ranges: str, nodelist: str) -> list[str]:
    out = []
    for part in ranges.split(","):
        low, _, high = part.partition("-")
        if not low.isdigit() or (high and not high.isdigit()):
            raise LaunchEnvError(f"node list {nodelist!r}: bad range {part!r}")
        out += [f"{i:0{len(low)}d}" for i in range(int(low), int(high or low) + 1)]
    return out


def _tasks_on_nodes(spec: str) -> list[int]:
    """SLURM_STEP_TASKS_PER_NODE `2(x3),1` -> [2, 2, 2, 1]."""
    counts = []
    for part in spec.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not match:
            raise LaunchEnvError(f"SLURM_STEP_TASKS_PER_NODE={spec!r}: not understood")
        counts += [int(match[1])] * int(match[2] or 1)
    return counts


def node_address(name: str) -> str:
    """An address for node `name`: the name itself when it resolves, else SLURM's NodeAddr for it."""
    try:
        socket.gethostbyname(name)
        return name
    except OSError:
        pass
    try:
        out = subprocess.run(["scontrol", "show", "node", name, "-o"], capture_output=True, text=True,
                             timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    match = re.search(r"\bNodeAddr=(\S+)", out)
    if not match:
        raise LaunchEnvError(f"node {name!r} (first of the step's node list) does not resolve and scontrol "
                             "gives no NodeAddr for it; set MASTER_ADDR to rank 0's address")
    return match[1]


def distributed_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The torch.distributed variables to add for this process; empty when there is nothing to derive.

    Nothing is derived when RANK and WORLD_SIZE are already set (torchrun, `fwpkm-launch local`) or
    when the process is not a task of an srun step.
    """
    env = os.environ if environ is None else environ
    if ("RANK" in env and "WORLD_SIZE" in env) or "SLURM_STEP_NUM_TASKS" not in env or "SLURM_PROCID" not in env:
        return {}
    nodes = expand_nodelist(env.get("SLURM_STEP_NODELIST") or env["SLURM_JOB_NODELIST"])
    here = env.get("SLURMD_NODENAME")
    node_index = nodes.index(here) if here in nodes else int(env.get("SLURM_NODEID", "0"))
    per_node = _tasks_on_nodes(env.get("SLURM_STEP_TASKS_PER_NODE", env["SLURM_STEP_NUM_TASKS"]))
    out = {"RANK": env["SLURM_PROCID"], "WORLD_SIZE": env["SLURM_STEP_NUM_TASKS"],
           "LOCAL_RANK": env.get("LOCAL_RANK") or env.get("SLURM_LOCALID", "0"),
           "LOCAL_WORLD_SIZE": env.get("LOCAL_WORLD_SIZE")
           or str(per_node[node_index] if node_index < len(per_node) else per_node[-1])}
    out["MASTER_ADDR"] = env.get("MASTER_ADDR") or node_address(nodes[0])
    out["MASTER_PORT"] = env.get("MASTER_PORT") or str(PORT_BASE + int(env.get("SLURM_JOB_ID", "0")) % PORT_SPAN)
    return out


def apply_launcher_env() -> dict[str, str]:
    """Put `distributed_env()` into os.environ (torch's env:// rendezvous reads it); returns what was set."""
    derived = distributed_env()
    os.environ.update(derived)
    return derived
