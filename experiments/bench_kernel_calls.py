"""CBAM's training kernels as the benchmark Unet calls them inside a training step: each of the nine
CBAMs' ``cbam_train`` and ``cbam_backward`` call timed in place, in the eager model (NCHW), the
eager model moved to channels_last, and the compiled model (inductor hands the operators
channels_last activations), with the layout each call received.

    python experiments/bench_kernel_calls.py [--steps 8] [--batch 4] [--size 160] [--bf16]
        [--modes eager channels_last compiled]

Kernel-level benchmarks (``bench_layout_kernel.py``) call the kernels on their own, with the caches
flushed; inside a network the activations arrive from the layer that just wrote them, and the
two can differ (the channels_last kernels at 16 channels, for one). The models' steps are
interleaved, each round one step of each model in shuffled order, after three warm-up steps (the
compiled model compiles in the first); the table gives each call's median over the rounds and
sums the medians.
"""

import argparse
import collections
import random
import statistics
import time

import torch

from smp_cbam.attention import kernels
from smp_cbam.attention.ops import _channels_last
from smp_cbam.benchmarks.cbam_bench import build_bench_model, train_step_fn
from smp_cbam.training.malloc import keep_heap


def layout(t: torch.Tensor) -> str:
    if _channels_last(t):  # the kernels' own test, so that "cl" is what they took as channels_last
        return "cl"
    return "nchw" if t.is_contiguous() else "other"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=160)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast, as the runner's bf16-mixed")
    parser.add_argument(
        "--modes",
        nargs="+",
        default=["eager", "channels_last", "compiled"],
        choices=["eager", "channels_last", "compiled"],
    )
    args = parser.parse_args()
    if not kernels.available():
        raise SystemExit("the CPU kernels are not built")
    torch.set_num_threads(1)
    keep_heap()
    times: dict[tuple, list[float]] = collections.defaultdict(list)
    current = {"mode": ""}  # the model whose step is running
    train, backward = kernels.cbam_train, kernels.cbam_backward

    def timed_train(x: torch.Tensor, *rest: object) -> kernels.TrainForward:
        start = time.perf_counter()
        out = train(x, *rest)
        times[(current["mode"], "forward", tuple(x.shape), layout(x), "")].append(time.perf_counter() - start)
        return out

    def timed_backward(grad: torch.Tensor, x: torch.Tensor, *rest: object) -> kernels.TrainGrads:
        start = time.perf_counter()
        out = backward(grad, x, *rest)
        key = (current["mode"], "backward", tuple(x.shape), layout(x), layout(grad))
        times[key].append(time.perf_counter() - start)
        return out

    # CBAM's eager path and the operators' CPU implementations look the kernels up on the module
    kernels.cbam_train, kernels.cbam_backward = timed_train, timed_backward
    amp = torch.bfloat16 if args.bf16 else None
    print(
        f"CBAM's kernel calls in a Unet training step, batch {args.batch}, {args.size}x{args.size}, "
        f"{'bf16 autocast' if amp else 'fp32'}"
    )
    steps = {}
    for mode in args.modes:
        torch.manual_seed(0)
        model = build_bench_model("Unet", "cbam")
        if mode == "channels_last":
            model = model.to(memory_format=torch.channels_last)
        if mode == "compiled":
            model = torch.compile(model)
        steps[mode] = train_step_fn(model, args.batch, args.size, torch.device("cpu"), amp=amp)
        for _ in range(3):
            steps[mode]()
    times.clear()
    order = list(args.modes)
    rng = random.Random(0)
    for _ in range(args.steps):
        rng.shuffle(order)
        for mode in order:
            current["mode"] = mode
            steps[mode]()
    for mode in args.modes:
        print(f"== {mode}")
        totals = collections.Counter()
        for key in sorted((k for k in times if k[0] == mode), key=lambda k: (k[1], -k[2][1])):
            _, kind, shape, x_layout, grad_layout = key
            median = statistics.median(times[key]) * 1e3
            totals[kind] += median
            grad = f"grad {grad_layout}" if grad_layout else ""
            print(f"{kind:<9}{str(shape):<22}x {x_layout:<6}{grad:<11}{median:8.3f} ms")
        print(f"{'sum':<31}{'':<17}forward {totals['forward']:.2f} ms, backward {totals['backward']:.2f} ms")


if __name__ == "__main__":
    main()
