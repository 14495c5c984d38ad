"""Argument and input checks shared by the attention modules; errors name the argument."""

import numbers

import numpy as np
import torch


def check_positive(name: str, value: int) -> int:
    """``value`` as a Python int >= 1 (numpy's integers too: TorchScript keeps only Python ints); a
    float or a bool, which torch would refuse later or take, is a ValueError naming ``name``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def check_flag(name: str, value: bool) -> bool:
    """``value`` as a Python bool (numpy's too)."""
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def check_choice(name: str, value: object, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def check_channels(x: torch.Tensor, in_channels: int) -> None:
    if x.dim() != 4:
        raise ValueError(f"expected a 4-D (N, C, H, W) input, got shape {list(x.shape)}")
    if x.shape[1] != in_channels:
        raise ValueError(
            f"expected an input with {in_channels} channels, got {x.shape[1]} (input shape {list(x.shape)})"
        )
