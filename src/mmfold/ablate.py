"""``mmfold ablate``: switch one technique off (or on) at a time and tabulate what it was worth.

The variants are declared in the model's YAML, not in code (``model.ablations``)::

    ablations:
      no_augment: ["train.augment=[]"]            # trained: overrides on top of the base config
      pos_weight: ["train.pos_weight=true"]
      focal: ["train.loss=focal"]
      no_ema: ["train.ema=0"]
      tta: ["train.tta=true"]
      scratch: ["model.params.pretrained=false"]
      no_caption: ["data.caption_col=null"]
      thresholds_0.5: {computed: thresholds_0.5}  # computed from OOFs, nothing trained
      blend_vs_single: {computed: blend_vs_single, models: [demo_image, demo_text]}
      no_caption_model: {computed: model, model: demo_image}  # a collected model as a row

A trained variant runs through the normal fold runner as ``<model>@<variant>`` (its own run
dirs, resumable, reused when nothing changed). Every row is scored on the same folds as the
base, fold by fold, so the difference from the base is *paired*: its fold-to-fold spread says
whether an effect is bigger than the noise between folds.
"""

from __future__ import annotations

import argparse
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from mmfold import io, paths
from mmfold.config import Config, ConfigError, load_config, model_yaml
from mmfold.data import Competition, load_folds
from mmfold.errors import UserError
from mmfold.metrics import METRICS, binarize
from mmfold.registry import Registry
from mmfold.sweep import (VARIANT_SEP, Competitions, learned_config, read_fold_oof, run_variant_fold,
                          variant_config)
from mmfold.thresholds import ThresholdOptimizer

COMPUTED = Registry("computed ablation")
NAME_OK = re.compile(r"^[A-Za-z0-9_.-]+$")  # variant names become directory names


# ------------------------------------------------------------------------------- declarations


@dataclass
class Variant:
    """One declared ablation: overrides to train, or the name of a computed comparison."""

    name: str
    overrides: list[str] = field(default_factory=list)
    computed: str | None = None
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def what(self) -> str:
        """Human description for the table."""
        return f"computed: {self.computed}" if self.computed else ", ".join(f"`{o}`" for o in self.overrides)


def parse_ablations(ablations: dict[str, Any], where: str) -> list[Variant]:
    """Normalise ``model.ablations``: a list of overrides, or ``{computed: name, ...}``."""
    out = []
    for name, spec in ablations.items():
        if not NAME_OK.match(name):
            raise ConfigError(f"{where}: ablation name '{name}' may only use letters, digits, '_', '.', '-'")
        if isinstance(spec, list) and all(isinstance(o, str) and "=" in o for o in spec):
            out.append(Variant(name, overrides=list(spec)))
        elif isinstance(spec, dict) and "computed" in spec:
            COMPUTED.get(spec["computed"])
            if spec["computed"] == "model" and not spec.get("model"):
                raise ConfigError(f"{where}: ablation '{name}': computed: model needs 'model: <collected model>'")
            out.append(Variant(name, computed=spec["computed"], options={k: v for k, v in spec.items() if k != "computed"}))
        else:
            raise ConfigError(f"{where}: ablation '{name}' must be a list of 'key=value' overrides "
                              f"or {{computed: {'|'.join(COMPUTED)}}}; got {spec!r}")
    return out


# ------------------------------------------------------------------------------------ scoring


def fold_scores(prob: np.ndarray, y: np.ndarray, folds: np.ndarray, tuned: bool) -> list[float]:
    """Samples-F1 per fold, with thresholds fitted on the other evaluated folds (or at 0.5)."""
    out = []
    for k in np.unique(folds):
        fit, te = folds != k, folds == k
        if tuned:
            pred = ThresholdOptimizer().fit(prob[fit], y[fit]).predict(prob[te])
        else:
            pred = binarize(prob[te], 0.5)
        out.append(float(METRICS["samples"](y[te], pred)))
    return out


@dataclass
class Ablation:
    """Shared state: the base config, the evaluated folds and the base's OOF."""

    data: str
    model: str
    base: Config
    folds: list[int]
    overrides: list[str]
    comps: Competitions
    fold_of_row: np.ndarray
    tuned: bool  # thresholds fitted on other folds (needs >= 2 folds), else 0.5
    base_prob: np.ndarray | None = None  # (n_eval, L) rows of the evaluated folds, train order
    rows: np.ndarray | None = None  # train-row indices of the evaluated folds

    @property
    def comp(self) -> Competition:
        return self.comps.get(self.base)

    def y(self) -> np.ndarray:
        return self.comp.y()[self.rows]

    def row_folds(self) -> np.ndarray:
        return self.fold_of_row[self.rows]


@dataclass
class Result:
    """One row of the table before differences are taken."""

    variant: str
    what: str
    scores: list[float] | None
    time_s: float
    note: str = ""


def train_variant(ab: Ablation, cfg: Config) -> tuple[np.ndarray, float]:
    """Train/reuse every evaluated fold of ``cfg``; its OOF on the evaluated rows and the time."""
    comp = ab.comps.get(cfg)
    spent = sum(float(run_variant_fold(cfg, comp, ab.fold_of_row, k).get("train_time_s") or 0.0) for k in ab.folds)
    oof = read_fold_oof(cfg, comp, ab.folds).set_index("id")
    ids = ab.comp.train["id"].astype(str).iloc[ab.rows]
    oof.index = oof.index.astype(str)
    return oof.loc[ids, ab.comp.classes].to_numpy(np.float64), spent


def run_base(ab: Ablation) -> Result:
    """The base config; its OOF is kept for the computed variants."""
    ab.base_prob, spent = train_variant(ab, ab.base)
    return Result("base", f"`{ab.base.model.name}`", fold_scores(ab.base_prob, ab.y(), ab.row_folds(), ab.tuned), spent)


def run_trained(ab: Ablation, v: Variant) -> Result:
    """A variant trained from the base config plus its overrides."""
    name = f"{ab.model}{VARIANT_SEP}{v.name}"
    try:
        cfg = variant_config(ab.data, ab.model, name, ab.overrides + v.overrides)
        prob, spent = train_variant(ab, cfg)
    except (UserError, RuntimeError, ValueError) as e:  # a variant that does not apply to this kind
        print(f"{name}: failed: {e}")
        return Result(v.name, v.what, None, 0.0, f"failed: {e}")
    return Result(v.name, v.what, fold_scores(prob, ab.y(), ab.row_folds(), ab.tuned), spent)


@COMPUTED.register("thresholds_0.5")
def thresholds_at_half(ab: Ablation, v: Variant) -> Result:
    """The base model with one threshold of 0.5 instead of tuned per-label thresholds."""
    scores = fold_scores(ab.base_prob, ab.y(), ab.row_folds(), tuned=False)
    note = "" if ab.tuned else "base is also at 0.5 (one fold: nothing to fit thresholds on)"
    return Result(v.name, "base at threshold 0.5", scores, 0.0, note)


@COMPUTED.register("blend_vs_single")
def blend_vs_single(ab: Ablation, v: Variant) -> Result:
    """The blend (``blend.*`` settings) of the base with other collected models, nested CV."""
    from mmfold.blend import build_blender, nested_cv, threshold_params

    present = [m for m in _blend_members(ab, v) if m != ab.model and paths.oof_file(ab.data, m).exists()]
    if not present:
        return Result(v.name, v.what, None, 0.0, f"no other collected model in {paths.oof_dir(ab.data)}")
    start = time.perf_counter()
    P = np.stack([ab.base_prob] + [_collected(ab, m) for m in present])
    cv = nested_cv(P, ab.y(), ab.row_folds(), lambda k: build_blender(ab.base.blend, ab.base.data.metric),
                   lambda: ThresholdOptimizer(**threshold_params(ab.base.blend, ab.base.data.metric)))
    what = f"{ab.base.blend.method} blend of base + {', '.join(f'`{m}`' for m in present)}"
    return Result(v.name, what, list(cv.per_fold), time.perf_counter() - start)


@COMPUTED.register("model")
def other_model(ab: Ablation, v: Variant) -> Result:
    """Another collected model scored on the base's folds: the row for a change that is a
    different model config rather than an override (``no_caption`` = the image-only model)."""
    other = v.options["model"]
    if not paths.oof_file(ab.data, other).exists():
        return Result(v.name, f"`{other}`", None, 0.0,
                      f"`{other}` not collected: run `make train MODEL={other}` first")
    prob = _collected(ab, other)
    return Result(v.name, f"`{other}`", fold_scores(prob, ab.y(), ab.row_folds(), ab.tuned), 0.0,
                  "collected model, training time not counted")


def _blend_members(ab: Ablation, v: Variant) -> list[str]:
    """``models:`` of the declaration, else ``blend.models``, else ``data.models``, else every
    collected model (sweep trials and variants excluded)."""
    from mmfold.report import model_names

    declared = v.options.get("models") or ab.base.blend.models or ab.base.data.models
    if any(paths.oof_file(ab.data, m).exists() for m in declared if m != ab.model):
        return list(declared)
    return model_names(ab.data)


def _collected(ab: Ablation, model: str) -> np.ndarray:
    """A collected model's OOF on the evaluated rows."""
    from mmfold.report import load_probs

    ids = ab.comp.train["id"].astype(str).iloc[ab.rows].tolist()
    return load_probs(paths.oof_file(ab.data, model), ids, ab.comp.classes)


# -------------------------------------------------------------------------------------- table


def table(results: Sequence[Result]) -> pd.DataFrame:
    """Variant, CV, paired difference from base with its fold-to-fold std, folds better, time."""
    base = np.asarray(results[0].scores)
    rows = []
    for i, r in enumerate(results):
        s = None if r.scores is None else np.asarray(r.scores)
        d = None if s is None or i == 0 else s - base  # the base row has no difference to show
        rows.append({"variant": r.variant, "what": r.what,
                     "cv": np.nan if s is None else float(s.mean()),
                     "diff": 0.0 if i == 0 else np.nan if d is None else float(d.mean()),
                     "diff_std": np.nan if d is None or len(d) < 2 else float(d.std(ddof=1)),
                     "better_folds": "" if d is None else f"{int((d > 0).sum())}/{len(d)}",
                     "time_s": r.time_s, "note": r.note})
    return pd.DataFrame(rows)


def markdown(df: pd.DataFrame, ab: Ablation, figure: str) -> str:
    """The ablation table with a header saying how it was scored."""
    from mmfold.report import md_table

    shown = pd.DataFrame({
        "variant": df["variant"], "what": df["what"], "CV samples-F1": df["cv"].map(_fmt),
        "Δ vs base": df["diff"].map(lambda v: _fmt(v, signed=True)),
        "± fold std of Δ": df["diff_std"].map(_fmt), "folds better": df["better_folds"],
        "time (s)": df["time_s"].map(lambda t: f"{t:.1f}"), "note": df["note"],
    })
    how = "thresholds fitted on the other evaluated folds" if ab.tuned else "threshold 0.5"
    return (f"# Ablations of `{ab.model}` on `{ab.data}`\n\n"
            f"Folds {ab.folds}; CV samples-F1 with {how}. Δ is the mean over folds of (variant − base) "
            "on the same fold; its std across folds is the noise to compare it with: an effect "
            "smaller than its std is not distinguishable from fold-to-fold variation. Time is "
            "training time summed over the folds (reused folds count their original time).\n\n"
            f"![ablation effects]({figure})\n\n" + md_table(shown) + "\n")


def _fmt(v: float, signed: bool = False) -> str:
    """4 decimals, optionally with a sign; a dash when missing."""
    if v is None or np.isnan(v):
        return "–"
    v = 0.0 if abs(v) < 5e-5 else v  # no "-0.0000"
    return f"{v:+.4f}" if signed else f"{v:.4f}"


# ---------------------------------------------------------------------------------------- run


def ablate(data: str, model: str, folds: Sequence[int] | None = None, overrides: Sequence[str] = (),
           only: Sequence[str] | None = None) -> pd.DataFrame:
    """Run the base and every declared (or ``only`` the named) variant; write the table."""
    overrides = list(overrides)
    base = variant_config(data, model, model, overrides)
    if learned_config(base.to_dict()) != learned_config(load_config(data, model).to_dict()):
        base.model.name = f"{model}{VARIANT_SEP}base"  # overrides change training: keep the real runs
    variants = parse_ablations(base.model.ablations, str(model_yaml(model)))
    if only:
        unknown = sorted(set(only) - {v.name for v in variants})
        if unknown:
            raise UserError(f"unknown variants {unknown}; declared: {[v.name for v in variants]}")
        variants = [v for v in variants if v.name in only]
    ab = _setup(data, model, base, folds, overrides)
    results = [run_base(ab)] + [_run(ab, v) for v in variants]
    df = table(results)
    _write(df, ab)
    return df


def _setup(data: str, model: str, base: Config, folds: Sequence[int] | None, overrides: list[str]) -> Ablation:
    """Load the competition and folds once; pick the evaluated rows."""
    comps = Competitions()
    fold_of_row = load_folds(comps.get(base))
    chosen = sorted(int(k) for k in (folds if folds is not None else np.unique(fold_of_row)))
    rows = np.flatnonzero(np.isin(fold_of_row, chosen))
    return Ablation(data, model, base, chosen, overrides, comps, fold_of_row, len(chosen) >= 2, rows=rows)


def _run(ab: Ablation, v: Variant) -> Result:
    """A computed variant from the registry, or a trained one."""
    runner: Callable[[Ablation, Variant], Result] = COMPUTED.get(v.computed) if v.computed else run_trained
    return runner(ab, v)


def _write(df: pd.DataFrame, ab: Ablation) -> None:
    """``reports/<data>/ablate_<model>.{csv,md}`` and the effect chart."""
    from mmfold import plots

    out = paths.reports_dir(ab.data)
    fig = f"figures/ablate_{ab.model}.png"
    plots.effect_bars(df[df["variant"] != "base"], out / fig, f"Ablations of {ab.model}")
    io.write_csv(df, out / f"ablate_{ab.model}.csv")
    md = io.write_text(out / f"ablate_{ab.model}.md", markdown(df, ab, fig))
    print(markdown(df, ab, fig).split("\n\n", 3)[-1])
    print(f"wrote {md}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``mmfold ablate`` options."""
    p.add_argument("--model", required=True, help="model config whose model.ablations are run")
    p.add_argument("--folds", help="folds to train and score, comma-separated (default: all)")
    p.add_argument("--only", help="run only these variants, comma-separated")


def run(args: argparse.Namespace) -> int:
    """Parse options and ablate."""
    folds = [int(k) for k in args.folds.split(",")] if args.folds else None
    only = args.only.split(",") if args.only else None
    ablate(args.data, args.model, folds, args.overrides, only)
    return 0
