"""A logged blend's fitted state on disk (skops): reloaded, it decides exactly as when fitted,
for every blender and transform; a file asking for an untrusted type is refused unloaded."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mmfold.artifacts import fitted
from mmfold.config import BlendConfig
from mmfold.ensemble.blenders import build_blender
from mmfold.ensemble.scoring import threshold_params
from mmfold.ensemble.state import load_state, save_state, state_files
from mmfold.ensemble.thresholds import ThresholdOptimizer
from mmfold.errors import UserError


def _stack(rng: np.random.Generator, n: int, y: np.ndarray) -> np.ndarray:
    return np.clip(np.stack([0.5 * y + 0.25 + rng.normal(0, s, y.shape) for s in (0.2, 0.3, 0.4)]), 0, 1)


@pytest.mark.parametrize("method, transform", [("optuna", "none"), ("optuna", "power"), ("greedy", "rank"),
                                               ("mean", "none"), ("lgbm", "none"), ("lgbm_all", "none"),
                                               ("logistic", "none")])
def test_a_saved_blend_decides_as_the_fitted_one(project: Path, method: str, transform: str) -> None:
    rng = np.random.default_rng(0)
    y = (rng.random((150, 5)) < 0.3).astype(np.uint8)
    P, test = _stack(rng, 150, y), _stack(rng, 40, (rng.random((40, 5)) < 0.3).astype(np.uint8))
    folds = np.arange(150) % 3
    cfg = BlendConfig(method=method, transform=transform, n_trials=6, cooccurrence=method == "lgbm", max_labels=3)
    blender = build_blender(cfg, "samples").fit(P, y, folds)
    thresholds = ThresholdOptimizer(**threshold_params(cfg, "samples")).fit(blender.oof_, y)
    save_state("tiny", "x", {"name": "x", "models": ["a", "b", "c"]}, blender, thresholds)
    state = load_state("tiny", "x")
    np.testing.assert_array_equal(state.blender.predict(test), blender.predict(test))
    np.testing.assert_array_equal(state.predict(test), thresholds.predict(blender.predict(test)))
    assert not hasattr(state.blender, "oof_")  # fitting leftovers are not stored


class Gadget:
    """A type no one listed as trusted."""

    def __init__(self) -> None:
        self.payload = [1, 2, 3]


def test_a_blend_file_with_an_untrusted_type_is_refused(project: Path) -> None:
    js, sk = state_files("tiny", "evil")
    fitted.save({"blender": Gadget(), "thresholds": None}, sk)
    js.write_text('{"name": "evil"}')
    with pytest.raises(UserError, match=r"does not trust: \['tests.test_blend_state.Gadget'\]"):
        load_state("tiny", "evil")
    with pytest.raises(UserError, match="not logged with its fitted state"):
        load_state("tiny", "nope")


def test_a_missing_blend_state_names_the_known_ones_and_a_command_that_pastes(project: Path) -> None:
    """The message lists the blends that have their state and suggests `make blend` with the
    data and name (built by mmfold.hints), not a bare `make blend` that would run on the demo."""
    js, sk = state_files("tiny", "b1")
    fitted.save({"blender": None, "thresholds": None}, sk)
    js.write_text('{"name": "b1"}')
    with pytest.raises(UserError, match=r"blends with their state: \['b1'\]\); make one with `make blend "
                                        r"DATA=tiny NAME=b2`"):
        load_state("tiny", "b2")
