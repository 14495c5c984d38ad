"""Fused CPU kernels of the fast CBAM (``csrc/cbam_cpu.cpp``), built on first use.

PyTorch's ``cpp_extension`` compiles them once per machine (cached under ``TORCH_EXTENSIONS_DIR``
or ``~/.cache/torch_extensions``) into a Python module that registers ``torch.ops.smp_cbam_cpu``
and binds one function directly, the no-grad forward for eager mode (``extension()``). Without a working C++
compiler a warning is given and CBAM's ``impl="auto"`` runs its eager fused path instead;
``SMP_CBAM_KERNELS=0`` skips the build. CBAM asks for the build only for input the kernels take
(NCHW- or channels_last-contiguous float32/float64 CPU tensors, bfloat16 ones under CPU autocast),
never for CUDA, meta or other dtypes.

The functions below are the kernels' interface: each returns a tensor or a NamedTuple of them.
The full-size tensors (``x``, the output, ``grad`` = dL/dout and dL/dx, shaped like ``x``) have
``x``'s dtype; every other tensor, given or returned, has its compute type: float32 for bfloat16
``x`` (autocast's numerics: reductions, MLP, convolution and gates in float32), else ``x``'s dtype.
Indices are int64, or channel numbers in the compute type where noted.
"""

import logging
import os
import shutil
import threading
import warnings
from pathlib import Path
from types import ModuleType
from typing import NamedTuple

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
_state: dict[str, object] = {}  # "ok": the build's outcome; "module": the built module


def _build() -> ModuleType:
    capability = torch.backends.cpu.get_cpu_capability()
    if shutil.which("ninja") is None:  # the ninja wheel's binary, when its venv is not on PATH
        import ninja

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    logger.info("building smp_cbam's CPU kernels (once per machine)")
    from torch.utils.cpp_extension import load

    return load(
        name=f"smp_cbam_cpu_{capability.lower()}",
        sources=[str(SOURCE)],
        extra_cflags=["-O3", "-ffp-contract=off", *_capability_flags(capability)],
        is_python_module=True,
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


def extension() -> ModuleType | None:
    """The built kernels' module (its ``cbam_infer_eager``), or None where ``available()`` has not
    built them (it never builds: CBAM calls it on every forward, before it knows the input's device)."""
    return _state.get("module")


def _load() -> bool:
    if os.environ.get("SMP_CBAM_KERNELS", "1") == "0":
        return False
    try:
        module = _build()
    except Exception as error:  # noqa: BLE001 - any build failure means: use the eager path
        warnings.warn(
            f"smp_cbam: could not build the CPU kernels from {SOURCE} ({error}); "
            "CBAM uses its eager fast path (set SMP_CBAM_KERNELS=0 to skip the build)",
            RuntimeWarning,
            stacklevel=3,
        )
        return False
    _state["module"] = module
    return True


class ChannelPool(NamedTuple):
    """Mean and max over H*W of ``x`` (N, C, HW), each (N, C); ``index``: the max's pixel (or empty)."""

    mean: torch.Tensor
    max: torch.Tensor
    index: torch.Tensor


class GateGrads(NamedTuple):
    """dL/ds (N, HW) and dL/dg (N, C) through ``out = x g s``, the channel max of ``y = x g`` at
    each pixel (``index``, N, HW) and ``x`` there (``x_at``)."""

    d_spatial: torch.Tensor
    d_channel: torch.Tensor
    index: torch.Tensor
    x_at: torch.Tensor


class ConvGrads(NamedTuple):
    """The spatial convolution's gradients: for its input (N, 2, H, W) and its weight."""

    d_pooled: torch.Tensor
    d_weight: torch.Tensor


class TrainForward(NamedTuple):
    """``cbam_train``: the output and what ``cbam_backward`` needs (descriptors [avg; max] (2N, C),
    the MLP's hidden layer (2N, C/r), channel gate (N, C), each channel's max pixel (N, C),
    spatial gate (N, HW) and the pooled maps (N, 2, H, W))."""

    out: torch.Tensor
    descriptors: torch.Tensor
    hidden: torch.Tensor
    channel_gate: torch.Tensor
    channel_index: torch.Tensor
    spatial_gate: torch.Tensor
    pooled: torch.Tensor


class TrainGrads(NamedTuple):
    """``cbam_backward``: dL/dx (empty unless asked for) and the parameters' gradients; ``b1``,
    ``b2`` and ``bias`` are computed whether or not the module has those biases."""

    x: torch.Tensor
    w1: torch.Tensor
    b1: torch.Tensor
    w2: torch.Tensor
    b2: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor


def _ops() -> object:
    return torch.ops.smp_cbam_cpu


def channel_pool(x: torch.Tensor, with_index: bool) -> ChannelPool:
    return ChannelPool(*_ops().channel_pool(x, with_index))


def spatial_pool(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """[mean_c; max_c] of ``x g`` (N, C, HW) as (N, 2, HW)."""
    return _ops().spatial_pool(x, g)


def spatial_conv(pooled: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return _ops().spatial_conv(pooled, weight.contiguous())


def spatial_conv_backward(d_out: torch.Tensor, pooled: torch.Tensor, weight: torch.Tensor) -> ConvGrads:
    return ConvGrads(*_ops().spatial_conv_backward(d_out, pooled, weight.contiguous()))


def scale(x: torch.Tensor, g: torch.Tensor, s: torch.Tensor, residual: bool) -> torch.Tensor:
    """``x g s`` (``+ x``) for x (N, C, HW), g (N, C), s (N, HW)."""
    return _ops().scale(x, g, s, residual)


def gate_grads(grad: torch.Tensor, x: torch.Tensor, g: torch.Tensor, s: torch.Tensor) -> GateGrads:
    return GateGrads(*_ops().gate_grads(grad, x, g, s))


def pool_gate_grad(x: torch.Tensor, d_pooled: torch.Tensor, index: torch.Tensor, x_at: torch.Tensor) -> torch.Tensor:
    """dL/dg (N, C) through the spatial pool's mean and max."""
    return _ops().pool_gate_grad(x, d_pooled, index, x_at)


def input_grad(
    grad: torch.Tensor, g: torch.Tensor, s: torch.Tensor, d_pooled: torch.Tensor, index_s: torch.Tensor,
    d_avg: torch.Tensor, d_max: torch.Tensor, index_c: torch.Tensor, residual: bool,
) -> torch.Tensor:  # fmt: skip
    """dL/dx (N, C, HW)."""
    return _ops().input_grad(grad, g, s, d_pooled, index_s, d_avg, d_max, index_c, residual)


def cbam_infer(
    x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor, b2: torch.Tensor | None,
    weight: torch.Tensor, bias: torch.Tensor | None, a: float, b: float, residual: bool, inplace: bool,
) -> torch.Tensor:  # fmt: skip
    """The no-grad forward with ``s = sigmoid(a (conv(P) + bias) + b)``; into ``x`` with inplace.
    ``x`` NCHW- or channels_last-contiguous; the output has its layout."""
    return _ops().cbam_infer(x, w1, b1, w2, b2, weight, bias, a, b, residual, inplace)


def cbam_train(
    x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor, b2: torch.Tensor | None,
    weight: torch.Tensor, bias: torch.Tensor | None, residual: bool,
) -> TrainForward:  # fmt: skip
    """The training forward of a CBAM without spatial BatchNorm; ``x`` NCHW- or
    channels_last-contiguous, the output in its layout."""
    return TrainForward(*_ops().cbam_train(x, w1, b1, w2, b2, weight, bias, residual))


def cbam_backward(
    grad: torch.Tensor, x: torch.Tensor, saved: TrainForward, w1: torch.Tensor, w2: torch.Tensor,
    weight: torch.Tensor, residual: bool, with_input_grad: bool,
) -> TrainGrads:  # fmt: skip
    """``cbam_train``'s gradients for ``grad`` = dL/dout (any layout); dL/dx in ``x``'s layout."""
    return TrainGrads(*_ops().cbam_backward(
        grad, x, saved.descriptors, saved.hidden, saved.channel_gate, saved.channel_index,
        saved.spatial_gate, saved.pooled, w1, w2, weight, residual, with_input_grad,
    ))  # fmt: skip
