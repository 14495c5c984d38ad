"""The ``smp-cbam`` command: fast help, LightningCLI ``train``, and one-line errors (status 2)."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from smp_cbam.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY_DATA = '{"size": 48, "cue_rows": 2, "gap": 8, "n_train": 16, "n_val": 8, "n_test": 8}'
TINY_TRAIN = [
    "--data.synthetic", TINY_DATA, "--data.batch_size", "8",
    "--model.encoder_depth", "3", "--model.decoder_channels", "[32, 16, 16]",
    "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false",
    "--trainer.enable_model_summary", "false", "--trainer.num_sanity_val_steps", "0",
    "--trainer.accelerator", "cpu", "--trainer.devices", "1",
]  # fmt: skip


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False
    )


def _error_line(capsys: pytest.CaptureFixture) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    # one error line; torch may log a line of its own first (cpp_extension's CUDA notice on first import)
    lines = [line for line in err.splitlines() if line.startswith("smp-cbam: error: ")]
    assert len(lines) == 1, err
    return lines[0]


# ---------------------------------------------------------------------------------------------
# help and lazy imports


def test_help_imports_neither_torch_nor_smp() -> None:
    """The console script imports ``smp_cbam`` then ``smp_cbam.cli``: neither may load torch."""
    done = _python(
        "import sys\n"
        "from smp_cbam.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
        "heavy = [m for m in ('torch', 'segmentation_models_pytorch', 'pytorch_lightning') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    assert done.returncode == 0, done.stderr
    assert "compare" in done.stdout and "train" in done.stdout
    assert "HEAVY []" in done.stdout


@pytest.mark.slow
def test_import_registers_the_names_when_smp_is_imported_later() -> None:
    done = _python(
        "import sys\n"
        "import smp_cbam\n"
        "assert 'torch' not in sys.modules\n"
        "import segmentation_models_pytorch as smp\n"
        "model = smp.Unet('resnet18', encoder_weights=None, decoder_attention_type='eca', encoder_depth=3,\n"
        "                 decoder_channels=[16, 16, 16])\n"
        "print(type(model.decoder.blocks[0].attention2.attention).__name__, smp.__loader__.__class__.__name__)\n"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["ECA", "SourceFileLoader"]


def test_compare_help_shows_defaults(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", "--help"])
    assert exit_info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines at the terminal width
    assert "--retry-failed" in out and "(default: False)" in out
    assert "(default: the main job, experiments/configs/synthetic.yaml)" in out
    assert "(default: None)" not in out


def test_unknown_command_line_option_is_a_usage_error(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", "--epoch", "3", "--bogus"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# configuration and data errors: one line, status 2, no traceback


def test_missing_config_file_is_named(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    missing = tmp_path / "nope.yaml"
    assert main(["compare", "--config", str(missing), "--output", str(tmp_path / "out")]) == 2
    assert str(missing) in _error_line(capsys)


def test_unknown_config_key_is_named(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("train:\n  epochz: 3\n")
    assert main(["compare", "--config", str(config), "--output", str(tmp_path / "out")]) == 2
    assert "train.epochz" in _error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_bad_epochs_value_is_named(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["compare", "--epochs", "0", "--output", str(tmp_path / "out")]) == 2
    assert "train.max_epochs" in _error_line(capsys)


@pytest.mark.parametrize("where", ["file", "under_file"])
def test_output_that_is_a_file_is_named(tmp_path: Path, capsys: pytest.CaptureFixture, where: str) -> None:
    blocker = tmp_path / "results"
    blocker.write_text("not a directory")
    output = blocker if where == "file" else blocker / "sub"
    assert main(["compare", "--output", str(output), "--epochs", "1"]) == 2
    line = _error_line(capsys)
    assert str(blocker) in line and "output" in line


def test_output_holding_other_files_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "summary.md").write_text("my notes")
    assert main(["compare", "--output", str(notes), "--epochs", "1", "--seeds", "0", "--attentions", "none"]) == 2
    assert "holds files and no config.yaml" in _error_line(capsys)
    assert (notes / "summary.md").read_text() == "my notes" and sorted(p.name for p in notes.iterdir()) == [
        "summary.md"
    ]
    # a folder kept in git by a dot-file is as good as empty
    from smp_cbam.training.runner import check_resumable, load_config

    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / ".gitkeep").write_text("")
    assert check_resumable(load_config(overrides={"output": str(kept)}), kept)


def test_runs_of_an_older_version_name_the_key_it_did_not_write(tmp_path: Path) -> None:
    # an output directory written before train.loss_min_delta existed: its config.yaml lacks the key
    import yaml

    from smp_cbam.training.runner import ConfigError, check_resumable, configuration_changes, load_config

    out = tmp_path / "old"
    config = load_config(overrides={"output": str(out)})
    saved = config.to_dict()
    del saved["train"]["loss_min_delta"]
    (out / "runs" / "unet-none-s0").mkdir(parents=True)
    (out / "runs" / "unet-none-s0" / "result.json").write_text("{}")
    (out / "config.yaml").write_text(yaml.safe_dump(saved))
    with pytest.raises(ConfigError) as raised:
        check_resumable(config, out)
    assert "train.loss_min_delta: absent (an older smp-cbam: null) -> 0.01" in str(raised.value)
    assert str(raised.value).endswith(
        "to resume them, set train.loss_min_delta: null (the stopping rule on val mIoU alone); "
        "use another --output or remove that directory"
    )
    # with another key changed too, setting the old one is not enough, and the hint says so
    both = dataclasses.replace(config, train=dataclasses.replace(config.train, lr=0.5))
    with pytest.raises(
        ConfigError, match=r"train.lr: 0.003 -> 0.5.*null \(the stopping rule on val mIoU alone\) and undo"
    ):
        check_resumable(both, out)
    # a change of another key alone is named as such, without the older version's hint
    other = dataclasses.replace(config, train=dataclasses.replace(config.train, loss_min_delta=None, lr=0.5))
    with pytest.raises(ConfigError) as raised:
        check_resumable(other, out)
    assert "train.lr: 0.003 -> 0.5" in str(raised.value) and "older smp-cbam" not in str(raised.value)
    # values as the YAML file takes them; a key the saved file has and this version lacks is "absent"
    saved["model"]["decoder_channels"] = [64, 32]
    saved["train"]["obsolete"] = "x"
    changes = configuration_changes(saved, config)
    assert f"model.decoder_channels: [64, 32] -> {json.dumps(list(config.model.decoder_channels))}" in changes
    assert 'train.obsolete: "x" -> absent' in changes
    # with the old rule asked for, the runs resume
    old_rule = dataclasses.replace(config, train=dataclasses.replace(config.train, loss_min_delta=None))
    assert check_resumable(old_rule, out) is False


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--batch-size", "0"], "batch_size must be an integer >= 1, got 0"),
        (["--devices", "abc"], "trainer: `devices`"),
        (["--archs", "fpn"], "the model of arch 'fpn', attention 'none' cannot be built"),
        (["--config", "DIR/channels.yaml"], "decoder_channels"),
        (["--config", "DIR/scheduler.yaml"], "train.scheduler must be one of"),
    ],
    ids=["batch-size", "devices", "fpn-depth", "decoder-channels", "scheduler"],
)
def test_values_that_would_fail_every_run_are_refused_first(
    tmp_path: Path, capsys: pytest.CaptureFixture, args: list[str], named: str
) -> None:
    # they passed the typed check, and every run then failed (exit 1, the output written)
    (tmp_path / "channels.yaml").write_text("model: {decoder_channels: [32]}\n")
    (tmp_path / "scheduler.yaml").write_text("train: {scheduler: foo}\n")
    args = [a.replace("DIR", str(tmp_path)) for a in args]
    output = tmp_path / "out"
    assert (
        main(["compare", *args, "--output", str(output), "--seeds", "0", "--attentions", "none", "--epochs", "1"]) == 2
    )
    assert named in _error_line(capsys) and not output.exists()


@pytest.mark.parametrize("problem", ["data", "checkpoint"])
def test_train_names_bad_data_or_checkpoint_before_writing_logs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, problem: str
) -> None:
    # Lightning's loggers make their folders before the data module's setup and the checkpoint load
    import cv2
    import numpy as np

    monkeypatch.chdir(tmp_path)
    for name, size in (("a", 32), ("b", 40), ("c", 32)):  # b's size differs: they cannot be batched
        for folder, shape in (("images", (size, size, 3)), ("masks", (size, size))):
            (tmp_path / "data" / folder).mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(tmp_path / "data" / folder / f"{name}.png"), np.zeros(shape, np.uint8))
    if problem == "data":
        args = ["--data.dataset", "folder", "--data.root", "data", "--data.num_classes", "2"]
        named = "differ in size"
    else:
        args, named = [*TINY_TRAIN, "--ckpt_path", "nowhere.ckpt"], "--ckpt_path nowhere.ckpt: no such checkpoint file"
    assert main(["train", *args, "--malloc_default", "true"]) == 2
    assert named in _error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # no lightning_logs


def test_a_command_without_the_train_extras_says_how_to_install_them() -> None:
    # pandas hidden from a fresh interpreter, as in an install without [train]
    code = (
        "import sys\n"
        "class Hide:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'pandas':\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, Hide())\n"
        "from smp_cbam.cli import main\n"
        "sys.exit(main(['report', '.']))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "smp-cbam: error: report needs the train extras (no module named 'pandas')" in done.stderr
    assert "Traceback" not in done.stderr


def test_spawning_strategies_are_refused_for_compare(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["compare", "--strategy", "ddp_spawn", "--devices", "2", "--output", str(tmp_path / "out")]) == 2
    assert "trainer.strategy 'ddp_spawn'" in _error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_report_of_a_missing_directory_is_named(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert str(tmp_path / "missing") in _error_line(capsys)


def test_missing_data_root_is_named(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    missing = tmp_path / "data"
    code = main(["compare", "--dataset", "folder", "--data-root", str(missing), "--classes", "2",
                 "--output", str(tmp_path / "out"), "--malloc-default"])  # fmt: skip
    assert code == 2
    assert str(missing) in capsys.readouterr().err
    assert not (tmp_path / "out" / "runs").exists()


def test_compare_options_reach_the_configuration_a_user_expects(tmp_path: Path, monkeypatch) -> None:
    from smp_cbam.training import runner

    seen = {}

    def fake_compare(config, retry_failed=False):
        seen["config"] = config
        return None

    monkeypatch.setattr(runner, "compare", fake_compare)
    monkeypatch.setattr("smp_cbam.report.write_report", lambda *a, **k: "")
    (tmp_path / "data").mkdir()
    main(["compare", "--dataset", "folder", "--data-root", str(tmp_path / "data"), "--classes", "3",
          "--void-label", "255", "--output", str(tmp_path / "out"), "--malloc-default"])  # fmt: skip
    config = seen["config"]
    # the stored value of void pixels, not the index batches carry
    assert config.data["void_label"] == 255 and config.data["num_classes"] == 3
    # own data starts from the general setup (experiments/configs/folder.yaml), not the main job's
    # depth-2 encoder sized for its generated task
    assert config.model.encoder_depth == 5 and config.trainer["accelerator"] == "auto"


def test_retry_failed_reaches_the_runner_or_says_how(tmp_path: Path, monkeypatch, capsys) -> None:
    from smp_cbam.training import runner

    seen = {}

    def fake_compare(config, retry_failed=False):
        seen["retry_failed"] = retry_failed
        raise runner.ConfigError("stop here")

    monkeypatch.setattr(runner, "compare", fake_compare)
    assert main(["compare", "--retry-failed", "--output", str(tmp_path / "out"), "--malloc-default"]) == 2
    assert seen == {"retry_failed": True}
    assert "stop here" in _error_line(capsys)

    monkeypatch.setattr(runner, "compare", lambda config: pytest.fail("called without retry support"))
    assert main(["compare", "--retry-failed", "--output", str(tmp_path / "out"), "--malloc-default"]) == 2
    assert "--retry-failed" in _error_line(capsys)


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--model.lr", "abc"], "model.lr"),
        (["--model.scheduler", "linear"], "scheduler"),
        (["--data.datset", "camvid"], "--data.datset"),
        (["--data.dataset", "camvid"], "root"),
        (["--model.encoder", "resnet81"], "resnet81"),
        (["--model.arch", "unetx"], "unetx"),
        (["--model.attention", "cbamx"], "cbamx"),
        (["--lr_scheduler", "StepLR", "--lr_scheduler.step_size", "1"], "--lr_scheduler needs --optimizer"),
    ],
)
def test_train_configuration_errors_are_one_line(args: list[str], named: str, capsys) -> None:
    assert main(["train", *args, "--malloc_default", "true"]) == 2
    assert named in _error_line(capsys)


def test_train_missing_config_file_is_named(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    missing = tmp_path / "train.yaml"
    assert main(["train", "--config", str(missing)]) == 2
    assert "train.yaml" in _error_line(capsys)


# ---------------------------------------------------------------------------------------------
# smp-cbam train (LightningCLI)


def test_train_print_config_lists_every_section(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--model.attention", "scse", "--data.batch_size", "4", "--print_config"])
    assert exit_info.value.code == 0
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["model"]["attention"] == "scse" and config["data"]["batch_size"] == 4
    assert config["checkpoint"]["monitor"] == "val_miou" and config["checkpoint"]["mode"] == "max"
    assert config["trainer"]["max_epochs"] == 10
    assert {"lr", "encoder", "arch", "weight_decay"} <= set(config["model"])
    assert {"dataset", "root", "crop", "num_workers"} <= set(config["data"])


@pytest.mark.slow
def test_train_fits_and_tests_from_a_config_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["train", *TINY_TRAIN, "--print_config"])
    config = tmp_path / "train.yaml"
    config.write_text(capsys.readouterr().out)
    root = tmp_path / "run"
    code = main(["train", "--config", str(config), "--trainer.logger", "false",
                 "--trainer.default_root_dir", str(root), "--malloc_default", "true"])  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    best = root / "checkpoints" / "best.ckpt"
    assert best.exists() and (root / "checkpoints" / "last.ckpt").exists()
    assert f"Best checkpoint: {best}" in out
    assert "test_miou" in out  # Lightning's test table for the best checkpoint
    assert yaml.safe_load((root / "config.yaml").read_text())["model"]["encoder_depth"] == 3
    from smp_cbam import SegmentationModule
    from smp_cbam.training.synthetic import CLASS_NAMES

    trained = SegmentationModule.load_from_checkpoint(best)
    assert trained.hparams.num_classes == len(CLASS_NAMES)  # linked from the synthetic data module
    assert list(trained.class_names) == list(CLASS_NAMES)


def _data_hparams_resolved() -> bool:
    """Contract C4 (the data module saves its resolved values); until then Lightning's loggers
    refuse the module's and the data module's differing hparams."""
    from smp_cbam.training.data import SegmentationDataModule

    return SegmentationDataModule().hparams.get("num_classes") is not None


@pytest.mark.slow
@pytest.mark.xfail(not _data_hparams_resolved(), reason="needs the data module's resolved hparams (C4)", strict=True)
def test_train_with_a_csv_logger(tmp_path: Path) -> None:
    code = main(["train", *TINY_TRAIN, "--trainer.logger", "pytorch_lightning.loggers.CSVLogger",
                 "--trainer.logger.save_dir", str(tmp_path), "--test", "false", "--malloc_default", "true"])  # fmt: skip
    assert code == 0
    metrics = next(tmp_path.rglob("metrics.csv")).read_text()
    assert "val_miou" in metrics


@pytest.mark.parametrize("command", ["compare", "train"])
@pytest.mark.parametrize("keep", [True, False], ids=["keep-heap", "malloc-default"])
def test_commands_keep_the_heap_unless_told_not_to(tmp_path: Path, monkeypatch, command: str, keep: bool) -> None:
    calls = []
    monkeypatch.setattr("smp_cbam.training.malloc.keep_heap", lambda: calls.append(1) or True)
    if command == "compare":
        flag = [] if keep else ["--malloc-default"]
        args = ["compare", "--dataset", "folder", "--data-root", str(tmp_path / "missing"), "--classes", "2", *flag]
    else:  # the data module's folder check fails after the allocator is set
        flag = [] if keep else ["--malloc_default", "true"]
        args = ["train", "--data.dataset", "folder", "--data.root", str(tmp_path / "missing"), "--data.num_classes", "2",
                "--model.encoder", "resnet81", *flag]  # fmt: skip
    assert main([*args, "--output", str(tmp_path / "out")] if command == "compare" else args) == 2
    assert calls == ([1] if keep else [])
