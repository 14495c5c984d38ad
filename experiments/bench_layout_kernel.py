"""The no-grad CBAM kernel on channels_last input (what a compiled graph hands it) against the same
kernel on NCHW input (eager mode), at the shapes of the benchmark Unet's nine CBAMs, side by side
in one process; with ``--train``, the training forward and backward kernels instead.

    python experiments/bench_layout_kernel.py [--rounds 30] [--batch 4] [--size 160] [--bf16] [--train]

Each no-grad call writes over its input (``inplace=True``, as smp's decoders build CBAM); before
each call the input is restored and a 16 MiB buffer is written, so that ``x`` comes from the
last-level cache rather than L1/L2, as inside a network. A training call runs ``cbam_train`` and
then ``cbam_backward`` with a gradient in the same layout. The table gives each layout's median
time per shape and the median over rounds of channels_last's time over NCHW's in the same round;
the last row sums the nine.
"""

import argparse
import random
import statistics
import time

import torch

from smp_cbam import CBAM
from smp_cbam.attention import kernels
from smp_cbam.benchmarks.cbam_bench import build_bench_model


def cbam_inputs(batch: int, size: int) -> list[tuple[CBAM, tuple[int, ...]]]:
    """Each CBAM of the benchmark Unet with the shape of its input."""
    torch.manual_seed(0)
    model = build_bench_model("Unet", "cbam").eval()
    found: list[tuple[CBAM, tuple[int, ...]]] = []
    hooks = [
        module.register_forward_pre_hook(lambda module, args: found.append((module, tuple(args[0].shape))))
        for module in model.modules()
        if isinstance(module, CBAM)
    ]
    with torch.no_grad():
        model(torch.randn(batch, 3, size, size))
    for hook in hooks:
        hook.remove()
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=160)
    parser.add_argument("--bf16", action="store_true", help="bfloat16 activations, as under CPU autocast")
    parser.add_argument("--train", action="store_true", help="the training forward and backward kernels")
    args = parser.parse_args()
    if not kernels.available():
        raise SystemExit("the CPU kernels are not built")
    torch.set_num_threads(1)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    calls = {}
    for i, (module, shape) in enumerate(cbam_inputs(args.batch, args.size)):
        first, _, second = module.channel.mlp
        conv = module.spatial.conv
        params = [t.detach().float() for t in (first.weight, second.weight, conv.weight, conv.bias)]
        x = torch.randn(shape).to(dtype)
        grad = torch.randn(shape).to(dtype)
        for layout, fmt in (("nchw", torch.contiguous_format), ("channels_last", torch.channels_last)):
            tensor, g = x.contiguous(memory_format=fmt), grad.contiguous(memory_format=fmt)

            def call(t: torch.Tensor = tensor, g: torch.Tensor = g, p: list[torch.Tensor] = params) -> None:
                if args.train:
                    saved = kernels.cbam_train(t, p[0], None, p[1], None, p[2], p[3], False)
                    kernels.cbam_backward(g, t, saved, p[0], p[1], p[2], False, True)
                else:
                    kernels.cbam_infer(t, p[0], None, p[1], None, p[2], p[3], 1.0, 0.0, False, True)

            calls[(i, shape, layout)] = (call, tensor, tensor.clone(memory_format=torch.preserve_format))
    flush = torch.empty(4 * 1024 * 1024)
    times: dict[tuple, list[float]] = {key: [] for key in calls}
    order = list(calls.items())
    rng = random.Random(0)
    for round_ in range(args.rounds + 2):
        rng.shuffle(order)
        for key, (call, tensor, original) in order:
            tensor.copy_(original)  # the call wrote over it
            flush.fill_(1.0)
            start = time.perf_counter()
            call()
            if round_ >= 2:  # two warm-up rounds
                times[key].append(time.perf_counter() - start)
    kind = "training forward and backward kernels" if args.train else "no-grad kernel, in place"
    print(f"CBAM {kind}, {'bf16' if args.bf16 else 'fp32'}, 1 thread, median of {args.rounds} interleaved rounds")
    print(f"{'shape':<22}{'NCHW ms':>10}{'channels_last ms':>18}{'ratio':>8}")
    shapes = sorted({(i, shape) for i, shape, _ in calls})
    total = {"nchw": [0.0] * args.rounds, "channels_last": [0.0] * args.rounds}
    for i, shape in shapes:
        nchw, cl = times[(i, shape, "nchw")], times[(i, shape, "channels_last")]
        for r in range(args.rounds):
            total["nchw"][r] += nchw[r]
            total["channels_last"][r] += cl[r]
        ratio = statistics.median(a / b for a, b in zip(cl, nchw, strict=True))
        print(f"{str(shape):<22}{statistics.median(nchw) * 1e3:10.3f}{statistics.median(cl) * 1e3:18.3f}{ratio:8.2f}")
    ratio = statistics.median(a / b for a, b in zip(total["channels_last"], total["nchw"], strict=True))
    print(
        f"{'all nine':<22}{statistics.median(total['nchw']) * 1e3:10.3f}"
        f"{statistics.median(total['channels_last']) * 1e3:18.3f}{ratio:8.2f}"
    )


if __name__ == "__main__":
    main()
