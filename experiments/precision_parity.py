"""Compares two finished comparisons that differ only in ``trainer.precision`` (e.g. ``32-true``
and ``bf16-mixed``): per run the test metric of both, the paired difference (same arch, attention,
seed), and the median seconds per epoch of both. Then per arm: the mean difference against the
seed-to-seed spread of the reference, so "the same accuracy within the seed noise" is a reading of
numbers printed side by side rather than a claim.

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

from smp_cbam.report.io import collect_results

KEYS = ["arch", "attention", "placement", "seed"]


def median_epoch_seconds(folder: Path, run_dir: str) -> float:
    history = pd.read_csv(folder / run_dir / "history.csv")
    return float(history["seconds"].median())


def load(folder: Path) -> pd.DataFrame:
    results = collect_results(folder)
    results = results[results["status"] == "ok"].copy()
    results["epoch_s"] = [median_epoch_seconds(folder, d) for d in results["run_dir"]]
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
    print("\nper arm: mean paired difference vs the reference's seed spread (sample std over seeds):")
    print("| arch | attention | seeds | mean other - ref | ref seed std | other seed std | median speed-up |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for (arch, attention), g in rows.groupby(["arch", "attention"]):
        spread_ref = np.std(g[f"{m}_ref"] * 100, ddof=1) if len(g) > 1 else float("nan")
        spread_other = np.std(g[f"{m}_other"] * 100, ddof=1) if len(g) > 1 else float("nan")
        print(
            f"| {arch} | {attention} | {len(g)} | {g['diff'].mean():+.2f} | {spread_ref:.2f} | {spread_other:.2f} | "
            f"{g['speedup'].median():.2f}x |"
        )
    print(
        f"\nall paired runs: mean difference {rows['diff'].mean():+.2f} points, "
        f"median |difference| {rows['diff'].abs().median():.2f}; median epoch speed-up {rows['speedup'].median():.2f}x"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
