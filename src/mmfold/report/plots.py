"""Figures for the report, sweeps and ablations (matplotlib, headless).

Every function takes plain arrays/frames, draws one figure and writes it atomically as PNG, so
the report code never touches matplotlib state. Figures size themselves to the number of
labels or models, because a 10-label demo and an 80-label COCO must both stay legible on
GitHub: label names go on the y axis of horizontal bars, where long names never overlap.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on CI / servers; must precede pyplot

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from mmfold import fileio  # noqa: E402

DPI = 110
BLUE, ORANGE, GREY = "#1f77b4", "#ff7f0e", "#7f7f7f"
MAX_SQUARE = 16.0  # inches: an 80-label heatmap stays under ~1800 px wide


def save(fig: plt.Figure, path: str | Path) -> Path:
    """Write a figure as PNG through a temp file and close it (figures leak memory otherwise)."""
    try:
        fig.tight_layout()
        return fileio.atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight"))
    finally:
        plt.close(fig)


def _label_height(n: int, per: float = 0.28, base: float = 1.6) -> float:
    """Figure height that gives each label row enough room for its tick text."""
    return max(3.0, base + per * n)


def _tick_size(n: int) -> float:
    """Smaller tick text when there are many labels/models."""
    return 9.0 if n <= 25 else 7.0 if n <= 50 else 5.5


def label_frequency(freq: pd.Series, n_rows: int, path: str | Path) -> Path:
    """Horizontal bars of each label's share of training rows, most frequent on top.

    Args:
        freq: Positive rows per label, indexed by label name.
        n_rows: Training rows, to turn counts into shares.
        path: PNG to write.
    """
    freq = freq.sort_values()
    fig, ax = plt.subplots(figsize=(7.5, _label_height(len(freq))))
    ax.barh(freq.index.astype(str), freq.to_numpy() / n_rows, color=BLUE)
    for i, c in enumerate(freq.to_numpy()):
        ax.text(c / n_rows, i, f" {c}", va="center", fontsize=_tick_size(len(freq)) - 1)
    ax.set_xlabel("share of training rows with the label (bar end: count)")
    ax.set_title(f"Label frequency ({n_rows} training rows)")
    ax.tick_params(axis="y", labelsize=_tick_size(len(freq)))
    ax.set_xlim(0, freq.max() / n_rows * 1.18)
    return save(fig, path)


def cooccurrence(y: np.ndarray, classes: Sequence[str], path: str | Path) -> Path:
    """Heatmap of P(column label | row label) on the training data.

    Conditional rates, not raw counts: raw counts only repeat the frequency chart, while
    P(j | i) shows which labels travel together (and the diagonal is always 1).
    """
    y = np.asarray(y, np.float64)
    counts = y.T @ y
    cond = counts / np.maximum(np.diag(counts)[:, None], 1)
    n = len(classes)
    size = min(max(5.0, 0.42 * n + 2.5), MAX_SQUARE)
    fig, ax = plt.subplots(figsize=(size + 1.2, size))
    im = ax.imshow(cond, cmap="viridis", vmin=0, vmax=1)
    _square_ticks(ax, classes, classes)
    if n <= 20:
        _annotate(ax, cond, fmt="{:.2f}")
    ax.set_xlabel("label j")
    ax.set_ylabel("label i")
    ax.set_title("Label co-occurrence: P(label j | label i) in training data")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="P(j | i)")
    return save(fig, path)


def _square_ticks(ax: plt.Axes, xnames: Sequence[str], ynames: Sequence[str]) -> None:
    """Name every row and column; x names rotated so long names do not collide."""
    fs = _tick_size(max(len(xnames), len(ynames)))
    ax.set_xticks(range(len(xnames)), [str(c) for c in xnames], rotation=60, ha="right",
                  rotation_mode="anchor", fontsize=fs)
    ax.set_yticks(range(len(ynames)), [str(c) for c in ynames], fontsize=fs)


def _annotate(ax: plt.Axes, m: np.ndarray, fmt: str) -> None:
    """Write each cell's value, white on dark cells and black on light ones."""
    fs = 8 if m.shape[0] <= 12 else 6
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            colour = "white" if m[i, j] < 0.6 else "black"
            ax.text(j, i, fmt.format(m[i, j]), ha="center", va="center", fontsize=fs, color=colour)


def model_correlation(corr: pd.DataFrame, path: str | Path) -> Path:
    """Heatmap of the models' OOF-probability correlation (low off-diagonal = diverse members)."""
    n = len(corr)
    size = min(max(4.5, 0.7 * n + 2.5), MAX_SQUARE)
    fig, ax = plt.subplots(figsize=(size + 1.2, size))
    lo = float(min(0.0, np.nanmin(corr.to_numpy())))
    im = ax.imshow(corr.to_numpy(), cmap="magma", vmin=lo, vmax=1)
    _square_ticks(ax, corr.columns, corr.index)
    if n <= 15:
        _annotate(ax, corr.to_numpy(), fmt="{:.2f}")
    ax.set_title("OOF probability correlation between models\n(mean over labels of per-label Pearson r)")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="correlation")
    return save(fig, path)


def per_label_f1(f1: pd.DataFrame, freq: pd.Series, path: str | Path) -> Path:
    """Per-label F1 of one or two predictors, sorted, beside each label's training frequency.

    Args:
        f1: One column per predictor (e.g. best model, blend), indexed by label; sorted by the
            first column.
        freq: Share of training rows with each label (same index).
        path: PNG to write.
    """
    f1 = f1.sort_values(f1.columns[0])
    n, k = len(f1), f1.shape[1]
    fig, (ax, axf) = plt.subplots(1, 2, figsize=(10, _label_height(n)), sharey=True,
                                  gridspec_kw={"width_ratios": [3, 1.3]})
    pos = np.arange(n)
    h = 0.8 / k
    for i, (col, colour) in enumerate(zip(f1.columns, [BLUE, ORANGE, GREY])):
        ax.barh(pos + (i - (k - 1) / 2) * h, f1[col].to_numpy(), h, label=col, color=colour)
    ax.set_yticks(pos, f1.index.astype(str), fontsize=_tick_size(n))
    ax.set_ylim(-0.6, n - 0.4)
    ax.set_xlim(0, 1.02)
    ax.set_xlabel("F1 (honest: thresholds fitted on other folds)")
    ax.set_title("Per-label F1, weakest at the bottom", pad=22)
    # above the axes: every bar starts at 0, so any inside corner would cover one
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=k, fontsize=8, frameon=False)
    ax.grid(axis="x", alpha=0.3)
    axf.barh(pos, freq.reindex(f1.index).to_numpy(), 0.6, color=GREY)
    axf.set_xlabel("share of training rows")
    axf.set_title("Label frequency")
    axf.grid(axis="x", alpha=0.3)
    return save(fig, path)


def thresholds(thr: pd.Series, f1: pd.DataFrame, path: str | Path) -> Path:
    """Fitted threshold per label, and per-label F1 at 0.5 versus tuned thresholds.

    Args:
        thr: Threshold per label (fitted on all OOF rows: what a submission uses).
        f1: Columns ``at 0.5`` and ``tuned`` (honest), indexed by label.
        path: PNG to write.
    """
    order = f1["tuned"].sort_values().index
    n = len(order)
    fig, (ax_t, ax_f) = plt.subplots(1, 2, figsize=(11, _label_height(n)), sharey=True)
    pos = np.arange(n)
    ax_t.barh(pos, thr.reindex(order).to_numpy(), 0.6, color=BLUE)
    ax_t.axvline(0.5, color="black", ls="--", lw=1, label="0.5")
    ax_t.set_yticks(pos, order.astype(str), fontsize=_tick_size(n))
    ax_t.set_ylim(-0.6, n - 0.4)
    ax_t.set_xlim(0, 1)
    ax_t.set_xlabel("threshold")
    ax_t.set_title("Tuned threshold per label")
    ax_t.legend(loc="lower right", fontsize=8)
    ax_f.barh(pos - 0.2, f1.loc[order, "at 0.5"].to_numpy(), 0.4, color=GREY, label="at 0.5")
    ax_f.barh(pos + 0.2, f1.loc[order, "tuned"].to_numpy(), 0.4, color=ORANGE, label="tuned (honest)")
    ax_f.set_xlim(0, 1.02)
    ax_f.set_xlabel("F1")
    ax_f.set_title("Per-label F1: 0.5 vs tuned thresholds")
    ax_f.legend(loc="lower right", fontsize=8)
    ax_f.grid(axis="x", alpha=0.3)
    return save(fig, path)


def training_curves(logs: pd.DataFrame, model: str, path: str | Path) -> Path:
    """Loss (train solid, valid dashed) and validation F1 per epoch, one colour per fold.

    Args:
        logs: Long frame with ``fold``, ``epoch`` and any of ``train_loss``, ``valid_loss``,
            ``valid_f1``.
        model: Title.
        path: PNG to write.
    """
    from matplotlib.lines import Line2D

    fig, (ax_l, ax_f) = plt.subplots(1, 2, figsize=(12, 4))
    colours = plt.get_cmap("tab10")
    handles = []
    for i, (fold, g) in enumerate(logs.groupby("fold")):
        g, c = g.sort_values("epoch"), colours(i % 10)
        for col, ls in (("train_loss", "-"), ("valid_loss", "--")):
            if col in g and g[col].notna().any():
                ax_l.plot(g["epoch"], g[col], ls=ls, color=c, marker=".")
        if "valid_f1" in g and g["valid_f1"].notna().any():
            ax_f.plot(g["epoch"], g["valid_f1"], "-", color=c, marker="o")
        handles.append(Line2D([], [], color=c, marker="o", label=f"fold {fold}"))
    styles = [Line2D([], [], color="black", ls=ls, label=what) for ls, what in (("-", "train"), ("--", "valid"))]
    _curve_axes(ax_l, "loss", f"{model}: loss per epoch")
    _curve_axes(ax_f, "samples-F1 at 0.5", f"{model}: validation samples-F1 per epoch")
    # one legend outside the axes: inside, it would hide curves whatever corner it took
    ax_f.legend(handles=handles + styles, fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1),
                handlelength=2.5, borderaxespad=0)
    return save(fig, path)


def _curve_axes(ax: plt.Axes, ylabel: str, title: str) -> None:
    """Shared styling of a per-epoch panel."""
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.xaxis.get_major_locator().set_params(integer=True)


def effect_bars(table: pd.DataFrame, path: str | Path, title: str) -> Path:
    """Ablation effects: mean paired difference from base with its fold-to-fold std as error bar.

    Args:
        table: Columns ``variant``, ``diff``, ``diff_std`` (NaN std for computed rows).
        path: PNG to write.
        title: Figure title.
    """
    t = table.dropna(subset=["diff"]).sort_values("diff")
    fig, ax = plt.subplots(figsize=(8, _label_height(len(t), per=0.4)))
    colours = [ORANGE if d < 0 else BLUE for d in t["diff"]]
    ax.barh(t["variant"].astype(str), t["diff"], xerr=t["diff_std"].fillna(0), color=colours,
            capsize=3, ecolor="black")
    ax.axvline(0, color="black", lw=1)
    ax.set_xlabel("CV samples-F1 minus base (mean over folds; bar = fold-to-fold std)")
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    return save(fig, path)


def sweep_history(trials: pd.DataFrame, path: str | Path, title: str) -> Path:
    """Score per trial (with the running best) and score against training time.

    Args:
        trials: Columns ``number``, ``state``, ``value``, ``train_time_s``.
        path: PNG to write.
        title: Figure title.
    """
    done = trials[trials["state"] == "COMPLETE"]
    pruned = trials[trials["state"] == "PRUNED"]
    fig, (ax_h, ax_t) = plt.subplots(1, 2, figsize=(11, 4))
    ax_h.scatter(done["number"], done["value"], color=BLUE, label="complete", zorder=3)
    if len(pruned):
        ax_h.scatter(pruned["number"], pruned["value"], color=GREY, marker="x", label="pruned (last report)")
    if len(done):
        best = done.sort_values("number")
        ax_h.step(best["number"], best["value"].cummax(), where="post", color=ORANGE, label="best so far")
    ax_h.set_xlabel("trial")
    ax_h.set_ylabel("honest CV (tuned thresholds)")
    ax_h.set_title(f"{title}: score per trial", fontsize=10)
    ax_h.legend(fontsize=8, loc="best")
    ax_h.grid(alpha=0.3)
    ax_h.xaxis.get_major_locator().set_params(integer=True)
    ax_t.scatter(done["train_time_s"], done["value"], color=BLUE)
    for _, r in done.iterrows():
        ax_t.annotate(str(int(r["number"])), (r["train_time_s"], r["value"]), fontsize=7,
                      xytext=(3, 3), textcoords="offset points")
    ax_t.set_xlabel("training time of the trial (s, summed over folds)")
    ax_t.set_ylabel("honest CV (tuned thresholds)")
    ax_t.set_title(f"{title}: score vs time (label = trial)", fontsize=10)
    ax_t.grid(alpha=0.3)
    return save(fig, path)
