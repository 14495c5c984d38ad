"""Summaries, paired statistics and plots for the results of ``smp-cbam compare``.

The runner writes ``OUT/results.csv`` (one row per run) and ``OUT/<run_dir>/history.csv`` (one row
per epoch); :func:`write_report` turns them into ``OUT/summary.md``, ``OUT/summary.csv`` and
``OUT/plots/*.png``.

Runs are compared *paired by seed*: within one dataset, arch and encoder, the runs of two attention
types with the same seed share data order, augmentation and encoder initialisation, so the per-seed
difference removes most of the seed-to-seed noise. Differences are reported as the mean paired
difference with a 95% t-interval and a paired t-test.
"""

from __future__ import annotations

import os
from pathlib import Path

from .constants import BASELINES, GROUP_COLUMNS
from .io import atomic_write_csv, atomic_write_text, read_results
from .plots import plot_learning_curves, plot_miou, plot_per_class_iou
from .stats import paired_differences, primary_metric, summarize
from .tables import summary_markdown

__all__ = [
    "BASELINES",
    "GROUP_COLUMNS",
    "atomic_write_csv",
    "atomic_write_text",
    "paired_differences",
    "plot_learning_curves",
    "plot_miou",
    "plot_per_class_iou",
    "primary_metric",
    "read_results",
    "summarize",
    "summary_markdown",
    "write_report",
]


def write_report(output_dir: str | os.PathLike, title: str | None = None) -> str:
    """Read ``OUT/results.csv``; write ``summary.md``, ``summary.csv`` and ``plots/*.png``; return the markdown."""
    out = Path(output_dir)
    results = read_results(out / "results.csv")
    metric = primary_metric(results)
    text = summary_markdown(results, metric, title)
    atomic_write_text(out / "summary.md", text)
    atomic_write_csv(summarize(results, metric), out / "summary.csv")
    plots = out / "plots"
    plot_miou(results, plots / "miou.png", metric)
    plot_learning_curves(out, results, plots / "learning_curves.png")
    plot_per_class_iou(results, plots / "per_class_iou.png")
    return text
