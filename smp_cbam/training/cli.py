"""``smp-cbam train``: one model trained with Lightning's own command line (``LightningCLI``).

Every ``__init__`` argument of :class:`~smp_cbam.training.module.SegmentationModule`
(``--model.*``) and :class:`~smp_cbam.training.data.SegmentationDataModule` (``--data.*``), every
``Trainer`` argument (``--trainer.*``), the best-checkpoint callback (``--checkpoint.*``),
``--config`` YAML files and ``--print_config`` work as in any ``LightningCLI``. The command fits,
then tests the best checkpoint when the data has a test split (``--test false`` skips it).

The number of classes, input channels, class names and ignore index come from the data module
(linked on instantiation), so they are set once, under ``--data.*``.
"""

import inspect
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from jsonargparse import ArgumentError
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI

from . import malloc
from .data import DatasetError, SegmentationDataModule
from .module import SegmentationModule

PROG = "smp-cbam train"
# attributes that the data module resolves in __init__ (contract C4) and the module takes
DATA_TO_MODEL = ("num_classes", "in_channels", "class_names", "ignore_index")
TRAINER_DEFAULTS = {"max_epochs": 10}
CHECKPOINT_DEFAULTS = {"monitor": "val_miou", "mode": "max", "filename": "best", "save_last": True}


class TrainError(ValueError):
    """A configuration or data error of ``smp-cbam train``; the message names the key or file."""


class TrainCLI(LightningCLI):
    """``LightningCLI(SegmentationModule, SegmentationDataModule)`` plus a best-val-mIoU
    checkpoint and ``--malloc_default``. With ``run=False`` (``smp-cbam train``) also
    ``--ckpt_path`` (resume) and ``--test``, which :func:`run` uses; with subcommands (``fit``,
    ``test``, ...) each takes Lightning's own ``--ckpt_path``."""

    def setup_parser(self, add_subcommands: bool, main_kwargs: dict, subparser_kwargs: dict) -> None:
        self._subcommands = add_subcommands
        super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({f"checkpoint.{k}": v for k, v in CHECKPOINT_DEFAULTS.items()})
        if not self._subcommands:  # a subcommand's own ckpt_path would clash with this one
            parser.add_argument("--ckpt_path", type=str | None, default=None, help="checkpoint to resume fitting from")
            parser.add_argument("--test", type=bool, default=True, help="test the best checkpoint after fitting")
        parser.add_argument(
            "--malloc_default",
            type=bool,
            default=False,
            help="leave glibc malloc as it is (by default freed tensor memory stays in the heap)",
        )
        module_args = inspect.signature(SegmentationModule.__init__).parameters
        for key in DATA_TO_MODEL:
            if key in module_args:
                # class_names as a list, as the data module's hyperparameters keep it: Lightning logs
                # both and refuses values that differ, in type too
                compute = _as_list if key == "class_names" else None
                parser.link_arguments(f"data.{key}", f"model.{key}", compute_fn=compute, apply_on="instantiate")

    def before_instantiate_classes(self) -> None:
        # Lightning replaces configure_optimizers only when an optimizer is given: a scheduler alone
        # would be dropped without a word, and the module's own schedule would run
        if self._get(self.config, "lr_scheduler") is not None and self._get(self.config, "optimizer") is None:
            raise TrainError(
                "--lr_scheduler needs --optimizer: Lightning replaces the module's AdamW and schedule "
                "only when an optimizer is given"
            )
        if not self._get(self.config, "malloc_default"):
            malloc.keep_heap()

    def instantiate_classes(self) -> None:
        # a wrong value that the types let through (a scheduler, architecture or encoder name, a
        # class count) is found by the constructors: a configuration error, not a crash
        try:
            super().instantiate_classes()
        except (KeyError, TypeError, ValueError) as err:
            raise TrainError(_one_line(err)) from err


def _is_remote(path: str) -> bool:
    """A path Lightning reads through fsspec (``s3://``, ``https://``, ...) or its model registry."""
    return "://" in path or path.startswith("registry")


def _as_list(names: Sequence[str] | None) -> list[str] | None:
    return None if names is None else list(names)


def _one_line(err: BaseException) -> str:
    text = err.args[0] if isinstance(err, KeyError) and err.args else str(err)  # str() quotes a KeyError
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return " ".join(lines[:3]) if lines else type(err).__name__


def build_cli(argv: Sequence[str] | None) -> TrainCLI:
    """The parsed and instantiated command (model, data module and trainer); nothing is run."""
    with warnings.catch_warnings():
        # `smp-cbam train ARGS` hands ARGS on, so sys.argv also holds them: not the mistake warned of
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        return TrainCLI(
            SegmentationModule,
            SegmentationDataModule,
            args=list(argv or []),
            run=False,
            trainer_defaults=TRAINER_DEFAULTS,
            seed_everything_default=0,  # reproducible unless asked otherwise (--seed_everything true)
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"prog": PROG, "exit_on_error": False, "description": __doc__.split("\n\n")[0]},
        )


def train(argv: Sequence[str] | None = None) -> int:
    """``smp-cbam train ARGS``; raises :class:`TrainError` on configuration and data errors."""
    try:
        cli = build_cli(argv)
    except ArgumentError as err:
        raise TrainError(_one_line(err)) from err
    return run(cli)


def run(cli: TrainCLI) -> int:
    """Fits, then tests the best checkpoint when there is a test split and ``--test`` is true."""
    trainer, module, datamodule = cli.trainer, cli.model, cli.datamodule
    ckpt_path = cli.config.ckpt_path
    local = ckpt_path is not None and ckpt_path not in ("last", "best", "hpc") and not _is_remote(ckpt_path)
    if local and not Path(ckpt_path).is_file():
        raise TrainError(f"--ckpt_path {ckpt_path}: no such checkpoint file")
    try:
        # the data read and checked before fit: Lightning's loggers make their folders before its setup
        datamodule.setup("fit")
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    except DatasetError as err:
        raise TrainError(str(err)) from err
    if cli.config.test and getattr(datamodule, "has_test", True):
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        trainer.test(module, datamodule=datamodule, ckpt_path=best or None)
    if trainer.checkpoint_callback is not None and trainer.is_global_zero:
        print(f"Best checkpoint: {trainer.checkpoint_callback.best_model_path}", file=sys.stdout)
    return 0
