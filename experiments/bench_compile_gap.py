"""What CBAM adds to a compiled Unet's inference against what it adds in eager mode, in one process.

``smp-cbam bench --sections compile`` times training and inference of none, scse and cbam; this
times inference of none and cbam only, compiled and eager, in more interleaved rounds, and prints
``compile_gap``'s median with its 95% interval: compiled minus eager, in ms and in points of none.

    OMP_NUM_THREADS=1 python experiments/bench_compile_gap.py [--rounds 60] [--fp32]
"""

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from smp_cbam.benchmarks.cbam_bench import (  # noqa: E402
    build_bench_model,
    compile_gap,
    infer_fn,
    interleaved_times,
    paired_ratio,
)
from smp_cbam.training.malloc import keep_heap  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--fp32", action="store_true", help="fp32 (default: under CPU bf16 autocast)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    keep_heap()
    device, amp = torch.device("cpu"), None if args.fp32 else torch.bfloat16
    fns = {}
    for attention in ("none", "cbam"):
        for compiled in (False, True):
            torch.manual_seed(0)
            model = build_bench_model("Unet", attention)
            fns[attention, compiled] = infer_fn(torch.compile(model) if compiled else model, 4, 160, device, amp)
    times = interleaved_times(fns, args.rounds, device, warmup=2)
    print(
        f"Unet resnet18 inference, batch 4, 3x160x160, {'fp32' if args.fp32 else 'bf16 autocast'}, 1 thread, "
        f"{args.rounds} interleaved rounds"
    )
    for compiled in (False, True):
        by_type = {t: times[t, compiled] for t in ("none", "cbam")}
        print(
            f"{'compiled' if compiled else 'eager':<9} none {statistics.median(by_type['none']) * 1e3:6.1f} ms  "
            f"cbam {100 * (paired_ratio(by_type, 'cbam', 'none') - 1):+.2f}%"
        )
    gap = compile_gap(times, "cbam")
    print(
        f"cbam compiled minus eager: {gap['ms']:+.2f} ms [{gap['ms_low']:+.2f}, {gap['ms_high']:+.2f}], "
        f"{gap['points']:+.2f} points [{gap['points_low']:+.2f}, {gap['points_high']:+.2f}]"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
