"""Transforms applied to each model's probabilities before a weighted blender averages them.

A transform maps a stack ``P`` of shape ``(n_models, n_rows, n_labels)`` to one of the same
shape: ``fit(P)`` learns from the training stack and returns self, ``__call__(P)`` applies it
(to the training stack or to any other rows, e.g. the test set). ``blend.transform`` names one
of :data:`TRANSFORMS`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mmfold.registry import Registry

TRANSFORMS = Registry("blend transform")


@TRANSFORMS.register("none")
class IdentityTransform:
    """Average probabilities as they are."""

    def fit(self, P: np.ndarray) -> IdentityTransform:
        """Nothing to learn."""
        return self

    def __call__(self, P: np.ndarray) -> np.ndarray:
        return P


@TRANSFORMS.register("power")
class PowerTransform:
    """Each model's probabilities raised to its own exponent: ``P[m] ** exponents_[m]``.

    The exponents are not learnt by :meth:`fit` (which sets them all to 1, the identity):
    they are tuned with the weights by the Optuna blender, which sets ``exponents_``. A power
    is monotone, so it changes how models mix, never one model's ranking of rows.

    Args:
        exponents: One per model; None until :meth:`fit` or the blender sets them.
    """

    def __init__(self, exponents: Sequence[float] | np.ndarray | None = None) -> None:
        self.exponents_ = None if exponents is None else np.asarray(exponents, np.float64)

    def fit(self, P: np.ndarray) -> PowerTransform:
        """Exponent 1 for every model (the identity) until the blender tunes them."""
        self.exponents_ = np.ones(len(P))
        return self

    def __call__(self, P: np.ndarray) -> np.ndarray:
        if self.exponents_ is None or len(self.exponents_) != len(P):
            raise ValueError(f"power transform: {len(P)} models but exponents {self.exponents_}")
        return np.stack([q if e == 1 else np.power(q, e) for q, e in zip(P, self.exponents_)])


@TRANSFORMS.register("rank")
class RankTransform:
    """Each model's probability -> its empirical CDF among that model's training OOF.

    Rank averaging removes calibration differences between models. Ranks are taken against the
    *training* rows (stored at fit), so a test row's value does not depend on the other test
    rows, and the thresholds fitted on OOF ranks mean the same on test.
    """

    def fit(self, P: np.ndarray) -> RankTransform:
        """Store each (model, label) column sorted."""
        self.sorted_ = np.sort(P, axis=1)
        return self

    def __call__(self, P: np.ndarray) -> np.ndarray:
        M, n, L = self.sorted_.shape
        out = np.empty(P.shape)
        for m in range(M):
            for j in range(L):
                out[m, :, j] = np.searchsorted(self.sorted_[m, :, j], P[m, :, j], side="right")
        return out / n
