"""The report's plots (PNG, size-capped): mIoU per attention type, paired differences, learning curves, per-class IoU.

A plot that has nothing to draw writes a placeholder only where no plot exists yet: a committed
study folder whose run histories were not committed keeps its learning curves.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from .constants import HISTORY_COLUMNS, MAX_PNG_BYTES, PLOT_DPIS
from .io import (
    _atomic_write_bytes,
    _group_keys,
    _normalize,
    _ok_runs,
    _sort_attentions,
    _sort_rows,
    _warn,
    confined_run_dir,
    primary_metric,
)
from .tables import NOT_CONVERGED_MARK, _metric_label

PLACEHOLDER_KEY = "smp-cbam"


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save_figure(fig: Figure, path: str | os.PathLike, placeholder: bool = False) -> None:
    """Save ``fig`` as a 256-colour PNG, lowering the resolution until it is under ``MAX_PNG_BYTES``.

    A placeholder carries a PNG text chunk that says so, so that a later report may replace it.
    """
    info = PngInfo()
    if placeholder:
        info.add_text(PLACEHOLDER_KEY, "placeholder")
    for dpi in PLOT_DPIS:
        rendered = io.BytesIO()
        fig.savefig(rendered, format="png", dpi=dpi)
        palette = Image.open(rendered).convert("RGB").quantize(colors=256)
        png = io.BytesIO()
        palette.save(png, format="png", optimize=True, pnginfo=info)
        if png.tell() <= MAX_PNG_BYTES:
            break
    _atomic_write_bytes(path, png.getvalue())


def _is_placeholder(path: Path) -> bool:
    """Whether ``path`` is a placeholder this module wrote (an unreadable file counts as a plot, and is kept)."""
    try:
        with Image.open(path) as image:
            return getattr(image, "text", {}).get(PLACEHOLDER_KEY) == "placeholder"
    except (OSError, ValueError):
        return False


def _save_placeholder(path: str | os.PathLike, message: str) -> None:
    """A small PNG saying ``message``, unless ``path`` already holds a real plot (then it is kept, with a warning)."""
    path = Path(path)
    if path.exists() and not _is_placeholder(path):
        _warn(f"{path}: {message}; the existing plot is kept")
        return
    fig = _new_figure(4, 2)
    fig.text(0.5, 0.5, message, ha="center", va="center")
    _save_figure(fig, path, placeholder=True)


def _colors(attentions: Sequence[str]) -> dict[str, tuple]:
    """One colour per attention type, stable across plots of the same results."""
    cmap = colormaps["tab10"]
    return {a: cmap(i % 10) for i, a in enumerate(_sort_attentions(attentions))}


def _panels(fig: Figure, n: int, ncols: int | None = None) -> list[Axes]:
    ncols = ncols or min(n, 3)
    nrows = -(-n // ncols)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    return list(axes[:n])


def _plain_title(keys: list[str], values: tuple) -> str:
    named = dict(zip(keys, values))
    parts = [str(named.get("arch", ""))]
    parts += [f"{k} {named[k]}" for k in ("encoder", "dataset", "placement") if named.get(k)]
    # matplotlib reads $...$ as math: a name with two dollars must not break the figure
    return " · ".join(p for p in parts if p).replace("$", r"\$") or "all runs"


def _groups(df: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    keys = _group_keys(df)
    if not keys:
        return [("all runs", df)]
    return [(_plain_title(keys, g if isinstance(g, tuple) else (g,)), rows) for g, rows in df.groupby(keys, sort=True)]


def plot_miou(results: pd.DataFrame, path: str | os.PathLike, metric: str | None = None) -> None:
    """mIoU (%) per attention type, mean ± std error bars and one dot per seed, one panel per arch."""
    df = _normalize(results)
    metric = metric or primary_metric(df)
    ok = _ok_runs(df, metric)
    if ok.empty:
        _save_placeholder(path, f"no successful runs with {metric}")
        return
    colors = _colors(df["attention"])
    groups = _groups(ok)
    fig = _new_figure(4.2 * min(len(groups), 3), 3.4 * -(-len(groups) // 3))
    for ax, (name, rows) in zip(_panels(fig, len(groups)), groups):
        attentions = _sort_attentions(rows["attention"])
        for i, att in enumerate(attentions):
            values = 100 * rows.loc[rows["attention"] == att, metric].to_numpy()
            jitter = np.linspace(-0.12, 0.12, len(values)) if len(values) > 1 else np.zeros(1)
            ax.scatter(i + jitter, values, s=14, color=colors[att], alpha=0.6, zorder=2)
            std = values.std(ddof=1) if len(values) > 1 else 0.0
            ax.errorbar(i + 0.3, values.mean(), yerr=std, fmt="o", color="black", capsize=4, zorder=3)
        ax.set_xticks(range(len(attentions)), attentions, rotation=30, ha="right")
        ax.set_xlim(-0.5, len(attentions) - 0.3)
        ax.set_title(name, fontsize=10)
        ax.set_ylabel(f"{_metric_label(metric)} (%)")
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("dots: seeds · black: mean ± std", fontsize=9)
    _save_figure(fig, path)


def _read_history(path: Path) -> pd.DataFrame | None:
    """A run's history.csv as numbers, or None when missing, empty or unreadable."""
    try:
        history = pd.read_csv(path)
    except (OSError, pd.errors.EmptyDataError, pd.errors.ParserError):
        return None
    if history.empty or "epoch" not in history:
        return None
    cols = [c for c in HISTORY_COLUMNS if c in history]
    return history[cols].apply(pd.to_numeric, errors="coerce").sort_values("epoch")


def plot_learning_curves(output_dir: str | os.PathLike, results: pd.DataFrame, path: str | os.PathLike) -> None:
    """Validation mIoU (%) above train loss per epoch of every run, coloured by attention, one panel pair per group.

    A star marks each run's best epoch (the checkpoint it was evaluated with). Missing, empty or
    unreadable ``history.csv`` files are skipped; failed runs are drawn dashed.
    """
    df = _normalize(results)
    output_dir = Path(output_dir)
    histories = {}
    for idx, run_dir in df["run_dir"].items() if "run_dir" in df else []:
        run_dir = confined_run_dir(output_dir, run_dir, output_dir / "results")
        if run_dir:
            history = _read_history(output_dir / run_dir / "history.csv")
            if history is not None:
                histories[idx] = history
    if not histories:
        _save_placeholder(path, "no training history found")
        return
    colors = _colors(df["attention"])
    groups = _groups(df.loc[list(histories)])
    ncols = min(len(groups), 3)
    nrows = -(-len(groups) // ncols)
    fig = _new_figure(4.2 * ncols, 5.5 * nrows)
    axes = fig.subplots(2 * nrows, ncols, squeeze=False, sharex="col")
    for i in range(len(groups), nrows * ncols):
        axes[2 * (i // ncols), i % ncols].set_visible(False)
        axes[2 * (i // ncols) + 1, i % ncols].set_visible(False)
    for i, (name, rows) in enumerate(groups):
        top, bottom = axes[2 * (i // ncols), i % ncols], axes[2 * (i // ncols) + 1, i % ncols]
        labelled = set()
        for idx, row in _sort_rows(rows, []).iterrows():
            history = histories[idx]
            style = {
                "color": colors[row["attention"]],
                "alpha": 0.8,
                "linewidth": 1.0,
                "linestyle": "-" if row["status"] == "ok" else "--",
                "label": None if row["attention"] in labelled else row["attention"],
            }
            labelled.add(row["attention"])
            if "val_miou" in history:
                top.plot(history["epoch"], 100 * history["val_miou"], **style)
                best = _best_point(history, row.get("best_epoch", np.nan))
                if best is not None:
                    top.scatter(
                        *best, marker="*", s=40, color=style["color"], edgecolors="black", linewidths=0.4, zorder=3
                    )
            if "train_loss" in history:
                bottom.plot(history["epoch"], history["train_loss"], **{**style, "label": None})
        top.set_title(name, fontsize=10)
        top.set_ylabel("val mIoU (%)")
        bottom.set_ylabel("train loss")
        bottom.set_xlabel("epoch")
        top.legend(fontsize=7)
        for ax in (top, bottom):
            ax.grid(alpha=0.3)
    fig.suptitle("★ best epoch (the evaluated checkpoint) · dashed: failed run", fontsize=8)
    _save_figure(fig, path)


def _best_point(history: pd.DataFrame, best_epoch: float) -> tuple[float, float] | None:
    """(epoch, val mIoU %) of the run's best epoch: the recorded one, else the history's maximum."""
    scores = history.dropna(subset=["val_miou"])
    if scores.empty:
        return None
    at = scores[scores["epoch"] == best_epoch] if pd.notna(best_epoch) else scores.iloc[:0]
    row = at.iloc[0] if not at.empty else scores.loc[scores["val_miou"].idxmax()]
    return float(row["epoch"]), 100 * float(row["val_miou"])


def plot_differences(diffs: pd.DataFrame, path: str | os.PathLike, metric: str = "test_miou") -> None:
    """Forest plot of every distinct comparison: mean paired difference with its seed t-interval and
    its image-bootstrap interval, one panel per group; a filled marker where the difference holds.

    ``diffs``: :func:`smp_cbam.report.comparisons`.
    """
    if diffs is None or diffs.empty or not (diffs["n_pairs"] > 0).any():
        _save_placeholder(path, "no paired differences")
        return
    keys = _group_keys(diffs)
    distinct = diffs.assign(_pair=[tuple(sorted(p)) for p in zip(diffs["attention"], diffs["baseline"])])
    distinct = distinct[distinct["n_pairs"] > 0].drop_duplicates([*keys, "_pair"])
    groups = _groups(distinct)
    height = sum(0.42 * len(rows) + 1.0 for _, rows in groups)
    fig = _new_figure(6.4, max(2.5, height))
    axes = fig.subplots(len(groups), 1, squeeze=False, height_ratios=[len(r) + 1.5 for _, r in groups]).ravel()
    for ax, (name, rows) in zip(axes, groups):
        rows = rows.reset_index(drop=True)
        y = np.arange(len(rows))
        for i, d in rows.iterrows():
            mean = 100 * d["mean_diff"]
            if d["n_pairs"] >= 2:
                ax.plot([100 * d["ci_low"], 100 * d["ci_high"]], [i - 0.12] * 2, color="black", linewidth=1.6)
            if d["boot_seeds"] > 0:
                ax.plot(
                    [100 * d["boot_low"], 100 * d["boot_high"]],
                    [i + 0.12] * 2,
                    color="tab:orange",
                    linewidth=3,
                    alpha=0.8,
                )
            ax.scatter([mean], [i], color="black", s=28, zorder=3, facecolors="black" if d["holds"] else "white")
        labels = [
            f"{d['attention']} − {d['baseline']}"
            + (f" {NOT_CONVERGED_MARK}" if d["not_converged"] else "")
            + f"  (n={d['n_pairs']})"
            for _, d in rows.iterrows()
        ]
        ax.set_yticks(y, [label.replace("$", r"\$") for label in labels], fontsize=8)
        ax.set_ylim(len(rows) - 0.5, -0.5)
        ax.axvline(0, color="grey", linewidth=1)
        ax.set_title(name, fontsize=9)
        ax.grid(axis="x", alpha=0.3)
        ax.set_xlabel(f"Δ {_metric_label(metric)} (percentage points)", fontsize=8)
    fig.suptitle(
        "black: 95% t-interval over seeds · orange: 95% image bootstrap · filled dot: holds (Holm)"
        + (f" · {NOT_CONVERGED_MARK} not converged" if distinct["not_converged"].any() else ""),
        fontsize=8,
    )
    _save_figure(fig, path)


def plot_per_class_iou(results: pd.DataFrame, path: str | os.PathLike) -> None:
    """Grouped bars of the mean per-class IoU (%) of the ok runs by attention, one panel per arch."""
    df = _normalize(results)
    class_cols = [c for c in df.columns if c.startswith("iou_")]
    ok = df[df["status"] == "ok"]
    if not class_cols or ok.empty:
        _save_placeholder(path, "no per-class IoU of successful runs")
        return
    colors = _colors(df["attention"])
    classes = [c.removeprefix("iou_") for c in class_cols]
    groups = _groups(ok)
    width_in = min(16.0, max(5.0, 0.3 * len(classes) * len(colors) + 2))
    fig = _new_figure(width_in, 2.8 * len(groups) + 0.4)
    for ax, (name, rows) in zip(_panels(fig, len(groups), ncols=1), groups):
        means = 100 * rows.groupby("attention")[class_cols].mean()
        stds = 100 * rows.groupby("attention")[class_cols].std()
        attentions = _sort_attentions(means.index)
        bar = 0.8 / len(attentions)
        x = np.arange(len(classes))
        for i, att in enumerate(attentions):
            ax.bar(
                x + (i - (len(attentions) - 1) / 2) * bar,
                means.loc[att].to_numpy(),
                bar,
                yerr=stds.loc[att].fillna(0).to_numpy(),
                color=colors[att],
                label=att,
                error_kw={"elinewidth": 0.6, "capsize": 1.5},
            )
        ax.set_xticks(x, classes, rotation=30 if len(classes) > 6 else 0, ha="right" if len(classes) > 6 else "center")
        ax.set_ylabel("IoU (%)")
        ax.set_title(name, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7, ncols=min(len(attentions), 4))
    _save_figure(fig, path)
