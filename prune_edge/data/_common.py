"""Helpers every dataset loader shares: one-line error texts, guarded file reads, label checks."""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path
from typing import Union

import numpy as np

from prune_edge.runtime.errors import DatasetError

PathLike = Union[str, "os.PathLike[str]"]


def scale_uint8(a: np.ndarray) -> np.ndarray:
    """0..255 integers -> float32 in [0, 1], the one scaling used by every loader."""
    return np.ascontiguousarray(np.asarray(a, dtype=np.float32) / np.float32(255.0))


def one_line(exc: BaseException) -> str:
    """An exception as ``Type: message`` on one line (errors here are always one line)."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def describe_range(x: np.ndarray) -> str:
    """What an error says about values that left [0, 1]."""
    if not np.isfinite(x).all():
        return "NaN or infinite values"
    return f"values in [{float(x.min()):g}, {float(x.max()):g}]"


def read_bytes(path: Path, shown: str) -> bytes:
    """Read a file, transparently gunzipping ``*.gz``; every failure becomes a DatasetError."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as fh:
                return fh.read()
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise DatasetError(f"{shown}: expected a readable file, found none") from exc
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise DatasetError(
            f"{shown}: expected a complete gzip stream, found a truncated or corrupted one "
            f"({one_line(exc)})"
        ) from exc
    except OSError as exc:
        raise DatasetError(f"{shown}: expected a readable file, found {one_line(exc)}") from exc


def check_labels(labels: np.ndarray, n_classes: int, shown: str) -> None:
    """Refuse the first label outside 0..n_classes-1, naming its value and index."""
    if labels.size == 0:
        return
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= n_classes:
        bad = int(np.flatnonzero((labels < 0) | (labels >= n_classes))[0])
        raise DatasetError(
            f"{shown}: expected labels in 0..{n_classes - 1}, found {int(labels[bad])} "
            f"at index {bad}"
        )


def starts_with_zip_magic(path: Path) -> bool:
    """Whether a file is a zip (an .npz under another name)."""
    try:
        with open(path, "rb") as fh:
            return fh.read(4) == b"PK\x03\x04"
    except OSError:
        return False
