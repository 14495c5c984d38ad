"""Training-step time of a comparison's model in fp32 and bf16 autocast, NCHW and channels_last.

The bf16 target of the main job (an epoch in <= 0.6x of its fp32 time) is bound by the training
step. This script times that step (forward, cross-entropy, backward, AdamW) of every arm in the
four combinations of precision and memory format, interleaved in shuffled order within each
round, and prints medians and the medians of the per-round ratios, so that a busy machine slows
both sides of a ratio alike.

    OMP_NUM_THREADS=1 python experiments/bench_step_layout.py --rounds 15
    OMP_NUM_THREADS=1 python experiments/bench_step_layout.py --config experiments/configs/camvid.yaml
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch
import torch.nn.functional as F

from smp_cbam.training.config import load_config
from smp_cbam.training.module import SegmentationModule
from smp_cbam.training.run import RunSpec, align_hparams, make_datamodule, module_kwargs

SETTINGS = (("fp32", "nchw"), ("bf16", "nchw"), ("fp32", "channels_last"), ("bf16", "channels_last"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=None, help="runner configuration (default: the main job)")
    parser.add_argument("--rounds", type=int, default=15, help="timed rounds (default 15), after two untimed")
    parser.add_argument("--steps", type=int, default=3, help="steps per timing (default 3)")
    parser.add_argument("--attentions", nargs="+", default=None, help="arms (default: the configuration's)")
    args = parser.parse_args(argv)
    for name in ("rounds", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    config = load_config(args.config)
    attentions = args.attentions or list(config.grid.attentions)
    datamodule = make_datamodule(config, seed=0)
    datamodule.setup("fit")
    align_hparams(datamodule)
    images, masks = next(iter(datamodule.train_dataloader()))[:2]
    masks = masks.long()
    ignore = datamodule.ignore_index if datamodule.ignore_index is not None else -100

    contenders = {}
    for attention in attentions:
        for precision, layout in SETTINGS:
            torch.manual_seed(0)
            model = SegmentationModule(**module_kwargs(config, RunSpec(config.grid.archs[0], attention, 0), datamodule))
            model = model.model.train()
            x = images
            if layout == "channels_last":
                model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
            contenders[(attention, precision, layout)] = (model, torch.optim.AdamW(model.parameters()), x)

    def step(key: tuple[str, str, str]) -> None:
        model, optimizer, x = contenders[key]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=key[1] == "bf16"):
            loss = F.cross_entropy(model(x).float(), masks, ignore_index=ignore)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    print(
        f"{config.dataset}: {config.grid.archs[0]} {config.model.encoder}, batch {tuple(images.shape)}, "
        f"{torch.get_num_threads()} thread(s), {args.rounds} rounds of {args.steps} steps after 2 untimed"
    )
    times: dict[tuple[str, str, str], list[float]] = {key: [] for key in contenders}
    rng = random.Random(0)
    for round_ in range(args.rounds + 2):
        order = list(contenders)
        rng.shuffle(order)
        for key in order:
            start = time.perf_counter()
            for _ in range(args.steps):
                step(key)
            if round_ >= 2:
                times[key].append(1000 * (time.perf_counter() - start) / args.steps)

    def ratio(a: tuple[str, str, str], b: tuple[str, str, str]) -> float:
        return statistics.median(x / y for x, y in zip(times[a], times[b]))

    print("| attention | fp32 NCHW ms | bf16 NCHW ms | fp32 CL ms | bf16 CL ms | bf16/fp32 NCHW | bf16/fp32 CL | bf16 CL / fp32 NCHW |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for a in attentions:
        keys = [(a, p, layout) for p, layout in SETTINGS]
        cells = [f"{statistics.median(times[k]):.1f}" for k in keys]
        ratios = [ratio(keys[1], keys[0]), ratio(keys[3], keys[2]), ratio(keys[3], keys[0])]
        print(f"| {a} | " + " | ".join(cells) + " | " + " | ".join(f"{r:.2f}" for r in ratios) + " |")


if __name__ == "__main__":
    main()
