"""Calibrates the main job's budget on the synthetic task: trains a grid with Lightning's
EarlyStopping on ``val_miou`` (the plateau rule the runner applies) and prints, per run, the
seconds per epoch, the epoch the rule stopped at, the best epoch, and the test metrics of the best
checkpoint: mIoU, mIoU over the context pixels (:func:`context_miou`), pixel accuracy there, and
the IoU of "textured object" against the rest (the part of the task that needs no cue).

    PYTHONPATH=. OMP_NUM_THREADS=1 python experiments/synthetic_calibration.py --seeds 0 1

The defaults are the main job's settings (experiments/configs/synthetic.yaml); the options
change one at a time. The best epoch printed counts from 0.

Wall times on a shared CPU are pessimistic: other processes compete for the cores; the CPU
seconds of this (single-threaded) process are what an idle core would take.
"""

import argparse
import tempfile
import time
import warnings

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint

import smp_cbam  # noqa: F401  registers the attention names
from smp_cbam.training.data import SegmentationDataModule
from smp_cbam.training.module import SegmentationModule
from smp_cbam.training.synthetic import context_miou, generate_splits


class EpochTimes(pl.Callback):
    def __init__(self):
        self.seconds: list[float] = []
        self.val: list[float] = []
        self.cpu: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module):
        self._start = time.perf_counter()
        self._cpu = time.process_time()

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.seconds.append(time.perf_counter() - self._start)
            self.cpu.append(time.process_time() - self._cpu)
            self.val.append(float(trainer.callback_metrics["val_miou"]))
            print(
                f"    epoch {len(self.val)}: val_miou {self.val[-1]:.3f}  {self.seconds[-1]:.1f}s wall {self.cpu[-1]:.1f}s cpu",
                flush=True,
            )


def predict(module: SegmentationModule, datamodule: SegmentationDataModule) -> np.ndarray:
    module.eval()
    with torch.inference_mode():
        return torch.cat([module(x).argmax(1) for x, *_ in datamodule.test_dataloader()]).numpy()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--archs", nargs="+", default=["unet"])
    parser.add_argument("--attentions", nargs="+", default=["none", "scse", "cbam", "cbam_residual"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--n-train", type=int, default=192)
    parser.add_argument("--cue-rows", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--encoder-depth", type=int, default=2)
    parser.add_argument("--decoder-channels", nargs="+", type=int, default=[32, 16])
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--max-epochs", type=int, default=30)
    parser.add_argument("--patience", type=int, default=6)
    parser.add_argument("--min-delta", type=float, default=0.01)
    parser.add_argument("--min-epochs", type=int, default=0)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    synthetic = {"n_train": args.n_train, "cue_rows": args.cue_rows}
    test = generate_splits(**synthetic)["test"]
    print(
        "arch attention seed | cpu s/epoch epochs best | test_miou context_miou context_acc object_iou | total_s",
        flush=True,
    )
    for seed in args.seeds:
        for arch in args.archs:
            for attention in args.attentions:
                start, cpu_start = time.perf_counter(), time.process_time()
                pl.seed_everything(seed, verbose=False)
                dm = SegmentationDataModule(
                    batch_size=args.batch_size, seed=seed, scale=(1.0, 1.0), synthetic=synthetic
                )
                dm.setup("fit")
                module = SegmentationModule(
                    arch=arch, encoder="resnet18", attention=None if attention == "none" else attention,
                    num_classes=dm.num_classes, ignore_index=dm.ignore_index, class_names=dm.class_names,
                    decoder_channels=args.decoder_channels, encoder_depth=args.encoder_depth,
                    lr=args.lr, init_seed=seed,
                )  # fmt: skip
                times = EpochTimes()
                with tempfile.TemporaryDirectory() as tmp:
                    best = ModelCheckpoint(dirpath=tmp, monitor="val_miou", mode="max")
                    stop = EarlyStopping("val_miou", min_delta=args.min_delta, patience=args.patience, mode="max")
                    trainer = pl.Trainer(
                        max_epochs=args.max_epochs, min_epochs=args.min_epochs, callbacks=[times, best, stop], logger=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        accelerator="cpu", devices=1,
                    )  # fmt: skip
                    trainer.fit(module, datamodule=dm)
                    module = SegmentationModule.load_from_checkpoint(best.best_model_path)
                pred = predict(module, dm)
                true = test.masks
                ious = [((pred == c) & (true == c)).sum() / max(((pred == c) | (true == c)).sum(), 1) for c in range(4)]
                obj_p, obj_t = (pred > 0), test.context
                object_iou = (obj_p & obj_t).sum() / (obj_p | obj_t).sum()
                ctx_acc = (pred[test.context] == true[test.context]).mean()
                print(
                    f"{arch} {attention} {seed} | {np.median(times.cpu):.1f} {len(times.seconds)} "
                    f"{int(np.argmax(times.val))} | {np.mean(ious):.3f} {context_miou(pred, true, test.context):.3f} "
                    f"{ctx_acc:.3f} {object_iou:.3f} | {time.perf_counter() - start:.0f} wall {time.process_time() - cpu_start:.0f} cpu"
                    f"  val: {' '.join(f'{v:.2f}' for v in times.val)}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
