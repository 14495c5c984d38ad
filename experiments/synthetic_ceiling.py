"""Prints the numbers behind docs/synthetic.md: the receptive-field reach of the main job's
models, and what a cue-blind model can score on the default splits; with ``--examples PATH``
also writes a strip of test images (the docs' picture).

    PYTHONPATH=. python experiments/synthetic_ceiling.py [--examples docs/synthetic_examples.png]
"""

import argparse
from pathlib import Path

import cv2
import numpy as np
import torch
import yaml

from smp_cbam.training.module import build_model
from smp_cbam.training.synthetic import (
    CLASS_NAMES,
    DEFAULTS,
    best_cue_blind_mapping,
    context_miou,
    generate_splits,
)

CONFIG = Path(__file__).parent / "configs" / "synthetic.yaml"


def miou(pred: np.ndarray, true: np.ndarray) -> float:
    ious = [((pred == c) & (true == c)).sum() / ((pred == c) | (true == c)).sum() for c in range(len(CLASS_NAMES))]
    return float(np.mean(ious))


def reach_up(arch: str, model_config: dict, size: int) -> int:
    """How many rows above itself an output pixel's receptive field reaches, at most over the
    stride phases (eval mode, float64, gradients of one row of outputs)."""
    model = build_model(
        arch, model_config["encoder"], None, 3, len(CLASS_NAMES), model_config["decoder_channels"],
        encoder_depth=model_config["encoder_depth"], seed=0,
    ).double().eval()  # fmt: skip
    reach = 0
    for row in range(size // 2, size // 2 + 8):
        x = torch.randn(1, 3, size, size, dtype=torch.float64, requires_grad=True)
        model(x)[:, :, row].sum().backward()
        reach = max(reach, row - int(torch.nonzero(x.grad.abs().sum((0, 1)).sum(1))[0, 0]))
    return reach


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--examples", type=Path, help="write 8 test images side by side to this PNG")
    args = parser.parse_args()
    config = yaml.safe_load(CONFIG.read_text())
    options = {**DEFAULTS, **config["data"]["synthetic"]}
    for arch in sorted({"unet", "unetplusplus", *config["grid"]["archs"]}):
        reach = reach_up(arch, config["model"], 2 * options["size"])
        print(f"{arch}: the receptive field reaches {reach} rows up; the gap is {options['gap']} rows")
    splits = generate_splits(**{k: v for k, v in options.items()})
    for split, data in splits.items():
        blind = data.cue_blind()
        mapping, best = best_cue_blind_mapping(data)
        print(
            f"{split}: {len(data.images)} images, warm {np.mean(data.cues == 0):.3f}, context pixels "
            f"{data.context.mean():.3f}; cue-blind: context mIoU {context_miou(blind, data.masks, data.context):.4f} "
            f"(best mapping {mapping}: {best:.4f}), context accuracy {(blind == data.masks)[data.context].mean():.4f}, "
            f"mIoU {miou(blind, data.masks):.4f}; all-background mIoU {miou(np.zeros_like(blind), data.masks):.4f}"
        )
    if args.examples:
        strip = np.concatenate(list(splits["test"].images[:8]), axis=1)
        strip = cv2.resize(strip, None, fx=2, fy=2, interpolation=cv2.INTER_NEAREST)
        cv2.imwrite(str(args.examples), cv2.cvtColor(strip, cv2.COLOR_RGB2BGR))


if __name__ == "__main__":
    main()
