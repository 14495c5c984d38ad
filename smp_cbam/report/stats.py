"""Paired statistics: differences between attention types per group of runs, over seeds and over test images.

Two sources of noise separate a measured difference from the true one, and each gets its interval:

* **seeds** (training noise): runs of two attention types with the same seed share data order,
  augmentation and initial weights; the mean of the per-seed differences gets a t-interval and a
  paired t-test, whose p-values are Holm-adjusted across the comparisons of one table;
* **test images** (sampling noise of the test set): a paired bootstrap resamples the test images
  (the same draw for both arms and every seed), recomputes each arm's dataset mIoU from the summed
  per-image confusion counts and averages the difference over seeds. One seed still gets it.
"""

from __future__ import annotations

import inspect
import os
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from .constants import ALPHA, BASELINES, BOOTSTRAP_SEED, CONFIDENCE, MIN_SEEDS_FOR_TEST, N_BOOTSTRAP
from .io import (
    ReportError,
    _group_keys,
    _in_group,
    _normalize,
    _ok_runs,
    _pairable_runs,
    _sort_rows,
    _warn,
    confined_run_dir,
    primary_metric,
    read_per_image,
)

# torchmetrics accumulates in float32: the exact counts' mIoU may differ from the logged one by this
PER_IMAGE_TOLERANCE = 1e-4


def holm(p_values) -> np.ndarray:
    """Holm's step-down adjusted p-values of one family of tests; NaN entries stay NaN and do not count.

    With the m p-values sorted ascending, the adjusted ``p_(i) = max_{j <= i} min(1, (m - j + 1) p_(j))``;
    rejecting where the adjusted value is below alpha controls the family-wise error rate at alpha.
    """
    p = np.asarray(p_values, dtype=float)
    out = np.full(p.shape, np.nan)
    valid = ~np.isnan(p)
    m = int(valid.sum())
    if m == 0:
        return out
    order = np.argsort(p[valid], kind="stable")
    scaled = (m - np.arange(m)) * p[valid][order]
    adjusted = np.empty(m)
    adjusted[order] = np.minimum(1.0, np.maximum.accumulate(scaled))
    out[valid] = adjusted
    return out


def holm_bound(p_values, floored) -> np.ndarray:
    """Which of :func:`holm`'s adjusted values are only upper bounds, where the p-values marked
    ``floored`` are themselves upper bounds (a bootstrap's least value): Holm's adjusted values
    rise with every p of the family, so an adjusted value is exact only where setting the floored
    p-values to 0 leaves it unchanged."""
    p = np.asarray(p_values, dtype=float)
    lowest = holm(np.where(np.asarray(floored, dtype=bool), 0.0, p))
    return lowest < holm(p)  # NaN compares False: no p-value, no bound


def miou_from_counts(counts: np.ndarray) -> np.ndarray:
    """Dataset mIoU from summed confusion counts of shape (..., 3, C) (tp, fp, fn per class).

    The definition of the training module's epoch-accumulated Jaccard index: per-class
    ``tp / (tp + fp + fn)``, classes with no pixel in target or prediction left out of the mean.
    """
    counts = np.asarray(counts, dtype=float)
    tp, fp, fn = counts[..., 0, :], counts[..., 1, :], counts[..., 2, :]
    union = tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / np.where(union > 0, union, 1), np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # no class present at all: NaN
        return np.nanmean(iou, axis=-1)


def _resample_weights(idx: np.ndarray, n: int) -> np.ndarray:
    """How often each of ``n`` images is drawn in each resample: idx (..., n) -> weights (..., n)."""
    flat = idx.reshape(-1, idx.shape[-1])
    weights = np.zeros((flat.shape[0], n))
    np.add.at(weights, (np.arange(flat.shape[0])[:, None], flat), 1.0)
    return weights.reshape(*idx.shape[:-1], n)


def mean_miou_difference(counts_a: np.ndarray, counts_b: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Mean over seeds of ``mIoU(a) - mIoU(b)``, each from the weighted sum of per-image counts.

    ``counts_a``/``counts_b``: (seeds, images, 3, C), the same images in the same order;
    ``weights``: (..., images) image multiplicities (one row per resample); None means every image once.
    """
    s, n = counts_a.shape[:2]
    weights = np.ones(n) if weights is None else np.asarray(weights, dtype=float)
    diffs = []
    for counts in (counts_a, counts_b):
        summed = np.einsum("...n,snk->...sk", weights, counts.reshape(s, n, -1).astype(float))
        diffs.append(miou_from_counts(summed.reshape(*summed.shape[:-1], 3, -1)))
    return (diffs[0] - diffs[1]).mean(axis=-1)


def bootstrap_rng(seed: int) -> dict[str, np.random.Generator]:
    """``scipy.stats.bootstrap``'s generator argument for ``seed``: ``rng`` in scipy >= 1.15,
    ``random_state`` before."""
    name = "rng" if "rng" in inspect.signature(stats.bootstrap).parameters else "random_state"
    return {name: np.random.default_rng(seed)}


def image_bootstrap(
    counts_a: np.ndarray,
    counts_b: np.ndarray,
    n_resamples: int = N_BOOTSTRAP,
    seed: int = BOOTSTRAP_SEED,
    confidence: float = CONFIDENCE,
) -> dict:
    """Paired bootstrap over test images of the mean-over-seeds mIoU difference ``a - b``.

    Each resample draws the image ids with replacement (seeded), the same draw for both arms and all
    seeds; the statistic is :func:`mean_miou_difference` of the resampled counts. Returns ``diff``
    (on all images), ``low``/``high`` (the percentile interval) and ``p`` (two-sided:
    ``2 min(#(d <= 0) + 1, #(d >= 0) + 1) / (R + 1)``, capped at 1), ``p_floor`` (no resample fell
    on the other side of zero: ``p`` is the smallest value R resamples give, a bound on the p-value
    rather than an estimate of it) and ``distribution``.
    """
    counts_a, counts_b = np.asarray(counts_a), np.asarray(counts_b)
    if counts_a.shape != counts_b.shape or counts_a.ndim != 4 or counts_a.shape[2] != 3:
        raise ValueError(
            f"counts_a and counts_b must both have shape (seeds, images, 3, classes); got {counts_a.shape} and {counts_b.shape}"
        )
    n = counts_a.shape[1]

    def statistic(idx: np.ndarray, axis: int = -1) -> np.ndarray:
        idx = np.moveaxis(np.asarray(idx), axis, -1)
        return mean_miou_difference(counts_a, counts_b, _resample_weights(idx, n))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a degenerate distribution (identical arms) is a valid answer here
        result = stats.bootstrap(
            (np.arange(n),),
            statistic,
            n_resamples=n_resamples,
            batch=max(1, 2_000_000 // max(1, n * counts_a.shape[0] * counts_a[0, 0].size)),
            vectorized=True,
            confidence_level=confidence,
            method="percentile",
            **bootstrap_rng(seed),
        )
    dist = np.asarray(result.bootstrap_distribution)
    finite = dist[np.isfinite(dist)]
    r = len(finite)
    fewer = min((finite <= 0).sum(), (finite >= 0).sum())
    p = min(1.0, 2 * (fewer + 1) / (r + 1)) if r else np.nan
    return {
        "diff": float(mean_miou_difference(counts_a, counts_b)),
        "low": float(result.confidence_interval.low),
        "high": float(result.confidence_interval.high),
        "p": p,
        "p_floor": bool(r and fewer == 0),
        "distribution": dist,
    }


IDENTICAL_SPREAD = 1e-7  # mIoU (a fraction): differences that vary less only vary by rounding


def paired_stats(diffs: pd.Series) -> pd.Series:
    """The mean of paired differences (one per seed) with its 95% t-interval and the one-sample
    t-test's p-value: ``n_pairs``, ``mean_diff``, ``ci_low``, ``ci_high``, ``p_value`` (NaN
    interval and p below two pairs or for identical differences)."""
    n = int(diffs.count())
    above = int((diffs > 0).sum())  # the sign count: what a test free of the normal assumption reads
    if n < 2:
        return pd.Series(
            {"n_pairs": n, "n_above": above, "mean_diff": diffs.mean(), "ci_low": np.nan, "ci_high": np.nan,
             "p_value": np.nan}
        )  # fmt: skip
    with warnings.catch_warnings():
        # identical differences (sd = 0) only trigger scipy's precision-loss warning
        warnings.simplefilter("ignore", RuntimeWarning)
        test = stats.ttest_1samp(diffs.to_numpy(), 0.0)
    sd = diffs.std(ddof=1)
    mean = diffs.mean()
    if not sd > IDENTICAL_SPREAD:
        # identical differences (to within rounding): t = ±inf, or a huge t from float noise, and a
        # zero-width interval would claim certainty that a handful of seeds cannot give (real
        # training never repeats a difference exactly)
        return pd.Series(
            {"n_pairs": n, "n_above": above, "mean_diff": mean, "ci_low": np.nan, "ci_high": np.nan, "p_value": np.nan}
        )
    # mean ± t_{0.975, n-1} · sd / sqrt(n), the t-interval of the mean paired difference
    half = stats.t.ppf(0.5 + CONFIDENCE / 2, n - 1) * sd / np.sqrt(n)
    return pd.Series(
        {
            "n_pairs": n,
            "n_above": above,
            "mean_diff": mean,
            "ci_low": mean - half,
            "ci_high": mean + half,
            "p_value": test.pvalue,
        }  # fmt: skip
    )


def _share_none(df: pd.DataFrame) -> pd.DataFrame:
    """``none`` has no placement: its runs also serve as the baseline of placements that have none of their own."""
    if "placement" not in df or "none" not in set(df["attention"]):
        return df
    keys = [k for k in _group_keys(df) if k != "placement"]
    extra = []
    for _, rows in df.groupby(keys, sort=False) if keys else [((), df)]:
        none = rows[rows["attention"] == "none"]
        if none.empty:
            continue
        source = "decoder" if "decoder" in set(none["placement"]) else sorted(none["placement"])[0]
        for placement in sorted(set(rows["placement"]) - set(none["placement"])):
            extra.append(none[none["placement"] == source].assign(placement=placement))
    return pd.concat([df, *extra], ignore_index=True) if extra else df


def paired_differences(results: pd.DataFrame, baseline: str, metric: str | None = None) -> pd.DataFrame:
    """Mean paired difference ``attention - baseline`` of ``metric`` per group and attention.

    Runs are paired by seed within the same group (dataset, arch, encoder, placement: the columns
    present); a pair needs both runs ok with a metric value. Columns: the group keys, ``attention``,
    ``baseline``, ``n_pairs``, ``n_above`` (the pairs where the attention scored higher),
    ``mean_diff``, ``ci_low``/``ci_high`` (95% t-interval; NaN when
    ``n_pairs < 2``) and ``p_value`` (paired t-test; NaN when ``n_pairs < 2``). Every attention other
    than ``baseline`` that appears in ``results`` gets a row, with ``n_pairs = 0`` when nothing pairs.
    """
    df = _share_none(_normalize(results))
    metric = metric or primary_metric(df)
    keys = _group_keys(df)
    cols = [*keys, "attention"]
    ok = _pairable_runs(df, metric)
    base = ok.loc[ok["attention"] == baseline, [*keys, "seed", metric]]
    other = ok.loc[ok["attention"] != baseline, [*cols, "seed", metric]]
    pairs = other.merge(base, on=[*keys, "seed"], suffixes=("", "_base"))
    pairs["diff"] = pairs[metric] - pairs[f"{metric}_base"]
    columns = ["n_pairs", "n_above", "mean_diff", "ci_low", "ci_high", "p_value"]
    if pairs.empty:
        stats_df = pd.DataFrame(columns=[*cols, *columns])
    else:
        stats_df = pairs.groupby(cols)["diff"].apply(paired_stats).unstack().reset_index()
    wanted = df.loc[df["attention"] != baseline, cols].drop_duplicates()
    out = wanted.merge(stats_df, on=cols, how="left")
    out[columns[:2]] = out[columns[:2]].fillna(0).astype(int)
    out[columns[2:]] = out[columns[2:]].astype(float)
    out.insert(len(cols), "baseline", baseline)
    return _sort_rows(out, keys).reset_index(drop=True)


class _PerImage:
    """Reads each run's ``per_image.csv`` once; a damaged, missing or inconsistent file is warned about once and skipped."""

    def __init__(self, output_dir: Path | None):
        self.output_dir = output_dir
        self.cache: dict[str, tuple[list[str], np.ndarray] | None] = {}

    def __call__(self, run_dir: str, test_miou: float = np.nan) -> tuple[list[str], np.ndarray] | None:
        """The run's image ids and counts; ``test_miou``, when known, must be the mIoU of the summed counts."""
        if self.output_dir is None or not run_dir:
            return None
        if run_dir not in self.cache:
            self.cache[run_dir] = None
            confined = confined_run_dir(self.output_dir, run_dir, self.output_dir / "results")
            path = self.output_dir / confined / "per_image.csv"
            if confined and path.exists():
                try:
                    loaded = read_per_image(path)
                except ReportError as err:
                    _warn(f"{err}; this run has no image bootstrap")
                    return None
                total = float(miou_from_counts(loaded[1].sum(axis=0)))
                if pd.notna(test_miou) and not abs(total - test_miou) <= PER_IMAGE_TOLERANCE:
                    # counts of another checkpoint or another test set would bootstrap the wrong numbers
                    _warn(
                        f"{path}: the mIoU of its counts ({total:.4f}) is not the run's test_miou ({test_miou:.4f}); "
                        "this run has no image bootstrap"
                    )
                    return None
                self.cache[run_dir] = loaded
        return self.cache[run_dir]


def _bootstrap_pairs(pairs: pd.DataFrame, per_image: _PerImage, n_resamples: int, seed: int) -> dict:
    """The image bootstrap of one comparison from its seed pairs (rows with ``run_dir`` and ``run_dir_base``)."""
    loaded = [
        (
            per_image(r["run_dir"], r.get("test_miou", np.nan)),
            per_image(r["run_dir_base"], r.get("test_miou_base", np.nan)),
        )
        for _, r in pairs.iterrows()
    ]
    loaded = [(a, b) for a, b in loaded if a is not None and b is not None]
    empty = {
        "boot_seeds": 0,
        "boot_images": 0,
        "boot_diff": np.nan,
        "boot_low": np.nan,
        "boot_high": np.nan,
        "boot_p": np.nan,
        "boot_p_floor": False,
    }
    if not loaded:
        return empty
    common = set(loaded[0][0][0])
    for a, b in loaded:
        common &= set(a[0]) & set(b[0])
    n_classes = {counts.shape[2] for pair in loaded for _, counts in pair}
    if not common or len(n_classes) != 1:
        _warn(
            f"per_image.csv files of {', '.join(pairs['run_dir'])} do not share images and classes; no image bootstrap"
        )
        return empty
    ids = sorted(common)
    if any(len(a[0]) != len(ids) or len(b[0]) != len(ids) for a, b in loaded):
        _warn(
            f"per_image.csv files of {', '.join(pairs['run_dir'])} list different images; bootstrapping the {len(ids)} they share"
        )

    def aligned(entry: tuple[list[str], np.ndarray]) -> np.ndarray:
        position = {image: i for i, image in enumerate(entry[0])}
        return entry[1][[position[i] for i in ids]]

    counts_a = np.stack([aligned(a) for a, _ in loaded])
    counts_b = np.stack([aligned(b) for _, b in loaded])
    boot = image_bootstrap(counts_a, counts_b, n_resamples=n_resamples, seed=seed)
    return {
        "boot_seeds": len(loaded),
        "boot_images": len(ids),
        "boot_diff": boot["diff"],
        "boot_low": boot["low"],
        "boot_high": boot["high"],
        "boot_p": boot["p"],
        "boot_p_floor": boot["p_floor"],
    }


def planned_seeds(config: dict | None) -> list[int]:
    """The seeds of ``config.yaml``'s grid (``grid.seeds``), or none when the config does not list them."""
    grid = config.get("grid") if isinstance(config, dict) else None
    seeds = grid.get("seeds") if isinstance(grid, dict) else None
    if not isinstance(seeds, list) or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        return []
    return sorted(set(seeds))


def _holds(row: pd.Series) -> bool:
    """Whether a comparison's difference holds: the rule of the summary's bold (see docs/statistics.md).

    A pair with a run that did not converge, or that stayed at the trivial floor, never holds: its
    difference measures learning speed (or a failure to learn), whatever its p-value. Nor does a
    comparison with a failed run in either arm (the seeds it lost may be the arm's bad ones), one
    that lacks seeds other runs of its table have or the study planned (interim), or one on
    validation mIoU, the metric that chose each run's best epoch (the maximum over epochs is
    biased up, more for arms that run longer or swing more). Fewer than
    MIN_SEEDS_FOR_TEST seeds never hold either: the image bootstrap of one seed says the difference
    is not an accident of the test images, nothing about another training seed, which moves
    results as much as the attention types differ."""
    if any(
        bool(row.get(flag, False)) for flag in ("not_converged", "at_floor", "failed", "incomplete", "selection_metric")
    ):
        return False
    if row["n_pairs"] < MIN_SEEDS_FOR_TEST:
        return False
    boot = row["boot_seeds"] > 0
    return bool(row["p_holm"] < ALPHA and (not boot or row["boot_p_holm"] < ALPHA))


def comparisons(
    results: pd.DataFrame,
    output_dir: str | os.PathLike | None = None,
    metric: str | None = None,
    n_resamples: int = N_BOOTSTRAP,
    seed: int = BOOTSTRAP_SEED,
    planned_seeds: Iterable[int] | None = None,
) -> pd.DataFrame:
    """Every difference vs ``none`` and vs ``scse`` per group, with seed and image statistics.

    Columns: the group keys, ``attention``, ``baseline``, the seed statistics of
    :func:`paired_differences` (``n_pairs``, ``mean_diff``, ``ci_low``, ``ci_high``, ``p_value``),
    ``p_holm`` (Holm-adjusted across the group's distinct comparisons: ``cbam`` vs ``none`` and
    ``none`` vs ``cbam`` are one), the image bootstrap from the runs' ``per_image.csv`` under
    ``output_dir`` (``boot_seeds``, ``boot_images``, ``boot_diff``, ``boot_low``, ``boot_high``,
    ``boot_p``, ``boot_p_holm``; NaN/0 without files; ``boot_p_floor``: ``boot_p`` is the least
    value its resamples give, ``boot_p_bound``: ``boot_p_holm`` is therefore only an upper bound),
    ``holds`` (the rule of the summary's bold),
    ``not_converged`` (some run of the pairs did not converge, or has no record of it),
    ``at_floor`` (some run of the pairs is stuck at the trivial floor), ``failed`` (some run of
    either arm in the group failed: the pairs cover only the seeds where both ran),
    ``incomplete`` (some pair of the group lacks a seed that another run of the group has, or one
    of ``planned_seeds``: a run not finished, lost or without a metric; unless a failed run is
    why, the whole group is then interim) and ``selection_metric`` (the
    metric is ``val_miou``, the one that chose each run's checkpoint).

    ``planned_seeds``: the seeds the study set out to run (``config.yaml``'s ``grid.seeds``); until
    every pair has them all, a difference is interim and does not hold (looking at a study before
    its planned end and stopping when a difference looks significant inflates the error rate).
    """
    df = _share_none(_normalize(results))
    metric = metric or primary_metric(df)
    keys = _group_keys(df)
    cols = [*keys, "attention"]
    per_image = _PerImage(None if output_dir is None else Path(output_dir))
    present = set(df["attention"])
    frames = [paired_differences(df, b, metric) for b in BASELINES if b in present]
    if not frames:
        return _empty_comparisons(cols)
    out = pd.concat(frames, ignore_index=True)
    # a row's comparison pairs only where the baseline exists in its group
    exists = df[[*keys, "attention"]].drop_duplicates().rename(columns={"attention": "baseline"})
    out = out.merge(exists, on=[*keys, "baseline"], how="inner")
    # a results table without a record of convergence gets the column as NaN: not converged
    run_cols = [*keys, "attention", "seed", "run_dir", "converged", "at_floor"]
    runs = _pairable_runs(df, metric).reindex(columns=[*run_cols, *(["test_miou"] if metric == "test_miou" else [])])
    planned = {int(s) for s in planned_seeds or ()}
    not_ok = (df["status"] != "ok").to_numpy()
    extra = []
    done: dict[tuple, dict] = {}  # b - a is the mirror of a - b: the same resamples, negated
    for _, row in out.iterrows():
        group = tuple(row[k] for k in keys)
        where = _in_group(runs, keys, group)
        mine = runs[where & (runs["attention"] == row["attention"]).to_numpy()]
        base = runs[where & (runs["attention"] == row["baseline"]).to_numpy()]
        pairs = mine.merge(base, on=[*keys, "seed"], suffixes=("", "_base"))
        mirror = done.get((*group, row["baseline"], row["attention"]))
        if mirror is None:
            info = _bootstrap_pairs(pairs, per_image, n_resamples, seed)
            done[(*group, row["attention"], row["baseline"])] = info
        else:
            info = {
                **mirror,
                "boot_diff": -mirror["boot_diff"],
                "boot_low": -mirror["boot_high"],
                "boot_high": -mirror["boot_low"],
            }
        both = [pairs[c] for c in ("converged", "converged_base") if c in pairs]
        # a run without a record of convergence (NaN, e.g. a row of an older results.csv) counts as not converged
        info["not_converged"] = bool(any((s != True).any() for s in both))  # noqa: E712 (object column of bools/NaN)
        floors = [pairs[c] for c in ("at_floor", "at_floor_base") if c in pairs]
        info["at_floor"] = bool(any((s == True).any() for s in floors))  # noqa: E712
        in_group = _in_group(df, keys, group)
        arms = df["attention"].isin([row["attention"], row["baseline"]]).to_numpy()
        info["failed"] = bool((in_group & arms & not_ok).any())
        expected = planned | {int(s) for s in df.loc[in_group, "seed"].dropna()}
        missing = expected - {int(s) for s in pairs["seed"]}
        info["incomplete"] = bool(missing)
        # seeds still to come: missing, and not lost to a failed run of either arm
        lost = {int(s) for s in df.loc[in_group & arms & not_ok, "seed"].dropna()}
        info["_to_come"] = bool(missing - lost)
        extra.append(info)
    if out.empty:  # e.g. the first finished run of a grid: nothing to compare yet
        return _empty_comparisons(cols)
    out = pd.concat([out.reset_index(drop=True), pd.DataFrame(extra)], axis=1)
    out["boot_seeds"] = out["boot_seeds"].astype(int)
    out["boot_images"] = out["boot_images"].astype(int)
    # one family per group: each unordered pair of attention types once
    out["_pair"] = [tuple(sorted((a, b))) for a, b in zip(out["attention"], out["baseline"])]
    out["p_holm"] = np.nan
    out["boot_p_holm"] = np.nan
    out["boot_p_bound"] = False
    for _, rows in out.groupby(keys, sort=False) if keys else [((), out)]:
        family = rows.drop_duplicates("_pair")
        for source, target in (("p_value", "p_holm"), ("boot_p", "boot_p_holm")):
            adjusted = dict(zip(family["_pair"], holm(family[source].to_numpy())))
            out.loc[rows.index, target] = rows["_pair"].map(adjusted).to_numpy()
        floored = family["boot_p_floor"].astype(bool).to_numpy()
        bound = dict(zip(family["_pair"], holm_bound(family["boot_p"].to_numpy(dtype=float), floored)))
        out.loc[rows.index, "boot_p_bound"] = rows["_pair"].map(bound).to_numpy()
    # a table in progress marks nothing, its complete pairs included: reading them while other arms'
    # seeds are still to come, and stopping when one looks significant, is the interim look that
    # inflates the error rate (and the Interim line says nothing is marked)
    # (a seed lost to a failed run is not to come: its pairs are marked failed, the others stand)
    for _, rows in out.groupby(keys, sort=False) if keys else [((), out)]:
        if rows["_to_come"].any():
            out.loc[rows.index, "incomplete"] = True
    out["selection_metric"] = metric == "val_miou"
    out["holds"] = out.apply(_holds, axis=1).astype(bool)
    return _sort_rows(out[[*cols, *_COMPARISON_COLUMNS]], [*keys, "baseline"]).reset_index(drop=True)


_COMPARISON_COLUMNS = (
    "baseline", "n_pairs", "n_above", "mean_diff", "ci_low", "ci_high", "p_value", "p_holm",
    "boot_seeds", "boot_images", "boot_diff", "boot_low", "boot_high", "boot_p", "boot_p_floor", "boot_p_holm",
    "boot_p_bound", "holds", "not_converged", "at_floor", "failed", "incomplete", "selection_metric",
)  # fmt: skip


def _empty_comparisons(cols: list[str]) -> pd.DataFrame:
    out = pd.DataFrame(columns=[*cols, *_COMPARISON_COLUMNS])
    types = {
        "n_pairs": int,
        "n_above": int,
        "boot_seeds": int,
        "boot_images": int,
        "boot_p_floor": bool,
        "boot_p_bound": bool,
        "holds": bool,
        "not_converged": bool,
        "at_floor": bool,
        "failed": bool,
        "incomplete": bool,
        "selection_metric": bool,
    }
    return out.astype({**{c: float for c in _COMPARISON_COLUMNS if c not in types and c != "baseline"}, **types})


_DIFF_SUFFIXES = {
    "mean_diff": "",
    "ci_low": "_ci_low",
    "ci_high": "_ci_high",
    "n_pairs": "_n",
    "p_value": "_p",
    "p_holm": "_p_holm",
    "boot_low": "_img_low",
    "boot_high": "_img_high",
    "boot_p_holm": "_img_p_holm",
    "boot_p_bound": "_img_p_bound",
    "holds": "_holds",
    "not_converged": "_not_converged",
    "at_floor": "_at_floor",
    "failed": "_failed",
    "incomplete": "_incomplete",
}


def summarize(
    results: pd.DataFrame,
    metric: str | None = None,
    output_dir: str | os.PathLike | None = None,
    diffs: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """One row per group and attention with counts, mean/std over seeds, flags and paired differences.

    Columns: the group keys, ``attention``, ``n_ok``, ``n_failed``, ``n`` (runs with a value for
    ``metric``), ``mean``/``std`` of ``metric`` (std with ddof=1, NaN for one run),
    ``val_miou_mean``/``val_miou_std``; when recorded ``context_mean``/``context_std``
    (``test_context_miou``), ``n_converged``, ``n_at_floor``, ``untrained_miou`` and ``params`` (mean
    over ok runs); and for each baseline ``b`` in ("none", "scse"): ``diff_vs_b`` (mean paired
    difference), ``_ci_low``/``_ci_high`` (seed t-interval), ``_n`` (pairs), ``_p`` (paired t-test),
    ``_p_holm`` (Holm-adjusted), ``_img_low``/``_img_high``/``_img_p_holm`` (image bootstrap, when
    ``output_dir`` has per-image files), ``_holds``, ``_not_converged`` and ``_at_floor`` (see :func:`comparisons`;
    NaN when the baseline is absent or is the row itself). ``attrs["metric"]`` holds the metric.
    ``diffs``: the result of :func:`comparisons`, when already computed.
    """
    df = _share_none(_normalize(results))
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
    val_ok = df[(df["status"] == "ok") & df["val_miou"].notna()] if "val_miou" in df else df.iloc[:0]
    val_stats = (
        val_ok.groupby(cols)["val_miou"].agg(val_miou_mean="mean", val_miou_std="std") if "val_miou" in df else None
    )
    joined = [metric_stats] + ([val_stats] if val_stats is not None else [])
    ok_all = df[df["status"] == "ok"]
    if "test_context_miou" in df and df["test_context_miou"].notna().any():
        joined.append(ok_all.groupby(cols)["test_context_miou"].agg(context_mean="mean", context_std="std"))
    if "converged" in df:
        joined.append(ok_all.assign(_c=ok_all["converged"] == True).groupby(cols)["_c"].agg(n_converged="sum"))  # noqa: E712
    if "at_floor" in df:
        joined.append(ok_all.assign(_f=ok_all["at_floor"] == True).groupby(cols)["_f"].agg(n_at_floor="sum"))  # noqa: E712
    cost_cols = [c for c in ("untrained_miou", "params") if c in df and df[c].notna().any()]
    joined.append(ok_all.groupby(cols)[cost_cols].mean())
    out = counts.join(joined).reset_index()
    int_cols = ["n_ok", "n_failed", "n", *[c for c in ("n_converged", "n_at_floor") if c in out]]
    out[int_cols] = out[int_cols].fillna(0).astype(int)
    if diffs is None:
        diffs = comparisons(df, output_dir, metric)
    diff_cols = []
    for b in BASELINES:
        wide = diffs.loc[diffs["baseline"] == b, [*cols, *_DIFF_SUFFIXES]].rename(
            columns={k: f"diff_vs_{b}{s}" for k, s in _DIFF_SUFFIXES.items()}
        )
        out = out.merge(wide, on=cols, how="left")
        out[f"diff_vs_{b}_n"] = out[f"diff_vs_{b}_n"].fillna(0).astype(int)
        diff_cols += [f"diff_vs_{b}{s}" for s in _DIFF_SUFFIXES.values()]
    ordered = [
        *cols,
        "n_ok",
        "n_failed",
        "n",
        "mean",
        "std",
        *[
            c
            for c in ("val_miou_mean", "val_miou_std", "context_mean", "context_std", "n_converged", "n_at_floor")
            if c in out
        ],
        *diff_cols,
        *cost_cols,
    ]
    out = _sort_rows(out[ordered], keys).reset_index(drop=True)
    out.attrs["metric"] = metric
    return out


def cost_table(results: pd.DataFrame, costs: pd.DataFrame | None = None) -> pd.DataFrame | None:
    """Parameters and latency per model, with the change against ``none`` in percent; None when neither is known.

    From ``costs`` (the runner's ``costs.csv``: one controlled pass after training) when given, else
    from the mean ``params``/``latency_ms`` of the ok runs in ``results`` (older result folders, where
    latency was timed beside training). Column ``source`` says which.
    """
    df = _normalize(results)
    if costs is not None and not costs.empty:
        table, source = costs.copy(), "costs.csv"
    else:
        value_cols = [c for c in ("params", "latency_ms") if c in df and df[c].notna().any()]
        if not value_cols:
            return None
        keys = [k for k in ("arch", "encoder", "placement") if k in df]
        table = df[df["status"] == "ok"].groupby([*keys, "attention"])[value_cols].mean().reset_index()
        source = "results.csv"
    keys = [k for k in ("dataset", "arch", "encoder", "placement") if k in table]
    value_cols = [c for c in ("params", "latency_ms") if c in table]
    by_model = [k for k in keys if k != "placement"]  # `none` is the reference of every placement
    reference = table[table["attention"] == "none"].drop_duplicates(by_model)[[*by_model, *value_cols]]
    table = table.merge(reference, on=by_model, how="left", suffixes=("", "_none")) if by_model else table
    for col in value_cols:
        if f"{col}_none" in table:
            table[f"{col}_vs_none_%"] = 100 * (table[col] / table.pop(f"{col}_none") - 1)
    table["source"] = source
    return _sort_rows(table, keys).reset_index(drop=True)
