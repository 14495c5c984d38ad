"""Summaries, paired statistics and plots for the results of ``smp-cbam compare``.

The runner writes, under its output directory ``OUT``, one ``runs/<run>/result.json`` per finished
run (with ``history.csv`` and ``per_image.csv`` beside it), ``results.csv`` (all runs) and
``costs.csv``; :func:`write_report` rebuilds the results from the ``result.json`` files (with
``results.csv`` as the fallback) and writes ``OUT/summary.md``, ``OUT/summary.csv``,
``OUT/differences.csv`` and ``OUT/plots/*.png``.

Runs are compared *paired*: within one dataset, arch, encoder and placement, the runs of two
attention types with the same seed share data order, augmentation and initial weights, and are
evaluated on the same test images. Each difference gets a t-interval over seeds (Holm-adjusted
tests across a table's comparisons) and a paired bootstrap interval over test images; see
``docs/statistics.md``.
"""

from __future__ import annotations

import os
from pathlib import Path

from .constants import BASELINES, GROUP_COLUMNS
from .io import (
    ReportError,
    ReportWarning,
    atomic_write_csv,
    atomic_write_text,
    collect_results,
    confined_run_dir,
    read_config,
    read_costs,
    read_per_image,
    read_results,
)
from .plots import plot_differences, plot_learning_curves, plot_miou, plot_per_class_iou
from .stats import (
    comparisons,
    cost_table,
    holm,
    image_bootstrap,
    miou_from_counts,
    paired_differences,
    planned_seeds,
    primary_metric,
    summarize,
)
from .tables import escape_markdown, summary_markdown

__all__ = [
    "BASELINES",
    "GROUP_COLUMNS",
    "ReportError",
    "ReportWarning",
    "atomic_write_csv",
    "atomic_write_text",
    "collect_results",
    "comparisons",
    "confined_run_dir",
    "cost_table",
    "escape_markdown",
    "holm",
    "image_bootstrap",
    "miou_from_counts",
    "paired_differences",
    "planned_seeds",
    "plot_differences",
    "plot_learning_curves",
    "plot_miou",
    "plot_per_class_iou",
    "primary_metric",
    "read_config",
    "read_costs",
    "read_per_image",
    "read_results",
    "summarize",
    "summary_markdown",
    "write_report",
]


def write_report(output_dir: str | os.PathLike, title: str | None = None, plots: bool = True) -> str:
    """Rebuild the results of ``output_dir``; write ``summary.md``, ``summary.csv``, ``differences.csv``
    and (with ``plots``) ``plots/*.png``; return the markdown.

    Damaged files are named in :class:`ReportWarning` warnings and left out; raises
    :class:`ReportError` (or ``FileNotFoundError``) when no run can be read.
    """
    out = Path(output_dir)
    results = collect_results(out)
    metric = primary_metric(results)
    config = read_config(out)
    diffs = comparisons(results, out, metric, planned_seeds=planned_seeds(config))
    costs = cost_table(results, read_costs(out))
    text = summary_markdown(results, metric, title, diffs=diffs, costs=costs, config=config)
    atomic_write_text(out / "summary.md", text)
    atomic_write_csv(summarize(results, metric, diffs=diffs), out / "summary.csv")
    atomic_write_csv(diffs, out / "differences.csv")
    if plots:
        folder = out / "plots"
        plot_miou(results, folder / "miou.png", metric)
        plot_differences(diffs, folder / "differences.png", metric)
        plot_learning_curves(out, results, folder / "learning_curves.png")
        plot_per_class_iou(results, folder / "per_class_iou.png")
    return text
