"""Developer benchmarks (``smp-cbam bench``); never imported by ``import smp_cbam``."""
