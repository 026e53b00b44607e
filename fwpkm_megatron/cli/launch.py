"""fwpkm-launch: start a parallel training run.

    fwpkm-launch local --nproc 2 --config configs/tiny.yaml parallel.tp=2 [section.key=value ...]
    fwpkm-launch slurm ...   (not built yet: says so and exits 2)

`local` starts `nproc` processes of `fwpkm-train` on this machine (gloo on CPU, NCCL with CUDA; see
`parallel.dist_backend`), each with RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT set, and
waits for them. The config and the layout (world size divisible by tp * pp, heads, d_v and layers
divisible) are checked before any process starts. If one rank fails, the others are stopped.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time

from fwpkm_megatron.benign import silence
from fwpkm_megatron.config import ConfigError, layout_problems, load_config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_local(nproc: int, config: str, overrides: list[str]) -> int:
    """Run `nproc` ranks of fwpkm-train; return 0 when all succeed, else the first failing exit code."""
    port = str(_free_port())
    threads = str(max((os.cpu_count() or 1) // nproc, 1))
    procs = []
    for rank in range(nproc):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_RANK=str(rank),
                   LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        env.setdefault("OMP_NUM_THREADS", threads)  # ranks share the cores; no oversubscription
        cmd = [sys.executable, "-m", "fwpkm_megatron.cli.train", "--config", config, *overrides]
        procs.append(subprocess.Popen(cmd, env=env))
    status = 0
    try:
        while procs:
            for proc in list(procs):
                code = proc.poll()
                if code is None:
                    continue
                procs.remove(proc)
                if code != 0 and status == 0:
                    status = code
                    for other in procs:  # a dead rank leaves the others waiting in a collective
                        other.send_signal(signal.SIGTERM)
            time.sleep(0.1)
    except KeyboardInterrupt:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        status = 130
    return status


def main(argv: list[str] | None = None) -> int:
    silence()  # known-benign library warnings (fwpkm_megatron/benign.py)
    parser = argparse.ArgumentParser(prog="fwpkm-launch", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    local = sub.add_parser("local", help="N processes on this machine")
    local.add_argument("--nproc", type=int, required=True, help="number of processes (world size)")
    local.add_argument("--config", required=True, help="YAML run config (see configs/)")
    local.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    sub.add_parser("slurm", help="(not built yet)")
    args, rest = parser.parse_known_args(argv)
    if args.mode == "slurm":
        print("fwpkm-launch slurm: not implemented yet (multi-node SLURM launch through submitit arrives with "
              "the cluster work); on one machine use `fwpkm-launch local --nproc N`", file=sys.stderr)
        return 2
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.nproc < 1:
        print(f"fwpkm-launch: --nproc={args.nproc}: must be >= 1", file=sys.stderr)
        return 2
    try:
        run = load_config(args.config, args.overrides)
        problems = layout_problems(run, args.nproc)
        if problems:
            raise ConfigError(problems)
    except ConfigError as exc:
        print(f"fwpkm-launch: {exc}", file=sys.stderr)
        return 2
    return launch_local(args.nproc, args.config, args.overrides)


if __name__ == "__main__":
    sys.exit(main())
