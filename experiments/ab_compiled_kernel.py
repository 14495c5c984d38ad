"""Compiled Unet inference with CBAM through this tree's kernel and through the kernel source of
another commit, side by side in one process.

    python experiments/ab_compiled_kernel.py <commit> [--rounds 20] [--bf16]

The other commit's ``csrc/cbam_cpu.cpp`` is built under another library name and called through
an in-place operator of its own (as ``smp_cbam::cbam_infer_`` calls this tree's), so that both
kernels run inside the same compiled model, interleaved with compiled ``none`` and eager
``none``/``cbam`` (batch 4, 160x160, one thread, the runner's malloc setting). Prints each model's
median time, its overhead over ``none`` in the same mode (the median of the per-round ratios, and
in ms), and the paired ratio of the two compiled CBAM models.
"""

import argparse
import statistics
import subprocess
import tempfile
from pathlib import Path

import torch
from torch.utils.cpp_extension import load

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

ROOT = Path(__file__).resolve().parents[1]
SOURCE = "smp_cbam/attention/csrc/cbam_cpu.cpp"


def build_other(commit: str) -> None:
    """Builds ``commit``'s kernel source as the library ``smp_cbam_other``."""
    shown = subprocess.run(["git", "show", f"{commit}:{SOURCE}"], cwd=ROOT, capture_output=True, text=True)
    if shown.returncode != 0:
        raise SystemExit(f"cannot read {SOURCE} at {commit!r}: {shown.stderr.strip()}")
    folder = Path(tempfile.mkdtemp(prefix="smp_cbam_other_"))
    path = folder / "cbam_other.cpp"
    path.write_text(shown.stdout.replace("TORCH_LIBRARY(smp_cbam_cpu", "TORCH_LIBRARY(smp_cbam_other"))
    flags = ["-O3", "-ffp-contract=off", *kernels._capability_flags(torch.backends.cpu.get_cpu_capability())]
    load(name="smp_cbam_other", sources=[str(path)], extra_cflags=flags, is_python_module=False)


def _cbam_infer_other(
    x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor
) -> None:
    torch.ops.smp_cbam_other.cbam_infer(
        x, w1.contiguous(), None, w2.contiguous(), None, weight.contiguous(), bias, 1.0, 0.0, False, True
    )


cbam_infer_other_ = bench_operator(
    "smp_cbam_ab::cbam_infer_other_",
    "(Tensor(a!) x, Tensor w1, Tensor w2, Tensor weight, Tensor bias) -> ()",
    _cbam_infer_other,
    lambda x, w1, w2, weight, bias: None,
)


class OtherKernelCBAM(CBAM):
    """CBAM whose captured no-grad graph calls the other commit's kernel (the benchmark's CBAMs
    have no MLP biases and no residual)."""

    def _forward_captured(self, x: torch.Tensor) -> torch.Tensor:
        first, _, second = self.channel.mlp
        conv = self.spatial.conv
        cbam_infer_other_(x, first.weight, second.weight, conv.weight, conv.bias)
        return x


def none_unet() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_bench_model("Unet", "none")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("commit")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--bf16", action="store_true", help="under CPU bf16 autocast")
    args = parser.parse_args()
    if not kernels.available():
        raise SystemExit("the CPU kernels are not built")
    keep_heap()
    build_other(args.commit)
    torch.set_num_threads(1)
    torch._inductor.config.force_disable_caches = True
    amp = torch.bfloat16 if args.bf16 else None
    device = torch.device("cpu")
    with torch.no_grad():
        x = torch.randn(2, 3, 64, 64)
        ours, theirs = torch.compile(cbam_unet().eval())(x), torch.compile(cbam_unet(OtherKernelCBAM).eval())(x)
    print(f"largest difference of the two compiled CBAM models' outputs: {(ours - theirs).abs().max().item():.2e}")
    fns = {
        "none compiled": infer_fn(torch.compile(none_unet()), 4, 160, device, amp),
        "cbam compiled, this tree": infer_fn(torch.compile(cbam_unet()), 4, 160, device, amp),
        f"cbam compiled, {args.commit}": infer_fn(torch.compile(cbam_unet(OtherKernelCBAM)), 4, 160, device, amp),
        "none eager": infer_fn(none_unet(), 4, 160, device, amp),
        "cbam eager": infer_fn(cbam_unet(), 4, 160, device, amp),
    }
    times = interleaved_times(fns, args.rounds, device, warmup=2)
    print(
        f"Unet resnet18 inference, batch 4, 3x160x160, 1 thread, {'bf16 autocast' if amp else 'fp32'}, "
        f"keep_heap, median of {args.rounds} interleaved rounds"
    )
    for name, values in times.items():
        reference = "none eager" if "eager" in name else "none compiled"
        added = statistics.median(a - b for a, b in zip(values, times[reference], strict=True)) * 1e3
        ratio = paired_ratio(times, name, reference)
        print(f"{name:<34}{statistics.median(values) * 1e3:8.1f} ms{100 * (ratio - 1):+8.1f}%  ({added:+.1f} ms)")
    ratio = paired_ratio(times, "cbam compiled, this tree", f"cbam compiled, {args.commit}")
    print(f"this tree over {args.commit}, whole compiled model, paired: {ratio:.3f}")


if __name__ == "__main__":
    main()
