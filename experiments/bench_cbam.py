"""Benchmark the fast CBAM against timm's CbamModule, smp's SCSE and the plain formula.

Usage: ``python experiments/bench_cbam.py [--quick] [--device cpu|cuda] [--repeats N]``.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from smp_cbam.benchmarks.cbam_bench import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
