"""Seconds per training epoch of a comparison's models in two precisions, side by side.

Builds the data and models of a runner configuration (default: the main job) and, in each round,
trains one epoch (with its validation) of every arm in ``32-true`` and in ``bf16-mixed``, in
turn, with Lightning as the runner does. Prints the median seconds per epoch of each arm and
precision and the median of the per-round ratios bf16 / fp32, so that a busy machine slows both
sides of a ratio alike.

    OMP_NUM_THREADS=1 python experiments/bench_epoch_precision.py --rounds 3
    OMP_NUM_THREADS=1 python experiments/bench_epoch_precision.py --config experiments/configs/camvid.yaml --rounds 1

One thread per process is what the runner gives each of its ``grid.jobs`` workers on a 2-core
machine; set OMP_NUM_THREADS to match the run you want to predict.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
import warnings

import pytorch_lightning as pl
import torch

from smp_cbam.training.config import load_config
from smp_cbam.training.module import SegmentationModule
from smp_cbam.training.run import RunSpec, align_hparams, make_datamodule, module_kwargs

PRECISIONS = ("32-true", "bf16-mixed")


def epoch_seconds(config, datamodule, attention: str, precision: str) -> float:
    run = RunSpec(config.grid.archs[0], attention, seed=0)
    module = SegmentationModule(**module_kwargs(config, run, datamodule))
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        precision=precision,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=None, help="runner configuration (default: the main job)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (default 3), after one untimed")
    parser.add_argument("--attentions", nargs="+", default=None, help="arms (default: the configuration's)")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    config = load_config(args.config)
    attentions = args.attentions or list(config.grid.attentions)
    datamodule = make_datamodule(config, seed=0)
    datamodule.setup("fit")
    align_hparams(datamodule)
    print(
        f"{config.dataset}: {config.grid.archs[0]} {config.model.encoder}, batch {datamodule.batch_size}, "
        f"{torch.get_num_threads()} thread(s), {args.rounds} timed round(s) after 1 untimed"
    )
    times: dict[tuple[str, str], list[float]] = {}
    for round_ in range(args.rounds + 1):
        for attention in attentions:
            for precision in PRECISIONS:
                seconds = epoch_seconds(config, datamodule, attention, precision)
                if round_ > 0:
                    times.setdefault((attention, precision), []).append(seconds)
    print("| attention | fp32 s/epoch | bf16 s/epoch | bf16 / fp32 (median of rounds) |")
    print("|---|---:|---:|---:|")
    for attention in attentions:
        fp32, bf16 = times[(attention, PRECISIONS[0])], times[(attention, PRECISIONS[1])]
        ratio = statistics.median(b / f for b, f in zip(bf16, fp32))
        print(f"| {attention} | {statistics.median(fp32):.2f} | {statistics.median(bf16):.2f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
