"""CPU accounting for a timed window: how much CPU *other* processes used meanwhile.

A speed comparison on a shared machine counts only when nothing else ran: PyTorch's worker
threads collapse under contention while XLA degrades gently, so a loaded run flatters one
side. :class:`Window` reads ``/proc/stat`` (all CPUs' busy time) and ``/proc/self/stat``
(this process, all threads) at the start and end of a window; the difference is the CPU
that other processes used, in cores.
"""

from __future__ import annotations

import dataclasses
import os
import time

_TICKS = os.sysconf("SC_CLK_TCK")


def _machine_busy() -> float:
    """Seconds of non-idle CPU time summed over all CPUs since boot."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal guest guest_nice; guest time is
    # already counted in user, so it is left out
    idle = fields[3] + fields[4]
    return (sum(fields[:8]) - idle) / _TICKS


def _self_busy() -> float:
    """Seconds of CPU time this process (all its threads) and its reaped children used."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def loadavg() -> float:
    """The one-minute load average."""
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


@dataclasses.dataclass
class Window:
    """A timed window; ``with Window() as w: ...`` then read ``w.other_cores``."""

    wall: float = 0.0
    """Seconds the window lasted."""
    own_cores: float = 0.0
    """Average cores this process used during the window."""
    other_cores: float = 0.0
    """Average cores all other processes used during the window."""
    load_start: float = 0.0
    """One-minute load average at the start."""
    load_end: float = 0.0
    """One-minute load average at the end."""

    def __enter__(self) -> Window:
        self.load_start = loadavg()
        self._t0, self._m0, self._s0 = time.perf_counter(), _machine_busy(), _self_busy()
        return self

    def __exit__(self, *exc) -> None:
        t1, m1, s1 = time.perf_counter(), _machine_busy(), _self_busy()
        self.wall = t1 - self._t0
        own = s1 - self._s0
        self.own_cores = own / self.wall
        # clock-tick granularity can make this slightly negative on a quiet machine
        self.other_cores = max(0.0, (m1 - self._m0 - own) / self.wall)
        self.load_end = loadavg()
