"""The markdown summary of a results directory."""

from __future__ import annotations

import numpy as np
import pandas as pd

from .constants import MISSING
from .io import _group_keys, _normalize, _sort_rows, primary_metric
from .stats import summarize


def _pp(x: float, signed: bool = False) -> str:
    """A mIoU fraction as percentage points with two decimals."""
    if pd.isna(x):
        return MISSING
    return f"{100 * x:+.2f}" if signed else f"{100 * x:.2f}"


def _fmt_params(x: float) -> str:
    if pd.isna(x):
        return MISSING
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.0f}"


def _fmt_latency(x: float) -> str:
    if pd.isna(x):
        return MISSING
    return f"{x:.1f}" if x >= 10 else f"{x:.2f}"


def _fmt_mean_std(mean: float, std: float) -> str:
    if pd.isna(mean):
        return MISSING
    return _pp(mean) if pd.isna(std) else f"{_pp(mean)} ± {_pp(std)}"


def _fmt_diff(row: pd.Series, baseline: str) -> str:
    if row["attention"] == baseline:
        return "baseline"
    n = row[f"diff_vs_{baseline}_n"]
    if n == 0:
        return MISSING
    mean = _pp(row[f"diff_vs_{baseline}"], signed=True)
    if n < 2:
        return f"{mean} (1 pair, no CI)"
    low, high = row[f"diff_vs_{baseline}_ci_low"], row[f"diff_vs_{baseline}_ci_high"]
    text = f"{mean} [{_pp(low, signed=True)}, {_pp(high, signed=True)}]"
    if low > 0 or high < 0:
        text = f"**{text}**"
    if n < row["n"]:
        text += f" ({n} pairs)"
    return text


def _cell(text: object) -> str:
    """Make a value safe inside a markdown table cell."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _group_title(keys: list[str], values: tuple) -> str:
    named = dict(zip(keys, values))
    parts = [named.get("arch", "")]
    if named.get("encoder"):
        parts.append(f"encoder {named['encoder']}")
    if named.get("dataset"):
        parts.append(f"dataset {named['dataset']}")
    return " · ".join(p for p in parts if p) or "all runs"


def _metric_label(metric: str) -> str:
    return {"test_miou": "test mIoU", "val_miou": "validation mIoU"}.get(metric, metric)


def summary_markdown(results: pd.DataFrame, metric: str | None = None, title: str | None = None) -> str:
    """A markdown report: metric, per-arch table of mean ± std and paired deltas, failed runs, how to read CIs."""
    df = _normalize(results)
    metric = metric or primary_metric(df)
    keys = _group_keys(df)
    seeds = sorted(df["seed"].dropna().astype(int).unique())
    lines = [
        f"# {title or 'smp-cbam attention comparison'}",
        "",
        f"Metric: **{_metric_label(metric)}** (`{metric}`), in percentage points: mean ± sample std over "
        f"seeds ({', '.join(map(str, seeds)) or 'none'}). Δ = mean paired difference to the baseline "
        "(same seed: same data order, augmentation and encoder init) with its 95% t-interval.",
        "",
    ]
    if df.empty:
        return "\n".join([*lines, "No runs in results.csv.", ""])
    summary = summarize(df, metric)
    untrained = "untrained_miou" in summary
    header = [
        "| attention | n | mIoU mean ± std | Δ vs none [95% CI] | Δ vs scse [95% CI] |"
        + (" untrained mIoU |" if untrained else "")
        + " params | latency ms/img |",
        "|---|---:|---:|---:|---:|" + ("---:|" if untrained else "") + "---:|---:|",
    ]
    for group, rows in summary.groupby(keys, sort=False) if keys else [((), summary)]:
        group = group if isinstance(group, tuple) else (group,)
        lines += [f"## {_group_title(keys, group)}", "", *header]
        for _, row in rows.iterrows():
            n = f"{row['n']}" + (f" ({row['n_failed']} failed)" if row["n_failed"] else "")
            cells = [
                f"`{_cell(row['attention'])}`",
                n,
                _fmt_mean_std(row["mean"], row["std"]),
                _fmt_diff(row, "none"),
                _fmt_diff(row, "scse"),
                *([_pp(row["untrained_miou"])] if untrained else []),
                _fmt_params(row.get("params", np.nan)),
                _fmt_latency(row.get("latency_ms", np.nan)),
            ]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines += [
        "How to read Δ: a difference whose 95% CI excludes 0 (**bold**) is beyond seed-to-seed noise at "
        "95%; with few seeds the CI is wide, and a CI containing 0 means no detectable difference, "
        "not no difference.",
        "",
    ]
    if untrained:
        lines += ["Untrained mIoU: the same metric for each run's initial weights, before any training.", ""]
    failed = df[df["status"] != "ok"]
    if not failed.empty:
        lines += ["## Failed runs", ""]
        for _, row in _sort_rows(failed, keys).iterrows():
            seed = "?" if pd.isna(row["seed"]) else int(row["seed"])
            where = " / ".join([str(row.get("arch", "")), str(row["attention"]), f"seed {seed}"])
            context = ", ".join(str(row[c]) for c in ("encoder", "dataset") if row.get(c))
            reason = _cell(row.get("failure", "")) or "no reason recorded"
            lines.append(f"- {where}" + (f" ({context})" if context else "") + f": {reason[:300]}")
        lines.append("")
    return "\n".join(lines)
