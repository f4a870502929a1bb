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
whether an effect is bigger than the noise between folds. The score is the one the blend gives
a model, :func:`mmfold.ensemble.scoring.honest_cv` (thresholds fitted out of fold with the ``blend.*``
rules, ``data.metric``), so an ablation's Δ is the Δ the blend would see.

A variant that sets a ``train.*`` key its model's kind ignores (``train.loss`` on a CPU member)
is refused before anything trains: its row would print +0.0000 and mean nothing.
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

from mmfold import fileio, hints, paths
from mmfold.artifacts import predictions
from mmfold.paths import VARIANT_SEP
from mmfold.config import (Config, ConfigError, learned_settings, load_config, model_key, model_yaml,
                           override_key)
from mmfold.data.competition import Competition, load_folds
from mmfold.errors import UserError
from mmfold.metrics import metric_label
from mmfold.registry import Registry
from mmfold.ensemble.scoring import at_half, build_decoder, honest_cv
from mmfold.studies.sweep import Competitions, fold_probs, run_variant_fold, variant_config
from mmfold.train.runner import check_used_keys

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


def check_variants(data: str, model: str, overrides: list[str], variants: Sequence[Variant]) -> None:
    """Refuse, before anything trains, a variant setting ``train.*`` keys its kind ignores.

    A variant whose config does not even load is left to :func:`run_trained`, which reports
    it as a failed row (as any variant that does not apply).
    """
    for v in variants:
        if not v.overrides:
            continue
        try:
            cfg = variant_config(data, model, f"{model}{VARIANT_SEP}{v.name}", overrides + v.overrides)
        except UserError:
            continue
        check_used_keys(cfg, [override_key(o) for o in v.overrides], f"ablation '{v.name}'")


# ------------------------------------------------------------------------------------ scoring


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
    base_prob: np.ndarray | None = None  # (n_eval, L) rows of the evaluated folds, train order
    rows: np.ndarray | None = None  # train-row indices of the evaluated folds

    @property
    def comp(self) -> Competition:
        return self.comps.get(self.base)

    def y(self) -> np.ndarray:
        return self.comp.y()[self.rows]

    def row_folds(self) -> np.ndarray:
        return self.fold_of_row[self.rows]

    @property
    def metric(self) -> str:
        """The table's one metric: the base's ``data.metric``."""
        return self.base.data.metric

    def scores(self, prob: np.ndarray, cfg: Config | None = None) -> list[float]:
        """Per-fold honest CV of ``prob`` on the evaluated rows, as the blend scores a model.

        Thresholds for fold k are fitted on the other evaluated folds (one fold: seeded halves)
        with the ``blend.*`` rules of ``cfg`` (a variant may change them; default the base's).
        """
        blend = (cfg or self.base).blend
        return honest_cv(prob, self.y(), self.row_folds(), blend, self.metric).per_fold


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
    return fold_probs(cfg, comp, ab.fold_of_row, ab.folds), spent


def run_base(ab: Ablation) -> Result:
    """The base config; its OOF is kept for the computed variants."""
    ab.base_prob, spent = train_variant(ab, ab.base)
    return Result("base", f"`{ab.base.model.name}`", ab.scores(ab.base_prob), spent)


def run_trained(ab: Ablation, v: Variant) -> Result:
    """A variant trained from the base config plus its overrides."""
    name = f"{ab.model}{VARIANT_SEP}{v.name}"
    try:
        cfg = variant_config(ab.data, ab.model, name, ab.overrides + v.overrides)
        prob, spent = train_variant(ab, cfg)
    except (UserError, RuntimeError, ValueError) as e:  # a variant that does not apply to this kind
        print(f"{name}: failed: {e}")
        return Result(v.name, v.what, None, 0.0, f"failed: {e}")
    return Result(v.name, v.what, ab.scores(prob, cfg), spent)


@COMPUTED.register("thresholds_0.5")
def thresholds_at_half(ab: Ablation, v: Variant) -> Result:
    """The base model with one threshold of 0.5 instead of tuned per-label thresholds (the
    ``blend.min_labels`` fallback still applies, as in a submission)."""
    half = at_half(ab.base_prob, ab.y(), ab.row_folds(), ab.base.blend, ab.metric)
    return Result(v.name, "base at threshold 0.5", half.per_fold, 0.0)


@COMPUTED.register("blend_vs_single")
def blend_vs_single(ab: Ablation, v: Variant) -> Result:
    """The blend (``blend.*`` settings) of the base with other collected models, nested CV in
    the table's metric. The blender is fitted on other folds, so one fold is not enough."""
    from mmfold.ensemble.blenders import build_blender
    from mmfold.ensemble.nested import nested_cv

    present = [m for m in _blend_members(ab, v) if m != ab.model and paths.oof_file(ab.data, m).exists()]
    if not present:
        return Result(v.name, v.what, None, 0.0, f"no other collected model in {paths.oof_dir(ab.data)}")
    if len(ab.folds) < 2:
        return Result(v.name, v.what, None, 0.0, "needs 2 or more folds (the blend is fitted on the others)")
    start = time.perf_counter()
    P = np.stack([ab.base_prob] + [_collected(ab, m) for m in present])
    cv = nested_cv(P, ab.y(), ab.row_folds(), lambda k: build_blender(ab.base.blend, ab.metric),
                   lambda: build_decoder(ab.base.blend, ab.metric), metric=ab.metric)
    what = f"{ab.base.blend.method} blend of base + {', '.join(f'`{m}`' for m in present)}"
    return Result(v.name, what, list(cv.per_fold), time.perf_counter() - start)


@COMPUTED.register("model")
def other_model(ab: Ablation, v: Variant) -> Result:
    """Another collected model scored on the base's folds: the row for a change that is a
    different model config rather than an override (``no_caption`` = the image-only model)."""
    other = v.options["model"]
    if not paths.oof_file(ab.data, other).exists():
        return Result(v.name, f"`{other}`", None, 0.0,
                      f"`{other}` not collected: run `{hints.make('train', ab.data, model=other)}` first")
    prob = _collected(ab, other)
    return Result(v.name, f"`{other}`", ab.scores(prob), 0.0,
                  "collected model, training time not counted")


def _blend_members(ab: Ablation, v: Variant) -> list[str]:
    """``models:`` of the declaration, else ``blend.models``, else ``data.models``, else every
    collected model (sweep trials and variants excluded)."""
    from mmfold.report.report import model_names

    declared = v.options.get("models") or ab.base.blend.models or ab.base.data.models
    if any(paths.oof_file(ab.data, m).exists() for m in declared if m != ab.model):
        return list(declared)
    return model_names(ab.data)


def _collected(ab: Ablation, model: str) -> np.ndarray:
    """A collected model's OOF on the evaluated rows (the whole file checked: its ids, labels,
    folds and probabilities)."""
    comp = ab.comp
    return predictions.read_oof(ab.data, model, comp.ids("train"), comp.classes, ab.fold_of_row)[ab.rows]


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
    from mmfold.report.report import md_table

    shown = pd.DataFrame({
        "variant": df["variant"], "what": df["what"], f"CV {metric_label(ab.metric)}": df["cv"].map(_fmt),
        "Δ vs base": df["diff"].map(lambda v: _fmt(v, signed=True)),
        "± fold std of Δ": df["diff_std"].map(_fmt), "folds better": df["better_folds"],
        "time (s)": df["time_s"].map(lambda t: f"{t:.1f}"), "note": df["note"],
    })
    how = ("per-label thresholds fitted on the other evaluated folds" if len(ab.folds) > 1 else
           "per-label thresholds fitted on the other half of the fold (one fold)")
    return (f"# Ablations of `{ab.model}` on `{ab.data}`\n\n"
            f"Folds {ab.folds}; honest CV {metric_label(ab.metric)} as the blend scores a model: {how}, "
            "with the `blend.*` rules. Δ is the mean over folds of (variant − base) "
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
    if learned_settings(base.to_dict()) != learned_settings(load_config(data, model).to_dict()):
        base.model.name = f"{model}{VARIANT_SEP}base"  # overrides change training: keep the real runs
    variants = parse_ablations(base.model.ablations, str(model_yaml(model, data)))
    if only:
        unknown = sorted(set(only) - {v.name for v in variants})
        if unknown:
            raise UserError(f"unknown variants {unknown}; declared: {[v.name for v in variants]}")
        variants = [v for v in variants if v.name in only]
    check_used_keys(base, [override_key(o) for o in overrides], "override")
    check_variants(data, model, overrides, variants)
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
    return Ablation(data, model, base, chosen, overrides, comps, fold_of_row, rows=rows)


def _run(ab: Ablation, v: Variant) -> Result:
    """A computed variant from the registry, or a trained one; a computed row whose collected
    model cannot be read says why instead of ending the ablation."""
    if not v.computed:
        return run_trained(ab, v)
    computed: Callable[[Ablation, Variant], Result] = COMPUTED.get(v.computed)
    try:
        return computed(ab, v)
    except predictions.PredictionError as e:
        print(f"{ab.model} ablation '{v.name}': failed: {e}")
        return Result(v.name, v.what, None, 0.0, f"failed: {e}")


def _write(df: pd.DataFrame, ab: Ablation) -> None:
    """``reports/<data>/ablate_<model>.{csv,md}`` and the effect chart."""
    from mmfold.report import plots

    out = paths.reports_dir(ab.data)
    fig = f"figures/ablate_{ab.model}.png"
    plots.effect_bars(df[df["variant"] != "base"], out / fig, f"Ablations of {ab.model}")
    fileio.write_csv(df, out / f"ablate_{ab.model}.csv")
    md = fileio.write_text(out / f"ablate_{ab.model}.md", markdown(df, ab, fig))
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
    ablate(args.data, model_key(args.model, args.data), folds, args.overrides, only)
    return 0
