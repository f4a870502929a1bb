"""A logged blend's fitted state, so it can be applied to new test predictions unchanged.

``mmfold blend`` writes, next to the submission, ``submissions/<data>/<name>.blend.json`` (the
members, label vocabulary, blend settings and a fingerprint of each member's OOF file) and
``<name>.blend.skops`` (the final blender, whose weights, transform or stackers make the test
probabilities, and the thresholds with their post-rules). ``mmfold blend --from <name>``
(:func:`mmfold.ensemble.blend.resubmit`) and an exported bundle apply exactly these to new
test probabilities: nothing is refitted, so the new submission is the logged blend's.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmfold import fileio, hints, paths
from mmfold.artifacts import fitted
from mmfold.artifacts.manifest import file_hash
from mmfold.errors import UserError

# what a blend file may hold besides skops' defaults (see mmfold.artifacts.fitted)
TRUSTED_TYPES = (
    "mmfold.ensemble.blenders.MeanBlender", "mmfold.ensemble.blenders.GreedyBlender",
    "mmfold.ensemble.blenders.OptunaBlender", "mmfold.ensemble.blenders.LGBMStacker",
    "mmfold.ensemble.blenders.LGBMAllLabelsStacker", "mmfold.ensemble.blenders.LogisticStacker",
    "mmfold.ensemble.blenders.SingleModel", "mmfold.ensemble.transforms.IdentityTransform",
    "mmfold.ensemble.transforms.PowerTransform", "mmfold.ensemble.transforms.RankTransform",
    "mmfold.ensemble.thresholds.ThresholdOptimizer", "mmfold.ensemble.decoders.ExpectedF1Decoder",
    "mmfold.ensemble.decoders.CountAwareF1Decoder",
    "mmfold.ensemble.calibration.PlattCalibrator", "mmfold.ensemble.calibration.IsotonicCalibrator",
    "mmfold.ensemble.calibration.IdentityCalibrator", *fitted.LIGHTGBM_TYPES,
)
# fitted attributes only needed while fitting or reporting (large, or not storable)
FIT_ONLY = ("oof_", "study_", "trajectory_", "progress")


@dataclass
class BlendState:
    """A fitted blend as saved: ``meta`` (JSON) and the two estimators."""

    meta: dict[str, Any]
    blender: Any
    thresholds: Any

    def predict(self, test: Any) -> Any:
        """0/1 decisions for a ``(M, n, L)`` stack of member test probabilities."""
        return self.thresholds.predict(self.blender.predict(test))


def state_files(data: str, name: str) -> tuple[Path, Path]:
    """``submissions/<data>/<name>.blend.json`` and ``.blend.skops``."""
    folder = paths.submissions_dir(data)
    return folder / f"{name}.blend.json", folder / f"{name}.blend.skops"


def for_prediction(blender: Any) -> Any:
    """A shallow copy of a fitted blender without what only fitting needs (the OOF blend, the
    Optuna study, the progress printer): what predicting a test set uses, and storable."""
    out = copy.copy(blender)
    for attr in FIT_ONLY:
        out.__dict__.pop(attr, None)
    return out


def member_fingerprints(data: str, models: list[str]) -> dict[str, str]:
    """Hash of each member's collected OOF file: a retrained member changes it."""
    return {m: file_hash(paths.oof_file(data, m)) for m in models}


def save_state(data: str, name: str, meta: dict[str, Any], blender: Any, thresholds: Any) -> Path:
    """Write both files (the estimators first; the JSON, written last, marks them complete)."""
    js, sk = state_files(data, name)
    fitted.save({"blender": for_prediction(blender), "thresholds": thresholds}, sk)
    return fileio.write_json(js, meta)


def load_state(data: str, name: str) -> BlendState:
    """A logged blend's state.

    Raises:
        UserError: no such blend, one made before blends saved their state, or a file with
            types mmfold does not trust.
    """
    js, sk = state_files(data, name)
    if not js.exists():
        known = logged_states(data)
        raise UserError(f"{js} not found: blend '{name}' was not logged with its fitted state (a blend "
                        f"made before mmfold saved it, or a misspelt name; blends with their state: "
                        f"{known[-10:] or 'none'}); make one with `{hints.make('blend', data, NAME=name)}`")
    import json

    objs = fitted.load(sk, TRUSTED_TYPES, f"blend '{name}'")
    return BlendState(json.loads(js.read_text()), objs["blender"], objs["thresholds"])


def logged_states(data: str) -> list[str]:
    """Names of the blends whose fitted state is saved, oldest first."""
    found = paths.submissions_dir(data).glob("*.blend.json")
    return [f.name[: -len(".blend.json")] for f in sorted(found, key=lambda f: f.stat().st_mtime_ns)]


def check_members(state: BlendState, data: str, classes: list[str]) -> None:
    """The members must still be the ones the blend was fitted on: same labels, same OOF.

    Raises:
        UserError: naming the member that was retrained (its weights would now mix other
            predictions), or the changed vocabulary.
    """
    if state.meta["classes"] != list(classes):
        raise UserError(f"blend '{state.meta['name']}' was fitted on other labels than folds/{data}.labels.json")
    now = member_fingerprints(data, state.meta["models"])
    changed = [m for m, h in state.meta["members"].items() if now.get(m) != h]
    if changed:
        raise UserError(f"blend '{state.meta['name']}': {changed} were retrained or re-collected since it "
                        "was fitted, so its weights and thresholds are for other predictions; blend again "
                        f"(`{hints.make('blend', data, MODELS=' '.join(state.meta['models']))}`) instead of re-submitting it")
