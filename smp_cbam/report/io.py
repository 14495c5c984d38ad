"""Results files: atomic writes, and reading a results directory into a normalised frame.

Everything a results directory holds was written by the runner or by a person editing it, so the
readers here trust nothing: a damaged file is named in a warning (:class:`ReportWarning`) and left
out, or, when nothing usable is left, in a :class:`ReportError`; a ``run_dir`` that points outside
the results directory is ignored.
"""

from __future__ import annotations

import json
import os
import uuid
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .constants import ATTENTION_ORDER, BOOL_COLUMNS, GROUP_COLUMNS, NUMERIC_COLUMNS, RUN_KEY_COLUMNS, TEXT_COLUMNS

REQUIRED_COLUMNS = ("attention", "seed", "status")
_TRUE = {"true", "1", "yes", "1.0"}
_FALSE = {"false", "0", "no", "0.0"}


class ReportError(ValueError):
    """A results directory cannot be reported; the message names the file and what is wrong."""


class ReportWarning(UserWarning):
    """A file of a results directory was damaged or untrusted and was left out; the message names it."""


def _warn(message: str) -> None:
    warnings.warn(message, ReportWarning, stacklevel=3)


def _atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    # os.open (unlike mkstemp, which gives 0o600) lets the umask set the new file's mode
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` via a temp file in the same directory and ``os.replace``."""
    _atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_csv(df: pd.DataFrame, path: str | os.PathLike) -> None:
    """Write ``df`` as CSV (without the index) to ``path`` atomically."""
    atomic_write_text(path, df.to_csv(index=False))


def read_results(path: str | os.PathLike) -> pd.DataFrame:
    """Read a ``results.csv``; strings stay strings (an attention named "NA" is not a NaN).

    Raises :class:`ReportError` naming the file when it is empty, not CSV, or lacks the columns
    ``attention``, ``seed`` and ``status``; ``FileNotFoundError`` when it does not exist.
    """
    path = Path(path)
    try:
        raw = pd.read_csv(path, dtype=str, keep_default_na=False)
    except FileNotFoundError:
        raise
    except pd.errors.EmptyDataError as err:
        raise ReportError(f"{path} is empty (no header row)") from err
    except (pd.errors.ParserError, UnicodeDecodeError, OSError) as err:
        raise ReportError(f"{path} is not a readable CSV file: {err}") from err
    missing = [c for c in REQUIRED_COLUMNS if c not in raw]
    if missing:
        raise ReportError(f"{path} lacks the column(s) {', '.join(missing)}; is it a results.csv of smp-cbam compare?")
    return _normalize(raw)


def _to_bool(value: Any) -> Any:
    """``True``/``False`` from a bool or its text ("true", "False", "1"), else NaN."""
    if isinstance(value, bool | np.bool_):
        return bool(value)
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    return np.nan


def _normalize(results: pd.DataFrame) -> pd.DataFrame:
    """Copy of ``results`` with string keys and text, lower-case status, numeric metrics and bool flags.

    A run (its group keys, attention and seed) listed more than once (a rerun) keeps its last row.
    """
    df = results.copy()
    for col in (*GROUP_COLUMNS, "attention", *TEXT_COLUMNS):
        if col in df:
            df[col] = df[col].fillna("").astype(str).str.strip()
    if "failure" in df:  # keep the message as written; only the markdown flattens it
        df["failure"] = results["failure"].fillna("").astype(str)
    df["status"] = df["status"].str.lower() if "status" in df else ""
    numeric = [c for c in df.columns if c in NUMERIC_COLUMNS or c.startswith("iou_")]
    df[numeric] = df[numeric].apply(pd.to_numeric, errors="coerce")
    for col in BOOL_COLUMNS:
        if col in df:
            df[col] = df[col].map(_to_bool).astype(object)
    return df.drop_duplicates(_run_keys(df), keep="last")


def _run_keys(results: pd.DataFrame) -> list[str]:
    return [c for c in RUN_KEY_COLUMNS if c in results]


def _group_keys(results: pd.DataFrame) -> list[str]:
    return [c for c in GROUP_COLUMNS if c in results]


def _attention_rank(name: str) -> tuple[int, str]:
    order = ATTENTION_ORDER.index(name) if name in ATTENTION_ORDER else len(ATTENTION_ORDER)
    return order, name


def _sort_attentions(names: Sequence[str]) -> list[str]:
    return sorted(set(names), key=_attention_rank)


def _sort_rows(df: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    rank = df["attention"].map(lambda a: _attention_rank(a)[0])
    return df.assign(_rank=rank).sort_values([*keys, "_rank", "attention"], kind="stable").drop(columns="_rank")


def _ok_runs(results: pd.DataFrame, metric: str) -> pd.DataFrame:
    """The successful runs of normalised ``results`` that have a value for ``metric``."""
    return results[(results["status"] == "ok") & results[metric].notna()]


def _pairable_runs(results: pd.DataFrame, metric: str) -> pd.DataFrame:
    """:func:`_ok_runs` that have a seed: a run without one pairs with nothing."""
    ok = _ok_runs(results, metric)
    return ok[ok["seed"].notna()]


def _in_group(frame: pd.DataFrame, keys: list[str], values) -> np.ndarray:
    """Which rows of ``frame`` have ``values`` in the columns ``keys`` (all rows for no keys)."""
    where = np.ones(len(frame), dtype=bool)
    for k, v in zip(keys, values, strict=True):
        where &= (frame[k] == v).to_numpy()
    return where


def primary_metric(results: pd.DataFrame) -> str:
    """``"test_miou"`` if any successful run has a test mIoU, else ``"val_miou"``."""
    if "test_miou" not in results:
        return "val_miou"
    df = _normalize(results)
    has_test = df.loc[df["status"] == "ok", "test_miou"].notna().any()
    return "test_miou" if has_test else "val_miou"


def confined_run_dir(output_dir: str | os.PathLike, run_dir: object, source: str | os.PathLike) -> str:
    """``run_dir`` (relative to ``output_dir``) when it names a folder inside ``output_dir``, else "".

    A results file is data, not a set of paths to trust: an absolute path or one that climbs out
    (``../../etc``) is ignored with a warning naming ``source``, the file it came from.
    """
    text = "" if run_dir is None or (isinstance(run_dir, float) and np.isnan(run_dir)) else str(run_dir).strip()
    if not text:
        return ""
    root = Path(output_dir).resolve()
    target = (root / text).resolve()
    if Path(text).is_absolute() or not target.is_relative_to(root) or target == root:
        _warn(f"{source}: run_dir {text!r} is outside {root}; ignored")
        return ""
    return target.relative_to(root).as_posix()


def read_result_json(path: str | os.PathLike) -> dict | None:
    """A run's ``result.json`` as a dict, or None (with a warning naming it) when it is damaged."""
    path = Path(path)
    try:
        row = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        _warn(f"{path} is damaged ({err}); the run is left out unless results.csv has it")
        return None
    if not isinstance(row, dict) or any(c not in row for c in REQUIRED_COLUMNS):
        _warn(f"{path} is not a run's result (needs {', '.join(REQUIRED_COLUMNS)}); left out")
        return None
    return row


def _history_totals(run_dir: Path) -> dict:
    """``epochs`` and ``train_seconds`` from a run's ``history.csv``; {} when it is missing or damaged."""
    try:
        history = pd.read_csv(run_dir / "history.csv")
    except (OSError, pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError):
        return {}
    totals = {"epochs": len(history)}
    if "seconds" in history:
        totals["train_seconds"] = float(pd.to_numeric(history["seconds"], errors="coerce").sum())
    return totals


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value)) or value == ""


def collect_results(output_dir: str | os.PathLike) -> pd.DataFrame:
    """Every finished run of a results directory, rebuilt from its ``runs/*/result.json`` files.

    The runner writes one ``result.json`` per finished run; ``results.csv`` is derived from them and
    serves as the fallback for runs whose ``result.json`` is missing or damaged (a copied study
    folder may hold only ``results.csv``). ``epochs`` and ``train_seconds``, when a result lacks
    them, come from the run's ``history.csv``. Damaged files are named in warnings; raises
    :class:`ReportError` when neither source holds a run. The frame is normalised (see
    :func:`read_results`) and sorted by group, attention and seed.
    """
    out = Path(output_dir)
    rows = []
    for path in sorted((out / "runs").glob("*/result.json")):
        row = read_result_json(path)
        if row is None:
            continue
        declared = row.get("run_dir")
        if not _missing(declared):
            confined_run_dir(out, declared, path)  # warns when the file claims a folder elsewhere
        row["run_dir"] = path.parent.relative_to(out).as_posix()
        totals = _history_totals(path.parent)
        rows.append({**row, **{k: v for k, v in totals.items() if _missing(row.get(k))}})
    from_json = _normalize(pd.DataFrame(rows)) if rows else None

    csv_path = out / "results.csv"
    from_csv = None
    if csv_path.exists():
        try:
            from_csv = read_results(csv_path)
        except ReportError as err:
            if from_json is None:
                raise
            _warn(f"{err}; the report uses the runs' result.json files only")
    if from_csv is not None:
        from_csv["run_dir"] = [
            confined_run_dir(out, d, csv_path) for d in from_csv.get("run_dir", pd.Series("", index=from_csv.index))
        ]
    if from_json is None and from_csv is None:
        if csv_path.exists() or (out / "runs").is_dir():
            raise ReportError(f"no readable run in {out}: no valid runs/*/result.json and no usable results.csv")
        raise FileNotFoundError(f"{out} holds no results: no runs/*/result.json and no results.csv")
    if from_json is None:
        results = from_csv
    elif from_csv is None:
        results = from_json
    else:
        keys = [k for k in _run_keys(from_json) if k in from_csv]
        known = pd.MultiIndex.from_frame(from_json[keys].astype(str))
        extra = ~pd.MultiIndex.from_frame(from_csv[keys].astype(str)).isin(known)
        # the result.json rows last: should a key fail to match, the rerun rule keeps them
        results = _normalize(pd.concat([from_csv[extra], from_json], ignore_index=True))
    per_class = [c for c in results.columns if c.startswith("iou_")]
    results = results[[c for c in results.columns if c not in per_class] + per_class]
    by_seed = results.sort_values("seed", kind="stable")
    return _sort_rows(by_seed, _group_keys(results)).reset_index(drop=True)


def read_per_image(path: str | os.PathLike) -> tuple[list[str], np.ndarray]:
    """A run's ``per_image.csv``: the image ids and their counts, int64 of shape (n_images, 3, C).

    The file has an ``image`` column and, for every class k = 0..C-1, the columns ``tp_k``, ``fp_k``
    and ``fn_k``. Raises :class:`ReportError` naming the file when it is damaged.
    """
    path = Path(path)
    try:
        table = pd.read_csv(path, dtype={"image": str}, keep_default_na=False)
    except FileNotFoundError:
        raise
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError, OSError) as err:
        raise ReportError(f"{path} is not a readable per-image CSV file: {err}") from err
    tp = sorted(int(c[3:]) for c in table.columns if c.startswith("tp_") and c[3:].isdigit())
    n_classes = len(tp)
    expected = [f"{kind}_{k}" for k in range(n_classes) for kind in ("tp", "fp", "fn")]
    if "image" not in table or n_classes == 0 or tp != list(range(n_classes)) or any(c not in table for c in expected):
        raise ReportError(f"{path} needs the columns image and tp_k, fp_k, fn_k for k = 0..C-1")
    if table.empty:
        raise ReportError(f"{path} has no images")
    counts = table[[f"{kind}_{k}" for kind in ("tp", "fp", "fn") for k in range(n_classes)]].apply(
        pd.to_numeric, errors="coerce"
    )
    values = counts.to_numpy(dtype=float)
    if not np.isfinite(values).all() or (values < 0).any() or (values != np.round(values)).any():
        raise ReportError(f"{path} has counts that are not non-negative integers")
    ids = table["image"].astype(str).str.strip().tolist()
    if len(set(ids)) != len(ids):
        raise ReportError(f"{path} lists an image id more than once")
    return ids, values.astype(np.int64).reshape(len(ids), 3, n_classes)


def read_costs(output_dir: str | os.PathLike) -> pd.DataFrame | None:
    """``costs.csv`` of a results directory (parameters and latency per model), or None when absent or damaged."""
    path = Path(output_dir) / "costs.csv"
    if not path.exists():
        return None
    try:
        costs = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError, OSError) as err:
        _warn(f"{path} is damaged ({err}); no cost table")
        return None
    if "attention" not in costs or not {"params", "latency_ms"} & set(costs.columns):
        _warn(f"{path} lacks the columns attention and params or latency_ms; no cost table")
        return None
    for col in ("params", "latency_ms"):
        if col in costs:
            costs[col] = pd.to_numeric(costs[col], errors="coerce")
    for col in (*GROUP_COLUMNS, "attention"):
        if col in costs:
            costs[col] = costs[col].astype(str).str.strip()
    return costs


def read_config(output_dir: str | os.PathLike) -> dict | None:
    """The ``config.yaml`` of a results directory as a dict, or None (with a warning when it is damaged)."""
    import yaml

    path = Path(output_dir) / "config.yaml"
    if not path.exists():
        return None
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        _warn(f"{path} is damaged ({err}); the report does without it")
        return None
    if not isinstance(config, dict):
        _warn(f"{path} is empty or not a mapping; the report does without it")
        return None
    return config
