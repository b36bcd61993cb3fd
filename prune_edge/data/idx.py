"""MNIST / Fashion-MNIST IDX folders (four files, optionally gzipped), headers checked."""

from __future__ import annotations

import math
import struct
from pathlib import Path

import numpy as np

from prune_edge.runtime.errors import DatasetError

from ._common import check_labels, read_bytes, scale_uint8
from .dataset import Dataset


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


def find_idx_files(folder: Path, require_all: bool) -> dict[str, Path]:
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
    data = read_bytes(path, shown)
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
    check_labels(labels, 10, str(labels_path))
    return images, labels


def load_idx_folder(folder: Path) -> Dataset:
    files = find_idx_files(folder, require_all=True)
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
        x_train=scale_uint8(x_tr[:, None, :, :]),
        y_train=y_tr.astype(np.int64),
        x_test=scale_uint8(x_te[:, None, :, :]),
        y_test=y_te.astype(np.int64),
        n_classes=10,
        split=(
            f"IDX files in {label}: official train/test split, {len(y_tr)} train "
            f"({files['train_images'].name}) / {len(y_te)} test ({files['test_images'].name})"
        ),
    )
