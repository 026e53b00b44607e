"""The hidden partial directory `.DIR.partial/` where a prep of DIR keeps its work until it is complete,
and the atomic install of the finished directory.

    lock          flock held while a prep runs; a second prep on the same DIR stops with an error
    inputs/       local copies of remote inputs (by file key)
    scan/ units/  content-keyed stage results (units.py)
    tokenizers/   the tokenizer in use, by content (a given one) or by what it was trained on
    final/        the directory being assembled; renamed to DIR when complete

The partial survives a kill and a bad input (its finished work stays valid: it is keyed by content),
and is removed when the prep completes.
"""
from __future__ import annotations

import fcntl
import logging
import os
import secrets
import shutil
from pathlib import Path

from fwpkm_megatron.data.readers import DataError
from fwpkm_megatron.data.units import held_locks

log = logging.getLogger(__name__)


def partial_dir(out: Path) -> Path:
    """Where an unfinished prep of `out` keeps its work (module docstring)."""
    return out.parent / f".{out.name}.partial"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_dead_temps(out: Path) -> None:
    """Delete `.DIR.tmp-<pid>-*` siblings of preps that were killed (their pid is gone)."""
    for tmp in out.parent.glob(f".{out.name}.tmp-*"):
        pid = tmp.name.rsplit(".tmp-", 1)[1].split("-")[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            log.warning("removing %s, left by an interrupted prep", tmp)
            shutil.rmtree(tmp, ignore_errors=True)


class Partial:
    """The locked partial directory of a prep of `out`."""

    def __init__(self, out: Path):
        self.root = partial_dir(out)
        self.created = not self.root.exists()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self._lock = open(self.root / "lock", "a+")
        except OSError as exc:
            raise DataError(f"{out}: output location not writable ({exc.strerror}: {self.root})") from None
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise DataError(f"{out}: another fwpkm-prep is writing it (lock {self.root / 'lock'} is held)") from None
        held_locks.add(self._lock.fileno())
        for name in ("inputs", "scan", "units", "tokenizers"):
            (self.root / name).mkdir(exist_ok=True)

    def has_work(self) -> bool:
        """Whether any stage result is stored (else the partial holds nothing worth keeping)."""
        return any(any((self.root / d).iterdir()) for d in ("inputs", "scan", "units", "tokenizers"))

    def prune_units(self, keep: str) -> None:
        """Drop units tokenized with another tokenizer (they can never be reused with this one)."""
        for old in (self.root / "units").iterdir():
            if old.name != keep:
                log.warning("discarding %s: units tokenized with another tokenizer", old)
                shutil.rmtree(old, ignore_errors=True)

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
        self.close()

    def close(self) -> None:
        if not self._lock.closed:
            held_locks.discard(self._lock.fileno())
            self._lock.close()


def install(tmp: Path, out: Path) -> None:
    """Rename the finished directory to `out`, replacing whatever the caller agreed to replace."""
    if out.exists():
        old = out.parent / f".{out.name}.tmp-{os.getpid()}-old-{secrets.token_hex(4)}"
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)
