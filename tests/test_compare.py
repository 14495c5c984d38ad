import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
import yaml

import smp_cbam
from smp_cbam.cli import main
from smp_cbam.training.runner import DEFAULT_CONFIG, ConfigError, compare, load_config
from smp_cbam.training.synthetic import CLASS_NAMES

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "grid": {"archs": ["unet"], "attentions": ["none", "cbam"], "seeds": [0]},
    "data": {"dataset": "synthetic", "batch_size": 8, "synthetic": {"size": 32, "n_train": 16, "n_val": 8, "n_test": 8}},
    "model": {"encoder_depth": 3, "decoder_channels": [32, 16, 16]},
    "train": {"epochs": 2},
}
METRICS = ["val_miou", "test_miou", "best_epoch", "epochs"]


def tiny_config(output: Path, **sections) -> dict:
    return load_config(overrides={**TINY, **sections, "output": str(output)})


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("compare")
    compare(tiny_config(output))
    return output


def test_compare_writes_results_summary_plots_and_run_files(finished: Path) -> None:
    results = pd.read_csv(finished / "results.csv")
    assert list(results["attention"]) == ["none", "cbam"]
    assert set(results["status"]) == {"ok"}
    for column in ["dataset", "arch", "encoder", "seed", "params", "latency_ms", "train_seconds", f"iou_{CLASS_NAMES[1]}"]:
        assert column in results
    assert (results["epochs"] == 2).all()
    assert results["params"].iloc[1] > results["params"].iloc[0]
    assert results[["val_miou", "test_miou", "untrained_miou"]].apply(lambda c: c.between(0, 1)).all().all()
    summary = (finished / "summary.md").read_text()
    assert "`cbam`" in summary and "Δ vs none" in summary and "untrained mIoU" in summary
    for plot in ["miou", "learning_curves", "per_class_iou"]:
        assert (finished / "plots" / f"{plot}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name in ["unet-none-s0", "unet-cbam-s0"]:
        run = finished / "runs" / name
        history = pd.read_csv(run / "history.csv")
        assert list(history["epoch"]) == [0, 1]
        assert (run / "checkpoints" / "best.ckpt").exists() and (run / "checkpoints" / "last.ckpt").exists()
        assert json.loads((run / "result.json").read_text())["status"] == "ok"
        best = history.loc[history["val_miou"].idxmax()]
        row = results[results["run_dir"] == f"runs/{name}"].iloc[0]
        assert row["best_epoch"] == best["epoch"] and row["val_miou"] == pytest.approx(best["val_miou"])
        assert row["train_seconds"] == pytest.approx(history["seconds"].sum())


def test_same_seed_same_metrics_and_finished_runs_are_skipped(finished: Path, tmp_path: Path) -> None:
    again = compare(tiny_config(tmp_path))
    first = pd.read_csv(finished / "results.csv")
    pd.testing.assert_frame_equal(again[METRICS].astype(float), first[METRICS].astype(float), rtol=0, atol=1e-7)
    mtime = (tmp_path / "runs" / "unet-cbam-s0" / "result.json").stat().st_mtime
    compare(tiny_config(tmp_path))
    assert (tmp_path / "runs" / "unet-cbam-s0" / "result.json").stat().st_mtime == mtime


def test_resume_after_kill_gives_the_results_of_an_uninterrupted_run(finished: Path, tmp_path: Path) -> None:
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({**TINY, "train": {"epochs": 2}}))
    command = [sys.executable, "-m", "smp_cbam", "compare", "--config", str(config), "--output", str(tmp_path / "out")]
    history = tmp_path / "out" / "runs" / "unet-cbam-s0" / "history.csv"
    last = history.parent / "checkpoints" / "last.ckpt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # as in this process (conftest): same arithmetic
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT, env=env)
    deadline = time.monotonic() + 240
    while not last.exists():  # written once epoch 0 of the second run is done
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (history.parent / "result.json").exists()

    resumed = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300, env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert "unet-none-s0: finished earlier" in resumed.stdout
    assert "resuming from" in resumed.stdout
    out = pd.read_csv(tmp_path / "out" / "results.csv")
    first = pd.read_csv(finished / "results.csv")
    pd.testing.assert_frame_equal(out[METRICS].astype(float), first[METRICS].astype(float), rtol=0, atol=1e-7)
    assert list(pd.read_csv(history)["epoch"]) == [0, 1]


class NaNAttention(torch.nn.Module):
    def __init__(self, in_channels: int):
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.nan


def test_non_finite_loss_marks_the_run_failed_and_the_grid_goes_on(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(smp_cbam.registry, "_FACTORIES", dict(smp_cbam.registry._FACTORIES))
    smp_cbam.register_attention("nan_test", NaNAttention)
    grid = {"archs": ["unet"], "attentions": ["nan_test", "none"], "seeds": [0]}
    results = compare(tiny_config(tmp_path, grid=grid))
    failed, ok = results.iloc[0], results.iloc[1]
    assert failed["status"] == "failed" and "non-finite training loss" in failed["failure"]
    assert ok["status"] == "ok" and ok["test_miou"] > 0
    assert "nan_test" in (tmp_path / "results.csv").read_text()


def _folder_dataset(root: Path, n: int = 12, size: int = 32) -> None:
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n):
        mask = np.zeros((size, size), np.uint8)
        mask[rng.integers(0, size // 2) :, : rng.integers(size // 2, size)] = 255
        image = (rng.random((size, size, 3)) * 60 + (mask[..., None] > 0) * 150).astype(np.uint8)
        cv2.imwrite(str(root / "images" / f"im{i}.jpg"), image)
        cv2.imwrite(str(root / "masks" / f"im{i}.png"), mask)


def test_folder_dataset_runs_from_the_command_line(tmp_path: Path, capsys) -> None:
    _folder_dataset(tmp_path / "data")
    code = main(
        ["compare", "--dataset", "folder", "--data-root", str(tmp_path / "data"), "--classes", "2",
         "--archs", "unet", "--attentions", "none", "cbam", "--seeds", "0", "--epochs", "1",
         "--batch-size", "4", "--output", str(tmp_path / "out")]
    )  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "| `cbam` |" in printed and str((tmp_path / "out").resolve()) in printed
    results = pd.read_csv(tmp_path / "out" / "results.csv")
    assert set(results["status"]) == {"ok"} and {"iou_background", "iou_foreground"} <= set(results)
    assert (results["epochs"] == 1).all()


def test_without_a_test_split_the_best_checkpoint_is_validated_and_history_kept(tmp_path: Path) -> None:
    data = {**TINY["data"], "synthetic": {**TINY["data"]["synthetic"], "n_test": 0}}
    results = compare(tiny_config(tmp_path, data=data, train={"epochs": 3}))
    assert results["test_miou"].isna().all() and (results["epochs"] == 3).all()
    for _, row in results.iterrows():
        history = pd.read_csv(tmp_path / row["run_dir"] / "history.csv")
        assert list(history["epoch"]) == [0, 1, 2]
        assert row["val_miou"] == pytest.approx(history["val_miou"].max())
        assert row[f"iou_{CLASS_NAMES[1]}"] >= 0


def test_bad_data_stops_before_training_naming_the_file(tmp_path: Path, capsys) -> None:
    _folder_dataset(tmp_path / "data")
    (tmp_path / "data" / "images" / "im3.jpg").write_bytes(b"not an image")
    code = main(["compare", "--dataset", "folder", "--data-root", str(tmp_path / "data"), "--classes", "2",
                 "--output", str(tmp_path / "out")])  # fmt: skip
    assert code == 2
    assert "im3.jpg" in capsys.readouterr().err
    assert not (tmp_path / "out" / "runs").exists()


@pytest.mark.parametrize("flag", [[], ["--malloc-default"]], ids=["keep-heap", "malloc-default"])
def test_runs_keep_the_heap_unless_told_not_to(tmp_path: Path, monkeypatch, flag: list[str]) -> None:
    calls = []
    monkeypatch.setattr("smp_cbam.training.malloc.keep_heap", lambda: calls.append(1) or True)
    missing = str(tmp_path / "missing")
    code = main(["train", "--dataset", "folder", "--data-root", missing, "--classes", "2", *flag])
    assert code == 2  # the missing folder stops the run after the allocator is set
    assert calls == ([] if flag else [1])


def test_unknown_config_key_is_named(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochz: 3\n")
    with pytest.raises(ConfigError, match="train.epochz"):
        load_config(path)
    with pytest.raises(ConfigError, match="trainer.max_epochs"):
        load_config(overrides={"trainer": {"max_epochs": 3}})


def test_resuming_with_another_configuration_is_refused(finished: Path) -> None:
    config = tiny_config(finished, train={"epochs": 3})
    with pytest.raises(ConfigError, match=r"train.epochs: 2 -> 3"):
        compare(config)


def test_committed_configs_load_and_the_default_is_the_synthetic_one() -> None:
    configs = sorted((ROOT / "experiments" / "configs").glob("*.yaml"))
    assert {p.stem for p in configs} >= {"synthetic", "camvid", "pets", "folder"}
    for path in configs:
        assert load_config(path)["data"]["dataset"] == path.stem
    assert load_config(ROOT / "experiments" / "configs" / "synthetic.yaml") == load_config()
    assert load_config()["data"] == DEFAULT_CONFIG["data"]
