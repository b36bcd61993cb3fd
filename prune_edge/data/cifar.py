"""CIFAR-10 python-batches folders, read with a restricted unpickler (no arbitrary globals)."""

from __future__ import annotations

import _compat_pickle
import codecs
import functools
import io
import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np

from prune_edge.runtime.errors import DatasetError

from ._common import check_labels, one_line, read_bytes, scale_uint8
from .dataset import Dataset


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
    data = read_bytes(path, shown)
    try:
        return _RestrictedUnpickler(io.BytesIO(data), shown).load()
    except DatasetError:
        raise
    except Exception as exc:  # noqa: BLE001  (any failure of untrusted bytes is a bad file)
        raise DatasetError(
            f"{shown}: expected a CIFAR-10 python batch pickle, found unreadable data "
            f"({one_line(exc)})"
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
        raise DatasetError(f"{folder}: expected a readable folder, found {one_line(exc)}") from exc
    found = [
        (int(m.group(1)), p)
        for p in entries
        if (m := _CIFAR_BATCH.match(p.name)) and p.is_file()
    ]
    return [p for _, p in sorted(found)]


def has_cifar_batches(folder: Path) -> bool:
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
            f"{shown}: expected b'labels' as a list of integers, found {one_line(exc)}"
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
    check_labels(y, 10, shown)
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


def load_cifar_folder(folder: Path) -> Dataset:
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
        x_train=scale_uint8(x_tr),
        y_train=y_tr,
        x_test=scale_uint8(x_te),
        y_test=y_te,
        n_classes=10,
        split=f"CIFAR-10 python batches in {label}: {len(y_tr)} train ({names}) / {len(y_te)} test "
        f"(test_batch)",
        class_names=_cifar_class_names(folder),
    )
