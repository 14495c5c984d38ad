"""What CBAM adds to a compiled Unet's inference, with the operator taking inductor's
channels_last activations against the same operator held to NCHW, side by side in one process.

    python experiments/bench_compiled_inference.py [--rounds 40] [--batch 4] [--size 160]

Inductor lays convolution activations out channels_last on CPU. ``smp_cbam::cbam_infer`` is
tagged ``flexible_layout`` and its kernel reads channels_last as it is; the "NCHW operator" below
is the same kernel behind an operator with inductor's default constraint (the strides eager mode
would give), which makes inductor copy each CBAM's input into NCHW and its output back; the
"formula" is CBAM's plain formula (``impl="reference"``), which inductor compiles and fuses. Every
model is compiled once (in the warm-up) and called in interleaved rounds; the table gives each
model's median time and the median over rounds of its time over ``none``'s in the same mode.
fp32 only: under autocast a compiled CBAM runs the formula (the operators have no autocast rule).
Inductor's caches are off, so that a graph compiled before an edit of the operator is not reused.
"""

import argparse
import statistics

import torch

from smp_cbam import CBAM
from smp_cbam.attention import kernels
from smp_cbam.benchmarks.cbam_bench import build_bench_model, infer_fn, interleaved_times, paired_ratio


@torch.library.custom_op("smp_cbam_bench::cbam_infer_nchw", mutates_args=(), device_types="cpu")
def cbam_infer_nchw(
    x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    return kernels.cbam_infer(x.contiguous(), w1, None, w2, None, weight, bias, 1.0, 0.0, False, False)


@cbam_infer_nchw.register_fake
def _(x, w1, w2, weight, bias):  # noqa: ANN001, ANN202
    return torch.empty_like(x, memory_format=torch.contiguous_format)


class NchwOperatorCBAM(CBAM):
    """CBAM whose captured graph calls the NCHW-only operator (the layout before flexible_layout)."""

    def _forward_captured(self, x: torch.Tensor) -> torch.Tensor:
        first, _, second = self.channel.mlp
        conv = self.spatial.conv
        return cbam_infer_nchw(x, first.weight, second.weight, conv.weight, conv.bias)


def nchw_operator_unet() -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_bench_model("Unet", "cbam")
    for module in model.modules():
        if isinstance(module, CBAM):
            module.__class__ = NchwOperatorCBAM
    return model


def formula_unet() -> torch.nn.Module:
    """CBAM as its formula (``impl="reference"``): inductor compiles and fuses its ops."""
    torch.manual_seed(0)
    model = build_bench_model("Unet", "cbam")
    for module in model.modules():
        if isinstance(module, CBAM):
            module.impl = "reference"
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=160)
    args = parser.parse_args()
    if not kernels.available():
        raise SystemExit("the CPU kernels are not built")
    torch.set_num_threads(1)
    torch._inductor.config.force_disable_caches = True
    device = torch.device("cpu")

    def model(attention: str) -> torch.nn.Module:
        torch.manual_seed(0)
        return build_bench_model("Unet", attention)

    fns = {
        "none eager": infer_fn(model("none"), args.batch, args.size, device),
        "cbam eager": infer_fn(model("cbam"), args.batch, args.size, device),
        "none compiled": infer_fn(torch.compile(model("none")), args.batch, args.size, device),
        "cbam compiled": infer_fn(torch.compile(model("cbam")), args.batch, args.size, device),
        "cbam compiled, NCHW operator": infer_fn(torch.compile(nchw_operator_unet()), args.batch, args.size, device),
        "cbam compiled, formula": infer_fn(torch.compile(formula_unet()), args.batch, args.size, device),
    }
    times = interleaved_times(fns, args.rounds, device, warmup=2)
    print(
        f"Unet resnet18 inference, batch {args.batch}, 3x{args.size}x{args.size}, 1 thread, "
        f"fp32, median of {args.rounds} interleaved rounds"
    )
    print(f"{'model':<32}{'ms':>8}{'vs none (same mode)':>22}")
    for name, values in times.items():
        reference = "none compiled" if "compiled" in name else "none eager"
        ratio = paired_ratio(times, name, reference)
        print(f"{name:<32}{statistics.median(values) * 1e3:8.1f}{100 * (ratio - 1):+21.1f}%")


if __name__ == "__main__":
    main()
