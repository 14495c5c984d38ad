"""What each decoder attention does to the signal at initialisation, in a resnet18 Unet.

Prints, for each arm, every decoder attention module's output/input norm ratio (decoder order,
``b<block>.a<1|2>``: smp's attention1 after the skip concatenation, attention2 after the block's
convolutions) and the std of the logits, for the CamVid config's Unet (11 classes, decoder
channels 64-48-32-24-16) in training mode on random images, as the first optimizer step sees it.
smp initialises the decoder after building it; the neutral arms get their start back through
``reset_gates``, as ``decoder_attention_type`` gives it once the registry re-applies it.

    python experiments/init_signal.py [--seeds 3] [--size 64] [--batch 4]
"""

import argparse
import statistics
from functools import partial

import segmentation_models_pytorch as smp
import torch
from segmentation_models_pytorch.base.modules import Attention

from smp_cbam import CBAM, registry
from smp_cbam.attention import reset_gates

ARMS = {
    "none": None,
    "scse": "scse",
    "cbam": "cbam",
    "cbam neutral": "init_signal_cbam_neutral",
    "cbam_residual": "cbam_residual",
    "cbam_residual neutral": "init_signal_cbam_residual_neutral",
}
registry.register_attention("init_signal_cbam_neutral", partial(CBAM, init="neutral"), overwrite=True)
registry.register_attention(
    "init_signal_cbam_residual_neutral", partial(CBAM, residual=True, init="neutral"), overwrite=True
)


def measure(attention: str | None, seed: int, size: int, batch: int) -> tuple[dict[str, float], float]:
    torch.manual_seed(seed)
    model = smp.Unet(
        "resnet18", encoder_weights=None, encoder_depth=5, decoder_channels=(64, 48, 32, 24, 16),
        decoder_attention_type=attention, classes=11,
    )  # fmt: skip
    reset_gates(model)
    ratios: dict[str, float] = {}

    def hook(module: torch.nn.Module, args: tuple, out: torch.Tensor) -> None:
        ratios[module.label] = (out.norm() / module.norm_in).item()

    def pre_hook(module: torch.nn.Module, args: tuple) -> None:
        module.norm_in = args[0].norm()  # before an inplace module overwrites its input

    for name, module in model.decoder.named_modules():
        if isinstance(module, Attention):
            block, which = name.split(".")[-2:]  # blocks.<i>.attention<1|2>
            module.label = f"b{block}.a{which[-1]}"
            module.register_forward_pre_hook(pre_hook)
            module.register_forward_hook(hook)
    torch.manual_seed(1000 + seed)
    images = torch.randn(batch, 3, size, size)
    with torch.no_grad():
        logits = model.train()(images)
    return ratios, logits.std().item()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    results = {
        arm: [measure(name, seed, args.size, args.batch) for seed in range(args.seeds)] for arm, name in ARMS.items()
    }
    names = list(results["none"][0][0])
    print(f"output/input norm ratio per decoder attention (seed 0), logits std (mean of {args.seeds} seeds)")
    print(f"{'arm':<24}" + "".join(f"{n:>8}" for n in names) + f"{'logits std':>12}")
    for arm, runs in results.items():
        ratios = runs[0][0]
        std = statistics.mean(r[1] for r in runs)
        print(f"{arm:<24}" + "".join(f"{ratios[n]:8.2f}" for n in names) + f"{std:12.3f}")


if __name__ == "__main__":
    main()
