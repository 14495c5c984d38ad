"""The comparison runner: a grid of archs x attention types x placements x seeds, each run by the same rule.

Paired design: for one seed, every run sees the same data order and augmentations (the data
module derives them from the seed and the epoch) and starts from the same encoder and decoder
weights (:func:`smp_cbam.training.module.build_model`). Every run trains until its validation
mIoU reaches a plateau while its validation loss has stopped falling (or for a fixed budget:
``train.stop``), keeps its best epoch on the
validation split and evaluates that checkpoint on the test split, when there is one.

Layout of the output directory::

    config.yaml            the checked configuration (a resumed grid must match it, except in the
                           grid and other keys that do not change a run, and then lists the runs
                           of every invocation); a configuration that ran nothing can be corrected
    results.csv            one row per run, rewritten atomically after every run
    costs.csv              parameters and latency per arm, measured after the grid (costs.py)
    summary.md, plots/     written by :mod:`smp_cbam.report` after every run
    runs/<run>/            one run's files (run.py); <run> is <arch>-<attention>[-<placement>]-s<seed>

Running the same command again skips finished runs and resumes an unfinished one from its last
epoch checkpoint (the stopping rule's state included). Failed runs stay failed unless
``compare(config, retry_failed=True)`` (``--retry-failed``) runs them again from the start.
``results.csv`` holds every finished run in the directory, so grids that share the configuration
(another seed, another arch, or a second process on another arch) add up.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import yaml

from ..report import atomic_write_csv, atomic_write_text, write_report
from ..report.io import read_result_json
from .config import (
    Config,
    ConfigError,
    default_precision,
    from_dict,
    load_config,
)
from .run import Log, RunSpec, check_arms, is_writer, make_datamodule, quiet_lightning_warnings, run_one

__all__ = [
    "RESULT_COLUMNS", "Config", "ConfigError", "RunSpec", "collect_results", "compare", "default_precision",
    "grid_runs", "load_config",
]  # fmt: skip

RESULT_COLUMNS = [
    "dataset", "arch", "encoder", "attention", "placement", "seed", "status", "precision", "threads", "stop_reason",
    "converged", "epochs", "steps", "best_epoch", "val_miou", "test_miou", "test_context_miou", "floor_miou",
    "at_floor", "untrained_miou", "params", "train_seconds", "failure", "run_dir",
]  # fmt: skip
# Keys that may change between a run and its resumption: they do not change any single run.
RESUMABLE_KEYS = ("output", "grid.", "data.num_workers", "trainer.logger", "costs.")


def grid_runs(config: Config) -> list[RunSpec]:
    """Seed-major order, so that finished seeds give complete pairs early. ``none`` has no
    placement: it runs once per arch and seed (placement ``decoder``) and is every placement's
    baseline."""
    grid = config.grid
    runs = []
    for seed in grid.seeds:
        for arch in grid.archs:
            for attention in grid.attentions:
                placements = ["decoder"] if attention == "none" else grid.placements
                runs.extend(RunSpec(arch, attention, int(seed), placement) for placement in placements)
    return runs


def _flatten(config: dict) -> dict[str, Any]:
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    return flat


# Run-defining keys that older versions of smp-cbam did not write to config.yaml: the value each of
# those versions ran under (a saved configuration without the key ran under it), and what it means.
# A key missing from a saved file and not listed here counts as null, what a key added as an option
# that is off by default ran under.
ADDED_KEYS: dict[str, tuple[Any, str]] = {
    "train.loss_min_delta": (None, "the stopping rule on val mIoU alone"),
}
_ABSENT = object()


def _run_defining(config: dict) -> dict[str, Any]:
    return {k: v for k, v in _flatten(config).items() if not k.startswith(RESUMABLE_KEYS)}


def _yaml_value(value: Any) -> str:
    """``value`` as a user writes it in the YAML file (JSON is YAML): null, 0.01, [32, 16], "x"."""
    return json.dumps(value, default=str)


def _changed_keys(saved: dict, config: Config) -> list[tuple[str, Any, Any]]:
    """(key, saved value, new value) of every run-defining key that differs; ``_ABSENT`` for a key
    one side lacks. A key missing from the saved file stands for its :data:`ADDED_KEYS` value, or null."""
    old, new = _run_defining(saved), _run_defining(config.to_dict())
    changed = []
    for k in sorted(old.keys() | new.keys()):
        before = old.get(k, ADDED_KEYS[k][0] if k in ADDED_KEYS else None)
        after = new.get(k)
        if before != after:
            changed.append((k, old.get(k, _ABSENT), new.get(k, _ABSENT)))
    return changed


def configuration_changes(saved: dict, config: Config) -> list[str]:
    """The run-defining keys that differ between a saved ``config.yaml`` and ``config``, each as
    ``key: saved -> new``."""
    return _describe(_changed_keys(saved, config))


def _describe(changed: list[tuple[str, Any, Any]]) -> list[str]:
    def shown(key: str, value: Any) -> str:
        if value is not _ABSENT:
            return _yaml_value(value)
        if key in ADDED_KEYS:
            return f"absent (an older smp-cbam: {_yaml_value(ADDED_KEYS[key][0])})"
        return "absent"

    return [f"{k}: {shown(k, before)} -> {shown(k, after)}" for k, before, after in changed]


def _older_version_hint(changed: list[tuple[str, Any, Any]]) -> str:
    """How to resume runs whose ``config.yaml`` an older smp-cbam wrote without some of
    :data:`ADDED_KEYS` (``changed``: :func:`_changed_keys`): set each to the value that version ran
    under (and undo any other change)."""
    missing = [k for k, before, _ in changed if before is _ABSENT and k in ADDED_KEYS]
    if not missing:
        return ""
    values = ", ".join(f"{k}: {_yaml_value(ADDED_KEYS[k][0])} ({ADDED_KEYS[k][1]})" for k in missing)
    rest = " and undo the other changes" if len(missing) < len(changed) else ""
    return f"; they were written by an older smp-cbam: to resume them, set {values}{rest}"


def _started_runs(output: Path) -> list[Path]:
    runs = output / "runs"
    if not runs.is_dir():
        return []
    return sorted(p for p in runs.iterdir() if (p / "result.json").exists() or (p / "checkpoints").exists())


def check_resumable(config: Config, output: Path) -> bool:
    """Whether ``output/config.yaml`` must be (re)written: absent, or from a configuration that
    started no run. Raises ConfigError when runs of another configuration are there."""
    path = output / "config.yaml"
    if not path.exists():
        # its summary.md, results.csv, ... would be written over (a .gitkeep and the like are not)
        if output.is_dir() and any(not p.name.startswith(".") for p in output.iterdir()):
            raise ConfigError(
                f"output {str(output)!r} holds files and no config.yaml, so it is not a results folder of "
                "smp-cbam compare; choose a new or empty --output"
            )
        return True
    try:
        saved = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        saved = None
        problem = f"cannot be read ({err})"
    else:
        problem = "is not a configuration mapping"
    if not isinstance(saved, dict):
        if _started_runs(output):
            raise ConfigError(f"{path} {problem}; it holds runs: restore it or use another --output")
        return True
    changed = _changed_keys(saved, config)
    if not changed:
        return False
    if not _started_runs(output):
        return True
    raise ConfigError(
        f"{output} holds runs of another configuration ({'; '.join(_describe(changed))}){_older_version_hint(changed)}; "
        "use another --output or remove that directory"
    )


def _with_grid_of(saved: dict, record: dict) -> dict:
    """``record`` (a resumed grid's configuration, the same runs' settings as ``saved``) with the grid
    lists of both: a grid resumed with fewer or other seeds or arms keeps naming the runs that the
    output already holds, and the record stays a command that reproduces the whole output."""
    grid = dict(record["grid"])
    for key, values in grid.items():
        old = (saved.get("grid") or {}).get(key)
        if isinstance(values, list) and isinstance(old, list):
            grid[key] = old + [v for v in values if v not in old]
    return {**record, "grid": grid}


class Eta:
    """Time left in the grid, from the epoch times seen so far (per arch): runs not yet finished
    are assumed to train the median number of epochs of finished runs (or the budget)."""

    def __init__(self, runs: list[RunSpec], budget: int):
        self.budget = budget
        self.left = {run: budget for run in runs}
        self.epochs: list[int] = []
        self.seconds: dict[str, list[float]] = {}

    def epoch_done(self, run: RunSpec, seconds: float, epoch: int) -> None:
        self.seconds.setdefault(run.arch, []).append(seconds)
        self.left[run] = max(self.expected_epochs() - epoch - 1, 1)

    def run_done(self, run: RunSpec, epochs: int | None = None) -> None:
        self.left[run] = 0
        if epochs:
            self.epochs.append(epochs)

    def expected_epochs(self) -> int:
        return int(statistics.median(self.epochs)) if self.epochs else self.budget

    def seconds_left(self) -> float | None:
        if not self.seconds:
            return None
        overall = statistics.median(s for v in self.seconds.values() for s in v)
        per_arch = {arch: statistics.median(v) for arch, v in self.seconds.items()}
        expected = self.expected_epochs()
        return sum(min(n, expected) * per_arch.get(run.arch, overall) for run, n in self.left.items())


def format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def compare(config: Config, retry_failed: bool = False) -> pd.DataFrame:
    """Runs (or resumes) the whole grid; returns the results table. ``retry_failed`` runs failed
    runs again from the start (their files are replaced)."""
    if not isinstance(config, Config):
        config = from_dict(config)
    output = Path(config.output)
    write_config = check_resumable(config, output)
    datamodule = make_datamodule(config, seed=0)
    datamodule.setup("fit")  # reads and checks the data once, before anything is written
    check_arms(config, grid_runs(config), datamodule)
    output.mkdir(parents=True, exist_ok=True)
    if is_writer():
        record = config.to_dict()
        if not write_config:  # resumed: the record names every run the output holds or will hold
            record = _with_grid_of(yaml.safe_load((output / "config.yaml").read_text()), record)
        atomic_write_text(output / "config.yaml", yaml.safe_dump(record, sort_keys=False))

    runs = grid_runs(config)
    eta = Eta(runs, config.train.max_epochs)
    log = Log()
    jobs = config.grid.jobs
    if jobs > 1 and (str(config.trainer.get("devices", 1)) != "1" or config.trainer.get("accelerator") != "cpu"):
        log(f"grid.jobs {jobs} applies to one CPU device; with trainer {config.trainer} runs go one at a time")
        jobs = 1
    if jobs == 1:
        for i, run in enumerate(runs, 1):
            if _grid_step(config, run, f"[run {i}/{len(runs)}]", retry_failed, eta, log):
                if is_writer():  # the tables after each run; the plots once, at the end
                    collect_results(output, config)
                    write_report(output, plots=False)
    else:
        _parallel_steps(config, runs, jobs, retry_failed, log)
    results = collect_results(output, config)
    if not is_writer():
        return results
    finished = {f"runs/{run.name}": run for run in runs}
    ok = [finished[d] for d in results.loc[results["status"] == "ok", "run_dir"] if d in finished]
    if config.costs.enabled and ok:
        from .costs import write_costs

        log(
            f"measuring parameters and latency of {len({(r.arch, r.attention, r.placement) for r in ok})} arms (costs.csv)"
        )
        write_costs(config, ok, datamodule, output)
    write_report(output)
    for line in convergence_notes(results):
        log(line)
    return results


def _grid_step(
    config: Config,
    run: RunSpec,
    tag: str,
    retry_failed: bool,
    eta: Eta | None,
    log: Log,
) -> bool:
    """Runs ``run`` unless it finished earlier; writes its ``result.json``. Returns whether it ran."""
    output = Path(config.output)
    run_dir = output / "runs" / run.name
    result_path = run_dir / "result.json"
    previous = read_result_json(result_path) if result_path.exists() else None
    if previous is not None and previous.get("status") == "failed" and retry_failed:
        log(f"{tag} {run.name}: failed earlier, running it again (--retry-failed)")
        if is_writer():
            shutil.rmtree(run_dir)
    elif previous is not None:
        if eta is not None:
            eta.run_done(run, previous.get("epochs"))
        status = previous.get("status")
        hint = "; rerun with --retry-failed to run it again" if status == "failed" else ""
        log(f"{tag} {run.name}: finished earlier ({status}), skipped{hint}")
        return False
    elif result_path.exists():
        log(f"{tag} {run.name}: {result_path} is damaged; running it again")
    run_dir.mkdir(parents=True, exist_ok=True)
    left = f"  (grid time left ~{format_seconds(eta.seconds_left())})" if eta is not None else ""
    log(f"{tag} {run.name}{left}")

    def on_epoch(row: dict) -> None:
        if eta is not None:
            eta.epoch_done(run, row["seconds"], row["epoch"])

    try:
        row = run_one(config, run, run_dir, Log(run_dir / "log.txt"), on_epoch=on_epoch)
    except ConfigError:
        raise
    except Exception as err:  # a failed run is recorded and the grid goes on
        row = {"status": "failed", "failure": f"{type(err).__name__}: {err}"}
        log(f"  {run.name} failed: {row['failure']}")
    if row["status"] == "ok" and not row["converged"] and not row["at_floor"]:  # stuck: its own line below
        still = "val mIoU still rising" + (
            " or val loss still falling" if config.train.loss_min_delta is not None else ""
        )
        log(
            f"  {run.name} not converged: its {row['stop_reason']} budget ended before its last "
            f"{config.train.patience} validations were a plateau ({still})"
        )
    if row["status"] == "ok" and row["at_floor"]:
        log(f"  {run.name} stuck at the trivial floor: best val mIoU {row['val_miou']:.4f} vs {row['floor_miou']:.4f}")
    ident = {
        "dataset": config.dataset,
        "arch": run.arch,
        "encoder": config.model.encoder,
        "attention": run.attention,
        "placement": run.placement,
        "seed": run.seed,
    }
    row = {**ident, **row, "run_dir": run_dir.relative_to(output).as_posix()}
    if eta is not None:
        eta.run_done(run, row.get("epochs"))
    if is_writer():
        atomic_write_text(result_path, json.dumps(row, indent=1))
    return True


_PARENT: int | None = None  # in a worker: the grid's process id


def _worker_init(threads: int, parent: int | None = None) -> None:
    """A worker trains every run on ``threads`` threads, from its first epoch to its last. The
    thread count orders a run's sums (convolution gradients, batch statistics, the kernels'
    reductions), so a count that followed the grid's progress (the last run taking the cores that
    finished runs left idle) would give the same command other numbers on each call."""
    global _PARENT
    if parent is not None:
        _PARENT = parent
        _die_with_parent(parent)
    torch.set_num_threads(threads)


def _die_with_parent(parent: int) -> None:
    """On Linux, ask the kernel to end this worker when the grid's process ends. A worker left
    behind (the parent killed by a scheduler or ``kill``) would go on training its run while a
    restarted grid trains the same run into the same checkpoints."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    pr_set_pdeathsig = 1
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        failed = libc.prctl(pr_set_pdeathsig, ctypes.c_ulong(signal.SIGTERM), 0, 0, 0) != 0
    except (OSError, AttributeError):
        failed = True
    if failed:
        print(
            "smp-cbam: cannot ask the kernel to end this worker with the grid (prctl); a killed grid may "
            "leave it running",
            file=sys.stderr,
        )
    _orphaned_exit()


def _orphaned_exit() -> None:
    """Ends a worker whose grid process is gone: before a run, and after one (a SIGTERM that came
    where Lightning does not act on it is forgotten by the next Trainer)."""
    if _PARENT is not None and os.getppid() != _PARENT:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)


def _worker_step(config: Config, run: RunSpec, tag: str, retry_failed: bool) -> None:
    import logging

    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    quiet_lightning_warnings()
    _orphaned_exit()
    try:
        _grid_step(config, run, tag, retry_failed, None, Log())
    except SystemExit as stop:
        # SIGTERM (the grid's process ended, see _die_with_parent) stops Lightning at the end of a
        # batch, never inside a checkpoint's write; the run resumes from its last epoch. The worker
        # ends here rather than wait for a task from a grid that is gone.
        print(
            f"{tag} {run.name}: worker stopped (SystemExit {stop.code}); the same command resumes it", file=sys.stderr
        )
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(stop.code if isinstance(stop.code, int) else 1)
    _orphaned_exit()


def _parallel_steps(config: Config, runs: list[RunSpec], jobs: int, retry_failed: bool, log: Log) -> None:
    """``jobs`` runs at a time, each in a worker process with ``cores // jobs`` threads for all of
    its runs (``_worker_init``); the report is rewritten here as each run ends. Every run is seeded
    on its own, so the results equal those of one run at a time on as many threads, and a second
    call of the same command gives the same numbers."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from concurrent.futures.process import BrokenProcessPool

    output = Path(config.output)
    cores = torch.get_num_threads()
    threads = max(cores // jobs, 1)
    log(f"running {jobs} runs at a time, {threads} thread(s) each")
    context = multiprocessing.get_context("spawn")  # no forked copies of torch's thread pools
    with ProcessPoolExecutor(
        jobs, mp_context=context, initializer=_worker_init, initargs=(threads, os.getpid())
    ) as pool:
        futures = {
            pool.submit(_worker_step, config, run, f"[run {i}/{len(runs)}]", retry_failed): run
            for i, run in enumerate(runs, 1)
        }
        for future in as_completed(futures):
            try:
                future.result()  # a ConfigError stops the grid as in one process
            except BrokenProcessPool as err:
                raise RuntimeError(
                    f"a worker process ended during {futures[future].name} (killed, or see its message above); "
                    "the same command resumes the unfinished runs"
                ) from err
            collect_results(output, config)
            write_report(output, plots=False)  # this process shares the CPU with the workers


def convergence_notes(results: pd.DataFrame) -> list[str]:
    """Lines that flag the runs which did not converge or never left the trivial floor."""
    ok = results[results["status"] == "ok"]
    notes = []
    unconverged = ok[~ok["converged"].astype(bool)]
    if len(unconverged):
        notes.append(
            f"{len(unconverged)} of {len(ok)} runs did not converge (their budget ended before their last "
            "validations were a plateau by the stopping rule): "
            f"{', '.join(unconverged['run_dir'].str.removeprefix('runs/'))}. "
            "A comparison of such runs measures learning speed, not final accuracy; raise train.max_epochs, or "
            "lower train.patience or raise train.loss_min_delta."
        )
    floor = ok[ok["at_floor"].astype(bool)]
    if len(floor):
        notes.append(
            f"{len(floor)} runs stayed at the trivial floor (predicting the most frequent class): "
            f"{', '.join(floor['run_dir'].str.removeprefix('runs/'))}."
        )
    return notes


def collect_results(output: Path, config: Config) -> pd.DataFrame:
    """Every finished run in ``output`` (also those of other grids or processes sharing it), in
    grid order, written to ``results.csv``."""
    rows = []
    for path in sorted((output / "runs").glob("*/result.json")):
        row = read_result_json(path)
        if row is not None:
            row["run_dir"] = path.parent.relative_to(output).as_posix()  # never a path outside output
            rows.append(row)
    order = {run: i for i, run in enumerate(grid_runs(config))}

    def rank(row: dict) -> tuple[int, str]:
        spec = RunSpec(row.get("arch"), row.get("attention"), row.get("seed"), row.get("placement", "decoder"))
        return order.get(spec, len(order)), row["run_dir"]

    rows.sort(key=rank)
    results = results_frame(rows)
    if is_writer():
        atomic_write_csv(results, output / "results.csv")
    return results


def results_frame(rows: list[dict]) -> pd.DataFrame:
    """The rows with every column of ``results.csv``, per-class IoU columns last."""
    per_class = list(dict.fromkeys(k for row in rows for k in row if k.startswith("iou_")))
    return pd.DataFrame(rows).reindex(columns=RESULT_COLUMNS + per_class)
