"""One setting of ``smp-cbam bench --sections amp``, measured in several fresh processes.

Within one process the amp section's interval of the median overhead is narrow, but repeated runs
of the same code scatter by more than that interval (each process lays out its heap, its models'
weights and the kernels' buffers anew; which models share the rounds matters too). A target such as "CBAM adds <= 5% to bf16 inference" is
read here as the median across processes, with the spread beside it. Each child process measures
exactly what the amp section measures (its models, ``interleaved_times``, the per-round ratio to
``none``) for one setting and prints one JSON line.

Usage: ``python experiments/bench_amp_processes.py [--setting inference] [--precision bf16]
[--processes 6] [--rounds 60]``
"""

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from smp_cbam.benchmarks.cbam_bench import (  # noqa: E402
    AMP_TYPES,
    build_bench_model,
    infer_fn,
    interleaved_times,
    median_interval,
    train_step_fn,
)
from smp_cbam.training.malloc import keep_heap  # noqa: E402

SETTINGS = {"train": train_step_fn, "inference": infer_fn}


def child(setting: str, precision: str, rounds: int) -> dict[str, float]:
    """One process's medians: each attention's overhead over none (percent) with its interval."""
    torch.set_num_threads(1)
    keep_heap()
    device = torch.device("cpu")
    amp = torch.bfloat16 if precision == "bf16" else None
    fns = {}
    for attention in AMP_TYPES:
        torch.manual_seed(0)
        fns[attention] = SETTINGS[setting](build_bench_model("Unet", attention), 4, 160, device, amp)
    if amp is not None:  # as the amp section, which times none in fp32 alongside (its last column)
        torch.manual_seed(0)
        fns["fp32"] = SETTINGS[setting](build_bench_model("Unet", "none"), 4, 160, device)
    times = interleaved_times(fns, rounds, device, warmup=1)
    result = {"none_ms": 1e3 * statistics.median(times["none"])}
    for name in ("scse", "cbam"):
        ratios = [100 * (a / b - 1) for a, b in zip(times[name], times["none"], strict=True)]
        result[name], result[f"{name}_low"], result[f"{name}_high"] = median_interval(ratios)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="inference")
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--processes", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.processes < 1 or args.rounds < 1:
        parser.error("--processes and --rounds must be at least 1")
    if args.child:
        print(json.dumps(child(args.setting, args.precision, args.rounds)))
        return 0
    print(
        f"Unet resnet18, batch 4, 3x160x160, {args.setting}, {args.precision}, 1 thread, keep-heap; "
        f"{args.processes} processes of {args.rounds} interleaved rounds"
    )
    command = [sys.executable, __file__, "--child", "--setting", args.setting, "--precision", args.precision]
    results = []
    for index in range(args.processes):
        out = subprocess.run([*command, "--rounds", str(args.rounds)], capture_output=True, text=True, check=True)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        r = results[-1]
        print(
            f"process {index + 1}: none {r['none_ms']:.1f} ms  scse {r['scse']:+.2f}% [{r['scse_low']:+.2f}, "
            f"{r['scse_high']:+.2f}]  cbam {r['cbam']:+.2f}% [{r['cbam_low']:+.2f}, {r['cbam_high']:+.2f}]",
            flush=True,
        )
    for name in ("scse", "cbam"):
        values = sorted(r[name] for r in results)
        print(
            f"{name}: median over processes {statistics.median(values):+.2f}%, "
            f"range {values[0]:+.2f} to {values[-1]:+.2f}%"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
