"""An endless, exactly resumable stream of token batches over one split of a prepared directory, or of
a weighted mixture of several.

`build_loader(data_cfg, "train", ...)` wraps a `streaming.StreamingDataset` + `StreamingDataLoader` and
adds what a trainer needs on top: `next_batch()` rolls into the next epoch by itself, and
`state_dict()`/`load_state_dict()` give an exact resume, epoch boundaries included, also at another
data-parallel size.

Order independent of the GPU count. streaming shuffles over `num_canonical_nodes` canonical nodes
(fixed here, DEFAULT_CANONICAL_NODES unless configured, never derived from the node count) and deals
the epoch's positions out in order: global batch k of the epoch holds positions [k G, (k + 1) G),
G = batch_size * world_size, split over the ranks (rank r takes every world_size-th position of each
node's share). So for a fixed G the sequence of global batches, each as a set of samples, is the same
at DP=1, 2 or 64; and epoch e's order depends only on (seed, e, num_canonical_nodes).

Epochs are counted, not detected: each epoch yields exactly `batches_per_epoch = usable // G` batches
on every rank, where `usable` counts the epoch's positions before streaming's first padding repeat
(_usable_samples), so no sample is read twice in an epoch and ranks roll over at the same step. The
resume position is (epoch, sample_in_epoch = batch_in_epoch * G); a stream of another DP size resumes
from it if it is a whole number of its own global batches. Loading a saved state into a used stream
rewinds it (e.g. the same val batches at every evaluation).

Rank layout. streaming reads RANK / WORLD_SIZE / LOCAL_WORLD_SIZE from the environment; it cannot be
told a rank. `rank`/`world_size` here are the *data-parallel* rank and size and are checked against the
environment: WORLD_SIZE must be world_size * r with r consecutive global ranks sharing one data rank
(RANK // r == rank). r > 1 (tensor/context parallel inner to data parallel) becomes streaming's
`replication`, so those ranks read identical batches. Pipeline stages fit only when data parallel is
the outermost axis (megatron `order="tp-cp-ep-pp-dp"`); then every stage of a replica reads the same
batches. Single process: leave the variables unset.
If WORLD_SIZE > 1 and torch.distributed is not initialized, streaming initializes (and destroys) a
process group itself; initialize it first. Construct streams on every rank in the same order
(construction runs collectives), and call next_batch() on every rank of a node in step (streaming
syncs the node's ranks at each epoch start through shared memory).
"""
from __future__ import annotations

import atexit
import functools
import gc
import hashlib
import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fwpkm_megatron.config import DataConfig
from fwpkm_megatron.data.layout import ALL_SPLITS, MANIFEST, TOKENIZER, read_manifest
from fwpkm_megatron.data.readers import DataError
from fwpkm_megatron.data.streaming_compat import import_streaming

log = logging.getLogger(__name__)
STATE_VERSION = 2  # 2: position in samples, fixed canonical nodes (v1 pinned them to the node count)
_PREFIX_RETRIES = 5
DEFAULT_CANONICAL_NODES = 8  # a multiple of every node count up to 8; set a larger multiple for bigger runs
_swept = False  # the stale-shm sweep runs once per process, before its first StreamingDataset


# ---------------------------------------------------------------- stale shared memory

def _mapped_shm_names() -> set[str]:
    """Basenames of /dev/shm files mapped by live processes of this user (from /proc/<pid>/maps)."""
    names: set[str] = set()
    uid = os.getuid()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if entry.stat().st_uid != uid:
                continue
            with open(f"/proc/{entry.name}/maps") as maps:
                for line in maps:
                    at = line.find("/dev/shm/")
                    if at >= 0:
                        names.add(line[at + 9:].split()[0])
        except OSError:  # the process exited, or its maps are private
            continue
    return names


def sweep_stale_shared_memory() -> list[str]:
    """Remove streaming's shared memory and filelocks that no live process uses; return the paths.

    A crash that also kills Python's resource tracker (OOM killer, `kill -9` of a job) leaves
    `/dev/shm/<prefix>_<name>` segments behind; later runs that share a local dir with a remote then
    fail with "Reused local directory". Every exit also leaves `<tmp>/<prefix>_*_filelock` files, which
    make each later dataset search past their prefixes. A prefix is stale when no live process of this
    user maps any of its segments.

    This is deliberately narrower than `streaming.base.util.clean_stale_shared_memory()`, which unlinks
    every segment from prefix 0 up, including those of live datasets in this process (the train stream
    when the val stream is built) or another job, and runs a barrier that hangs if ranks decide
    differently. Linux only (/dev/shm and /proc); elsewhere a no-op.
    """
    constant = import_streaming().base.constant
    shm_dir, tmp_dir = Path("/dev/shm"), Path(tempfile.gettempdir())
    if not shm_dir.is_dir() or not Path("/proc/self/maps").exists():
        return []
    shm_pat = re.compile(r"^(\d{6})_(%s)$" % "|".join(map(re.escape, constant.SHM_TO_CLEAN)))
    lock_pat = re.compile(r"^(\d{6})_(%s|%s)$" % (constant.BARRIER_FILELOCK, constant.CACHE_FILELOCK))
    uid = os.getuid()

    def owned(directory: Path, pattern: re.Pattern) -> dict[str, list[Path]]:
        found: dict[str, list[Path]] = {}
        for entry in os.scandir(directory):
            match = pattern.match(entry.name)
            try:
                if match and entry.stat().st_uid == uid:
                    found.setdefault(match[1], []).append(Path(entry.path))
            except OSError:
                continue
        return found

    segments, locks = owned(shm_dir, shm_pat), owned(tmp_dir, lock_pat)
    if not segments and not locks:
        return []
    live = _mapped_shm_names()
    live_prefixes = {p for p, paths in segments.items() if any(x.name in live for x in paths)}
    # A dead prefix's filelocks go only above every live prefix: ranks find their job's prefix by walking
    # up from 0 past prefixes that have filelocks, so a hole below a live prefix could stop another job's
    # walk short (streaming's prefix choice is not atomic). Zero-padded prefixes compare as strings.
    top = max(live_prefixes, default="")
    candidates = list(segments.items()) + [(p, paths) for p, paths in locks.items() if p > top]
    removed = []
    for prefix, paths in candidates:
        if prefix in live_prefixes:
            continue
        for path in paths:
            try:
                path.unlink()
                removed.append(str(path))
            except FileNotFoundError:
                pass
    return removed


def _sweep_once() -> None:
    """Run the sweep on local rank 0 before this process's first stream; other ranks wait for it."""
    global _swept
    if _swept:
        return
    _swept = True
    if int(os.environ.get("LOCAL_RANK", 0)) == 0:
        removed = sweep_stale_shared_memory()
        segments = sorted(p for p in removed if p.startswith("/dev/shm/"))
        if segments:
            log.warning("removed %d stale streaming shared-memory segments left by a crashed run: %s",
                        len(segments), ", ".join(segments))
        if len(removed) > len(segments):  # every exit leaves these; they only lengthen prefix search
            log.debug("removed %d stale streaming filelocks", len(removed) - len(segments))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()  # no rank may pick a shm prefix while rank 0 is still sweeping


# ---------------------------------------------------------------- the stream

def _collate_tokens(samples: list[dict[str, np.ndarray]], width: int) -> torch.Tensor:
    """Stack samples cropped to `width` tokens -> int64 [B, width]. Module-level for worker pickling."""
    return torch.from_numpy(np.stack([s["tokens"][:width] for s in samples]).astype(np.int64))


def _data_replication(rank: int, world_size: int) -> int:
    """How many consecutive global ranks share one data rank; DataError if env and args disagree."""
    env_rank, env_world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world_size < 1 or not 0 <= rank < world_size:
        raise DataError(f"rank={rank}, world_size={world_size}: need 0 <= rank < world_size")
    replication = env_world // world_size
    if env_world % world_size or env_rank // max(replication, 1) != rank:
        raise DataError(
            f"data rank {rank} of {world_size} does not fit the environment RANK={env_rank}, "
            f"WORLD_SIZE={env_world} (unset = 0 and 1) that streaming partitions by: need WORLD_SIZE = "
            f"world_size * r and RANK // r == rank (data-parallel outermost)")
    return replication


def _fetch_metadata(path: Path, remote: str) -> None:
    """Download manifest.json and tokenizer.json from `remote` if they are not under `path` yet."""
    streaming = import_streaming()
    path.mkdir(parents=True, exist_ok=True)
    for name in (MANIFEST, TOKENIZER):
        if (path / name).exists():
            continue
        part = path / f".{name}.{os.getpid()}.part"  # ranks of a node may fetch at once
        try:
            streaming.base.storage.CloudDownloader.direct_download(f"{remote}/{name}", str(part))
            os.replace(part, path / name)
        except Exception as exc:  # each cloud SDK raises its own types
            raise DataError(f"{remote}/{name}: cannot fetch into {path} ({exc})") from None


@dataclass(frozen=True)
class MixtureSource:
    """One dataset of a weighted mixture: a prepared directory (mirrored from `remote` if set).

    Weights are relative; each epoch draws weight / sum(weights) of its samples from this source
    (streaming's `proportion`: sources are up- or down-sampled, the epoch holds as many samples as all
    sources together).
    """
    path: str
    remote: str | None = None
    weight: float = 1.0


def _check_tokenizer(path: Path, manifest: dict[str, Any]) -> str:
    """sha256 of path/tokenizer.json, checked against the manifest; DataError naming the file if off."""
    file = path / TOKENIZER
    try:
        digest = hashlib.sha256(file.read_bytes()).hexdigest()
    except OSError as exc:
        raise DataError(f"{file}: cannot read ({exc.strerror})") from None
    expected = manifest.get("tokenizer", {}).get("sha256")
    if expected is not None and digest != expected:
        raise DataError(f"{file}: does not match the tokenizer the shards at {path} were made with "
                        f"(sha256 {digest[:12]}..., manifest {expected[:12]}...); re-run fwpkm-prep")
    return digest


def _usable_samples(epoch_size: int, num_canonical_nodes: int) -> int:
    """Leading epoch positions that streaming fills without repeats (the rest pads canonical nodes).

    streaming's "orig" partition cuts the epoch into num_canonical_nodes rows of ceil(E / ncn) and fills
    each short row with its own last sample; read column by column, the first repeat is at
    (ceil(E / ncn) - 1) * ncn + (first short row). Positions before it are a permutation, whatever
    the number of nodes or ranks (as long as nodes divide ncn).
    """
    ncn = num_canonical_nodes
    per_node = -(-epoch_size // ncn)
    rows = np.arange(ncn)
    short = np.flatnonzero((rows + 1) * epoch_size // ncn - rows * epoch_size // ncn < per_node)
    return epoch_size if not len(short) else (per_node - 1) * ncn + int(short[0])


class TokenStream:
    """Endless batches [batch_size, seq_len + 1] of int64 token ids from one split of one dataset or a
    weighted mixture.

    Attributes:
        vocab_size, eos_id: from the prepared directory's manifest (all mixture members agree).
        num_samples: samples per epoch (of the mixture); batches_per_epoch: full batches each rank reads
            per epoch, usable // (batch_size * world_size) (module docstring).
        num_canonical_nodes: streaming's canonical node count; fixes the order (module docstring).
        epoch, batch_in_epoch: position of the next batch (epoch advances after batches_per_epoch).
    """

    def __init__(self, data_cfg: DataConfig, split: str, *, batch_size: int, seq_len: int, seed: int,
                 rank: int = 0, world_size: int = 1, mixture: Sequence[MixtureSource] | None = None,
                 num_canonical_nodes: int | None = None):
        if split not in ALL_SPLITS:
            raise DataError(f"split={split!r}: must be one of {ALL_SPLITS}")
        if batch_size < 1 or seq_len < 1 or seed < 0:
            raise DataError(f"batch_size={batch_size}, seq_len={seq_len}, seed={seed}: need batch_size >= 1, "
                            "seq_len >= 1, seed >= 0")
        sources = list(mixture) if mixture else [MixtureSource(data_cfg.cache_dir, data_cfg.remote, 1.0)]
        ncn = num_canonical_nodes or DEFAULT_CANONICAL_NODES
        if ncn < 1:
            raise DataError(f"num_canonical_nodes={ncn}: must be >= 1")
        bad = [f"{s.path}: weight={s.weight}" for s in sources if not s.weight > 0]
        if bad:
            raise DataError("mixture weights must be > 0: " + "; ".join(bad))
        self.replication = _data_replication(rank, world_size)
        self.cfg, self.split, self.seed = data_cfg, split, seed
        self.batch_size, self.seq_len, self.rank, self.world_size = batch_size, seq_len, rank, world_size
        self.num_canonical_nodes = ncn
        self._streams, identity, tokenizers = [], [], {}
        for source in sources:
            path = Path(source.path)
            remote = source.remote.rstrip("/") if source.remote else None
            if remote is not None:
                _fetch_metadata(path, remote)
            manifest = read_manifest(path, check_shards=remote is None)
            if split not in manifest["splits"]:
                raise DataError(f"{path}: has no {split!r} split (has {', '.join(manifest['splits'])}); "
                                "prepare it with fwpkm-prep --test-fraction")
            if seq_len > manifest["seq_len"]:
                raise DataError(f"seq_len={seq_len} exceeds the prepared seq_len={manifest['seq_len']} of {path}; "
                                "re-run fwpkm-prep with a larger --seq-len")
            tokenizers[str(path)] = (_check_tokenizer(path, manifest), manifest["vocab_size"], manifest["eos_id"])
            self._streams.append((str(path / split), f"{remote}/{split}" if remote else None, source.weight,
                                  manifest["splits"][split]["samples"]))
            identity.append([manifest["source"].get("content_sha256"), manifest["splits"][split]["samples"],
                             source.weight / sum(s.weight for s in sources)])
        if len(set(tokenizers.values())) > 1:
            raise DataError("mixture members were tokenized differently (tokenizer sha256, vocab_size, eos_id): "
                            + "; ".join(f"{p}: {t[0][:12]}..., {t[1]}, {t[2]}" for p, t in tokenizers.items()))
        _, self.vocab_size, self.eos_id = next(iter(tokenizers.values()))
        self.data_id = hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:16]
        self._local = self._streams[0][0] if len(self._streams) == 1 else f"mixture of {len(self._streams)}"
        self.epoch, self.batch_in_epoch = 0, 0
        self._dataset = self._loader = self._iter = None
        _sweep_once()
        self._build()

    def _build(self) -> None:
        """The StreamingDataset + loader; shards are read from the first batch on."""
        streaming = import_streaming()
        world = streaming.base.world.World.detect()
        data_world = world.replicate(self.replication) if self.replication > 1 else world
        if self.num_canonical_nodes % data_world.num_nodes:
            raise DataError(f"num_canonical_nodes={self.num_canonical_nodes} is not a multiple of the "
                            f"{data_world.num_nodes} nodes; set it to a multiple of the largest node count "
                            "the run will use")
        if len(self._streams) == 1:
            local, remote, _, _ = self._streams[0]
            data: dict[str, Any] = {"local": local, "remote": remote}
        else:
            data = {"streams": [streaming.Stream(local=local, remote=remote, proportion=weight)
                                for local, remote, weight, _ in self._streams]}
        kwargs = dict(
            **data, shuffle=self.cfg.shuffle, shuffle_seed=self.seed, batch_size=self.batch_size,
            num_canonical_nodes=self.num_canonical_nodes, partition_algo="orig", shuffle_algo="py1e",
            predownload=8 * self.batch_size,  # streaming's defaults, spelled out (it logs when guessing)
            shuffle_block_size=max(4_000_000 // self.num_canonical_nodes, 1 << 18),
            replication=self.replication if self.replication > 1 else None,
            cache_limit=self.cfg.cache_limit if any(remote for _, remote, _, _ in self._streams) else None)
        for attempt in range(_PREFIX_RETRIES):
            try:
                self._dataset = streaming.StreamingDataset(**kwargs)
                break
            except ValueError as exc:
                if "cache" in str(exc).lower() and kwargs["cache_limit"] is not None:
                    raise DataError(f"data.cache_limit={self.cfg.cache_limit!r} for {self._local}: {exc}") from None
                raise
            except FileExistsError:
                # Another job on this machine registered the same shm prefix between streaming's
                # scan and its create (the choice is not atomic). Only a lone process may retry:
                # ranks of one job must pick their prefix together.
                if world.num_ranks > 1 or attempt == _PREFIX_RETRIES - 1:
                    raise
                time.sleep(0.05 * (attempt + 1))
        self._loader = streaming.StreamingDataLoader(
            self._dataset, batch_size=self.batch_size, drop_last=True, num_workers=self.cfg.num_workers,
            collate_fn=functools.partial(_collate_tokens, width=self.seq_len + 1))
        self.num_samples = int(self._dataset.epoch_size)
        if self.num_samples <= self.num_canonical_nodes:
            raise DataError(f"{self._local}: {self.num_samples} samples per epoch, not more than "
                            f"num_canonical_nodes={self.num_canonical_nodes}; use fewer canonical nodes")
        self.global_batch = self.batch_size * self.world_size
        self.batches_per_epoch = _usable_samples(self.num_samples, self.num_canonical_nodes) // self.global_batch
        if self.batches_per_epoch < 1:
            raise DataError(f"{self._local}: {self.num_samples} samples over world_size={self.world_size} give "
                            f"fewer than batch_size={self.batch_size} per rank")

    def next_batch(self) -> torch.Tensor:
        """The next batch, int64 [batch_size, seq_len + 1]; inputs are [:, :-1], labels [:, 1:]."""
        if self.batch_in_epoch >= self.batches_per_epoch:
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
            self._stop_epoch()  # drop the tail; the next iter() starts streaming's next epoch
        first = self._iter is None
        if first:
            self._iter = iter(self._loader)
        try:
            batch = next(self._iter)
        except StopIteration:
            raise RuntimeError(f"{self._local}: epoch {self.epoch} ended after {self.batch_in_epoch} batches, "
                               f"streaming promised {self.batches_per_epoch}") from None
        if first and self._dataset.next_epoch != self.epoch + 1:
            raise RuntimeError(f"{self._local}: streaming is in epoch {self._dataset.next_epoch - 1}, "
                               f"the stream expected {self.epoch}")
        self.batch_in_epoch += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        """Position and identity of the stream: plain ints and strings, identical on every rank."""
        return {"version": STATE_VERSION, "split": self.split, "epoch": self.epoch,
                "sample_in_epoch": self.batch_in_epoch * self.global_batch,
                "batch_in_epoch": self.batch_in_epoch, "seed": self.seed, "shuffle": self.cfg.shuffle,
                "batch_size": self.batch_size, "world_size": self.world_size, "num_samples": self.num_samples,
                "num_canonical_nodes": self.num_canonical_nodes, "data_id": self.data_id}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where the stream that produced `state` was, also at another data-parallel size.

        The position is kept in samples of the epoch; it must be a whole number of this stream's global
        batches (batch_size * world_size). With the same global batch the remaining batches are those
        of the saved stream, each the same set of samples (module docstring).

        Raises:
            DataError: the state is malformed, from a stream over other data, split, seed, shuffle or
                canonical nodes, or at a sample position this batch layout cannot continue from.
        """
        mine = self.state_dict()
        if state.get("version") != STATE_VERSION:
            raise DataError(f"stream state: version {state.get('version')!r}, this code reads {STATE_VERSION} "
                            "(a checkpoint from before the layout-independent order; its data position "
                            "cannot be resumed exactly)")
        missing = [k for k in mine if k not in state]
        if missing:
            raise DataError(f"stream state: missing keys {missing}")
        fixed = ("split", "seed", "shuffle", "num_samples", "num_canonical_nodes", "data_id")
        diff = [f"{k}: saved {state[k]!r}, now {mine[k]!r}" for k in fixed if state[k] != mine[k]]
        if diff:
            raise DataError("stream state does not match this stream (an exact resume needs the same data, "
                            "seed and canonical nodes): " + "; ".join(diff))
        epoch, sample = int(state["epoch"]), int(state["sample_in_epoch"])
        usable = self.batches_per_epoch * self.global_batch
        saved_usable = (_usable_samples(self.num_samples, self.num_canonical_nodes)
                        // (state["batch_size"] * state["world_size"]) * state["batch_size"] * state["world_size"])
        if sample == saved_usable:  # saved right after an epoch's last batch
            epoch, sample = epoch + 1, 0
        if epoch < 0 or not 0 <= sample <= usable or sample % self.global_batch:
            raise DataError(f"stream state: epoch={epoch}, sample_in_epoch={sample} is not a whole number of "
                            f"global batches of {self.batch_size} x {self.world_size} within this epoch's {usable} "
                            "samples")
        batch = sample // self.global_batch
        self._stop_epoch()
        if batch == self.batches_per_epoch:
            epoch, batch = epoch + 1, 0
        self.epoch, self.batch_in_epoch = epoch, batch
        # Written on every rank before its next batch; streaming's first-batch barrier orders these
        # writes before the local leader advances next_epoch, so ranks cannot undo each other.
        self._dataset.next_epoch = epoch  # else a used stream treats an older epoch's state as stale
        self._dataset.load_state_dict({
            "epoch": epoch, "sample_in_epoch": batch * self.global_batch,
            "num_canonical_nodes": self.num_canonical_nodes, "shuffle_seed": self.seed,
            "initial_physical_nodes": None})

    def __enter__(self) -> TokenStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _stop_epoch(self) -> None:
        """Stop the running epoch's reader threads (workers stop when their iterator is dropped)."""
        if self._iter is not None:
            iterator = getattr(self._dataset, "_iterator", None)  # no public stop for a running epoch
            if iterator is not None:
                iterator.exit()
            self._iter = None

    def close(self) -> None:
        """Stop reading and release the local directory and shared memory; the stream is unusable afterwards."""
        if self._dataset is None:
            return
        self._stop_epoch()
        shared, locks = shared_memory_of(self._dataset), _own_filelocks(self._dataset)
        self._iter = self._loader = self._dataset = None
        release_shared_memory(shared, locks)


_kept_filelocks: list[tuple[str, list[str]]] = []  # released datasets' filelocks not yet safe to remove


def _own_filelocks(dataset) -> tuple[str, list[str]]:
    """(prefix, its `<tmp>/<prefix>_*_filelock` paths) of a lone process's dataset; ("", []) for the ranks of a
    parallel job, which share them (the next run's `sweep_stale_shared_memory` removes those)."""
    if dataset._unique_rank_world.ranks_per_node != 1:
        return "", []
    constant = import_streaming().base.constant
    prefix = f"{dataset._shm_prefix_int:06d}"
    return prefix, [os.path.join(dataset._filelock_root, f"{prefix}_{name}")
                    for name in (constant.BARRIER_FILELOCK, constant.CACHE_FILELOCK)]


def release_shared_memory(shared: list, locks: tuple[str, list[str]] = ("", [])) -> None:
    """Close and unlink the segments of a dropped StreamingDataset now, then remove its own filelocks.

    streaming never removes those. They go only when no live prefix lies above this one: ranks find their
    job's prefix by walking up from 0 past prefixes with filelocks, and a hole below a live prefix could
    stop such a walk short. No other job's segments or files are touched.
    """
    gc.collect()  # the dataset's numpy views must die before their buffers can close
    for shm in shared:
        # streaming keeps every segment open until exit (an atexit hook per segment): one open
        # file per segment per stream, which a process building many streams runs out of.
        atexit.unregister(shm.cleanup)
        try:
            shm.cleanup()
        except BufferError:  # still viewed somewhere: leave it to exit, as streaming would
            atexit.register(shm.cleanup)
    if locks[1]:
        _kept_filelocks.append(locks)
    live = {name[:6] for name in _mapped_shm_names() if re.match(r"\d{6}_", name)}
    for prefix, paths in list(_kept_filelocks):  # also this process's earlier ones, kept for a live prefix above
        if not any(p >= prefix for p in live):
            for path in paths:
                Path(path).unlink(missing_ok=True)
            _kept_filelocks.remove((prefix, paths))


def storage_order_samples(local: str | os.PathLike, limit: int | None = None):
    """The `tokens` of one prepared split's samples in storage order (no shuffle), as numpy copies.

    For evaluation (perplexity, NIAH haystacks). The StreamingDataset is released like a closed
    TokenStream when the iteration ends or the generator is dropped.
    """
    ds = import_streaming().StreamingDataset(local=str(local), shuffle=False, batch_size=1)
    shared, locks = shared_memory_of(ds), _own_filelocks(ds)
    try:
        n = ds.num_samples if limit is None else min(limit, ds.num_samples)
        for i in range(n):
            yield np.array(ds[i]["tokens"])  # a copy: nothing outlives the dataset's shared memory
    finally:
        del ds
        release_shared_memory(shared, locks)


def stored_samples(split_dir: str | os.PathLike) -> np.ndarray:
    """Every sample of a prepared split directory in storage order, [S, sample_len] (no shuffle, no
    loader), with the dataset's shared memory released afterwards."""
    return np.stack(list(storage_order_samples(split_dir)))


def shared_memory_of(dataset) -> list:
    """The streaming SharedMemory segments a StreamingDataset holds, directly or in its shared arrays/barriers."""
    from streaming.base.shared.memory import SharedMemory

    found, seen, todo = [], set(), [dataset]
    while todo:
        obj = todo.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, SharedMemory):
            found.append(obj)
        elif isinstance(obj, (list, tuple)):
            todo.extend(obj)
        elif type(obj).__module__.startswith("streaming") and hasattr(obj, "__dict__"):
            todo.extend(vars(obj).values())
    return found


def build_loader(data_cfg: DataConfig, split: str, *, batch_size: int, seq_len: int, seed: int,
                 rank: int = 0, world_size: int = 1, mixture: Sequence[MixtureSource] | None = None,
                 num_canonical_nodes: int | None = None) -> TokenStream:
    """A TokenStream over `data_cfg.path/split`, or streamed from `data_cfg.remote/split` through the
    local cache `data_cfg.local` (default: `path`) of at most `data_cfg.cache_limit` per stream, or over
    a weighted mixture of prepared directories.

    Args:
        data_cfg: path of a prepared directory (fwpkm-prep); optional remote root (s3://, gs://, ...).
            With a remote, construction fetches only what is missing locally of manifest.json,
            tokenizer.json and the split's index.json; shards come on first use. A fully mirrored
            path never contacts the remote. `shuffle` and `num_workers` apply to mixtures too.
        split: "train", "val" or "test" (if prepared).
        batch_size: samples per rank per batch.
        seq_len: <= the prepared seq_len; samples are cropped to seq_len + 1 tokens.
        seed: shuffle seed (>= 0); epoch e's order depends on (seed, e, num_canonical_nodes) only.
        rank, world_size: data-parallel rank and size, checked against RANK/WORLD_SIZE (module docstring).
        mixture: datasets with weights to mix instead of data_cfg.path/remote; they must share a
            tokenizer. Default: `data_cfg.mixture` if the config has that field.
        num_canonical_nodes: fixes the sample order for every GPU count; must be a multiple of the node
            count. Default: `data_cfg.num_canonical_nodes` if set, else DEFAULT_CANONICAL_NODES.

    Raises:
        DataError: missing or broken prepared directory, tokenizer/shards mismatch, mixture members with
            different tokenizers, seq_len above the prepared one, a split too small for one batch per
            rank, or a rank layout streaming cannot express.
    """
    if mixture is None:
        mixture = [MixtureSource(**m) if isinstance(m, dict) else m for m in data_cfg.mixture]
    if num_canonical_nodes is None:
        num_canonical_nodes = data_cfg.num_canonical_nodes
    return TokenStream(data_cfg, split, batch_size=batch_size, seq_len=seq_len, seed=seed, rank=rank,
                       world_size=world_size, mixture=mixture or None, num_canonical_nodes=num_canonical_nodes)

