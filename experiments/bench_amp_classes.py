"""bf16-autocast and fp32 overhead of CBAM and SCSE over no attention in a multi-class Unet.

``smp-cbam bench --sections amp`` times a one-class Unet with a BCE loss; this is the same
measurement (``interleaved_times``, ``paired_ratio``: each round calls every model once in shuffled
order, a ratio is the median over rounds of the ratio within a round) for a Unet resnet18 with
``--classes`` outputs and a cross-entropy loss, as in the training study. ``cbam_eager`` is CBAM's
fused eager path (``impl="fused"``), what ``impl="auto"`` ran under CPU autocast before the kernels
took bf16.

Usage: ``python experiments/bench_amp_classes.py [--batch 4] [--classes 11] [--rounds 15]``
(inference runs three times the rounds).
"""

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from smp_cbam.benchmarks.cbam_bench import build_bench_model, interleaved_times, paired_ratio  # noqa: E402


def train_fn(model: nn.Module, batch: int, size: int, classes: int, amp: bool) -> Callable[[], None]:
    """One SGD step; forward and loss under bf16 autocast with ``amp``, the backward outside it."""
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    generator = torch.Generator().manual_seed(0)
    image = torch.randn(batch, 3, size, size, generator=generator)
    target = torch.randint(0, classes, (batch, size, size), generator=generator)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(model(image).float(), target)
        loss.backward()
        optimizer.step()

    return step


def infer_fn(model: nn.Module, batch: int, size: int, classes: int, amp: bool) -> Callable[[], None]:
    model.eval()
    image = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))

    def infer() -> None:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            model(image)

    return infer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=160)
    parser.add_argument("--classes", type=int, default=11)
    parser.add_argument("--rounds", type=int, default=15, help="training rounds; inference runs 3x")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"Unet resnet18, batch {args.batch}, 3x{args.size}x{args.size}, {args.classes} classes, "
        f"{args.threads} thread(s); {args.rounds} train / {3 * args.rounds} inference rounds",
        flush=True,
    )
    for label, make, rounds in (("train", train_fn, args.rounds), ("inference", infer_fn, 3 * args.rounds)):
        for amp in (False, True):
            types = ["none", "scse", "cbam"] + (["cbam_eager"] if amp else [])
            fns = {}
            for attention in types:
                torch.manual_seed(0)
                model = build_bench_model("Unet", attention, classes=args.classes)
                fns[attention] = make(model, args.batch, args.size, args.classes, amp)
            start = time.time()
            times = interleaved_times(fns, rounds, torch.device("cpu"), warmup=1)
            ratios = "  ".join(f"{t}/none {paired_ratio(times, t, 'none'):.3f}" for t in types[1:])
            print(
                f"{label:<10} {'bf16 autocast' if amp else 'fp32':<14} "
                f"none {statistics.median(times['none']) * 1e3:7.1f} ms  {ratios}   ({time.time() - start:.0f} s)",
                flush=True,
            )


if __name__ == "__main__":
    main()
