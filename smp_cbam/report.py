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

import io
import os
import uuid
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image
from scipy import stats

GROUP_COLUMNS = ("dataset", "arch", "encoder")
NUMERIC_COLUMNS = (
    "seed",
    "epochs",
    "best_epoch",
    "val_miou",
    "test_miou",
    "untrained_miou",
    "params",
    "latency_ms",
    "train_seconds",
)
HISTORY_COLUMNS = ("epoch", "train_loss", "val_loss", "val_miou", "val_dice", "lr")
ATTENTION_ORDER = ("none", "scse", "se", "eca", "cbam_channel", "cbam_spatial", "cbam")
BASELINES = ("none", "scse")
CONFIDENCE = 0.95
PLOT_DPIS = (100, 80, 64, 50)
MAX_PNG_BYTES = 200_000
MISSING = "—"


# --------------------------------------------------------------------------------------------
# atomic writes


def _atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    # os.open (unlike mkstemp, which gives 0o600) lets the umask set the new file's mode
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` via a temp file in the same directory and ``os.replace``."""
    _atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_csv(df: pd.DataFrame, path: str | os.PathLike) -> None:
    """Write ``df`` as CSV (without the index) to ``path`` atomically."""
    atomic_write_text(path, df.to_csv(index=False))


# --------------------------------------------------------------------------------------------
# reading and normalising


def read_results(path: str | os.PathLike) -> pd.DataFrame:
    """Read a ``results.csv``; strings stay strings (an attention named "NA" is not a NaN)."""
    raw = pd.read_csv(path, dtype=str, keep_default_na=False)
    return _normalize(raw)


def _normalize(results: pd.DataFrame) -> pd.DataFrame:
    """Copy of ``results`` with string group keys, lower-case status and numeric metric columns.

    A (dataset, arch, encoder, attention, seed) listed more than once (a rerun) keeps its last row.
    """
    df = results.copy()
    for col in (*GROUP_COLUMNS, "attention"):
        if col in df:
            df[col] = df[col].fillna("").astype(str).str.strip()
    df["status"] = df["status"].fillna("").astype(str).str.strip().str.lower()
    if "failure" in df:
        df["failure"] = df["failure"].fillna("").astype(str)
    numeric = [c for c in df.columns if c in NUMERIC_COLUMNS or c.startswith("iou_")]
    df[numeric] = df[numeric].apply(pd.to_numeric, errors="coerce")
    return df.drop_duplicates([*_group_keys(df), "attention", "seed"], keep="last")


def _group_keys(results: pd.DataFrame) -> list[str]:
    return [c for c in GROUP_COLUMNS if c in results]


def _attention_rank(name: str) -> tuple[int, str]:
    order = ATTENTION_ORDER.index(name) if name in ATTENTION_ORDER else len(ATTENTION_ORDER)
    return order, name


def _sort_attentions(names: Sequence[str]) -> list[str]:
    return sorted(set(names), key=_attention_rank)


def _sort_rows(df: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    rank = df["attention"].map(lambda a: _attention_rank(a)[0])
    return (
        df.assign(_rank=rank)
        .sort_values([*keys, "_rank", "attention"], kind="stable")
        .drop(columns="_rank")
    )


def _ok_runs(results: pd.DataFrame, metric: str) -> pd.DataFrame:
    """The successful runs of normalised ``results`` that have a value for ``metric``."""
    return results[(results["status"] == "ok") & results[metric].notna()]


def primary_metric(results: pd.DataFrame) -> str:
    """``"test_miou"`` if any successful run has a test mIoU, else ``"val_miou"``."""
    if "test_miou" not in results:
        return "val_miou"
    df = _normalize(results)
    has_test = df.loc[df["status"] == "ok", "test_miou"].notna().any()
    return "test_miou" if has_test else "val_miou"


# --------------------------------------------------------------------------------------------
# statistics


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


# --------------------------------------------------------------------------------------------
# markdown


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


# --------------------------------------------------------------------------------------------
# plots


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save_figure(fig: Figure, path: str | os.PathLike) -> None:
    """Save ``fig`` as a 256-colour PNG, lowering the resolution until it is under ``MAX_PNG_BYTES``."""
    for dpi in PLOT_DPIS:
        rendered = io.BytesIO()
        fig.savefig(rendered, format="png", dpi=dpi)
        palette = Image.open(rendered).convert("RGB").quantize(colors=256)
        png = io.BytesIO()
        palette.save(png, format="png", optimize=True)
        if png.tell() <= MAX_PNG_BYTES:
            break
    _atomic_write_bytes(path, png.getvalue())


def _save_placeholder(path: str | os.PathLike, message: str) -> None:
    fig = _new_figure(4, 2)
    fig.text(0.5, 0.5, message, ha="center", va="center")
    _save_figure(fig, path)


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


def _groups(df: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    keys = _group_keys(df)
    if not keys:
        return [("all runs", df)]
    return [
        (_group_title(keys, g if isinstance(g, tuple) else (g,)), rows)
        for g, rows in df.groupby(keys, sort=True)
    ]


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
    """Validation mIoU (%) above train loss per epoch of every run, coloured by attention, one panel pair per arch.

    Missing, empty or unreadable ``history.csv`` files are skipped; failed runs are drawn dashed.
    """
    df = _normalize(results)
    output_dir = Path(output_dir)
    histories = {}
    for idx, run_dir in df["run_dir"].items() if "run_dir" in df else []:
        if isinstance(run_dir, str) and run_dir.strip():
            history = _read_history(output_dir / run_dir.strip() / "history.csv")
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
            if "train_loss" in history:
                bottom.plot(history["epoch"], history["train_loss"], **{**style, "label": None})
        top.set_title(name, fontsize=10)
        top.set_ylabel("val mIoU (%)")
        bottom.set_ylabel("train loss")
        bottom.set_xlabel("epoch")
        top.legend(fontsize=7)
        for ax in (top, bottom):
            ax.grid(alpha=0.3)
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


# --------------------------------------------------------------------------------------------
# entry point


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
