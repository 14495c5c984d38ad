"""Results files: atomic writes, and reading ``results.csv`` into a normalised frame."""

from __future__ import annotations

import os
import uuid
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from .constants import ATTENTION_ORDER, GROUP_COLUMNS, NUMERIC_COLUMNS


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
    """Read a ``results.csv``; strings stay strings (an attention named "NA" is not a NaN)."""
    raw = pd.read_csv(path, dtype=str, keep_default_na=False)
    return _normalize(raw)


def _normalize(results: pd.DataFrame) -> pd.DataFrame:
    """Copy of ``results`` with string group keys, lower-case status and numeric metric columns.

    A (dataset, arch, encoder, attention, seed) listed more than once (a rerun) keeps its last row.
    """
    df = results.copy()
    for col in (*GROUP_COLUMNS, "attention"):
        if col in df:
            df[col] = df[col].fillna("").astype(str).str.strip()
    df["status"] = df["status"].fillna("").astype(str).str.strip().str.lower()
    if "failure" in df:
        df["failure"] = df["failure"].fillna("").astype(str)
    numeric = [c for c in df.columns if c in NUMERIC_COLUMNS or c.startswith("iou_")]
    df[numeric] = df[numeric].apply(pd.to_numeric, errors="coerce")
    return df.drop_duplicates([*_group_keys(df), "attention", "seed"], keep="last")


def _group_keys(results: pd.DataFrame) -> list[str]:
    return [c for c in GROUP_COLUMNS if c in results]


def _attention_rank(name: str) -> tuple[int, str]:
    order = ATTENTION_ORDER.index(name) if name in ATTENTION_ORDER else len(ATTENTION_ORDER)
    return order, name


def _sort_attentions(names: Sequence[str]) -> list[str]:
    return sorted(set(names), key=_attention_rank)


def _sort_rows(df: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    rank = df["attention"].map(lambda a: _attention_rank(a)[0])
    return (
        df.assign(_rank=rank)
        .sort_values([*keys, "_rank", "attention"], kind="stable")
        .drop(columns="_rank")
    )


def _ok_runs(results: pd.DataFrame, metric: str) -> pd.DataFrame:
    """The successful runs of normalised ``results`` that have a value for ``metric``."""
    return results[(results["status"] == "ok") & results[metric].notna()]


def primary_metric(results: pd.DataFrame) -> str:
    """``"test_miou"`` if any successful run has a test mIoU, else ``"val_miou"``."""
    if "test_miou" not in results:
        return "val_miou"
    df = _normalize(results)
    has_test = df.loc[df["status"] == "ok", "test_miou"].notna().any()
    return "test_miou" if has_test else "val_miou"
