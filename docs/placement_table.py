"""Print the architecture x placement table of docs/placement.md (CBAM, smp defaults).

python docs/placement_table.py
"""

import segmentation_models_pytorch as smp

import smp_cbam
from smp_cbam.placement import insertion_points, supports

ENCODER = "resnet18"
VIT = "tu-vit_tiny_patch16_224"  # DPT takes vision transformers only


def params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    print("| architecture | encoder | where | modules | channels | parameters added | model parameters |")
    print("|---|---|---|---|---|---|---|")
    for arch in smp.MODEL_ARCHITECTURES_MAPPING.values():
        encoder = VIT if arch is smp.DPT else ENCODER
        for where in ("decoder", "encoder", "both"):
            base = arch(encoder_name=encoder, encoder_weights=None)
            if not supports(base, where):
                print(f"| {arch.__name__} | {encoder} | {where} | not supported | | | {params(base):,} |")
                continue
            points = insertion_points(base, where)
            added = smp_cbam.add_attention(arch(encoder_name=encoder, encoder_weights=None), "cbam", where)
            widths = sorted(set(points.values()))
            print(
                f"| {arch.__name__} | {encoder} | {where} | {len(points)} | {', '.join(map(str, widths))} "
                f"| {params(added) - params(base):,} | {params(base):,} |"
            )


if __name__ == "__main__":
    main()
