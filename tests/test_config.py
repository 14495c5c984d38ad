"""The runner's typed configuration: YAML as users write it, names checked, output checked, no training."""

import dataclasses
import inspect
import os
from pathlib import Path

import pytest
import yaml

from smp_cbam.training import config as config_module
from smp_cbam.training.config import (
    DATASET_CONFIG_PATH,
    DEFAULT_CONFIG_PATH,
    Config,
    ConfigError,
    ModelConfig,
    TrainConfig,
    coerce,
    default_precision,
    from_dict,
)
from smp_cbam.training.data import SegmentationDataModule
from smp_cbam.training.module import SegmentationModule
from smp_cbam.training.runner import grid_runs, load_config

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "my.yaml"
    path.write_text(text)
    return path


def test_a_yaml_file_as_a_user_writes_it_is_typed(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "train:\n  lr: 1e-3\n  weight_decay: 5E-4\n  patience: 3\n  min_delta: '0.01'\n"
        "data:\n  batch_size: 4\n  crop: [64, 64]\n"
        "grid:\n  attentions: [null, cbam]\n",
    )
    assert yaml.safe_load(path.read_text())["train"]["lr"] == "1e-3"  # what PyYAML gives
    config = load_config(path, {"output": str(tmp_path / "out")})
    assert config.train.lr == 0.001 and isinstance(config.train.lr, float)
    assert config.train.weight_decay == 5e-4 and config.train.min_delta == 0.01
    assert config.data["batch_size"] == 4 and config.data["crop"] == [64, 64]
    assert config.grid.attentions[0] == "none"
    assert config.train.patience == 3
    assert config.train.loss_min_delta == 0.01  # the default: a falling validation loss is no plateau
    off = load_config(write(tmp_path, "train:\n  loss_min_delta: null\n"), {"output": str(tmp_path / "out")})
    assert off.train.loss_min_delta is None
    # every data module argument is recorded with its default
    assert config.data["num_workers"] == 0 and config.data["eval_mode"] == "pad"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("data:\n  batch_size: '4'\n", r"data.batch_size must be an integer, got '4' \(a quoted string in YAML\)"),
        ("train:\n  lr: fast\n", r"train.lr must be a number, got 'fast'$"),  # not quoted: no hint of quotes
        ("train:\n  epochz: 3\n", r"unknown config key 'train.epochz'"),
        ("train:\n  patiense: 3\n", r"'train.patiense' \(did you mean 'patience'\?\)"),
        ("trainr:\n  devices: 1\n", r"unknown config key 'trainr' \(did you mean 'trainer'\?\)"),
        ("data:\n  batchsize: 4\n", r"'data.batchsize' \(did you mean 'batch_size'\?\)"),
        ("trainer:\n  acelerator: cpu\n", r"'trainer.acelerator' \(did you mean 'accelerator'\?\)"),
        ("trainer:\n  max_epochs: 3\n", r"trainer.max_epochs is set by the runner"),
        ("trainer:\n  precision: bf17\n", r"trainer.precision must be one of auto, .*got 'bf17'"),
        ("trainer:\n  logger: mlfow\n", r"trainer.logger: unknown logger 'mlfow'"),
        ("model:\n  encoder: resnet81\n", r"model.encoder: unknown encoder 'resnet81'; close: resnet18"),
        ("model:\n  encoder: tu-resnet81\n", r"model.encoder: unknown timm encoder 'tu-resnet81'"),
        ("model:\n  encoder_depth: 3.5\n", r"model.encoder_depth must be an integer, got 3.5"),
        ("model:\n  decoder_channels: [64, '32', 16]\n", r"model.decoder_channels\[1\] must be an integer"),
        ("grid:\n  archs: [unet, unet_plus]\n", r"grid.archs: unknown architecture 'unet_plus'"),
        ("grid:\n  attentions: [none, cbma]\n", r"grid.attentions: unknown attention 'cbma'"),
        ("grid:\n  placements: [decoder, middle]\n", r"grid.placements: unknown placement 'middle'"),
        ("grid:\n  seeds: []\n", r"grid.seeds must be a non-empty list"),
        ("grid:\n  seeds: ['0']\n", r"grid.seeds\[0\] must be an integer"),
        ("train:\n  stop: forever\n", r"train.stop must be one of 'plateau', 'fixed', got 'forever'"),
        ("train:\n  max_epochs: 0\n", r"train.max_epochs must be >= 1"),
        ("train:\n  loss_min_delta: -0.1\n", r"train.loss_min_delta must be >= 0 or null, got -0.1"),
        ("train:\n  loss_min_delta: some\n", r"train.loss_min_delta must be a number"),
        ("train:\n  epochs: 5\n  max_epochs: 7\n", r"train.epochs \(5\) and train.max_epochs \(7\) disagree"),
        ("data:\n  eval_mode: crop\n", r"data: eval_mode must be .*'pad'.*'resize'"),
        ("data:\n  dataset: folder\n", r"data: dataset='folder' needs root="),
        ("- a list\n", r"must be a mapping of sections"),
    ],
)
def test_each_configuration_error_names_its_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, text), {"output": str(tmp_path / "out")})
    assert not (tmp_path / "out").exists()


def test_unusable_output_directories_are_named(tmp_path: Path, monkeypatch) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(ConfigError, match=r"output '.*afile' is a file"):
        load_config(overrides={"output": str(afile)})
    with pytest.raises(ConfigError, match=r"output '.*afile/out' lies under '.*afile', which is a file"):
        load_config(overrides={"output": str(afile / "out")})
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    readonly.chmod(0o555)
    if os.geteuid() == 0:  # root writes anywhere: ask the check as another user would be answered
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == readonly else real_access(p, mode))
    with pytest.raises(ConfigError, match=r"output '.*readonly/out': '.*readonly' is not writable"):
        load_config(overrides={"output": str(readonly / "out")})
    assert load_config(overrides={"output": str(tmp_path / "new" / "deeper")}).output.endswith("deeper")


def test_the_default_is_the_main_job_file_shipped_with_the_package() -> None:
    main_job = ROOT / "experiments" / "configs" / "synthetic.yaml"
    assert DEFAULT_CONFIG_PATH.resolve() == main_job.resolve()
    assert load_config(main_job) == load_config()
    raw = yaml.safe_load(main_job.read_text())
    config = load_config()
    assert config.output == raw["output"] and config.grid.archs == raw["grid"]["archs"]
    assert config.model.encoder_depth == raw["model"]["encoder_depth"]


def test_committed_configs_load() -> None:
    configs = sorted((ROOT / "experiments" / "configs").glob("*.yaml"))
    assert {p.stem for p in configs} >= {"synthetic", "camvid", "pets", "folder"}
    for path in configs:
        config = load_config(path)
        assert config.dataset == path.stem and config.output == f"runs/{path.stem}"


def test_switching_dataset_starts_afresh_from_the_general_setup(tmp_path: Path) -> None:
    config = load_config(overrides={"data": {"dataset": "folder", "root": str(tmp_path), "num_classes": 3}})
    assert config.output == "runs/folder" and config.data["num_classes"] == 3
    assert "synthetic" not in config.data or config.data["synthetic"] is None
    # not the main job's depth-2 encoder, lr and CPU-only Trainer, sized for its generated task
    general = yaml.safe_load((ROOT / "experiments" / "configs" / "folder.yaml").read_text())
    assert DATASET_CONFIG_PATH.resolve() == (ROOT / "experiments" / "configs" / "folder.yaml").resolve()
    assert config.model.encoder_depth == general["model"]["encoder_depth"] == 5
    assert config.model.decoder_channels == general["model"]["decoder_channels"]
    assert config.train.lr == general["train"]["lr"] and config.trainer["accelerator"] == "auto"
    assert load_config(overrides={"data": {"dataset": "camvid", "root": str(tmp_path)}}).model.encoder_depth == 5


def test_a_dataset_named_on_the_command_line_keeps_the_users_file(tmp_path: Path) -> None:
    # switching dataset replaced the whole configuration, the user's file included, silently
    mine = tmp_path / "mine.yaml"
    mine.write_text(
        "output: runs/exp1\n"
        "grid: {attentions: [none, cbam], seeds: [3]}\n"
        "data: {batch_size: 4}\n"
        "model: {encoder: resnet34}\n"
        "train: {max_epochs: 5}\n"
    )
    switch = {"data": {"dataset": "folder", "root": str(tmp_path), "num_classes": 3}}
    config = load_config(mine, switch)
    assert (config.output, config.grid.attentions, config.grid.seeds) == ("runs/exp1", ["none", "cbam"], [3])
    assert (config.model.encoder, config.train.max_epochs, config.data["batch_size"]) == ("resnet34", 5, 4)
    assert config.dataset == "folder" and config.model.encoder_depth == 5  # the general setup under the file
    # a data section written for another dataset does not carry over to the one named last
    camvid = tmp_path / "camvid.yaml"
    camvid.write_text(f"data: {{dataset: camvid, root: {tmp_path}, resize: [96, 128]}}\n")
    assert load_config(camvid, switch).data.get("resize") is None
    assert load_config(camvid, {"data": {"dataset": "synthetic"}}).data == load_config().data


def test_sections_map_onto_constructor_arguments() -> None:
    module = inspect.signature(SegmentationModule).parameters
    for f in dataclasses.fields(ModelConfig):  # model_kwargs: only in modules that take extra smp arguments
        assert f.name in module or (f.name == "model_kwargs" and f.default is None), f.name
    module_fields = [f.name for f in dataclasses.fields(TrainConfig) if f.metadata.get("module")]
    assert module_fields and all(name in module for name in module_fields)
    data = inspect.signature(SegmentationDataModule).parameters
    config = load_config()
    assert set(config.data) <= set(data) and "seed" not in config.data
    kwargs = {k: v for k, v in dataclasses.asdict(config.model).items() if k in module}
    kwargs.update(config.train.module_kwargs())
    SegmentationModule(arch="unet", attention=None, num_classes=4, **kwargs)  # they construct it as they are
    SegmentationDataModule(**config.data)


def test_config_round_trips_through_config_yaml(tmp_path: Path) -> None:
    config = load_config(overrides={"output": str(tmp_path), "train": {"stop": "fixed", "max_steps": 40}})
    text = yaml.safe_dump(config.to_dict(), sort_keys=False)
    assert from_dict(yaml.safe_load(text)) == config
    assert config.replace(grid={"seeds": [7]}).grid.seeds == [7]
    assert config["output"] == str(tmp_path) and config["grid"] is config.grid


def test_epochs_is_the_older_name_of_max_epochs() -> None:
    assert load_config(overrides={"train": {"epochs": 6}}).train.max_epochs == 6


def test_coerce_follows_annotations() -> None:
    assert coerce([1, 2], tuple[int, int], "k") == [1, 2]
    assert coerce(None, tuple[int, int] | None, "k") is None
    assert coerce("2e-4", float | None, "k") == 2e-4
    assert coerce(3, float, "k") == 3.0
    with pytest.raises(ConfigError, match="k must be a list of 2 integers"):
        coerce([1, 2, 3], tuple[int, int], "k")
    with pytest.raises(ConfigError, match="k must be true or false"):
        coerce("yes please", bool, "k")
    with pytest.raises(ConfigError, match="k must be an integer"):
        coerce(True, int, "k")


def test_precision_auto_follows_the_machine(monkeypatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(config_module, "cpu_has_native_bf16", lambda: True)
    assert default_precision() == "bf16-mixed" and default_precision("cpu") == "bf16-mixed"
    assert load_config(overrides={"trainer": {"precision": "auto"}}).trainer["precision"] == "bf16-mixed"
    monkeypatch.setattr(config_module, "cpu_has_native_bf16", lambda: False)
    assert default_precision("cpu") == "32-true"
    assert load_config(overrides={"trainer": {"precision": "auto"}}).trainer["precision"] == "32-true"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert default_precision("gpu") == "bf16-mixed" and default_precision("auto") == "bf16-mixed"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert default_precision("gpu") == "32-true"
    assert load_config(overrides={"trainer": {"precision": 16}}).trainer["precision"] == "16-mixed"


def test_real_data_trains_in_32_true_unless_bf16_is_asked_for(monkeypatch, tmp_path: Path) -> None:
    # bf16-mixed is not shown to reach fp32's mIoU on CamVid (experiments/results/camvid-precision):
    # a user's dataset gets it only by asking, even on a CPU with native bf16; the main job (its
    # parity shown on its generated data) asks for `auto`
    monkeypatch.setattr(config_module, "cpu_has_native_bf16", lambda: True)
    user = tmp_path / "mine.yaml"
    user.write_text("data:\n  dataset: camvid\n  root: /data/CamVid\ntrain:\n  max_epochs: 30\n")
    assert load_config(user).trainer["precision"] == "32-true"
    user.write_text(user.read_text() + "trainer:\n  precision: auto\n")
    assert load_config(user).trainer["precision"] == "bf16-mixed"
    assert load_config().trainer["precision"] == "bf16-mixed"
    # a trainer section that leaves precision out gets Lightning's default
    assert config_module._check_trainer({"accelerator": "cpu"})["precision"] == "32-true"


def test_cpu_bf16_detection_reads_cpuinfo() -> None:
    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").exists() else []
    assert config_module.cpu_has_native_bf16() == ("avx512_bf16" in flags or "amx_bf16" in flags)


def test_placements_need_support(monkeypatch) -> None:
    monkeypatch.setattr(config_module, "placement_support", lambda: None)
    with pytest.raises(ConfigError, match=r"placement 'decoder' in 'fpn' needs smp_cbam.add_attention"):
        load_config(overrides={"grid": {"archs": ["fpn"]}})
    assert load_config(overrides={"grid": {"archs": ["fpn"], "attentions": ["none"]}}).grid.archs == ["fpn"]
    monkeypatch.setattr(config_module, "placement_support", lambda: lambda arch, where: where != "both")
    assert load_config(overrides={"grid": {"archs": ["fpn"], "placements": ["encoder"]}}).grid.archs == ["fpn"]

    def exact(arch: str, where: str = "decoder", encoder: str | None = None) -> bool:
        return where == "decoder" or encoder == "resnet18"

    monkeypatch.setattr(config_module, "placement_support", lambda: exact)
    assert load_config(overrides={"grid": {"placements": ["encoder"]}}).grid.placements == ["encoder"]
    with pytest.raises(
        ConfigError, match=r"placement 'encoder' is not supported for architecture 'unet' with encoder 'mobilenet_v2'"
    ):
        load_config(overrides={"grid": {"placements": ["encoder"]}, "model": {"encoder": "mobilenet_v2"}})
    monkeypatch.setattr(config_module, "placement_support", lambda: lambda arch, where: where != "both")
    config = load_config(overrides={"grid": {"archs": ["fpn", "unet"], "placements": ["decoder", "encoder"]}})
    assert config.grid.placements == ["decoder", "encoder"]
    with pytest.raises(ConfigError, match=r"placement 'both' is not supported for architecture 'fpn'"):
        load_config(overrides={"grid": {"archs": ["fpn"], "placements": ["both"]}})


def test_every_smp_architecture_is_accepted(monkeypatch) -> None:
    import segmentation_models_pytorch as smp

    monkeypatch.setattr(config_module, "placement_support", lambda: lambda arch, where: True)
    archs = list(smp.MODEL_ARCHITECTURES_MAPPING)
    assert len(archs) >= 12
    assert load_config(overrides={"grid": {"archs": archs}}).grid.archs == archs


def test_grid_runs_none_once_and_names_carry_the_placement(monkeypatch) -> None:
    monkeypatch.setattr(config_module, "placement_support", lambda: lambda arch, where: True)
    config = load_config(
        overrides={
            "grid": {
                "archs": ["unet"],
                "attentions": ["none", "cbam"],
                "seeds": [0, 1],
                "placements": ["decoder", "encoder"],
            }
        }
    )
    names = [run.name for run in grid_runs(config)]
    assert names == [
        "unet-none-s0", "unet-cbam-s0", "unet-cbam-encoder-s0",
        "unet-none-s1", "unet-cbam-s1", "unet-cbam-encoder-s1",
    ]  # fmt: skip


def test_a_config_that_is_not_a_config_object_is_refused_by_type() -> None:
    with pytest.raises(ConfigError, match="output must be a directory path"):
        from_dict({"output": 3})
    assert isinstance(load_config(), Config)
