"""Checksums of every stored array, verified on restore.

orbax's files carry no checksum of their own: a flipped byte in a data file restores as a
wrong value without any error. So every step records a CRC-32 of every array's bytes (C
order, the array's own dtype), keyed by the item and the array's joined key path, and
restore recomputes it on what was read and refuses an array whose bytes differ, naming its
path.

* **What is hashed.** At save, the host copy of every array, fetched in one batch of
  device-to-host copies (on CPU a view of the device buffer, no copy): for small arrays the
  same copy that is packed and handed to orbax (:mod:`jaxlora.checkpoint.layout`). An array
  this process holds only parts of (a multi-host sharding) is hashed per addressable shard,
  each keyed by its index (``[[start, stop], ...]`` per axis), only the replica-0 copy of
  each region, so across processes every region is recorded exactly once.
* **Overlapped.** The hashing runs in worker threads (``zlib.crc32`` releases the GIL)
  while orbax writes, and the records are written by the step's own ``checksums`` item
  (a JSON handler of its own) as part of the same atomic step: one JSON file per process,
  merged on restore. A step is listed only after its checksums are on disk.
* **Restore.** Packed arrays are verified on the host buffer as read, before they are put on
  devices, concurrently with that placement; the others on host views of the restored
  arrays. A shard record is verified by the process whose shards hold its region (on any
  restoring mesh); a region that no single process holds is gathered. In a multi-process
  run the verdict is shared, so every process raises the same error.

CRC-32 (``zlib``) detects every error burst up to 32 bits and all but 2⁻³² of the rest; it
guards against media and transfer corruption, not against deliberate tampering. Its cost
is measured in ``scripts/checkpoint_checksums.py``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import functools
import json
import math
import os
import zlib
from collections.abc import Iterable
from typing import Any

import jax
import numpy as np

from jaxlora.checkpoint.errors import CheckpointError, CorruptCheckpointError

__all__ = [
    "ALGORITHM",
    "ITEM",
    "Verifier",
    "checksum",
    "host_jobs",
    "merge_records",
    "restore_args",
    "save_args",
    "start",
    "verify",
]

ALGORITHM = "crc32"
"""The checksum recorded for every array (``meta["checksum_algorithm"]``)."""

ITEM = "checksums"
"""The name of the step item holding the records (``<step>/checksums/process_<i>.json``)."""

Index = list[list[int]]
"""A shard's region: ``[start, stop]`` per axis."""

_WORKERS = max(1, min(4, os.cpu_count() or 1))


@functools.cache
def _executor() -> concurrent.futures.ThreadPoolExecutor:
    """The hashing threads (``zlib.crc32`` releases the GIL on buffers over 5 KiB)."""
    return concurrent.futures.ThreadPoolExecutor(_WORKERS, thread_name_prefix="jaxlora-crc")


@functools.cache
def _starter() -> concurrent.futures.ThreadPoolExecutor:
    """Runs :func:`start`'s task, which waits on the hashing threads (so not one of them)."""
    return concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="jaxlora-sums")


def _crc(host: np.ndarray) -> str:
    data = np.ascontiguousarray(host).reshape(-1).view(np.uint8)
    return f"{zlib.crc32(data):08x}"


def checksum(x: Any) -> str:
    """CRC-32 of an array's bytes (C order) as 8 hex digits.

    Args:
      x: A numpy array or a fully addressable ``jax.Array``.

    Examples:
      >>> import numpy as np
      >>> checksum(np.zeros(4, np.float32)), checksum(np.ones(4, np.float32))
      ('ecbb4b55', 'e8681456')
    """
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        raise CheckpointError("checksum() needs an array this process holds in full")
    return _crc(np.asarray(x))


def _index(idx: tuple[slice, ...], shape: tuple[int, ...]) -> Index:
    return [list(s.indices(n)[:2]) for s, n in zip(idx, shape, strict=True)]


def _slices(index: Index) -> tuple[slice, ...]:
    return tuple(slice(a, b) for a, b in index)


@dataclasses.dataclass
class Job:
    """One buffer to hash: ``(item, joined path, shard index or None, host array)``."""

    item: str
    path: str
    index: Index | None
    host: Any


def host_jobs(
    item: str, paths: list[tuple[str, ...]], leaves: list[Any], host: list[Any]
) -> list[Job]:
    """The buffers of one item to hash at save, as host arrays taken now.

    Args:
      item: The item's name (``"adapters"``).
      paths: The leaves' key paths.
      leaves: The leaves.
      host: Each leaf's host copy (:func:`jaxlora.checkpoint.layout.to_host`), ``None``
        for an array this process holds only parts of: it gives one job per replica-0
        addressable shard, fetched here in one batch.

    Taking the host copies before ``save`` returns makes the hashing safe against the caller
    donating the arrays right after.
    """
    primary = jax.process_index() == 0  # whole arrays are written by the primary process
    jobs: list[Job] = []
    shards: list[tuple[Job, Any]] = []
    for p, x, h in zip(paths, leaves, host, strict=True):
        joined = "/".join(p)
        if h is not None:
            if primary:
                jobs.append(Job(item, joined, None, h))
            continue
        for shard in x.addressable_shards:
            if shard.replica_id == 0:
                shards.append((Job(item, joined, _index(shard.index, x.shape), None), shard.data))
    for _, data in shards:  # start every device->host copy before waiting for any
        data.copy_to_host_async()
    for job, data in shards:
        job.host = np.asarray(data)
        jobs.append(job)
    return jobs


def _chunks(hosts: list[np.ndarray]) -> list[list[np.ndarray]]:
    """``hosts`` split into up to one run per worker thread, of about equal bytes."""
    total = sum(h.nbytes for h in hosts)
    chunks, cur, acc = [], [], 0
    for h in hosts:
        cur.append(h)
        acc += h.nbytes
        if acc >= total / _WORKERS and len(chunks) < _WORKERS - 1:
            chunks.append(cur)
            cur, acc = [], 0
    chunks.append(cur)
    return chunks


def _submit(hosts: list[np.ndarray]) -> list[concurrent.futures.Future]:
    """Starts hashing ``hosts`` on the worker threads; the futures give their CRCs in order."""
    return [_executor().submit(lambda c: [_crc(h) for h in c], c) for c in _chunks(hosts)]


def _hash_all(jobs: list[Job]) -> list[str]:
    """CRCs of ``jobs`` in order, spread over the worker threads by bytes."""
    return [s for f in _submit([j.host for j in jobs]) for s in f.result()]


def _records(jobs: list[Job]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for job, crc in zip(jobs, _hash_all(jobs), strict=True):
        item = out.setdefault(job.item, {})
        if job.index is None:
            item[job.path] = crc
        else:
            item.setdefault(job.path, []).append([job.index, crc])
    return out


def start(jobs: list[Job]) -> concurrent.futures.Future:
    """Hashes ``jobs`` in the background; the future gives ``{item: {path: record}}``,
    a record being a CRC string (whole array) or a list of ``[index, crc]`` (shards)."""
    return _starter().submit(_records, jobs)


def merge_records(per_process: Iterable[dict[str, dict[str, Any]]]) -> dict[str, dict]:
    """One record set from every process's: shard lists are joined, and for a whole-array
    record the first process's (the primary, which wrote the array) is kept."""
    out: dict[str, dict[str, Any]] = {}
    for records in per_process:
        for item, sums in records.items():
            merged = out.setdefault(item, {})
            for path, rec in sums.items():
                if isinstance(rec, list):
                    have = merged.setdefault(path, [])
                    if isinstance(have, list):
                        have.extend(rec)
                else:
                    merged.setdefault(path, rec)
    return out


# -- the step item that holds the records


@functools.cache
def _orbax_types() -> tuple[type, type, type]:
    """``(ChecksumHandler, save args, restore args)``, made on first use so that importing
    jaxlora does not import orbax."""
    import orbax.checkpoint as ocp

    class ChecksumHandler(ocp.handlers.JsonCheckpointHandler):
        """Writes this process's records as ``process_<i>.json`` once they are computed, and
        restores every process's records merged.

        orbax's JSON handler runs ``_save_fn`` in the step's commit phase (a background
        thread, on every process), and the step is finalized only after every commit is
        done: so a listed step always has its records (tests check the file).
        """

        async def _save_fn(self, x, directory):
            records = await asyncio.wrap_future(x)
            directory.mkdir(parents=True, exist_ok=True)
            (directory / f"process_{jax.process_index()}.json").write_text(json.dumps(records))

        def restore(self, directory, item=None, args=None):
            files = sorted(
                directory.glob("process_*.json"), key=lambda f: int(f.stem.split("_", 1)[1])
            )
            if not files:
                raise FileNotFoundError(f"no checksum records in {directory}")
            return merge_records(json.loads(f.read_text()) for f in files)

    @ocp.args.register_with_handler(ChecksumHandler, for_save=True)
    @dataclasses.dataclass
    class ChecksumSave(ocp.args.CheckpointArgs):
        item: Any  # the future of start()

    @ocp.args.register_with_handler(ChecksumHandler, for_restore=True)
    @dataclasses.dataclass
    class ChecksumRestore(ocp.args.CheckpointArgs):
        item: Any = None

    return ChecksumHandler, ChecksumSave, ChecksumRestore


def save_args(records: concurrent.futures.Future) -> Any:
    """orbax save args of the step's checksums item, from the future of :func:`start`."""
    return _orbax_types()[1](records)


def restore_args() -> Any:
    """orbax restore args of the step's checksums item (gives the merged records)."""
    return _orbax_types()[2]()


# -- restore


class Verifier:
    """Checks one step's arrays as they are read; :meth:`finish` raises on any mismatch.

    Args:
      where: Names the step in messages (``"checkpoint step 3 in /run"``).
      records: ``{item: {path: record}}`` as saved.
    """

    def __init__(self, where: str, records: dict[str, dict[str, Any]]):
        self.where = where
        self.records = records
        self._pending: list[tuple[list[tuple[str, ...]], list[concurrent.futures.Future]]] = []
        self._bad: dict[str, list[str]] = {}

    def _mismatch(self, item: str, path: str, detail: str) -> None:
        self._bad.setdefault(item, []).append(f"{path} ({detail})")

    def _check(self, checks: list[tuple[str, str, str, str, np.ndarray]]) -> None:
        """Starts hashing ``(item, path, what, saved crc, host array)`` in the background."""
        if checks:
            futures = _submit([c[4] for c in checks])
            self._pending.append(([c[:4] for c in checks], futures))

    def host_buffers(self, item: str, members: dict[str, np.ndarray]) -> None:
        """Starts checking packed arrays given as host arrays (before they are placed)."""
        sums = self.records.get(item, {})
        self._check(
            [(item, p, "", sums[p], h) for p, h in members.items() if isinstance(sums.get(p), str)]
        )

    def arrays(self, item: str, paths: list[tuple[str, ...]], leaves: list[Any]) -> None:
        """Checks restored (unpacked) arrays, whole or by the shard regions recorded."""
        sums = self.records.get(item, {})
        local, checks, gather = [], [], []
        for p, x in zip(paths, leaves, strict=True):
            joined = "/".join(p)
            rec = sums.get(joined)
            if rec is None:
                continue
            whole = isinstance(rec, str)
            regions = [[[[0, n] for n in np.shape(x)], rec]] if whole else rec
            if not isinstance(x, jax.Array) or x.is_fully_addressable:
                local.append((joined, x, regions, whole))
                continue
            for index, want in regions:
                verifier = _verifier(x, index)
                if verifier is None:
                    gather.append((joined, x, index, want))
                elif verifier == jax.process_index():
                    checks.append((item, joined, f"shard {index}: ", want, _assemble(x, index)))
        for _, x, _, _ in local:  # start every device->host copy before waiting for any
            if isinstance(x, jax.Array):
                x.copy_to_host_async()
        for joined, x, regions, whole in local:
            host = np.asarray(x)
            for index, want in regions:
                what = "" if whole else f"shard {index}: "
                checks.append((item, joined, what, want, host[_slices(index)]))
        if gather:
            from jax.experimental import multihost_utils

            gathered: dict[str, np.ndarray] = {}
            for joined, x, index, want in gather:  # same order on every process
                if joined not in gathered:
                    everyone = multihost_utils.process_allgather(x, tiled=True)
                    gathered[joined] = np.asarray(everyone)
                host = gathered[joined][_slices(index)]
                checks.append((item, joined, f"shard {index}: ", want, host))
        self._check(checks)

    def finish(self) -> None:
        """Waits for the background checks; raises :class:`CorruptCheckpointError` naming
        every array that failed (the same on every process)."""
        for checks, futures in self._pending:
            got = [s for f in futures for s in f.result()]
            for (item, path, what, want), crc in zip(checks, got, strict=True):
                if crc != want:
                    self._mismatch(item, path, f"{what}crc32 {crc}, saved {want}")
        self._pending.clear()
        bad = [(item, b) for item, entries in self._bad.items() for b in entries]
        if jax.process_count() > 1:
            bad = _share(bad)
        if bad:
            items = ", ".join(sorted({item for item, _ in bad if item}))
            more = f" and {len(bad) - 4} more" if len(bad) > 4 else ""
            where = f"{self.where}, {items}" if items else self.where
            raise CorruptCheckpointError(
                f"{where}: checksum mismatch, the stored bytes of "
                f"{', '.join(b for _, b in bad[:4])}{more} changed after they were written "
                "(disk or transfer corruption)"
            )


def _unique_indices(x: jax.Array, process: int | None = None) -> list[Index]:
    """The distinct shard regions of ``x`` held by ``process`` (every process: ``None``)."""
    seen, out = set(), []
    for dev, idx in x.sharding.devices_indices_map(x.shape).items():
        if process is not None and dev.process_index != process:
            continue
        index = _index(idx, x.shape)
        key = tuple(map(tuple, index))
        if key not in seen:
            seen.add(key)
            out.append(index)
    return out


def _overlap(a: Index, b: Index) -> Index | None:
    out = [[max(a0, b0), min(a1, b1)] for (a0, a1), (b0, b1) in zip(a, b, strict=True)]
    return out if all(lo < hi for lo, hi in out) else None


def _volume(index: Index) -> int:
    return math.prod(hi - lo for lo, hi in index)


def _verifier(x: jax.Array, region: Index) -> int | None:
    """The lowest process whose own shards hold all of ``region`` (``None``: none does)."""
    need = _volume(region)
    procs = sorted({d.process_index for d in x.sharding.device_set})
    for p in procs:
        got = sum(
            _volume(o) for i in _unique_indices(x, p) if (o := _overlap(i, region)) is not None
        )
        if got == need:
            return p
    return None


def _assemble(x: jax.Array, region: Index) -> np.ndarray:
    """The bytes of ``region`` of ``x`` from this process's shards (which hold it all)."""
    out = np.empty([hi - lo for lo, hi in region], dtype=x.dtype)
    seen = set()
    for shard in x.addressable_shards:
        index = _index(shard.index, x.shape)
        key = tuple(map(tuple, index))
        o = _overlap(index, region)
        if o is None or key in seen:
            continue
        seen.add(key)
        src = tuple(slice(lo - i0, hi - i0) for (lo, hi), (i0, _) in zip(o, index, strict=True))
        dst = tuple(slice(lo - r0, hi - r0) for (lo, hi), (r0, _) in zip(o, region, strict=True))
        out[dst] = np.asarray(shard.data)[src]
    return out


def _share(bad: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Every process's mismatches, on every process (a collective)."""
    from jax.experimental import multihost_utils

    blob = json.dumps(bad).encode()
    sizes = multihost_utils.process_allgather(np.asarray([len(blob)], np.int32))
    width = int(np.max(sizes))
    padded = np.zeros(width, np.uint8)
    padded[: len(blob)] = np.frombuffer(blob, np.uint8)
    everyone = np.asarray(multihost_utils.process_allgather(padded))
    out = []
    for row, n in zip(everyone.reshape(-1, width), np.asarray(sizes).reshape(-1), strict=True):
        for entry in json.loads(bytes(row[: int(n)]).decode()):
            if tuple(entry) not in out:
                out.append(tuple(entry))
    return out


def verify(
    where: str, paths: list[tuple[str, ...]], leaves: list[Any], saved: dict[str, Any]
) -> None:
    """Raises :class:`CorruptCheckpointError` naming every array whose checksum differs.

    Args:
      where: Names the item in the message (``"checkpoint step 3 in /run, opt_state"``).
      paths: The leaves' key paths.
      leaves: The arrays as read.
      saved: The records saved for them (``{path: crc}``, or ``[[index, crc], ...]``).
    """
    v = Verifier(where, {"": saved})
    v.arrays("", paths, leaves)
    v.finish()
