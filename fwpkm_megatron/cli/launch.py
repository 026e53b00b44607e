"""fwpkm-launch: start a parallel training run, here or on SLURM, and look after SLURM jobs.

    fwpkm-launch local --nproc 2 --config configs/tiny.yaml parallel.tp=2 [section.key=value ...]
    fwpkm-launch slurm --config FILE --nodes 2 --gpus-per-node 8 --partition gpu --time 240 [key=value ...]
    fwpkm-launch status|cancel|logs RUN_DIR

`local` starts `nproc` processes of `fwpkm-train` on this machine (gloo on CPU, NCCL with CUDA; see
`parallel.dist_backend`), each with RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT set, and
waits for them. The config and the layout (world size divisible by tp * pp, heads, d_v and layers
divisible) are checked before any process starts. If one rank fails, the others are stopped (SIGTERM,
then SIGKILL after a grace period). `slurm` submits through submitit (training/slurm.py; docs/slurm.md).
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

TEARDOWN_GRACE_S = 10.0  # after a rank failed: SIGTERM the others, SIGKILL the ones still alive after this


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
        procs.append(subprocess.Popen(cmd, env=env, start_new_session=True))  # one process group per rank
    groups = [proc.pid for proc in procs]
    status, kill_at = 0, None
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
                    kill_at = time.monotonic() + TEARDOWN_GRACE_S
            if kill_at is not None and time.monotonic() > kill_at:
                for proc in procs:
                    proc.kill()
            time.sleep(0.1)
    except KeyboardInterrupt:  # ranks checkpoint on SIGTERM at their next step; a second Ctrl-C kills
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        status = 130
        try:
            for proc in procs:
                proc.wait()
        except KeyboardInterrupt:
            pass
    finally:
        for group in groups:  # helpers a killed rank leaves behind (megatron's spawned checkpoint writer)
            try:
                os.killpg(group, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    return status


def _slurm_parser(sub) -> None:
    p = sub.add_parser("slurm", help="submit to SLURM through submitit (docs/slurm.md)")
    p.add_argument("--config", required=True, help="YAML run config (see configs/)")
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--tasks-per-node", type=int, help="tasks per node (default: one per GPU, else 1)")
    p.add_argument("--gpus-per-node", type=int)
    p.add_argument("--cpus-per-task", type=int)
    p.add_argument("--partition")
    p.add_argument("--time", type=int, default=60, help="wall time in minutes (default 60)")
    p.add_argument("--account")
    p.add_argument("--qos")
    p.add_argument("--constraint")
    p.add_argument("--mem", help="memory per node, SLURM syntax (e.g. 200G)")
    p.add_argument("--exclusive", action="store_true")
    p.add_argument("--job-name")
    p.add_argument("--dependency", help="e.g. afterok:1234")
    p.add_argument("--array-sweep", metavar="section.key=v1,v2,...", help="one array task per value")
    p.add_argument("--wait", action="store_true", help="block until the job ends; exit with its status")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch script and config; submit nothing")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    for name, text in (("status", "state of a submitted run"), ("cancel", "scancel a submitted run"),
                       ("logs", "print SLURM's output of a submitted run")):
        q = sub.add_parser(name, help=text)
        q.add_argument("run_dir")
        if name == "logs":
            q.add_argument("--task", type=int, default=0, help="task (rank) whose output to print")


def _slurm_main(args) -> int:
    import yaml

    from fwpkm_megatron.training import slurm

    request = slurm.SlurmRequest(
        nodes=args.nodes, tasks_per_node=args.tasks_per_node, gpus_per_node=args.gpus_per_node,
        cpus_per_task=args.cpus_per_task, partition=args.partition, time_minutes=args.time,
        account=args.account, qos=args.qos, constraint=args.constraint, mem=args.mem, exclusive=args.exclusive,
        job_name=args.job_name, dependency=args.dependency)
    plan = slurm.plan_launch(args.config, args.overrides, request, sweep=args.array_sweep,
                             check_cluster=not args.dry_run)
    if args.dry_run:
        print(slurm.render_script(plan))
        for label, run in plan.runs:
            print(f"# resolved config{' ' + label if label else ''} ({request.world_size} tasks)")
            print(yaml.safe_dump(run.to_dict(), sort_keys=False))
        return 0
    ids = slurm.submit(plan)
    print(f"submitted job {', '.join(ids)} ({request.nodes} nodes x {request.ntasks_per_node} tasks); "
          f"run dir {plan.run_dir}")
    if not args.wait:
        return 0
    status = slurm.wait(plan.run_dir, on_change=lambda states: print(
        "  " + ", ".join(f"{job} {state}" for job, state in states.items()), flush=True))
    print("\n".join(slurm.status_lines(plan.run_dir)))
    return status


def _job_main(args) -> int:
    from fwpkm_megatron.training import slurm

    if args.mode == "status":
        print("\n".join(slurm.status_lines(args.run_dir)))
    elif args.mode == "cancel":
        print(f"cancelled {', '.join(slurm.cancel(args.run_dir))}")
    else:
        for path in slurm.log_paths(args.run_dir, args.task):
            print(f"==> {path} <==")
            print(path.read_text() if path.exists() else "(not written yet)")
    return 0


def main(argv: list[str] | None = None) -> int:
    silence()  # known-benign library warnings (fwpkm_megatron/benign.py)
    parser = argparse.ArgumentParser(prog="fwpkm-launch", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    local = sub.add_parser("local", help="N processes on this machine")
    local.add_argument("--nproc", type=int, required=True, help="number of processes (world size)")
    local.add_argument("--config", required=True, help="YAML run config (see configs/)")
    local.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    _slurm_parser(sub)
    args = parser.parse_args(argv)
    if args.mode != "local":
        from fwpkm_megatron.training.slurm import LaunchError

        try:
            return _slurm_main(args) if args.mode == "slurm" else _job_main(args)
        except LaunchError as exc:
            print(f"fwpkm-launch: {exc}", file=sys.stderr)
            return 2
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
