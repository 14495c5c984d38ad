"""Compares two finished comparisons that differ only in ``trainer.precision`` (e.g. ``32-true``
and ``bf16-mixed``): per run the test metric of both, the paired difference (same arch, attention,
seed), and the median seconds per epoch of both. Then per arm, and over all arms: the mean paired
difference with its 95% t-interval over seeds, set against the reference's seed-to-seed spread
(sample std over all the reference's seeds of the arm, paired or not; over all arms the root mean
of the arms' variances).

The reading is an equivalence check with the seed spread as its margin: "same within the seed
noise" where the interval holds zero and lies within +- the spread (about a two one-sided test at
2.5% each; the margin is itself estimated from the reference's few seeds), "differs" where it excludes zero and the t-test's p-value, Holm-adjusted over the arms, is below
0.05 ("by less than the seed spread" where it also lies within the margin: a consistent shift is
named however small), and "not resolved" otherwise (too few or too noisy pairs to tell). Fewer
than three pairs are never read. The row over all arms pools their pairs (one test).

    python experiments/precision_parity.py runs/main-fp32 runs/main-bf16
    python experiments/precision_parity.py runs/camvid runs/camvid-bf16 --metric test_miou

Runs present in only one folder are listed and left out. Epoch times come from each run's
``history.csv`` (median over epochs, so a few slow epochs on a shared machine do not decide it).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from smp_cbam.report.constants import ALPHA
from smp_cbam.report.io import collect_results
from smp_cbam.report.stats import holm, paired_stats

KEYS = ["arch", "attention", "placement", "seed"]
ARM = KEYS[:-1]
MIN_PAIRS = 3


def reading(ci_low: float, ci_high: float, margin: float, n_pairs: int, p_holm: float) -> str:
    """Plain words for a paired interval of other - ref against the margin (the seed spread);
    ``p_holm``: the t-test's p-value, Holm-adjusted over the arms read together."""
    if n_pairs < MIN_PAIRS or not np.isfinite([ci_low, ci_high, margin]).all():
        return f"too few pairs (< {MIN_PAIRS})" if n_pairs < MIN_PAIRS else "not read (no interval or spread)"
    within = -margin <= ci_low and ci_high <= margin
    if ci_low > 0 or ci_high < 0:  # a consistent shift, however small against the spread, is named
        if not p_holm < ALPHA:
            return f"not resolved (the interval excludes zero, but not after Holm over the arms: p {p_holm:.3f})"
        return "differs, by less than the seed spread" if within else "differs"
    return "same within the seed noise" if within else "not resolved"


def interval(t: pd.Series) -> str:
    if np.isfinite(t["ci_low"]):
        return f"{t['mean_diff']:+.2f} [{t['ci_low']:+.2f}, {t['ci_high']:+.2f}]"
    return f"{t['mean_diff']:+.2f}"


def seed_std(results: pd.DataFrame, arm: tuple, metric: str) -> float:
    """The sample std over seeds of ``arm`` = (arch, attention, placement), in percent."""
    values = results.loc[(results[ARM] == pd.Series(arm, index=ARM)).all(axis=1), metric] * 100
    return float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")


def median_epoch_seconds(folder: Path, run_dir: str) -> float:
    history = pd.read_csv(folder / run_dir / "history.csv")
    return float(history["seconds"].median())


def load(folder: Path) -> pd.DataFrame:
    results = collect_results(folder)
    results = results[results["status"] == "ok"].copy()
    results["epoch_s"] = [median_epoch_seconds(folder, d) for d in results["run_dir"]]
    # results from before placements were recorded: the decoder, the only placement then
    results["placement"] = results["placement"].fillna("decoder") if "placement" in results else "decoder"
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("reference", type=Path, help="the comparison in the reference precision (e.g. 32-true)")
    parser.add_argument("other", type=Path, help="the same comparison in the other precision (e.g. bf16-mixed)")
    parser.add_argument("--metric", default="test_miou", help="results.csv column to compare (default test_miou)")
    args = parser.parse_args(argv)
    for folder in (args.reference, args.other):
        if not (folder / "results.csv").is_file() and not (folder / "runs").is_dir():
            parser.error(f"{folder}: no results.csv or runs/ here; give a finished comparison's output folder")
    ref, other = load(args.reference), load(args.other)
    if args.metric not in ref or args.metric not in other:
        parser.error(f"--metric {args.metric!r} is not a column of both results tables")
    both = ref.merge(other, on=KEYS, suffixes=("_ref", "_other"))
    alone = set(map(tuple, pd.concat([ref[KEYS], other[KEYS]]).drop_duplicates().values)) - set(
        map(tuple, both[KEYS].values)
    )
    precision = (ref["precision"].iloc[0], other["precision"].iloc[0])
    print(f"reference: {args.reference} ({precision[0]});  other: {args.other} ({precision[1]})")
    if alone:
        print("left out (in one folder only): " + ", ".join("-".join(map(str, k)) for k in sorted(alone)))
    if both.empty:
        print("no run is in both folders")
        return 1
    m = args.metric
    both["diff"] = (both[f"{m}_other"] - both[f"{m}_ref"]) * 100
    both["speedup"] = both["epoch_s_ref"] / both["epoch_s_other"]
    rows = both.sort_values(KEYS)
    print(f"\nper run ({m} in percent; epochs, median s/epoch):")
    print("| run | ref | other | other - ref | ref epochs | other epochs | ref s/ep | other s/ep | speed-up |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for _, r in rows.iterrows():
        name = f"{r['arch']}-{r['attention']}-s{r['seed']}"
        print(
            f"| {name} | {r[f'{m}_ref'] * 100:.2f} | {r[f'{m}_other'] * 100:.2f} | {r['diff']:+.2f} | "
            f"{r['epochs_ref']} | {r['epochs_other']} | {r['epoch_s_ref']:.2f} | {r['epoch_s_other']:.2f} | "
            f"{r['speedup']:.2f}x |"
        )
    print(
        "\nper arm: mean paired difference with its 95% t-interval over seeds, against the reference's "
        "seed spread (sample std over all its seeds of the arm):"
    )
    print(
        "| arch | attention | seeds | mean other - ref [95% CI] | p (Holm) | ref seed std | other seed std | reading | "
        "median speed-up |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---|---:|")
    arms = list(rows.groupby(ARM))
    tests = [paired_stats(g["diff"]) for _, g in arms]
    p_values = np.array([t["p_value"] for t in tests], dtype=float)
    p_holm = np.full(len(tests), np.nan)
    tested = np.isfinite(p_values)
    if tested.any():
        p_holm[tested] = holm(p_values[tested])
    variances = []
    for ((arch, attention, placement), g), t, p_arm in zip(arms, tests, p_holm, strict=True):
        # each precision's spread over all its seeds of the arm, paired or not
        spread_ref, spread_other = (seed_std(r, (arch, attention, placement), m) for r in (ref, other))
        if placement != "decoder":
            attention = f"{attention} ({placement})"
        if np.isfinite(spread_ref):
            variances.append(spread_ref**2)
        print(
            f"| {arch} | {attention} | {len(g)} | {interval(t)} | {p_arm:.3f} | {spread_ref:.2f} | {spread_other:.2f} | "
            f"{reading(t['ci_low'], t['ci_high'], spread_ref, int(t['n_pairs']), p_arm)} | {g['speedup'].median():.2f}x |"
        )
    t = paired_stats(rows["diff"])
    spread = float(np.sqrt(np.mean(variances))) if variances else float("nan")
    print(
        f"\nall paired runs ({len(rows)}): mean difference {interval(t)} points against a seed spread of "
        f"{spread:.2f} (root mean of the arms' variances): {reading(t['ci_low'], t['ci_high'], spread, int(t['n_pairs']), t['p_value'])}; "
        f"median |difference| {rows['diff'].abs().median():.2f}; median epoch speed-up {rows['speedup'].median():.2f}x"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
