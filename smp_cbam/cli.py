"""``smp-cbam``: compare attention types, train one configuration, benchmark, or re-report."""

import argparse
import logging
import sys
import warnings
from pathlib import Path


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--config", help="YAML configuration (see experiments/configs/); options below override it")
    add("--output", help="output directory; the same directory resumes an interrupted grid")
    add("--dataset", choices=["synthetic", "camvid", "pets", "folder"])
    add("--data-root", help="dataset root folder")
    add("--classes", type=int, help="number of classes (folder datasets; 2 = binary)")
    add("--ignore-index", type=int, help="mask value ignored in loss and metrics")
    add("--image-size", type=int, nargs=2, metavar=("H", "W"), help="resize every image to H x W")
    add("--crop", type=int, nargs=2, metavar=("H", "W"), help="training crop size")
    add("--batch-size", type=int)
    add("--num-workers", type=int, help="data loader worker processes")
    add("--encoder", help="smp encoder name, e.g. resnet18")
    add("--epochs", type=int)
    add("--accelerator", help="Lightning accelerator: cpu, gpu, auto")
    add("--devices", help="Lightning devices, e.g. 1, 2 or auto")
    add("--strategy", help="Lightning strategy, e.g. ddp")
    add("--precision", help="Lightning precision, e.g. 32-true, bf16-mixed")
    add(
        "--malloc-default",
        action="store_true",
        help="leave glibc malloc as it is (by default freed tensor memory stays in the heap: "
        "CPU steps 3-10%% faster, the process keeps its peak memory)",
    )


def _overrides(args: argparse.Namespace) -> dict:
    """The configuration that the command-line options set."""
    options = {
        "data": {
            "dataset": args.dataset,
            "root": args.data_root,
            "num_classes": args.classes,
            "ignore_index": args.ignore_index,
            "resize": args.image_size,
            "crop": args.crop,
            "batch_size": args.batch_size,
            "num_workers": args.num_workers,
        },
        "model": {"encoder": args.encoder},
        "train": {"epochs": args.epochs},
        "trainer": {
            "accelerator": args.accelerator,
            "devices": int(args.devices) if args.devices and args.devices.isdigit() else args.devices,
            "strategy": args.strategy,
            "precision": args.precision,
        },
        "grid": {"archs": args.archs, "attentions": args.attentions, "seeds": args.seeds},
    }
    sections: dict = {k: {n: v for n, v in d.items() if v is not None} for k, d in options.items()}
    sections = {k: d for k, d in sections.items() if d}
    if args.output is not None:
        sections["output"] = args.output
    return sections


def _quiet_lightning() -> None:
    """The runner prints its own progress: drop Lightning's banners, a deprecation warning that
    Lightning itself triggers, and the warning about checkpoints that a resumed run expects."""
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")


def _run(config: dict) -> int:
    from .training.runner import compare

    _quiet_lightning()
    results = compare(config)
    print()
    print((Path(config["output"]) / "summary.md").read_text())
    print(f"Results: {Path(config['output']).resolve()} (results.csv, summary.md, plots/, runs/)")
    return 0 if (results["status"] == "ok").any() else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="smp-cbam", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("compare", help="train a grid of archs x attention types x seeds and compare them")
    _add_run_options(p)
    p.add_argument("--archs", nargs="+", help="smp architectures, e.g. unet unetplusplus")
    p.add_argument("--attentions", nargs="+", help="attention types, e.g. none scse cbam")
    p.add_argument("--seeds", type=int, nargs="+")

    p = commands.add_parser("train", help="train one configuration (one arch, attention type and seed)")
    _add_run_options(p)
    p.add_argument("--arch", dest="archs", type=lambda a: [a], help="smp architecture, e.g. unet")
    p.add_argument("--attention", dest="attentions", type=lambda a: [a], help="attention type, e.g. cbam")
    p.add_argument("--seed", dest="seeds", type=lambda s: [int(s)])

    p = commands.add_parser("report", help="rewrite summary.md and the plots of a results directory")
    p.add_argument("output", help="a directory written by 'smp-cbam compare'")

    commands.add_parser("bench", help="benchmark the attention types (options: smp-cbam bench --help)", add_help=False)

    args, rest = parser.parse_known_args(argv)
    if args.command == "bench":
        from .benchmarks.cbam_bench import main as bench_main

        return bench_main(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    # the runner's dependencies are imported only now, so that --help answers at once
    from .report import write_report
    from .training.data import DatasetError
    from .training.malloc import keep_heap
    from .training.runner import ConfigError, load_config

    try:
        if args.command == "report":
            print(write_report(args.output))
            return 0
        config = load_config(args.config, _overrides(args))
        if not args.malloc_default:
            keep_heap()
        if args.command == "train":
            for key in ("archs", "attentions", "seeds"):
                config["grid"][key] = config["grid"][key][:1]
        return _run(config)
    except (ConfigError, DatasetError, FileNotFoundError) as err:
        print(f"smp-cbam: error: {err}", file=sys.stderr)
        return 2
