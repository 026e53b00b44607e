"""Submit training to SLURM through submitit, and look after the jobs: status, cancel, logs, wait.

    request = SlurmRequest(nodes=2, tasks_per_node=8, gpus_per_node=8, partition="gpu", time_minutes=240)
    plan = plan_launch("configs/paper-112m.yaml", ["train.run_dir=runs/x"], request)   # checks, writes nothing
    print(render_script(plan)); job_ids = submit(plan)                                  # dry-run / submit

One task per GPU (or `tasks_per_node` on CPU partitions) runs `TrainingJob` (training/slurm_job.py)
under srun; the job is requeueable, gets SIGUSR2 `signal_delay_s` before its wall time, and srun tears
every task down when one exits with an error (`--kill-on-bad-exit`). A sweep (`key=v1,v2,...`) is one
job array, one run directory per value under the base run directory.

Everything that can be wrong is checked before anything is written or submitted: the config (with the
world size nodes x tasks_per_node against TP x PP), the partition and what its nodes hold, and that no
live job owns the run directory. The run directory then records `launch.json` (job ids, the request,
the code version, the command), `config.yaml` (the resolved config) and, under `slurm/`, submitit's
files: the submitted script, pickles and every task's stdout/stderr.
"""
from __future__ import annotations

import dataclasses
import json
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from fwpkm_megatron.config import ConfigError, RunConfig, layout_problems, load_config

RECORD = "launch.json"
SUBMITIT_DIR = "slurm"
LIVE_STATES = {"UNREACHABLE", "PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "SUSPENDED", "COMPLETING",
               "CONFIGURING", "RESIZING", "SIGNALING", "STAGE_OUT", "RESV_DEL_HOLD", "STOPPED"}


class LaunchError(ValueError):
    """A launch that must not be submitted; the message lists every problem."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("cannot launch:\n  " + "\n  ".join(problems))


@dataclass(kw_only=True)
class SlurmRequest:
    """What to ask SLURM for (the `fwpkm-launch slurm` options)."""

    nodes: int = 1
    tasks_per_node: int | None = None   # None: one per GPU (gpus_per_node), else 1
    gpus_per_node: int | None = None
    cpus_per_task: int | None = None
    partition: str | None = None        # None: the cluster's default partition
    time_minutes: int = 60              # wall time; SIGUSR2 arrives signal_delay_s before it
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    mem: str | None = None              # per node, SLURM syntax (e.g. 200G)
    exclusive: bool = False
    job_name: str | None = None         # None: fwpkm-<run dir name>
    dependency: str | None = None       # e.g. afterok:1234
    signal_delay_s: int = 90

    @property
    def ntasks_per_node(self) -> int:
        return self.tasks_per_node or self.gpus_per_node or 1

    @property
    def world_size(self) -> int:
        return self.nodes * self.ntasks_per_node

    def problems(self) -> list[str]:
        p = [f"--{n.replace('_', '-')}={getattr(self, n)}: must be >= 1" for n in
             ("nodes", "tasks_per_node", "gpus_per_node", "cpus_per_task", "time_minutes")
             if getattr(self, n) is not None and getattr(self, n) < 1]
        if self.gpus_per_node and self.tasks_per_node and self.tasks_per_node != self.gpus_per_node:
            p.append(f"--tasks-per-node={self.tasks_per_node} with --gpus-per-node={self.gpus_per_node}: "
                     "one task per GPU (leave --tasks-per-node out)")
        return p


@dataclass
class LaunchPlan:
    """A checked launch: the request, the base run directory, and one (label, RunConfig) per job."""

    request: SlurmRequest
    run_dir: Path
    runs: list[tuple[str, RunConfig]]
    argv: list[str]

    @property
    def folder(self) -> Path:
        return self.run_dir / SUBMITIT_DIR


# ------------------------------------------------------------------------------------------ planning

def plan_launch(config: str, overrides: list[str], request: SlurmRequest, *, sweep: str | None = None,
                argv: list[str] | None = None, check_cluster: bool = True) -> LaunchPlan:
    """Resolve the config(s) and check everything; raises LaunchError listing all problems.

    Args:
        sweep: `section.key=v1,v2,...`: one array job per value, run dirs `<run_dir>/<section.key>=<v>`.
        check_cluster: query SLURM (partition, node sizes, jobs owning the run dir); off for --dry-run.
    """
    problems = request.problems()
    variants = [("", [])]
    if sweep is not None:
        key, sep, values = sweep.partition("=")
        if not sep or len(key.split(".")) != 2 or not values:
            raise LaunchError(problems + [f"--array-sweep {sweep!r}: expected section.key=v1,v2,..."])
        variants = [(f"{key}={v}", [f"{key}={v}"]) for v in values.split(",")]
    try:
        base = load_config(config, overrides)
    except ConfigError as exc:
        raise LaunchError(problems + exc.problems) from None
    run_dir = Path(base.train.run_dir).absolute()
    runs = []
    for label, extra in variants:
        where = run_dir / label if label else run_dir
        try:
            run = load_config(config, [*overrides, *extra, f"train.run_dir={where}"])
        except ConfigError as exc:
            problems += [f"{label}: {p}" if label else p for p in exc.problems]
            continue
        problems += [f"{label}: {p}" if label else p for p in layout_problems(run, request.world_size)
                     if p not in problems]
        runs.append((label, run))
    if check_cluster and not problems:
        problems += cluster_problems(request)
        for _, run in runs:
            owner = live_owner(Path(run.train.run_dir))
            if owner:
                problems.append(f"train.run_dir={run.train.run_dir}: owned by running job {owner[0]} ({owner[1]};"
                                f" `fwpkm-launch cancel {run.train.run_dir}` or choose another run_dir)")
    if problems:
        raise LaunchError(problems)
    return LaunchPlan(request, run_dir, runs, list(argv or sys.argv))


def cluster_problems(request: SlurmRequest) -> list[str]:
    """Does the partition exist, and do enough of its nodes hold the tasks, CPUs and GPUs asked for?"""
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        return ["SLURM commands (sbatch, sinfo) not found on PATH: run on a SLURM login node"]
    out = _slurm(["sinfo", "-h", "-N", "-o", "%P|%N|%c|%G"])
    if out is None:
        return ["sinfo failed: the SLURM controller cannot be reached"]
    nodes: dict[str, dict[str, tuple[int, int]]] = {}
    default = None
    for line in out.splitlines():
        part, node, cpus, gres = line.split("|")
        if part.endswith("*"):
            part = default = part[:-1]
        gpus = sum(int(m) for m in re.findall(r"gpu(?::[^:,(]+)?:(\d+)", gres))
        nodes.setdefault(part, {})[node] = (int(cpus.rstrip("+")), gpus)
    name = request.partition or default
    if name is None:
        return ["no --partition given and the cluster has no default partition"]
    if name not in nodes:
        return [f"--partition={name}: unknown partition (known: {', '.join(sorted(nodes))})"]
    need_cpus = request.ntasks_per_node * (request.cpus_per_task or 1)
    fit = [n for n, (cpus, gpus) in nodes[name].items()
           if cpus >= need_cpus and gpus >= (request.gpus_per_node or 0)]
    if len(fit) < request.nodes:
        biggest = max(nodes[name].values())
        return [f"--nodes={request.nodes} x --tasks-per-node={request.ntasks_per_node}"
                f" (x --cpus-per-task={request.cpus_per_task or 1}, --gpus-per-node={request.gpus_per_node or 0}):"
                f" partition {name} has {len(fit)} node(s) that hold {need_cpus} CPUs and "
                f"{request.gpus_per_node or 0} GPUs ({len(nodes[name])} nodes, largest {biggest[0]} CPUs, "
                f"{biggest[1]} GPUs)"]
    return []


# -------------------------------------------------------------------------------------- submission

def executor_parameters(plan: LaunchPlan) -> dict[str, Any]:
    """Keyword arguments for submitit's SlurmExecutor.update_parameters."""
    r = plan.request
    params: dict[str, Any] = dict(
        job_name=r.job_name or f"fwpkm-{plan.run_dir.name}", nodes=r.nodes, ntasks_per_node=r.ntasks_per_node,
        time=r.time_minutes, signal_delay_s=r.signal_delay_s, stderr_to_stdout=False,
        additional_parameters={"requeue": True},
        srun_args=["--kill-on-bad-exit=1"],  # one failed task ends the job instead of leaving the rest hanging
        # torch.distributed's variables come from SLURM's inside the job, never from the submitting shell
        setup=["unset RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE GROUP_RANK"])
    for key in ("gpus_per_node", "cpus_per_task", "partition", "account", "qos", "constraint", "mem",
                "dependency"):
        if getattr(r, key) is not None:
            params[key] = getattr(r, key)
    if r.exclusive:
        params["exclusive"] = True
    return params


def _executor(plan: LaunchPlan):
    from submitit import SlurmExecutor

    max_requeues = max(run.train.max_requeues for _, run in plan.runs)
    executor = SlurmExecutor(folder=plan.folder, max_num_timeout=max_requeues)
    executor.update_parameters(**executor_parameters(plan))
    return executor


def render_script(plan: LaunchPlan) -> str:
    """The sbatch script submitit would submit for this plan (for --dry-run; needs no cluster)."""
    from submitit.slurm.slurm import _make_sbatch_string  # what SlurmExecutor renders with

    params = executor_parameters(plan)
    if len(plan.runs) > 1:
        params["map_count"] = len(plan.runs)
    command = " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(str(plan.folder))])
    return _make_sbatch_string(command=command, folder=plan.folder, **params)


def submit(plan: LaunchPlan) -> list[str]:
    """Write the run directories' records and submit; returns the job ids (`A_i` for a sweep)."""
    from fwpkm_megatron.training.slurm_job import TrainingJob

    executor = _executor(plan)
    jobs = []
    with executor.batch() if len(plan.runs) > 1 else _nothing():
        for _, run in plan.runs:
            Path(run.train.run_dir).mkdir(parents=True, exist_ok=True)
            jobs.append(executor.submit(TrainingJob(run.to_dict())))
    ids = [job.job_id for job in jobs]
    for (label, run), job_id in zip(plan.runs, ids):
        _write_record(Path(run.train.run_dir), plan, [job_id], run)
    if len(plan.runs) > 1:
        _write_record(plan.run_dir, plan, ids, None, members=[label for label, _ in plan.runs])
    return ids


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _write_record(run_dir: Path, plan: LaunchPlan, job_ids: list[str], run: RunConfig | None,
                  members: list[str] | None = None) -> None:
    from fwpkm_megatron.training.checkpoint import write_atomic

    record = {"scheduler": "slurm", "job_ids": job_ids, "submitit_folder": str(plan.folder),
              "tasks": plan.request.world_size, "request": dataclasses.asdict(plan.request),
              "git_commit": code_version(), "argv": plan.argv, "submitted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if members:
        record["members"] = members
    script = plan.folder / f"{job_ids[0].split('_')[0]}_submission.sh"
    if script.exists():
        record["script"] = str(script)
    write_atomic(run_dir / RECORD, json.dumps(record, indent=2) + "\n")
    if run is not None:
        write_atomic(run_dir / "config.yaml", yaml.safe_dump(run.to_dict(), sort_keys=False))


def code_version() -> str | None:
    """The git commit of the installed code (with `-dirty` for local changes), or None outside git."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        if sha.returncode:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return sha.stdout.strip() + ("-dirty" if dirty else "")


# -------------------------------------------------------------------------------- looking after jobs

def read_record(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / RECORD
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise LaunchError([f"{path}: no launch record ({exc}); was this run submitted with fwpkm-launch slurm?"]) from None


def job_state(job_id: str) -> str:
    """SLURM's state of a job: scontrol for jobs the controller still holds, else sacct; UNKNOWN when
    neither knows it, UNREACHABLE when the controller does not answer (three tries)."""
    for attempt in range(3):
        done = _slurm_run(["scontrol", "show", "job", "-o", job_id])
        if done is not None and done.returncode == 0:
            match = re.search(r"\bJobState=(\S+)", done.stdout)
            if match:
                return match[1]
        if done is not None and "invalid job id" in (done.stderr + done.stdout).lower():
            break  # the controller no longer holds it: ask accounting
        time.sleep(1 + attempt)
    else:
        return "UNREACHABLE"
    out = _slurm(["sacct", "-n", "-X", "-P", "-o", "State", "-j", job_id])
    return out.split()[0].rstrip("+") if out and out.split() else "UNKNOWN"


def live_owner(run_dir: Path) -> tuple[str, str] | None:
    """(job id, state) of a live job recorded in `run_dir/launch.json` (or one whose state the controller
    cannot tell now), else None."""
    if not (run_dir / RECORD).is_file():
        return None
    for job_id in read_record(run_dir).get("job_ids", []):
        state = job_state(job_id)
        if state in LIVE_STATES:
            return job_id, state
    return None


def status_lines(run_dir: str | Path) -> list[str]:
    """One line per job of the run: id, SLURM state, restarts, the newest checkpoint, the result."""
    from fwpkm_megatron.training.checkpoint import CheckpointError, latest_checkpoint

    record = read_record(run_dir)
    lines = []
    members = record.get("members") or [""]
    for job_id, member in zip(record["job_ids"], members):
        where = Path(run_dir) / member
        out = _slurm(["scontrol", "show", "job", "-o", job_id]) or ""
        restarts = re.search(r"\bRestarts=(\d+)", out)
        try:
            latest = latest_checkpoint(where / "checkpoints")
        except CheckpointError as exc:
            latest = f"(broken: {exc})"
        line = (f"{job_id}{' ' + member if member else ''}: {job_state(job_id)}"
                f"{f', restarts {restarts[1]}' if restarts else ''}, latest checkpoint {latest or 'none'}")
        result = task_result(record, job_id)
        if result is not None:
            line += f", result {result}"
        lines.append(line)
    return lines


def task_result(record: dict[str, Any], job_id: str, task: int = 0) -> Any:
    """What task `task` of the job returned (submitit's result pickle), or None when not written."""
    from submitit.core.utils import JobPaths, pickle_load

    path = JobPaths(record["submitit_folder"], job_id=job_id, task_id=task).result_pickle
    if not path.exists():
        return None
    outcome, value = pickle_load(path)
    return value if outcome == "success" else {"error": str(value).strip().splitlines()[-1:]}


def cancel(run_dir: str | Path) -> list[str]:
    """scancel every job of the run; returns the ids."""
    ids = read_record(run_dir)["job_ids"]
    bases = sorted({job_id.split("_")[0] for job_id in ids})
    subprocess.run(["scancel", *bases], check=True, timeout=60)
    return bases


def log_paths(run_dir: str | Path, task: int = 0) -> list[Path]:
    """SLURM's stdout and stderr files of task `task` of the run's (newest) job."""
    from submitit.core.utils import JobPaths

    record = read_record(run_dir)
    paths = JobPaths(record["submitit_folder"], job_id=record["job_ids"][-1], task_id=task)
    return [paths.stdout, paths.stderr]


def wait(run_dir: str | Path, poll_s: float = 2.0, on_change=None) -> int:
    """Block until every job of the run has ended (requeues included); 0 when all completed their steps.

    Returns:
        0 all completed; 3 a run stopped before train.steps without a requeue (cap, SIGTERM); 1 otherwise.
    """
    record = read_record(run_dir)
    last: dict[str, str] = {}
    unknown_since = None  # a job neither scontrol nor sacct knows (accounting off, aged out) ends the wait
    while True:
        states = {job_id: job_state(job_id) for job_id in record["job_ids"]}
        if on_change is not None and states != last:
            on_change(states)
        last = states
        if "UNKNOWN" in states.values():
            unknown_since = unknown_since or time.monotonic()
        else:
            unknown_since = None
        if all(s not in LIVE_STATES for s in states.values()) and (
                unknown_since is None or time.monotonic() - unknown_since > 30):
            break
        time.sleep(poll_s)
    results = [task_result(record, job_id) for job_id in record["job_ids"]]
    if all(s == "COMPLETED" for s in states.values()) and all(
            isinstance(r, dict) and r.get("status") == "completed" for r in results):
        return 0
    if all(isinstance(r, dict) and r.get("status") in ("completed", "stopped") for r in results):
        return 3
    return 1


def _slurm_run(cmd: list[str]) -> subprocess.CompletedProcess | None:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None


def _slurm(cmd: list[str]) -> str | None:
    done = _slurm_run(cmd)
    return done.stdout if done is not None and done.returncode == 0 else None
