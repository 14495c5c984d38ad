"""The scripts of a Lightning user (issue 16, item 1): SegmentationModule and SegmentationDataModule
in a plain ``pl.Trainer`` with loggers, predict, step-sized schedules, a prebuilt model and smp's
auxiliary head. Tiny synthetic data and a depth-3 model keep each run to a few seconds."""

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import pytorch_lightning as pl
import segmentation_models_pytorch as smp
import torch
import yaml
from pytorch_lightning.callbacks import LearningRateMonitor
from pytorch_lightning.core.saving import load_hparams_from_yaml
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger

from smp_cbam import SegmentationDataModule, SegmentationModule
from smp_cbam.training.models import used_parameters

DATA = dict(
    dataset="synthetic",
    batch_size=4,
    synthetic={"size": 48, "cue_rows": 2, "gap": 8, "n_train": 8, "n_val": 4, "n_test": 6},
)
MODEL = dict(encoder="resnet18", encoder_depth=3, decoder_channels=(32, 16, 16))
QUIET = dict(enable_model_summary=False, enable_progress_bar=False)
DEPTH2 = {**MODEL, "encoder_depth": 2, "decoder_channels": (32, 16)}


def _weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items() if v.dtype.is_floating_point}


def _test_images(datamodule: SegmentationDataModule) -> tuple[torch.Tensor, torch.Tensor]:
    batches = list(datamodule.test_dataloader())
    return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])


def test_default_trainer_fits_validates_and_reloads(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    datamodule = SegmentationDataModule(**DATA)
    module = SegmentationModule(arch="unet", attention="cbam", **MODEL)
    assert module.model is None  # waits for the data module's number of classes
    trainer = pl.Trainer(max_epochs=1, log_every_n_steps=1)
    trainer.fit(module, datamodule=datamodule)

    assert module.num_classes == 4 and module.in_channels == 3
    assert module.class_names == list(datamodule.class_names)
    assert module.ignore_index == datamodule.ignore_index
    assert module.hparams.num_classes == 4 and "model" not in module.hparams
    assert {"train_loss", "val_loss", "val_miou"} <= trainer.callback_metrics.keys()
    assert {"train_loss_step", "val_loss", "val_miou"} <= trainer.progress_bar_metrics.keys()
    assert (tmp_path / "lightning_logs" / "version_0").is_dir()

    best = trainer.checkpoint_callback.best_model_path
    reloaded = SegmentationModule.load_from_checkpoint(best)  # built at once from the saved values
    images, _ = _test_images(datamodule)
    module.eval(), reloaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(images), module(images))
    assert reloaded.class_names == module.class_names


def test_checkpoints_leave_out_the_encoder_stages_the_model_never_uses(tmp_path) -> None:
    # resnet18 at depth 2: smp keeps layer2-layer4 (11M parameters) though the forward stops at layer1
    datamodule = SegmentationDataModule(**DATA)
    module = SegmentationModule(arch="unet", attention="cbam", init_seed=0, **DEPTH2)
    trainer = pl.Trainer(max_epochs=1, default_root_dir=tmp_path, **QUIET)
    trainer.fit(module, datamodule=datamodule)
    path = trainer.checkpoint_callback.best_model_path
    checkpoint = torch.load(path, weights_only=True)
    left_out = checkpoint["smp_cbam_unused_parameters"]
    assert "model.encoder.layer4.1.conv2.weight" in left_out and not any(".layer1." in k for k in left_out)
    assert not set(left_out) & set(checkpoint["state_dict"])
    assert Path(path).stat().st_size < 5_000_000  # with them: about 45 MB
    reloaded = SegmentationModule.load_from_checkpoint(path)  # strict: every key is back
    for key, value in module.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[key], value, rtol=0, atol=0, msg=key)
    images, _ = _test_images(datamodule)
    module.eval(), reloaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(images), module(images))
    # resuming training from it, as the runner does after an interruption
    again = pl.Trainer(max_epochs=2, default_root_dir=tmp_path, **QUIET)
    again.fit(SegmentationModule(arch="unet", attention="cbam", **DEPTH2),
              datamodule=datamodule, ckpt_path=path, weights_only=True)  # fmt: skip
    assert again.current_epoch == 2


def test_csv_logger_records_step_loss_epoch_metrics_and_learning_rate(tmp_path) -> None:
    datamodule = SegmentationDataModule(**DATA)
    module = SegmentationModule(arch="unet", attention="cbam", **MODEL)
    logger = CSVLogger(tmp_path, name="csv")
    trainer = pl.Trainer(
        max_epochs=2, logger=logger, log_every_n_steps=1, callbacks=[LearningRateMonitor("step")], **QUIET
    )
    trainer.fit(module, datamodule=datamodule)

    metrics = pd.read_csv(f"{logger.log_dir}/metrics.csv")
    assert metrics["train_loss_step"].notna().sum() == 4  # 2 epochs of 2 steps
    assert metrics["train_loss_epoch"].notna().sum() == 2
    assert metrics["val_miou"].dropna().between(0, 1).all() and metrics["val_miou"].notna().sum() == 2
    assert {"val_loss", "val_dice", "val_iou_background"} <= set(metrics.columns)
    lrs = metrics["lr-AdamW"].dropna().to_numpy()
    assert len(lrs) == 4 and lrs[0] == pytest.approx(1e-3) and np.all(np.diff(lrs) < 0)
    hparams = load_hparams_from_yaml(f"{logger.log_dir}/hparams.yaml")
    assert hparams["arch"] == "unet" and hparams["attention"] == "cbam" and hparams["dataset"] == "synthetic"


def test_tensorboard_logger_writes_the_metrics(tmp_path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    datamodule = SegmentationDataModule(**DATA)
    module = SegmentationModule(arch="unet", attention="scse", **MODEL)
    logger = TensorBoardLogger(tmp_path, name="tb")
    trainer = pl.Trainer(max_epochs=1, logger=logger, log_every_n_steps=1, **QUIET)
    trainer.fit(module, datamodule=datamodule)
    trainer.test(module, datamodule=datamodule)

    events = EventAccumulator(logger.log_dir)
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"train_loss_step", "train_loss_epoch", "val_loss", "val_miou", "test_miou", "test_dice"} <= scalars
    assert len(events.Scalars("train_loss_step")) == 2
    assert 0 <= events.Scalars("test_miou")[0].value <= 1


def test_predict_returns_labels_or_probabilities(tmp_path) -> None:
    datamodule = SegmentationDataModule(**DATA)
    module = SegmentationModule(arch="unetplusplus", attention="cbam", **MODEL)
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, **QUIET)
    trainer.fit(module, datamodule=datamodule)

    labels = trainer.predict(module, dataloaders=datamodule.test_dataloader())
    images, _ = _test_images(datamodule)
    assert [p.shape for p in labels] == [(4, 64, 64), (2, 64, 64)] and labels[0].dtype == torch.int64
    module.eval()
    with torch.no_grad():
        logits = module(images)
    expected = logits.argmax(1)
    # after one epoch the classes' logits nearly tie in places, where another batch size's rounding
    # (the loader's batches of 4 and 2 against all 6 here) may pick the other class
    top = logits.topk(2, dim=1).values
    clear = top[:, 0] - top[:, 1] > 1e-4
    assert clear.float().mean() > 0.9

    def same(labels: torch.Tensor, n: int = 6) -> bool:
        return torch.equal(labels[clear[:n]], expected[:n][clear[:n]])

    assert same(torch.cat(labels))
    module.predict_output = "probabilities"
    probabilities = torch.cat(trainer.predict(module, dataloaders=datamodule.test_dataloader()))
    assert probabilities.shape == (6, 4, 64, 64)
    torch.testing.assert_close(probabilities.sum(1), torch.ones(6, 64, 64))
    torch.testing.assert_close(probabilities, logits.softmax(1), rtol=1e-4, atol=1e-5)
    assert same(probabilities.argmax(1))
    # plain image batches work too
    plain = torch.utils.data.DataLoader(images[:3], batch_size=3)
    assert same(torch.cat(pl.Trainer(logger=False, **QUIET).predict(module, plain)).argmax(1), 3)


def test_max_steps_gets_a_schedule_of_that_many_steps() -> None:
    datamodule = SegmentationDataModule(**DATA)  # 2 steps per epoch
    module = SegmentationModule(arch="unet", attention="cbam", lr=0.01, **MODEL)
    seen: list[float] = []

    class RecordLR(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(trainer.optimizers[0].param_groups[0]["lr"])

    trainer = pl.Trainer(
        max_steps=5, logger=False, enable_checkpointing=False, callbacks=[RecordLR()], limit_val_batches=0, **QUIET
    )
    trainer.fit(module, datamodule=datamodule)
    config = trainer.lr_scheduler_configs[0]
    assert config.interval == "step" and config.scheduler.T_max == 5 and trainer.global_step == 5
    expected = [0.01 * (1 + math.cos(math.pi * k / 5)) / 2 for k in range(5)]
    np.testing.assert_allclose(seen, expected, rtol=1e-6)
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_predicted_probabilities_are_float32_under_bf16_and_back_at_image_size() -> None:
    datamodule = SegmentationDataModule(**DATA)
    module = SegmentationModule(num_classes=4, in_channels=3, predict_output="probabilities", **MODEL)
    trainer = pl.Trainer(precision="bf16-mixed", logger=False, **QUIET)
    batches = trainer.predict(module, datamodule=datamodule)
    assert batches[0].dtype == torch.float32 and batches[0].shape[1:] == (4, 64, 64)  # 48x48 padded
    images = datamodule.to_image_size(batches)
    assert len(images) == 6 and images[0].shape == (4, 48, 48)
    torch.testing.assert_close(images[0], batches[0][0, :, :48, :48])


@pytest.mark.parametrize("scheduler", ["cosine", "poly"])
def test_a_fit_resumed_for_longer_decays_over_its_new_length(tmp_path, scheduler) -> None:
    # the checkpoint's schedule has the first fit's length: restored as it is, the cosine climbed
    # back to the initial rate after its end
    seen: list[float] = []

    class RecordLR(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(trainer.optimizers[0].param_groups[0]["lr"])

    def fit(max_steps: int, ckpt_path: str | None = None) -> pl.Trainer:
        module = SegmentationModule(arch="unet", attention="cbam", lr=0.01, scheduler=scheduler, **MODEL)
        trainer = pl.Trainer(
            max_steps=max_steps, default_root_dir=tmp_path, logger=False, callbacks=[RecordLR()], limit_val_batches=0,
            **QUIET,
        )  # fmt: skip
        trainer.fit(module, datamodule=SegmentationDataModule(**DATA), ckpt_path=ckpt_path)
        return trainer

    def rate(k: int, total: int) -> float:
        return 0.01 * ((1 + math.cos(math.pi * k / total)) / 2 if scheduler == "cosine" else (1 - k / total) ** 0.9)

    first = fit(2)  # one epoch of 2 steps, decayed to 0
    with pytest.warns(UserWarning, match="resumed at step 2 with 6 optimizer steps in all where the checkpoint"):
        resumed = fit(6, first.checkpoint_callback.best_model_path)
    np.testing.assert_allclose(seen, [rate(k, 2) for k in range(2)] + [rate(k, 6) for k in range(2, 6)], rtol=1e-6)
    assert resumed.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_prebuilt_smp_model_trains_and_reloads(tmp_path) -> None:
    datamodule = SegmentationDataModule(**DATA)
    model = smp.Unet("resnet18", encoder_weights=None, encoder_depth=3, decoder_channels=(16, 8, 8), classes=4)
    module = SegmentationModule(model=model)
    before = _weights(model)
    trainer = pl.Trainer(max_epochs=1, logger=CSVLogger(tmp_path), **QUIET)
    trainer.fit(module, datamodule=datamodule)
    assert module.model is model and "model" not in module.hparams
    after = _weights(model)
    assert any(not torch.equal(before[k], after[k]) for k in before)

    fresh = smp.Unet("resnet18", encoder_weights=None, encoder_depth=3, decoder_channels=(16, 8, 8), classes=4)
    reloaded = SegmentationModule.load_from_checkpoint(trainer.checkpoint_callback.best_model_path, model=fresh)
    assert reloaded.model is fresh and reloaded.num_classes == 4
    images, _ = _test_images(datamodule)
    module.eval(), reloaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(images), module(images))


def test_prebuilt_model_with_the_wrong_number_of_outputs_is_named() -> None:
    datamodule = SegmentationDataModule(**DATA)
    model = smp.Unet("resnet18", encoder_weights=None, encoder_depth=3, decoder_channels=(16, 8, 8), classes=3)
    trainer = pl.Trainer(max_steps=1, logger=False, enable_checkpointing=False, **QUIET)
    with pytest.raises(ValueError, match="outputs 3 channels, but num_classes=4"):
        trainer.fit(SegmentationModule(model=model), datamodule=datamodule)


def test_aux_params_train_a_class_presence_head() -> None:
    datamodule = SegmentationDataModule(**DATA)
    module = SegmentationModule(arch="unet", attention="cbam", model_kwargs={"aux_params": {"dropout": 0.1}}, **MODEL)
    before: dict[str, torch.Tensor] = {}

    class Before(pl.Callback):
        def on_fit_start(self, trainer, pl_module):  # after configure_model built the model
            before.update(_weights(pl_module.model.classification_head))

    trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, callbacks=[Before()], **QUIET)
    trainer.fit(module, datamodule=datamodule)
    linear = [m for m in module.model.classification_head.modules() if isinstance(m, torch.nn.Linear)]
    assert linear[0].out_features == 4  # classes filled in from the data module
    after = _weights(module.model.classification_head)
    assert all(not torch.equal(before[k], after[k]) for k in before)  # the head is trained
    images, _ = _test_images(datamodule)
    assert module(images).shape == (6, 4, 64, 64)  # forward gives the mask logits only
    assert {"classification_head.3.weight", "classification_head.3.bias"} <= set(
        used_parameters(module.model, images[:1])
    )


def test_given_values_that_contradict_the_data_module_are_named() -> None:
    datamodule = SegmentationDataModule(**DATA)
    trainer = pl.Trainer(max_steps=1, logger=False, enable_checkpointing=False, **QUIET)
    with pytest.raises(
        ValueError, match="num_classes=3 was given to SegmentationModule, but the data module has num_classes=4"
    ):
        trainer.fit(SegmentationModule(num_classes=3, **MODEL), datamodule=datamodule)


def test_without_a_data_module_num_classes_is_required() -> None:
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.randn(2, 3, 32, 32), torch.zeros(2, 32, 32, dtype=torch.long))
    )
    trainer = pl.Trainer(max_steps=1, logger=False, enable_checkpointing=False, **QUIET)
    with pytest.raises(ValueError, match="num_classes is not known"):
        trainer.fit(SegmentationModule(**MODEL), loader)


def test_values_given_by_hand_log_beside_the_data_modules(tmp_path) -> None:
    assert SegmentationDataModule(**DATA).hparams.get("num_classes") == 4  # the resolved value, saved
    datamodule = SegmentationDataModule(**DATA)
    module = SegmentationModule(
        num_classes=datamodule.num_classes,
        in_channels=datamodule.in_channels,
        class_names=datamodule.class_names,
        ignore_index=datamodule.ignore_index,
        **MODEL,
    )
    logger = CSVLogger(tmp_path)
    pl.Trainer(max_epochs=1, logger=logger, **QUIET).fit(module, datamodule=datamodule)
    hparams = load_hparams_from_yaml(f"{logger.log_dir}/hparams.yaml")
    assert hparams["num_classes"] == 4


def test_per_image_counts_of_trainer_test_match_the_predictions() -> None:
    datamodule = SegmentationDataModule(**DATA)
    module = SegmentationModule(arch="unet", attention="cbam", **MODEL)
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, **QUIET)
    trainer.fit(module, datamodule=datamodule)
    trainer.test(module, datamodule=datamodule, verbose=False)
    counts = module.per_image_counts
    assert counts.shape == (6, 3, 4) and counts.dtype == np.int64

    predictions = torch.cat(trainer.predict(module, dataloaders=datamodule.test_dataloader())).numpy()
    _, masks = _test_images(datamodule)
    masks = masks.numpy()
    for i in range(6):
        keep = masks[i] != datamodule.ignore_index
        p, t = predictions[i][keep], masks[i][keep]
        for c in range(4):
            assert counts[i, :, c].tolist() == [
                np.sum((p == c) & (t == c)),
                np.sum((p == c) & (t != c)),
                np.sum((p != c) & (t == c)),
            ]
    trainer.test(module, datamodule=datamodule, verbose=False)  # a second test starts afresh
    np.testing.assert_array_equal(module.per_image_counts, counts)
    # several loaders at once would pool their IoU into one number: named, and one at a time works
    loaders = [datamodule.test_dataloader(), datamodule.val_dataloader()]
    with pytest.raises(ValueError, match="evaluates one test dataloader at a time, got 2"):
        trainer.test(module, dataloaders=loaders, verbose=False)
    with pytest.raises(ValueError, match="evaluates one val dataloader at a time, got 2"):
        trainer.validate(module, dataloaders=loaders, verbose=False)
    trainer.test(module, dataloaders=loaders[0], verbose=False)
    np.testing.assert_array_equal(module.per_image_counts, counts)


@pytest.mark.slow
def test_lightning_cli_sets_every_argument_of_both_classes(tmp_path) -> None:
    from pytorch_lightning.cli import LightningCLI

    args = [
        "fit",
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.max_epochs=1",
        "--trainer.enable_progress_bar=false",
        "--data.batch_size=4",
        f"--data.synthetic={DATA['synthetic']}",
        "--model.attention=cbam_spatial",
        "--model.encoder_depth=3",
        "--model.decoder_channels=[32, 16, 16]",
        "--model.lr=0.005",
    ]
    cli = LightningCLI(SegmentationModule, SegmentationDataModule, args=args)
    assert cli.model.num_classes == 4 and cli.model.hparams.lr == 0.005
    assert "val_miou" in cli.trainer.callback_metrics
    assert (tmp_path / "lightning_logs" / "version_0" / "config.yaml").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("cli_class", ["LightningCLI", "TrainCLI"])
def test_lightning_cli_tests_and_resumes_from_a_checkpoint_with_a_logger(tmp_path, cli_class) -> None:
    # Lightning's CLI hands the module the checkpoint's hyperparameters; logging them beside the data
    # module's failed ("Error while merging hparams") while the two kept class_names as list and tuple.
    # TrainCLI's own --ckpt_path clashed with the subcommands' when used with them.
    from pytorch_lightning.cli import LightningCLI

    from smp_cbam.training.cli import TrainCLI

    cli_type = TrainCLI if cli_class == "TrainCLI" else LightningCLI
    config = tmp_path / "config.yaml"
    config.write_text(
        f"""
model:
  attention: cbam
  encoder_depth: 3
  decoder_channels: [32, 16, 16]
data:
  batch_size: 4
  synthetic: {DATA["synthetic"]}
trainer:
  default_root_dir: {tmp_path}
  max_epochs: 1
  enable_progress_bar: false
  enable_model_summary: false
"""
    )
    fit = cli_type(SegmentationModule, SegmentationDataModule, args=["fit", f"--config={config}"])
    checkpoint = fit.trainer.checkpoint_callback.best_model_path
    logged = yaml.safe_load(Path(fit.trainer.logger.log_dir, "hparams.yaml").read_text())  # plain YAML
    assert logged["class_names"] == list(SegmentationDataModule(**DATA).class_names)
    names = ",".join(logged["class_names"])
    for args, metric in (
        (["test", f"--ckpt_path={checkpoint}"], "test_miou"),
        (["fit", f"--ckpt_path={checkpoint}", "--trainer.max_epochs=2"], "val_miou"),
        # TrainCLI links the names from the data module: --model.class_names is LightningCLI's only
        (
            ["validate", f"--model.class_names=[{names}]" if cli_type is LightningCLI else "--data.batch_size=2"],
            "val_miou",
        ),
    ):
        cli = cli_type(SegmentationModule, SegmentationDataModule, args=[args[0], f"--config={config}", *args[1:]])
        assert cli.model.class_names == logged["class_names"] and metric in cli.trainer.callback_metrics, args
        if args[0] == "fit":  # resumed after the checkpoint's epoch, not from scratch
            assert cli.trainer.current_epoch == 2 and cli.trainer.global_step == 2 * fit.trainer.global_step


DDP_SCRIPT = """
import sys
import numpy as np
import pytorch_lightning as pl
import torch
from smp_cbam import SegmentationDataModule, SegmentationModule

devices, out = int(sys.argv[1]), sys.argv[2]
torch.set_num_threads(1)
datamodule = SegmentationDataModule(**{data})
module = SegmentationModule(arch="unet", attention="cbam", init_seed=0, **{model})
trainer = pl.Trainer(
    accelerator="cpu", devices=devices, strategy="ddp_find_unused_parameters_true" if devices > 1 else "auto",
    logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
)
trainer.test(module, datamodule=datamodule, verbose=False)
if trainer.is_global_zero:
    np.save(out, module.per_image_counts)
"""


@pytest.mark.slow
def test_per_image_counts_under_two_process_ddp_keep_the_loader_order(tmp_path) -> None:
    import os
    import subprocess
    import sys

    data = {**DATA, "synthetic": {**DATA["synthetic"], "n_test": 7}, "batch_size": 2}  # 7 images: padded sampler
    script = tmp_path / "ddp_test.py"
    script.write_text(DDP_SCRIPT.format(data=data, model=MODEL))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for devices in (1, 2):
        subprocess.run(
            [sys.executable, str(script), str(devices), str(tmp_path / f"counts{devices}.npy")],
            check=True, env=env, cwd=tmp_path, capture_output=True, timeout=300,
        )  # fmt: skip
    one, two = np.load(tmp_path / "counts1.npy"), np.load(tmp_path / "counts2.npy")
    assert one.shape == (7, 3, 4)
    np.testing.assert_array_equal(two, one)
