"""The base card: what a device keeps beside ``base.onnx`` to bind every patch to that base.

A patch decides where its gates open from numbers its author picks; the card fixes the ones that are
the base's business, not the author's: the base's sha256, the tensors a gate may read (the inputs of
the base's Relu nodes, in graph order, which the device re-derives from the graph itself) and the
gates' quantization step (chosen once from the training set by ``train-base``). ``certify`` and
:class:`~prune_edge.runtime.PatchedModel` refuse a patch that reads anything else or another step.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from .errors import BaseModelError
from .fileio import PathLike, atomic_write_bytes
from .manifest import GatedTensor

CARD_FORMAT = "prune-edge-base-card/1"
CARD_SUFFIX = ".card.json"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def card_path_for(base_onnx: PathLike) -> Path:
    """``base.onnx`` -> ``base.card.json`` in the same folder."""
    p = Path(base_onnx)
    return p.with_name(p.stem + CARD_SUFFIX)


@dataclass(frozen=True)
class BaseCard:
    """The base's identity and the gate inputs a patch may use."""

    base_sha256: str
    logits_name: str
    n_classes: int
    relu_inputs: tuple[GatedTensor, ...]
    gate_step_log2: int

    def to_json(self) -> dict[str, Any]:
        return {
            "format": CARD_FORMAT,
            "base_sha256": self.base_sha256,
            "logits": self.logits_name,
            "n_classes": self.n_classes,
            "relu_inputs": [{"name": g.name, "shape": list(g.shape)} for g in self.relu_inputs],
            "gate_step_log2": self.gate_step_log2,
        }

    def write(self, path: PathLike) -> Path:
        return atomic_write_bytes(path, (json.dumps(self.to_json(), indent=1) + "\n").encode())

    @classmethod
    def from_json(cls, doc: Any, source: str) -> "BaseCard":
        def bad(what: str, found: Any) -> BaseModelError:
            return BaseModelError(f"{source}: expected {what}, found {str(found)[:60]!r}")

        keys = {"format", "base_sha256", "logits", "n_classes", "relu_inputs", "gate_step_log2"}
        if not isinstance(doc, dict) or set(doc) != keys:
            raise bad(f"an object with keys {sorted(keys)}", sorted(doc) if isinstance(doc, dict) else doc)
        if doc["format"] != CARD_FORMAT:
            raise bad(f"format {CARD_FORMAT!r}", doc["format"])
        if not isinstance(doc["base_sha256"], str) or not _HEX64.fullmatch(doc["base_sha256"]):
            raise bad("base_sha256 of 64 hex digits", doc["base_sha256"])
        step = doc["gate_step_log2"]
        if isinstance(step, bool) or not isinstance(step, int) or not -24 <= step <= 8:
            raise bad("gate_step_log2 an int in [-24, 8]", step)
        n_classes = doc["n_classes"]
        if isinstance(n_classes, bool) or not isinstance(n_classes, int) or n_classes < 2:
            raise bad("n_classes >= 2", n_classes)
        relus = []
        for g in doc["relu_inputs"] if isinstance(doc["relu_inputs"], list) else [None]:
            ok = isinstance(g, dict) and set(g) == {"name", "shape"} and isinstance(g["name"], str)
            ok = ok and isinstance(g["shape"], list) and all(isinstance(d, int) and d > 0 for d in g["shape"])
            if not ok:
                raise bad("relu_inputs as a list of {name, shape}", g)
            relus.append(GatedTensor(g["name"], tuple(g["shape"])))
        if not relus or not isinstance(doc["logits"], str):
            raise bad("at least one Relu input and a logits name", doc["relu_inputs"])
        return cls(doc["base_sha256"], doc["logits"], n_classes, tuple(relus), step)

    @classmethod
    def load(cls, path: PathLike) -> "BaseCard":
        p = Path(path)
        try:
            doc = json.loads(p.read_text())
        except FileNotFoundError:
            raise BaseModelError(
                f"{p}: expected the base card beside the base model (written by train-base), found none"
            ) from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise BaseModelError(f"{p}: expected a JSON base card, found {exc}") from None
        return cls.from_json(doc, p.name)


ML_DOMAIN = "ai.onnx.ml"
# Nodes that start a classifier tail: they read the logits and are not part of the piecewise-linear body.
TAIL_ENTRY_OPS = frozenset({"Softmax", "LogSoftmax", "ArgMax"})


def is_tail_entry(node: onnx.NodeProto) -> bool:
    """A Softmax/LogSoftmax/ArgMax, or any ``ai.onnx.ml`` node (label lookup, ZipMap, ...)."""
    return node.domain == ML_DOMAIN or (node.domain in ("", "ai.onnx") and node.op_type in TAIL_ENTRY_OPS)


def find_logits(model: onnx.ModelProto) -> str:
    """The logits tensor: the input of the classifier tail, or the first graph output when there is none.

    A converter's model often ends in Softmax, ArgMax and an ``ai.onnx.ml`` label lookup or ZipMap
    (skl2onnx), so its first output is a label, not the logits. The logits are the one data tensor
    (computed from the graph input) that a tail node reads while nothing upstream of it is tail: the
    patch must correct that tensor, so that every output after it reflects the correction. The device
    re-derives it from the graph, as it does the Relu inputs."""
    graph = model.graph
    data = {i.name for i in graph.input} - {i.name for i in graph.initializer}
    after_tail: set[str] = set()
    candidates: list[str] = []
    for node in graph.node:
        ins = [i for i in node.input if i]
        if any(i in data for i in ins):
            data.update(node.output)
        if is_tail_entry(node):
            candidates += [i for i in ins if i in data and i not in after_tail and i not in candidates]
        if is_tail_entry(node) or any(i in after_tail for i in ins):
            after_tail.update(node.output)
    if len(candidates) > 1:
        raise BaseModelError(f"base: expected the classifier tail to read one logits tensor, found {candidates}")
    return candidates[0] if candidates else graph.output[0].name


def relu_inputs(model: onnx.ModelProto, shapes: dict[str, tuple]) -> tuple[GatedTensor, ...]:
    """The input tensor of every Relu node, in graph order, with its shape after the batch dim."""
    out = []
    for node in model.graph.node:
        if node.op_type == "Relu" and node.domain in ("", "ai.onnx"):
            name = node.input[0]
            shape = shapes.get(name)
            if shape is None or any(d is None for d in shape):
                raise BaseModelError(f"base: Relu input {name!r} expected a static shape, found {shape}")
            out.append(GatedTensor(name, tuple(int(d) for d in shape)))
    return tuple(out)
