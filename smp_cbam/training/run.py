"""One run of the grid: train to the stopping rule, evaluate the best checkpoint, write its files.

Files of a run (``OUT/runs/<name>/``)::

    history.csv      one row per epoch: losses, val metrics, the mean lr of the epoch's steps, seconds,
                     intra-op threads
    log.txt          what the run printed
    logs/            Lightning's loggers (CSV always, TensorBoard when installed, others by config)
    checkpoints/     best.ckpt (best val mIoU) and last.ckpt (resumes an interrupted run)
    fit.json         written when training has ended (a resumed run then only evaluates)
    per_image.csv    per test image: tp_k, fp_k, fn_k for every class k (contract C2)
    model/           the best model, smp's ``save_pretrained`` (``from_pretrained`` after ``import smp_cbam``)
    result.json      the run's row of results.csv, written last (ok or failed)
"""

from __future__ import annotations

import csv
import dataclasses
import importlib
import inspect
import io
import json
import math
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint
from pytorch_lightning.callbacks.early_stopping import EarlyStoppingReason
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter
from pytorch_lightning.loggers.logger import rank_zero_experiment
from pytorch_lightning.utilities import rank_zero_only

from ..report import atomic_write_csv, atomic_write_text
from .config import LOGGERS, Config, ConfigError, TrainConfig
from .data import DatasetError, SegmentationDataModule
from .module import SegmentationModule

FLOOR_MARGIN = 0.01  # a best val mIoU within 1 point of the trivial floor counts as stuck at it


@dataclass(frozen=True)
class RunSpec:
    arch: str
    attention: str
    seed: int
    placement: str = "decoder"

    @property
    def name(self) -> str:
        where = "" if self.placement == "decoder" else f"-{self.placement}"
        return f"{self.arch}-{self.attention}{where}-s{self.seed}"


def is_writer() -> bool:
    """Under DDP every process runs the grid loop; only global rank 0 prints and writes files."""
    return rank_zero_only.rank == 0


class Log:
    """Prints to stdout (unless ``quiet``) and appends to a run's log file (rank 0 only)."""

    def __init__(self, path: Path | None = None):
        self.path = path

    def __call__(self, message: str, quiet: bool = False) -> None:
        if not is_writer():
            return
        if not quiet:
            print(message, flush=True)
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(message + "\n")


class EpochHistory(pl.Callback):
    """Writes ``history.csv`` (one row per epoch) and keeps its rows in the checkpoints, so a
    resumed run continues the same file. ``lr`` is the mean learning rate of the epoch's optimizer
    steps: the rate the epoch trained with, also under per-step schedules. ``threads`` is the
    intra-op thread count the epoch trained on: it orders the sums, so a run resumed under another
    count shows where its numbers stop being those of one call."""

    def __init__(self, path: Path, on_epoch: Callable[[dict], None] | None = None):
        self.path = path
        self.on_epoch = on_epoch
        self.rows: list[dict] = []
        self._losses: list[float] = []
        self._lrs: list[float] = []
        self._started = 0.0
        self._threads = 0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._losses, self._lrs = [], []
        self._started = time.perf_counter()
        self._threads = torch.get_num_threads()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self._losses.append(float(loss))

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.state.fn != "fit" or trainer.sanity_checking or not self._losses:
            return
        metrics = trainer.callback_metrics
        row = {
            "epoch": trainer.current_epoch,
            "step": trainer.global_step,
            "train_loss": statistics.fmean(self._losses),
            "val_loss": float(metrics["val_loss"]),
            "val_miou": float(metrics["val_miou"]),
            "val_dice": float(metrics["val_dice"]),
            "lr": statistics.fmean(self._lrs),
            "seconds": time.perf_counter() - self._started,
            "threads": self._threads,
        }
        if "val_context_miou" in metrics:
            row["val_context_miou"] = float(metrics["val_context_miou"])
        self.rows = [r for r in self.rows if r["epoch"] < row["epoch"]] + [row]
        if trainer.is_global_zero:
            frame = pd.DataFrame(self.rows)
            # rows resumed from a checkpoint older than the column have none: blank, and the others
            # stay whole numbers rather than pandas' 1.0 for a column with gaps
            frame["threads"] = frame["threads"].astype("Int64")
            atomic_write_csv(frame, self.path)
            for logger in trainer.loggers:  # the loggers' files up to date with the checkpoint saved next
                logger.save()
        if self.on_epoch is not None:
            self.on_epoch(row)

    def state_dict(self) -> dict:
        return {"rows": self.rows}

    def load_state_dict(self, state_dict: dict) -> None:
        self.rows = list(state_dict["rows"])


def epoch_threads(rows: Sequence[dict], current: int) -> int | str:
    """The thread count a run's epochs trained on (``history.csv``'s ``threads``): one number when
    they all share it, else the counts in the order the epochs took them, e.g. ``"1,2"``. Rows
    written before the column existed are unknown, ``"?"``, where later rows have a count; a
    history with none (a run of an older version only evaluated again) gives ``current``."""
    counts: list[int | str] = []
    for row in rows:
        value = row.get("threads")
        count = "?" if value is None or (isinstance(value, float) and math.isnan(value)) else int(value)
        if not counts or counts[-1] != count:
            counts.append(count)
    known = [c for c in counts if c != "?"]
    if not known:
        return current
    if len(counts) == 1:
        return known[0]
    return ",".join(str(c) for c in counts)


def loss_gain(loss: float, best: float, loss_min_delta: float) -> bool:
    """Whether ``loss`` beats ``best`` by more than ``loss_min_delta``, in the loss's own units as
    EarlyStopping's ``min_delta``. Not a fraction of the best: replayed on the main job's
    histories, a step of 1% kept converged runs going to the budget (near the end of the cosine
    schedule their small loss still falls by about a percent an epoch, their metric flat)."""
    if not math.isfinite(loss):
        return False
    return not math.isfinite(best) or loss < best - loss_min_delta


def _plateau_waits(
    values: Sequence[float],
    patience: int,
    min_delta: float,
    floor: float,
    losses: Sequence[float] | None,
    loss_min_delta: float | None,
) -> list[int]:
    """:class:`PlateauStopping`'s patience count after each of ``values``, the rule never stopping:
    the callback itself, fed the history, so that a replayed history and a run follow one rule."""
    rule = PlateauStopping(
        "val_miou",
        floor=floor,
        patience=patience,
        min_delta=min_delta,
        loss_min_delta=loss_min_delta if losses is not None else None,
    )
    waits = []
    for i, value in enumerate(values):
        if losses is not None:
            rule.observe_loss(float(losses[i]))
        rule._evaluate_stopping_criteria(torch.tensor(float(value)))
        waits.append(rule.wait_count)
    return waits


def plateau_reached(
    values: Sequence[float],
    patience: int,
    min_delta: float,
    floor: float = -math.inf,
    losses: Sequence[float] | None = None,
    loss_min_delta: float | None = None,
    *,
    at_end: bool = False,
) -> bool:
    """Whether ``values`` (one per validation) reach a plateau by :class:`PlateauStopping`'s rule:
    ``patience`` values in a row above ``floor`` that do not beat the best so far by more than
    ``min_delta`` (EarlyStopping's rule, mode max, counted only once a value has left the floor)
    while, with ``losses`` and ``loss_min_delta``, the validation loss does not fall below its best
    by more than ``loss_min_delta`` either.

    ``at_end``: whether the history *ends* on such a plateau, its last ``patience`` values among
    them. What ``converged`` means for a run trained to its budget: one that reached a plateau
    half-way and then improved again until the budget was still learning when it ended."""
    waits = _plateau_waits(values, patience, min_delta, floor, losses, loss_min_delta)
    if at_end:
        return bool(waits) and waits[-1] >= patience
    return any(wait >= patience for wait in waits)


def run_converged(stop_reason: str, rows: Sequence[dict], train: TrainConfig, floor: float) -> bool:
    """``converged`` of a run with history ``rows`` (``val_miou`` and ``val_loss`` per validation):
    the rule stopped it, or it trained to its budget (``max_epochs``, ``max_steps``, ``fixed``) and
    its history ends on a plateau by the rule of ``train`` (:func:`plateau_reached` ``at_end``), so that more
    epochs would not have moved it. ``floor``: the value at or below which a run has not left the
    trivial solution."""
    if stop_reason == "plateau":
        return True
    return plateau_reached(
        [r["val_miou"] for r in rows],
        train.patience,
        train.min_delta,
        floor,
        losses=[r["val_loss"] for r in rows],
        loss_min_delta=train.loss_min_delta,
        at_end=True,
    )


def quiet_lightning_warnings() -> None:
    """Warnings the runner's user cannot act on: a deprecation that Lightning itself triggers
    with this torch, and the note on the checkpoint folder that a resumed run expects. Called in
    the grid's process and in each worker (spawned workers start with the default filters)."""
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")


class _RunCSVWriter(ExperimentWriter):
    """Lightning's CSV writer, except that it keeps the ``metrics.csv`` it finds and replaces the
    file atomically on every save. Lightning deletes the file when the writer starts and, whenever
    a new column appears, truncates and rewrites it in place, so an interruption at either moment
    lost the run's log."""

    def _check_log_dir_exists(self) -> None:
        path = Path(self.metrics_file_path)
        if path.is_file():  # the header, so that the columns of the rows already there are known
            self.metrics_keys = next(csv.reader(io.StringIO(path.read_text())), [])

    def save(self) -> None:
        if not self.metrics:
            return
        self._record_new_keys()
        path = Path(self.metrics_file_path)
        rows = list(csv.DictReader(io.StringIO(path.read_text()))) if path.is_file() else []
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=self.metrics_keys, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows + self.metrics)
        atomic_write_text(path, text.getvalue())
        self.metrics = []


class RunCSVLogger(CSVLogger):
    """Lightning's CSVLogger, except that a resumed run appends to its ``metrics.csv`` (Lightning's
    writer deletes the file it finds, and with it every epoch logged before the interruption:
    per-class IoU, per-step loss and learning rate) and that the file is replaced atomically, so a
    run killed while its log is written keeps the log of its earlier epochs."""

    @property
    @rank_zero_experiment
    def experiment(self) -> _RunCSVWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _RunCSVWriter(log_dir=self.log_dir)
        return self._experiment


class RunCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that keeps its best score when the run's folder was moved or renamed.

    Lightning restores the best score only when the checkpoint's stored ``dirpath`` equals the
    current one; otherwise the first validation after resuming replaces ``best.ckpt`` whatever its
    score, and the run could be tested on a worse epoch than its history's best. A run's
    checkpoints move with its folder, so the stored paths are re-rooted in the current folder."""

    @property
    def state_key(self) -> str:
        # Lightning files a callback's state under its class name: keep ModelCheckpoint's, so that
        # checkpoints written before this class existed (or by a plain ModelCheckpoint with the same
        # settings) restore their best score instead of silently starting without one.
        return super().state_key.replace(type(self).__qualname__, ModelCheckpoint.__qualname__, 1)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        stored = state_dict.get("dirpath")
        if stored and self.dirpath and stored != self.dirpath:  # Lightning's own test
            old, new = Path(stored), Path(self.dirpath)

            def moved(path: Any) -> Any:
                return str(new / Path(path).name) if path and Path(path).parent == old else path

            state_dict = {
                **state_dict,
                "dirpath": self.dirpath,
                "best_model_path": moved(state_dict.get("best_model_path")),
                "kth_best_model_path": moved(state_dict.get("kth_best_model_path")),
                "last_model_path": moved(state_dict.get("last_model_path")),
                "best_k_models": {moved(k): v for k, v in (state_dict.get("best_k_models") or {}).items()},
            }
        super().load_state_dict(state_dict)


class PlateauStopping(EarlyStopping):
    """Lightning's EarlyStopping (mode max) whose patience counts only validations above ``floor``
    that improve neither the metric nor, with ``loss_min_delta``, the validation loss.

    A run whose metric still sits at the trivial floor (every pixel the most frequent class) has
    not started learning; it has not converged either. Without this, a patience long enough for
    the arm that leaves the floor last would be the only fair setting, and it would be tuned on
    the arms. With it, every arm gets the same rule: patience starts once the run has left the
    floor, and a run that never leaves it ends at the budget, flagged ``at_floor``.

    The loss guards against the same mistake one step later. A run can sit on a saddle above the
    floor, its mIoU flat for many epochs while its validation loss keeps falling, and then leave
    it (CBAM without a residual path does this on the main job: about 0.33 mIoU for 4-16
    epochs, then 0.92). The metric alone called that a plateau and tested the saddle's model as
    converged, so whether an arm "won" depended on which side of the patience its escape fell. A
    validation whose loss falls below its best so far by more than ``loss_min_delta`` resets the
    patience like a gain of the metric.
    """

    def __init__(
        self,
        monitor: str,
        *,
        floor: float,
        patience: int,
        min_delta: float,
        loss_monitor: str = "val_loss",
        loss_min_delta: float | None = None,
    ) -> None:
        super().__init__(monitor, mode="max", patience=patience, min_delta=min_delta, check_finite=False)
        self.floor = floor
        self.loss_monitor = loss_monitor
        self.loss_min_delta = loss_min_delta
        self.best_loss = math.inf
        self._loss_fell = False

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "best_loss": self.best_loss}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.best_loss = float(state_dict.get("best_loss", math.inf))  # checkpoints written before it

    def _run_early_stopping_check(self, trainer: pl.Trainer) -> None:
        self._loss_fell = False
        loss = trainer.callback_metrics.get(self.loss_monitor)
        if loss is not None and not trainer.fast_dev_run:
            self.observe_loss(float(loss))
        super()._run_early_stopping_check(trainer)

    def observe_loss(self, loss: float) -> None:
        """Takes the validation's loss before its metric (``_evaluate_stopping_criteria``); without
        ``loss_min_delta`` the loss plays no part."""
        if self.loss_min_delta is None:
            return
        self._loss_fell = loss_gain(loss, self.best_loss, self.loss_min_delta)
        if self._loss_fell:
            self.best_loss = loss

    def _evaluate_stopping_criteria(self, current: torch.Tensor) -> tuple[bool, str | None]:
        loss_fell, self._loss_fell = self._loss_fell, False
        if float(current) <= self.floor:
            self.wait_count = 0
            return False, None
        gained = self.monitor_op(current - self.min_delta, self.best_score.to(current.device))
        if loss_fell and not gained:
            self.wait_count = 0
            return False, f"{self.loss_monitor} fell to {self.best_loss:.4f}: no plateau yet"
        return super()._evaluate_stopping_criteria(current)


def floor_miou(loader: Any, num_classes: int, ignore_index: int | None) -> float:
    """mIoU of predicting every pixel as the most frequent class of ``loader``'s masks (classes
    absent from the masks left out, as the module's mIoU does)."""
    counts = torch.zeros(num_classes, dtype=torch.int64)
    for batch in loader:
        mask = batch[1].flatten()
        if ignore_index is not None:
            mask = mask[mask != ignore_index]
        counts += torch.bincount(mask, minlength=num_classes)[:num_classes]
    if counts.sum() == 0:
        return math.nan
    return float(counts.max() / counts.sum() / (counts > 0).sum())


def make_loggers(config: Config, run_dir: Path, run: RunSpec) -> list:
    """CSV into the run's ``logs/`` always; TensorBoard there when installed (default); the
    loggers ``trainer.logger`` names otherwise."""
    loggers = [RunCSVLogger(run_dir, name="logs", version="")]
    names = config.trainer["logger"]
    if names is True:
        names = (
            ["tensorboard"]
            if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX")
            else []
        )
    elif names is False:
        names = []
    for name in names:
        if name == "csv":
            continue
        module_name, _, class_name = LOGGERS.get(name, name).rpartition(".")
        try:
            cls = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError) as err:
            raise ConfigError(f"trainer.logger: cannot import {name!r}: {err}") from err
        parameters = inspect.signature(cls).parameters
        kwargs: dict[str, Any] = {}
        if "save_dir" in parameters:
            kwargs["save_dir"] = str(run_dir)
        if "name" in parameters:
            kwargs["name"] = "logs" if "save_dir" in parameters else run.name
        if "version" in parameters and "save_dir" in parameters:
            kwargs["version"] = ""
        loggers.append(cls(**kwargs))
    return loggers


def module_kwargs(config: Config, run: RunSpec, datamodule: SegmentationDataModule) -> dict[str, Any]:
    """SegmentationModule's arguments for ``run``: the model and train sections under their own
    names, the run's arch/attention/placement/seed, the data module's resolved attributes."""
    kwargs = {
        "arch": run.arch,
        "attention": None if run.attention == "none" else run.attention,
        "init_seed": run.seed,
        "in_channels": datamodule.in_channels,
        "num_classes": datamodule.num_classes,
        "ignore_index": datamodule.ignore_index,
        "class_names": datamodule.class_names,
        **dataclasses.asdict(config.model),
        **config.train.module_kwargs(),
    }
    kwargs["placement"] = run.placement
    parameters = inspect.signature(SegmentationModule).parameters
    for key in [k for k in kwargs if k not in parameters]:  # a module from before these arguments
        if kwargs[key] not in (None, "decoder"):
            raise ConfigError(f"{key}={kwargs[key]!r} needs a SegmentationModule that takes {key}=")
        del kwargs[key]
    return kwargs


def make_datamodule(config: Config, seed: int) -> SegmentationDataModule:
    try:
        return SegmentationDataModule(**config.data, seed=seed)
    except DatasetError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(f"data: {err}") from err


def align_hparams(datamodule: SegmentationDataModule) -> None:
    """The data module's saved hyperparameters carry its resolved attributes (contract C4), so
    that Lightning's merge with the module's never conflicts; a no-op where it saves them itself."""
    keys = ("num_classes", "in_channels", "class_names", "ignore_index")
    resolved = {key: getattr(datamodule, key) for key in keys if key in datamodule.hparams_initial}
    resolved = {key: list(value) if isinstance(value, tuple) else value for key, value in resolved.items()}
    if any(datamodule.hparams_initial[key] != value for key, value in resolved.items()):
        datamodule.save_hyperparameters({**datamodule.hparams_initial, **resolved})


def count_params(model: torch.nn.Module, example: torch.Tensor) -> int:
    """Parameters of the modules that take part in the forward pass (the module helper's
    ``count_parameters``), or all parameters where this install lacks it."""
    try:
        from .module import count_parameters
    except ImportError:
        try:
            from .models import count_parameters
        except ImportError:
            return sum(p.numel() for p in model.parameters())
    return int(count_parameters(model, example))


def write_per_image(counts: np.ndarray, ids: Sequence[str], path: Path) -> None:
    """``per_image.csv`` (contract C2) from counts (n_images, 3, C) int64 and the image ids."""
    counts = np.asarray(counts, dtype=np.int64)
    if counts.ndim != 3 or counts.shape[1] != 3 or len(ids) != counts.shape[0]:
        raise ValueError(f"per-image counts of shape {counts.shape} do not match {len(ids)} image ids")
    columns = {"image": [str(i) for i in ids]}
    for k in range(counts.shape[2]):
        for j, kind in enumerate(("tp", "fp", "fn")):
            columns[f"{kind}_{k}"] = counts[:, j, k]
    atomic_write_csv(pd.DataFrame(columns), path)


def _test_ids(datamodule: SegmentationDataModule, n: int) -> list[str]:
    dataset = datamodule.test_dataloader().dataset
    ids = getattr(dataset, "ids", None)
    return [str(i) for i in ids] if ids is not None else [str(i) for i in range(n)]


def check_arms(config: Config, runs: Sequence[RunSpec], datamodule: SegmentationDataModule) -> None:
    """Builds each arm's module (model included) and the Trainer once, before anything is
    written: a value the types let through but smp, the module or Lightning refuse (an encoder
    depth an architecture does not take, decoder channels, an accelerator, a device count) is a
    ConfigError naming it now, not a failure of every run."""
    arms = {(run.arch, run.attention, run.placement): run for run in runs}
    for (arch, attention, placement), run in arms.items():
        # pretrained weights decide nothing here: not fetched (nor a hub failure taken for a config error)
        kwargs = {**module_kwargs(config, run, datamodule), "encoder_weights": None}
        try:
            SegmentationModule(**kwargs)
        except (ValueError, TypeError, KeyError, AssertionError) as err:
            where = f"arch {arch!r}, attention {attention!r}" + (
                f", placement {placement!r}" if placement != "decoder" else ""
            )
            raise ConfigError(f"the model of {where} cannot be built from this configuration: {err}") from err
    try:
        _trainer(config, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    except Exception as err:  # Lightning's MisconfigurationException among them
        raise ConfigError(f"trainer: {err} (trainer section: {config.trainer})") from err


def _trainer(config: Config, **kwargs: Any) -> pl.Trainer:
    trainer_kwargs = {k: v for k, v in config.trainer.items() if k != "logger"}
    return pl.Trainer(enable_model_summary=False, num_sanity_val_steps=0, **trainer_kwargs, **kwargs)


def _stop_reason(config: Config, trainer: pl.Trainer, early: EarlyStopping | None) -> str:
    if early is not None and early.stopping_reason == EarlyStoppingReason.PATIENCE_EXHAUSTED:
        return "plateau"
    if config.train.stop == "fixed":
        return "fixed"
    if config.train.max_steps is not None and trainer.global_step >= config.train.max_steps:
        return "max_steps"
    return "max_epochs"


def run_one(
    config: Config, run: RunSpec, run_dir: Path, log: Log, on_epoch: Callable[[dict], None] | None = None
) -> dict:
    """Trains one run (resuming from its last checkpoint), evaluates its best checkpoint and
    returns its results row."""
    ckpt_dir = run_dir / "checkpoints"
    last, fit_done = ckpt_dir / "last.ckpt", run_dir / "fit.json"
    progress_bar = sys.stdout.isatty()
    pl.seed_everything(run.seed, verbose=False)
    datamodule = make_datamodule(config, run.seed)
    datamodule.setup("fit")
    align_hparams(datamodule)
    kwargs = module_kwargs(config, run, datamodule)
    module = SegmentationModule(**kwargs)
    budget = config.train.max_epochs

    def epoch_line(row: dict) -> None:
        context = f"  val_context_mIoU {row['val_context_miou']:.4f}" if "val_context_miou" in row else ""
        log(
            f"  epoch {row['epoch'] + 1}/{budget}  train_loss {row['train_loss']:.4f}  val_loss {row['val_loss']:.4f}  "
            f"val_mIoU {row['val_miou']:.4f}{context}  lr {row['lr']:.2e}  {row['seconds']:.1f}s",
            quiet=progress_bar,
        )
        if on_epoch is not None:
            on_epoch(row)

    history = EpochHistory(run_dir / "history.csv", epoch_line)
    checkpoint = RunCheckpoint(
        dirpath=ckpt_dir, filename="best", monitor="val_miou", mode="max", save_last=True, enable_version_counter=False
    )
    early = None
    callbacks: list[pl.Callback] = [history, checkpoint, LearningRateMonitor()]
    floor = floor_miou(datamodule.val_dataloader(), datamodule.num_classes, datamodule.ignore_index)
    stuck = floor + FLOOR_MARGIN if math.isfinite(floor) else -math.inf
    if config.train.stop == "plateau":
        early = PlateauStopping(
            "val_miou",
            floor=stuck,
            patience=config.train.patience,
            min_delta=config.train.min_delta,
            loss_min_delta=config.train.loss_min_delta,
        )
        callbacks.append(early)
    if "log_every_n_steps" not in config.trainer:
        # an epoch shorter than Lightning's default interval (50 steps) logs no step and warns
        steps = len(datamodule.datasets["train"]) // datamodule.batch_size
        interval = {"log_every_n_steps": max(1, min(50, steps))}
    else:
        interval = {}
    trainer = _trainer(
        config,
        **interval,
        max_epochs=budget,
        max_steps=config.train.max_steps or -1,
        callbacks=callbacks,
        logger=make_loggers(config, run_dir, run),
        default_root_dir=run_dir,
        enable_progress_bar=progress_bar,
    )
    if fit_done.exists():  # killed after training, before result.json: evaluate only
        fit = json.loads(fit_done.read_text())
        history.rows = pd.read_csv(run_dir / "history.csv").to_dict("records")
        log("  training finished earlier; evaluating")
    else:
        resume = last if last.exists() else None
        if resume is not None:
            log(f"  resuming from {resume}")
        # checkpoints hold tensors, numbers, strings and containers only: the safe loader suffices
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume, weights_only=True)
        fit = {"stop_reason": _stop_reason(config, trainer, early), "steps": trainer.global_step}
        if is_writer():
            atomic_write_text(fit_done, json.dumps(fit))

    rows = list(history.rows)  # evaluating a checkpoint restores the callbacks' state of that epoch
    best = max(rows, key=lambda r: r["val_miou"])  # the first best, as ModelCheckpoint keeps
    stage = "test" if datamodule.has_test else "val"
    evaluate = trainer.test if stage == "test" else trainer.validate
    metrics = evaluate(
        module, datamodule=datamodule, ckpt_path=str(ckpt_dir / "best.ckpt"), verbose=False, weights_only=True
    )[0]
    counts = getattr(module, "per_image_counts", None)
    if stage == "test" and counts is not None and is_writer():
        write_per_image(counts, _test_ids(datamodule, len(counts)), run_dir / "per_image.csv")
    if is_writer():
        try:
            module.model.save_pretrained(str(run_dir / "model"))
        except Exception as err:  # the results stand without the export; say so
            log(f"  warning: exporting the best model with save_pretrained failed: {type(err).__name__}: {err}")

    untrained = _trainer(config, logger=False, enable_progress_bar=False)
    untrained_evaluate = untrained.test if stage == "test" else untrained.validate
    untrained_miou = untrained_evaluate(SegmentationModule(**kwargs), datamodule=datamodule, verbose=False)[0][
        f"{stage}_miou"
    ]
    example = next(iter(datamodule.val_dataloader()))[0][:1]
    threads = epoch_threads(rows, torch.get_num_threads())
    if isinstance(threads, str):
        log(
            f"  note: the epochs trained on {threads} threads in turn (resumed under another count; "
            "'?': not recorded); a call with one count would not give exactly these numbers"
        )
    converged = run_converged(fit["stop_reason"], rows, config.train, stuck)
    row = {
        "status": "ok",
        "precision": str(trainer.precision),
        "threads": threads,  # it orders the run's sums: part of what reproduces it
        "stop_reason": fit["stop_reason"],
        "converged": bool(converged),
        "epochs": len(rows),
        "steps": int(fit["steps"]),
        "best_epoch": int(best["epoch"]),
        "val_miou": float(best["val_miou"]),
        "test_miou": float(metrics["test_miou"]) if stage == "test" else math.nan,
        "test_context_miou": float(metrics["test_context_miou"]) if "test_context_miou" in metrics else math.nan,
        "floor_miou": floor,
        "at_floor": bool(best["val_miou"] <= stuck),
        "untrained_miou": float(untrained_miou),
        "params": count_params(module.model, example),
        "train_seconds": float(sum(r["seconds"] for r in rows)),
        "failure": "",
    }
    for name in module.class_names:
        row[f"iou_{name}"] = float(metrics[f"{stage}_iou_{name}"])
    return row
