import csv
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from unittest.mock import Mock

import cv2
import numpy as np
import pandas as pd
import pytest
import segmentation_models_pytorch as smp
import torch
import yaml
from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint
from pytorch_lightning.callbacks.early_stopping import EarlyStoppingReason
from pytorch_lightning.loggers import CSVLogger

import smp_cbam
from smp_cbam.cli import main
from smp_cbam.training import run as run_module
from smp_cbam.training.config import TrainConfig
from smp_cbam.training.run import (
    PlateauStopping,
    RunCheckpoint,
    RunCSVLogger,
    epoch_threads,
    floor_miou,
    plateau_reached,
    run_converged,
    write_per_image,
)
from smp_cbam.training.runner import RESULT_COLUMNS, ConfigError, compare, convergence_notes, load_config
from smp_cbam.training.synthetic import CLASS_NAMES

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "grid": {"archs": ["unet"], "attentions": ["none", "cbam"], "seeds": [0], "jobs": 1},
    "data": {
        "dataset": "synthetic",
        "batch_size": 8,
        "synthetic": {"size": 64, "n_train": 16, "n_val": 8, "n_test": 8},
    },
    "model": {"encoder_depth": 3, "decoder_channels": [32, 16, 16]},
    "train": {"stop": "plateau", "max_epochs": 3, "patience": 2, "max_steps": None, "lr": 0.002},
    # per-step lr and loss in logs/metrics.csv of these short runs; fp32 whatever the main job picks, so
    # that results compare exactly across runs, processes and thread counts
    "trainer": {"log_every_n_steps": 1, "precision": "32-true"},
    "costs": {"rounds": 3, "warmup": 1},
}
METRICS = ["val_miou", "test_miou", "best_epoch", "epochs", "steps"]


def tiny_config(output: Path, **sections) -> smp_cbam.training.runner.Config:
    merged = {**TINY, **{k: {**TINY.get(k, {}), **v} for k, v in sections.items()}}
    return load_config(overrides={**merged, "output": str(output)})


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("compare")
    compare(tiny_config(output))
    return output


def miou_from_counts(counts: pd.DataFrame, num_classes: int) -> float:
    ious = []
    for k in range(num_classes):
        tp, fp, fn = (counts[f"{kind}_{k}"].sum() for kind in ("tp", "fp", "fn"))
        if tp + fp + fn:
            ious.append(tp / (tp + fp + fn))
    return float(np.mean(ious))


@pytest.mark.slow
def test_compare_writes_results_per_contract(finished: Path) -> None:
    results = pd.read_csv(finished / "results.csv")
    assert list(results.columns[: len(RESULT_COLUMNS)]) == RESULT_COLUMNS and "latency_ms" not in results
    assert list(results["attention"]) == ["none", "cbam"] and set(results["status"]) == {"ok"}
    assert set(results["placement"]) == {"decoder"} and set(results["precision"]) == {"32-true"}
    assert (
        results[["val_miou", "test_miou", "untrained_miou", "floor_miou"]].apply(lambda c: c.between(0, 1)).all().all()
    )
    assert results["params"].iloc[1] > results["params"].iloc[0]
    datamodule = _datamodule(finished)
    val_masks = [batch[1] for batch in datamodule.val_dataloader()]
    # synthetic test batches are (image, mask, context): the context mIoU is recorded
    assert len(next(iter(datamodule.test_dataloader()))) == 3
    assert results["test_context_miou"].between(0, 1).all()
    for name in ["unet-none-s0", "unet-cbam-s0"]:
        run = finished / "runs" / name
        row = results[results["run_dir"] == f"runs/{name}"].iloc[0]
        history = pd.read_csv(run / "history.csv")
        assert list(history["epoch"]) == list(range(len(history))) and row["epochs"] == len(history)
        assert row["steps"] == history["step"].iloc[-1] == 2 * len(history)  # 16 images, batch 8
        best = history.loc[history["val_miou"].idxmax()]
        assert row["best_epoch"] == best["epoch"] and row["val_miou"] == pytest.approx(best["val_miou"])
        assert row["train_seconds"] == pytest.approx(history["seconds"].sum())
        assert set(history["threads"]) == {row["threads"]} == {torch.get_num_threads()}
        # the stopping rule: Lightning's EarlyStopping, and the same rule recomputed from the history
        plateau = plateau_reached(
            history["val_miou"],
            patience=2,
            min_delta=0.001,
            floor=row["floor_miou"] + 0.01,
            losses=history["val_loss"],
            loss_min_delta=0.01,
        )
        assert row["stop_reason"] == ("plateau" if plateau else "max_epochs") and row["converged"] == plateau
        assert len(history) == 3 or plateau
        # the trivial floor: the most frequent val class everywhere
        pixels = torch.cat([m.flatten() for m in val_masks])
        pixels = pixels[pixels != 255]  # padding, if any
        frequency = torch.bincount(pixels, minlength=4).double()
        assert row["floor_miou"] == pytest.approx((frequency.max() / frequency.sum() / (frequency > 0).sum()).item())
        assert row["at_floor"] == (row["val_miou"] <= row["floor_miou"] + 0.01)
        # the lr that trained the epoch: the first epoch's is about the base rate, the last one's not 0
        assert 0.9 * 0.002 <= history["lr"].iloc[0] <= 0.002 and history["lr"].iloc[-1] > 0
        # per-image counts reproduce the test mIoU
        per_image = pd.read_csv(run / "per_image.csv")
        assert list(per_image.columns[:4]) == ["image", "tp_0", "fp_0", "fn_0"] and len(per_image) == 8
        assert miou_from_counts(per_image, 4) == pytest.approx(row["test_miou"], abs=1e-6)
        # Lightning's loggers, the checkpoints and the exported model
        metrics = pd.read_csv(run / "logs" / "metrics.csv")
        assert {"lr-AdamW", "val_miou", "test_miou"} <= set(metrics.columns)
        assert metrics["lr-AdamW"].dropna().iloc[0] == pytest.approx(0.002)
        assert list((run / "logs").glob("events.out.tfevents.*"))
        assert (run / "checkpoints" / "best.ckpt").exists() and (run / "checkpoints" / "last.ckpt").exists()
        assert json.loads((run / "result.json").read_text())["status"] == "ok"
    costs = pd.read_csv(finished / "costs.csv")
    assert list(costs.columns) == ["arch", "encoder", "attention", "placement", "params", "latency_ms"]
    assert list(costs["attention"]) == ["none", "cbam"] and (costs["latency_ms"] > 0).all()
    assert list(costs["params"]) == list(results["params"])
    assert "`cbam`" in (finished / "summary.md").read_text()
    assert yaml.safe_load((finished / "config.yaml").read_text())["train"]["patience"] == 2


def _datamodule(output: Path):
    config = load_config(output / "config.yaml")
    datamodule = run_module.make_datamodule(config, 0)
    datamodule.setup("fit")
    return datamodule


@pytest.mark.slow
def test_the_best_model_is_exported_for_from_pretrained(finished: Path) -> None:
    run = finished / "runs" / "unet-cbam-s0"
    loaded = smp.from_pretrained(str(run / "model")).eval()
    checkpoint = torch.load(run / "checkpoints" / "best.ckpt", weights_only=True, map_location="cpu")
    state = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
    reference = type(loaded)(**{k: v for k, v in loaded.config.items() if not k.startswith("_")})
    # the Lightning checkpoint leaves out the parameters the forward pass never uses, and says which
    result = reference.load_state_dict(state, strict=False)
    left_out = {k.removeprefix("model.") for k in checkpoint["smp_cbam_unused_parameters"]}
    assert set(result.missing_keys) == left_out and not result.unexpected_keys
    assert "encoder.layer4.1.conv2.weight" in left_out  # depth 3: layer3 and layer4 never run
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), reference.eval()(x))
    assert any(type(m).__name__ == "CBAM" for m in loaded.modules())


@pytest.mark.slow
def test_same_seed_same_metrics_and_finished_runs_are_skipped(finished: Path, tmp_path: Path, capsys) -> None:
    again = compare(tiny_config(tmp_path))
    first = pd.read_csv(finished / "results.csv")
    pd.testing.assert_frame_equal(again[METRICS].astype(float), first[METRICS].astype(float), rtol=0, atol=1e-7)
    mtime = (tmp_path / "runs" / "unet-cbam-s0" / "result.json").stat().st_mtime
    capsys.readouterr()
    compare(tiny_config(tmp_path))
    assert (tmp_path / "runs" / "unet-cbam-s0" / "result.json").stat().st_mtime == mtime
    assert "unet-cbam-s0: finished earlier (ok), skipped" in capsys.readouterr().out


@pytest.mark.slow
def test_runs_in_parallel_give_the_results_of_one_at_a_time(finished: Path, tmp_path: Path) -> None:
    # two cores, two workers: one thread each for every epoch of every run, also for the run that
    # ends last, after the other worker is idle (a thread count that changed with the grid's
    # progress made that run's numbers depend on timing)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        results = compare(tiny_config(tmp_path, grid={"jobs": 2}))
    finally:
        torch.set_num_threads(before)
    first = pd.read_csv(finished / "results.csv")
    assert list(results["threads"]) == list(first["threads"]) == [1, 1]
    pd.testing.assert_frame_equal(results[METRICS].astype(float), first[METRICS].astype(float), rtol=0, atol=1e-7)
    assert (tmp_path / "summary.md").read_text().count("`cbam`") >= 1
    with pytest.raises(ConfigError, match="grid.jobs"):
        tiny_config(tmp_path / "other", grid={"jobs": 0})


@pytest.mark.slow
def test_a_run_killed_after_training_only_evaluates_again(finished: Path, tmp_path: Path, capsys) -> None:
    shutil.copytree(finished, tmp_path, dirs_exist_ok=True)
    (tmp_path / "runs" / "unet-cbam-s0" / "result.json").unlink()
    # as if its last epoch had trained on another thread count (resumed under another grid.jobs)
    history_path = tmp_path / "runs" / "unet-cbam-s0" / "history.csv"
    history = pd.read_csv(history_path)
    count = int(history["threads"].iloc[0])
    history.loc[history.index[-1], "threads"] = count + 1
    history.to_csv(history_path, index=False)
    capsys.readouterr()
    again = compare(tiny_config(tmp_path))
    out = capsys.readouterr().out
    assert "training finished earlier; evaluating" in out
    assert f"the epochs trained on {count},{count + 1} threads in turn" in out
    threads = json.loads((history_path.parent / "result.json").read_text())["threads"]
    assert threads == f"{count},{count + 1}"
    first = pd.read_csv(finished / "results.csv")
    pd.testing.assert_frame_equal(again[METRICS].astype(float), first[METRICS].astype(float), rtol=0, atol=1e-7)
    assert list(again["stop_reason"]) == list(first["stop_reason"])


def test_convergence_notes_name_the_runs() -> None:
    results = pd.DataFrame(
        {
            "status": ["ok", "ok", "failed"],
            "converged": [True, False, None],
            "at_floor": [False, True, None],
            "run_dir": ["runs/a-s0", "runs/b-s0", "runs/c-s0"],
        }
    )
    notes = convergence_notes(results)
    assert len(notes) == 2 and "1 of 2 runs did not converge" in notes[0] and "b-s0." in notes[1]
    assert "learning speed, not final accuracy" in notes[0]
    assert convergence_notes(results.iloc[:1]) == []


@pytest.mark.slow
def test_resume_after_kill_gives_the_results_of_an_uninterrupted_run(finished: Path, tmp_path: Path) -> None:
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({**TINY, "costs": {"enabled": False}}))
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
    assert list(out["stop_reason"]) == list(first["stop_reason"])
    assert list(pd.read_csv(history)["epoch"]) == list(range(int(first["epochs"].iloc[1])))
    # and Lightning's CSV log still has the validations from before the kill
    logged = pd.read_csv(history.parent / "logs" / "metrics.csv").dropna(subset=["val_miou"])
    assert set(logged["epoch"].astype(int)) == set(range(int(first["epochs"].iloc[1])))


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


@pytest.mark.slow
@pytest.mark.skipif(not Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").exists(), reason="reads Linux's /proc")
def test_workers_end_with_a_killed_grid(tmp_path: Path) -> None:
    # a worker left behind would go on training its run while a restarted grid trains it again
    config = tmp_path / "tiny.yaml"
    grid = {**TINY["grid"], "jobs": 2}
    train = {**TINY["train"], "max_epochs": 50, "patience": 50}
    trainer = {"precision": "32-true"}  # the runner's own log interval: 2 batches an epoch, no warning
    config.write_text(
        yaml.safe_dump({**TINY, "grid": grid, "train": train, "trainer": trainer, "costs": {"enabled": False}})
    )
    command = [sys.executable, "-m", "smp_cbam", "compare", "--config", str(config), "--output", str(tmp_path / "out")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    stderr = (tmp_path / "stderr.txt").open("w")
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr, cwd=ROOT, env=env)
    histories = [tmp_path / "out" / "runs" / f"unet-{a}-s0" / "history.csv" for a in ("none", "cbam")]
    deadline = time.monotonic() + 240
    while not all(h.exists() for h in histories):  # both workers are training
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)
    workers = _children(process.pid)
    assert len(workers) >= 2
    process.terminate()
    process.wait(timeout=30)
    deadline = time.monotonic() + 30
    while any(_alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [w for w in workers if _alive(w)]
    for w in left:  # never leave a failing test's workers behind
        os.kill(w, signal.SIGKILL)
    assert not left
    # an interrupted run is not a failed run: the same command resumes it
    assert not list((tmp_path / "out" / "runs").glob("*/result.json"))
    # the workers print no warning their user cannot act on
    stderr.close()
    printed = (tmp_path / "stderr.txt").read_text()
    assert "LeafSpec" not in printed and "log_every_n_steps" not in printed, printed


def test_a_worker_whose_grid_is_gone_takes_no_further_run() -> None:
    # the parent-death signal can land where Lightning ignores it; the check between runs catches it
    code = "import os; from smp_cbam.training import runner; runner._PARENT = {}; runner._orphaned_exit(); print('next run')"
    gone = subprocess.run([sys.executable, "-c", code.format(-1)], capture_output=True, text=True, cwd=ROOT)
    assert gone.returncode == 1 and "next run" not in gone.stdout
    here = subprocess.run([sys.executable, "-c", code.format("os.getppid()")], capture_output=True, text=True, cwd=ROOT)
    assert here.returncode == 0 and "next run" in here.stdout, here.stderr


class NaNAttention(torch.nn.Module):
    def __init__(self, in_channels: int):
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.nan


class Identity(torch.nn.Module):
    def __init__(self, in_channels: int):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


@pytest.mark.slow
def test_failed_runs_are_kept_until_retried(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(smp_cbam.registry, "_FACTORIES", dict(smp_cbam.registry._FACTORIES))
    smp_cbam.register_attention("nan_test", NaNAttention)
    grid = {"archs": ["unet"], "attentions": ["nan_test", "none"], "seeds": [0]}
    config = tiny_config(tmp_path, grid=grid, train={"max_epochs": 1}, costs={"enabled": False})
    results = compare(config)
    failed, ok = results.iloc[0], results.iloc[1]
    assert failed["status"] == "failed" and "non-finite training loss" in failed["failure"]
    assert ok["status"] == "ok" and ok["test_miou"] > 0
    capsys.readouterr()
    compare(config)  # the cause is still there: skipped, and the message says how to retry
    assert "unet-nan_test-s0: finished earlier (failed), skipped; rerun with --retry-failed" in capsys.readouterr().out
    smp_cbam.register_attention("nan_test", Identity, overwrite=True)  # the cause is fixed
    results = compare(config, retry_failed=True)
    assert list(results["status"]) == ["ok", "ok"]
    assert "failed earlier, running it again" in capsys.readouterr().out


@pytest.mark.slow
def test_fixed_budget_and_step_budget(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    grid = {"archs": ["unet"], "attentions": ["none"], "seeds": [0]}
    fixed = compare(
        tiny_config(tmp_path / "fixed", grid=grid, train={"stop": "fixed", "max_epochs": 2}, costs={"enabled": False})
    )
    assert fixed["stop_reason"].iloc[0] == "fixed" and fixed["epochs"].iloc[0] == 2 and fixed["steps"].iloc[0] == 4
    # two validations, patience 2: the first is a new best (or at the floor), so no plateau can end it
    assert not fixed["converged"].iloc[0]
    steps = compare(
        tiny_config(
            tmp_path / "steps",
            grid=grid,
            train={"max_epochs": 10, "max_steps": 3, "patience": 5},
            costs={"enabled": False},
        )
    )
    assert steps["stop_reason"].iloc[0] == "max_steps" and steps["steps"].iloc[0] == 3
    assert not steps["converged"].iloc[0]
    out = capsys.readouterr().out
    line = "unet-none-s0 not converged: its max_steps budget ended before its last 5 validations were a plateau"
    if steps["at_floor"].iloc[0]:  # a run stuck at the floor gets that line instead
        assert "unet-none-s0 stuck at the trivial floor" in out and line not in out
    else:
        assert line in out


def test_plateau_rule_is_lightnings_early_stopping() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        values = np.cumsum(rng.normal(0.01, 0.02, size=rng.integers(1, 15)))
        patience, min_delta = int(rng.integers(1, 4)), float(rng.choice([0.0, 0.005, 0.02]))
        early = EarlyStopping("m", mode="max", patience=patience, min_delta=min_delta, check_finite=False)
        stopped = any(early._evaluate_stopping_criteria(torch.tensor(v))[0] for v in values)
        assert plateau_reached(values, patience, min_delta) == stopped
        # with no floor in reach, the runner's callback is EarlyStopping itself
        plain = PlateauStopping("m", floor=-1.0, patience=patience, min_delta=min_delta)
        assert any(plain._evaluate_stopping_criteria(torch.tensor(v))[0] for v in values) == stopped


def test_a_run_records_every_thread_count_its_epochs_trained_on() -> None:
    assert epoch_threads([{"threads": 2}] * 3, current=1) == 2
    # resumed under another count: the counts in the order the epochs took them
    assert epoch_threads([{"threads": 1}, {"threads": 1}, {"threads": 2}], current=2) == "1,2"
    assert epoch_threads([{"threads": 2}, {"threads": 1}, {"threads": 2}], current=2) == "2,1,2"
    # rows of a history written before the column existed (read back by pandas: NaN) are unknown
    assert epoch_threads([{"threads": math.nan}, {"threads": 2.0}], current=2) == "?,2"
    assert epoch_threads([{}, {}, {"threads": 1}], current=1) == "?,1"
    # a history with no count at all: the run's present count, as before the column
    assert epoch_threads([{"threads": math.nan}, {}], current=4) == 4
    assert epoch_threads([], current=4) == 4


def test_the_history_records_the_threads_an_epoch_started_with(tmp_path: Path) -> None:
    history = run_module.EpochHistory(tmp_path / "history.csv")
    trainer = SimpleNamespace(
        state=SimpleNamespace(fn="fit"),
        sanity_checking=False,
        current_epoch=0,
        global_step=2,
        callback_metrics={"val_loss": 0.5, "val_miou": 0.25, "val_dice": 0.5},
        optimizers=[SimpleNamespace(param_groups=[{"lr": 0.1}])],
        is_global_zero=True,
        loggers=[],
    )
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        history.on_train_epoch_start(trainer, None)
        history.on_train_batch_start(trainer, None, None, 0)
        history.on_train_batch_end(trainer, None, torch.tensor(1.0), None, 0)
        torch.set_num_threads(1)  # changed before the epoch's validation ends: the epoch trained on 2
        history.on_validation_end(trainer, None)
    finally:
        torch.set_num_threads(before)
    assert history.rows[0]["threads"] == 2
    assert list(pd.read_csv(tmp_path / "history.csv")["threads"]) == [2]
    # resumed from a checkpoint whose rows predate the column: theirs blank, the new ones whole numbers
    old_row = {k: v for k, v in history.rows[0].items() if k != "threads"}
    history.load_state_dict({"rows": [old_row]})
    trainer.current_epoch = 1
    history.on_train_epoch_start(trainer, None)
    history.on_train_batch_start(trainer, None, None, 0)
    history.on_train_batch_end(trainer, None, torch.tensor(1.0), None, 0)
    history.on_validation_end(trainer, None)
    written = (tmp_path / "history.csv").read_text().splitlines()
    threads = written[0].split(",").index("threads")
    assert [line.split(",")[threads] for line in written[1:]] == ["", str(torch.get_num_threads())]
    assert epoch_threads(pd.read_csv(tmp_path / "history.csv").to_dict("records"), current=9) == (
        f"?,{torch.get_num_threads()}"
    )


def test_plateau_rule_waits_for_the_run_to_leave_the_floor() -> None:
    # at the floor (<= 0.3) for 6 validations, then learning, then flat: patience counts from 0.5 on
    values = [0.25, 0.125, 0.25, 0.25, 0.1875, 0.25, 0.5, 0.625, 0.625, 0.625, 0.625]
    early = PlateauStopping("m", floor=0.3, patience=3, min_delta=0.01)
    decisions = [early._evaluate_stopping_criteria(torch.tensor(v))[0] for v in values]
    assert decisions == [False] * 10 + [True]
    assert early.stopping_reason == EarlyStoppingReason.PATIENCE_EXHAUSTED
    assert plateau_reached(values, 3, 0.01, floor=0.3) and not plateau_reached(values[:10], 3, 0.01, floor=0.3)
    # EarlyStopping alone would have called the floor a plateau
    assert plateau_reached(values[:6], 3, 0.01)
    # a run that never leaves the floor never stops by the rule: it ends at the budget, flagged at_floor
    stuck = PlateauStopping("m", floor=0.3, patience=2, min_delta=0.0)
    assert not any(stuck._evaluate_stopping_criteria(torch.tensor(v))[0] for v in [0.25] * 20)
    assert not plateau_reached([0.25] * 20, 2, 0.0, floor=0.3)
    rng = np.random.default_rng(1)
    for _ in range(200):  # the history's rule and the callback agree, floor or not
        values = rng.uniform(0, 1, size=rng.integers(1, 15)).round(2)
        floor, patience = float(rng.uniform(0, 1)), int(rng.integers(1, 4))
        early = PlateauStopping("m", floor=floor, patience=patience, min_delta=0.005)
        stopped = any(early._evaluate_stopping_criteria(torch.tensor(v))[0] for v in values)
        assert plateau_reached(values, patience, 0.005, floor) == stopped


def test_a_fixed_budget_run_has_converged_only_if_its_history_ends_flat() -> None:
    # a plateau half-way (epochs 2-5), then a climb until the budget: the run was still learning
    climbing = [0.4, 0.5, 0.5, 0.5, 0.5, 0.5, 0.6, 0.7, 0.8]
    assert plateau_reached(climbing, 3, 0.01) and not plateau_reached(climbing, 3, 0.01, at_end=True)
    flat = [*climbing, 0.8, 0.8, 0.8]
    assert plateau_reached(flat, 3, 0.01, at_end=True) and not plateau_reached(flat[:-1], 3, 0.01, at_end=True)
    # a falling loss at the end keeps it learning; validations at the floor never count
    assert not plateau_reached(flat, 3, 0.01, losses=[1.0] * 11 + [0.9], loss_min_delta=0.01, at_end=True)
    assert plateau_reached(flat, 3, 0.01, losses=[1.0] * 11 + [0.995], loss_min_delta=0.01, at_end=True)
    assert not plateau_reached([0.25] * 20, 2, 0.0, floor=0.3, at_end=True)
    assert not plateau_reached([], 2, 0.0, at_end=True)
    # what results.csv records: the rule's stop, or a budget that ended on a plateau
    train = TrainConfig(lr=1e-3, weight_decay=0.0, scheduler="cosine", patience=3, min_delta=0.01, loss_min_delta=0.01)
    rows = [{"val_miou": v, "val_loss": 1.0} for v in climbing]
    assert not run_converged("fixed", rows, train, floor=0.0) and run_converged("plateau", rows, train, floor=0.0)
    flat_rows = [{"val_miou": v, "val_loss": 1.0} for v in flat]
    assert run_converged("fixed", flat_rows, train, floor=0.0) and run_converged("max_epochs", flat_rows, train, 0.0)
    assert not run_converged("fixed", flat_rows, train, floor=0.9)  # never left the floor
    rng = np.random.default_rng(2)
    for _ in range(300):  # the callback, fed the whole history without stopping, ends as the history's rule
        n = int(rng.integers(1, 15))
        values, losses = rng.uniform(0, 1, size=n).round(2), rng.uniform(0, 1, size=n).round(2)
        values[rng.uniform(size=n) < 0.1], losses[rng.uniform(size=n) < 0.1] = np.nan, np.nan  # both count as flat
        floor, patience = float(rng.uniform(0, 0.5)), int(rng.integers(1, 4))
        early = PlateauStopping("m", floor=floor, patience=patience, min_delta=0.005, loss_min_delta=0.05)
        _decisions(early, values, losses)
        at_end = plateau_reached(values, patience, 0.005, floor, losses=losses, loss_min_delta=0.05, at_end=True)
        assert at_end == (early.wait_count >= patience)
        assert not at_end or plateau_reached(values, patience, 0.005, floor, losses=losses, loss_min_delta=0.05)


# val mIoU and val loss of a plain-CBAM run of the main job (seed 0, bf16, one thread, on a Zen 4
# CPU), epochs 0-30: the floor (0.23) until epoch 7, a saddle at 0.33 whose loss keeps falling,
# then the climb; with 60 epochs it reached 0.92. The metric alone stopped it at epoch 18.
SADDLE_MIOU = [0.2326] * 8 + [0.3235, 0.3273, 0.3259, 0.3257, 0.3282, 0.3287, 0.3306, 0.3303, 0.3320, 0.3306,
                             0.3367, 0.3324, 0.3385, 0.3387, 0.3389, 0.3490, 0.3869, 0.4264, 0.4498, 0.5662,
                             0.5594, 0.6857, 0.5980]  # fmt: skip
SADDLE_LOSS = [1.1384, 0.7759, 0.7194, 0.7078, 0.7026, 0.7020, 0.6978, 0.6967, 0.6904, 0.6909, 0.6873, 0.6814,
               0.6767, 0.6744, 0.6710, 0.6684, 0.6637, 0.6686, 0.6653, 0.6596, 0.6581, 0.6537, 0.6535, 0.6380,
               0.6199, 0.5896, 0.5850, 0.5106, 0.4832, 0.3732, 0.4126]  # fmt: skip


def _decisions(early: PlateauStopping, values, losses) -> list[bool]:
    out = []
    for value, loss in zip(values, losses, strict=True):
        early.observe_loss(float(loss))
        out.append(early._evaluate_stopping_criteria(torch.tensor(value))[0])
    return out


def test_plateau_rule_does_not_stop_a_run_whose_loss_still_falls() -> None:
    floor = 0.2326 + 0.01
    # the metric alone: ten validations on the saddle without a 2-point gain end the run at epoch 18
    metric_only = PlateauStopping("m", floor=floor, patience=10, min_delta=0.02)
    assert _decisions(metric_only, SADDLE_MIOU, SADDLE_LOSS).index(True) == 18
    assert plateau_reached(SADDLE_MIOU[:19], 10, 0.02, floor)
    # with the loss: it fell by more than 0.01 below its best every few epochs, so the run goes on
    early = PlateauStopping("m", floor=floor, patience=10, min_delta=0.02, loss_min_delta=0.01)
    assert not any(_decisions(early, SADDLE_MIOU, SADDLE_LOSS))
    assert not plateau_reached(SADDLE_MIOU, 10, 0.02, floor, losses=SADDLE_LOSS, loss_min_delta=0.01)
    assert early.best_loss == pytest.approx(0.3732)
    # a loss that falls by less than the step counts as flat: both flat, the patience runs out
    flat = PlateauStopping("m", floor=0.0, patience=3, min_delta=0.01, loss_min_delta=0.01)
    assert _decisions(flat, [0.5] * 5, [1.0, 0.995, 0.991, 0.9905, 0.99]) == [False] * 3 + [True] * 2
    assert flat.stopping_reason == EarlyStoppingReason.PATIENCE_EXHAUSTED
    # a loss that rises while the metric gains does not hold the metric back
    gains = PlateauStopping("m", floor=0.0, patience=2, min_delta=0.0, loss_min_delta=0.01)
    assert _decisions(gains, [0.1, 0.2, 0.3, 0.3, 0.3], [1.0, 1.1, 1.2, 1.3, 1.4]) == [False] * 4 + [True]
    # the best loss is part of the callback's state, so a resumed run keeps it
    resumed = PlateauStopping("m", floor=floor, patience=10, min_delta=0.02, loss_min_delta=0.01)
    resumed.load_state_dict(early.state_dict())
    assert resumed.best_loss == early.best_loss and resumed.wait_count == early.wait_count
    old = {k: v for k, v in early.state_dict().items() if k != "best_loss"}  # a checkpoint from before
    resumed.load_state_dict(old)
    assert resumed.best_loss == math.inf


def test_plateau_callback_reads_the_loss_from_the_trainer() -> None:
    # what Lightning calls after each validation: the loss comes from callback_metrics
    def trainer(miou: float, loss: float | None) -> SimpleNamespace:
        metrics = {"val_miou": torch.tensor(miou)} | ({} if loss is None else {"val_loss": torch.tensor(loss)})
        return SimpleNamespace(
            callback_metrics=metrics,
            fast_dev_run=False,
            should_stop=False,
            current_epoch=0,
            strategy=SimpleNamespace(reduce_boolean_decision=lambda decision, all: decision),
        )

    early = PlateauStopping("val_miou", floor=0.0, patience=2, min_delta=0.01, loss_min_delta=0.01)
    steps = [trainer(0.5, 1.0), trainer(0.5, 0.9), trainer(0.5, 0.8), trainer(0.5, 0.8), trainer(0.5, 0.8)]
    stops = []
    for t in steps:
        early._run_early_stopping_check(t)
        stops.append(t.should_stop)
    assert stops == [False, False, False, False, True] and early.best_loss == pytest.approx(0.8)
    # fast_dev_run: Lightning's EarlyStopping does nothing, and neither does the loss
    quick = PlateauStopping("val_miou", floor=0.0, patience=1, min_delta=0.01, loss_min_delta=0.01)
    t = trainer(0.5, 1.0)
    t.fast_dev_run = True
    quick._run_early_stopping_check(t)
    assert quick.best_loss == math.inf and quick.wait_count == 0
    # a module that logs no val_loss: the metric alone decides
    alone = PlateauStopping("val_miou", floor=0.0, patience=1, min_delta=0.01, loss_min_delta=0.01)
    flags = []
    for t in (trainer(0.5, None), trainer(0.5, None)):
        alone._run_early_stopping_check(t)
        flags.append(t.should_stop)
    assert flags == [False, True]


def test_plateau_rule_with_the_loss_agrees_with_the_history() -> None:
    rng = np.random.default_rng(2)
    for _ in range(300):
        n = int(rng.integers(1, 20))
        values = rng.uniform(0, 1, size=n).round(2)
        losses = np.exp(np.cumsum(rng.normal(-0.01, 0.03, size=n)))
        floor, patience = float(rng.uniform(0, 0.5)), int(rng.integers(1, 5))
        loss_min_delta = [None, 0.0, 0.01, 0.05][int(rng.integers(0, 4))]
        early = PlateauStopping("m", floor=floor, patience=patience, min_delta=0.005, loss_min_delta=loss_min_delta)
        stopped = False
        for value, loss in zip(values, losses, strict=True):
            if loss_min_delta is not None:  # as the callback does: the loss only where it is configured
                early.observe_loss(float(loss))
            stopped = early._evaluate_stopping_criteria(torch.tensor(value))[0] or stopped
        expected = plateau_reached(values, patience, 0.005, floor, losses=losses, loss_min_delta=loss_min_delta)
        assert expected == stopped
        if loss_min_delta is None:  # without the loss: the metric's rule alone
            assert expected == plateau_reached(values, patience, 0.005, floor)


def test_a_moved_run_keeps_its_best_checkpoint_score(tmp_path: Path) -> None:
    # a run folder moved (renamed, copied off a cluster) and resumed: Lightning's ModelCheckpoint
    # drops the best score, so the next validation, however poor, would overwrite best.ckpt
    old, new = tmp_path / "old" / "checkpoints", tmp_path / "new" / "checkpoints"
    state = {
        "monitor": "val_miou", "best_model_score": torch.tensor(0.5), "current_score": torch.tensor(0.45),
        "dirpath": str(old), "best_model_path": str(old / "best.ckpt"), "last_model_path": str(old / "last.ckpt"),
        "best_k_models": {str(old / "best.ckpt"): torch.tensor(0.5)}, "kth_best_model_path": str(old / "best.ckpt"),
        "kth_value": torch.tensor(0.5),
    }  # fmt: skip

    def keeps_best(callback) -> bool:
        callback.load_state_dict(dict(state))
        trainer = SimpleNamespace(strategy=SimpleNamespace(reduce_boolean_decision=bool))
        return not callback.check_monitor_top_k(trainer, torch.tensor(0.4))  # 0.4 < 0.5: not a new best

    kwargs = {"filename": "best", "monitor": "val_miou", "mode": "max", "save_last": True}
    with pytest.warns(UserWarning, match="dirpath has changed"):
        assert not keeps_best(ModelCheckpoint(dirpath=new, **kwargs))  # what Lightning alone does
    moved = RunCheckpoint(dirpath=new, **kwargs)
    assert keeps_best(moved) and float(moved.best_model_score) == 0.5
    assert moved.best_model_path == str(new / "best.ckpt") and moved.last_model_path == str(new / "last.ckpt")
    assert list(moved.best_k_models) == [str(new / "best.ckpt")]
    same = RunCheckpoint(dirpath=old, **kwargs)  # not moved: Lightning's own restore, untouched
    assert keeps_best(same) and same.best_model_path == str(old / "best.ckpt")


def test_the_run_checkpoint_files_its_state_where_model_checkpoint_does() -> None:
    # a run resumed from a checkpoint written with Lightning's ModelCheckpoint (earlier versions of
    # the runner) found no state under a new key: it lost its best score and replaced best.ckpt
    kwargs = {"filename": "best", "monitor": "val_miou", "mode": "max", "save_last": True}
    assert RunCheckpoint(**kwargs).state_key == ModelCheckpoint(**kwargs).state_key
    assert RunCheckpoint(**kwargs).state_key.startswith("ModelCheckpoint{")


def test_a_resumed_run_keeps_the_metrics_it_logged_before(tmp_path: Path) -> None:
    # Lightning's CSVLogger deletes the metrics.csv it finds: a resumed run lost its first epochs
    def session(cls, rows: list[dict]) -> None:
        logger = cls(tmp_path / cls.__name__, name="logs", version="")
        for step, row in enumerate(rows, start=len(logged)):
            logger.log_metrics(row, step=step)
            logged.append(row)
        logger.save()

    for cls in (CSVLogger, RunCSVLogger):
        logged: list[dict] = []
        session(cls, [{"val_iou_car": 0.25}, {"val_iou_car": 0.5}])
        if cls is CSVLogger:
            with pytest.warns(UserWarning, match="will be deleted"):
                session(cls, [{"val_iou_car": 0.75, "lr": 0.001}])
        else:
            session(cls, [{"val_iou_car": 0.75, "lr": 0.001}])
        table = pd.read_csv(tmp_path / cls.__name__ / "logs" / "metrics.csv")
        if cls is CSVLogger:  # what Lightning alone keeps
            assert list(table["step"]) == [2]
        else:
            assert list(table["step"]) == [0, 1, 2] and list(table["val_iou_car"]) == [0.25, 0.5, 0.75]
            assert table["lr"].isna().tolist() == [True, True, False]


def test_a_run_interrupted_while_its_log_is_written_keeps_the_earlier_rows(tmp_path: Path, monkeypatch) -> None:
    # a new column makes Lightning's writer truncate metrics.csv and write it again: a kill (here
    # an error) in between lost every earlier epoch; the run's writer replaces the file whole
    def interrupted(cls) -> pd.DataFrame:
        logger = cls(tmp_path / cls.__name__, name="logs", version="")
        logger.log_metrics({"val_miou": 0.25}, step=0)
        logger.save()
        logger.log_metrics({"val_miou": 0.5, "train_loss": 1.0}, step=1)
        with monkeypatch.context() as patch:
            patch.setattr(csv.DictWriter, "writerows", Mock(side_effect=KeyboardInterrupt))
            with pytest.raises(KeyboardInterrupt):
                logger.save()
        return pd.read_csv(tmp_path / cls.__name__ / "logs" / "metrics.csv")

    assert interrupted(CSVLogger).empty  # Lightning's: the header only
    kept = interrupted(RunCSVLogger)
    assert list(kept["step"]) == [0] and list(kept["val_miou"]) == [0.25]


def test_floor_and_per_image_files(tmp_path: Path) -> None:
    masks = torch.tensor([[[0, 0], [1, 255]], [[0, 2], [0, 0]]])
    loader = [(torch.zeros(2, 3, 2, 2), masks)]
    # class 0: 5 of 7 valid pixels; classes 1, 2 present: floor = (5/7) / 3
    assert floor_miou(loader, 4, 255) == pytest.approx(5 / 7 / 3)
    counts = np.arange(2 * 3 * 2).reshape(2, 3, 2)
    write_per_image(counts, ["a", "b"], tmp_path / "per_image.csv")
    table = pd.read_csv(tmp_path / "per_image.csv")
    assert list(table.columns) == ["image", "tp_0", "fp_0", "fn_0", "tp_1", "fp_1", "fn_1"]
    assert list(table["image"]) == ["a", "b"] and table.loc[1, "fn_1"] == counts[1, 2, 1]
    with pytest.raises(ValueError, match="do not match 3 image ids"):
        write_per_image(counts, ["a", "b", "c"], tmp_path / "x.csv")


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


@pytest.mark.slow
def test_folder_dataset_runs_from_the_command_line(tmp_path: Path, capsys) -> None:
    _folder_dataset(tmp_path / "data")
    code = main(
        ["compare", "--dataset", "folder", "--data-root", str(tmp_path / "data"), "--classes", "2",
         "--archs", "unet", "--attentions", "none", "cbam", "--seeds", "0", "--jobs", "1", "--epochs", "1",
         "--batch-size", "4", "--output", str(tmp_path / "out")]
    )  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "| `cbam` |" in printed and str((tmp_path / "out").resolve()) in printed
    assert "epoch 1/1" in printed  # not a terminal: one line per epoch
    results = pd.read_csv(tmp_path / "out" / "results.csv")
    assert set(results["status"]) == {"ok"} and {"iou_background", "iou_foreground"} <= set(results)
    assert (results["epochs"] == 1).all() and (results["stop_reason"] == "max_epochs").all()


@pytest.mark.slow
def test_without_a_test_split_the_best_checkpoint_is_validated(tmp_path: Path) -> None:
    data = {"synthetic": {**TINY["data"]["synthetic"], "n_test": 0}}
    results = compare(
        tiny_config(tmp_path, data=data, train={"stop": "fixed", "max_epochs": 3}, costs={"enabled": False})
    )
    assert results["test_miou"].isna().all() and (results["epochs"] == 3).all()
    for _, row in results.iterrows():
        history = pd.read_csv(tmp_path / row["run_dir"] / "history.csv")
        assert list(history["epoch"]) == [0, 1, 2]
        assert row["val_miou"] == pytest.approx(history["val_miou"].max())
        assert row[f"iou_{CLASS_NAMES[1]}"] >= 0
        assert not (tmp_path / row["run_dir"] / "per_image.csv").exists()


@pytest.mark.slow
def test_bad_data_stops_before_anything_is_written_and_the_corrected_command_works(tmp_path: Path, capsys) -> None:
    _folder_dataset(tmp_path / "data")
    good = (tmp_path / "data" / "images" / "im3.jpg").read_bytes()
    (tmp_path / "data" / "images" / "im3.jpg").write_bytes(b"not an image")
    command = ["compare", "--dataset", "folder", "--data-root", str(tmp_path / "data"), "--classes", "2",
               "--archs", "unet", "--attentions", "none", "--seeds", "0", "--jobs", "1", "--epochs", "1", "--batch-size", "4",
               "--output", str(tmp_path / "out")]  # fmt: skip
    assert main(command) == 2
    assert "im3.jpg" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    (tmp_path / "data" / "images" / "im3.jpg").write_bytes(good)
    assert main(command) == 0


@pytest.mark.slow
def test_a_configuration_that_ran_nothing_may_be_replaced(tmp_path: Path) -> None:
    grid = {"archs": ["unet"], "attentions": ["none"], "seeds": [0]}
    config = tiny_config(tmp_path, grid=grid, train={"max_epochs": 1}, costs={"enabled": False})
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config.replace(train={"lr": 0.5}).to_dict()))
    compare(config)
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["train"]["lr"] == 0.002
    with pytest.raises(ConfigError, match=r"train.patience: 2 -> 4"):  # now it holds a run
        compare(config.replace(train={"patience": 4}))
    compare(config.replace(grid={"seeds": [0]}, data={"num_workers": 0}))  # grid and workers may change
    # config.yaml then names the runs of every invocation, in the order they were asked for
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    saved["grid"].update(seeds=[7, 0], attentions=["cbam"], jobs=3)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    compare(config)
    grid = yaml.safe_load((tmp_path / "config.yaml").read_text())["grid"]
    assert grid["seeds"] == [7, 0] and grid["attentions"] == ["cbam", "none"] and grid["jobs"] == 1


@pytest.mark.parametrize("flag", [[], ["--malloc-default"]], ids=["keep-heap", "malloc-default"])
def test_runs_keep_the_heap_unless_told_not_to(tmp_path: Path, monkeypatch, flag: list[str]) -> None:
    calls = []
    monkeypatch.setattr("smp_cbam.training.malloc.keep_heap", lambda: calls.append(1) or True)
    missing = str(tmp_path / "missing")
    code = main(["compare", "--dataset", "folder", "--data-root", missing, "--classes", "2", *flag])
    assert code == 2  # the missing folder stops the run after the allocator is set
    assert calls == ([] if flag else [1])


@pytest.mark.slow
def test_placement_is_a_grid_dimension(tmp_path: Path) -> None:
    grid = {"archs": ["unet"], "attentions": ["none", "cbam"], "seeds": [0], "placements": ["decoder", "encoder"]}
    results = compare(tiny_config(tmp_path, grid=grid, train={"stop": "fixed", "max_epochs": 1}))
    assert list(results["run_dir"]) == ["runs/unet-none-s0", "runs/unet-cbam-s0", "runs/unet-cbam-encoder-s0"]
    assert list(results["placement"]) == ["decoder", "decoder", "encoder"]
    assert list(pd.read_csv(tmp_path / "costs.csv")["placement"]) == ["decoder", "decoder", "encoder"]
    loaded = smp.from_pretrained(str(tmp_path / "runs" / "unet-cbam-encoder-s0" / "model"))
    assert math.isfinite(float(loaded.eval()(torch.randn(1, 3, 64, 64)).sum()))


def test_loggers_follow_trainer_logger(tmp_path: Path) -> None:
    from pytorch_lightning.loggers import TensorBoardLogger

    from smp_cbam.training.run import RunSpec, make_loggers

    run = RunSpec("unet", "cbam", 0)

    def kinds(value) -> list[type]:
        config = load_config(overrides={"trainer": {"logger": value}})
        return [type(logger) for logger in make_loggers(config, tmp_path, run)]

    # the CSV logger is always there: Lightning's, appending on resume (RunCSVLogger)
    assert kinds(None) == [RunCSVLogger, TensorBoardLogger]  # tensorboard is installed here
    assert kinds(False) == [RunCSVLogger]
    assert kinds(["csv", "tensorboard"]) == [RunCSVLogger, TensorBoardLogger]
    assert kinds("pytorch_lightning.loggers.TensorBoardLogger") == [RunCSVLogger, TensorBoardLogger]
    loggers = make_loggers(load_config(), tmp_path, run)
    assert Path(loggers[0].log_dir) == tmp_path / "logs" and Path(loggers[1].log_dir) == tmp_path / "logs"


def test_a_worker_sets_its_thread_count_once() -> None:
    from smp_cbam.training import runner

    before = torch.get_num_threads()
    try:
        runner._worker_init(2)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
