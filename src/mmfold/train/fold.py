"""What one fold's training returns, and the per-epoch hook: shared by the fold runner, the
torch loop and sweeps, so none of them has to import another to agree on it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np


@dataclass
class FoldOutput:
    """What a runner returns for one fold (the torch loop and the CPU members alike)."""

    oof: np.ndarray  # (n_valid, n_classes) probabilities, validation rows in train order
    test: np.ndarray | None  # (n_test, n_classes) or None when there is no test set
    info: dict = field(default_factory=dict)  # train_time_s, params, images/s, ...


# Called by the torch loop after each epoch's checkpoint with the epoch's log row plus
# ``fold`` and ``model``; a callback may raise (e.g. ``optuna.TrialPruned``) to stop the fold
# at a consistent checkpoint. Used by ``mmfold sweep`` for per-epoch pruning.
EPOCH_CALLBACKS: list[Callable[[dict], None]] = []
