"""Training-step time of a comparison's model in fp32 and bf16 autocast, NCHW and channels_last.

The bf16 target of the main job (an epoch in <= 0.6x of its fp32 time) is bound by the training
step. This script times that step (forward, cross-entropy, backward, AdamW) of every arm in the
four combinations of precision and memory format, interleaved in shuffled order within each
round, and prints medians and the medians of the per-round ratios, so that a busy machine slows
both sides of a ratio alike.

Each arm's overhead over ``none`` is the median of its per-round ratios to ``none`` in the same
setting. ``--precisions fp32`` leaves bf16 out (on a CPU without native bf16 it is emulated).

    OMP_NUM_THREADS=1 python experiments/bench_step_layout.py --rounds 15
    OMP_NUM_THREADS=1 python experiments/bench_step_layout.py --config experiments/configs/camvid.yaml
    OMP_NUM_THREADS=1 python experiments/bench_step_layout.py --precisions fp32
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

PRECISIONS = ("fp32", "bf16")
LAYOUTS = ("nchw", "channels_last")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=None, help="runner configuration (default: the main job)")
    parser.add_argument("--rounds", type=int, default=15, help="timed rounds (default 15), after two untimed")
    parser.add_argument("--steps", type=int, default=3, help="steps per timing (default 3)")
    parser.add_argument("--attentions", nargs="+", default=None, help="arms (default: the configuration's)")
    parser.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS),
                        help="fp32 and/or bf16 (autocast); default both")  # fmt: skip
    args = parser.parse_args(argv)
    settings = [(precision, layout) for layout in LAYOUTS for precision in PRECISIONS if precision in args.precisions]
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
        for precision, layout in settings:
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

    names = {"nchw": "NCHW", "channels_last": "CL"}
    label = [f"{p} {names[layout]}" for p, layout in settings]
    columns = [f"{name} ms" for name in label]
    columns += [f"{p}: CL/NCHW" for p in args.precisions]
    if len(args.precisions) == 2:
        columns += ["bf16/fp32 NCHW", "bf16/fp32 CL", "bf16 CL / fp32 NCHW"]
    if "none" in attentions:
        columns += [f"vs none, {name}" for name in label]
    print("| attention | " + " | ".join(columns) + " |")
    print("|---|" + "---:|" * len(columns))
    for a in attentions:
        cells = [f"{statistics.median(times[(a, *setting)]):.1f}" for setting in settings]
        cells += [f"{ratio((a, p, 'channels_last'), (a, p, 'nchw')):.2f}" for p in args.precisions]
        if len(args.precisions) == 2:
            pairs = [("bf16", "nchw", "fp32", "nchw"), ("bf16", "channels_last", "fp32", "channels_last"),
                     ("bf16", "channels_last", "fp32", "nchw")]  # fmt: skip
            cells += [f"{ratio((a, p, lp), (a, q, lq)):.2f}" for p, lp, q, lq in pairs]
        if "none" in attentions:
            cells += [f"{ratio((a, *setting), ('none', *setting)) - 1:+.1%}" for setting in settings]
        print(f"| {a} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
