"""Fused CPU kernels of the fast CBAM (``csrc/cbam_cpu.cpp``), built on first use.

PyTorch's ``cpp_extension`` compiles them once per machine (about 20 s, cached under
``TORCH_EXTENSIONS_DIR`` or ``~/.cache/torch_extensions``) and registers ``torch.ops.smp_cbam``.
Without a working C++ compiler, or with ``SMP_CBAM_KERNELS=0``, a warning is given and CBAM runs
its eager fast path instead.
"""

import logging
import os
import shutil
import threading
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("csrc") / "cbam_cpu.cpp"
# vector extensions torch itself found on this CPU; never -march=native, since the build cache
# may be shared by machines of different kinds
# (CPU_CAPABILITY selects ATen's matching at::vec::Vectorized)
ARCH_FLAGS = {
    "AVX512": ["-mavx2", "-mfma", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"],
    "AVX2": ["-mavx2", "-mfma"],
}

logger = logging.getLogger(__name__)
_lock = threading.Lock()
_state: dict[str, bool] = {}


def _build() -> None:
    capability = torch.backends.cpu.get_cpu_capability()
    if shutil.which("ninja") is None:  # the ninja wheel's binary, when its venv is not on PATH
        import ninja

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    logger.info("building smp_cbam's CPU kernels (once per machine)")
    from torch.utils.cpp_extension import load

    load(
        name=f"smp_cbam_cpu_{capability.lower()}",
        sources=[str(SOURCE)],
        extra_cflags=["-O3", "-ffp-contract=off", *_capability_flags(capability)],
        is_python_module=False,
    )


def _capability_flags(capability: str) -> list[str]:
    if capability not in ARCH_FLAGS:
        return ["-DCPU_CAPABILITY=DEFAULT", "-DCPU_CAPABILITY_DEFAULT"]
    return [*ARCH_FLAGS[capability], f"-DCPU_CAPABILITY={capability}", f"-DCPU_CAPABILITY_{capability}"]


def available() -> bool:
    """Whether ``torch.ops.smp_cbam`` is usable, building it on the first call."""
    if "ok" not in _state:
        with _lock:
            if "ok" not in _state:
                _state["ok"] = _load()
    return _state["ok"]


def _load() -> bool:
    if os.environ.get("SMP_CBAM_KERNELS", "1") == "0":
        return False
    try:
        _build()
    except Exception as error:  # noqa: BLE001 - any build failure means: use the eager path
        warnings.warn(
            f"smp_cbam: could not build the CPU kernels from {SOURCE} ({error}); "
            "CBAM uses its eager fast path (set SMP_CBAM_KERNELS=0 to skip the build)",
            RuntimeWarning,
            stacklevel=3,
        )
        return False
    return True
