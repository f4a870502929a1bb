"""``mmfold.metrics`` against scikit-learn, the referee the competitions' scorers follow.

The vectorised metrics decide thresholds, blends and every CV line, so they are checked here
against ``sklearn.metrics`` (not against themselves) on random 0/1 matrices that contain the
cases where definitions differ: rows with no true label, rows with no predicted label, rows
with neither, and labels that are never true nor predicted.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score, hamming_loss

from mmfold.metrics import METRICS, all_metrics, label_accuracy, per_label_f1

SKLEARN: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "samples": lambda y, p: f1_score(y, p, average="samples", zero_division=0),
    "micro": lambda y, p: f1_score(y, p, average="micro", zero_division=0),
    "macro": lambda y, p: f1_score(y, p, average="macro", zero_division=0),
    "hamming_loss": hamming_loss,
    "subset_accuracy": accuracy_score,
}


def edge_case_matrices(seed: int, n: int = 40, L: int = 7) -> tuple[np.ndarray, np.ndarray]:
    """Random ``(y, pred)`` with every edge case planted: rows 0-2 have no true label, rows 2-4
    no predicted label (row 2 neither), labels 0 and 1 are neither true nor predicted, label 2
    is true but never predicted, label 3 predicted but never true, row 5 predicted exactly."""
    rng = np.random.default_rng(seed)
    y = (rng.random((n, L)) < rng.uniform(0.1, 0.6)).astype(np.uint8)
    pred = np.where(rng.random((n, L)) < 0.7, y, 1 - y).astype(np.uint8)
    y[:3] = 0
    pred[2:5] = 0
    y[:, :2] = pred[:, :2] = 0
    pred[:, 2] = 0
    y[:, 3] = 0
    pred[5] = y[5]
    return y, pred


def score_sklearn(name: str, y: np.ndarray, pred: np.ndarray) -> float:
    """sklearn's value, its ill-defined-metric warnings silenced (zero_division decides)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(SKLEARN[name](y, pred))


@pytest.mark.parametrize("name", list(SKLEARN))
@pytest.mark.parametrize("seed", range(12))
def test_metric_equals_sklearn_on_edge_cases(name: str, seed: int) -> None:
    y, pred = edge_case_matrices(seed)
    assert METRICS[name](y, pred) == pytest.approx(score_sklearn(name, y, pred), abs=1e-12)


@pytest.mark.parametrize("name", list(SKLEARN))
@pytest.mark.parametrize("case", ["all_empty", "y_empty", "pred_empty", "all_full", "one_row", "one_label"])
def test_metric_equals_sklearn_on_degenerate_inputs(name: str, case: str) -> None:
    """Whole matrices at the edges: nothing anywhere, one side empty, everything on, 1 x L, n x 1."""
    rng = np.random.default_rng(7)
    rand = (rng.random((6, 4)) < 0.5).astype(np.uint8)
    y, pred = {
        "all_empty": (np.zeros((6, 4), np.uint8), np.zeros((6, 4), np.uint8)),
        "y_empty": (np.zeros((6, 4), np.uint8), rand),
        "pred_empty": (rand, np.zeros((6, 4), np.uint8)),
        "all_full": (np.ones((6, 4), np.uint8), np.ones((6, 4), np.uint8)),
        "one_row": (rand[:1], 1 - rand[:1]),
        "one_label": (rand[:, :1], rand[::-1, :1]),
    }[case]
    ref_y, ref_pred = y, pred
    if name == "samples" and y.shape[1] == 1:
        # sklearn reads one column as binary, not multilabel; an all-zero extra label adds no
        # true or predicted label to any row, so the samples-F1 it then computes is the same
        ref_y, ref_pred = (np.hstack([a, np.zeros_like(a)]) for a in (y, pred))
    assert METRICS[name](y, pred) == pytest.approx(score_sklearn(name, ref_y, ref_pred), abs=1e-12)


@pytest.mark.parametrize("seed", range(6))
def test_per_label_f1_and_label_accuracy_equal_sklearn(seed: int) -> None:
    """Per-label F1 is sklearn's ``average=None``; label accuracy the mean of per-column accuracies."""
    y, pred = edge_case_matrices(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = f1_score(y, pred, average=None, zero_division=0)
    np.testing.assert_allclose(per_label_f1(y, pred), want, atol=1e-12)
    cols = [accuracy_score(y[:, j], pred[:, j]) for j in range(y.shape[1])]
    assert label_accuracy(y, pred) == pytest.approx(float(np.mean(cols)), abs=1e-12)


def test_bool_and_int_inputs_agree() -> None:
    """Probabilities thresholded to bool and stored 0/1 uint8 or int64 give the same numbers."""
    y, pred = edge_case_matrices(3)
    ref = all_metrics(y, pred)
    for yy, pp in ((y.astype(bool), pred.astype(bool)), (y.astype(np.int64), pred.astype(np.int64))):
        assert all_metrics(yy, pp) == pytest.approx(ref, abs=1e-15)


def test_checkpoint_score_at_the_best_single_threshold_follows_a_shifted_model() -> None:
    """A model whose probabilities sit above 0.5 for negatives (as ASL leaves them) scores badly
    at 0.5 but well at the searched threshold; a calibrated one scores the same either way."""
    from mmfold.metrics import CHECKPOINT_SCORES

    y = np.array([[1, 0], [0, 1], [1, 1], [0, 1]])
    shifted = np.where(y == 1, 0.9, 0.6)
    assert CHECKPOINT_SCORES["half"](y, shifted, "samples") < 1.0
    assert CHECKPOINT_SCORES["global"](y, shifted, "samples") == 1.0
    calibrated = np.where(y == 1, 0.8, 0.1)
    assert CHECKPOINT_SCORES["half"](y, calibrated, "samples") == CHECKPOINT_SCORES["global"](y, calibrated, "samples")


def test_unknown_checkpoint_score_is_refused_when_the_config_loads() -> None:
    import pytest

    from mmfold.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="select_threshold.*half"):
        load_config("demo", None, ["train.select_threshold=best"])
