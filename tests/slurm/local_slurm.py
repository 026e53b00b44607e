"""A private two-node SLURM cluster on 127.0.0.1 for the tests: munged, one slurmctld, two slurmd.

`LocalCluster(directory).start()` writes slurm.conf into `directory` (free ports, state and spool inside
it), starts a munged on its own socket and the three SLURM daemons, and waits until `sinfo` shows both
nodes idle; `stop()` ends each daemon by the PID it wrote, so nothing else on the machine is touched.
The nodes `node1` and `node2` both have NodeAddr 127.0.0.1; their names do not resolve through DNS, so
the master address of a job comes from SLURM's own record of its first node (as on clusters whose node
names are aliases).

`ensure_installed()` installs Debian's slurm-wlm (with munge) when missing and returns None, or the
reason it cannot, which the tests print when they skip.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("slurmctld", "slurmd", "munged", "sbatch", "srun", "scontrol", "sinfo")


def ensure_installed() -> str | None:
    """Install slurm-wlm + munge through apt when missing; None when ready, else why not."""
    def missing():
        return [d for d in DAEMONS if shutil.which(d) is None and not Path(f"/usr/sbin/{d}").exists()]

    if not missing():
        return None
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return f"SLURM is not installed ({', '.join(missing())} missing) and apt-get as root is not available"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "slurm-wlm", "munge"]):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if done.returncode:
            return f"`{' '.join(cmd)}` failed: {(done.stderr or done.stdout)[-500:]}"
    return None if not missing() else f"slurm-wlm installed but {', '.join(missing())} still missing"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _free_port_pair() -> int:
    """A port p with p and p+1 both free on 127.0.0.1."""
    for _ in range(100):
        port = _free_port()
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError("no two consecutive free ports")


class LocalCluster:
    """Two slurmd nodes and a slurmctld under `directory`; `env` is the environment to run SLURM commands in."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        self.host = socket.gethostname().split(".")[0]
        self.nodes = ["node1", "node2"]
        self.conf = self.dir / "slurm.conf"
        self.munge_socket = self.dir / "munge" / "munge.socket"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        self._pids: list[int] = []

    def start(self, timeout: float = 60.0) -> "LocalCluster":
        for sub in ("state", "spool", "log", "munge"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        shutil.chown(self.dir / "munge", "munge", "munge")
        os.chmod(self.dir, 0o755)  # munged checks that every directory above its socket is searchable
        os.chmod(self.dir / "munge", 0o755)
        prolog = self.dir / "task_prolog.sh"
        # Both nodes are one host: give streaming (and anything else node-local, like /dev/shm) the
        # host's truth, every task of the step on one node. A real cluster needs none of this.
        prolog.write_text("#!/bin/sh\necho \"export LOCAL_RANK=$SLURM_PROCID\"\n"
                          "echo \"export LOCAL_WORLD_SIZE=$SLURM_STEP_NUM_TASKS\"\n")
        prolog.chmod(0o755)
        self._write_conf()
        pid_file = self.dir / "munge" / "munged.pid"
        subprocess.run(["su", "-s", "/bin/bash", "munge", "-c",
                        f"/usr/sbin/munged --socket={self.munge_socket} --pid-file={pid_file} "
                        f"--log-file={self.dir / 'munge' / 'munged.log'} --seed-file={self.dir / 'munge' / 'seed'}"],
                       check=True, capture_output=True, timeout=30)
        self._pids.append(int(self._wait_file(pid_file).read_text()))
        subprocess.run(["/usr/sbin/slurmctld", "-f", str(self.conf)], env=self.env, check=True, timeout=30)
        self._pids.append(int(self._wait_file(self.dir / "slurmctld.pid").read_text()))
        for node in self.nodes:
            subprocess.run(["/usr/sbin/slurmd", "-f", str(self.conf), "-N", node], env=self.env, check=True,
                           timeout=30)
            self._pids.append(int(self._wait_file(self.dir / f"slurmd.{node}.pid").read_text()))
        deadline = time.time() + timeout
        while time.time() < deadline:
            out = self.run(["sinfo", "-h", "-N", "-o", "%N %t"]).stdout.split()
            if out.count("idle") == 2:
                return self
            time.sleep(0.5)
        raise RuntimeError(f"nodes not idle after {timeout:.0f} s: {out}; logs in {self.dir / 'log'}")

    def stop(self) -> None:
        """Cancel every job (slurmstepd and srun outlive the daemons otherwise), then SIGTERM each daemon
        this cluster started (by PID) and SIGKILL the ones still alive after 5 s."""
        if self._pids:
            self.run(["scancel", "--full", "--user", "root"])
            deadline = time.time() + 20
            while time.time() < deadline and self.run(["squeue", "-h"]).stdout.strip():
                time.sleep(0.2)
        for pid in self._pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.time() + 5
        for pid in self._pids:
            while time.time() < deadline and _alive(pid):
                time.sleep(0.1)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        self._pids.clear()

    def run(self, cmd: list[str], timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout, **kw)

    def _write_conf(self) -> None:
        d = self.dir
        lines = [
            "ClusterName=fwpkmtest", f"SlurmctldHost={self.host}", "SlurmUser=root",
            f"SlurmctldPort={_free_port()}",
            "AuthType=auth/munge", "CredType=cred/munge", f"AuthInfo=socket={self.munge_socket},cred_expire=5",  # requeued jobs wait cred_expire s
            f"StateSaveLocation={d}/state", f"SlurmdSpoolDir={d}/spool/%n",
            f"SlurmctldPidFile={d}/slurmctld.pid", f"SlurmdPidFile={d}/slurmd.%n.pid",
            f"SlurmctldLogFile={d}/log/slurmctld.log", f"SlurmdLogFile={d}/log/slurmd.%n.log",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "SchedulerType=sched/backfill",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core", "ReturnToService=2",
            "MpiDefault=none", "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none", "SwitchType=switch/none",
            f"TaskProlog={d}/task_prolog.sh", "KillWait=5", "MinJobAge=300", "SchedulerParameters=defer_batch,sched_interval=1", 
        ]
        port = _free_port_pair()
        lines.append(f"NodeName=node[1-2] NodeHostname={self.host} NodeAddr=127.0.0.1 "
                     f"Port=[{port}-{port + 1}] CPUs=2 RealMemory=4000 State=UNKNOWN")
        lines.append("PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4")
        self.conf.write_text("\n".join(lines) + "\n")

    @staticmethod
    def _wait_file(path: Path, timeout: float = 20.0) -> Path:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if path.is_file() and path.read_text().strip():
                return path
            time.sleep(0.05)
        raise RuntimeError(f"{path}: not written within {timeout:.0f} s")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
