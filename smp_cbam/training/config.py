"""The comparison runner's configuration: typed sections, one default, checked before anything runs.

A configuration is a YAML mapping of sections::

    output: runs/synthetic          # the output directory
    grid:    archs, attentions, seeds, placements, jobs -> the runs (GridConfig)
    data:    SegmentationDataModule's arguments          (checked against its signature)
    model:   SegmentationModule's model arguments        (ModelConfig)
    train:   SegmentationModule's optimiser arguments and the stopping rule (TrainConfig)
    trainer: pytorch_lightning.Trainer's arguments       (checked against its signature)
    costs:   the parameter and latency pass after the grid (CostsConfig)

The default configuration is ``experiments/configs/synthetic.yaml``, the main job; the package
ships it as ``smp_cbam/training/configs/synthetic.yaml``, a symbolic link to that file, so there is
one copy in the repository and a wheel carries its content. :func:`load_config` layers a user's YAML
and then command-line overrides on top of it. Keys that the main job's file does not set take the
defaults of the class they configure (the data module's signature, the module's signature) or of
the dataclasses below (the runner's own keys).

Every value is typed here: YAML 1.1 reads ``lr: 1e-3`` as the string ``"1e-3"``, so strings that
spell a number are accepted where a float is expected; an integer given as a string
(``batch_size: "4"``) and every other mismatch is a :class:`ConfigError` that names the key.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import inspect
import os
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

DEFAULT_CONFIG_PATH = Path(__file__).with_name("configs") / "synthetic.yaml"
# the base of every other dataset: the general Unet setup of experiments/configs/folder.yaml
DATASET_CONFIG_PATH = Path(__file__).with_name("configs") / "folder.yaml"
PLACEMENTS = ("decoder", "encoder", "both")
STOP_RULES = ("plateau", "fixed")
# Trainer arguments the runner sets for every run; a config that sets them would break the
# paired design or the output layout.
RUNNER_TRAINER_KEYS = (
    "max_epochs", "max_steps", "min_epochs", "min_steps", "callbacks", "default_root_dir",
    "enable_progress_bar", "enable_checkpointing", "num_sanity_val_steps",
)  # fmt: skip
# Lightning loggers the config may name in ``trainer.logger`` (besides dotted class paths).
LOGGERS = {
    "csv": "pytorch_lightning.loggers.CSVLogger",
    "tensorboard": "pytorch_lightning.loggers.TensorBoardLogger",
    "mlflow": "pytorch_lightning.loggers.MLFlowLogger",
    "wandb": "pytorch_lightning.loggers.WandbLogger",
    "comet": "pytorch_lightning.loggers.CometLogger",
    "neptune": "pytorch_lightning.loggers.NeptuneLogger",
}
# SegmentationModule arguments that the runner sets per run (from the grid and the data module).
RUNNER_MODULE_KEYS = (
    "arch", "attention", "placement", "init_seed", "in_channels", "num_classes", "ignore_index", "class_names", "model",
)  # fmt: skip


class ConfigError(ValueError):
    """A configuration key or value is wrong; the message names it."""


# --------------------------------------------------------------------------------------------
# typed sections


@dataclass(frozen=True)
class GridConfig:
    """The runs: every arch x attention x placement x seed (``none`` once per arch and seed).

    ``jobs`` runs that many runs at a time in worker processes, the CPU's threads shared among
    them (small models use one core poorly; results do not depend on it). It applies to training
    on one CPU device; with another accelerator or several devices runs go one at a time."""

    archs: list[str]
    attentions: list[str]
    seeds: list[int]
    placements: list[str] = field(default_factory=lambda: ["decoder"])
    jobs: int = 1


@dataclass(frozen=True)
class ModelConfig:
    """:class:`~smp_cbam.training.module.SegmentationModule`'s model arguments (same names)."""

    encoder: str
    encoder_depth: int
    decoder_channels: list[int] | None
    encoder_weights: str | None
    model_kwargs: dict | None = None  # further smp arguments, e.g. {decoder_use_norm: layernorm}


def _module(**kwargs):
    """A field passed on to SegmentationModule under its own name."""
    return field(metadata={"module": True}, **kwargs)


@dataclass(frozen=True)
class TrainConfig:
    """How long each run trains and how it learns.

    ``stop="plateau"``: Lightning's ``EarlyStopping`` on ``val_miou`` (mode max) ends a run once
    ``patience`` validations in a row have not improved on the best by more than ``min_delta``,
    where a validation at the trivial floor resets the patience (``run.PlateauStopping``: a run
    still at the all-most-frequent-class mIoU has not started learning, so it has not converged
    either), and so does one whose validation loss falls below its best by more than
    ``loss_min_delta`` (in the loss's units: cross-entropy, in nats per pixel, plus Dice
    loss; a run whose mIoU sits on a saddle while its loss still falls is still learning; ``None``
    leaves the loss out, the metric alone decides);
    ``max_epochs`` and ``max_steps`` (``None``: no step limit) bound every run. ``stop="fixed"``
    trains every run for the whole budget. The same rule applies to every arm. ``epochs`` is the
    older name of ``max_epochs``. (No ``min_epochs``: Lightning keeps a stop signal raised before
    ``min_epochs`` and ends the run exactly there; the floor rule is what a warm-up would be for.)
    """

    lr: float = _module()
    weight_decay: float = _module()
    scheduler: str = _module()
    stop: Literal["plateau", "fixed"] = "plateau"
    patience: int = 5
    min_delta: float = 0.001
    loss_min_delta: float | None = 0.01
    max_epochs: int = 50
    max_steps: int | None = None

    def module_kwargs(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.metadata.get("module")}


@dataclass(frozen=True)
class CostsConfig:
    """The pass after the grid that measures each arm's parameters and inference latency: one
    model per arm, ``threads`` intra-op threads, ``rounds`` timed forward passes interleaved
    across arms after ``warmup`` untimed rounds, the median per arm."""

    enabled: bool = True
    threads: int = 1
    rounds: int = 15
    warmup: int = 3


@dataclass(frozen=True)
class Config:
    """A checked configuration; :meth:`to_dict` gives what ``config.yaml`` holds."""

    output: str
    grid: GridConfig
    data: dict[str, Any]
    model: ModelConfig
    train: TrainConfig
    trainer: dict[str, Any]
    costs: CostsConfig = field(default_factory=CostsConfig)

    @property
    def dataset(self) -> str:
        return self.data.get("dataset", _data_defaults()["dataset"])

    def __getitem__(self, section: str) -> Any:
        """Read access by section name, for callers written against the former dict config."""
        if section not in SECTIONS:
            raise KeyError(section)
        return getattr(self, section)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **sections: Any) -> Config:
        """A copy with sections (or fields of sections, given as dicts) replaced, checked again."""
        raw = self.to_dict()
        for name, value in sections.items():
            raw[name] = {**raw[name], **value} if isinstance(value, dict) and isinstance(raw.get(name), dict) else value
        return from_dict(raw)


SECTIONS = {f.name: f for f in dataclasses.fields(Config)}


# --------------------------------------------------------------------------------------------
# value coercion from annotations


def describe(annotation: Any) -> str:
    """``annotation`` in words, for messages."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (list, Sequence, tuple):
        inner = args[0] if args else Any
        n = "" if origin is not tuple or (len(args) == 2 and args[1] is Ellipsis) else f"{len(args)} "
        plural = {int: "integers", float: "numbers", str: "strings", bool: "booleans"}.get(inner)
        return f"a list of {n}{plural}" if plural else "a list"
    return {
        int: "an integer", float: "a number", bool: "true or false", str: "a string", type(None): "null",
        dict: "a mapping", Any: "anything",
    }.get(annotation, getattr(annotation, "__name__", str(annotation)))  # fmt: skip


def coerce(value: Any, annotation: Any, key: str) -> Any:
    """``value`` checked against ``annotation`` (and converted: numeric strings to floats, tuples to
    lists so that ``config.yaml`` stays plain YAML); a :class:`ConfigError` naming ``key`` if it
    does not fit."""
    if annotation in (Any, inspect.Parameter.empty, object):
        return value
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:  # X | None: X's own message is the more precise one
            return coerce(value, options[0], key)
        for option in args:
            if option is type(None):
                continue
            try:
                return coerce(value, option, key)
            except ConfigError:
                continue
        raise _type_error(key, annotation, value)
    if origin is Literal:
        if value in args and type(value) is type(args[list(args).index(value)]):
            return value
        raise _type_error(key, annotation, value)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise _type_error(key, annotation, value)
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _type_error(key, annotation, value)
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise _type_error(key, annotation, value)
    if annotation is str:
        if isinstance(value, str):
            return value
        raise _type_error(key, annotation, value)
    if origin in (list, tuple, Sequence) or annotation in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _type_error(key, annotation, value)
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise _type_error(key, annotation, value)
            return [coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args))]
        inner = args[0] if args else Any
        return [coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (dict, Mapping) or annotation in (dict, Mapping):
        if isinstance(value, dict):
            return copy.deepcopy(value)
        raise _type_error(key, annotation, value)
    if isinstance(annotation, type):
        if isinstance(value, annotation):
            return value
        raise _type_error(key, annotation, value)
    return value  # an annotation this checker does not know: the constructor checks the value


def _type_error(key: str, annotation: Any, value: Any) -> ConfigError:
    quoted = " (a quoted string in YAML)" if isinstance(value, str) and not isinstance(_yaml_scalar(value), str) else ""
    return ConfigError(f"{key} must be {describe(annotation)}, got {value!r}{quoted}")


def _yaml_scalar(text: str) -> Any:
    """What ``text`` would be in YAML without quotes (a string that reads as another type was quoted)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _unknown_key(key: str, valid: Sequence[str]) -> ConfigError:
    name = key.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(name, list(valid), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"unknown config key {key!r}{hint}; valid: {', '.join(sorted(valid))}")


# --------------------------------------------------------------------------------------------
# the classes the sections configure


@functools.cache
def _signature_hints(target: Any) -> tuple[dict[str, inspect.Parameter], dict[str, Any]]:
    function = target.__init__ if inspect.isclass(target) else target
    parameters = dict(inspect.signature(function).parameters)
    parameters.pop("self", None)
    parameters = {k: p for k, p in parameters.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    try:
        hints = typing.get_type_hints(function)
    except Exception:  # an annotation that cannot be resolved: the constructor checks the value
        hints = {}
    return parameters, hints


def _datamodule_class():
    from .data import SegmentationDataModule

    return SegmentationDataModule


def _module_class():
    from .module import SegmentationModule

    return SegmentationModule


def _data_defaults() -> dict[str, Any]:
    parameters, _ = _signature_hints(_datamodule_class())
    return {k: p.default for k, p in parameters.items() if p.default is not p.empty}


def _check_against_signature(raw: dict, target: Any, section: str, exclude: Sequence[str]) -> dict:
    """``raw``'s keys checked to be arguments of ``target`` and their values typed by its annotations."""
    parameters, hints = _signature_hints(target)
    valid = [k for k in parameters if k not in exclude]
    checked = {}
    for key, value in raw.items():
        if key not in valid:
            if key in exclude:
                raise ConfigError(f"{section}.{key} is set by the runner; remove it from the config")
            raise _unknown_key(f"{section}.{key}", valid)
        checked[key] = coerce(value, hints.get(key, Any), f"{section}.{key}")
    return checked


def _dataclass_section(cls: type, raw: Any, section: str, defaults: Mapping[str, Any] = {}) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"config section {section!r} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for key, value in raw.items():
        if key not in fields:
            raise _unknown_key(f"{section}.{key}", list(fields))
        values[key] = coerce(value, hints[key], f"{section}.{key}")
    for name, f in fields.items():
        if name in values:
            continue
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            if name not in defaults:
                raise ConfigError(f"{section}.{name} is required")
            values[name] = coerce(defaults[name], hints[name], f"{section}.{name}")
    return cls(**values)


# --------------------------------------------------------------------------------------------
# names checked against smp, the registry and Lightning


def known_archs() -> list[str]:
    import segmentation_models_pytorch as smp

    return list(smp.MODEL_ARCHITECTURES_MAPPING)


def known_attentions() -> list[str]:
    from ..registry import available_attentions

    return ["none" if name is None else name for name in available_attentions()]


def check_encoder(name: str) -> None:
    import segmentation_models_pytorch as smp

    if name.startswith("tu-"):
        import timm

        if not timm.is_model(name[3:]):
            close = difflib.get_close_matches(name[3:], timm.list_models(), n=1)
            hint = f" (did you mean 'tu-{close[0]}'?)" if close else ""
            raise ConfigError(f"model.encoder: unknown timm encoder {name!r}{hint}")
        return
    names = smp.encoders.get_encoder_names()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=3)
        hint = f"; close: {', '.join(close)}" if close else ""
        raise ConfigError(f"model.encoder: unknown encoder {name!r}{hint} (smp's encoders, or tu-<timm model>)")


def placement_support() -> Any:
    """``smp_cbam.placement.supports`` where this install has it, else None."""
    try:
        from ..placement import supports
    except ImportError:
        return None
    return supports


NATIVE_DECODER_ATTENTION = ("unet", "unetplusplus")


def _check_grid(grid: GridConfig, encoder: str) -> None:
    if not isinstance(grid.jobs, int) or grid.jobs < 1:
        raise ConfigError(f"grid.jobs must be an integer >= 1, got {grid.jobs!r}")
    for key in ("archs", "attentions", "seeds", "placements"):
        values = getattr(grid, key)
        if not values:
            raise ConfigError(f"grid.{key} must be a non-empty list")
        if len(set(values)) != len(values):
            raise ConfigError(f"grid.{key} lists a value twice: {values}")
    archs = known_archs()
    for arch in grid.archs:
        if arch.lower() not in archs:
            close = difflib.get_close_matches(arch.lower(), archs, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"grid.archs: unknown architecture {arch!r}{hint}; smp has: {', '.join(archs)}")
    attentions = known_attentions()
    for attention in grid.attentions:
        if attention not in attentions:
            raise ConfigError(f"grid.attentions: unknown attention {attention!r}; registered: {', '.join(attentions)}")
    for placement in grid.placements:
        if placement not in PLACEMENTS:
            raise ConfigError(f"grid.placements: unknown placement {placement!r}; valid: {', '.join(PLACEMENTS)}")
    if all(a == "none" for a in grid.attentions):
        return
    supports = placement_support()
    for arch in grid.archs:
        for placement in grid.placements:
            if supports is None:
                if placement != "decoder" or arch.lower() not in NATIVE_DECODER_ATTENTION:
                    raise ConfigError(
                        f"grid: attention with placement {placement!r} in {arch!r} needs smp_cbam.add_attention, "
                        f"which this installation lacks; smp builds decoder attention only in "
                        f"{', '.join(NATIVE_DECODER_ATTENTION)}"
                    )
            else:
                exact = placement != "decoder" and "encoder" in inspect.signature(supports).parameters
                if not (
                    supports(arch.lower(), placement, encoder=encoder) if exact else supports(arch.lower(), placement)
                ):
                    where = f"architecture {arch!r}" + (f" with encoder {encoder!r}" if exact else "")
                    raise ConfigError(f"grid: placement {placement!r} is not supported for {where}")


def _check_trainer(raw: Any) -> dict:
    if not isinstance(raw, dict):
        raise ConfigError(f"config section 'trainer' must be a mapping, got {raw!r}")
    import pytorch_lightning as pl

    raw = dict(raw)
    logger = raw.pop("logger", None)
    # Lightning's default: bf16-mixed is not shown to give the same answer on real data
    # (experiments/results/camvid-precision), so it is asked for (`auto` or by name), never implied
    precision = raw.pop("precision", "32-true")
    checked = _check_against_signature(raw, pl.Trainer, "trainer", RUNNER_TRAINER_KEYS + ("logger", "precision"))
    checked["precision"] = resolve_precision(precision, checked.get("accelerator", "auto"))
    checked["logger"] = _check_logger(logger)
    return checked


def _check_logger(value: Any) -> list[str] | bool:
    """``trainer.logger``: null (the defaults: CSV, and TensorBoard when installed), false (CSV
    only: the runner's own record), a logger name or dotted class path, or a list of them."""
    if value is None or value is True:
        return True
    if value is False:
        return False
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"trainer.logger must be true, false, a logger name or a list of them, got {value!r}")
    for name in names:
        if name not in LOGGERS and "." not in name:
            raise ConfigError(
                f"trainer.logger: unknown logger {name!r}; valid: {', '.join(LOGGERS)} or a dotted class path"
            )
    return list(names)


# --------------------------------------------------------------------------------------------
# precision


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX-BF16), from /proc/cpuinfo."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("avx512_bf16", "amx_bf16"))


def default_precision(accelerator: str = "auto") -> str:
    """``"bf16-mixed"`` where the device computes bf16 natively (CUDA GPUs that support it, CPUs
    with AVX512-BF16/AMX), ``"32-true"`` otherwise."""
    import torch

    if str(accelerator) in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "32-true"
    if str(accelerator) in ("auto", "cpu"):
        return "bf16-mixed" if cpu_has_native_bf16() else "32-true"
    return "32-true"


def resolve_precision(value: Any, accelerator: Any = "auto") -> str:
    """``trainer.precision``: ``auto`` becomes :func:`default_precision`; other values are
    Lightning's precision strings (or its integer shorthands), kept as strings."""
    if value == "auto":
        return default_precision(accelerator)
    from lightning_fabric.connector import _PRECISION_INPUT_STR, _convert_precision_to_unified_args

    try:
        return str(_convert_precision_to_unified_args(value))
    except (ValueError, TypeError):
        valid = ", ".join(["auto", *typing.get_args(_PRECISION_INPUT_STR)])
        raise ConfigError(f"trainer.precision must be one of {valid}, got {value!r}") from None


# --------------------------------------------------------------------------------------------
# output directory


def check_output(output: str) -> None:
    """``output`` is (or can become) a writable directory; a ConfigError naming the path if not."""
    path = Path(output)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"output {str(path)!r} is a file, not a directory; choose another --output")
    ancestor = path
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ConfigError(
            f"output {str(path)!r} lies under {str(ancestor)!r}, which is a file; choose another --output"
        )
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ConfigError(f"output {str(path)!r}: {str(ancestor)!r} is not writable; choose another --output")


# --------------------------------------------------------------------------------------------
# loading


def _merge(base: dict, layer: dict) -> dict:
    """``base`` updated by ``layer``, section by section (a section's keys merge; other values replace)."""
    merged = copy.deepcopy(base)
    for key, value in layer.items():
        if isinstance(merged.get(key), dict) and isinstance(value, dict):
            merged[key] = {**merged[key], **copy.deepcopy(value)}
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _rename_epochs(layer: dict) -> dict:
    """``layer`` with ``train.epochs``, the older name, renamed to ``train.max_epochs``."""
    train = layer.get("train")
    if not isinstance(train, dict) or "epochs" not in train:
        return layer
    train = dict(train)
    epochs = train.pop("epochs")
    if "max_epochs" in train and train["max_epochs"] != epochs:
        raise ConfigError(
            f"train.epochs ({epochs!r}) and train.max_epochs ({train['max_epochs']!r}) disagree; "
            "epochs is the older name of max_epochs: keep one"
        )
    return {**layer, "train": {**train, "max_epochs": epochs}}


def read_yaml(path: str | os.PathLike) -> dict:
    path = Path(path)
    try:
        loaded = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot read config {path}: {err}") from err
    if loaded is None:
        loaded = {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"config {path} must be a mapping of sections, got {type(loaded).__name__}")
    return loaded


def load_config(path: str | os.PathLike | None = None, overrides: dict | None = None) -> Config:
    """The default configuration (the main job), updated by the YAML file at ``path`` and then by
    ``overrides`` (the same nested layout), checked and typed.

    A configuration whose dataset (the last one named) is not the main job's starts from the
    general setup of ``experiments/configs/folder.yaml`` instead of the main job's (whose depth-2
    encoder, schedule and CPU Trainer are sized for its generated task), with its data section
    empty (the data module's own defaults) and ``output`` ``runs/<dataset>``; the file and the
    overrides then apply on top, all but a data section written for another dataset: a layer that
    names another dataset than the layers before it starts the data section afresh.
    """
    layers = [read_yaml(path)] if path is not None else []
    layers.append(overrides or {})
    for layer in layers:
        if not isinstance(layer, dict):
            raise ConfigError(f"overrides must be a mapping of sections, got {layer!r}")
        unknown = [k for k in _rename_epochs(layer) if k not in SECTIONS]
        if unknown:
            raise _unknown_key(unknown[0], list(SECTIONS))
    layers = [_rename_epochs(layer) for layer in layers]
    named = [
        layer["data"]["dataset"]
        for layer in layers
        if isinstance(layer.get("data"), dict) and "dataset" in layer["data"]
    ]
    raw = _rename_epochs(read_yaml(DEFAULT_CONFIG_PATH))
    if named and named[-1] != raw.get("data", {}).get("dataset"):
        raw = {**_rename_epochs(read_yaml(DATASET_CONFIG_PATH)), "data": {}, "output": f"runs/{named[-1]}"}
    base_data = raw.get("data") or {}
    for layer in layers:
        data = layer.get("data")
        dataset = data.get("dataset") if isinstance(data, dict) else None
        current = (raw.get("data") or {}).get("dataset")
        if dataset is not None and current is not None and dataset != current:
            # data options belong to their dataset: the base's where it is for this one, else none
            raw = {**raw, "data": copy.deepcopy(base_data) if base_data.get("dataset") == dataset else {}}
        raw = _merge(raw, layer)
    return from_dict(raw)


def from_dict(raw: dict) -> Config:
    """A :class:`Config` from a complete mapping (as in ``config.yaml``), checked and typed."""
    unknown = [k for k in raw if k not in SECTIONS]
    if unknown:
        raise _unknown_key(unknown[0], list(SECTIONS))
    output = raw.get("output")
    if not isinstance(output, str) or not output:
        raise ConfigError(f"output must be a directory path, got {output!r}")
    grid_raw = raw.get("grid", {})
    if isinstance(grid_raw, dict) and isinstance(grid_raw.get("attentions"), list):  # YAML's null is "none"
        grid_raw = {**grid_raw, "attentions": ["none" if a is None else a for a in grid_raw["attentions"]]}
    grid = _dataclass_section(GridConfig, grid_raw, "grid")
    module_parameters, _ = _signature_hints(_module_class())
    module_defaults = {k: p.default for k, p in module_parameters.items() if p.default is not p.empty}
    model = _dataclass_section(ModelConfig, raw.get("model", {}), "model", module_defaults)
    check_encoder(model.encoder)
    _check_grid(grid, model.encoder)
    train = _dataclass_section(TrainConfig, _rename_epochs(raw).get("train", {}), "train", module_defaults)
    _check_train(train)
    data = _check_data(raw.get("data", {}))
    trainer = _check_trainer(raw.get("trainer", {}) or {})
    costs = _dataclass_section(CostsConfig, raw.get("costs", {}) or {}, "costs")
    if costs.threads < 1 or costs.rounds < 1 or costs.warmup < 0:
        raise ConfigError(f"costs: threads and rounds must be >= 1 and warmup >= 0, got {costs}")
    check_output(output)
    return Config(output=output, grid=grid, data=data, model=model, train=train, trainer=trainer, costs=costs)


def _check_train(train: TrainConfig) -> None:
    if train.max_epochs < 1:
        raise ConfigError(f"train.max_epochs must be >= 1, got {train.max_epochs}")
    if train.max_steps is not None and train.max_steps < 1:
        raise ConfigError(f"train.max_steps must be >= 1 or null, got {train.max_steps}")
    if train.patience < 1:
        raise ConfigError(f"train.patience must be >= 1, got {train.patience}")
    if train.min_delta < 0:
        raise ConfigError(f"train.min_delta must be >= 0, got {train.min_delta}")
    if train.loss_min_delta is not None and not train.loss_min_delta >= 0:
        raise ConfigError(f"train.loss_min_delta must be >= 0 or null, got {train.loss_min_delta}")
    if not train.lr > 0:
        raise ConfigError(f"train.lr must be > 0, got {train.lr}")
    from .module import SCHEDULERS

    if train.scheduler not in SCHEDULERS:
        raise ConfigError(f"train.scheduler must be one of {', '.join(SCHEDULERS)}, got {train.scheduler!r}")


def _check_data(raw: Any) -> dict:
    if not isinstance(raw, dict):
        raise ConfigError(f"config section 'data' must be a mapping, got {raw!r}")
    data = _check_against_signature(raw, _datamodule_class(), "data", ("seed",))
    from .data import DatasetError

    try:
        _datamodule_class()(**data)  # its own argument checks
    except DatasetError:
        pass  # the files, not the configuration: the runner reads and checks them before it writes anything
    except (TypeError, ValueError) as err:
        raise ConfigError(f"data: {err}") from err
    # config.yaml records every argument, the data module's defaults included
    _, hints = _signature_hints(_datamodule_class())
    defaults = {k: coerce(v, hints.get(k, Any), f"data.{k}") for k, v in _data_defaults().items() if k != "seed"}
    return {**defaults, **data}
