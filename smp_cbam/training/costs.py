"""The cost table: parameters and inference latency per arm, measured in one controlled pass.

Latency measured inside each run would depend on what else the machine was doing while that run
trained. So the runner measures it after the grid, for every arm (arch, encoder, attention,
placement) at once: a fixed number of intra-op threads, one model per arm in eval mode on one
image of the evaluation size, ``warmup`` untimed rounds, then ``rounds`` rounds that time one
forward pass of every arm in turn (interleaved, so a slow phase of the machine touches every arm
alike), and the median per arm. Models run in float32: latency is a property of the architecture,
not of the training precision. Weights do not change the time, so fresh models are used.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import torch

from ..report import atomic_write_csv
from .config import Config
from .data import SegmentationDataModule
from .module import SegmentationModule
from .run import RunSpec, count_params, module_kwargs

COST_COLUMNS = ["arch", "encoder", "attention", "placement", "params", "latency_ms"]


@contextlib.contextmanager
def intra_op_threads(threads: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def interleaved_latency(
    models: dict[str, torch.nn.Module], example: torch.Tensor, rounds: int, warmup: int
) -> dict[str, float]:
    """Median milliseconds of one forward pass of each model, rounds interleaved across models."""
    times: dict[str, list[float]] = {name: [] for name in models}
    sync = torch.cuda.synchronize if example.device.type == "cuda" else (lambda: None)
    with torch.inference_mode():
        for i in range(warmup + rounds):
            for name, model in models.items():
                sync()
                start = time.perf_counter()
                model(example)
                sync()
                if i >= warmup:
                    times[name].append(time.perf_counter() - start)
    return {name: 1000 * statistics.median(t) for name, t in times.items()}


def measure_costs(config: Config, runs: list[RunSpec], datamodule: SegmentationDataModule) -> pd.DataFrame:
    """One row per arm among ``runs``: ``COST_COLUMNS``."""
    arms: dict[tuple[str, str, str], RunSpec] = {}
    for run in runs:
        arms.setdefault((run.arch, run.attention, run.placement), run)
    example = next(iter(datamodule.val_dataloader()))[0][:1]
    device = torch.device(
        "cuda" if config.trainer.get("accelerator") in ("gpu", "cuda", "auto") and torch.cuda.is_available() else "cpu"
    )
    with intra_op_threads(config.costs.threads):
        models, params = {}, {}
        for key, run in arms.items():
            model = SegmentationModule(**module_kwargs(config, run, datamodule)).model.eval()
            params[key] = count_params(model, example)
            models[key] = model.to(device)
        latency = interleaved_latency(models, example.to(device), config.costs.rounds, config.costs.warmup)
    rows = [
        {"arch": a, "encoder": config.model.encoder, "attention": att, "placement": p, "params": params[(a, att, p)],
         "latency_ms": latency[(a, att, p)]}
        for (a, att, p) in arms
    ]  # fmt: skip
    return pd.DataFrame(rows, columns=COST_COLUMNS)


def write_costs(config: Config, runs: list[RunSpec], datamodule: SegmentationDataModule, output: Path) -> pd.DataFrame:
    costs = measure_costs(config, runs, datamodule)
    atomic_write_csv(costs, output / "costs.csv")
    return costs
