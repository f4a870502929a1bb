"""Multi-seed members (``train.seeds: [0, 1, 2]``): every fold trained once per seed, the
seeds' probabilities averaged before the fold's files are written, so collect, blend, predict
and every CV see one member whose variance the seeds averaged out.

Each seed trains in ``runs/<data>/<model>/fold<k>/seed<s>/`` with its own checkpoints and a
``seed.json`` + ``seed.npz`` written last: a killed run resumes at the first unfinished seed
(and inside it, as any fold resumes). ``train.seed`` is the single-seed setting; with
``train.seeds`` set it is replaced by each seed in turn. A CPU member takes the seed through its
head's ``seed`` (the MLP head); the other heads take none (logistic regression and kNN are
deterministic), so asking for seeds there is refused rather than training copies. A finished
seed is reused only when it was trained with the same settings, train side and test set
(``seed.json`` records them), as a resumed fold is.
"""

from __future__ import annotations

import copy
import io
import json
import time
from pathlib import Path

import numpy as np

from mmfold import fileio
from mmfold.config import Config, learned_settings, save_config, stable_hash
from mmfold.data.competition import Competition
from mmfold.errors import UserError
from mmfold.machine import is_main_process
from mmfold.train.fold import FoldOutput

SEED_DONE, SEED_ARRAYS = "seed.json", "seed.npz"


def seed_dir(run_dir: Path, seed: int) -> Path:
    """Where one seed of a fold trains."""
    return run_dir / f"seed{seed}"


def with_seed(cfg: Config, comp: Competition, seed: int) -> Config:
    """A copy of ``cfg`` that trains with ``seed`` alone (``train.seed``, and a CPU member's
    head seed)."""
    from mmfold.cpu.members import MEMBERS

    out = copy.deepcopy(cfg)
    out.train.seed, out.train.seeds = seed, []
    if cfg.model.kind in MEMBERS:
        params = dict(out.model.params)
        head = dict(params.get("head_params") or {})
        head[_head_seed_key(cfg, comp)] = seed
        params["head_params"] = head
        out.model.params = params
    return out


def _head_seed_key(cfg: Config, comp: Competition) -> str:
    """``seed`` or ``random_state``: whichever the member's head takes."""
    from mmfold.cpu.members import MEMBERS

    member = MEMBERS.get(cfg.model.kind)(cfg, comp)
    names = member.head.get_params(deep=False)
    for key in ("seed", "random_state"):
        if key in names:
            return key
    raise UserError(f"train.seeds: model '{cfg.model.name}' has a head without a seed "
                    f"({member.head_name}): every seed would train the same model; drop train.seeds")


def check_seeds(cfg: Config, comp: Competition) -> None:
    """Refuse seeds that cannot work, before any fold is touched."""
    seeds = list(cfg.train.seeds or [])
    if not seeds:
        return
    if len(set(seeds)) != len(seeds):
        raise UserError(f"train.seeds lists a seed twice: {seeds}")
    if cfg.model.kind == "student":
        raise UserError(f"train.seeds: model '{cfg.model.name}' is a student, whose head is its base "
                        "model's; seed the base instead (not supported for students yet)")
    with_seed(cfg, comp, seeds[0])  # a deterministic CPU head is refused here


def run_seeds(runner, cfg: Config, comp: Competition, fold_of_row: np.ndarray, fold: int,
              run_dir: Path) -> FoldOutput:
    """Train (or reload) every seed of one fold and return their mean as the fold's output."""
    outs = []
    for seed in cfg.train.seeds:
        sub = seed_dir(run_dir, seed)
        key = _seed_key(cfg, comp, seed)
        out = _load(sub, key)
        if out is None:
            sub.mkdir(parents=True, exist_ok=True)
            out = runner(with_seed(cfg, comp, seed), comp, fold_of_row, fold, sub)
            if is_main_process():
                _save(sub, seed, key, out)
        outs.append(out)
    if is_main_process():
        save_config(cfg, run_dir / "config.yaml")  # the fold's config: the seeds, not one seed
    return _mean(outs, list(cfg.train.seeds))


def _mean(outs: list[FoldOutput], seeds: list[int]) -> FoldOutput:
    """The seeds' probabilities averaged; times summed; per-seed info kept."""
    oof = np.mean([o.oof.astype(np.float64) for o in outs], axis=0).astype(np.float32)
    test = None if outs[0].test is None else np.mean([o.test.astype(np.float64) for o in outs], axis=0).astype(np.float32)
    info = {"seeds": seeds, "train_time_s": float(sum(o.info.get("train_time_s", 0.0) for o in outs)),
            "per_seed": [o.info for o in outs]}
    return FoldOutput(oof=oof, test=test, info=info)


def _seed_key(cfg: Config, comp: Competition, seed: int) -> str:
    """What a finished seed must match to be reused: its learned settings, the train side
    (train file, folds, labels) and the test set."""
    from mmfold.artifacts.manifest import data_fingerprints, testset_key

    settings = learned_settings(with_seed(cfg, comp, seed).to_dict())
    return stable_hash([settings, data_fingerprints(comp), testset_key(comp)])


def _save(sub: Path, seed: int, key: str, out: FoldOutput) -> None:
    """The seed's arrays, then ``seed.json`` (written last: it marks the seed complete)."""
    arrays = {"oof": out.oof} if out.test is None else {"oof": out.oof, "test": out.test}
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    fileio.write_bytes(sub / SEED_ARRAYS, buf.getvalue())
    fileio.write_json(sub / SEED_DONE, {"seed": seed, "key": key, "time": time.time(), **out.info})


def _load(sub: Path, key: str) -> FoldOutput | None:
    """A finished seed's output if it was trained as it would be now, else None (retrained)."""
    if not (sub / SEED_DONE).exists():
        return None
    info = json.loads((sub / SEED_DONE).read_text())
    if info.get("key") != key:
        print(f"{sub}: trained with other settings, data or test set; training this seed again")
        return None
    with np.load(sub / SEED_ARRAYS) as z:
        return FoldOutput(oof=z["oof"], test=z["test"] if "test" in z else None, info=info)


def predict_seeds(predict, cfg: Config, comp: Competition, run_dir: Path) -> np.ndarray:
    """A seeded fold's test probabilities for the current test set: each seed's saved model
    predicts, and the seeds are averaged as in training."""
    probs = [np.asarray(predict(with_seed(cfg, comp, s), comp, seed_dir(run_dir, s)), np.float32)
             for s in cfg.train.seeds]
    return np.mean([p.astype(np.float64) for p in probs], axis=0).astype(np.float32)
