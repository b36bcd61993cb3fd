"""Base folders for imported models: the user's exact ONNX bytes, a card, and the device card.

``import_base`` copies the user's file byte for byte into ``DIR/base.onnx`` (patches bind to its
sha256, so the file on their devices is the one patches verify against), checks the import against
onnxruntime on the whole dataset, and writes ``card.json`` and ``base.card.json`` atomically with
the folder. ``load_imported`` re-imports the graph on load (the same deterministic importer), so the
folder holds no second copy of the weights that could drift from the ONNX file.
"""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime

from .. import __version__
from ..data import Dataset, load_dataset
from ..runtime.base import BaseGraph, read_onnx
from ..runtime.errors import BaseModelError, DatasetError
from ..runtime.fileio import PathLike, sha256_bytes
from .convert import ARCH, net_logits, to_preactnet
from .errors import UnsupportedModelError
from .graph import ImportPlan, analyse

# The import must reproduce onnxruntime's logits to this on every dataset point: absolute for
# logits up to 1 in magnitude, relative above (the float64 net and the float32 graph differ by
# float32 rounding alone, which grows with the logits' size; measured up to 1e-5 absolute on
# logits near 20 in the tests' models).
LOGITS_ATOL = 1e-5


@dataclass(frozen=True, eq=False)
class ModelLayoutData:
    """A dataset with its images in the model's own input layout (a C-order reshape of the loaded
    (N, C, H, W) arrays: flat vectors, NCHW or NHWC, as the model's input says)."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    n_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.x_train.shape[1:])

    @property
    def n_train(self) -> int:
        return len(self.x_train)


def in_model_layout(ds: Dataset, input_shape: tuple[int, ...], n_classes: int) -> ModelLayoutData:
    """``ds`` reshaped (C order, no copy of values) to ``(N, *input_shape)``; refused when the sizes
    differ or a label is not one of the model's classes."""
    per = int(np.prod(ds.x_train.shape[1:]))
    if per != int(np.prod(input_shape)):
        raise DatasetError(
            f"{ds.name or 'dataset'}: samples of shape {tuple(ds.x_train.shape[1:])} ({per} values) do not fit "
            f"the model's input (N, {', '.join(map(str, input_shape))})"
        )
    for part in ("train", "test"):
        y = getattr(ds, f"y_{part}")
        if len(y) and y.max() >= n_classes:
            raise DatasetError(f"{ds.name or 'dataset'}: y_{part} has label {int(y.max())}, the model has {n_classes} classes")
    return ModelLayoutData(
        ds.name, ds.x_train.reshape(len(ds.x_train), *input_shape), ds.y_train,
        ds.x_test.reshape(len(ds.x_test), *input_shape), ds.y_test, n_classes,
    )


def inspect_model(path: PathLike) -> ImportPlan:
    """Analyse an ONNX file (no dataset needed): the plan, or :class:`UnsupportedModelError`."""
    return analyse(read_onnx(path)[1])


def check_import(graph: BaseGraph, plan: ImportPlan, x: np.ndarray) -> float:
    """Max |logit difference| between the imported net and onnxruntime on ``x``; refuse above
    :data:`LOGITS_ATOL` (the import would not be the model the device runs)."""
    from ..activations import tapped_forward

    _, ort_logits = tapped_forward(graph, x, [])
    net = to_preactnet(plan)
    if not len(x):
        return 0.0
    ref = ort_logits.astype(np.float64)
    diff = np.abs(net_logits(net, x) - ref)
    scaled = float(np.max(diff / np.maximum(1.0, np.abs(ref))))
    if not scaled <= LOGITS_ATOL:
        raise UnsupportedModelError(
            f"model: the import's logits differ from onnxruntime's by up to {scaled:.3g} (relative to "
            f"max(1, |logit|)) on the dataset, expected at most {LOGITS_ATOL:g}; some operator is not "
            "evaluated as onnxruntime does"
        )
    return float(diff.max())


def import_base(model_path: PathLike, dataset: str, out_dir: PathLike, overwrite: bool = False) -> dict[str, Any]:
    """Make a base folder from the user's ONNX classifier; return its card.

    ``DIR/base.onnx`` is the user's file byte for byte (its sha256 is checked after the copy); the
    user's own file is only read. ``build-patch --base DIR`` then works as for trained bases."""
    from ..basedir import (CARD_FORMAT, CARD_NAME, DEVICE_CARD_NAME, ONNX_NAME, _source, check_base_out,
                           dataset_fingerprint, write_device_card)

    src, out = Path(model_path), Path(out_dir)
    check_base_out(out, overwrite)
    plan = inspect_model(src)  # refuses before the dataset is loaded
    data = src.read_bytes()
    digest = sha256_bytes(data)
    ds = load_dataset(dataset)
    layout = in_model_layout(ds, plan.input_shape, plan.n_classes)
    from ..basedir import building_base_folder

    with building_base_folder(out) as tmp:
        (tmp / ONNX_NAME).write_bytes(data)
        graph = BaseGraph.load(tmp / ONNX_NAME)
        if graph.sha256 != digest:
            raise BaseModelError(f"{tmp / ONNX_NAME}: copy differs from {src.name} (sha256 {graph.sha256[:16]}...)")
        if graph.logits_name != plan.logits_name:  # one rule on both sides; a guard against drift
            raise UnsupportedModelError(f"model: device finds logits {graph.logits_name!r}, the importer {plan.logits_name!r}")
        diff = max(check_import(graph, plan, layout.x_train), check_import(graph, plan, layout.x_test))
        device_card = write_device_card(tmp / ONNX_NAME, layout.x_train, plan.n_classes)
        shapes = graph.tensor_shapes()
        from ..basedir import ort_accuracy

        card = {
            "format": CARD_FORMAT,
            "arch": ARCH,
            "config": {},
            "dataset": {"name": ds.name, "split": ds.split, "n_train": ds.n_train, "n_test": ds.n_test,
                        "input_shape": list(plan.input_shape), "n_classes": plan.n_classes,
                        "source": _source(dataset), "fingerprint": dataset_fingerprint(ds)},
            "input_shape": list(plan.input_shape),
            "n_classes": plan.n_classes,
            "training": {"training_seconds": None, "imported": True},
            "import": {
                "source_file": src.name,
                "sha256": digest,
                "bytes": len(data),
                "producer": plan.summary()["producer"],
                "input_layout": plan.input_layout(),
                "layers": [" ".join(layer.ops()) for layer in plan.layers],
                "tail": plan.summary()["tail"],
                "max_abs_logit_diff_vs_onnxruntime": diff,
                "checked_points": int(len(layout.x_train) + len(layout.x_test)),
            },
            "metrics": {
                "train_accuracy": ort_accuracy(tmp / ONNX_NAME, layout.x_train, layout.y_train),
                "test_accuracy": ort_accuracy(tmp / ONNX_NAME, layout.x_test, layout.y_test),
                "measured_with": "onnxruntime",
            },
            "onnx": {
                "file": ONNX_NAME, "sha256": digest, "opset": graph.opset, "ir_version": graph.ir_version,
                "input": graph.input_name, "logits": graph.logits_name,
                "preacts": [g.name for g in device_card.relu_inputs],
                "preact_shapes": [list(g.shape) for g in device_card.relu_inputs],
            },
            "device_card": {"file": DEVICE_CARD_NAME, "gate_step_log2": device_card.gate_step_log2},
            "versions": {"prune_edge": __version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
                         "python": platform.python_version()},
        }
        if card["onnx"]["preacts"] != plan.relu_names or [tuple(s) for s in card["onnx"]["preact_shapes"]] != [tuple(shapes[n]) for n in plan.relu_names]:
            raise UnsupportedModelError(f"model: the device card's Relu inputs {card['onnx']['preacts']} differ from the import's {plan.relu_names}")
        (tmp / CARD_NAME).write_text(json.dumps(card, indent=2) + "\n")
    return card


def load_imported(folder: Path, card: dict[str, Any]):
    """A :class:`~prune_edge.basedir.BaseBundle` for an imported base folder: the net re-imported
    from ``base.onnx`` (checked against the card's sha256 first), the dataset in the model's layout."""
    from ..basedir import DEVICE_CARD_NAME, ONNX_NAME, BaseBundle, dataset_fingerprint, write_device_card
    from ..runtime.fileio import sha256_file

    f = folder / ONNX_NAME
    if not f.exists():
        raise BaseModelError(f"{folder}: expected {ONNX_NAME}, found none")
    digest = sha256_file(f)
    if digest != card["onnx"]["sha256"]:
        raise BaseModelError(f"{f}: expected sha256 {card['onnx']['sha256'][:16]}... (card.json), found {digest[:16]}...")
    plan = inspect_model(f)
    net = to_preactnet(plan)
    ds = load_dataset(card["dataset"]["source"])
    if dataset_fingerprint(ds) != card["dataset"]["fingerprint"]:
        raise BaseModelError(f"{folder}: dataset {card['dataset']['source']!r} differs from the one this base was imported with")
    layout = in_model_layout(ds, plan.input_shape, plan.n_classes)
    if not (folder / DEVICE_CARD_NAME).exists():
        write_device_card(f, layout.x_train, plan.n_classes)
    return BaseBundle(path=folder, card=card, net=net, dataset=layout)
