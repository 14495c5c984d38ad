"""Tests of smp_cbam.report's statistics: Holm's adjustment, the image bootstrap and the rule of the bold."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torchmetrics.classification import MulticlassJaccardIndex

from smp_cbam import report


def holm_by_closed_testing(p: list[float]) -> list[float]:
    """Holm's adjusted p-values as the closed testing procedure with Bonferroni local tests.

    H_i is rejected at level a iff every intersection hypothesis H_I with i in I is, and H_I's
    Bonferroni test rejects iff |I| min_{j in I} p_j <= a; so the adjusted p-value of H_i is the
    largest |I| min_{j in I} p_j over the subsets I that contain i (capped at 1).
    """
    m = len(p)
    adjusted = []
    for i in range(m):
        worst = 0.0
        for size in range(1, m + 1):
            for subset in itertools.combinations(range(m), size):
                if i in subset:
                    worst = max(worst, min(1.0, size * min(p[j] for j in subset)))
        adjusted.append(worst)
    return adjusted


def test_holm_by_hand() -> None:
    # sorted: 0.005*4 = 0.02, 0.01*3 = 0.03, 0.03*2 = 0.06, 0.04*1 = 0.04 -> running max 0.06
    assert report.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert report.holm([0.2]) == pytest.approx([0.2])
    assert report.holm([0.6, 0.7]) == pytest.approx([1.0, 1.0])


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 6])
def test_holm_matches_closed_testing_brute_force(m: int) -> None:
    rng = np.random.default_rng(m)
    for _ in range(30):
        p = rng.uniform(0, 0.3, m) ** 2
        if m > 2:
            p[1] = p[0]  # ties
        assert report.holm(p) == pytest.approx(holm_by_closed_testing(list(p)))


def test_holm_bound_flags_every_value_a_floored_p_moves() -> None:
    from smp_cbam.report.stats import holm_bound

    # 0.001 is floored; 0.0012 is not, but its adjusted value is the floored one's 2 x 0.001
    assert list(holm_bound([0.001, 0.0012], [True, False])) == [True, True]
    # far from the floored one, 0.04 adjusts to itself
    assert list(holm_bound([0.001, 0.04], [True, False])) == [True, False]
    assert list(holm_bound([0.001, 0.04], [False, False])) == [False, False]
    assert list(holm_bound([0.001, np.nan], [True, False])) == [True, False]


def test_a_bound_is_rounded_up() -> None:
    from smp_cbam.report.tables import _p

    assert _p(0.0124, bound=True) == "≤0.013" and _p(0.0124) == "0.012"
    assert _p(0.005, bound=True) == "≤0.005" and _p(2 / 2001 * 5, bound=True) == "≤0.005"


def test_holm_ignores_missing_p_values() -> None:
    adjusted = report.holm([0.01, np.nan, 0.04])
    assert np.isnan(adjusted[1])
    assert adjusted[[0, 2]] == pytest.approx(holm_by_closed_testing([0.01, 0.04]))
    assert np.isnan(report.holm([np.nan, np.nan])).all()


def counts_of(pred: np.ndarray, target: np.ndarray, n_classes: int, ignore: int | None = None) -> np.ndarray:
    """(3, C) tp, fp, fn of one image, pixels labelled ``ignore`` left out, by brute force."""
    keep = np.ones_like(target, dtype=bool) if ignore is None else target != ignore
    out = np.zeros((3, n_classes), dtype=np.int64)
    for p, t in zip(pred[keep], target[keep]):
        if p == t:
            out[0, t] += 1
        else:
            out[1, p] += 1
            out[2, t] += 1
    return out


def test_miou_from_counts_is_torchmetrics_epoch_jaccard() -> None:
    rng = np.random.default_rng(0)
    n_classes, ignore = 5, 4
    # class 3 never appears in target or prediction: left out of the mean, as in the training module
    preds = rng.choice([0, 1, 2], size=(6, 7, 9))
    targets = rng.choice([0, 1, 2, 4], size=(6, 7, 9))
    metric = MulticlassJaccardIndex(n_classes, average="none", ignore_index=ignore, zero_division=float("nan"))
    for p, t in zip(preds, targets):
        metric.update(torch.from_numpy(p)[None], torch.from_numpy(t)[None])
    expected = metric.compute().nanmean().item()
    counts = np.stack([counts_of(p, t, n_classes, ignore) for p, t in zip(preds, targets)])
    assert report.miou_from_counts(counts.sum(axis=0)) == pytest.approx(expected, abs=1e-6)
    assert np.isnan(report.miou_from_counts(np.zeros((3, n_classes))))


def random_counts(rng: np.random.Generator, seeds: int, images: int, classes: int, shift: int = 0) -> np.ndarray:
    counts = rng.integers(0, 40, size=(seeds, images, 3, classes))
    counts[:, :, 0] += shift
    counts[:, 0, :, -1] = 0  # the last class is absent from the first image
    return counts


def miou_difference_by_loops(a: np.ndarray, b: np.ndarray, draw: list[int]) -> float:
    """Mean over seeds of mIoU(a) - mIoU(b) over the drawn images, with plain loops."""
    diffs = []
    for s in range(a.shape[0]):
        per_arm = []
        for counts in (a[s], b[s]):
            total = sum(counts[i].astype(float) for i in draw)
            ious = [total[0, k] / total[:, k].sum() for k in range(total.shape[1]) if total[:, k].sum() > 0]
            per_arm.append(sum(ious) / len(ious))
        diffs.append(per_arm[0] - per_arm[1])
    return sum(diffs) / len(diffs)


def test_resampled_statistic_matches_brute_force() -> None:
    rng = np.random.default_rng(1)
    a, b = random_counts(rng, 3, 7, 4, shift=5), random_counts(rng, 3, 7, 4)
    draws = rng.integers(0, 7, size=(25, 7))
    weights = np.stack([np.bincount(d, minlength=7) for d in draws])
    vectorised = report.stats.mean_miou_difference(a, b, weights)
    assert vectorised == pytest.approx([miou_difference_by_loops(a, b, list(d)) for d in draws])
    # all images once: the difference of the dataset mIoUs
    assert report.stats.mean_miou_difference(a, b) == pytest.approx(miou_difference_by_loops(a, b, list(range(7))))


def test_image_bootstrap_interval_matches_exhaustive_enumeration() -> None:
    """With 4 images every one of the 4^4 equally likely ordered draws can be enumerated: the exact
    bootstrap distribution. The seeded percentile interval must sit at its 2.5% and 97.5% points."""
    rng = np.random.default_rng(2)
    a, b = random_counts(rng, 2, 4, 3, shift=10), random_counts(rng, 2, 4, 3)
    exact = np.array([miou_difference_by_loops(a, b, list(d)) for d in itertools.product(range(4), repeat=4)])
    boot = report.image_bootstrap(a, b, n_resamples=20_000, seed=0)
    tol = 0.006
    assert (exact < boot["low"] - 1e-12).mean() <= 0.025 + tol
    assert (exact <= boot["low"] + 1e-12).mean() >= 0.025 - tol
    assert (exact > boot["high"] + 1e-12).mean() <= 0.025 + tol
    assert (exact >= boot["high"] - 1e-12).mean() >= 0.025 - tol
    assert boot["distribution"].mean() == pytest.approx(exact.mean(), abs=0.003)
    assert boot["diff"] == pytest.approx(miou_difference_by_loops(a, b, [0, 1, 2, 3]))
    two_sided = 2 * min((exact <= 0).mean(), (exact >= 0).mean())
    assert boot["p"] == pytest.approx(min(1.0, two_sided), abs=0.01)


def test_image_bootstrap_is_seeded_and_paired() -> None:
    rng = np.random.default_rng(3)
    a, b = random_counts(rng, 1, 30, 3, shift=3), random_counts(rng, 1, 30, 3)
    first, again = report.image_bootstrap(a, b, 500, seed=7), report.image_bootstrap(a, b, 500, seed=7)
    assert (first["low"], first["high"]) == (again["low"], again["high"])
    assert report.image_bootstrap(a, b, 500, seed=8)["low"] != first["low"]
    # the same draw for both arms: an arm against itself never moves
    same = report.image_bootstrap(a, a.copy(), 200)
    assert same["low"] == same["high"] == same["diff"] == 0.0 and same["p"] == 1.0 and not same["p_floor"]
    # every resample on one side: p is the least value 500 resamples give, a bound
    clear = report.image_bootstrap(random_counts(rng, 1, 30, 3, shift=30), b, 500)
    assert clear["low"] > 0 and clear["p"] == pytest.approx(2 / 501) and clear["p_floor"]
    # swapping the arms mirrors the interval
    swapped = report.image_bootstrap(b, a, 500, seed=7)
    assert (swapped["low"], swapped["high"]) == pytest.approx((-first["high"], -first["low"]))
    with pytest.raises(ValueError, match="counts_a and counts_b"):
        report.image_bootstrap(a, b[:, :5], 10)


# ---------------------------------------------------------------- comparisons on a results directory


def write_run(out: Path, row: dict, counts: np.ndarray | None) -> None:
    """One finished run as the runner leaves it: result.json and (when given) per_image.csv."""
    run_dir = out / "runs" / f"{row['arch']}-{row['attention']}-s{row['seed']}"
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "result.json").write_text(json.dumps({**row, "run_dir": run_dir.relative_to(out).as_posix()}))
    if counts is not None:
        table = pd.DataFrame({"image": [f"frame_{i:03d}" for i in range(len(counts))]})
        for k in range(counts.shape[2]):
            for j, kind in enumerate(("tp", "fp", "fn")):
                table[f"{kind}_{k}"] = counts[:, j, k]
        table.to_csv(run_dir / "per_image.csv", index=False)


def make_study(out: Path, seeds: list[int], gain: dict[str, int], images: int = 40) -> pd.DataFrame:
    """none/scse/cbam runs of one unet; ``gain`` adds true positives per image to an arm's first class."""
    rng = np.random.default_rng(0)
    base = rng.integers(20, 60, size=(images, 3, 2))
    for seed in seeds:
        for attention in ("none", "scse", "cbam"):
            counts = base + rng.integers(0, 4, size=base.shape)
            counts[:, 0, 0] += gain.get(attention, 0) + seed
            miou = float(report.miou_from_counts(counts.sum(axis=0)))
            row = {
                "dataset": "toy", "arch": "unet", "encoder": "resnet18", "placement": "decoder",
                "attention": attention, "seed": seed, "status": "ok", "val_miou": miou, "test_miou": miou,
                "converged": True, "at_floor": False, "stop_reason": "plateau", "failure": "",
            }  # fmt: skip
            write_run(out, row, counts)
    return report.collect_results(out)


def test_one_seed_gets_the_image_interval_and_never_holds(tmp_path: Path) -> None:
    # one training seed says nothing about the next one, however clear its image interval
    results = make_study(tmp_path, [0], {"cbam": 25})
    diffs = report.comparisons(results, tmp_path)
    cbam = diffs[(diffs["attention"] == "cbam") & (diffs["baseline"] == "none")].iloc[0]
    assert cbam["n_pairs"] == 1 and np.isnan(cbam["ci_low"])
    assert cbam["boot_seeds"] == 1 and cbam["boot_images"] == 40
    assert cbam["boot_low"] > 0 and cbam["boot_p_holm"] < 0.05 and not cbam["holds"]
    # no resample reached zero: the adjusted p is a bound, and printed as one
    assert cbam["boot_p_floor"] and cbam["boot_p_bound"]
    scse = diffs[(diffs["attention"] == "scse") & (diffs["baseline"] == "none")].iloc[0]
    assert scse["boot_low"] < 0 < scse["boot_high"] and not scse["holds"]
    assert not scse["boot_p_floor"] and not scse["boot_p_bound"]
    text = report.write_report(tmp_path)
    assert f"| ≤{cbam['boot_p_holm']:.3f} |" in text and f"| {scse['boot_p_holm']:.3f} |" in text
    low, high = 100 * cbam["boot_low"], 100 * cbam["boot_high"]
    cell = f"+{100 * cbam['mean_diff']:.2f} (1 seed, images [+{low:.2f}, +{high:.2f}])"
    assert cell in text and f"**{cell}**" not in text
    assert "One seed: there is no seed-to-seed interval" in text and "no one-seed difference is marked" in text
    assert "No difference in these tables holds." in text
    assert "Two seeds" not in text and "beyond" not in text


def test_two_seeds_never_bold(tmp_path: Path) -> None:
    results = make_study(tmp_path, [0, 1], {"cbam": 30, "scse": 15})
    diffs = report.comparisons(results, tmp_path)
    assert (diffs["n_pairs"] == 2).all()
    strong = diffs[(diffs["attention"] == "cbam") & (diffs["baseline"] == "none")].iloc[0]
    assert strong["boot_low"] > 0 and strong["ci_low"] > 0  # consistent and large, yet two seeds
    assert not diffs["holds"].any()
    text = report.write_report(tmp_path)
    assert "**+" not in text and "**-" not in text and "**yes**" not in text
    assert "Two seeds cannot separate arms reliably" in text
    assert "beyond" not in text and "No difference in these tables holds." in text


def test_holm_family_is_each_tables_distinct_comparisons(tmp_path: Path) -> None:
    results = make_study(tmp_path, [0, 1, 2], {"cbam": 30, "scse": 2})
    other = results.assign(arch="unetplusplus", test_miou=results["test_miou"][::-1].to_numpy(), run_dir="")
    both = pd.concat([results, other], ignore_index=True)
    diffs = report.comparisons(both, tmp_path)
    for _arch, rows in diffs.groupby("arch"):
        distinct = (
            rows.drop_duplicates(subset=None)
            .assign(pair=[tuple(sorted(p)) for p in zip(rows["attention"], rows["baseline"])])
            .drop_duplicates("pair")
        )
        assert len(distinct) == 3  # cbam-none, scse-none, cbam-scse: none-vs-scse counted once
        expected = dict(zip(distinct["pair"], report.holm(distinct["p_value"].to_numpy())))
        for _, row in rows.iterrows():
            assert row["p_holm"] == pytest.approx(expected[tuple(sorted((row["attention"], row["baseline"])))])
    # the reverse orientation is the same comparison: mirrored difference, same adjusted p
    scse_none = diffs[(diffs["arch"] == "unet") & (diffs["attention"] == "scse") & (diffs["baseline"] == "none")].iloc[
        0
    ]
    none_scse = diffs[(diffs["arch"] == "unet") & (diffs["attention"] == "none") & (diffs["baseline"] == "scse")].iloc[
        0
    ]
    assert none_scse["mean_diff"] == pytest.approx(-scse_none["mean_diff"])
    assert none_scse["p_holm"] == scse_none["p_holm"] and none_scse["boot_p_holm"] == scse_none["boot_p_holm"]
    # the second arch has no per-image files: seed statistics only
    assert (diffs.loc[diffs["arch"] == "unetplusplus", "boot_seeds"] == 0).all()


def test_three_seeds_bold_needs_holm_and_image_bootstrap(tmp_path: Path) -> None:
    results = make_study(tmp_path, [0, 1, 2, 3, 4], {"cbam": 30})
    diffs = report.comparisons(results, tmp_path)
    cbam = diffs[(diffs["attention"] == "cbam") & (diffs["baseline"] == "none")].iloc[0]
    assert cbam["p_holm"] < 0.05 and cbam["boot_p_holm"] < 0.05 and cbam["holds"]
    summary = report.summarize(results, output_dir=tmp_path)
    row = summary[summary["attention"] == "cbam"].iloc[0]
    assert bool(row["diff_vs_none_holds"]) and row["diff_vs_none_p_holm"] == cbam["p_holm"]
    assert row["diff_vs_none_img_low"] == cbam["boot_low"]
    text = report.summary_markdown(results, diffs=diffs)
    assert "| `cbam` | 5 | 5/5 |" in text and "**+" in text and "**yes**" in text
    assert "Holm-adjusted across the comparisons of its table" in text
    # the same seed statistics without per-image results: bold rests on the seed test alone
    no_images = report.comparisons(results, None)
    assert no_images.loc[(no_images["attention"] == "cbam") & (no_images["baseline"] == "none"), "holds"].item()


def test_none_is_shared_by_every_placement(tmp_path: Path) -> None:
    results = make_study(tmp_path, [0, 1, 2], {"cbam": 10})
    encoder_cbam = results[results["attention"] == "cbam"].assign(
        placement="encoder", test_miou=lambda d: d["test_miou"] + 0.01
    )
    both = pd.concat([results, encoder_cbam], ignore_index=True)
    diffs = report.comparisons(both)
    row = diffs[
        (diffs["placement"] == "encoder") & (diffs["attention"] == "cbam") & (diffs["baseline"] == "none")
    ].iloc[0]
    assert row["n_pairs"] == 3
    decoder = diffs[
        (diffs["placement"] == "decoder") & (diffs["attention"] == "cbam") & (diffs["baseline"] == "none")
    ].iloc[0]
    assert row["mean_diff"] == pytest.approx(decoder["mean_diff"] + 0.01)
    # scse ran only in the decoder: the encoder table has no comparison against it
    assert not ((diffs["placement"] == "encoder") & (diffs["baseline"] == "scse")).any()


@pytest.mark.parametrize("attentions", [["none"], ["cbam"], ["cbam", "cbam_residual"]])
def test_nothing_to_compare_yet(tmp_path: Path, attentions: list[str]) -> None:
    """The report after a grid's first run, or of a grid without baselines: no comparisons, no error."""
    for attention in attentions:
        row = {"dataset": "toy", "arch": "unet", "encoder": "resnet18", "attention": attention, "seed": 0}
        write_run(tmp_path, {**row, "status": "ok", "val_miou": 0.5, "test_miou": 0.5}, None)
    results = report.collect_results(tmp_path)
    diffs = report.comparisons(results, tmp_path)
    assert diffs.empty and {"p_holm", "boot_low", "holds"} <= set(diffs.columns)
    text = report.write_report(tmp_path)
    assert f"| {'`' + attentions[0] + '`'} | 1 | 50.00 |" in text and "How to read" not in text
    assert (tmp_path / "plots" / "differences.png").exists()


def test_per_image_counts_must_match_the_runs_test_miou(tmp_path: Path) -> None:
    results = make_study(tmp_path, [0], {"cbam": 25})
    stale = results["attention"] == "cbam"
    results.loc[stale, "test_miou"] += 0.01  # counts of another checkpoint than the one evaluated
    with pytest.warns(
        report.ReportWarning, match=r"unet-cbam-s0/per_image.csv: the mIoU of its counts .* is not the run's test_miou"
    ):
        diffs = report.comparisons(results, tmp_path)
    assert (diffs.loc[(diffs["attention"] == "cbam") | (diffs["baseline"] == "cbam"), "boot_seeds"] == 0).all()
    assert (diffs.loc[(diffs["attention"] == "scse") & (diffs["baseline"] == "none"), "boot_seeds"] == 1).all()
    # a damaged file is named and skipped the same way
    results.loc[stale, "test_miou"] -= 0.01
    (tmp_path / "runs" / "unet-scse-s0" / "per_image.csv").write_text("image,tp_0\nframe_000,1\n")
    with pytest.warns(
        report.ReportWarning, match=r"unet-scse-s0/per_image.csv needs the columns image and tp_k, fp_k, fn_k"
    ):
        diffs = report.comparisons(results, tmp_path)
    with_scse = (diffs["attention"] == "scse") | (diffs["baseline"] == "scse")
    assert (diffs.loc[with_scse, "boot_seeds"] == 0).all() and (diffs.loc[~with_scse, "boot_seeds"] == 1).all()


def test_a_difference_from_an_unconverged_or_floor_run_never_holds(tmp_path: Path) -> None:
    results = make_study(tmp_path, [0, 1, 2], {"cbam": 25})

    def cbam_vs_none(d: pd.DataFrame) -> pd.Series:
        return d[(d["attention"] == "cbam") & (d["baseline"] == "none")].iloc[0]

    assert cbam_vs_none(report.comparisons(results, tmp_path))["holds"]  # holds while every run is clean
    for column, value in (("converged", False), ("at_floor", True)):
        flagged = results.copy()
        flagged.loc[(flagged["attention"] == "cbam") & (flagged["seed"] == 1), column] = value
        cbam = cbam_vs_none(report.comparisons(flagged, tmp_path))
        assert cbam["p_holm"] < 0.05 and cbam["boot_p_holm"] < 0.05 and not cbam["holds"], column
