"""Argument and input checks shared by the attention modules; errors name the argument."""

import torch


def check_positive(name: str, value: int) -> None:
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


def check_choice(name: str, value: object, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def check_channels(x: torch.Tensor, in_channels: int) -> None:
    if x.shape[1] != in_channels:
        raise ValueError(
            f"expected an input with {in_channels} channels, got {x.shape[1]} (input shape {list(x.shape)})"
        )
