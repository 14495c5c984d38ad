"""Paired statistics over seeds: differences between attention types, per group of runs."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from scipy import stats

from .constants import BASELINES, CONFIDENCE
from .io import _group_keys, _normalize, _ok_runs, _sort_rows, primary_metric


def _paired_stats(diffs: pd.Series) -> pd.Series:
    n = int(diffs.count())
    if n < 2:
        return pd.Series(
            {"n_pairs": n, "mean_diff": diffs.mean(), "ci_low": np.nan, "ci_high": np.nan, "p_value": np.nan}
        )
    with warnings.catch_warnings():
        # identical differences (sd = 0) only trigger scipy's precision-loss warning
        warnings.simplefilter("ignore", RuntimeWarning)
        test = stats.ttest_1samp(diffs.to_numpy(), 0.0)
    # mean ± t_{0.975, n-1} · sd / sqrt(n), the t-interval of the mean paired difference
    half = stats.t.ppf(0.5 + CONFIDENCE / 2, n - 1) * diffs.std(ddof=1) / np.sqrt(n)
    mean = diffs.mean()
    return pd.Series(
        {"n_pairs": n, "mean_diff": mean, "ci_low": mean - half, "ci_high": mean + half, "p_value": test.pvalue}
    )


def paired_differences(results: pd.DataFrame, baseline: str, metric: str | None = None) -> pd.DataFrame:
    """Mean paired difference ``attention - baseline`` of ``metric`` per (dataset, arch, encoder, attention).

    Runs are paired by seed within the same dataset/arch/encoder; a pair needs both runs ok with a
    metric value. Columns: the group keys, ``attention``, ``baseline``, ``n_pairs``, ``mean_diff``,
    ``ci_low``/``ci_high`` (95% t-interval; NaN when ``n_pairs < 2``) and ``p_value`` (paired
    t-test; NaN when ``n_pairs < 2``). Every attention other than ``baseline`` that appears in
    ``results`` gets a row, with ``n_pairs = 0`` when nothing pairs.
    """
    df = _normalize(results)
    metric = metric or primary_metric(df)
    keys = _group_keys(df)
    cols = [*keys, "attention"]
    ok = _ok_runs(df, metric)
    base = ok.loc[ok["attention"] == baseline, [*keys, "seed", metric]]
    other = ok.loc[ok["attention"] != baseline, [*cols, "seed", metric]]
    pairs = other.merge(base, on=[*keys, "seed"], suffixes=("", "_base"))
    pairs["diff"] = pairs[metric] - pairs[f"{metric}_base"]
    columns = ["n_pairs", "mean_diff", "ci_low", "ci_high", "p_value"]
    if pairs.empty:
        stats_df = pd.DataFrame(columns=[*cols, *columns])
    else:
        stats_df = pairs.groupby(cols)["diff"].apply(_paired_stats).unstack().reset_index()
    wanted = df.loc[df["attention"] != baseline, cols].drop_duplicates()
    out = wanted.merge(stats_df, on=cols, how="left")
    out["n_pairs"] = out["n_pairs"].fillna(0).astype(int)
    out[columns[1:]] = out[columns[1:]].astype(float)
    out.insert(len(cols), "baseline", baseline)
    return _sort_rows(out, keys).reset_index(drop=True)


def summarize(results: pd.DataFrame, metric: str | None = None) -> pd.DataFrame:
    """One row per (dataset, arch, encoder, attention) with counts, mean/std over seeds and paired deltas.

    Columns: the group keys, ``attention``, ``n_ok``, ``n_failed``, ``n`` (runs with a value for
    ``metric``), ``mean``/``std`` of ``metric`` (std with ddof=1, NaN for one run),
    ``val_miou_mean``/``val_miou_std``, for each baseline ``b`` in ("none", "scse")
    ``diff_vs_b``, ``diff_vs_b_ci_low``, ``diff_vs_b_ci_high``, ``diff_vs_b_n``, ``diff_vs_b_p``
    (NaN when the baseline is absent or is the row itself), ``untrained_miou`` (when recorded),
    ``params`` and ``latency_ms`` (means over ok runs). ``attrs["metric"]`` holds the metric used.
    """
    df = _normalize(results)
    metric = metric or primary_metric(df)
    keys = _group_keys(df)
    cols = [*keys, "attention"]
    ok = _ok_runs(df, metric)
    counts = (
        df.assign(_ok=df["status"] == "ok")
        .groupby(cols)["_ok"]
        .agg(n_ok="sum", n_total="count")
        .assign(n_failed=lambda c: c["n_total"] - c["n_ok"])
        .drop(columns="n_total")
    )
    metric_stats = ok.groupby(cols)[metric].agg(n="count", mean="mean", std="std")
    val_ok = df[(df["status"] == "ok") & df["val_miou"].notna()]
    val_stats = val_ok.groupby(cols)["val_miou"].agg(val_miou_mean="mean", val_miou_std="std")
    cost_cols = [c for c in ("untrained_miou", "params", "latency_ms") if c in df and df[c].notna().any()]
    cost = df[df["status"] == "ok"].groupby(cols)[cost_cols].mean()
    out = counts.join([metric_stats, val_stats, cost]).reset_index()
    out["n"] = out["n"].fillna(0).astype(int)
    out[["n_ok", "n_failed"]] = out[["n_ok", "n_failed"]].astype(int)
    for b in BASELINES:
        diff = paired_differences(df, b, metric).drop(columns="baseline")
        diff = diff.rename(
            columns={
                "mean_diff": f"diff_vs_{b}",
                "ci_low": f"diff_vs_{b}_ci_low",
                "ci_high": f"diff_vs_{b}_ci_high",
                "n_pairs": f"diff_vs_{b}_n",
                "p_value": f"diff_vs_{b}_p",
            }
        )
        out = out.merge(diff, on=cols, how="left")
        out[f"diff_vs_{b}_n"] = out[f"diff_vs_{b}_n"].fillna(0).astype(int)
    ordered = [
        *cols,
        "n_ok",
        "n_failed",
        "n",
        "mean",
        "std",
        "val_miou_mean",
        "val_miou_std",
        *[f"diff_vs_{b}{s}" for b in BASELINES for s in ("", "_ci_low", "_ci_high", "_n", "_p")],
        *cost_cols,
    ]
    out = _sort_rows(out[ordered], keys).reset_index(drop=True)
    out.attrs["metric"] = metric
    return out
