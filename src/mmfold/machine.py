"""How many cores this process may use (the one place thread and job counts come from), and
whether this process is the one that writes files under a multi-process launch.

A container's CPU set or ``taskset`` may limit a process below ``os.cpu_count()``; every
thread pool in mmfold (label fits, image decoding, threshold sorts) sizes itself from here or
from an explicit setting, never from a number written for one machine.
"""

from __future__ import annotations

import os


def core_ids() -> list[int]:
    """The CPU cores this process may run on (its affinity set where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def available_cores() -> int:
    """How many cores this process may run on, at least 1."""
    return max(1, len(core_ids()))


def is_main_process() -> bool:
    """Rank 0 under ``accelerate launch``/``torchrun`` (they set ``RANK``), else True."""
    return int(os.environ.get("RANK", "0")) == 0
