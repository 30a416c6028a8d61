"""Checksums of every stored array, verified on restore.

orbax's files carry no checksum of their own: a flipped byte in a data file restores as a
wrong value without any error. So every step records a 64-bit XXH3 hash of every array's
bytes (C order, the array's own dtype), keyed by the item and the array's joined key path,
and restore recomputes it on what was read and refuses an array whose bytes differ, naming
its path.

* **What is hashed.** At save, the host copy of every array, fetched in one batch of
  device-to-host copies (on CPU a view of the device buffer, no copy): for small arrays the
  same copy that is packed and handed to orbax (:mod:`jaxlora.checkpoint.layout`). An array
  this process holds only parts of (a multi-host sharding) is hashed per addressable shard,
  each keyed by its index (``[[start, stop], ...]`` per axis), only the replica-0 copy of
  each region, so across processes every region is recorded exactly once.
* **Where.** The records go into the step's JSON metadata, which orbax writes in the same
  atomic step: a listed step always has them. In a multi-process run every process's
  shard records are gathered to all (one small collective; save is collective anyway) and
  the primary process writes them with the metadata.
* **Restore.** Packed arrays are verified on the host buffer as read, before they are put on
  devices; the others on host views of the restored arrays. A shard record is verified by
  the process whose shards hold its region (on any restoring mesh); a region that no single
  process holds is gathered. In a multi-process run the verdict is shared, so every process
  raises the same error. Steps written by earlier jaxlora versions (CRC-32 records, in the
  metadata or in a ``checksums`` item of their own) are verified by what they recorded.

XXH3 (the ``xxhash`` package; xxHash is also zstd's frame checksum) runs at memory speed,
about 20 GiB/s on one core here against zlib CRC-32's 2.4 GiB/s, so hashing costs about
a millisecond per 28 MiB: cheap enough to run inline, with no threads to hide it. A 64-bit
hash misses a random corruption with probability 2⁻⁶⁴; it guards against media and transfer
corruption, not against deliberate tampering. Its cost is measured in
``scripts/checkpoint_checksums.py``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import zlib
from collections.abc import Iterable
from typing import Any

import jax
import numpy as np
import xxhash

from jaxlora.checkpoint.errors import CheckpointError, CorruptCheckpointError

__all__ = [
    "ALGORITHM",
    "ALGORITHMS",
    "ITEM",
    "Verifier",
    "checksum",
    "gather_records",
    "host_jobs",
    "merge_records",
    "records",
    "restore_args",
    "verify",
]

ALGORITHM = "xxh3_64"
"""The checksum recorded for every array (``meta["checksum_algorithm"]``)."""

ITEM = "checksums"
"""The step item in which format-2 steps held the records (``<step>/checksums/process_<i>.json``);
read for those steps, no longer written."""

Index = list[list[int]]
"""A shard's region: ``[start, stop]`` per axis."""


def _xxh3(data: np.ndarray) -> str:
    return f"{xxhash.xxh3_64_intdigest(data):016x}"


def _crc32(data: np.ndarray) -> str:
    return f"{zlib.crc32(data):08x}"


ALGORITHMS = {"xxh3_64": _xxh3, "crc32": _crc32}
"""The checksums a step may record, by name: ``crc32`` is what format-2 steps recorded."""


def _digest(host: np.ndarray, algorithm: str = ALGORITHM) -> str:
    host = np.asarray(host)
    # a C-contiguous array exports its bytes as a buffer as they are (no copy, no view)
    data = host if host.flags.c_contiguous else np.ascontiguousarray(host)
    return ALGORITHMS[algorithm](data)


def checksum(x: Any, algorithm: str = ALGORITHM) -> str:
    """The checksum of an array's bytes (C order) as hex digits, as a step records it.

    Args:
      x: A numpy array or a fully addressable ``jax.Array``.
      algorithm: ``"xxh3_64"`` (16 hex digits, what is written) or ``"crc32"`` (8).

    Examples:
      >>> import numpy as np
      >>> checksum(np.zeros(4, np.float32), "crc32"), checksum(np.ones(4, np.float32), "crc32")
      ('ecbb4b55', 'e8681456')
      >>> len(checksum(np.zeros(4, np.float32)))
      16
    """
    if algorithm not in ALGORITHMS:
        raise CheckpointError(
            f"unknown checksum algorithm {algorithm!r}; known: {', '.join(ALGORITHMS)}"
        )
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        raise CheckpointError("checksum() needs an array this process holds in full")
    return _digest(np.asarray(x), algorithm)


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


def records(jobs: list[Job]) -> dict[str, dict[str, Any]]:
    """``{item: {path: record}}`` of ``jobs``, a record being a hash string (a whole array)
    or a list of ``[index, hash]`` (shards)."""
    out: dict[str, dict[str, Any]] = {}
    for job in jobs:
        item = out.setdefault(job.item, {})
        digest = _digest(job.host)
        if job.index is None:
            item[job.path] = digest
        else:
            item.setdefault(job.path, []).append([job.index, digest])
    return out


def gather_records(mine: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Every process's records merged, on every process (a collective when there are
    several processes; this process's records otherwise)."""
    if jax.process_count() == 1:
        return mine
    return merge_records(_allgather_json(mine))


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


# -- the step item in which format-2 steps held the records


@functools.cache
def _orbax_types() -> tuple[type, type]:
    """``(ChecksumHandler, restore args)``, made on first use so that importing jaxlora does
    not import orbax."""
    import orbax.checkpoint as ocp

    class ChecksumHandler(ocp.handlers.JsonCheckpointHandler):
        """Restores the records of a step written with a ``checksums`` item: one
        ``process_<i>.json`` per process, merged."""

        def restore(self, directory, item=None, args=None):
            files = sorted(
                directory.glob("process_*.json"), key=lambda f: int(f.stem.split("_", 1)[1])
            )
            if not files:
                raise FileNotFoundError(f"no checksum records in {directory}")
            return merge_records(json.loads(f.read_text()) for f in files)

    # orbax requires save args of every handler it restores with; jaxlora never saves these
    @ocp.args.register_with_handler(ChecksumHandler, for_save=True)
    @dataclasses.dataclass
    class ChecksumSave(ocp.args.CheckpointArgs):
        item: Any = None

    @ocp.args.register_with_handler(ChecksumHandler, for_restore=True)
    @dataclasses.dataclass
    class ChecksumRestore(ocp.args.CheckpointArgs):
        item: Any = None

    return ChecksumHandler, ChecksumRestore


def restore_args() -> Any:
    """orbax restore args of a step's ``checksums`` item (gives the merged records)."""
    return _orbax_types()[1]()


# -- restore


class Verifier:
    """Checks one step's arrays as they are read; :meth:`finish` raises on any mismatch.

    Args:
      where: Names the step in messages (``"checkpoint step 3 in /run"``).
      records: ``{item: {path: record}}`` as saved.
      algorithm: The step's ``checksum_algorithm`` (a key of :data:`ALGORITHMS`); ``None``
        for steps that recorded none (CRC-32s, and arrays without a record are not checked).
    """

    def __init__(
        self,
        where: str,
        records: dict[str, dict[str, Any]],
        algorithm: str | None = ALGORITHM,
    ):
        if algorithm is not None and algorithm not in ALGORITHMS:
            raise CorruptCheckpointError(
                f"{where}: recorded with checksum algorithm {algorithm!r}, which this jaxlora "
                f"does not know ({', '.join(ALGORITHMS)}); upgrade jaxlora"
            )
        self.where = where
        self.records = records
        # a step that names its algorithm holds a record for every array it stores; steps
        # of the first layouts named none (and were CRC-32), so there a missing record is skipped
        self.strict = algorithm is not None
        self.algorithm = algorithm or "crc32"
        self._bad: dict[str, list[str]] = {}

    def _mismatch(self, item: str, path: str, detail: str) -> None:
        self._bad.setdefault(item, []).append(f"{path} ({detail})")

    def _check(self, checks: list[tuple[str, str, str, str, np.ndarray]]) -> None:
        """Hashes ``(item, path, what, saved hash, host array)`` and notes every mismatch."""
        for item, path, what, want, host in checks:
            got = _digest(host, self.algorithm)
            if got != want:
                self._mismatch(item, path, f"{what}{self.algorithm} {got}, saved {want}")

    def host_buffers(self, item: str, members: dict[str, np.ndarray]) -> None:
        """Starts checking packed arrays given as host arrays (before they are placed)."""
        sums = self.records.get(item, {})
        checks = []
        for p, h in members.items():
            if isinstance(sums.get(p), str):
                checks.append((item, p, "", sums[p], h))
            elif self.strict:
                self._mismatch(item, p, "no checksum recorded")
        self._check(checks)

    def arrays(self, item: str, paths: list[tuple[str, ...]], leaves: list[Any]) -> None:
        """Checks restored (unpacked) arrays, whole or by the shard regions recorded."""
        sums = self.records.get(item, {})
        local, checks, gather = [], [], []
        for p, x in zip(paths, leaves, strict=True):
            joined = "/".join(p)
            rec = sums.get(joined)
            if rec is None:
                if self.strict:
                    self._mismatch(item, joined, "no checksum recorded")
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
        """Raises :class:`CorruptCheckpointError` naming every array that failed (the same
        on every process)."""
        bad = [(item, b) for item, entries in self._bad.items() for b in entries]
        if jax.process_count() > 1:
            bad = _share(bad)
        if bad:
            items = ", ".join(sorted({item for item, _ in bad if item}))
            more = f" and {len(bad) - 4} more" if len(bad) > 4 else ""
            where = f"{self.where}, {items}" if items else self.where
            raise CorruptCheckpointError(
                f"{where}: checksum mismatch of {', '.join(b for _, b in bad[:4])}{more}: "
                "the stored bytes (or their records) changed after they were written "
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


def _allgather_json(value: Any) -> list[Any]:
    """``value`` (JSON-able) of every process, in process order, on every process (a
    collective)."""
    from jax.experimental import multihost_utils

    blob = json.dumps(value).encode()
    sizes = multihost_utils.process_allgather(np.asarray([len(blob)], np.int32))
    width = int(np.max(sizes))
    padded = np.zeros(width, np.uint8)
    padded[: len(blob)] = np.frombuffer(blob, np.uint8)
    everyone = np.asarray(multihost_utils.process_allgather(padded))
    return [
        json.loads(bytes(row[: int(n)]).decode())
        for row, n in zip(everyone.reshape(-1, width), np.asarray(sizes).reshape(-1), strict=True)
    ]


def _share(bad: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Every process's mismatches, on every process (a collective)."""
    out: list[tuple[str, str]] = []
    for theirs in _allgather_json(bad):
        for entry in theirs:
            if tuple(entry) not in out:
                out.append(tuple(entry))
    return out


def verify(
    where: str,
    paths: list[tuple[str, ...]],
    leaves: list[Any],
    saved: dict[str, Any],
    algorithm: str = ALGORITHM,
) -> None:
    """Raises :class:`CorruptCheckpointError` naming every array whose checksum differs.

    Args:
      where: Names the item in the message (``"checkpoint step 3 in /run, opt_state"``).
      paths: The leaves' key paths.
      leaves: The arrays as read.
      saved: The records saved for them (``{path: hash}``, or ``[[index, hash], ...]``).
      algorithm: What they were hashed with.
    """
    v = Verifier(where, {"": saved}, algorithm)
    v.arrays("", paths, leaves)
    v.finish()
