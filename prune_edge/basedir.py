"""A base-model folder: ``base.onnx`` + ``weights.pt`` + ``card.json``, written and read as one unit.

The folder is written into a temp sibling and renamed into place, so a crash or a refused input never
leaves a half-written base behind. ``card.json`` pins base.onnx by sha256 and records the recipe, so
the base can be retrained exactly (with or without a forget set).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import tempfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import onnx
import onnxruntime
import torch

from . import __version__
from .activations import TrainActivations, choose_base_step
from .data import NAMED_DATASETS, Dataset, load_dataset
from .exporters.onnx_base import export_base
from .ledger import LEDGER_DIRNAME, entries
from .models.nets import PreactNet, build_model
from .runtime.errors import BaseModelError, PruneEdgeError
from .runtime.base import BaseGraph
from .runtime.basecard import BaseCard, card_path_for, relu_inputs
from .runtime.fileio import PathLike, apply_umask, sha256_file
from .runtime.model import PatchedModel
from .train import TrainConfig, fit

CARD_NAME = "card.json"
ONNX_NAME = "base.onnx"
DEVICE_CARD_NAME = card_path_for(ONNX_NAME).name  # base.card.json: what devices keep beside base.onnx
WEIGHTS_NAME = "weights.pt"
CARD_FORMAT = "prune-edge-base/1"


@dataclass
class BaseBundle:
    """A loaded base folder: card, torch model (CPU, eval), ONNX path and the dataset it was trained on."""

    path: Path
    card: dict[str, Any]
    net: PreactNet
    dataset: Dataset

    @property
    def onnx_path(self) -> Path:
        return self.path / ONNX_NAME

    @cached_property
    def activations(self) -> TrainActivations:
        """The training set through this base, kept for the bundle's lifetime: a server that holds
        a loaded base answers every later request without another pass over the training set."""
        card = self.graph.card
        return TrainActivations(self.graph, self.dataset.x_train, card.gate_step_log2, [g.name for g in card.relu_inputs])

    @cached_property
    def graph(self) -> BaseGraph:
        """base.onnx as the device sees it, loaded once (with its shape inference): every patch built
        from this bundle is checked against it before it is written."""
        graph = BaseGraph.load(self.onnx_path)
        if graph.sha256 != self.card["onnx"]["sha256"]:
            raise BaseModelError(f"{self.onnx_path}: changed on disk since the base was loaded (sha256 {graph.sha256[:16]}...)")
        return graph

    @property
    def train_config(self) -> TrainConfig:
        t = self.card["training"]
        return TrainConfig(
            arch=self.card["arch"], seed=t["seed"], epochs=t["epochs"], batch_size=t["batch_size"],
            lr=t["lr"], weight_decay=t["weight_decay"], model_config=self.card["config"],
        )


def write_device_card(onnx_path: Path, x_train: np.ndarray, n_classes: int) -> BaseCard:
    """Write ``base.card.json`` beside ``base.onnx``: its sha256, its Relu inputs (re-derived from the
    graph, as a device does) and the gates' step, chosen once from the training set."""
    graph = BaseGraph.load(onnx_path)
    relus = relu_inputs(graph.model, graph.tensor_shapes())
    if not relus:
        raise BaseModelError(f"{onnx_path}: expected Relu nodes to gate on, found none")
    step = choose_base_step(graph, x_train, [g.name for g in relus])
    card = BaseCard(graph.sha256, graph.logits_name, n_classes, relus, step)
    card.write(card_path_for(onnx_path))
    return card


def _source(dataset: str) -> str:
    """How to load the dataset again: its name, or the resolved path of the user's file/folder."""
    return dataset if dataset in NAMED_DATASETS else str(Path(dataset).resolve())


def dataset_fingerprint(ds: Dataset) -> str:
    """sha256 over the arrays: a reloaded dataset must be exactly the one the base saw."""
    h = hashlib.sha256()
    for a in (ds.x_train, ds.y_train, ds.x_test, ds.y_test):
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def ort_accuracy(onnx_path: PathLike, x: np.ndarray, y: np.ndarray, patches: tuple = ()) -> float:
    """Accuracy measured through onnxruntime (the device path), not torch."""
    model = PatchedModel(onnx_path, patches)
    return float((model.predict(x) == y).mean())


def bound_patches(base_dir: PathLike) -> list[Path]:
    """The ``.pepatch`` files in a base folder and in its parent whose manifest binds them to this base
    (same base sha256): the patches that stop verifying if the base is replaced. Files that are not
    readable patches are skipped; this is a warning list, not a verification."""
    from .runtime.patchfile import PATCH_SUFFIX, read_patch_file

    folder = Path(base_dir)
    try:
        sha = read_card(folder)["onnx"]["sha256"]
    except (BaseModelError, KeyError, TypeError):
        if not (folder / ONNX_NAME).is_file():
            return []
        sha = sha256_file(folder / ONNX_NAME)
    found = []
    recorded = []  # where build-patch wrote the patches it recorded in this base's ledger
    try:
        recorded = [Path(doc["patch"]) for doc in entries(folder / LEDGER_DIRNAME) if isinstance(doc.get("patch"), str)]
    except PruneEdgeError:
        pass
    folders: dict[Path, Path] = {}  # each folder once (by its real path), named as first seen
    for w in (folder, folder.parent, *(p.parent for p in recorded)):
        folders.setdefault(w.resolve(), w)
    for where in folders.values():
        for path in sorted(where.glob(f"*{PATCH_SUFFIX}")):
            try:
                if path.is_file() and read_patch_file(path).manifest.base_sha256 == sha:
                    found.append(path)
            except (PruneEdgeError, OSError, ValueError):
                continue
    return found


def check_base_out(out_dir: PathLike, overwrite: bool) -> None:
    """Refuse a destination that cannot become a base folder, before any slow work: a file, a folder
    of other files, or (unless ``overwrite``) an existing base, naming the patches bound to it."""
    out = Path(out_dir)
    if not out.exists():
        return
    if not out.is_dir() or (any(out.iterdir()) and not (out / CARD_NAME).exists()):
        raise BaseModelError(f"{out}: expected a new folder or an existing base folder, found other files")
    if overwrite or not any(out.iterdir()):
        return
    patches = bound_patches(out)
    orphaned = ""
    if patches:
        where = ", ".join(dict.fromkeys(str(p.parent) for p in patches))
        orphaned = f"; {len(patches)} patch file{'s' if len(patches) != 1 else ''} bound to it (in {where}) would stop verifying"
    raise BaseModelError(f"{out}: expected a new folder, found an existing base{orphaned}; pass --force to overwrite it")


@contextlib.contextmanager
def building_base_folder(out: Path) -> Iterator[Path]:
    """Yield a temp folder beside ``out`` to build a base folder in (the user's umask, not mkdtemp's
    0700); if the block succeeds it replaces ``out`` (the old base's ledger moves along: the request
    records outlive the base they were made for, they name the ids the next training must leave out).
    Either way no temp folder is left behind."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        apply_umask(tmp, folder=True)
        yield tmp
        if (out / LEDGER_DIRNAME).is_dir():
            shutil.copytree(out / LEDGER_DIRNAME, tmp / LEDGER_DIRNAME)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def train_base(
    dataset: str,
    arch: str,
    out_dir: PathLike,
    seed: int = 0,
    epochs: int | None = None,
    device: str = "auto",
    progress: bool = True,
    overwrite: bool = True,
) -> dict[str, Any]:
    """Train a base model and write its folder atomically; return the card.

    The destination is checked before any training (``check_base_out``): with ``overwrite`` False an
    existing base is refused, since replacing it orphans every patch bound to its sha256."""
    out = Path(out_dir)
    check_base_out(out, overwrite)
    ds = load_dataset(dataset)
    config = TrainConfig(arch=arch, seed=seed, epochs=epochs)
    net, stats = fit(ds.x_train, ds.y_train, ds.n_classes, config, device=device, progress=progress, desc=f"train {arch}")
    with building_base_folder(out) as tmp:
        export = export_base(net, ds.input_shape, tmp / ONNX_NAME)
        torch.save(net.state_dict(), tmp / WEIGHTS_NAME)
        card = {
            "format": CARD_FORMAT,
            "dataset": {**ds.summary(), "source": _source(dataset), "fingerprint": dataset_fingerprint(ds)},
            "arch": arch,
            "config": net.config,
            "input_shape": list(ds.input_shape),
            "n_classes": ds.n_classes,
            "training": {**config.to_card(), **{k: stats[k] for k in ("training_seconds", "final_loss", "device")}},
            "metrics": {
                "train_accuracy": ort_accuracy(tmp / ONNX_NAME, ds.x_train, ds.y_train),
                "test_accuracy": ort_accuracy(tmp / ONNX_NAME, ds.x_test, ds.y_test),
                "measured_with": "onnxruntime",
            },
            "onnx": export.to_card(),
            "weights": {"file": WEIGHTS_NAME, "sha256": sha256_file(tmp / WEIGHTS_NAME)},
            "versions": {
                "prune_edge": __version__,
                "torch": torch.__version__,
                "onnx": onnx.__version__,
                "onnxruntime": onnxruntime.__version__,
                "python": platform.python_version(),
            },
        }
        device_card = write_device_card(tmp / ONNX_NAME, ds.x_train, ds.n_classes)
        if [g.name for g in device_card.relu_inputs] != card["onnx"]["preacts"]:
            raise BaseModelError(f"exported graph's Relu inputs {[g.name for g in device_card.relu_inputs]} are not its pre-activations")
        card["device_card"] = {"file": DEVICE_CARD_NAME, "gate_step_log2": device_card.gate_step_log2}
        (tmp / CARD_NAME).write_text(json.dumps(card, indent=2) + "\n")
    return card


def read_card(path: PathLike) -> dict[str, Any]:
    """Read and sanity-check ``card.json`` of a base folder."""
    folder = Path(path)
    card_path = folder / CARD_NAME
    try:
        card = json.loads(card_path.read_text())
    except FileNotFoundError:
        raise BaseModelError(f"{folder}: expected a base folder with {CARD_NAME} (from `prune-edge train-base`), found none") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise BaseModelError(f"{card_path}: expected JSON, found {exc}") from None
    if not isinstance(card, dict) or card.get("format") != CARD_FORMAT:
        raise BaseModelError(f"{card_path}: expected format {CARD_FORMAT!r}, found {card.get('format') if isinstance(card, dict) else card!r}")
    return card


def load_base(path: PathLike) -> BaseBundle:
    """Load a base folder, checking that base.onnx and the weights are the ones the card pins."""
    folder = Path(path)
    card = read_card(folder)
    if card.get("arch") == "imported":  # the user's own ONNX model (prune-edge import-base): no weights.pt
        from .importer.folder import load_imported

        return load_imported(folder, card)
    for key, name in (("onnx", ONNX_NAME), ("weights", WEIGHTS_NAME)):
        f = folder / name
        if not f.exists():
            raise BaseModelError(f"{folder}: expected {name}, found none")
        digest = sha256_file(f)
        if digest != card[key]["sha256"]:
            raise BaseModelError(f"{f}: expected sha256 {card[key]['sha256'][:16]}... (card.json), found {digest[:16]}...")
    net = build_model(card["arch"], card["input_shape"], card["n_classes"], card["config"])
    net.load_state_dict(torch.load(folder / WEIGHTS_NAME, map_location="cpu", weights_only=True))
    net.eval()
    dataset = load_dataset(card["dataset"]["source"])
    if dataset_fingerprint(dataset) != card["dataset"]["fingerprint"]:
        raise BaseModelError(f"{folder}: dataset {card['dataset']['source']!r} differs from the one this base was trained on")
    if not (folder / DEVICE_CARD_NAME).exists():  # a base from before device cards: write it now
        write_device_card(folder / ONNX_NAME, dataset.x_train, card["n_classes"])
    return BaseBundle(path=folder, card=card, net=net, dataset=dataset)
