"""Torch's thread count scoped to one piece of work (cores come from :mod:`mmfold.machine`).

Nothing here imports torch until :func:`torch_threads` is entered.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from mmfold.machine import available_cores

__all__ = ["available_cores", "torch_threads"]


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
