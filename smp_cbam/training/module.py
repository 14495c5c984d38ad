"""LightningModule that trains an smp segmentation model, with or without attention.

Use it in any ``pytorch_lightning.Trainer``, with any logger::

    datamodule = SegmentationDataModule("synthetic", batch_size=8)
    module = SegmentationModule(arch="unet", encoder="resnet18", attention="cbam")
    trainer = pl.Trainer(max_epochs=10, logger=CSVLogger("logs"))
    trainer.fit(module, datamodule=datamodule)

The number of classes, input channels, class names and ignore index come from the attached data
module when they are not given (see :class:`SegmentationModule`).
"""

from collections.abc import Sequence

import numpy as np
import pytorch_lightning as pl
import segmentation_models_pytorch as smp
import torch
from pytorch_lightning.utilities import rank_zero_warn
from torch import nn
from torchmetrics.classification import MulticlassConfusionMatrix, MulticlassJaccardIndex

from .models import PLACEMENTS, build_model, check_model_args, count_parameters, used_parameters

__all__ = [
    "NonFiniteLossError",
    "SegmentationModule",
    "build_model",
    "check_model_args",
    "confusion_counts",
    "count_parameters",
    "distributed_order",
    "used_parameters",
]

DATA_KEYS = ("num_classes", "in_channels", "class_names", "ignore_index")
SCHEDULERS = ("cosine", "poly", "none")
PREDICT_OUTPUTS = ("labels", "probabilities")
UNUSED_KEY = "smp_cbam_unused_parameters"  # checkpoint entry: the keys left out of its state_dict
STAGES = ("val", "test")


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


def confusion_counts(
    labels: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int | None
) -> torch.Tensor:
    """Per-image ``(tp, fp, fn)`` of every class: int64 ``(N, 3, num_classes)``.

    ``labels`` and ``target`` are ``(N, H, W)`` class indices; target pixels equal to
    ``ignore_index`` (or outside ``0..num_classes-1``) are left out. One ``bincount`` over
    ``(image, true class, predicted class)`` gives every image's confusion matrix at once, on the
    tensors' device.
    """
    n, c = target.shape[0], num_classes
    valid = (target >= 0) & (target < c)
    if ignore_index is not None:
        valid &= target != ignore_index
    image = torch.arange(n, device=target.device).view(n, *([1] * (target.dim() - 1)))
    index = (image * c + target) * c + labels
    matrix = torch.bincount(index[valid], minlength=n * c * c).view(n, c, c)  # [image, true, predicted]
    tp = matrix.diagonal(dim1=1, dim2=2)
    return torch.stack([tp, matrix.sum(1) - tp, matrix.sum(2) - tp], dim=1)


def distributed_order(gathered: torch.Tensor, length: int) -> torch.Tensor:
    """Rows gathered from every process ``(world_size, n_per_process, ...)`` back in the loader's
    order, for the evaluation sampler Lightning uses under DDP (``DistributedSampler`` without
    shuffling: process r gets items r, r + W, ...; the last ones repeat to even out)."""
    return gathered.transpose(0, 1).reshape(-1, *gathered.shape[2:])[:length]


class SegmentationModule(pl.LightningModule):
    """Segmentation with Dice + cross-entropy (multiclass) or Dice + BCE (one output channel).

    Model: ``arch`` (any smp architecture) with ``encoder``, ``attention`` (a registered
    attention name, or ``None``/``"none"``) placed in the ``placement`` part of the model (see
    :func:`~smp_cbam.training.models.build_model`); ``model_kwargs`` go to smp's
    ``create_model`` (``aux_params``, ``decoder_use_norm``, ...). Or pass ``model=`` an
    ``nn.Module`` you built (e.g. an smp model): the architecture arguments are then unused, and
    ``load_from_checkpoint`` needs the same ``model=`` again (a module object is not a
    hyperparameter). A model built here predicts one channel for ``num_classes == 2``
    (binary loss) and ``num_classes`` channels otherwise; a given model may output either.

    Data: ``num_classes``, ``in_channels``, ``class_names`` and ``ignore_index`` that are not
    given are taken from ``trainer.datamodule`` when the Trainer starts (the model is then built
    in :meth:`configure_model`); a value given here that differs from the data module's is an
    error. Without a data module, ``num_classes`` is required, ``in_channels`` defaults to 3 and
    no label is ignored. Given ``num_classes`` and ``in_channels`` (or ``model``), the model is
    built at once. The resolved values are kept in ``self.hparams`` (and so in checkpoints),
    while the hyperparameters logged by Lightning are those given here: values taken from the
    data module are logged by the data module, so the two never conflict.

    Auxiliary head: an smp model with ``aux_params`` returns ``(mask, label)``; the label head
    is trained to predict which classes are present in the mask (multi-label BCE, weight
    ``aux_weight``). ``aux_params["classes"]`` defaults to the model's output channels.

    Optimisation: AdamW; ``scheduler`` ``"cosine"`` or ``"poly"`` decays the learning rate to 0
    over ``trainer.estimated_stepping_batches`` optimizer steps and is stepped every step
    (``Trainer(max_steps=N)`` gets an N-step schedule; a fit resumed under another length gets
    the new length from where it resumes); ``"none"`` keeps it constant.

    Logged: ``train_loss`` (per step and per epoch, progress bar), ``{stage}_loss``; on val and
    test, per-class IoU, mean IoU and mean Dice accumulated over the whole epoch as
    ``{stage}_miou`` (progress bar), ``{stage}_dice`` and ``{stage}_iou_<class>`` (classes absent
    from target and prediction are left out of the means). Batches of three,
    ``(image, mask, context)``, also give ``{stage}_context_miou``: the mIoU over the pixels where
    the bool ``context`` is true.

    Test: :attr:`per_image_counts` is an int64 numpy array ``(n_images, 3, num_classes)`` of
    ``(tp, fp, fn)`` per image and class (``ignore_index`` excluded), in the test loader's order;
    filled by every ``trainer.test`` (under DDP gathered from all processes, for Lightning's own
    distributed sampler).

    Predict: ``predict_step`` returns int64 class indices ``(N, H, W)`` (``predict_output=
    "labels"``) or float probabilities ``(N, num_classes, H, W)`` (``"probabilities"``: softmax,
    or for one output channel ``[1 - p, p]``); batches may be an image tensor or a tuple whose
    first element is the image. :attr:`predict_output` may be changed after construction.
    """

    def __init__(
        self,
        arch: str = "unet",
        encoder: str = "resnet18",
        attention: str | None = "cbam",
        placement: str = "decoder",
        num_classes: int | None = None,
        in_channels: int | None = None,
        class_names: Sequence[str] | None = None,
        ignore_index: int | None = None,
        decoder_channels: Sequence[int] | None = None,
        encoder_weights: str | None = None,
        encoder_depth: int = 5,
        model_kwargs: dict | None = None,
        model: nn.Module | None = None,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        scheduler: str = "cosine",
        aux_weight: float = 0.4,
        init_seed: int | None = None,
        predict_output: str = "labels",
    ):
        super().__init__()
        if num_classes is not None and num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 (background counts), got {num_classes}")
        if in_channels is not None and in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels}")
        if scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {scheduler!r}")
        if predict_output not in PREDICT_OUTPUTS:
            raise ValueError(f"predict_output must be one of {PREDICT_OUTPUTS}, got {predict_output!r}")
        if placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
        if aux_weight < 0:
            raise ValueError(f"aux_weight must be >= 0, got {aux_weight}")
        if model is not None and not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if class_names is not None:
            class_names = [str(name) for name in class_names]  # a list, as the data module and YAML keep it
            if num_classes is not None and len(class_names) != num_classes:
                raise ValueError(f"class_names has {len(class_names)} names for num_classes={num_classes}")
        if decoder_channels is not None:
            decoder_channels = [int(c) for c in decoder_channels]  # a plain list in hparams.yaml
        if model is None:  # unknown names fail here, not when training starts
            check_model_args(arch, encoder, attention, placement)
        given = dict(
            num_classes=num_classes, in_channels=in_channels, class_names=class_names, ignore_index=ignore_index
        )
        # data values taken from the data module later are logged by the data module, not here
        self.save_hyperparameters(ignore=["model", *[key for key, value in given.items() if value is None]])
        self._given = given
        self.model = model
        self.predict_output = predict_output
        self.per_image_counts: np.ndarray | None = None
        self.num_classes: int | None = None
        self.in_channels: int | None = None
        self.class_names: list[str] = []
        self.ignore_index: int | None = None
        self._heads_for: tuple | None = None
        self._counts: list[torch.Tensor] = []
        self._context_seen = dict.fromkeys(STAGES, False)
        self._unused_keys: list[str] = []
        self._schedule: torch.optim.lr_scheduler.LRScheduler | None = None  # the one configure_optimizers made
        if num_classes is not None and (model is not None or in_channels is not None):
            self._setup_from(None)

    # ------------------------------------------------------------------ building

    def configure_model(self) -> None:
        """Resolve the data values from the attached data module and build the model (once)."""
        try:
            datamodule = self.trainer.datamodule
        except RuntimeError:  # not attached to a Trainer (e.g. load_from_checkpoint)
            datamodule = None
        self._setup_from(datamodule)

    def _setup_from(self, datamodule) -> None:
        resolved = self._resolve(datamodule)
        self.num_classes, self.in_channels = resolved["num_classes"], resolved["in_channels"]
        self.class_names, self.ignore_index = list(resolved["class_names"]), resolved["ignore_index"]
        self.hparams.update({key: value for key, value in resolved.items() if value is not None})
        if self.model is None:
            self.model = self._build_model()
            # what build_model froze as never used by the forward pass (see checkpoint hooks below)
            self._unused_keys = [f"model.{n}" for n, p in self.model.named_parameters() if not p.requires_grad]
        if self._heads_for != (self.num_classes, self.ignore_index):
            self._build_losses_and_metrics()

    def _resolve(self, datamodule) -> dict:
        """The data values: given, else the data module's, else defaults; a given value that the
        data module contradicts raises ValueError."""
        resolved = {}
        for key in DATA_KEYS:
            given = self._given[key]
            found = getattr(datamodule, key, None) if datamodule is not None else None
            current = getattr(self, key, None)
            if key == "class_names":  # compared as lists: a YAML file, the CLI and the data module give lists
                given = None if given is None else list(given)
                found = None if found is None else [str(name) for name in found]
                current = list(current) if current else None
            if given is not None and found is not None and given != found:
                raise ValueError(
                    f"{key}={given!r} was given to SegmentationModule, but the data module has {key}={found!r}; "
                    f"pass the same value or leave {key} out to take the data module's"
                )
            if key in ("num_classes", "in_channels") and self.model is not None and found not in (None, current):
                if current is not None:
                    raise ValueError(f"the model was built for {key}={current}, but the data module has {key}={found}")
            # once the model is built, values not given or found stay as they were resolved
            resolved[key] = next((v for v in (given, found, current) if v is not None), None)
        if resolved["num_classes"] is None:
            raise ValueError(
                "num_classes is not known: pass num_classes= to SegmentationModule, or train with a data "
                "module that has num_classes (trainer.fit(module, datamodule=...))"
            )
        if resolved["in_channels"] is None and self.model is None:
            resolved["in_channels"] = 3
        # the data modules' names for unnamed classes, so a checkpoint fits the data module later
        names = resolved["class_names"] or [f"class_{i}" for i in range(resolved["num_classes"])]
        if len(names) != resolved["num_classes"]:
            raise ValueError(f"class_names has {len(names)} names for num_classes={resolved['num_classes']}")
        resolved["class_names"] = names
        return resolved

    def _build_model(self) -> nn.Module:
        hp = self.hparams
        out_channels = 1 if self.num_classes == 2 else self.num_classes
        kwargs = dict(hp.model_kwargs or {})
        if kwargs.get("aux_params") is not None:
            aux = dict(kwargs["aux_params"])
            aux.setdefault("classes", out_channels)
            if aux["classes"] != out_channels:
                raise ValueError(
                    f"aux_params classes={aux['classes']}: the auxiliary head predicts the classes present in "
                    f"the mask and needs classes={out_channels} (or leave it out)"
                )
            kwargs["aux_params"] = aux
        return build_model(
            hp.arch,
            hp.encoder,
            hp.attention,
            hp.placement,
            in_channels=self.in_channels,
            classes=out_channels,
            decoder_channels=hp.decoder_channels,
            encoder_weights=hp.encoder_weights,
            encoder_depth=hp.encoder_depth,
            seed=hp.init_seed,
            **kwargs,
        )

    def _build_losses_and_metrics(self) -> None:
        ignore = self.ignore_index
        self.dice_binary = smp.losses.DiceLoss("binary", ignore_index=ignore)
        self.dice_multiclass = smp.losses.DiceLoss("multiclass", ignore_index=ignore)
        self.bce = smp.losses.SoftBCEWithLogitsLoss(ignore_index=ignore)
        self.cross_entropy = nn.CrossEntropyLoss(ignore_index=-100 if ignore is None else ignore)
        iou = MulticlassJaccardIndex(  # masks are validated by the data module, not per batch
            self.num_classes, average="none", ignore_index=ignore, zero_division=float("nan"), validate_args=False
        )
        # context pixels: a confusion matrix, so the mean can skip classes absent from the context
        # targets (a class predicted there but never true would add an IoU of 0 to every image)
        confusion = MulticlassConfusionMatrix(self.num_classes, ignore_index=ignore, validate_args=False)
        for stage in STAGES:
            setattr(self, f"{stage}_iou", iou.clone())
            setattr(self, f"{stage}_context_iou", confusion.clone())
        self._heads_for = (self.num_classes, self.ignore_index)

    # ------------------------------------------------------------------ forward and loss

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Segmentation logits ``(N, C, H, W)`` (C = 1 for a binary model); an auxiliary head's
        output is left out."""
        return self._split(self._model()(x))[0]

    def _model(self) -> nn.Module:
        if self.model is None:
            raise RuntimeError(
                "the model is not built yet: it is built when the Trainer starts (configure_model) from the "
                "data module's values, or at once when num_classes and in_channels (or model=) are given"
            )
        return self.model

    def _split(self, output) -> tuple[torch.Tensor, torch.Tensor | None]:
        if isinstance(output, (tuple, list)):
            return output[0], output[1] if len(output) > 1 else None
        return output, None

    def _check_channels(self, logits: torch.Tensor) -> bool:
        """Whether the logits are binary (one channel); raises for a channel count that fits no mode."""
        channels = logits.shape[1]
        if channels == 1 and self.num_classes == 2:
            return True
        if channels == self.num_classes:
            return False
        raise ValueError(
            f"the model outputs {channels} channels, but num_classes={self.num_classes} needs "
            f"{self.num_classes}{' (or 1)' if self.num_classes == 2 else ''}"
        )

    @property
    def binary(self) -> bool:
        """Whether the model built here predicts one channel (``num_classes == 2``)."""
        return self.num_classes == 2

    def predict_labels(self, logits: torch.Tensor) -> torch.Tensor:
        """Class index per pixel, ``(N, H, W)``."""
        if self._check_channels(logits):
            return (logits[:, 0] > 0).long()
        return logits.argmax(dim=1)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Class probabilities per pixel, ``(N, num_classes, H, W)``."""
        if self._check_channels(logits):
            p = torch.sigmoid(logits)
            return torch.cat([1 - p, p], dim=1)
        return logits.softmax(dim=1)

    def compute_loss(self, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self._check_channels(logits):
            target = mask.unsqueeze(1)
            return self.dice_binary(logits, target) + self.bce(logits, target.float())
        return self.dice_multiclass(logits, mask) + self.cross_entropy(logits, mask)

    def presence(self, mask: torch.Tensor, channels: int) -> torch.Tensor:
        """Which classes each mask holds (ignored pixels left out), float ``(N, channels)``: the
        auxiliary head's target; with one channel, whether class 1 is present."""
        n, c = mask.shape[0], self.num_classes
        valid = (mask >= 0) & (mask < c)
        image = torch.arange(n, device=mask.device).view(n, 1, 1)
        present = torch.bincount((image * c + mask)[valid], minlength=n * c).view(n, c) > 0
        return (present[:, 1:2] if channels == 1 else present).float()

    def _step(self, batch: Sequence[torch.Tensor], stage: str) -> torch.Tensor:
        image, mask = batch[0], batch[1]
        logits, aux = self._split(self._model()(image))
        # The loss in float32, outside autocast: CPU autocast leaves softmax in the low precision
        # (CUDA's autocast runs it in float32), and the Dice loss's sums over every pixel of a bf16
        # softmax round to three significant digits.
        logits, aux = logits.float(), aux.float() if aux is not None else None
        with torch.autocast(logits.device.type, enabled=False):
            loss = self.compute_loss(logits, mask)
            if aux is not None and self.hparams.aux_weight > 0:
                target = self.presence(mask, aux.shape[1])
                loss = loss + self.hparams.aux_weight * nn.functional.binary_cross_entropy_with_logits(aux, target)
        size = image.shape[0]
        if stage == "train":
            if not torch.isfinite(loss):
                raise NonFiniteLossError(
                    f"non-finite training loss ({loss.item()}) at epoch {self.current_epoch}, step {self.global_step}"
                )
            self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=size, sync_dist=True)
            return loss
        labels = self.predict_labels(logits)
        getattr(self, f"{stage}_iou").update(labels, mask)
        if len(batch) > 2:
            context = batch[2].bool()
            getattr(self, f"{stage}_context_iou").update(labels[context], mask[context])
            self._context_seen[stage] = True
        if stage == "test":
            self._counts.append(confusion_counts(labels, mask, self.num_classes, self.ignore_index))
        self.log(
            f"{stage}_loss",
            loss,
            on_step=False,
            on_epoch=True,
            prog_bar=stage == "val",
            batch_size=size,
            sync_dist=True,
        )
        return loss

    # ------------------------------------------------------------------ Lightning hooks

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        self._step(batch, "val")

    def test_step(self, batch, batch_idx, dataloader_idx=0):
        self._step(batch, "test")

    def predict_step(self, batch, batch_idx, dataloader_idx=0):
        image = batch if isinstance(batch, torch.Tensor) else batch[0]
        logits = self(image)
        if self.predict_output == "labels":
            return self.predict_labels(logits)
        return self.probabilities(logits.float())  # float32 also under bf16/fp16 precision, as the loss

    def on_validation_epoch_start(self) -> None:
        self._one_loader("val", self.trainer.num_val_batches)
        self._context_seen["val"] = False

    def on_test_epoch_start(self) -> None:
        self._one_loader("test", self.trainer.num_test_batches)
        self._context_seen["test"] = False
        self._counts = []
        self.per_image_counts = None

    def on_validation_epoch_end(self) -> None:
        self._log_epoch_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch_metrics("test")
        self.per_image_counts = self._gather_counts()
        self._counts = []

    @staticmethod
    def _one_loader(stage: str, batches: list) -> None:
        # the epoch's IoU is one dataset's: several loaders would be pooled into one number silently
        if len(batches) > 1:
            raise ValueError(
                f"SegmentationModule evaluates one {stage} dataloader at a time, got {len(batches)}: "
                f"call trainer.{'validate' if stage == 'val' else 'test'}(module, dataloaders=loader) for each"
            )

    def _log_epoch_metrics(self, stage: str) -> None:
        metric = getattr(self, f"{stage}_iou")
        iou = metric.compute()
        metric.reset()
        # compute() already gathers every process's counts: the values agree, syncing them is a no-op
        self.log(f"{stage}_miou", iou.nanmean(), prog_bar=stage == "val", sync_dist=True)
        self.log(
            f"{stage}_dice", (2 * iou / (1 + iou)).nanmean(), sync_dist=True
        )  # per class, Dice = 2 IoU / (1 + IoU)
        for name, value in zip(self.class_names, iou):
            self.log(f"{stage}_iou_{name}", value, sync_dist=True)
        context = getattr(self, f"{stage}_context_iou")
        if self._context_seen[stage]:
            matrix = context.compute().double()  # [true, predicted]
            tp = matrix.diagonal()
            present = matrix.sum(1) > 0
            iou = tp / (matrix.sum(0) + matrix.sum(1) - tp).clamp(min=1)
            self.log(f"{stage}_context_miou", iou[present].mean(), sync_dist=True)
        context.reset()

    def _gather_counts(self) -> np.ndarray:
        c = self.num_classes
        local = torch.cat(self._counts) if self._counts else torch.zeros(0, 3, c, dtype=torch.int64, device=self.device)
        if self.trainer.world_size > 1:
            loaders = self.trainer.test_dataloaders
            loader = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
            local = distributed_order(self.all_gather(local), len(loader.dataset))
        return local.cpu().numpy().astype(np.int64)

    # ------------------------------------------------------------------ checkpoints

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Leave out the parameters that the forward pass never uses: smp keeps every stage of a
        torchvision-style encoder whatever ``encoder_depth`` (resnet18 at depth 2: 11M parameters
        stored, 0.2M used), and a checkpoint written every epoch would carry them each time.
        They are frozen at their initial values, which the same hyperparameters rebuild (bit for
        bit with ``init_seed``; without it, other never-used values: the outputs are the same)."""
        state = checkpoint["state_dict"]
        left_out = [key for key in self._unused_keys if state.pop(key, None) is not None]
        if left_out:
            checkpoint[UNUSED_KEY] = left_out

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Put back what :meth:`on_save_checkpoint` left out, from this module's own (identically
        built, never trained) weights, so that strict loading finds every key."""
        left_out = checkpoint.get(UNUSED_KEY, [])
        if not left_out:
            return
        own = self.state_dict() if self.model is not None else {}
        missing = [key for key in left_out if key not in own]
        if missing:
            raise RuntimeError(
                f"the checkpoint left out {len(missing)} never-used parameters (e.g. {missing[0]}) that this "
                "module does not have; build it with the checkpoint's hyperparameters"
            )
        state = checkpoint["state_dict"]
        for key in left_out:
            state.setdefault(key, own[key])

    def configure_optimizers(self):
        hp = self.hparams
        optimizer = torch.optim.AdamW(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        if hp.scheduler == "none":
            return optimizer
        steps = self.trainer.estimated_stepping_batches
        if not np.isfinite(steps):
            raise ValueError(
                f"scheduler={hp.scheduler!r} needs a finite training length: set max_epochs or max_steps "
                f"on the Trainer, or use scheduler='none'"
            )
        steps = max(int(steps), 1)
        if hp.scheduler == "cosine":
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
        else:
            scheduler = torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=steps, power=0.9)
        self._schedule = scheduler
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_train_start(self) -> None:
        """A fit resumed from a checkpoint under another length (``max_epochs``/``max_steps``)
        restores the checkpoint's schedule, whose length is the old one: the cosine would climb
        back to the initial rate past its end, the polynomial stay at 0. The module's own schedule
        is stretched (or shrunk) to this fit's length instead, from the step it resumes at, with a
        warning: the rate then jumps to where the new schedule has it."""
        scheduler = self._schedule
        configs = self.trainer.lr_scheduler_configs
        if scheduler is None or not any(config.scheduler is scheduler for config in configs):
            return  # no schedule of the module's own (scheduler="none", or replaced by the user)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        cosine = isinstance(scheduler, torch.optim.lr_scheduler.CosineAnnealingLR)
        length = scheduler.T_max if cosine else scheduler.total_iters
        if length == total:
            return
        step, before = scheduler.last_epoch, scheduler.get_last_lr()[0]
        setattr(scheduler, "T_max" if cosine else "total_iters", total)
        # the rate at this step of the new length (the schedulers' closed form); their recursion
        # goes on from it
        for group, lr in zip(scheduler.optimizer.param_groups, scheduler._get_closed_form_lr()):
            group["lr"] = lr
        scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]
        rank_zero_warn(
            f"resumed at step {step} with {total} optimizer steps in all where the checkpoint's {self.hparams.scheduler} "
            f"schedule had {length}: the schedule now spans {total} steps (learning rate {before:.3g} -> "
            f"{scheduler.get_last_lr()[0]:.3g})"
        )
