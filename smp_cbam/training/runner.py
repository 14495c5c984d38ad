"""The comparison runner: a grid of archs x attention types x seeds, each run on the same budget.

Paired design: for one seed, every run sees the same data order and augmentations (the data
module derives them from the seed and the epoch) and starts from the same encoder and decoder
weights (:func:`smp_cbam.training.module.build_model`). Each run keeps its best epoch on the validation
split and evaluates that checkpoint on the test split, when there is one.

Layout of the output directory::

    config.yaml            the resolved configuration (a resumed grid must match it)
    results.csv            one row per run, rewritten atomically after every run
    summary.md, plots/     written by :mod:`smp_cbam.report` after every run
    runs/<arch>-<attention>-s<seed>/
        history.csv        one row per epoch
        log.txt            what the run printed
        result.json        the run's row, written when it is finished (ok or failed)
        checkpoints/       best.ckpt and last.ckpt

Running the same command again skips finished runs and resumes an unfinished one from its last
epoch checkpoint. ``results.csv`` holds every finished run in the directory, so grids that share
the configuration (another seed, another arch, or a second process on another arch) add up.
"""

import copy
import json
import math
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pytorch_lightning as pl
import torch
import yaml
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.utilities import rank_zero_only

from ..report import atomic_write_csv, atomic_write_text, write_report
from .data import SegmentationDataModule
from .module import SegmentationModule

DEFAULT_CONFIG: dict[str, Any] = {
    "output": "runs/synthetic",
    "grid": {"archs": ["unet", "unetplusplus"], "attentions": ["none", "scse", "cbam"], "seeds": [0, 1]},
    "data": {"dataset": "synthetic", "batch_size": 16, "synthetic": {"n_train": 192}},
    "model": {"encoder": "resnet18", "encoder_depth": 3, "decoder_channels": [64, 32, 16], "encoder_weights": None},
    "train": {"epochs": 4, "lr": 2e-3, "weight_decay": 1e-4, "scheduler": "cosine"},
    "trainer": {"accelerator": "cpu", "devices": 1, "precision": "32-true"},
}
# Keys that may change between a run and its resumption: they do not change any single run.
_RESUMABLE_KEYS = ("output", "grid", "data.num_workers")
_RUNNER_TRAINER_KEYS = ("max_epochs", "callbacks", "logger", "default_root_dir")
# Keys added after some output directories were written, with the value those runs used.
_IMPLICIT_KEYS = {"model.encoder_depth": 5}


RESULT_COLUMNS = [
    "dataset", "arch", "encoder", "attention", "seed", "status", "epochs", "best_epoch", "val_miou",
    "test_miou", "untrained_miou", "params", "latency_ms", "train_seconds", "failure", "run_dir",
]  # fmt: skip


class ConfigError(ValueError):
    """A configuration key or value is wrong; the message names it."""


def merge_config(base: dict, override: dict, where: str = "") -> dict:
    """``base`` updated by ``override``; unknown keys in sections with a fixed schema raise."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        name = f"{where}{key}"
        if where == "" and key not in base:
            raise ConfigError(f"unknown config section {name!r}; valid: {', '.join(base)}")
        if where in ("grid.", "model.", "train.") and key not in base:
            raise ConfigError(f"unknown config key {name!r}; valid: {', '.join(sorted(base))}")
        if isinstance(base.get(key), dict) and isinstance(value, dict) and where == "":
            merged[key] = merge_config(base[key], value, f"{key}.")
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def load_config(path: str | Path | None = None, overrides: dict | None = None) -> dict:
    """The default configuration, updated by a YAML file and then by ``overrides``.

    A layer that switches to another dataset starts that dataset's data section afresh (the data
    module's own defaults), and ``output`` defaults to ``runs/<dataset>``.
    """
    layers = []
    if path is not None:
        path = Path(path)
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as err:
            raise ConfigError(f"cannot read config {path}: {err}") from err
        if not isinstance(loaded, dict):
            raise ConfigError(f"config {path} must be a mapping of sections, got {type(loaded).__name__}")
        layers.append(loaded)
    layers.append(overrides or {})
    config = DEFAULT_CONFIG
    for layer in layers:
        dataset = (layer.get("data") or {}).get("dataset", config["data"]["dataset"])
        if dataset != config["data"]["dataset"]:
            config = {**config, "data": {}, "output": f"runs/{dataset}"}
        config = merge_config(config, layer)
    _validate(config)
    return config


def _validate(config: dict) -> None:
    grid = config["grid"]
    for key in ("archs", "attentions", "seeds"):
        if not isinstance(grid[key], list) or not grid[key]:
            raise ConfigError(f"grid.{key} must be a non-empty list, got {grid[key]!r}")
    epochs = config["train"]["epochs"]
    if not isinstance(epochs, int) or epochs < 1:
        raise ConfigError(f"train.epochs must be an integer >= 1, got {epochs!r}")
    clash = [key for key in _RUNNER_TRAINER_KEYS if key in config["trainer"]]
    if clash:
        raise ConfigError(f"trainer.{clash[0]} is set by the runner; remove it from the config")


@dataclass(frozen=True)
class RunSpec:
    arch: str
    attention: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.arch}-{self.attention}-s{self.seed}"


def grid_runs(config: dict) -> list[RunSpec]:
    """Seed-major order, so that finished seeds give complete pairs early."""
    grid = config["grid"]
    return [
        RunSpec(arch, str(attention), int(seed))
        for seed in grid["seeds"]
        for arch in grid["archs"]
        for attention in grid["attentions"]
    ]


def _flatten(config: dict, prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in config.items():
        if isinstance(value, dict) and prefix == "":
            yield from _flatten(value, f"{key}.")
        else:
            yield f"{prefix}{key}", value


def _check_resumable(saved: dict, config: dict, output: Path) -> None:
    def run_defining(c: dict) -> dict:
        return {**_IMPLICIT_KEYS, **{k: v for k, v in _flatten(c) if not k.startswith(_RESUMABLE_KEYS)}}

    old, new = run_defining(saved), run_defining(config)
    changed = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)]
    if changed:
        raise ConfigError(
            f"{output} holds runs of another configuration ({'; '.join(changed)}); "
            "use another --output or remove that directory"
        )


class EpochHistory(pl.Callback):
    """Writes ``history.csv`` (one row per epoch) and keeps its rows in the checkpoints, so a
    resumed run continues the same file."""

    def __init__(self, path: Path, on_epoch: Callable[[dict], None] | None = None):
        self.path = path
        self.on_epoch = on_epoch
        self.rows: list[dict] = []
        self._losses: list[float] = []
        self._started = 0.0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._losses = []
        self._started = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._losses.append(float(outputs["loss"]))

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.state.fn != "fit" or trainer.sanity_checking:
            return
        metrics = trainer.callback_metrics
        row = {
            "epoch": trainer.current_epoch,
            "train_loss": statistics.fmean(self._losses),
            "val_loss": float(metrics["val_loss"]),
            "val_miou": float(metrics["val_miou"]),
            "val_dice": float(metrics["val_dice"]),
            "lr": trainer.optimizers[0].param_groups[0]["lr"],
            "seconds": time.perf_counter() - self._started,
        }
        self.rows = [r for r in self.rows if r["epoch"] < row["epoch"]] + [row]
        if trainer.is_global_zero:
            atomic_write_csv(pd.DataFrame(self.rows), self.path)
        if self.on_epoch is not None:
            self.on_epoch(row)

    def state_dict(self) -> dict:
        return {"rows": self.rows}

    def load_state_dict(self, state_dict: dict) -> None:
        self.rows = list(state_dict["rows"])


class Eta:
    """Time left in the grid, from the epoch times seen so far (per arch)."""

    def __init__(self, runs: list[RunSpec], epochs: int):
        self.remaining = {run: epochs for run in runs}
        self.seconds: dict[str, list[float]] = {}

    def epoch_done(self, run: RunSpec, seconds: float, epochs_left: int) -> None:
        self.seconds.setdefault(run.arch, []).append(seconds)
        self.remaining[run] = epochs_left

    def run_done(self, run: RunSpec) -> None:
        self.remaining[run] = 0

    def seconds_left(self) -> float | None:
        if not self.seconds:
            return None
        overall = statistics.median(s for v in self.seconds.values() for s in v)
        per_arch = {arch: statistics.median(v) for arch, v in self.seconds.items()}
        return sum(n * per_arch.get(run.arch, overall) for run, n in self.remaining.items())


def _format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def is_writer() -> bool:
    """Under DDP every rank runs the grid loop; only global rank 0 prints and writes files."""
    return rank_zero_only.rank == 0


class _Log:
    """Prints to stdout and appends to a run's log file (rank 0 only)."""

    def __init__(self, path: Path | None = None):
        self.path = path

    def __call__(self, message: str) -> None:
        if not is_writer():
            return
        print(message, flush=True)
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(message + "\n")


def measure_latency(model: torch.nn.Module, image_shape: tuple[int, ...], repeats: int = 10) -> float:
    """Median milliseconds of one forward pass on one image, in eval mode on the model's device."""
    device = next(model.parameters()).device
    x = torch.randn(1, *image_shape, device=device)
    model.eval()
    times = []
    with torch.inference_mode():
        for i in range(repeats + 2):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            model(x)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= 2:
                times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def _evaluate(
    trainer: pl.Trainer,
    stage: str,
    module: SegmentationModule,
    datamodule: SegmentationDataModule,
    ckpt_path: str | None = None,
) -> dict[str, float]:
    """The ``stage`` ("test" or "val") metrics of ``module`` (or of the checkpoint)."""
    evaluate = trainer.test if stage == "test" else trainer.validate
    return evaluate(module, datamodule=datamodule, ckpt_path=ckpt_path, verbose=False)[0]


def make_datamodule(config: dict, seed: int) -> SegmentationDataModule:
    try:
        return SegmentationDataModule(**config["data"], seed=seed)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"data: {err}") from err


def run_one(config: dict, run: RunSpec, run_dir: Path, eta: Eta, log: _Log) -> dict:
    """Trains one run (resuming from its last checkpoint) and returns its results row."""
    ckpt_dir = run_dir / "checkpoints"
    last = ckpt_dir / "last.ckpt"
    pl.seed_everything(run.seed, verbose=False)
    datamodule = make_datamodule(config, run.seed)
    datamodule.setup("fit")
    module_args = dict(
        arch=run.arch,
        encoder=config["model"]["encoder"],
        attention=None if run.attention == "none" else run.attention,
        in_channels=datamodule.in_channels,
        num_classes=datamodule.num_classes,
        ignore_index=datamodule.ignore_index,
        class_names=datamodule.class_names,
        decoder_channels=config["model"]["decoder_channels"],
        encoder_depth=config["model"]["encoder_depth"],
        encoder_weights=config["model"]["encoder_weights"],
        lr=config["train"]["lr"],
        weight_decay=config["train"]["weight_decay"],
        scheduler=config["train"]["scheduler"],
        init_seed=run.seed,
    )
    module = SegmentationModule(**module_args)
    epochs = config["train"]["epochs"]

    def on_epoch(row: dict) -> None:
        eta.epoch_done(run, row["seconds"], epochs - row["epoch"] - 1)
        log(
            f"  epoch {row['epoch'] + 1}/{epochs}  train_loss {row['train_loss']:.4f}  "
            f"val_loss {row['val_loss']:.4f}  val_mIoU {row['val_miou']:.4f}  "
            f"{row['seconds']:.1f}s  | grid time left ~{_format_seconds(eta.seconds_left())}"
        )

    history = EpochHistory(run_dir / "history.csv", on_epoch)
    checkpoint = ModelCheckpoint(
        dirpath=ckpt_dir,
        filename="best",
        monitor="val_miou",
        mode="max",
        save_last=True,
        enable_version_counter=False,
    )
    trainer = pl.Trainer(
        max_epochs=epochs,
        callbacks=[history, checkpoint],
        logger=False,
        default_root_dir=run_dir,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **config["trainer"],
    )
    resume = last if last.exists() else None
    if resume is not None:
        log(f"  resuming from {resume}")
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume)

    best = max(history.rows, key=lambda r: r["val_miou"])  # the first best, as ModelCheckpoint keeps
    stage = "test" if datamodule.has_test else "val"
    metrics = _evaluate(trainer, stage, module, datamodule, checkpoint.best_model_path)
    untrained = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, **config["trainer"])
    untrained_miou = _evaluate(untrained, stage, SegmentationModule(**module_args), datamodule)[f"{stage}_miou"]
    image_shape = next(iter(datamodule.val_dataloader()))[0].shape[1:]
    row = {
        "status": "ok",
        "best_epoch": best["epoch"],
        "val_miou": best["val_miou"],
        "test_miou": metrics["test_miou"] if stage == "test" else math.nan,
        "untrained_miou": untrained_miou,
        "params": sum(p.numel() for p in module.model.parameters()),
        "latency_ms": measure_latency(module.model, tuple(image_shape)),
        "failure": "",
    }
    for name in module.class_names:
        row[f"iou_{name}"] = metrics[f"{stage}_iou_{name}"]
    return row


def compare(config: dict) -> pd.DataFrame:
    """Runs (or resumes) the whole grid; returns the results table."""
    output = Path(config["output"])
    output.mkdir(parents=True, exist_ok=True)
    config_path = output / "config.yaml"
    if config_path.exists():
        _check_resumable(yaml.safe_load(config_path.read_text()), config, output)
    if is_writer():
        atomic_write_text(config_path, yaml.safe_dump(config, sort_keys=False))

    make_datamodule(config, seed=0).setup("fit")  # validates the data once, before any training
    runs = grid_runs(config)
    eta = Eta(runs, config["train"]["epochs"])
    log = _Log()
    for i, run in enumerate(runs, 1):
        run_dir = output / "runs" / run.name
        result_path = run_dir / "result.json"
        if result_path.exists():
            eta.run_done(run)
            status = json.loads(result_path.read_text())["status"]
            log(f"[run {i}/{len(runs)}] {run.name}: finished earlier ({status}), skipped")
            continue
        run_dir.mkdir(parents=True, exist_ok=True)
        log(f"[run {i}/{len(runs)}] {run.name}  (grid time left ~{_format_seconds(eta.seconds_left())})")
        try:
            row = run_one(config, run, run_dir, eta, _Log(run_dir / "log.txt"))
        except Exception as err:  # a failed run is recorded and the grid goes on
            row = {"status": "failed", "failure": f"{type(err).__name__}: {err}"}
            log(f"  run failed: {row['failure']}")
        ident = {
            "dataset": config["data"]["dataset"],
            "arch": run.arch,
            "encoder": config["model"]["encoder"],
            "attention": run.attention,
            "seed": run.seed,
        }
        row = {**ident, **row, "run_dir": str(run_dir.relative_to(output))}
        eta.run_done(run)
        if is_writer():
            atomic_write_text(result_path, json.dumps(row, indent=1))
            collect_results(output, config)
            write_report(output)
    results = collect_results(output, config)
    if is_writer():
        write_report(output)
    return results


def _with_history(row: dict, output: Path) -> dict:
    """``epochs`` and ``train_seconds`` of a run, from its ``history.csv``."""
    history = output / row["run_dir"] / "history.csv"
    if not history.exists():
        return row
    epochs = pd.read_csv(history)
    return {**row, "epochs": len(epochs), "train_seconds": float(epochs["seconds"].sum())}


def collect_results(output: Path, config: dict) -> pd.DataFrame:
    """Every finished run in ``output`` (also those of other grids or processes sharing it), in
    grid order, written to ``results.csv``."""
    rows = [_with_history(json.loads(p.read_text()), output) for p in (output / "runs").glob("*/result.json")]
    order = {run: i for i, run in enumerate(grid_runs(config))}
    rows.sort(key=lambda r: (order.get(RunSpec(r["arch"], r["attention"], r["seed"]), len(order)), r["run_dir"]))
    results = results_frame(rows)
    if is_writer():
        atomic_write_csv(results, output / "results.csv")
    return results


def results_frame(rows: list[dict]) -> pd.DataFrame:
    """The rows with every column of ``results.csv``, per-class IoU columns last."""
    per_class = list(dict.fromkeys(k for row in rows for k in row if k.startswith("iou_")))
    return pd.DataFrame(rows).reindex(columns=RESULT_COLUMNS + per_class)
