"""LightningModule that trains any smp model taking ``decoder_attention_type`` (Unet, Unet++)."""

from collections.abc import Sequence

import pytorch_lightning as pl
import segmentation_models_pytorch as smp
import torch
from torch import nn
from torchmetrics.classification import MulticlassJaccardIndex


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


def build_model(
    arch: str,
    encoder: str,
    attention: str | None,
    in_channels: int,
    classes: int,
    decoder_channels: Sequence[int] | None = None,
    encoder_weights: str | None = None,
    seed: int | None = None,
    encoder_depth: int = 5,
) -> nn.Module:
    """An smp model; with ``seed``, every weight outside the attention modules is initialised
    exactly as in the same model without attention, so runs that differ only in the attention
    type start from the same encoder and decoder."""
    kwargs = dict(
        encoder_name=encoder,
        encoder_depth=encoder_depth,
        encoder_weights=encoder_weights,
        in_channels=in_channels,
        classes=classes,
    )
    if decoder_channels is not None:
        kwargs["decoder_channels"] = list(decoder_channels)
    if seed is None:
        return freeze_unused_parameters(smp.create_model(arch, decoder_attention_type=attention, **kwargs), in_channels)
    torch.manual_seed(seed)
    model = smp.create_model(arch, decoder_attention_type=attention, **kwargs)
    if attention is not None:
        torch.manual_seed(seed)
        reference = smp.create_model(arch, decoder_attention_type=None, **kwargs)
        result = model.load_state_dict(reference.state_dict(), strict=False)
        assert not result.unexpected_keys, result.unexpected_keys
    return freeze_unused_parameters(model, in_channels)


def freeze_unused_parameters(model: nn.Module, in_channels: int, size: int = 64) -> nn.Module:
    """Sets ``requires_grad=False`` on the parameters of modules that ``forward`` never calls.

    smp builds some modules that its forward skips: torchvision-style encoders (ResNet, ...) keep
    the stages deeper than ``encoder_depth``, and Unet's first decoder block has no skip input, so
    its ``attention1`` never runs. Those weights never get a gradient, which DDP refuses ("parameters
    that were not used in producing the loss"). One forward pass in eval mode, without gradients
    and on zeros (no random numbers drawn, no batch-norm statistics changed) finds them. Freezing
    rather than deleting keeps the state dict that smp's ``from_pretrained`` and earlier
    checkpoints expect, and changes no trained value (AdamW skips parameters without a gradient).
    """
    called: set[int] = set()
    hooks = [m.register_forward_hook(lambda m, args, out: called.add(id(m))) for m in model.modules()]
    training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, in_channels, size, size))
    finally:
        for hook in hooks:
            hook.remove()
        model.train(training)
    for module in model.modules():
        if id(module) not in called:
            for parameter in module.parameters(recurse=False):
                parameter.requires_grad_(False)
    return model


class SegmentationModule(pl.LightningModule):
    """Segmentation with Dice + cross-entropy (multiclass) or Dice + BCE (``num_classes == 2``).

    ``train_loss`` is logged per epoch. On the val and test splits, per-class IoU, mean IoU and
    mean Dice are accumulated over the whole epoch and logged as
    ``{stage}_miou``, ``{stage}_dice`` and ``{stage}_iou_<class>``; classes absent from both the
    target and the prediction are left out of the means.
    """

    def __init__(
        self,
        arch: str = "unet",
        encoder: str = "resnet18",
        attention: str | None = "cbam",
        in_channels: int = 3,
        num_classes: int = 2,
        ignore_index: int | None = None,
        class_names: Sequence[str] | None = None,
        decoder_channels: Sequence[int] | None = None,
        encoder_weights: str | None = None,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        scheduler: str = "cosine",
        init_seed: int | None = None,
        encoder_depth: int = 5,
    ):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 (background counts), got {num_classes}")
        if scheduler not in ("cosine", "poly"):
            raise ValueError(f"scheduler must be 'cosine' or 'poly', got {scheduler!r}")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(
                f"class_names has {len(class_names)} names for num_classes={num_classes}"
            )
        self.save_hyperparameters()
        self.binary = num_classes == 2
        self.class_names = list(class_names or [f"class{i}" for i in range(num_classes)])
        self.model = build_model(
            arch,
            encoder,
            attention,
            in_channels,
            1 if self.binary else num_classes,
            decoder_channels,
            encoder_weights,
            init_seed,
            encoder_depth,
        )
        mode = "binary" if self.binary else "multiclass"
        self.dice_loss = smp.losses.DiceLoss(mode, ignore_index=ignore_index)
        if self.binary:
            self.ce_loss = smp.losses.SoftBCEWithLogitsLoss(ignore_index=ignore_index)
        else:
            self.ce_loss = nn.CrossEntropyLoss(
                ignore_index=-100 if ignore_index is None else ignore_index
            )
        iou = MulticlassJaccardIndex(  # masks are validated by the data module, not per batch
            num_classes,
            average="none",
            ignore_index=ignore_index,
            zero_division=float("nan"),
            validate_args=False,
        )
        self.val_iou = iou.clone()
        self.test_iou = iou.clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def predict_labels(self, logits: torch.Tensor) -> torch.Tensor:
        """Class index per pixel, ``(N, H, W)``."""
        if self.binary:
            return (logits[:, 0] > 0).long()
        return logits.argmax(dim=1)

    def compute_loss(self, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.binary:
            target = mask.unsqueeze(1).float()
            return self.dice_loss(logits, mask.unsqueeze(1)) + self.ce_loss(logits, target)
        return self.dice_loss(logits, mask) + self.ce_loss(logits, mask)

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> torch.Tensor:
        image, mask = batch
        logits = self(image)
        loss = self.compute_loss(logits, mask)
        if stage == "train" and not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"non-finite training loss ({loss.item()}) at epoch {self.current_epoch}, "
                f"step {self.global_step}"
            )
        if stage != "train":
            getattr(self, f"{stage}_iou").update(self.predict_labels(logits), mask)
        self.log(f"{stage}_loss", loss, on_step=False, on_epoch=True, batch_size=image.shape[0])
        return loss

    def _log_epoch_metrics(self, stage: str) -> None:
        metric = getattr(self, f"{stage}_iou")
        iou = metric.compute()
        metric.reset()
        self.log(f"{stage}_miou", iou.nanmean())
        self.log(f"{stage}_dice", (2 * iou / (1 + iou)).nanmean())  # per class, Dice = 2 IoU / (1 + IoU)
        for name, value in zip(self.class_names, iou):
            self.log(f"{stage}_iou_{name}", value)

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._step(batch, "test")

    def on_validation_epoch_end(self) -> None:
        self._log_epoch_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch_metrics("test")

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(
            self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay
        )
        epochs = max(self.trainer.max_epochs or 1, 1)
        if self.hparams.scheduler == "cosine":
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
        else:
            scheduler = torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=epochs, power=0.9)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
