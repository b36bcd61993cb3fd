"""``.npz`` dataset files: reading users' layouts and writing the canonical one (:func:`save_npz`)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from prune_edge.runtime.errors import DatasetError
from prune_edge.runtime.fileio import atomic_path

from ._common import PathLike, describe_range, one_line, scale_uint8
from .dataset import Dataset

NPZ_KEYS: tuple[str, ...] = ("x_train", "y_train", "x_test", "y_test")
MAX_CLASSES = 1 << 16  # an .npz label at or above this is a corrupt file, not a class index


def _npz_images(x: np.ndarray, key: str, shown: str) -> np.ndarray:
    if x.ndim == 4:
        images = x
    elif x.ndim == 3:
        images = x[:, None, :, :]
    elif x.ndim == 2:
        d = x.shape[1]
        s = math.isqrt(d)
        images = x.reshape(x.shape[0], 1, s, s) if s * s == d and d > 0 else x[:, None, None, :]
    else:
        raise DatasetError(
            f"{shown}: expected {key} of shape (N, C, H, W), (N, H, W) or (N, D), found {x.shape}"
        )
    if images.shape[0] == 0 or 0 in images.shape[1:]:
        raise DatasetError(f"{shown}: expected a non-empty {key}, found shape {x.shape}")
    if x.dtype == np.bool_ or not (
        np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)
    ):
        raise DatasetError(
            f"{shown}: expected {key} as uint8 0..255 or floats in [0, 1], found dtype {x.dtype}"
        )
    if np.issubdtype(x.dtype, np.integer):
        lo, hi = int(images.min()), int(images.max())
        if lo < 0 or hi > 255:
            raise DatasetError(
                f"{shown}: expected integer {key} pixels in 0..255, found values in [{lo}, {hi}]"
            )
        return scale_uint8(images)
    out = np.ascontiguousarray(images, dtype=np.float32)
    if not np.isfinite(out).all() or out.min() < 0.0 or out.max() > 1.0:
        raise DatasetError(
            f"{shown}: expected float {key} pixels in [0, 1] (or uint8 0..255), found "
            f"{describe_range(images.astype(np.float64))}"
        )
    return out


def _npz_labels(y: np.ndarray, key: str, n: int, shown: str) -> np.ndarray:
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise DatasetError(f"{shown}: expected {key} of shape (N,), found {y.shape}")
    if y.shape[0] != n:
        xkey = "x_" + key.split("_", 1)[1]
        raise DatasetError(
            f"{shown}: expected {n} labels in {key} to match {xkey}, found {y.shape[0]}"
        )
    if y.dtype == np.bool_ or not (
        np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.floating)
    ):
        raise DatasetError(
            f"{shown}: expected integer class labels in {key}, found dtype {y.dtype}"
        )
    if np.issubdtype(y.dtype, np.floating):
        if not np.isfinite(y).all() or not np.array_equal(y, np.round(y)):
            raise DatasetError(f"{shown}: expected integer class labels in {key}, found fractions")
    if y.min() < 0:
        bad = int(np.flatnonzero(y < 0)[0])
        raise DatasetError(
            f"{shown}: expected non-negative labels in {key}, found {y[bad]} at index {bad}"
        )
    if y.max() >= MAX_CLASSES:
        bad = int(np.argmax(y))
        raise DatasetError(
            f"{shown}: expected class-index labels below {MAX_CLASSES} in {key}, found {y[bad]} "
            f"at index {bad}"
        )
    return np.ascontiguousarray(y.astype(np.int64))


def load_npz(path: Path) -> Dataset:
    shown = str(path)
    arrays: dict[str, np.ndarray] = {}
    try:
        with open(path, "rb") as fh:
            loaded = np.load(fh, allow_pickle=False)
            if not hasattr(loaded, "files"):
                raise DatasetError(
                    f"{shown}: expected an .npz archive with {', '.join(NPZ_KEYS)}, found a single "
                    f"array (.npy)"
                )
            with loaded:
                missing = [k for k in NPZ_KEYS if k not in loaded.files]
                if missing:
                    raise DatasetError(
                        f"{shown}: expected arrays {', '.join(NPZ_KEYS)}, found "
                        f"[{', '.join(loaded.files)}] (missing {', '.join(missing)})"
                    )
                for k in NPZ_KEYS:
                    arrays[k] = np.asarray(loaded[k])
    except DatasetError:
        raise
    except Exception as exc:  # noqa: BLE001  (zip, zlib, OSError, ValueError from untrusted bytes)
        raise DatasetError(
            f"{shown}: expected a readable .npz archive with {', '.join(NPZ_KEYS)}, found "
            f"{one_line(exc)}"
        ) from exc
    x_tr = _npz_images(arrays["x_train"], "x_train", shown)
    x_te = _npz_images(arrays["x_test"], "x_test", shown)
    if x_tr.shape[1:] != x_te.shape[1:]:
        raise DatasetError(
            f"{shown}: expected x_test images of shape {x_tr.shape[1:]} like x_train, found "
            f"{x_te.shape[1:]}"
        )
    y_tr = _npz_labels(arrays["y_train"], "y_train", x_tr.shape[0], shown)
    y_te = _npz_labels(arrays["y_test"], "y_test", x_te.shape[0], shown)
    n_classes = int(max(y_tr.max(), y_te.max())) + 1
    return Dataset(
        name=f"npz:{path.name}",
        x_train=x_tr,
        y_train=y_tr,
        x_test=x_te,
        y_test=y_te,
        n_classes=n_classes,
        split=f"x_train/x_test as stored in {path.name}: {len(y_tr)} train / {len(y_te)} test",
    )



def save_npz(dataset: Dataset, path: PathLike) -> Path:
    """Write exactly ``x_train, y_train, x_test, y_test`` (float32 / int64) to ``path`` atomically.

    The file is written as given (no ``.npz`` is appended) and loads back with :func:`load_dataset`
    to identical arrays.
    """
    target = Path(os.fspath(path)).expanduser()
    arrays = {
        "x_train": np.ascontiguousarray(dataset.x_train, dtype=np.float32),
        "y_train": np.ascontiguousarray(dataset.y_train, dtype=np.int64),
        "x_test": np.ascontiguousarray(dataset.x_test, dtype=np.float32),
        "y_test": np.ascontiguousarray(dataset.y_test, dtype=np.int64),
    }
    try:
        with atomic_path(target) as tmp:
            with open(tmp, "wb") as fh:
                np.savez_compressed(fh, **arrays)
    except OSError as exc:
        raise DatasetError(f"{target}: expected a writable path, found {one_line(exc)}") from exc
    return target
