"""The benchmark runs end to end and prints parseable ratios (no timing assertions)."""

import math
import platform
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from smp_cbam import CBAM
from smp_cbam.benchmarks import cbam_bench
from smp_cbam.benchmarks.cbam_bench import (
    AMP_TYPES,
    STEP_TYPES,
    amp_benchmark,
    build_bench_model,
    compile_benchmark,
    compile_gap,
    in_fresh_process,
    interleaved_times,
    main,
    median_interval,
    paired_ratio,
)
from smp_cbam.training.malloc import keep_heap


def test_interleaved_times_calls_every_function_each_round() -> None:
    calls = {"a": 0, "b": 0, "c": 0}

    def make(name: str):
        return lambda: calls.__setitem__(name, calls[name] + 1)

    times = interleaved_times({k: make(k) for k in calls}, rounds=5, device=torch.device("cpu"))
    assert calls == {"a": 6, "b": 6, "c": 6}  # one warm-up call each
    assert {k: len(v) for k, v in times.items()} == {"a": 5, "b": 5, "c": 5}


def test_paired_ratio_is_the_median_of_per_round_ratios() -> None:
    times = {"cbam": [2.0, 3.0, 30.0], "none": [1.0, 2.0, 10.0]}  # ratios 2, 1.5, 3
    assert paired_ratio(times, "cbam", "none") == 2.0


@pytest.mark.parametrize("attention", STEP_TYPES)
def test_step_models_train(attention: str) -> None:
    model = build_bench_model("Unet", attention, encoder_depth=3, decoder_channels=(64, 32, 16))
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    model(x).sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
    modes = {m.impl for m in model.modules() if isinstance(m, CBAM)}
    expected = {"cbam": {"auto"}, "cbam_eager": {"fused"}, "cbam_plain": {"reference"}}
    assert modes == expected.get(attention, set())


@pytest.mark.slow
def test_quick_run_prints_ratios(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--quick", "--repeats", "1", "--threads", "1", "--sections", "module,step"]) == 0
    out = capsys.readouterr().out
    geomean = re.search(r"^geometric mean((\s+[\d.]+){5})$", out, re.M)
    assert geomean and all(float(v) > 0 for v in geomean.group(1).split())
    for setting in ("Unet train", "UnetPlusPlus train", "Unet inference"):
        row = re.search(rf"^{setting}\s+([\d.]+)((\s+[+-][\d.]+%){{{len(STEP_TYPES) - 1}}})$", out, re.M)
        assert row, f"no row for {setting} in:\n{out}"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--sections", "module,nope"], "unknown sections: nope"),
        (["--threads", "0"], "--threads must be >= 1, got 0"),  # was torch's RuntimeError, exit 1
        (["--repeats", "-1"], "--repeats must be >= 1, got -1"),
    ],
)
def test_bad_options_are_usage_errors(args: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    threads = torch.get_num_threads()
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert torch.get_num_threads() == threads


@pytest.mark.slow
def test_one_model_in_a_fresh_process() -> None:
    ms = in_fresh_process("Unet", "cbam", True, 1, 1, 64)
    assert ms > 0


def test_keep_heap_reports_whether_it_applied() -> None:
    glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert keep_heap() is glibc


AB_SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "ab_cbam.py"


@pytest.mark.slow
def test_ab_script_times_both_versions_of_a_training_step() -> None:
    run = subprocess.run(
        [sys.executable, str(AB_SCRIPT), "HEAD", "--train", "--rounds", "1"], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    found = re.search(r"this checkout ([\d.]+) ms, HEAD ([\d.]+) ms, paired ratio ([\d.]+)", run.stdout)
    assert found, run.stdout
    assert all(float(v) > 0 for v in found.groups())


LAYOUT_SCRIPT = AB_SCRIPT.with_name("bench_layout_kernel.py")


@pytest.mark.slow
def test_layout_script_times_both_layouts_at_every_cbam() -> None:
    from smp_cbam.attention import kernels

    if not kernels.available():
        pytest.skip("the CPU kernels are not built")
    run = subprocess.run(
        [sys.executable, str(LAYOUT_SCRIPT), "--rounds", "1", "--batch", "1", "--size", "32"],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    rows = re.findall(r"^\((1, \d+, \d+, \d+)\)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)$", run.stdout, re.M)
    assert len(rows) == 9, run.stdout  # the Unet's nine CBAMs, both layouts
    assert all(float(v) > 0 for row in rows for v in row[1:])
    assert re.search(r"^all nine\s+[\d.]+\s+[\d.]+\s+[\d.]+$", run.stdout, re.M), run.stdout


CALLS_SCRIPT = AB_SCRIPT.with_name("bench_kernel_calls.py")


@pytest.mark.slow
def test_calls_script_times_every_cbams_kernel_calls_in_each_layout() -> None:
    from smp_cbam.attention import kernels

    if not kernels.available():
        pytest.skip("the CPU kernels are not built")
    command = [sys.executable, str(CALLS_SCRIPT), "--steps", "1", "--batch", "2", "--size", "32"]
    run = subprocess.run([*command, "--modes", "eager", "channels_last"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    eager, channels_last = run.stdout.split("== eager")[1].split("== channels_last")
    # the wrapper saw the Unet's nine CBAMs each way, in the layout the model gave them (the eager
    # model all NCHW; the channels_last model channels_last, where the shape has one)
    for section, layouts in ((eager, "nchw"), (channels_last, "cl|nchw")):
        calls = re.findall(rf"^(forward|backward)\s+\(2, \d+, \d+, \d+\)\s+x ({layouts})\s", section, re.M)
        assert sorted(kind for kind, _ in calls) == ["backward"] * 9 + ["forward"] * 9, section
        assert re.search(r"^sum\s+forward [\d.]+ ms, backward [\d.]+ ms$", section, re.M), section
    assert re.findall(r"x (cl)\s", channels_last), channels_last
    bad = subprocess.run([*command, "--modes", "lazy"], capture_output=True, text=True)
    assert bad.returncode == 2 and "invalid choice: 'lazy'" in bad.stderr


@pytest.mark.slow
def test_ab_script_names_a_bad_ref() -> None:
    run = subprocess.run([sys.executable, str(AB_SCRIPT), "no-such-ref"], capture_output=True, text=True)
    assert run.returncode != 0
    assert "cannot export smp_cbam at 'no-such-ref'" in run.stderr


@pytest.mark.slow
def test_amp_section_prints_fp32_and_autocast_rows() -> None:
    out = amp_benchmark(rounds=1, device=torch.device("cpu"), batch=2, size=32)
    for setting in ("train fp32", "train bfloat16 autocast", "inference fp32", "inference bfloat16 autocast"):
        cells = rf"(\s+[+-][\d.]+%){{{len(AMP_TYPES) - 1}}}"
        speed = r"\s+[\d.]+" if "autocast" in setting else ""
        assert re.search(rf"^Unet {setting}\s+[\d.]+{cells}{speed}$", out, re.M), out
        # one round: the medians, no interval
        assert re.search(rf"^Unet {setting}: scse [+-][\d.]+%; cbam [+-][\d.]+%$", out, re.M), out


def test_median_interval_brackets_the_median_of_the_rounds() -> None:
    values = [float(v) for v in range(100)]
    random.Random(0).shuffle(values)
    median, low, high = median_interval(values)
    assert median == 49.5 and 35 < low < median < high < 65
    assert median_interval([3.0] * 10) == (3.0, 3.0, 3.0)  # no spread: the interval is the point
    median, low, high = median_interval([1.0, 2.0, 4.0])  # too few rounds for an interval
    assert median == 2.0 and math.isnan(low) and math.isnan(high)


def test_compile_gap_is_the_median_per_round_difference_of_what_the_attention_adds() -> None:
    rng = random.Random(0)
    rounds = 40
    none_eager = [0.200 + rng.uniform(-0.02, 0.02) for _ in range(rounds)]
    none_compiled = [0.100 + rng.uniform(-0.01, 0.01) for _ in range(rounds)]
    # cbam adds 10 ms eager (5% of none) and 8 ms compiled (8%), plus noise within each round;
    # scse adds the same 10 ms in both modes
    times = {
        ("none", False): none_eager,
        ("none", True): none_compiled,
        ("cbam", False): [t + 0.010 + rng.uniform(-1e-3, 1e-3) for t in none_eager],
        ("cbam", True): [t + 0.008 + rng.uniform(-1e-3, 1e-3) for t in none_compiled],
        ("scse", False): [t + 0.010 for t in none_eager],
        ("scse", True): [t + 0.010 for t in none_compiled],
    }
    gap = compile_gap(times, "cbam")
    # fewer milliseconds compiled, a larger share: the two readings disagree, as they can
    assert gap["ms_low"] < gap["ms"] < gap["ms_high"] < 0 and gap["ms"] == pytest.approx(-2.0, abs=0.5)
    assert 0 < gap["points_low"] < gap["points"] < gap["points_high"]
    assert gap["points"] == pytest.approx(8 - 5, abs=1.0)
    same = compile_gap(times, "scse")  # no noise: the interval is the point
    assert same["ms"] == same["ms_low"] == same["ms_high"] == pytest.approx(0.0, abs=1e-9)
    few = compile_gap({key: values[:3] for key, values in times.items()}, "cbam")
    assert math.isnan(few["ms_low"]) and math.isnan(few["points_high"]) and few["ms"] < 0


@pytest.mark.slow
def test_compile_section_prints_compiled_and_eager_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    # dynamo's eager backend: the section's plumbing without inductor's code generation, which
    # tests/test_ops.py and tests/test_exports.py cover for CBAM; the head's output dtype shows
    # that every model, compiled and eager, ran under the section's precision
    seen: list[torch.dtype] = []

    def build(arch: str, attention: str, **kwargs: object) -> torch.nn.Module:
        model = build_bench_model(arch, attention, **kwargs)
        model.segmentation_head.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
        return model

    monkeypatch.setattr(cbam_bench, "build_bench_model", build)
    for amp, precision in ((None, "fp32"), (torch.bfloat16, "bfloat16 autocast")):
        seen.clear()
        out = compile_benchmark(rounds=1, device=torch.device("cpu"), batch=2, size=32, backend="eager", amp=amp)
        assert f"of the whole Unet, {precision}:" in out
        for setting in ("Unet train", "Unet inference"):
            for mode in ("compiled", "eager"):
                row = rf"^{setting} {precision}\s+{mode}\s+[\d.]+(\s+[+-][\d.]+%){{2}}$"
                assert re.search(row, out, re.M), out
            for attention in ("scse", "cbam"):  # one round: the medians, no interval
                gap = rf"^{setting} {precision}\s+{attention} compiled minus eager: [+-][\d.]+ ms, [+-][\d.]+ points$"
                assert re.search(gap, out, re.M), out
        assert seen and set(seen) == {amp or torch.float32}, set(seen)


def test_bench_operator_is_a_library_operator_with_its_fake_and_layout_tag() -> None:
    from smp_cbam.benchmarks.cbam_bench import bench_operator

    double = bench_operator("smp_cbam_test_bench::double", "(Tensor x) -> Tensor", lambda x: 2 * x, torch.empty_like)
    fixed = bench_operator(
        "smp_cbam_test_bench::triple", "(Tensor x) -> Tensor", lambda x: 3 * x, torch.empty_like, flexible_layout=False
    )
    assert torch.Tag.flexible_layout in double.tags and torch.Tag.flexible_layout not in fixed.tags
    x = torch.randn(2, 3)
    assert torch.equal(double(x), 2 * x) and torch.equal(fixed(x), 3 * x)
    assert double(torch.empty(2, 3, device="meta")).shape == (2, 3)  # the fake, with no CPU kernel run
    torch.testing.assert_close(torch.compile(lambda t: double(t) + 1, fullgraph=True)(x), 2 * x + 1)


def _compiled_inference_script() -> object:
    """experiments/bench_compiled_inference.py as a module, loaded once per process: it defines
    operators, which a second load would define again."""
    import importlib.util

    name = "bench_compiled_inference"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, AB_SCRIPT.with_name(f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[name] = module
    return sys.modules[name]


def test_the_compiled_inference_floors_take_every_cbams_place() -> None:
    from torch._inductor.utils import run_and_get_code

    script = _compiled_inference_script()
    cbams = sum(isinstance(m, CBAM) for m in cbam_bench.cbam_unet().modules())
    assert cbams >= 9
    for floor in (script.ChannelGateFloor, script.TwoGatesFloor, script.NoopOperator):
        model = script.with_floor(cbam_bench.cbam_unet(), floor)
        assert not any(isinstance(m, CBAM) for m in model.modules())
        assert sum(isinstance(m, floor) for m in model.modules()) == cbams
    x = torch.randn(2, 3, 4, 5)
    channel = x * torch.sigmoid(x.mean((2, 3), keepdim=True))
    torch.testing.assert_close(script.ChannelGateFloor()(x), channel)
    torch.testing.assert_close(script.TwoGatesFloor()(x), channel * torch.sigmoid(channel.mean(1, keepdim=True)))
    # the no-op operator leaves x as it is, also inside a compiled graph, which calls it
    before = x.clone()
    assert script.NoopOperator()(x) is x and torch.equal(x, before)
    compiled = torch.compile(lambda t: script.NoopOperator()(t.relu()) + 1, fullgraph=True)
    out, code = run_and_get_code(compiled, x)
    torch.testing.assert_close(out, x.relu() + 1)
    assert "smp_cbam_bench.noop_" in "".join(code)
