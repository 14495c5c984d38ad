"""Multi-process training: a 2-process CPU DDP comparison (gloo), and the unused-parameter fix."""

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from smp_cbam.training.module import build_model

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "grid": {"archs": ["unet"], "attentions": ["none", "cbam"], "seeds": [0]},
    "data": {
        "dataset": "synthetic",
        "batch_size": 4,
        "synthetic": {"size": 48, "cue_rows": 2, "gap": 8, "n_train": 16, "n_val": 8, "n_test": 8},
    },
    "model": {"encoder_depth": 3, "decoder_channels": [32, 16, 16]},
    "train": {"epochs": 2},
}


@pytest.mark.parametrize(("arch", "attention"), [("unet", "cbam"), ("unetplusplus", "scse"), ("fpn", None)])
def test_every_trainable_parameter_gets_a_gradient(arch: str, attention: str | None) -> None:
    """DDP's condition: a depth-3 encoder's stages 4-5 and Unet's skip-less attention1 never run."""
    decoder = None if arch == "fpn" else [32, 16, 16]
    model = build_model(
        arch, "resnet18", attention, in_channels=3, classes=4, decoder_channels=decoder, seed=0, encoder_depth=3
    )
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    assert any(name.startswith("encoder.layer4.") for name in frozen)
    assert not any(name.startswith(("encoder.layer1.", "encoder.layer2.", "encoder.conv1")) for name in frozen)
    if arch == "unet":
        assert any(".attention1." in name for name in frozen)
    model.train()(torch.randn(2, 3, 64, 64)).sum().backward()
    missing = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
    assert all(p.grad is None for name, p in model.named_parameters() if name in frozen)


def test_freezing_keeps_the_state_dict_and_the_paired_init() -> None:
    import segmentation_models_pytorch as smp

    model = build_model(
        "unet", "resnet18", "cbam", in_channels=3, classes=4, decoder_channels=[32, 16, 16], seed=3, encoder_depth=3
    )
    torch.manual_seed(3)
    plain = smp.create_model("unet", "resnet18", encoder_depth=3, encoder_weights=None, classes=4,
                             decoder_channels=[32, 16, 16], decoder_attention_type="cbam")  # fmt: skip
    assert model.state_dict().keys() == plain.state_dict().keys()
    reference = build_model(
        "unet", "resnet18", None, in_channels=3, classes=4, decoder_channels=[32, 16, 16], seed=3, encoder_depth=3
    )
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], value, rtol=0, atol=0)


@pytest.mark.slow
def test_two_process_cpu_ddp_comparison(tmp_path: Path) -> None:
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    output = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))}
    env["OMP_NUM_THREADS"] = "1"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "smp_cbam",
            "compare",
            "--config",
            str(config),
            "--output",
            str(output),
            "--accelerator",
            "cpu",
            "--devices",
            "2",
            "--strategy",
            "ddp",
            "--malloc-default",
        ],  # fmt: skip
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "GLOBAL_RANK: 1" in done.stdout + done.stderr  # two processes trained
    # one printed summary and one progress log, from rank 0
    assert done.stdout.count("# smp-cbam attention comparison") == 1
    assert done.stdout.count("Results: ") == 1
    assert done.stdout.count("[run 1/2] unet-none-s0") == 1
    results = pd.read_csv(output / "results.csv")
    assert list(results["attention"]) == ["none", "cbam"]
    assert set(results["status"]) == {"ok"}, results["failure"].tolist()
    assert results[["val_miou", "test_miou"]].apply(lambda c: c.between(0, 1)).all().all()
    for name in ("unet-none-s0", "unet-cbam-s0"):
        history = pd.read_csv(output / "runs" / name / "history.csv")
        assert list(history["epoch"]) == [0, 1]
        # 16 images, 2 ranks x batch 4: 2 optimizer steps per epoch; the log lines are rank 0's
        assert (output / "runs" / name / "log.txt").read_text().count("epoch 1/2") == 1


@pytest.mark.slow
def test_two_process_cpu_ddp_train(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH")))),
        "OMP_NUM_THREADS": "1",
    }
    done = subprocess.run(
        [sys.executable, "-m", "smp_cbam", "train", "--data.synthetic", '{"size": 48, "cue_rows": 2, "gap": 8, "n_train": 16, "n_val": 8, "n_test": 8}',
         "--data.batch_size", "4", "--model.encoder_depth", "3", "--model.decoder_channels", "[32, 16, 16]",
         "--trainer.max_epochs", "2", "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
         "--trainer.logger", "false", "--trainer.default_root_dir", "run", "--trainer.enable_progress_bar", "false",
         "--malloc_default", "true"],  # fmt: skip
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "GLOBAL_RANK: 1" in done.stdout + done.stderr
    assert done.stdout.count("Best checkpoint: run/checkpoints/best.ckpt") == 1  # printed by rank 0 only
    assert "test_miou" in done.stdout
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()
