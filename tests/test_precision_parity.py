"""experiments/precision_parity.py: paired differences and epoch speed-ups of two precisions."""

import importlib.util
import json
from pathlib import Path

import pandas as pd
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "precision_parity.py"


def load_script():
    spec = importlib.util.spec_from_file_location("precision_parity", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_study(root: Path, precision: str, runs: dict[tuple[str, int], tuple[float, list[float]]]) -> Path:
    for (attention, seed), (miou, seconds) in runs.items():
        run = root / "runs" / f"unet-{attention}-s{seed}"
        run.mkdir(parents=True)
        epochs = len(seconds)
        history = pd.DataFrame({"epoch": range(epochs), "val_miou": [miou] * epochs, "seconds": seconds})
        history.to_csv(run / "history.csv", index=False)
        row = {
            "dataset": "synthetic", "arch": "unet", "encoder": "resnet18", "attention": attention,
            "placement": "decoder", "seed": seed, "status": "ok", "precision": precision,
            "stop_reason": "plateau", "converged": True, "epochs": epochs, "steps": 10 * epochs,
            "best_epoch": epochs - 1, "val_miou": miou, "test_miou": miou, "run_dir": f"runs/{run.name}",
        }  # fmt: skip
        (run / "result.json").write_text(json.dumps(row))
    return root


def test_paired_differences_and_speed_ups(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ref = fake_study(
        tmp_path / "fp32",
        "32-true",
        {("none", 0): (0.50, [2.0, 2.0, 9.0]), ("none", 1): (0.54, [2.0, 2.0]), ("cbam", 0): (0.80, [3.0] * 3)},
    )
    other = fake_study(
        tmp_path / "bf16",
        "bf16-mixed",
        {("none", 0): (0.51, [1.0, 1.0, 1.0]), ("none", 1): (0.52, [1.0, 1.0]), ("scse", 0): (0.9, [1.0])},
    )
    assert load_script().main([str(ref), str(other)]) == 0
    out = capsys.readouterr().out
    # none-s0: +1 point; the slow epoch (9 s) does not move the median (2 s): speed-up 2x
    assert "| unet-none-s0 | 50.00 | 51.00 | +1.00 | 3 | 3 | 2.00 | 1.00 | 2.00x |" in out
    assert "| unet-none-s1 | 54.00 | 52.00 | -2.00 |" in out
    # the arm: mean of +1 and -2 with its t-interval (sd 2.12, t_0.975,1 = 12.71: +-19.06), against
    # the reference seeds' sample std (50 vs 54: 2.83); two pairs are not read
    # (t = -0.33 on one degree of freedom: p 0.795, the only arm with pairs, so Holm leaves it)
    assert "| unet | none | 2 | -0.50 [-19.56, +18.56] | 0.795 | 2.83 | 0.71 | too few pairs (< 3) | 2.00x |" in out
    assert "left out (in one folder only): unet-cbam-decoder-0, unet-scse-decoder-0" in out
    assert "(32-true)" in out and "(bf16-mixed)" in out


def test_a_folder_without_results_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as stop:
        load_script().main([str(tmp_path / "empty"), str(tmp_path / "empty")])
    assert stop.value.code == 2
    assert f"{tmp_path / 'empty'}: no results.csv or runs/ here" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("shifts", "expected"),
    [
        # differences -0.2..+0.2 points, interval about +-0.5, inside the reference's spread (3.16)
        ([-0.2, 0.0, 0.2, 0.1, -0.1], "same within the seed noise"),
        # all about -2: the interval excludes zero, within the spread
        ([-2.1, -1.9, -2.0, -2.2, -1.8], "differs, by less than the seed spread"),
        # all about -5: excludes zero, beyond the spread
        ([-5.1, -4.9, -5.0, -5.2, -4.8], "differs"),
        # differences of +-4: the interval spans zero and reaches past the spread
        ([4.0, -4.0, 3.0, -3.0, 0.5], "not resolved"),
    ],
)
def test_the_reading_sets_the_interval_against_the_seed_spread(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], shifts: list[float], expected: str
) -> None:
    base = [0.50, 0.52, 0.54, 0.56, 0.58]  # sample std 3.16 points
    ref = fake_study(tmp_path / "fp32", "32-true", {("none", s): (m, [2.0]) for s, m in enumerate(base)})
    other = fake_study(
        tmp_path / "bf16",
        "bf16-mixed",
        {("none", s): (m + d / 100, [1.0]) for s, (m, d) in enumerate(zip(base, shifts, strict=True))},
    )
    assert load_script().main([str(ref), str(other)]) == 0
    out = capsys.readouterr().out
    arm = next(line for line in out.splitlines() if line.startswith("| unet | none |"))
    assert "| 3.16 | " in arm and f"| {expected} |" in arm, arm
    overall = next(line for line in out.splitlines() if line.startswith("all paired runs (5)"))
    assert f": {expected};" in overall, overall


def test_the_reference_spread_counts_its_unpaired_seeds(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # five fp32 seeds, three of them paired: the spread is the five seeds' (3.16), not the three's (2.0)
    base = [0.50, 0.52, 0.54, 0.56, 0.58]
    ref = fake_study(tmp_path / "fp32", "32-true", {("none", s): (m, [2.0]) for s, m in enumerate(base)})
    other = fake_study(tmp_path / "bf16", "bf16-mixed", {("none", s): (base[s], [1.0]) for s in (1, 2, 3)})
    assert load_script().main([str(ref), str(other)]) == 0
    out = capsys.readouterr().out
    assert "| unet | none | 3 | +0.00 | nan | 3.16 | 2.00 | " in out


def test_a_shift_in_one_arm_of_several_must_hold_after_holm(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # two arms, each shifted with p = 0.047 alone: over the two, Holm makes it 0.093 and neither
    # arm is read as differing, although each interval excludes zero
    base = [0.50, 0.52, 0.54, 0.56, 0.58]
    shifts = [-1.0, 0.0, -1.5, -0.3, -1.2]
    runs = {(a, s): (m, [2.0]) for a in ("none", "cbam") for s, m in enumerate(base)}
    ref = fake_study(tmp_path / "fp32", "32-true", runs)
    shifted = {(a, s): (m + shifts[s] / 100, [1.0]) for (a, s), (m, _) in runs.items()}
    other = fake_study(tmp_path / "bf16", "bf16-mixed", shifted)
    assert load_script().main([str(ref), str(other)]) == 0
    out = capsys.readouterr().out
    for arm in ("none", "cbam"):
        line = next(line for line in out.splitlines() if line.startswith(f"| unet | {arm} |"))
        assert "| -0.80 [-1.58, -0.02] | 0.093 |" in line, line
        assert "| not resolved (the interval excludes zero, but not after Holm over the arms: p 0.093) |" in line
    # pooled, the ten pairs are one test: p 0.001, and the interval lies within the spread
    overall = next(line for line in out.splitlines() if line.startswith("all paired runs (10)"))
    assert ": differs, by less than the seed spread;" in overall, overall
