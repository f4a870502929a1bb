"""How many cores this process may use, and torch's thread count scoped to one piece of work.

The one place thread and job counts come from: the machine (its cores available to this
process, which a container's CPU set or ``taskset`` may limit below ``os.cpu_count()``) or an
explicit setting. Nothing here imports torch until :func:`torch_threads` is entered.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager


def available_cores() -> int:
    """CPU cores this process may run on (its affinity set where the OS has one), at least 1."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(n)``, restoring the previous count after.

    ``torch.set_num_threads`` is process-wide: set without restoring, one fit's choice leaks
    into whatever the process runs next. ``n`` of 0 or None leaves torch's count alone.
    """
    if not n:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(before)
