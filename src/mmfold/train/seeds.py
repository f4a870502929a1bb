"""Multi-seed members (``train.seeds: [0, 1, 2]``): every fold trained once per seed, the
seeds' probabilities averaged before the fold's files are written, so collect, blend, predict
and every CV see one member whose variance the seeds averaged out.

Each seed trains in ``runs/<data>/<model>/fold<k>/seed<s>/`` with its own checkpoints and a
``seed.json`` + ``seed.npz`` written last: a killed run resumes at the first unfinished seed
(and inside it, as any fold resumes). ``train.seed`` is the single-seed setting; with
``train.seeds`` set it is replaced by each seed in turn. A CPU member takes the seed through its
head's ``seed`` (MLP) or ``random_state`` (logistic regression, LightGBM); a head with neither
(kNN) is deterministic, so asking for seeds is refused rather than training copies.
"""

from __future__ import annotations

import copy
import io
import json
import time
from pathlib import Path

import numpy as np

from mmfold import fileio
from mmfold.config import Config, save_config
from mmfold.data.competition import Competition
from mmfold.errors import UserError
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
    raise UserError(f"train.seeds: model '{cfg.model.name}' has a deterministic head "
                    f"({member.head_name}): every seed would train the same model; drop train.seeds")


def check_seeds(cfg: Config, comp: Competition) -> None:
    """Refuse seeds that cannot work, before any fold is touched."""
    seeds = list(cfg.train.seeds or [])
    if not seeds:
        return
    if len(set(seeds)) != len(seeds):
        raise UserError(f"train.seeds lists a seed twice: {seeds}")
    with_seed(cfg, comp, seeds[0])  # a deterministic CPU head is refused here


def run_seeds(runner, cfg: Config, comp: Competition, fold_of_row: np.ndarray, fold: int,
              run_dir: Path) -> FoldOutput:
    """Train (or reload) every seed of one fold and return their mean as the fold's output."""
    outs = []
    for seed in cfg.train.seeds:
        sub = seed_dir(run_dir, seed)
        out = _load(sub)
        if out is None:
            sub.mkdir(parents=True, exist_ok=True)
            out = runner(with_seed(cfg, comp, seed), comp, fold_of_row, fold, sub)
            _save(sub, seed, out)
        outs.append(out)
    save_config(cfg, run_dir / "config.yaml")  # the fold's config: the seeds, not one seed
    return _mean(outs, list(cfg.train.seeds))


def _mean(outs: list[FoldOutput], seeds: list[int]) -> FoldOutput:
    """The seeds' probabilities averaged; times summed; per-seed info kept."""
    oof = np.mean([o.oof.astype(np.float64) for o in outs], axis=0).astype(np.float32)
    test = None if outs[0].test is None else np.mean([o.test.astype(np.float64) for o in outs], axis=0).astype(np.float32)
    info = {"seeds": seeds, "train_time_s": float(sum(o.info.get("train_time_s", 0.0) for o in outs)),
            "per_seed": [o.info for o in outs]}
    return FoldOutput(oof=oof, test=test, info=info)


def _save(sub: Path, seed: int, out: FoldOutput) -> None:
    """The seed's arrays, then ``seed.json`` (written last: it marks the seed complete)."""
    arrays = {"oof": out.oof} if out.test is None else {"oof": out.oof, "test": out.test}
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    fileio.write_bytes(sub / SEED_ARRAYS, buf.getvalue())
    fileio.write_json(sub / SEED_DONE, {"seed": seed, "time": time.time(), **out.info})


def _load(sub: Path) -> FoldOutput | None:
    """A finished seed's output, or None."""
    if not (sub / SEED_DONE).exists():
        return None
    with np.load(sub / SEED_ARRAYS) as z:
        return FoldOutput(oof=z["oof"], test=z["test"] if "test" in z else None,
                          info=json.loads((sub / SEED_DONE).read_text()))


def predict_seeds(predict, cfg: Config, comp: Competition, run_dir: Path) -> np.ndarray:
    """A seeded fold's test probabilities for the current test set: each seed's saved model
    predicts, and the seeds are averaged as in training."""
    probs = [np.asarray(predict(with_seed(cfg, comp, s), comp, seed_dir(run_dir, s)), np.float32)
             for s in cfg.train.seeds]
    return np.mean([p.astype(np.float64) for p in probs], axis=0).astype(np.float32)
