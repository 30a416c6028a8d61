"""One writer per checkpoint directory: an exclusive lock file naming its owner.

Two managers writing one directory (two launches with the same output, a restarted job
whose old process is still alive) interleave steps and metadata and can make a confirmed
step unreadable. A writing :class:`~jaxlora.checkpoint.CheckpointManager` therefore holds
``<directory>/.jaxlora-writer.lock``, a JSON file with its host, pid, process start time
and a random token:

* **Taken atomically.** The content is written to a private file first and hard-linked to
  the lock's name, which fails if the lock exists, so nobody ever sees a half-written lock
  (this works on local file systems and NFS alike).
* **Stale locks taken over.** A lock whose owner is on this host and no longer runs (no
  such pid, or a pid reused by a process that started at another time) is stale: it is
  renamed away (atomic), checked to be the one judged stale, and replaced. A lock held by
  another host cannot be judged from here and is always respected; the message says which
  file to delete if that host's job is known to be gone.
* **Released** by ``close()``, or when the manager is garbage-collected or the interpreter
  exits; a killed process leaves a stale lock behind, which the next writer takes over.

In a multi-process (multi-host) run the processes of one job write one directory together;
process 0 holds the lock for all of them.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import socket
import uuid
from pathlib import Path
from typing import Any

from jaxlora.checkpoint.errors import CheckpointError

__all__ = ["LOCK_NAME", "WriterLock"]

LOCK_NAME = ".jaxlora-writer.lock"
"""The lock file's name inside a checkpoint directory."""

_log = logging.getLogger("jaxlora.checkpoint")


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), else ``None``; with the
    pid it identifies a process even after its pid is reused."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) may hold spaces and parentheses: split after its last ")"
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _read(path: Path) -> dict[str, Any] | None:
    try:
        owner = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) else None


def _describe(owner: dict[str, Any]) -> str:
    return f"host {owner.get('host')!r}, pid {owner.get('pid')} (since {owner.get('since')})"


class WriterLock:
    """The exclusive writer lock of one directory (see the module docstring).

    Examples:
      >>> import tempfile
      >>> d = tempfile.mkdtemp()
      >>> lock = WriterLock(d)
      >>> lock.acquire()
      >>> try:
      ...     WriterLock(d).acquire()
      ... except CheckpointError as e:
      ...     print("refused:", "in use by another CheckpointManager of this process" in str(e))
      refused: True
      >>> lock.release()
      >>> WriterLock(d).acquire()
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.path = self.directory / LOCK_NAME
        self.token: str | None = None

    def _me(self, token: str) -> dict[str, Any]:
        return {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "start": _start_time(os.getpid()),
            "since": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "token": token,
        }

    def acquire(self) -> None:
        """Takes the lock, taking over a stale one.

        Raises:
          CheckpointError: If another live writer holds it; the message names it.
        """
        token = uuid.uuid4().hex
        private = self.directory / f"{LOCK_NAME}.{token}"
        private.write_text(json.dumps(self._me(token)))
        try:
            for _ in range(5):
                try:
                    os.link(private, self.path)
                except FileExistsError:
                    self._refuse_or_clear()
                    continue
                self.token = token
                return
        finally:
            private.unlink()
        raise CheckpointError(
            f"could not take the writer lock {self.path}: it keeps changing hands"
        )

    def _refuse_or_clear(self) -> None:
        """Removes a stale lock, or raises naming the live one's owner."""
        owner = _read(self.path)
        if owner is None:
            if not self.path.exists():
                return  # released meanwhile: try again
            raise CheckpointError(
                f"checkpoint directory {self.directory} has an unreadable writer lock "
                f"{self.path}; if no other process writes there, delete that file"
            )
        here = owner.get("host") == socket.gethostname()
        pid = owner.get("pid")
        if here and pid == os.getpid() and owner.get("start") == _start_time(pid):
            raise CheckpointError(
                f"checkpoint directory {self.directory} is in use by another "
                f"CheckpointManager of this process (pid {pid}); close() it first, or open "
                "this one with read_only=True"
            )
        stale = (
            here
            and isinstance(pid, int)
            and (not _alive(pid) or owner.get("start") != _start_time(pid))
        )
        if not stale:
            hint = (
                "stop that process" if here else f"if that host's job is gone, delete {self.path}"
            )
            raise CheckpointError(
                f"checkpoint directory {self.directory} is in use by another writer: "
                f"{_describe(owner)}. Two writers would corrupt each other's steps; "
                f"{hint}, write elsewhere, or open it with read_only=True"
            )
        moved = self.directory / f"{LOCK_NAME}.stale.{uuid.uuid4().hex}"
        try:
            os.rename(self.path, moved)
        except FileNotFoundError:
            return  # another process cleared it first
        if _read(moved) != owner:
            # the lock changed hands between our read and the rename: put the live one back
            with contextlib.suppress(FileExistsError):
                os.link(moved, self.path)
            moved.unlink()
            return
        moved.unlink()
        _log.warning(
            "took over the stale writer lock of %s in %s (that process is gone)",
            _describe(owner),
            self.directory,
        )

    def release(self) -> None:
        """Releases the lock if this object holds it (idempotent)."""
        if self.token is None:
            return
        owner = _read(self.path)
        if owner is not None and owner.get("token") == self.token:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        self.token = None
