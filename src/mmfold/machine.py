"""How many cores this process may use (the one place thread and job counts come from), and
whether this process is the one that writes files under a multi-process launch.

A container's CPU set or ``taskset`` may limit a process below ``os.cpu_count()``; every
thread pool in mmfold (label fits, image decoding, threshold sorts) sizes itself from here or
from an explicit setting, never from a number written for one machine.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator


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


@contextlib.contextmanager
def sigterm_as_interrupt(under_launcher: bool = False) -> Iterator[None]:
    """SIGTERM stops the process as Ctrl-C does (a fold at its next optimizer step, ``last.pt``
    saved, exit 130) instead of killing it mid-epoch. Only in the main thread, and not under a
    multi-process launch unless ``under_launcher``: the launcher ends its ranks with SIGTERM when
    one fails, and a rank waiting for a collective with a dead peer must not wait for a step."""
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not under_launcher
    if threading.current_thread() is not threading.main_thread() or launched:
        yield
        return
    old = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)
