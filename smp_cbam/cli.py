"""``smp-cbam``: compare attention types, train one model, re-report, or benchmark.

This module imports only the standard library at the top: ``smp-cbam --help`` and every parse
error answer before torch, smp or Lightning load. Each command imports what it needs when it runs.
"""

import argparse
import inspect
import os
import sys
from collections.abc import Sequence
from pathlib import Path

PROG = "smp-cbam"
EXIT_USAGE = 2  # argparse's status for a bad command line; also every configuration or data error
EXIT_INTERRUPTED = 130
DESCRIPTION = "CBAM, SCSE and other attention types in smp models: compare them, train one, report."


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults; options that default to the configuration file say so instead of None."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.dest == "config":
            return f"{action.help} (default: the main job, experiments/configs/synthetic.yaml)"
        if action.default is None and action.option_strings:
            return f"{action.help or ''} (default: from --config, else the main job's)"
        return super()._get_help_string(action)


def _add_compare_options(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--config", help="YAML configuration (see experiments/configs/); options below override it")
    add("--output", help="output directory; the same directory resumes an interrupted grid")
    add("--archs", nargs="+", help="smp architectures, e.g. unet unetplusplus")
    add("--attentions", nargs="+", help="attention types, e.g. none scse cbam")
    add("--seeds", type=int, nargs="+", help="seeds; runs with the same seed are paired")
    add("--jobs", type=int, help="runs trained at a time on the CPU, sharing its threads (grid.jobs)")
    add("--dataset", choices=["synthetic", "camvid", "pets", "folder"], help="dataset")
    add("--data-root", help="dataset root folder")
    add("--classes", type=int, help="number of classes (folder datasets; 2 = binary)")
    add(
        "--void-label",
        type=int,
        help="the value void pixels have in the mask files, ignored in loss and metrics (e.g. 255)",
    )
    add("--ignore-index", type=int, help="the index batches carry at void and padding pixels (not a class index)")
    add("--image-size", type=int, nargs=2, metavar=("H", "W"), help="resize every image to H x W")
    add("--crop", type=int, nargs=2, metavar=("H", "W"), help="training crop size")
    add("--batch-size", type=int, help="batch size per device")
    add("--num-workers", type=int, help="data loader worker processes")
    add("--encoder", help="smp encoder name, e.g. resnet18")
    add(
        "--epochs",
        type=int,
        help="maximum training epochs of every run (train.max_epochs); runs stop earlier at a plateau unless train.stop is fixed",
    )
    add("--accelerator", help="Lightning accelerator: cpu, gpu, auto")
    add("--devices", help="Lightning devices per node, e.g. 1, 2 or auto")
    add("--num-nodes", type=int, help="Lightning num_nodes (multi-node DDP, see docs/cli.md)")
    add("--strategy", help="Lightning strategy, e.g. ddp")
    add(
        "--precision",
        help="Lightning precision, e.g. 32-true, bf16-mixed, or auto: bf16-mixed where the machine computes bf16 "
        "natively (the main job asks for auto; other datasets default to 32-true)",
    )
    add("--retry-failed", action="store_true", help="train again the runs that failed in --output")
    add(
        "--malloc-default",
        action="store_true",
        help="leave glibc malloc as it is (by default freed tensor memory stays in the heap: "
        "faster CPU steps, the process keeps its peak memory)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION, formatter_class=_HelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser(
        "compare",
        help="train a grid of archs x attention types x seeds and compare them",
        description="Train a grid of archs x attention types x seeds on one budget and compare them "
        "(paired by seed). Run the same command again to resume.",
        formatter_class=_HelpFormatter,
    )
    _add_compare_options(p)

    commands.add_parser(
        "train",
        help="train one model with LightningCLI options: --model.*, --data.*, --trainer.*, --config, "
        "--print_config (smp-cbam train --help)",
        add_help=False,
    )
    p = commands.add_parser(
        "report", help="rewrite summary.md and the plots of a results directory", formatter_class=_HelpFormatter
    )
    p.add_argument("output", help="a directory written by 'smp-cbam compare'")
    commands.add_parser("bench", help="benchmark the attention types (smp-cbam bench --help)", add_help=False)
    return parser


def _overrides(args: argparse.Namespace) -> dict:
    """The configuration that the command-line options set."""
    devices = int(args.devices) if args.devices and args.devices.isdigit() else args.devices
    options = {
        "data": {
            "dataset": args.dataset,
            "root": args.data_root,
            "num_classes": args.classes,
            "void_label": args.void_label,
            "ignore_index": args.ignore_index,
            "resize": args.image_size,
            "crop": args.crop,
            "batch_size": args.batch_size,
            "num_workers": args.num_workers,
        },
        "model": {"encoder": args.encoder},
        "train": {"max_epochs": args.epochs},
        "trainer": {
            "accelerator": args.accelerator,
            "devices": devices,
            "num_nodes": args.num_nodes,
            "strategy": args.strategy,
            "precision": args.precision,
        },
        "grid": {"archs": args.archs, "attentions": args.attentions, "seeds": args.seeds, "jobs": args.jobs},
    }
    sections: dict = {k: {n: v for n, v in d.items() if v is not None} for k, d in options.items()}
    sections = {k: d for k, d in sections.items() if d}
    if args.output is not None:
        sections["output"] = args.output
    return sections


def _quiet_lightning() -> None:
    """The runner prints its own progress: drop Lightning's banners, a deprecation warning that
    Lightning itself triggers, and the warning about checkpoints that a resumed run expects."""
    import logging

    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    from .training.run import quiet_lightning_warnings

    quiet_lightning_warnings()


def is_main_process() -> bool:
    """Whether this process prints and writes: under DDP only global rank 0 does.

    Lightning sets ``rank_zero_only.rank`` from ``RANK``/``LOCAL_RANK`` when it is imported and
    again when a strategy starts; ``NODE_RANK`` and ``LOCAL_RANK`` also cover the first node-0
    process of another node before its first trainer starts (``RANK`` is unset there).
    """
    from pytorch_lightning.utilities import rank_zero_only

    first = all(os.environ.get(name, "0") == "0" for name in ("NODE_RANK", "LOCAL_RANK", "RANK"))
    return rank_zero_only.rank == 0 and first


def _check_strategy(strategy: object) -> None:
    """Every DDP process must run the whole grid loop: Lightning's ``ddp`` starts them by running
    the command again; spawned or forked processes would run only ``fit`` and lose the results."""
    from .training.runner import ConfigError

    if isinstance(strategy, str) and any(word in strategy for word in ("spawn", "fork", "notebook")):
        raise ConfigError(f"trainer.strategy {strategy!r} is not supported by compare; use 'ddp'")


def _compare(args: argparse.Namespace) -> int:
    from .training.malloc import keep_heap
    from .training.runner import ConfigError, compare, load_config

    config = load_config(args.config, _overrides(args))
    _check_strategy(config.trainer.get("strategy"))
    output = Path(config.output)  # load_config has checked that it can be written
    kwargs = {}
    if args.retry_failed:
        if "retry_failed" not in inspect.signature(compare).parameters:
            raise ConfigError(
                "--retry-failed: this runner cannot retry; delete runs/<run>/result.json of the failed runs"
            )
        kwargs["retry_failed"] = True
    if not args.malloc_default:
        keep_heap()
    _quiet_lightning()
    results = compare(config, **kwargs)
    if not is_main_process():
        return 0
    print()
    print((output / "summary.md").read_text())
    print(f"Results: {output.resolve()} (results.csv, summary.md, plots/, runs/)")
    return 0 if (results["status"] == "ok").any() else 1


def _train(rest: Sequence[str]) -> int:
    from .training.cli import train

    return train(rest)


def _report(args: argparse.Namespace) -> int:
    from .report import write_report

    if not Path(args.output).is_dir():
        raise FileNotFoundError(f"report: {args.output} is not a results directory")
    print(write_report(args.output))
    return 0


# the import names of pyproject.toml's train extras (and what they bring): the commands need them
TRAIN_EXTRAS = frozenset(
    {"pytorch_lightning", "lightning_fabric", "torchmetrics", "albumentations", "cv2", "pandas", "scipy", "matplotlib",
     "yaml", "tensorboard", "jsonargparse"}
)  # fmt: skip


def _user_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean a wrong configuration, data or path (not a bug): reported as one
    message with exit status 2. Imported here, after the command ran, so nothing loads early."""
    errors: list[type[BaseException]] = [FileNotFoundError, NotADirectoryError, PermissionError]
    for module, name in (
        ("smp_cbam.training.runner", "ConfigError"),
        ("smp_cbam.training.data", "DatasetError"),
        ("smp_cbam.training.cli", "TrainError"),
    ):
        found = sys.modules.get(module)
        if found is not None and hasattr(found, name):
            errors.append(getattr(found, name))
    return tuple(errors)


def _message(err: BaseException) -> str:
    """One line (continuation lines, e.g. a list of bad files, indented below it)."""
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        text = f"{err.filename}: {err.strerror}"
    else:
        text = str(err) or type(err).__name__
    first, *rest = [line for line in text.splitlines() if line.strip()] or [type(err).__name__]
    return "\n".join([f"{PROG}: error: {first}", *(f"  {line}" for line in rest)])


def main(argv: Sequence[str] | None = None) -> int:
    """Runs ``smp-cbam ARGS`` and returns the exit status: 0 done, 1 every run failed, 2 a usage,
    configuration or data error (one message on stderr, no traceback), 130 interrupted."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command not in ("bench", "train") and rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        if args.command == "bench":
            from .benchmarks.cbam_bench import main as bench_main

            return bench_main(rest)
        if args.command == "train":
            return _train(rest)
        if args.command == "report":
            return _report(args)
        return _compare(args)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except ModuleNotFoundError as err:
        if (err.name or "").split(".")[0] not in TRAIN_EXTRAS:
            raise
        print(
            f"{PROG}: error: {args.command} needs the train extras (no module named {err.name!r}): "
            "pip install -e '.[train]' in a clone of smp-cbam",
            file=sys.stderr,
        )
        return EXIT_USAGE
    except Exception as err:
        if not isinstance(err, _user_errors()):
            raise
        print(_message(err), file=sys.stderr)
        return EXIT_USAGE
