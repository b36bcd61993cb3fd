"""The :class:`Dataset` record every loader returns, and the contract it enforces."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from prune_edge.runtime.errors import DatasetError

from ._common import describe_range


@dataclass(frozen=True, eq=False)
class Dataset:
    """A train/test pair of images and labels, normalised to float32 ``(N, C, H, W)`` in ``[0, 1]``.

    ``eq=False``: two datasets compare by identity (compare arrays with ``np.array_equal``). Arrays
    are coerced to C-contiguous float32 / int64 and checked on construction, so a hand-built
    ``Dataset`` obeys the same contract as a loaded one. ``class_names`` is optional (known for the
    named datasets and for CIFAR-10 folders with ``batches.meta``).
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    n_classes: int
    split: str
    class_names: tuple[str, ...] | None = field(default=None)

    def __post_init__(self) -> None:
        where = self.name or "dataset"
        for part in ("train", "test"):
            x = np.ascontiguousarray(getattr(self, f"x_{part}"), dtype=np.float32)
            y = np.asarray(getattr(self, f"y_{part}"))
            if x.ndim != 4:
                raise DatasetError(
                    f"{where}: expected x_{part} of shape (N, C, H, W), found shape {x.shape}"
                )
            if y.ndim != 1 or y.shape[0] != x.shape[0]:
                raise DatasetError(
                    f"{where}: expected y_{part} of shape ({x.shape[0]},) matching x_{part}, "
                    f"found shape {y.shape}"
                )
            if y.dtype != np.int64:
                if y.size and not np.issubdtype(y.dtype, np.integer):
                    raise DatasetError(f"{where}: expected integer y_{part}, found dtype {y.dtype}")
                y = y.astype(np.int64)
            y = np.ascontiguousarray(y)
            if x.size and not (np.isfinite(x).all() and x.min() >= 0.0 and x.max() <= 1.0):
                raise DatasetError(
                    f"{where}: expected x_{part} values in [0, 1], found "
                    f"{describe_range(x)}"
                )
            object.__setattr__(self, f"x_{part}", x)
            object.__setattr__(self, f"y_{part}", y)
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise DatasetError(
                f"{where}: expected train and test images of the same shape, found "
                f"{self.x_train.shape[1:]} and {self.x_test.shape[1:]}"
            )
        n_classes = int(self.n_classes)
        if n_classes < 1:
            raise DatasetError(f"{where}: expected n_classes >= 1, found {self.n_classes}")
        object.__setattr__(self, "n_classes", n_classes)
        for part in ("train", "test"):
            y = getattr(self, f"y_{part}")
            if y.size and (y.min() < 0 or y.max() >= n_classes):
                raise DatasetError(
                    f"{where}: expected y_{part} labels in 0..{n_classes - 1}, found "
                    f"{int(y.min())}..{int(y.max())}"
                )
        if self.class_names is not None:
            names = tuple(str(c) for c in self.class_names)
            if len(names) != n_classes:
                raise DatasetError(
                    f"{where}: expected {n_classes} class names, found {len(names)}"
                )
            object.__setattr__(self, "class_names", names)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        c, h, w = self.x_train.shape[1:]
        return int(c), int(h), int(w)

    @property
    def n_train(self) -> int:
        return int(self.x_train.shape[0])

    @property
    def n_test(self) -> int:
        return int(self.x_test.shape[0])

    def sample(self, index: int, split: str = "train") -> tuple[np.ndarray, int]:
        """One image as a batch of one, ``(1, C, H, W)`` float32 in ``[0, 1]`` (what a model and every
        device command take), and its label. Indices are the ones forget files and reports use."""
        if split not in ("train", "test"):
            raise DatasetError(f"{self.name or 'dataset'}: expected split 'train' or 'test', found {split!r}")
        x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
        if not 0 <= index < len(x):
            raise DatasetError(
                f"{self.name or 'dataset'}: expected an index in [0, {len(x)}) of the {split} split, found {index}"
            )
        return np.ascontiguousarray(x[index : index + 1], dtype=np.float32), int(y[index])

    def summary(self) -> dict:
        """JSON-able description: name, split, n_train, n_test, input_shape, n_classes."""
        return {
            "name": self.name,
            "split": self.split,
            "n_train": self.n_train,
            "n_test": self.n_test,
            "input_shape": list(self.input_shape),
            "n_classes": self.n_classes,
        }
