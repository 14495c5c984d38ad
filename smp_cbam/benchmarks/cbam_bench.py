"""Benchmark of the fast CBAM: module cost, training-step overhead, peak memory, params and MACs,
mixed precision and torch.compile.

Every timing is interleaved (one call of each contender per round, in one process) and reported
as a median over rounds, so that a noisy machine moves all contenders alike.
``python experiments/bench_cbam.py --help`` lists the options.
"""

import argparse
import ctypes
import functools
import gc
import math
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

import numpy as np
import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from scipy import stats
from segmentation_models_pytorch.base.modules import SCSEModule
from timm.layers.cbam import CbamModule
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from ..attention import CBAM
from ..report.stats import bootstrap_rng
from ..training.malloc import keep_heap

MODULE_SHAPES = ((8, 64, 128, 128), (8, 256, 32, 32), (4, 16, 256, 256))
STEP_TYPES = ("none", "scse", "cbam", "cbam_eager", "cbam_plain")
TABLE_TYPES = ("none", "scse", "cbam", "cbam_channel", "cbam_spatial", "se", "eca")
ARCHS = {"Unet": smp.Unet, "UnetPlusPlus": smp.UnetPlusPlus}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_times(
    fns: dict[str, Callable[[], object]], rounds: int, device: torch.device, warmup: int = 1
) -> dict[str, list[float]]:
    """Seconds per call of each function, calling each once per round for ``rounds`` rounds.

    The order is shuffled every round (seeded), so that no contender always follows the same one
    (the allocator and cache state a call leaves behind can speed up or slow down the next).
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    order = list(fns.items())
    rng = random.Random(0)
    for _ in range(rounds):
        rng.shuffle(order)
        for name, fn in order:
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def paired_ratio(times: dict[str, list[float]], name: str, reference: str) -> float:
    """Median over rounds of ``name``'s time over ``reference``'s time in the same round.

    Pairing by round cancels the machine's slow drifts, which shift both times alike.
    """
    return statistics.median(a / b for a, b in zip(times[name], times[reference], strict=True))


def _geomean(values: Sequence[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def build_bench_model(arch: str, attention: str, **kwargs: object) -> nn.Module:
    """A resnet18 ``arch`` with random weights.

    ``cbam_eager`` is CBAM's eager fused path (``impl="fused"``), ``cbam_plain`` the formula
    (``impl="reference"``).
    """
    name = "cbam" if attention in ("cbam_eager", "cbam_plain") else attention
    model = ARCHS[arch](
        encoder_name="resnet18",
        encoder_weights=None,
        decoder_attention_type=None if name == "none" else name,
        **kwargs,
    )
    impl = {"cbam_eager": "fused", "cbam_plain": "reference"}.get(attention, "auto")
    for module in model.modules():
        if isinstance(module, CBAM):
            module.impl = impl
    return model


def bench_operator(
    qualname: str,
    schema: str,
    cpu: Callable[..., object],
    fake: Callable[..., object],
    flexible_layout: bool = True,
) -> torch._ops.OpOverload:
    """A CPU operator for a benchmark's contender (``qualname`` "namespace::name", a namespace of
    its own), defined as smp_cbam's operators are (``smp_cbam.attention.ops``: torch.library.Library),
    so that every contender pays the same dispatch; without ``flexible_layout`` inductor hands it
    the strides eager mode would. The Library lives as long as the process."""
    namespace, name = qualname.split("::")
    lib = torch.library.Library(namespace, "FRAGMENT")  # several operators may share a namespace
    lib.define(f"{name}{schema}", tags=(torch.Tag.flexible_layout,) if flexible_layout else ())
    lib.impl(name, cpu, "CPU")
    torch.library.register_fake(qualname, fake, lib=lib)
    _BENCH_LIBRARIES.append(lib)
    return getattr(getattr(torch.ops, namespace), name).default


_BENCH_LIBRARIES: list[torch.library.Library] = []  # a Library's registrations end with the object


def cbam_unet(cls: type[CBAM] = CBAM, impl: str = "auto", inplace: bool = True) -> nn.Module:
    """The benchmark's CBAM Unet (seed 0) with every CBAM of class ``cls`` (a subclass that calls
    another operator in captured graphs), implementation ``impl`` (``"reference"``: the formula,
    which inductor compiles and fuses) and ``inplace`` (smp's decoders build CBAM in place)."""
    torch.manual_seed(0)
    model = build_bench_model("Unet", "cbam")
    for module in model.modules():
        if isinstance(module, CBAM):
            module.__class__ = cls
            module.impl = impl
            module.inplace = inplace
    return model


def module_benchmark(shapes: Sequence[tuple[int, ...]], rounds: int, device: torch.device) -> str:
    """Forward + backward of one attention module per shape, against timm, SCSE and a copy.

    ``eager`` is the fast CBAM without its compiled kernels, ``plain`` the formula.
    """
    names = ("eager", "plain", "timm", "scse", "copy")
    lines = [
        "## 1. module forward+backward (median ms; fast CBAM over each, median of paired rounds)",
        f"{'shape':<20}{'cbam':>8}" + "".join(f"{n:>8}" for n in names) + "".join(f"{'/' + n:>7}" for n in names),
    ]
    ratios: dict[str, list[float]] = {name: [] for name in names}
    for shape in shapes:
        channels = shape[1]
        torch.manual_seed(0)
        modules = {
            "cbam": CBAM(channels),
            "eager": CBAM(channels, impl="fused"),
            "plain": CBAM(channels, impl="reference"),
            "timm": CbamModule(channels),
            "scse": SCSEModule(channels),
        }
        x = torch.randn(shape, device=device, requires_grad=True)
        grad = torch.randn(shape, device=device)
        buffer = torch.empty(shape, device=device)

        def step(module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> None:
            module(x).backward(grad)
            x.grad = None

        fns: dict[str, Callable[[], object]] = {
            name: functools.partial(step, module.to(device), x, grad) for name, module in modules.items()
        }
        fns["copy"] = functools.partial(buffer.copy_, x.detach())
        times = interleaved_times(fns, rounds, device)
        ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        for name in ratios:
            ratios[name].append(paired_ratio(times, "cbam", name))
        lines.append(
            f"{str(shape):<20}{ms['cbam']:8.2f}"
            + "".join(f"{ms[n]:8.2f}" for n in names)
            + "".join(f"{ratios[n][-1]:7.2f}" for n in names)
        )
    lines.append(f"{'geometric mean':<68}" + "".join(f"{_geomean(r):7.2f}" for r in ratios.values()))
    return "\n".join(lines)


def train_step_fn(
    model: nn.Module, batch: int, size: int, device: torch.device, amp: torch.dtype | None = None
) -> Callable[[], object]:
    """One SGD step; with ``amp``, forward and loss under autocast to that dtype (as Lightning's
    ``bf16-mixed``/``16-mixed`` do), the backward outside it."""
    model.to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    image = torch.randn(batch, 3, size, size, device=device)
    target = torch.randint(0, 2, (batch, 1, size, size), device=device).float()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            loss = F.binary_cross_entropy_with_logits(model(image).float(), target)
        loss.backward()
        optimizer.step()

    return step


def infer_fn(
    model: nn.Module, batch: int, size: int, device: torch.device, amp: torch.dtype | None = None
) -> Callable[[], object]:
    model.to(device).eval()
    image = torch.randn(batch, 3, size, size, device=device)

    def infer() -> None:
        with torch.no_grad(), torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            model(image)

    return infer


INFERENCE_ROUNDS = 3  # times the training rounds: an inference step costs about a third


def step_benchmark(rounds: int, device: torch.device, batch: int = 4, size: int = 160) -> str:
    """Training-step and inference overhead of each attention type over none."""
    lines = [
        f"## 2. step overhead over none (resnet18, batch {batch}, 3x{size}x{size}, SGD; "
        f"median over {rounds} interleaved rounds, {INFERENCE_ROUNDS * rounds} for inference, "
        "of the time over none's in the same round)",
        f"{'setting':<22}{'none ms':>9}" + "".join(f"{t:>12}" for t in STEP_TYPES[1:]),
    ]
    settings = [(f"{arch} train", arch, train_step_fn, rounds) for arch in ARCHS]
    settings.append(("Unet inference", "Unet", infer_fn, INFERENCE_ROUNDS * rounds))
    for label, arch, make, setting_rounds in settings:
        fns = {}
        for attention in STEP_TYPES:
            torch.manual_seed(0)
            fns[attention] = make(build_bench_model(arch, attention), batch, size, device)
        times = interleaved_times(fns, setting_rounds, device, warmup=1)
        lines.append(
            f"{label:<22}{statistics.median(times['none']) * 1e3:9.1f}"
            + "".join(f"{100 * (paired_ratio(times, t, 'none') - 1):+11.1f}%" for t in STEP_TYPES[1:])
        )
    return "\n".join(lines)


AMP_TYPES = ("none", "scse", "cbam", "cbam_plain")


def amp_dtype(device: torch.device) -> torch.dtype:
    """Autocast's half-precision dtype for the benchmark: bf16 on CPU, fp16 on CUDA."""
    return torch.bfloat16 if device.type == "cpu" else torch.float16


def amp_benchmark(rounds: int, device: torch.device, batch: int = 4, size: int = 160) -> str:
    """Unet training-step and inference overhead over none, in fp32 and under autocast.

    ``cbam_plain`` is the formula (what CBAM ran under autocast before its fused path took
    autocast); the last column is none's autocast time over its fp32 time in the same round.
    Below the table, SCSE's and CBAM's overheads with 95% intervals of their medians, by which
    a target such as "CBAM adds <= 5%" holds or not beyond the rounds' noise.
    """
    dtype = amp_dtype(device)
    amp_name = str(dtype).removeprefix("torch.")
    lines = [
        f"## 5. mixed precision: step overhead over none (Unet resnet18, batch {batch}, 3x{size}x{size}; "
        f"median over {rounds} interleaved rounds, {INFERENCE_ROUNDS * rounds} for inference)",
        f"{'setting':<30}{'none ms':>9}" + "".join(f"{t:>12}" for t in AMP_TYPES[1:]) + f"{'none amp/fp32':>15}",
    ]
    intervals = [f"95% bootstrap intervals of the median overheads (none below {MIN_ROUNDS_FOR_INTERVAL} rounds):"]
    for label, make, setting_rounds in (
        ("train", train_step_fn, rounds),
        ("inference", infer_fn, INFERENCE_ROUNDS * rounds),
    ):
        for amp in (None, dtype):
            fns = {}
            for attention in AMP_TYPES:
                torch.manual_seed(0)
                fns[attention] = make(build_bench_model("Unet", attention), batch, size, device, amp)
            if amp is not None:
                torch.manual_seed(0)
                fns["fp32"] = make(build_bench_model("Unet", "none"), batch, size, device)
            times = interleaved_times(fns, setting_rounds, device, warmup=1)
            speed = f"{paired_ratio(times, 'none', 'fp32'):15.2f}" if amp is not None else ""
            setting = f"Unet {label} {amp_name + ' autocast' if amp else 'fp32'}"
            lines.append(
                f"{setting:<30}{statistics.median(times['none']) * 1e3:9.1f}"
                + "".join(f"{100 * (paired_ratio(times, t, 'none') - 1):+11.1f}%" for t in AMP_TYPES[1:])
                + speed
            )
            intervals.append(f"{setting}: {_overhead_cells(times, ('scse', 'cbam'))}")
    return "\n".join([*lines, *intervals])


def _overhead_cells(times: dict[str, list[float]], names: Sequence[str]) -> str:
    """Each of ``names``' overhead over ``none`` with its 95% interval (``median_interval`` of the
    per-round ratios), as ``cbam +5.5% [+5.0, +6.1]``."""
    cells = []
    for name in names:
        ratios = [100 * (a / b - 1) for a, b in zip(times[name], times["none"], strict=True)]
        cells.append(f"{name} {_gap_cell(*median_interval(ratios), '%')}")
    return "; ".join(cells)


COMPILE_TYPES = ("none", "scse", "cbam")
MIN_ROUNDS_FOR_INTERVAL = 8  # below this, a bootstrap interval of a median over rounds means little


def median_interval(values: Sequence[float], confidence: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """The median of per-round ``values`` and a percentile bootstrap interval of it, ``(median, low,
    high)``; the interval is NaN below ``MIN_ROUNDS_FOR_INTERVAL`` values."""
    values = np.asarray(values, dtype=float)
    median = float(np.median(values))
    if len(values) < MIN_ROUNDS_FOR_INTERVAL:
        return median, math.nan, math.nan
    if np.ptp(values) == 0:  # scipy refuses a degenerate sample; its interval is the point
        return median, median, median
    result = stats.bootstrap(
        (values,), np.median, confidence_level=confidence, method="percentile", **bootstrap_rng(seed)
    )
    return median, float(result.confidence_interval.low), float(result.confidence_interval.high)


def compile_gap(times: dict[tuple[str, bool], list[float]], attention: str) -> dict[str, float]:
    """What ``attention`` adds compiled minus what it adds eager, per round, in two readings.

    ``times[attention, compiled]`` holds one time in seconds per interleaved round for each model,
    compiled and eager, ``none`` among them. Per round: ``ms``, the milliseconds ``attention`` adds
    over ``none`` compiled minus those it adds eager; ``points``, its share of ``none``'s time
    compiled minus eager, in percentage points. Each is the median over rounds with a 95% interval
    (``median_interval``: ``ms_low``/``ms_high``, ``points_low``/``points_high``). Positive: the
    attention costs more compiled than eager.
    """

    def per_round(compiled: bool) -> tuple[np.ndarray, np.ndarray]:
        a = np.asarray(times[attention, compiled])
        base = np.asarray(times["none", compiled])
        return (a - base) * 1e3, (a / base - 1) * 100

    ms_compiled, points_compiled = per_round(True)
    ms_eager, points_eager = per_round(False)
    out: dict[str, float] = {}
    for name, values in (("ms", ms_compiled - ms_eager), ("points", points_compiled - points_eager)):
        out[name], out[f"{name}_low"], out[f"{name}_high"] = median_interval(values)
    return out


def _gap_cell(value: float, low: float, high: float, unit: str) -> str:
    """``+5.5% [+5.0, +6.1]`` for unit "%" (" ms": ``+0.8 ms [...]``); no interval where it is NaN."""
    interval = f" [{low:+.1f}, {high:+.1f}]" if not math.isnan(low) else ""
    return f"{value:+.1f}{unit}{interval}"


def compile_benchmark(
    rounds: int,
    device: torch.device,
    batch: int = 4,
    size: int = 160,
    backend: str = "inductor",
    amp: torch.dtype | None = None,
) -> str:
    """``torch.compile`` of the whole Unet (``backend``, inductor by default) for none, scse and
    cbam, next to the same models in eager mode, all interleaved: what each attention adds
    compiled and eager; with ``amp``, everything under autocast to that dtype.

    Below each setting's rows, per attention, what it adds compiled minus what it adds eager
    (``compile_gap``): in milliseconds and in points of ``none``'s time, each the median over rounds
    and, from ``MIN_ROUNDS_FOR_INTERVAL`` rounds, its 95% bootstrap interval; an interval above zero
    says compiling makes the attention costlier.
    """
    precision = f"{str(amp).removeprefix('torch.')} autocast" if amp is not None else "fp32"
    lines = [
        f"## 6. torch.compile ({backend}) of the whole Unet, {precision}: overhead over none (resnet18, "
        f"batch {batch}, 3x{size}x{size}; median over {rounds} interleaved rounds, {INFERENCE_ROUNDS * rounds} "
        "for inference; compilation in the warm-up)",
        f"{'setting':<34}{'mode':<10}{'none ms':>9}" + "".join(f"{t:>10}" for t in COMPILE_TYPES[1:]),
    ]
    for label, make, setting_rounds in (
        ("Unet train", train_step_fn, rounds),
        ("Unet inference", infer_fn, INFERENCE_ROUNDS * rounds),
    ):
        fns = {}
        for attention in COMPILE_TYPES:
            for compiled in (False, True):
                torch.manual_seed(0)
                model = build_bench_model("Unet", attention)
                model = torch.compile(model, backend=backend) if compiled else model
                fns[attention, compiled] = make(model, batch, size, device, amp)
        times = interleaved_times(fns, setting_rounds, device, warmup=2)
        label = f"{label} {precision}"
        for compiled in (True, False):
            by_type = {t: times[t, compiled] for t in COMPILE_TYPES}
            lines.append(
                f"{label:<34}{'compiled' if compiled else 'eager':<10}{statistics.median(by_type['none']) * 1e3:9.1f}"
                + "".join(f"{100 * (paired_ratio(by_type, t, 'none') - 1):+9.1f}%" for t in COMPILE_TYPES[1:])
            )
        for attention in COMPILE_TYPES[1:]:
            gap = compile_gap(times, attention)
            lines.append(
                f"{label:<34}{attention} compiled minus eager: "
                f"{_gap_cell(gap['ms'], gap['ms_low'], gap['ms_high'], ' ms')}, "
                f"{_gap_cell(gap['points'], gap['points_low'], gap['points_high'], ' points')}"
            )
    return "\n".join(lines)


PROCESS_TYPES = ("none", "scse", "cbam")


def process_step_ms(arch: str, attention: str, heap: bool, steps: int, batch: int, size: int, warmup: int = 2) -> float:
    """Median ms of a training step in this process; ``heap`` applies ``keep_heap`` first."""
    if heap and not keep_heap():
        raise RuntimeError("keep_heap needs glibc")
    torch.manual_seed(0)
    step = train_step_fn(build_bench_model(arch, attention), batch, size, torch.device("cpu"))
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def in_fresh_process(*args: object) -> float:
    code = (
        "import torch; from smp_cbam.benchmarks.cbam_bench import process_step_ms; "
        f"torch.set_num_threads({torch.get_num_threads()}); print(process_step_ms{args!r})"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"benchmark subprocess failed:\n{done.stderr}")
    return float(done.stdout.split()[-1])


def process_benchmark(rounds: int, steps: int, batch: int = 4, size: int = 160) -> str:
    """Training-step overhead with each model alone in a fresh process, per malloc setting.

    A real training process runs one model, so its allocator state is that model's own; in the
    interleaved benchmark all models share one heap. Each round starts one process per attention
    type and setting (glibc defaults, ``keep_heap``) in shuffled order.
    """
    lines = [
        f"## 2b. training-step overhead over none, each model alone in a fresh CPU process "
        f"(median over {rounds} rounds of per-round ratios; {steps} steps each)",
        f"{'setting':<22}{'malloc':<11}{'none ms':>9}" + "".join(f"{t:>9}" for t in PROCESS_TYPES[1:]),
    ]
    rng = random.Random(0)
    for arch in ARCHS:
        jobs = [(attention, heap) for attention in PROCESS_TYPES for heap in (False, True)]
        times: dict[tuple[str, bool], list[float]] = {job: [] for job in jobs}
        for _ in range(rounds):
            rng.shuffle(jobs)
            for attention, heap in jobs:
                ms = in_fresh_process(arch, attention, heap, steps, batch, size)
                times[attention, heap].append(ms)
        for heap in (False, True):
            by_type = {t: times[t, heap] for t in PROCESS_TYPES}
            lines.append(
                f"{arch + ' train':<22}{'keep_heap' if heap else 'default':<11}"
                f"{statistics.median(by_type['none']):9.1f}"
                + "".join(f"{100 * (paired_ratio(by_type, t, 'none') - 1):+8.1f}%" for t in PROCESS_TYPES[1:])
            )
    return "\n".join(lines)


class _MallocPeak(TorchDispatchMode):
    """Peak of glibc's in-use heap bytes (``mallinfo2``), sampled after every dispatched op."""

    class _MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd",
            "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost",
        )]  # fmt: skip

    def __init__(self) -> None:
        super().__init__()
        self._mallinfo2 = ctypes.CDLL(None).mallinfo2
        self._mallinfo2.restype = self._MallInfo2
        self.start = self.peak = self.in_use()

    def in_use(self) -> int:
        info = self._mallinfo2()
        return info.uordblks + info.hblkhd

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, self.in_use())
        return out


def peak_memory_of_step(arch: str, attention: str, device: torch.device, batch: int = 4, size: int = 160) -> float:
    """MiB a training step needs above what is live before it (after a warm-up step).

    CUDA: ``torch.cuda.max_memory_allocated``; CPU: glibc's in-use bytes sampled after each op.
    """
    torch.manual_seed(0)
    step = train_step_fn(build_bench_model(arch, attention), batch, size, device)
    step()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        step()
        return (torch.cuda.max_memory_allocated(device) - start) / 2**20
    with _MallocPeak() as tracker:
        step()
    return (tracker.peak - tracker.start) / 2**20


def memory_benchmark(device: torch.device, batch: int = 4, size: int = 160) -> str:
    """Peak memory of a training step per attention type."""
    how = "torch.cuda.max_memory_allocated" if device.type == "cuda" else "glibc mallinfo2, per op"
    lines = [f"## 3. peak memory of a training step above its start, MiB ({how}; batch {batch}, 3x{size}x{size})"]
    lines.append(f"{'arch':<14}" + "".join(f"{t:>12}" for t in STEP_TYPES))
    for arch in ARCHS:
        peaks = [peak_memory_of_step(arch, attention, device, batch, size) for attention in STEP_TYPES]
        lines.append(f"{arch:<14}" + "".join(f"{p:12.1f}" for p in peaks))
    return "\n".join(lines)


def params_and_macs(arch: str, attention: str, size: int = 256) -> tuple[int, float]:
    """Parameters and forward multiply-accumulates (FlopCounterMode flops / 2) of one model.

    CBAM is counted by its plain formula: FlopCounterMode does not see inside the CPU kernels.
    """
    model = build_bench_model(arch, "cbam_plain" if attention == "cbam" else attention).eval()
    params = sum(p.numel() for p in model.parameters())
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.randn(1, 3, size, size))
    return params, counter.get_total_flops() / 2


def table(size: int = 256) -> str:
    """Parameters and GMACs of each attention type in Unet and Unet++ (resnet18)."""
    lines = [
        f"## 4. parameters and MACs (resnet18, 1x3x{size}x{size}; MACs = FlopCounterMode / 2)",
        f"{'attention':<14}" + "".join(f"{a + ' params':>22}{'GMACs':>9}" for a in ARCHS),
    ]
    for attention in TABLE_TYPES:
        cells = ""
        for arch in ARCHS:
            params, macs = params_and_macs(arch, attention, size)
            cells += f"{params:22,d}{macs / 1e9:9.3f}"
        lines.append(f"{attention:<14}{cells}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print its report."""
    parser = argparse.ArgumentParser(
        prog="smp-cbam bench",
        description=" ".join(__doc__.split("\n\n")[0].split()),
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="rounds per timing (default: 11 for modules, 12 for steps; 3, 2 with --quick)",
    )
    parser.add_argument("--quick", action="store_true", help="few rounds, small shapes")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="default: cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own count)")
    parser.add_argument(
        "--keep-heap",
        action="store_true",
        help="glibc: keep freed tensors' memory in the heap (smp_cbam.training.malloc.keep_heap)",
    )
    parser.add_argument(
        "--sections",
        default="module,step,process,memory,table",
        help="comma-separated subset of module,step,process,memory,table,amp,compile "
        "(default: module,step,process,memory,table; amp and compile run only when named; both: compile "
        "in fp32 and under autocast)",
    )
    args = parser.parse_args(argv)
    for name in ("repeats", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available")
    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.keep_heap and not keep_heap():
        parser.error("--keep-heap needs glibc")
    sections = set(args.sections.split(","))
    unknown = sections - {"module", "step", "process", "memory", "table", "amp", "compile"}
    if unknown:
        parser.error(f"unknown sections: {', '.join(sorted(unknown))}")

    module_rounds = args.repeats or (3 if args.quick else 11)
    step_rounds = args.repeats or (2 if args.quick else 12)
    shapes = [(s[0] // 4, *s[1:]) for s in MODULE_SHAPES] if args.quick else MODULE_SHAPES
    batch, size = (2, 96) if args.quick else (4, 160)
    print(
        f"# smp-cbam bench: torch {torch.__version__}, smp {smp.__version__}, device {device}, "
        f"{torch.get_num_threads()} threads{', keep-heap' if args.keep_heap else ''}"
        f"{', quick' if args.quick else ''}",
        flush=True,
    )
    if "module" in sections:
        print(module_benchmark(shapes, module_rounds, device), flush=True)
    if "step" in sections:
        print(step_benchmark(step_rounds, device, batch, size), flush=True)
    if "process" in sections and device.type == "cpu":
        rounds = args.repeats or (1 if args.quick else 3)
        print(process_benchmark(rounds, 2 if args.quick else 5, batch, size), flush=True)
    if "memory" in sections:
        print(memory_benchmark(device, batch, size), flush=True)
    if "table" in sections:
        print(table(128 if args.quick else 256), flush=True)
    if "amp" in sections:
        print(amp_benchmark(step_rounds, device, batch, size), flush=True)
    if "compile" in sections:
        print(compile_benchmark(step_rounds, device, batch, size), flush=True)
        if "amp" in sections:  # compiled under autocast too: the operators take autocast's activations
            print(compile_benchmark(step_rounds, device, batch, size, amp=amp_dtype(device)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
