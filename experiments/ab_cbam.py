"""CBAM's time inside a network, this checkout against an older commit, side by side in one process.

    python experiments/ab_cbam.py 875bd3c [--train] [--arch Unet] [--rounds 40]

The other commit's ``smp_cbam`` is exported with ``git archive``, renamed (package, extension and
``torch.ops`` namespace) and built beside this one. Each CBAM module of one model is wrapped in a
timer holding both versions with the same weights; forward passes (training steps with
``--train``) alternate between them, and the ratio of the summed CBAM time, per pair of passes, is
reported as a median. With ``--train`` the backward is timed too, between marks on the module's
output and input. Whole-step timings on a shared machine move by several percent between rounds;
this measures only the attention's own time, in place, with the caches as the network leaves them.
The commit must have the compiled kernels (``smp_cbam/attention/csrc``, earlier ``smp_cbam/csrc``).
"""

import argparse
import importlib
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

import torch
from torch import nn

from smp_cbam import CBAM
from smp_cbam.attention import kernels
from smp_cbam.benchmarks.cbam_bench import build_bench_model, infer_fn, paired_ratio, train_step_fn

ROOT = Path(__file__).resolve().parents[1]


def load_old(ref: str, into: Path) -> type[nn.Module]:
    """``smp_cbam.CBAM`` as of ``ref``, as the package ``smp_cbam_old`` with its own ops."""
    archive = subprocess.run(["git", "archive", ref, "smp_cbam"], cwd=ROOT, capture_output=True)
    if archive.returncode or not archive.stdout:
        raise SystemExit(f"cannot export smp_cbam at {ref!r}: {archive.stderr.decode().strip()}")
    with tarfile.open(fileobj=BytesIO(archive.stdout)) as tar:
        tar.extractall(into, filter="data")
    package = into / "smp_cbam_old"
    (into / "smp_cbam").rename(package)
    (package / "__init__.py").write_text("")  # no registration into smp
    # the attention modules sit in smp_cbam/attention/ since the package layout, before in smp_cbam/
    attention = "smp_cbam_old.attention" if (package / "attention").is_dir() else "smp_cbam_old"
    for path in [*package.rglob("*.py"), *package.rglob("cbam_cpu.cpp")]:
        # torch.ops.smp_cbam (the operators) and .smp_cbam_cpu (the C++ library, since the custom ops)
        text = path.read_text().replace("torch.ops.smp_cbam", "torch.ops.smp_cbam_old")
        text = text.replace("TORCH_LIBRARY(smp_cbam,", "TORCH_LIBRARY(smp_cbam_old,")
        text = text.replace("TORCH_LIBRARY(smp_cbam_cpu,", "TORCH_LIBRARY(smp_cbam_old_cpu,")
        text = text.replace('"smp_cbam::', '"smp_cbam_old::')
        text = text.replace('Library("smp_cbam",', 'Library("smp_cbam_old",')  # ops, since Library
        path.write_text(text.replace('name=f"smp_cbam_cpu_', 'name=f"smp_cbam_old_cpu_'))
    sys.path.insert(0, str(into))
    if not importlib.import_module(f"{attention}.kernels").available():
        raise SystemExit(f"the kernels of {ref} did not build")
    return importlib.import_module(f"{attention}.cbam").CBAM


class _Mark(torch.autograd.Function):
    """Identity; its backward adds the time since the output's mark to ``timer.seconds``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, timer: "_Timed", is_input: bool) -> torch.Tensor:
        ctx.timer, ctx.is_input = timer, is_input
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple:
        now = time.perf_counter()
        if ctx.is_input:
            ctx.timer.seconds += now - ctx.timer.backward_start
        else:
            ctx.timer.backward_start = now
        return grad, None, None


class _Timed(nn.Module):
    def __init__(self, new: nn.Module, old: nn.Module):
        super().__init__()
        self.new, self.old = new, old
        self.use_old, self.seconds, self.backward_start = False, 0.0, 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        track = torch.is_grad_enabled()
        if track:
            x = _Mark.apply(x, self, True)
        start = time.perf_counter()
        out = (self.old if self.use_old else self.new)(x)
        self.seconds += time.perf_counter() - start
        return _Mark.apply(out, self, False) if track else out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ref", help="the commit to compare with")
    parser.add_argument("--arch", default="Unet", choices=("Unet", "UnetPlusPlus"))
    parser.add_argument("--train", action="store_true", help="time training steps, backward included")
    parser.add_argument("--rounds", type=int, default=40, help="pairs of passes")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    # a bad ref is named before anything is built
    check = subprocess.run(
        ["git", "rev-parse", "--verify", "--quiet", f"{args.ref}^{{commit}}"], cwd=ROOT, capture_output=True
    )
    if check.returncode:
        raise SystemExit(f"cannot export smp_cbam at {args.ref!r}: not a commit of {ROOT}")
    if not kernels.available():
        raise SystemExit("this checkout's kernels did not build")
    with tempfile.TemporaryDirectory() as tmp:
        old_cbam = load_old(args.ref, Path(tmp))
        torch.manual_seed(0)
        model = build_bench_model(args.arch, "cbam")
        timers = []
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, CBAM):
                    old = old_cbam(child.channel.in_channels, inplace=child.inplace)
                    old.load_state_dict(child.state_dict())
                    timers.append(_Timed(child, old))
                    setattr(parent, name, timers[-1])
        # the benchmark's steps (section 2), which also set train or eval mode
        step = (train_step_fn if args.train else infer_fn)(model, 4, 160, torch.device("cpu"))
        step()
        times: dict[str, list[float]] = {"new": [], "old": []}
        for r in range(args.rounds):
            for version in ("new", "old") if r % 2 else ("old", "new"):
                for timer in timers:
                    timer.use_old, timer.seconds = version == "old", 0.0
                step()
                times[version].append(sum(t.seconds for t in timers))
    print(
        f"{args.arch} {'training step' if args.train else 'inference'}, CBAM time per pass: "
        f"this checkout {statistics.median(times['new']) * 1e3:.2f} ms, "
        f"{args.ref} {statistics.median(times['old']) * 1e3:.2f} ms, "
        f"paired ratio {paired_ratio(times, 'new', 'old'):.3f} ({args.rounds} rounds)"
    )


if __name__ == "__main__":
    main()
