"""The markdown summary of a results directory.

Every string that came from a results file (attention, arch and class names, failure messages) goes
through :func:`escape_markdown` or :func:`_name`, so a name cannot break a table or inject markup.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd

from .constants import ALPHA, BASELINES, MIN_SEEDS_FOR_TEST, MISSING
from .io import _group_keys, _in_group, _normalize, _ok_runs, _sort_rows, primary_metric
from .stats import comparisons, cost_table, planned_seeds, summarize

_MARKDOWN_SPECIAL = re.compile(r"([\\`*\[\]|])")
_PLAIN_NAME = re.compile(r"[\w.+-]+")
NOT_CONVERGED_MARK = "†"
AT_FLOOR_MARK = "‡"
FAILED_MARK = "§"
INCOMPLETE_MARK = "¶"


def escape_markdown(text: object) -> str:
    """``text`` on one line, safe inside a markdown table cell or heading: no markup, no HTML."""
    flat = " ".join(str(text).split())
    flat = flat.replace("<", "&lt;").replace(">", "&gt;")
    return _MARKDOWN_SPECIAL.sub(r"\\\1", flat)


def _name(text: object) -> str:
    """A user-given name: as code when it is a plain identifier, else escaped text."""
    text = str(text)
    return f"`{text}`" if _PLAIN_NAME.fullmatch(text) else escape_markdown(text)


# kept for callers of the earlier name
_cell = escape_markdown


def _pp(x: float, signed: bool = False) -> str:
    """A mIoU fraction as percentage points with two decimals."""
    if pd.isna(x):
        return MISSING
    return f"{100 * x:+.2f}" if signed else f"{100 * x:.2f}"


def _interval(low: float, high: float) -> str:
    return f"[{_pp(low, signed=True)}, {_pp(high, signed=True)}]"


def _p(p: float, bound: bool = False) -> str:
    """``p`` to three places; ``bound``: ``p`` is an upper bound (a bootstrap's smallest value)."""
    if pd.isna(p):
        return MISSING
    if p < 0.001:
        return "<0.001"
    # a bound rounded down would claim less than it knows
    return f"≤{math.ceil(p * 1000 - 1e-9) / 1000:.3f}" if bound else f"{p:.3f}"


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


def _fmt_diff(row: pd.Series, baseline: str, base_n: int = 0) -> str:
    """The Δ cell of the main table: mean paired difference and its seed interval (image interval for one seed).

    ``base_n``: the baseline's runs with a value, to say when the pairs are fewer than either arm's runs
    (the means of the table then rest on other seeds than the difference)."""
    if row["attention"] == baseline:
        return "baseline"
    prefix = f"diff_vs_{baseline}"
    n = row[f"{prefix}_n"]
    if n == 0:
        return MISSING
    mean = _pp(row[prefix], signed=True)
    if n < 2:
        low, high = row.get(f"{prefix}_img_low", np.nan), row.get(f"{prefix}_img_high", np.nan)
        text = f"{mean} (1 seed, images {_interval(low, high)})" if pd.notna(low) else f"{mean} (1 seed, no CI)"
    else:
        text = f"{mean} {_interval(row[f'{prefix}_ci_low'], row[f'{prefix}_ci_high'])}"
    if row.get(f"{prefix}_holds") is True:
        text = f"**{text}**"
    if row.get(f"{prefix}_not_converged") is True:
        text += f" {NOT_CONVERGED_MARK}"
    if row.get(f"{prefix}_at_floor") is True:
        text += f" {AT_FLOOR_MARK}"
    if row.get(f"{prefix}_failed") is True:
        text += f" {FAILED_MARK}"
    if row.get(f"{prefix}_incomplete") is True:
        text += f" {INCOMPLETE_MARK}"
    if 2 <= n < max(row["n"], base_n):  # one pair says "1 seed" already
        text += f" ({n} pairs)"
    return text


def _table_head(columns: list[str], text_columns: int) -> list[str]:
    """A markdown table's header: the first ``text_columns`` left-aligned, the numbers right-aligned."""
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * text_columns + "---:|" * (len(columns) - text_columns)]


def _varying(rows: pd.DataFrame, keys: list[str]) -> list[str]:
    """The group keys that take more than one value in ``rows``: constant ones are in the headings already."""
    return [k for k in keys if rows[k].nunique() > 1]


def _group_title(keys: list[str], values: tuple) -> str:
    named = dict(zip(keys, values))
    parts = [escape_markdown(named.get("arch", ""))]
    for key in ("encoder", "dataset", "placement"):
        if named.get(key):
            parts.append(f"{key} {escape_markdown(named[key])}")
    return " · ".join(p for p in parts if p) or "all runs"


def _metric_label(metric: str) -> str:
    return {"test_miou": "test mIoU", "val_miou": "validation mIoU"}.get(metric, metric)


def _run_label(row: pd.Series, keys: list[str]) -> str:
    seed = "?" if pd.isna(row["seed"]) else int(row["seed"])
    where = " / ".join([escape_markdown(row.get("arch", "")), _name(row["attention"]), f"seed {seed}"])
    context = ", ".join(
        escape_markdown(row[c]) for c in ("encoder", "dataset", "placement") if c in keys and row.get(c)
    )
    return where + (f" ({context})" if context else "")


def _reading(diffs: pd.DataFrame, tables: int = 1) -> list[str]:
    """How to read the differences, in words that match the number of seeds behind them
    (``tables``: the number of tables, each a family of its own)."""
    paired = diffs[diffs["n_pairs"] > 0]
    ns = set(paired["n_pairs"])
    has_boot = bool((diffs["boot_seeds"] > 0).any())
    lines = ["### How to read the differences", ""]
    if any(n >= MIN_SEEDS_FOR_TEST for n in ns):
        lines.append(
            f"**Bold** marks a difference that holds: its paired t-test over seeds, Holm-adjusted across the "
            f"comparisons of its table, is below {ALPHA}"
            + (", and so is its Holm-adjusted image bootstrap" if has_boot else "")
            + ", every run of its pairs converged above the trivial floor, and it has every seed of its table"
            " and of the study's plan. A difference not in bold is not shown to exist: an interval that"
            " contains 0 means no detectable difference with these runs, not evidence that there is none."
            " The intervals are each comparison's own 95%, not adjusted for the table's several comparisons:"
            " one that excludes 0 may still not hold after Holm."
            + (
                " The image intervals treat the test images as independent draws; frames of one video or one"
                " scene are not, and their intervals are then too narrow."
                if has_boot
                else ""
            )
        )
    if tables > 1 and any(n >= MIN_SEEDS_FOR_TEST for n in ns):
        lines.append(
            f'Each of the {tables} tables is adjusted on its own. Read across tables (e.g. "does CBAM beat '
            f'`none` in any architecture?"), the chance of at least one false difference is up to {tables} '
            f"times {ALPHA}; a difference that holds in only one table answers only for that table."
        )
    if 2 in ns:
        lines.append(
            "Two seeds cannot separate arms reliably: the 95% t-interval of two paired differences is the "
            "mean ± 12.7 standard errors and the standard error rests on a single difference, so no two-seed "
            f"difference is marked, whatever its interval. Run {MIN_SEEDS_FOR_TEST} or more seeds to test differences."
        )
    if 1 in ns:
        lines.append(
            "One seed: there is no seed-to-seed interval. The image interval shows how far the difference "
            "would move with another draw of test images from the same source; it says nothing about "
            "another training seed, which can move results as much, so no one-seed difference is marked. "
            f"Run {MIN_SEEDS_FOR_TEST} or more seeds to test differences."
        )
    if not ns and len(diffs):
        lines.append(
            "No attention type shares a seed with a baseline (`none` or `scse`) in its table: nothing can be compared."
        )
    if not has_boot and ns:
        lines.append(
            "No per-image results (runs/*/per_image.csv) were found, so the intervals cover seed-to-seed "
            "noise only, not the sampling of the test images."
        )
    if ns and not diffs["holds"].any():
        lines.append("No difference in these tables holds.")
    if diffs["not_converged"].any():
        lines.append(
            f"{NOT_CONVERGED_MARK}: at least one run of the pair did not converge (or has no record that it "
            "did); the difference measures learning speed within the budget, not final accuracy."
        )
    if diffs["at_floor"].any():
        lines.append(f"{AT_FLOOR_MARK}: at least one run of the pair is stuck at the trivial floor (see below).")
    if diffs["failed"].any():
        lines.append(
            f"{FAILED_MARK}: a run of one of the two arms failed (results.csv, `failure`), so the difference "
            "covers only the seeds where both trained; the lost seeds may be an arm's worst, so it is not marked."
        )
    if diffs["incomplete"].any():
        lines.append(
            f"{INCOMPLETE_MARK}: the pair, or another pair of its table, lacks seeds that other runs of the table "
            "have or that the study planned (config.yaml's `grid.seeds`): runs still to come, lost, or without a "
            "metric. The table is interim and none of its differences is marked; read them when every seed is in."
        )
    if diffs["selection_metric"].any() and ns:
        lines.append(
            "The metric is validation mIoU, the one that chose each run's best epoch: a maximum over "
            "epochs, biased up, and more for arms that run longer or swing more from epoch to epoch. "
            "No difference on it is marked; keep a test split (`data.test_fraction`) for an answer."
        )
    if len(lines) == 2:
        return []
    return [lines[0], "", *(line for text in lines[2:] for line in (text, ""))]


def _images(d: pd.Series) -> str:
    """The bootstrap's test images, and its seeds where per-image results cover fewer than the t-test."""
    images = str(d["boot_images"])
    return images if d["boot_seeds"] >= d["n_pairs"] else f"{images} ({d['boot_seeds']} of {d['n_pairs']} seeds)"


def _differences_table(rows: pd.DataFrame) -> list[str]:
    """The detail of every distinct comparison of one group."""
    distinct = rows.assign(_pair=[tuple(sorted(p)) for p in zip(rows["attention"], rows["baseline"])])
    distinct = distinct[distinct["n_pairs"] > 0].drop_duplicates("_pair")
    if distinct.empty:
        return []
    family = len(distinct)
    lines = [
        f"Paired differences ({family} distinct comparison{'s' if family > 1 else ''}, Holm-adjusted together):",
        "",
        "| comparison | seeds | higher in | Δ | seed 95% CI | p | Holm p | images | image 95% CI | image Holm p | holds |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for _, d in distinct.iterrows():
        boot = d["boot_seeds"] > 0
        flags = (
            (NOT_CONVERGED_MARK, "not_converged"),
            (AT_FLOOR_MARK, "at_floor"),
            (FAILED_MARK, "failed"),
            (INCOMPLETE_MARK, "incomplete"),
        )
        mark = "".join(f" {sign}" for sign, flag in flags if d[flag])
        cells = [
            f"{_name(d['attention'])} − {_name(d['baseline'])}",
            str(d["n_pairs"]),
            f"{d['n_above']} of {d['n_pairs']}",
            _pp(d["mean_diff"], signed=True) + mark,
            _interval(d["ci_low"], d["ci_high"]) if d["n_pairs"] >= 2 else MISSING,
            _p(d["p_value"]),
            _p(d["p_holm"]),
            _images(d) if boot else MISSING,
            _interval(d["boot_low"], d["boot_high"]) if boot else MISSING,
            _p(d["boot_p_holm"], bool(d["boot_p_bound"])) if boot else MISSING,
            "**yes**" if d["holds"] else "no",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return [*lines, ""]


def _per_class_table(df: pd.DataFrame, keys: list[str]) -> list[str]:
    class_cols = [c for c in df.columns if c.startswith("iou_")]
    ok = df[df["status"] == "ok"]
    if not class_cols or ok.empty:
        return []
    keys = _varying(ok, keys)
    lines = ["## Per-class IoU", "", "Mean over the successful runs, in percent.", ""]
    lines += _table_head([*keys, "attention", *(escape_markdown(c[4:]) for c in class_cols)], len(keys) + 1)
    means = _sort_rows(ok.groupby([*keys, "attention"])[class_cols].mean().reset_index(), keys)
    for _, row in means.iterrows():
        cells = [escape_markdown(row[k]) for k in keys] + [_name(row["attention"])]
        lines.append("| " + " | ".join(cells + [_pp(row[c]) for c in class_cols]) + " |")
    return [*lines, ""]


def _cost_lines(costs: pd.DataFrame | None) -> list[str]:
    if costs is None or costs.empty:
        return []
    keys = [k for k in ("arch", "encoder", "placement") if k in costs]
    has_latency = "latency_ms" in costs and costs["latency_ms"].notna().any()
    source = costs["source"].iloc[0]
    lines = ["## Cost", ""]
    if source == "costs.csv":
        lines.append(
            "Parameters of the modules in the forward pass; latency: median ms per image, measured in one controlled pass after training (costs.csv)."
        )
    else:
        lines.append(
            "Parameters of the model; latency as recorded beside each run's training (older results, no controlled pass): compare with care."
        )
    lines.append("")
    cols = [*keys, "attention", "params", "params vs none"] + (
        ["latency ms/img", "latency vs none"] if has_latency else []
    )
    lines += _table_head(cols, len(keys) + 1)
    for _, row in costs.iterrows():
        cells = [escape_markdown(row[k]) for k in keys] + [_name(row["attention"])]
        cells += [_fmt_params(row.get("params", np.nan)), _pct(row.get("params_vs_none_%", np.nan))]
        if has_latency:
            cells += [_fmt_latency(row["latency_ms"]), _pct(row.get("latency_ms_vs_none_%", np.nan))]
        lines.append("| " + " | ".join(cells) + " |")
    return [*lines, ""]


def _training_lines(df: pd.DataFrame, keys: list[str]) -> list[str]:
    """Epochs and training time per arm: how long each arm took to reach its stopping point."""
    ok = df[(df["status"] == "ok") & df["epochs"].notna()] if "epochs" in df else df.iloc[0:0]
    if ok.empty:
        return []
    keys = _varying(ok, keys)
    has_time = "train_seconds" in ok and ok["train_seconds"].notna().any()
    lines = [
        "## Training",
        "",
        "Epochs run and the best (tested) epoch: median [min-max] over the successful runs"
        + (
            "; training time: median minutes per run and the arm's total, wall-clock as each "
            "run's history recorded it (it depends on what else shared the machine)."
            if has_time
            else "."
        ),
        "",
    ]
    cols = [*keys, "attention", "runs", "epochs", "best epoch"] + (
        ["minutes/run", "minutes in all"] if has_time else []
    )
    lines += _table_head(cols, len(keys) + 1)

    def spread(values: pd.Series) -> str:
        values = values.dropna()
        if values.empty:
            return MISSING
        if values.min() == values.max():
            return f"{values.min():.0f}"
        return f"{values.median():.0f} [{values.min():.0f}-{values.max():.0f}]"

    for group, rows in _sort_rows(ok, keys).groupby([*keys, "attention"], sort=False):
        group = group if isinstance(group, tuple) else (group,)
        cells = [escape_markdown(v) for v in group[:-1]] + [_name(group[-1]), str(len(rows))]
        cells += [spread(rows["epochs"]), spread(rows["best_epoch"]) if "best_epoch" in rows else MISSING]
        if has_time:
            seconds = rows["train_seconds"].dropna()
            cells += [f"{seconds.median() / 60:.0f}", f"{seconds.sum() / 60:.0f}"] if len(seconds) else [MISSING] * 2
        lines.append("| " + " | ".join(cells) + " |")
    if has_time:
        total = ok["train_seconds"].sum() / 3600
        lines += ["", f"All {len(ok)} runs: {total:.1f} hours of training."]
    return [*lines, ""]


def _pct(x: float) -> str:
    return MISSING if pd.isna(x) else f"{x:+.1f}%"


def _flag_lines(df: pd.DataFrame, keys: list[str]) -> list[str]:
    ok = df[df["status"] == "ok"]
    lines = []
    if "converged" not in ok and {"best_epoch", "epochs"} <= set(ok.columns) and not ok.empty:
        # results written before convergence was recorded: the best epoch being the last one is the sign
        last = int((ok["best_epoch"] >= ok["epochs"] - 1).sum())
        if last:
            lines += [
                "## Convergence not recorded",
                "",
                f"In {last} of {len(ok)} successful runs the best epoch is the last one: their validation metric "
                "may still have been rising, and the comparison may measure learning speed, not final accuracy.",
                "",
            ]
    if "converged" in ok:
        slow = _sort_rows(ok[ok["converged"] == False], keys)  # noqa: E712 (object column of bools/NaN)
        if not slow.empty:
            lines += ["## Runs that did not converge", ""]
            for _, row in slow.iterrows():
                why = []
                if row.get("stop_reason"):
                    why.append(f"stopped by {escape_markdown(row['stop_reason'])}")
                if pd.notna(row.get("epochs", np.nan)):
                    why.append(f"after {int(row['epochs'])} epochs")
                if pd.notna(row.get("steps", np.nan)):
                    why.append(f"{int(row['steps'])} steps")
                if pd.notna(row.get("best_epoch", np.nan)):
                    why.append(f"best epoch {int(row['best_epoch'])}")
                lines.append(f"- {_run_label(row, keys)}" + (f": {', '.join(why)}" if why else ""))
            lines += [
                "",
                "Their budget ended before their last validations were a plateau by the stopping rule: a "
                "comparison that includes them measures learning speed, not final accuracy.",
                "",
            ]
    if "at_floor" in ok:
        stuck = _sort_rows(ok[ok["at_floor"] == True], keys)  # noqa: E712
        if not stuck.empty:
            lines += ["## Runs stuck at the trivial floor", ""]
            lines += [f"- {_run_label(row, keys)}" for _, row in stuck.iterrows()]
            lines += [
                "",
                "Their best validation mIoU is not above that of predicting the most frequent class for "
                "every pixel (plus 1 point): they learned nothing usable, and differences against them "
                "say so rather than anything about attention.",
                "",
            ]
    return lines


def _budget_line(config: dict | None) -> list[str]:
    """The stopping rule and budget of the runs, from config.yaml's ``train`` section."""
    train = config.get("train") if isinstance(config, dict) else None
    if not isinstance(train, dict):
        return []
    words = ("patience", "delta", "max_", "epochs", "steps", "stop", "budget", "plateau")
    items = [f"{k} {v}" for k, v in train.items() if any(w in str(k) for w in words) and not isinstance(v, dict | list)]
    return (
        [f"Training budget and stopping rule (config.yaml): {escape_markdown(', '.join(items))}.", ""] if items else []
    )


def _plan_line(df: pd.DataFrame, metric: str, keys: list[str], config: dict | None) -> list[str]:
    """Says that the results are interim when some arm lacks seeds of config.yaml's grid."""
    planned = planned_seeds(config)
    if not planned or df.empty:
        return []
    ok = _ok_runs(df, metric)
    # a failed run is not to come (its pairs are marked failed): interim means runs still missing
    done = pd.concat([ok, df[df["status"] != "ok"]]) if "status" in df else ok
    have = done[done["seed"].isin(planned)].groupby([*keys, "attention"])["seed"].nunique().rename("have")
    arms = df[[*keys, "attention"]].drop_duplicates()
    counts = arms.merge(have.reset_index(), how="left")["have"].fillna(0).astype(int).tolist()
    if min(counts) >= len(planned):
        return []
    span = f"{min(counts)}" if min(counts) == max(counts) else f"{min(counts)}-{max(counts)}"
    return [
        f"**Interim**: the study plans {len(planned)} seeds per arm (config.yaml's `grid.seeds`); the arms "
        f"here have {span} of them with a result or a failure. No difference is marked before every seed is in.",
        "",
    ]


def summary_markdown(
    results: pd.DataFrame,
    metric: str | None = None,
    title: str | None = None,
    diffs: pd.DataFrame | None = None,
    costs: pd.DataFrame | None = None,
    config: dict | None = None,
) -> str:
    """A markdown report: per-group table of mean ± std, paired differences with their reading, flags, costs, failures.

    ``diffs``: :func:`smp_cbam.report.comparisons` of ``results`` (computed here without per-image
    files when not given); ``costs``: :func:`smp_cbam.report.cost_table` (from ``results`` when not
    given); ``config``: the
    results directory's configuration, for the stopping rule.
    """
    df = _normalize(results)
    metric = metric or primary_metric(df)
    keys = _group_keys(df)
    seeds = sorted(df["seed"].dropna().astype(int).unique())
    lines = [
        f"# {escape_markdown(title or 'smp-cbam attention comparison')}",
        "",
        f"Metric: **{_metric_label(metric)}** (`{metric}`), in percentage points: mean ± sample std over "
        f"seeds ({', '.join(map(str, seeds)) or 'none'}). Δ = mean paired difference to the baseline "
        "(same seed: same data order, augmentation and initial weights) with its 95% t-interval over seeds.",
        "",
        *_budget_line(config),
        *_plan_line(df, metric, keys, config),
    ]
    if df.empty:
        return "\n".join([*lines, "No runs in results.csv.", ""])
    if diffs is None:
        diffs = comparisons(df, None, metric)
    summary = summarize(df, metric, diffs=diffs)
    optional = [
        ("n_converged", "converged"),
        ("context_mean", "context mIoU"),
        ("untrained_miou", "untrained mIoU"),
    ]
    shown = [(col, label) for col, label in optional if col in summary]
    header = [
        "| attention | n | "
        + "".join(f"{label} | " for col, label in shown if col == "n_converged")
        + "mIoU mean ± std | "
        + "".join(f"{label} | " for col, label in shown if col == "context_mean")
        + "Δ vs none [95% CI] | Δ vs scse [95% CI] |"
        + "".join(f" {label} |" for col, label in shown if col == "untrained_miou")
        + " params |",
    ]
    header.append("|---|" + "---:|" * (header[0].count("|") - 2))
    base_n = {(*(r[k] for k in keys), r["attention"]): r["n"] for _, r in summary.iterrows()}
    for group, rows in summary.groupby(keys, sort=False) if keys else [((), summary)]:
        group = group if isinstance(group, tuple) else (group,)
        lines += [f"## {_group_title(keys, group)}", ""]
        if "precision" in df:
            precisions = sorted({p for p in df.loc[_in_group(df, keys, group), "precision"] if p})
            if precisions:
                lines += [f"Precision: {escape_markdown(', '.join(precisions))}.", ""]
        lines += header
        for _, row in rows.iterrows():
            n = f"{row['n']}"
            if row["n_failed"]:
                n += f" ({row['n_failed']} failed)"
            if row.get("n_at_floor", 0):
                n += f" ({row['n_at_floor']} at floor)"
            cells = [_name(row["attention"]), n]
            if "n_converged" in summary:
                cells.append(f"{row['n_converged']}/{row['n_ok']}")
            cells.append(_fmt_mean_std(row["mean"], row["std"]))
            if "context_mean" in summary:
                cells.append(_fmt_mean_std(row["context_mean"], row["context_std"]))
            cells += [_fmt_diff(row, b, int(base_n.get((*group, b), 0))) for b in ("none", "scse")]
            if "untrained_miou" in summary:
                cells.append(_pp(row["untrained_miou"]))
            cells.append(_fmt_params(row.get("params", np.nan)))
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        lines += _differences_table(diffs[_in_group(diffs, keys, group)])
    lines += _reading(diffs, tables=int(summary.groupby(keys, sort=False).ngroups) if keys else 1)
    if "context_mean" in summary:
        lines += ["Context mIoU: mIoU over the test pixels whose label depends on the global cue only.", ""]
    if "untrained_miou" in summary:
        lines += ["Untrained mIoU: the same metric for each run's initial weights, before any training.", ""]
    lines += _flag_lines(df, keys)
    lines += _per_class_table(df, keys)
    lines += _training_lines(df, keys)
    lines += _cost_lines(cost_table(df) if costs is None else costs)
    failed = df[df["status"] != "ok"]
    if not failed.empty:
        lines += ["## Failed runs", ""]
        for _, row in _sort_rows(failed, keys).iterrows():
            reason = escape_markdown(row.get("failure", "")) or "no reason recorded"
            if len(reason) > 300:
                reason = reason[:300].rstrip("\\") + " …"
            lines.append(f"- {_run_label(row, keys)}: {reason}")
        lines.append("")
    return "\n".join(lines)


__all__ = ["BASELINES", "escape_markdown", "summary_markdown"]
