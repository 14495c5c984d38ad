"""Tests of smp_cbam.report on a small hand-made results table."""

from __future__ import annotations

import json
import os
import re
import stat
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.image import imread
from scipy import stats

from smp_cbam import report

# t_{0.975, 2}: the 95% two-sided quantile of Student's t with 2 degrees of freedom (3 seeds)
T_975_DF2 = 4.302652729749462

# test mIoU per (arch, attention) for seeds 0, 1, 2; unet cbam - none = [0.01, 0.03, 0.02]
TEST_MIOU = {
    ("unet", "none"): [0.70, 0.72, 0.68],
    ("unet", "scse"): [0.70, 0.73, 0.70],
    ("unet", "cbam"): [0.71, 0.75, 0.70],
    ("unetplusplus", "none"): [0.60, 0.62, 0.64],
    ("unetplusplus", "scse"): [0.61, 0.64, 0.66],
    ("unetplusplus", "cbam"): [0.62, 0.61, np.nan],  # seed 2 failed
}
PARAMS = {"none": 14_300_000, "scse": 14_400_000, "cbam": 14_500_000}
FAILURE = "CUDA out of memory while allocating 2.00 GiB"


def make_results() -> pd.DataFrame:
    rows = []
    for (arch, attention), values in TEST_MIOU.items():
        for seed, test in enumerate(values):
            failed = np.isnan(test)
            rows.append(
                {
                    "dataset": "toy",
                    "arch": arch,
                    "encoder": "resnet18",
                    "attention": attention,
                    "seed": seed,
                    "status": "failed" if failed else "ok",
                    "epochs": np.nan if failed else 10,
                    "best_epoch": np.nan if failed else 7,
                    "val_miou": np.nan if failed else test + 0.01,
                    "test_miou": test,
                    "params": np.nan if failed else PARAMS[attention],
                    "latency_ms": np.nan if failed else 10.0 + seed,
                    "train_seconds": np.nan if failed else 60.0,
                    "failure": FAILURE if failed else "",
                    "run_dir": f"runs/{arch}-{attention}-s{seed}",
                    "iou_background": test + 0.1,
                    "iou_road": test - 0.1,
                }
            )
    return pd.DataFrame(rows)


def row_of(df: pd.DataFrame, arch: str, attention: str) -> pd.Series:
    rows = df[(df["arch"] == arch) & (df["attention"] == attention)]
    assert len(rows) == 1
    return rows.iloc[0]


def test_paired_differences_match_hand_computation() -> None:
    diffs = np.array([0.01, 0.03, 0.02])
    row = row_of(report.paired_differences(make_results(), "none", "test_miou"), "unet", "cbam")
    half = T_975_DF2 * diffs.std(ddof=1) / np.sqrt(3)
    assert row["baseline"] == "none"
    assert row["n_pairs"] == 3
    assert row["mean_diff"] == pytest.approx(0.02)
    assert row["ci_low"] == pytest.approx(0.02 - half)
    assert row["ci_high"] == pytest.approx(0.02 + half)
    assert row["ci_low"] == pytest.approx(-0.0048414, abs=1e-6)
    cbam, none = np.array(TEST_MIOU["unet", "cbam"]), np.array(TEST_MIOU["unet", "none"])
    assert row["p_value"] == pytest.approx(stats.ttest_rel(cbam, none).pvalue)


def test_pairs_by_seed_not_by_row_order() -> None:
    results = make_results()
    shuffled = results.sample(frac=1.0, random_state=0)
    expected = report.paired_differences(results, "scse")
    pd.testing.assert_frame_equal(report.paired_differences(shuffled, "scse"), expected)
    row = row_of(expected, "unetplusplus", "none")
    assert row["mean_diff"] == pytest.approx(np.mean([-0.01, -0.02, -0.02]))


def test_failed_runs_are_excluded_from_pairs() -> None:
    results = make_results()
    # a run may fail after it was evaluated (e.g. while measuring latency): its metric must not count
    results.loc[results["status"] == "failed", "test_miou"] = 0.99
    row = row_of(report.paired_differences(results, "none"), "unetplusplus", "cbam")
    assert row["n_pairs"] == 2
    assert row["mean_diff"] == pytest.approx(np.mean([0.02, -0.01]))
    half = stats.t.ppf(0.975, 1) * np.std([0.02, -0.01], ddof=1) / np.sqrt(2)
    assert row["ci_high"] == pytest.approx(0.005 + half)


def _holding_results(seeds: int = 5) -> pd.DataFrame:
    """cbam 3 points above none on every seed: a difference that holds by every test."""
    rows = []
    for seed in range(seeds):
        for attention, value in (("none", 0.60), ("cbam", 0.63 + 0.001 * seed)):
            rows.append({"dataset": "toy", "arch": "unet", "encoder": "resnet18", "attention": attention,
                         "seed": seed, "status": "ok", "converged": True, "test_miou": value,
                         "val_miou": value})  # fmt: skip
    return pd.DataFrame(rows)


def test_a_failed_run_unconverged_record_or_validation_metric_never_holds() -> None:
    results = _holding_results()
    assert report.comparisons(results)["holds"].all()
    # two of five cbam runs failed: the three pairs left would hold, but the lost seeds may be its worst
    failed = results.copy()
    failed.loc[(failed["attention"] == "cbam") & (failed["seed"] >= 3), ["status", "test_miou"]] = ["failed", np.nan]
    row = report.comparisons(failed).iloc[0]
    assert row["n_pairs"] == 3 and row["p_holm"] < 0.05 and row["failed"] and not row["holds"]
    assert "§: a run of one of the two arms failed" in report.summary_markdown(failed)
    # a run without a record of convergence (a row of an older results.csv) is not taken as converged
    unknown = results.astype({"converged": object})
    unknown.loc[unknown.index[0], "converged"] = np.nan
    row = report.comparisons(unknown).iloc[0]
    assert row["not_converged"] and not row["holds"]
    # no test metric: validation mIoU chose the checkpoints, so it is never marked
    val_only = results.drop(columns="test_miou")
    row = report.comparisons(val_only).iloc[0]
    assert row["selection_metric"] and row["p_holm"] < 0.05 and not row["holds"]
    assert "The metric is validation mIoU, the one that chose each run's best epoch" in report.summary_markdown(
        val_only
    )


def test_a_table_without_a_convergence_record_never_holds() -> None:
    # results.csv of an older runner (or another tool) has no converged column at all: no record is
    # not a record of convergence
    results = _holding_results().drop(columns="converged")
    row = report.comparisons(results).iloc[0]
    assert row["p_holm"] < 0.05 and row["not_converged"] and not row["holds"]
    assert "did not converge (or has no record that it did)" in report.summary_markdown(results)


def test_identical_differences_give_no_p_value() -> None:
    results = _holding_results()
    results.loc[results["attention"] == "cbam", "test_miou"] = 0.63  # every seed exactly 3 points up
    row = report.comparisons(results).iloc[0]
    assert row["mean_diff"] == pytest.approx(0.03)
    assert np.isnan(row["p_value"]) and np.isnan(row["ci_low"]) and not row["holds"]
    # the same to within rounding: a huge t from float noise, not evidence
    results.loc[results["attention"] == "cbam", "test_miou"] = 0.63 + 1e-9 * np.arange(5)
    row = report.comparisons(results).iloc[0]
    assert np.isnan(row["p_value"]) and not row["holds"]


def test_missing_or_planned_seeds_make_a_difference_interim() -> None:
    results = _holding_results(seeds=5)
    assert report.comparisons(results, planned_seeds=range(5))["holds"].all()
    # cbam's seed 4 has no result yet (or was lost without a record): four pairs would hold
    lost = results.drop(results.index[(results["attention"] == "cbam") & (results["seed"] == 4)])
    row = report.comparisons(lost).iloc[0]
    assert row["n_pairs"] == 4 and row["p_holm"] < 0.05 and row["incomplete"] and not row["holds"]
    # the plan asks for seeds the study has not run yet, for every arm alike
    early = results[results["seed"] < 3]
    assert report.comparisons(early)["holds"].all()
    row = report.comparisons(early, planned_seeds=[0, 1, 2, 3, 4]).iloc[0]
    assert row["incomplete"] and not row["holds"]
    text = report.summary_markdown(early, config={"grid": {"seeds": [0, 1, 2, 3, 4]}})
    assert "**Interim**: the study plans 5 seeds per arm" in text and "have 3 of them" in text
    assert "¶: the pair lacks seeds" not in report.summary_markdown(results, config={"grid": {"seeds": [0, 1]}})
    assert "Interim" not in report.summary_markdown(results, config={"grid": {"seeds": [0, 1]}})


def test_while_one_arm_lacks_a_seed_no_pair_of_its_table_is_marked() -> None:
    # scse - none is complete, but cbam's seed 4 is still to come: the Interim line says nothing is
    # marked, and marking the complete pairs would invite stopping when one looks significant
    results = _holding_results(seeds=5)
    scse = results[results["attention"] == "cbam"].assign(attention="scse")
    three = pd.concat([results, scse], ignore_index=True)
    assert report.comparisons(three)["holds"].any()
    waiting = three.drop(three.index[(three["attention"] == "cbam") & (three["seed"] == 4)])
    diffs = report.comparisons(waiting, planned_seeds=range(5))
    scse_none = diffs[(diffs["attention"] == "scse") & (diffs["baseline"] == "none")].iloc[0]
    assert scse_none["n_pairs"] == 5 and scse_none["p_holm"] < 0.05 and scse_none["incomplete"]
    assert not diffs["holds"].any()
    text = report.summary_markdown(waiting, config={"grid": {"seeds": [0, 1, 2, 3, 4]}})
    assert "**Interim**" in text and "**yes**" not in text
    # a failed run of the same arm does not hide the seed still to come
    failed = waiting.copy()
    failed.loc[(failed["attention"] == "cbam") & (failed["seed"] == 3), ["status", "test_miou"]] = ["failed", np.nan]
    assert not report.comparisons(failed, planned_seeds=range(5))["holds"].any()
    # a seed lost to a failure is not to come: the pairs without the failed arm stand
    done = three.copy()
    done.loc[(done["attention"] == "cbam") & (done["seed"] == 3), ["status", "test_miou"]] = ["failed", np.nan]
    diffs = report.comparisons(done, planned_seeds=range(5))
    holds = dict(zip(zip(diffs["attention"], diffs["baseline"]), diffs["holds"]))
    assert holds[("scse", "none")] and not holds[("cbam", "none")]
    assert "Interim" not in report.summary_markdown(done, config={"grid": {"seeds": [0, 1, 2, 3, 4]}})


def test_write_report_reads_the_planned_seeds_from_config_yaml(tmp_path: Path) -> None:
    _holding_results(seeds=3).to_csv(tmp_path / "results.csv", index=False)
    (tmp_path / "config.yaml").write_text("grid:\n  seeds: [0, 1, 2, 3, 4]\n")
    text = report.write_report(tmp_path, plots=False)
    assert "**Interim**" in text and "¶" in text and "**yes**" not in text
    (tmp_path / "config.yaml").write_text("grid:\n  seeds: [0, 1, 2]\n")
    text = report.write_report(tmp_path, plots=False)
    assert "Interim" not in text and "**yes**" in text


def test_runs_without_a_seed_pair_with_nothing() -> None:
    results = _holding_results(seeds=3)
    results["seed"] = results["seed"].astype(float)
    extra = results.iloc[[0, 1]].assign(seed=np.nan, test_miou=[0.10, 0.90])
    row = report.comparisons(pd.concat([results, extra], ignore_index=True)).iloc[0]
    assert row["n_pairs"] == 3 and row["mean_diff"] == pytest.approx(0.031)


def test_arms_that_share_no_seed_say_so() -> None:
    results = _holding_results(seeds=4)
    apart = results[
        ((results["attention"] == "none") & (results["seed"] < 2))
        | ((results["attention"] == "cbam") & (results["seed"] >= 2))
    ]
    text = report.summary_markdown(apart)
    assert "No attention type shares a seed with a baseline" in text


def test_fewer_than_two_pairs_give_nan_ci_and_missing_baseline_gives_no_pairs() -> None:
    results = make_results()
    drop = (results["arch"] == "unetplusplus") & (results["attention"] == "none") & (results["seed"] > 0)
    diff = report.paired_differences(results[~drop], "none")
    one = row_of(diff, "unetplusplus", "cbam")
    assert one["n_pairs"] == 1
    assert one["mean_diff"] == pytest.approx(0.02)
    assert np.isnan(one["ci_low"]) and np.isnan(one["ci_high"]) and np.isnan(one["p_value"])
    assert "| `cbam` | 2 (1 failed) | 61.50 ± 0.71 | +2.00 (1 seed, no CI) † § ¶ |" in report.summary_markdown(
        results[~drop]
    )

    no_scse = results[results["attention"] != "scse"]
    diff = report.paired_differences(no_scse, "scse")
    assert (diff["n_pairs"] == 0).all() and diff["mean_diff"].isna().all()
    assert set(diff["attention"]) == {"none", "cbam"}
    assert "| `cbam` | 3 | 72.00 ± 2.65 | +2.00 [-0.48, +4.48] † | — | 14.50M |" in report.summary_markdown(no_scse)


def test_summarize_against_numpy() -> None:
    summary = report.summarize(make_results())
    assert summary.attrs["metric"] == "test_miou"
    assert list(summary["attention"][:3]) == ["none", "scse", "cbam"]
    for (arch, attention), values in TEST_MIOU.items():
        row = row_of(summary, arch, attention)
        ok = np.array([v for v in values if not np.isnan(v)])
        assert row["n_ok"] == len(ok) and row["n"] == len(ok)
        assert row["n_failed"] == len(values) - len(ok)
        assert row["mean"] == pytest.approx(ok.mean())
        assert row["std"] == pytest.approx(ok.std(ddof=1))
        assert row["val_miou_mean"] == pytest.approx(ok.mean() + 0.01)
        assert row["params"] == PARAMS[attention]
        assert "latency_ms" not in summary  # latency is a cost, in the cost table
    cbam = row_of(summary, "unet", "cbam")
    assert cbam["diff_vs_none"] == pytest.approx(0.02)
    assert cbam["diff_vs_scse"] == pytest.approx(np.mean([0.01, 0.02, 0.0]))
    assert cbam["diff_vs_none_n"] == 3
    assert np.isnan(row_of(summary, "unet", "none")["diff_vs_none"])
    assert row_of(summary, "unet", "none")["diff_vs_scse"] == pytest.approx(-0.01)


def test_summarize_single_run_has_nan_std() -> None:
    results = make_results()
    single = results[~((results["attention"] == "cbam") & (results["seed"] > 0))]
    row = row_of(report.summarize(single), "unet", "cbam")
    assert row["n"] == 1 and np.isnan(row["std"])


def test_markdown_contents() -> None:
    text = report.summary_markdown(make_results(), title="Toy comparison")
    assert text.startswith("# Toy comparison\n")
    assert "**test mIoU**" in text
    assert "## unet · encoder resnet18 · dataset toy" in text
    # unet cbam: mean 72.00, std 2.65; Δ vs none +2.00 with CI ±2.48; Δ vs scse +1.00
    assert "| `cbam` | 3 | 72.00 ± 2.65 | +2.00 [-0.48, +4.48] † | +1.00 [-1.48, +3.48] † | 14.50M |" in text
    assert "| `none` | 3 | 70.00 ± 2.00 | baseline |" in text
    # unet++ scse vs none: differences [0.01, 0.02, 0.02]: the raw CI excludes 0 (p = 0.038), but not
    # after Holm across the table's three comparisons (3 x 0.038 = 0.113): no bold
    assert "| `scse` | 3 | 63.67 ± 2.52 | +1.67 [+0.23, +3.10] † | baseline |" in text
    assert "| `scse` − `none` | 3 | 3 of 3 | +1.67 † | [+0.23, +3.10] | 0.038 | 0.113 | — | — | — | no |" in text
    assert "| `cbam` | 2 (1 failed) |" in text
    assert f"- unetplusplus / `cbam` / seed 2 (resnet18, toy): {FAILURE}" in text
    assert "No difference in these tables holds." in text and "beyond" not in text
    assert "**" not in text.split("### How to read")[0].split("\n", 3)[3]  # nothing bold in the tables
    # two tables (unet, unetplusplus), each its own Holm family: said, for a reader who looks across
    assert "Each of the 2 tables is adjusted on its own" in text
    assert "tables is adjusted" not in report.summary_markdown(make_results()[lambda d: d["arch"] == "unet"])
    # latency left the accuracy table for the cost table
    assert "## Cost" in text and "| unet | resnet18 | `cbam` | 14.50M | +1.4% | 11.0 | +0.0% |" in text


def test_markdown_shows_untrained_miou_when_recorded() -> None:
    assert "untrained" not in report.summary_markdown(make_results())
    results = make_results().assign(untrained_miou=lambda d: 0.05 + 0.01 * d["seed"])
    text = report.summary_markdown(results)
    # unet none: untrained mean of 0.05, 0.06, 0.07 = 6.00 percentage points
    assert "| `none` | 3 | 70.00 ± 2.00 | baseline | -1.00 [-3.48, +1.48] † | 6.00 | 14.30M |" in text
    assert "Untrained mIoU: the same metric" in text


def test_markdown_uses_val_miou_without_test_split() -> None:
    results = make_results().assign(test_miou=np.nan)
    text = report.summary_markdown(results)
    assert "**validation mIoU** (`val_miou`)" in text
    assert "| `cbam` | 3 | 73.00 ± 2.65 |" in text


def write_history(run_dir: Path, val: float, empty: bool = False) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "history.csv"
    if empty:
        path.write_text("")
        return
    epochs = np.arange(5)
    pd.DataFrame(
        {
            "epoch": epochs,
            "train_loss": 1.0 / (epochs + 1),
            "val_loss": 1.2 / (epochs + 1),
            "val_miou": val * (1 - 0.5 ** (epochs + 1)),
            "val_dice": val,
            "lr": 1e-3,
        }
    ).to_csv(path, index=False)


def test_write_report(tmp_path: Path) -> None:
    results = make_results()
    results.to_csv(tmp_path / "results.csv", index=False)
    for i, row in results.iterrows():
        if i == 0:
            continue  # a run without a history file
        write_history(tmp_path / row["run_dir"], row["val_miou"], empty=i == 1)
    tables_only = report.write_report(tmp_path, title="Toy", plots=False)  # what the runner writes after each run
    assert (tmp_path / "summary.md").is_file() and not (tmp_path / "plots").exists()
    text = report.write_report(tmp_path, title="Toy")
    assert (tmp_path / "summary.md").read_text() == text == tables_only
    assert "72.00 ± 2.65" in text and FAILURE in text
    summary = pd.read_csv(tmp_path / "summary.csv", keep_default_na=False, na_values=[""])
    assert len(summary) == 6
    for column in ("diff_vs_none_p_holm", "diff_vs_scse_p_holm", "diff_vs_none_img_low", "diff_vs_none_holds"):
        assert column in summary
    unetpp_scse = summary[(summary["arch"] == "unetplusplus") & (summary["attention"] == "scse")].iloc[0]
    assert unetpp_scse["diff_vs_none_p_holm"] == pytest.approx(0.113, abs=5e-4)  # 3 x p = 3 x 0.0377
    differences = pd.read_csv(tmp_path / "differences.csv")
    assert {"p_holm", "boot_low", "boot_high", "holds", "not_converged"} <= set(differences.columns)
    assert len(differences) == 8  # 2 archs x (scse, cbam vs none + none, cbam vs scse)
    for name in ("miou", "differences", "learning_curves", "per_class_iou"):
        png = tmp_path / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert 1_000 < png.stat().st_size < 200_000
        image = imread(png)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]


def test_plots_tolerate_no_successful_runs(tmp_path: Path) -> None:
    results = make_results().assign(status="failed")
    report.plot_miou(results, tmp_path / "miou.png")
    report.plot_learning_curves(tmp_path, results, tmp_path / "curves.png")
    report.plot_per_class_iou(results, tmp_path / "classes.png")
    for name in ("miou.png", "curves.png", "classes.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


def test_atomic_writes_replace_and_leave_no_temp_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "summary.md"
    path.write_text("old")
    report.atomic_write_text(path, "new ±")
    assert path.read_text(encoding="utf-8") == "new ±"
    csv = tmp_path / "results.csv"
    report.atomic_write_csv(pd.DataFrame({"a": [1, 2]}), csv)
    report.atomic_write_csv(pd.DataFrame({"b": [3]}), csv)
    assert csv.read_text() == "b\n3\n"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(csv.stat().st_mode) == 0o666 & ~umask  # not mkstemp's 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.csv", "summary.md"]

    def broken_replace(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        report.atomic_write_text(path, "partial")
    assert path.read_text(encoding="utf-8") == "new ±"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.csv", "summary.md"]


def test_primary_metric(tmp_path: Path) -> None:
    results = make_results()
    assert report.primary_metric(results) == "test_miou"
    no_test = results.assign(test_miou=np.nan)
    assert report.primary_metric(no_test) == "val_miou"
    only_failed_has_test = no_test.assign(test_miou=np.where(no_test["status"] == "failed", 0.5, np.nan))
    assert report.primary_metric(only_failed_has_test) == "val_miou"
    no_test.to_csv(tmp_path / "results.csv", index=False)
    read = report.read_results(tmp_path / "results.csv")
    assert report.primary_metric(read) == "val_miou"
    assert set(read["attention"]) == {"none", "scse", "cbam"}


def test_a_rerun_replaces_the_earlier_row() -> None:
    results = make_results()
    failed = (results["status"] == "failed").to_numpy()
    rerun = results[failed].assign(status="ok", test_miou=0.63, val_miou=0.64, failure="")
    summary = report.summarize(pd.concat([results, rerun], ignore_index=True))
    row = row_of(summary, "unetplusplus", "cbam")
    assert (row["n_ok"], row["n_failed"], row["diff_vs_none_n"]) == (3, 0, 3)
    assert row["mean"] == pytest.approx(np.mean([0.62, 0.61, 0.63]))


# ---------------------------------------------------------------- reading a results directory


def write_runs(out: Path, results: pd.DataFrame) -> None:
    """Each row as the runner leaves it: runs/<run>/result.json."""
    for _, row in results.iterrows():
        run_dir = out / row["run_dir"]
        run_dir.mkdir(parents=True, exist_ok=True)
        data = {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in row.items()}
        (run_dir / "result.json").write_text(json.dumps(data, default=lambda v: v.item()))


def test_collect_results_rebuilds_from_result_json_and_falls_back_to_csv(tmp_path: Path) -> None:
    results = make_results()
    write_runs(tmp_path, results)
    # a truncated results.csv (a crash mid-write by another tool) must not hide runs
    results.head(2).to_csv(tmp_path / "results.csv", index=False)
    collected = report.collect_results(tmp_path)
    assert len(collected) == len(results)
    assert report.summarize(collected)["n"].sum() == report.summarize(results)["n"].sum()
    # a damaged result.json: named, and its run comes from results.csv when that lists it
    damaged = tmp_path / results.loc[0, "run_dir"] / "result.json"
    damaged.write_text('{"dataset": "toy", "arch": "un')
    with pytest.warns(report.ReportWarning, match=re.escape(str(damaged))):
        collected = report.collect_results(tmp_path)
    assert len(collected) == len(results)
    # without results.csv the damaged run is left out, the others stay
    (tmp_path / "results.csv").unlink()
    with pytest.warns(report.ReportWarning, match="result.json is damaged"):
        assert len(report.collect_results(tmp_path)) == len(results) - 1


def test_history_fills_epochs_and_train_seconds(tmp_path: Path) -> None:
    results = make_results().drop(columns=["epochs", "train_seconds"]).head(1)
    write_runs(tmp_path, results)
    pd.DataFrame({"epoch": [0, 1, 2], "val_miou": [0.1, 0.2, 0.3], "seconds": [1.5, 2.0, 2.5]}).to_csv(
        tmp_path / results.loc[0, "run_dir"] / "history.csv", index=False
    )
    row = report.collect_results(tmp_path).iloc[0]
    assert row["epochs"] == 3 and row["train_seconds"] == pytest.approx(6.0)


def test_damaged_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="holds no results"):
        report.write_report(tmp_path)
    csv = tmp_path / "results.csv"
    csv.write_text("")
    with pytest.raises(report.ReportError, match=re.escape(f"{csv} is empty")):
        report.write_report(tmp_path)
    csv.write_text("a,b\n1,2\n")
    with pytest.raises(report.ReportError, match=re.escape(str(csv)) + ".*attention, seed, status"):
        report.write_report(tmp_path)
    # a bad results.csv beside valid result.json files: a warning, and the report from the runs
    write_runs(tmp_path, make_results())
    config = tmp_path / "config.yaml"
    config.write_text("")
    with pytest.warns(report.ReportWarning) as caught:
        text = report.write_report(tmp_path)
    messages = [str(w.message) for w in caught]
    assert any(str(csv) in m and "result.json files only" in m for m in messages)
    assert any(str(config) in m and "empty" in m for m in messages)
    assert "72.00 ± 2.65" in text
    config.write_text("train: [unclosed\n")
    with pytest.warns(report.ReportWarning, match=re.escape(str(config)) + " is damaged"):
        assert report.read_config(tmp_path) is None


def test_run_dir_outside_the_output_directory_is_ignored(tmp_path: Path) -> None:
    out = tmp_path / "study"
    results = make_results().assign(run_dir="../outside")
    out.mkdir()
    results.to_csv(out / "results.csv", index=False)
    write_history(tmp_path / "outside", 0.5)  # a file the results must not reach
    assert report.confined_run_dir(out, "runs/a", "x") == "runs/a"
    for bad in ("../outside", "../../etc", "/etc", "runs/../../outside", "."):
        with pytest.warns(report.ReportWarning, match=re.escape(repr(bad)) + " is outside"):
            assert report.confined_run_dir(out, bad, out / "results.csv") == ""
    with pytest.warns(report.ReportWarning, match="'../outside' is outside"):
        collected = report.collect_results(out)
    assert (collected["run_dir"] == "").all()
    curves_png = out / "plots" / "learning_curves.png"
    with pytest.warns(report.ReportWarning):
        report.plot_learning_curves(out, results, curves_png)
    curves = imread(curves_png)
    assert curves.shape[0] < 300  # the placeholder: the history outside was not read


def test_markdown_escapes_user_strings() -> None:
    results = make_results().rename(columns={"iou_road": "iou_road|<b>`x`"})
    failure = "ValueError: bad | value\n| injected | row |\n<img src=x onerror=alert(1)> `code`"
    results.loc[results["status"] == "failed", "failure"] = failure
    results.loc[results["attention"] == "cbam", "attention"] = "cb|am`<i>"
    text = report.summary_markdown(results)
    assert "<img" not in text and "<b>" not in text and "<i>" not in text
    assert "&lt;img src=x onerror=alert(1)&gt; \\`code\\`" in text
    assert "ValueError: bad \\| value \\| injected \\| row \\|" in text  # one line, no table injected
    assert "road\\|&lt;b&gt;\\`x\\`" in text
    assert "cb\\|am\\`&lt;i&gt;" in text and "`cb|am" not in text
    # every row of every table has as many cell separators as its header
    tables = re.findall(r"(?:^\|.*\n)+", text, flags=re.MULTILINE)
    assert len(tables) >= 4
    for table in tables:
        widths = {len(re.findall(r"(?<!\\)\|", line)) for line in table.splitlines()}
        assert len(widths) == 1, table
    assert report.escape_markdown("a\nb\t|c") == "a b \\|c"


def test_placeholders_never_replace_an_existing_plot(tmp_path: Path) -> None:
    results = make_results().head(2)
    committed = tmp_path / "plots" / "learning_curves.png"
    committed.parent.mkdir()
    committed.write_bytes(b"\x89PNG committed learning curves")
    with pytest.warns(report.ReportWarning, match="no training history found; the existing plot is kept"):
        report.plot_learning_curves(tmp_path, results, committed)
    assert committed.read_bytes() == b"\x89PNG committed learning curves"
    # where there is something to draw, the plot is redrawn
    for _, row in results.iterrows():
        write_history(tmp_path / row["run_dir"], row["val_miou"])
    report.plot_learning_curves(tmp_path, results, committed)
    assert committed.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a placeholder the report wrote itself is replaced without a word, by a plot or a new placeholder
    placeholder = tmp_path / "plots" / "differences.png"
    report.plot_differences(report.comparisons(results.iloc[:0]), placeholder)
    assert imread(placeholder).shape[0] < 300
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report.plot_differences(report.comparisons(results.iloc[:0]), placeholder)
        report.plot_differences(report.comparisons(make_results()), placeholder)
    assert imread(placeholder).shape[0] > 300


def test_learning_curves_mark_the_best_epoch() -> None:
    from smp_cbam.report.plots import _best_point

    history = pd.DataFrame({"epoch": [0, 1, 2, 3], "val_miou": [0.1, 0.4, 0.4, 0.3]})
    assert _best_point(history, 2) == (2.0, pytest.approx(40.0))
    assert _best_point(history, np.nan) == (1.0, pytest.approx(40.0))  # the first best
    assert _best_point(history, 9) == (1.0, pytest.approx(40.0))


def test_cost_table_prefers_costs_csv(tmp_path: Path) -> None:
    results = make_results()
    write_runs(tmp_path, results)
    pd.DataFrame(
        {
            "arch": ["unet"] * 3,
            "encoder": ["resnet18"] * 3,
            "attention": ["none", "scse", "cbam"],
            "placement": ["decoder"] * 3,
            "params": [1_000_000, 1_010_000, 1_020_000],
            "latency_ms": [4.0, 5.0, 6.0],
        }
    ).to_csv(tmp_path / "costs.csv", index=False)
    costs = report.cost_table(results, report.read_costs(tmp_path))
    assert list(costs["source"].unique()) == ["costs.csv"]
    assert costs["latency_ms_vs_none_%"].tolist() == pytest.approx([0.0, 25.0, 50.0])
    text = report.write_report(tmp_path)
    assert "one controlled pass" in text
    assert "| unet | resnet18 | decoder | `cbam` | 1.02M | +2.0% | 6.00 | +50.0% |" in text


def test_flags_for_runs_that_did_not_converge_or_stay_at_the_floor() -> None:
    results = make_results().assign(converged=True, at_floor=False, stop_reason="plateau", steps=120)
    slow = (results["arch"] == "unet") & (results["attention"] == "cbam") & (results["seed"] == 0)
    results.loc[slow, ["converged", "stop_reason"]] = [False, "max_epochs"]
    stuck = (results["arch"] == "unet") & (results["attention"] == "none") & (results["seed"] == 1)
    results.loc[stuck, "at_floor"] = True
    # as read back from results.csv: the flags are text
    results = results.astype({"converged": str, "at_floor": str})
    text = report.summary_markdown(results)
    assert "## Runs that did not converge" in text
    assert (
        "- unet / `cbam` / seed 0 (resnet18, toy): stopped by max_epochs, after 10 epochs, 120 steps, best epoch 7"
        in text
    )
    assert "measures learning speed, not final accuracy" in text
    assert "## Runs stuck at the trivial floor\n\n- unet / `none` / seed 1 (resnet18, toy)" in text
    assert "| `cbam` | 3 | 2/3 | 72.00 ± 2.65 | +2.00 [-0.48, +4.48] † ‡ |" in text
    assert "| `none` | 3 (1 at floor) | 3/3 |" in text
    summary = report.summarize(results)
    assert summary.loc[summary["attention"] == "cbam", "n_converged"].tolist() == [2, 2]  # unet: 2 of 3; unet++: 2 ok


def test_context_miou_precision_and_placement_are_shown() -> None:
    results = make_results().assign(
        placement="decoder", precision="bf16-mixed", test_context_miou=lambda d: d["test_miou"] - 0.1
    )
    text = report.summary_markdown(results)
    assert "## unet · encoder resnet18 · dataset toy · placement decoder" in text
    assert "Precision: bf16-mixed." in text
    assert "| attention | n | mIoU mean ± std | context mIoU | Δ vs none [95% CI] |" in text
    assert "| `cbam` | 3 | 72.00 ± 2.65 | 62.00 ± 2.65 |" in text


def test_summary_reports_epochs_and_training_time_per_arm() -> None:
    results = make_results()
    cbam = (results["arch"] == "unet") & (results["attention"] == "cbam")
    results.loc[cbam, "epochs"] = [12, 30, 20]
    results.loc[cbam, "best_epoch"] = [0, 18, 8]
    results.loc[cbam, "train_seconds"] = [600.0, 1800.0, 1200.0]
    text = report.summary_markdown(results)
    section = text.split("## Training", 1)[1].split("\n## ", 1)[0]
    rows = {
        line.split(" | ")[0] + " | " + line.split(" | ")[1]: line
        for line in section.splitlines()
        if line.startswith("| unet")
    }
    # median [min-max] of the epochs and best epochs; median minutes per run, the arm's total
    assert rows["| unet | `cbam`"] == "| unet | `cbam` | 3 | 20 [12-30] | 8 [0-18] | 20 | 60 |"
    assert rows["| unet | `none`"] == "| unet | `none` | 3 | 10 | 7 | 1 | 3 |"
    # the failed run of unetplusplus/cbam has no epochs: two runs, not three
    assert "| unetplusplus | `cbam` | 2 | 10 | 7 | 1 | 2 |" in section
    assert "All 17 runs: 1.2 hours of training." in section  # 14 minutes and cbam's hour
