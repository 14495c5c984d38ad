"""What CBAM adds to a compiled Unet's inference, through each form of its operator, side by side in
one process.

    python experiments/bench_compiled_inference.py [--rounds 40] [--batch 4] [--size 160] [--keep-heap] [--bf16]

smp's decoders build CBAM with ``inplace=True``, so the compiled ``cbam`` calls
``smp_cbam::cbam_infer_``, which writes over inductor's activation buffer as eager CBAM writes over
its input. The "functional operator" is ``smp_cbam::cbam_infer`` (CBAM with ``inplace=False``),
which returns a new tensor; both are tagged ``flexible_layout`` and read inductor's channels_last
activations as they are. The "NCHW operator" is the functional kernel behind an operator with
inductor's default layout constraint (the strides eager mode would give), which makes inductor copy
each CBAM's input into NCHW and its output back; the "formula" is CBAM's plain formula
(``impl="reference"``), which inductor compiles and fuses. The "floors" give every CBAM's place to a
cheaper attention of plain ops that inductor fuses into its neighbours: the "channel gate"
(``x * sigmoid(mean over the image)``, the least a global channel attention does) and the "two gates"
(CBAM's channel and pixel gates without the MLP and the 7x7 convolution, from means). What they add
to the compiled ``none`` approximates the least any CBAM, fused or not, could add to it (they do
less than CBAM, so they bound it only as far as the rounds' noise allows). The "no-op in-place
operator" takes CBAM's place with an operator that writes over its input and does nothing: what the
opaque operator costs the compiled graph before its kernel does any work. Every model is compiled
once (in the warm-up) and called in interleaved rounds; the table gives each model's median time and
the median over rounds of its time over ``none``'s in the same mode, as a percentage and
(``adds ms``) as the median of the per-round differences. ``--bf16`` runs every model under CPU bf16
autocast (compiled and eager CBAM then call the kernels on bfloat16 activations; the formula runs
its ops under autocast's rules). ``--keep-heap`` applies the runner's glibc malloc setting
(``smp_cbam.training.malloc``): with glibc's defaults every large buffer a call allocates is mapped
afresh and faulted in, which costs a graph that allocates more (a functional operator's outputs)
more. Inductor's caches are off, so that a graph compiled before an edit of an operator is not
reused.
"""

import argparse
import statistics

import torch
from torch import nn

from smp_cbam import CBAM
from smp_cbam.attention import kernels
from smp_cbam.benchmarks.cbam_bench import (
    bench_operator,
    build_bench_model,
    cbam_unet,
    infer_fn,
    interleaved_times,
    paired_ratio,
)
from smp_cbam.training.malloc import keep_heap


def _cbam_infer_nchw(
    x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    return kernels.cbam_infer(x.contiguous(), w1, None, w2, None, weight, bias, 1.0, 0.0, False, False)


# inductor's default layout constraint: it copies each CBAM's input into NCHW and the output back
cbam_infer_nchw = bench_operator(
    "smp_cbam_bench::cbam_infer_nchw",
    "(Tensor x, Tensor w1, Tensor w2, Tensor weight, Tensor bias) -> Tensor",
    _cbam_infer_nchw,
    lambda x, w1, w2, weight, bias: torch.empty_like(x, memory_format=torch.contiguous_format),
    flexible_layout=False,
)


class ChannelGateFloor(nn.Module):
    """The least any global channel attention does: a reduction over the image, then a scale.
    Plain ops, which inductor fuses into the neighbouring kernels (no MLP, no spatial gate)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(x.mean((2, 3), keepdim=True))


class TwoGatesFloor(nn.Module):
    """CBAM's two gates without the MLP and the 7x7 convolution: a channel gate from the mean over
    the image, then a pixel gate from the mean over the channels; plain ops, fused by inductor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * torch.sigmoid(x.mean((2, 3), keepdim=True))
        return x * torch.sigmoid(x.mean(1, keepdim=True))


# an operator that writes over x and does nothing: what the opaque in-place operator costs the
# compiled graph before its kernel does any work (dispatch, and the fusions inductor cannot make
# across it)
noop_ = bench_operator("smp_cbam_bench::noop_", "(Tensor(a!) x) -> ()", lambda x: None, lambda x: None)


class NoopOperator(nn.Module):
    """Every CBAM's place taken by the no-op in-place operator."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        noop_(x)
        return x


def with_floor(model: nn.Module, floor: type[nn.Module]) -> nn.Module:
    """``model`` with every CBAM replaced by ``floor()``."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, CBAM):
                setattr(module, name, floor())
    return model


class NchwOperatorCBAM(CBAM):
    """CBAM whose captured graph calls the NCHW-only operator (the layout before flexible_layout)."""

    def _forward_captured(self, x: torch.Tensor) -> torch.Tensor:
        first, _, second = self.channel.mlp
        conv = self.spatial.conv
        return cbam_infer_nchw(x, first.weight, second.weight, conv.weight, conv.bias)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=160)
    parser.add_argument(
        "--keep-heap",
        action="store_true",
        help="glibc: keep freed tensors' memory in the heap (smp_cbam.training.malloc.keep_heap)",
    )
    parser.add_argument("--bf16", action="store_true", help="under CPU bf16 autocast")
    args = parser.parse_args()
    if args.keep_heap and not keep_heap():
        raise SystemExit("--keep-heap needs glibc")
    if not kernels.available():
        raise SystemExit("the CPU kernels are not built")
    torch.set_num_threads(1)
    torch._inductor.config.force_disable_caches = True
    device = torch.device("cpu")

    def model(attention: str) -> torch.nn.Module:
        torch.manual_seed(0)
        return build_bench_model("Unet", attention)

    amp = torch.bfloat16 if args.bf16 else None

    def infer(model: torch.nn.Module) -> object:
        return infer_fn(model, args.batch, args.size, device, amp)

    fns = {
        "none eager": infer(model("none")),
        "cbam eager": infer(model("cbam")),
        "none compiled": infer(torch.compile(model("none"))),
        "cbam compiled": infer(torch.compile(model("cbam"))),
        "cbam compiled, NCHW operator": infer(torch.compile(cbam_unet(NchwOperatorCBAM))),
        "cbam compiled, formula": infer(torch.compile(cbam_unet(impl="reference"))),
        "cbam compiled, functional operator": infer(torch.compile(cbam_unet(inplace=False))),
        "floor: channel gate, eager": infer(with_floor(cbam_unet(), ChannelGateFloor)),
        "floor: channel gate, compiled": infer(torch.compile(with_floor(cbam_unet(), ChannelGateFloor))),
        "floor: two gates, compiled": infer(torch.compile(with_floor(cbam_unet(), TwoGatesFloor))),
        "no-op in-place operator, compiled": infer(torch.compile(with_floor(cbam_unet(), NoopOperator))),
    }
    times = interleaved_times(fns, args.rounds, device, warmup=2)
    print(
        f"Unet resnet18 inference, batch {args.batch}, 3x{args.size}x{args.size}, 1 thread, "
        f"{'bf16 autocast' if args.bf16 else 'fp32'}, median of {args.rounds} interleaved rounds, malloc {'keep_heap' if args.keep_heap else 'default'}"
    )
    print(f"{'model':<38}{'ms':>8}{'vs none (same mode)':>22}{'adds ms':>9}")
    for name, values in times.items():
        reference = "none compiled" if "compiled" in name else "none eager"
        ratio = paired_ratio(times, name, reference)
        added = statistics.median(a - b for a, b in zip(values, times[reference], strict=True)) * 1e3
        print(f"{name:<38}{statistics.median(values) * 1e3:8.1f}{100 * (ratio - 1):+21.1f}%{added:+9.1f}")


if __name__ == "__main__":
    main()
