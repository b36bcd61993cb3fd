"""The device's view of a base model: its exact bytes, identity and the tensors patches may tap."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from .basecard import BaseCard, card_path_for, find_logits, relu_inputs
from .errors import BaseModelError, InputError
from .fileio import PathLike, sha256_bytes


def read_onnx(path: PathLike, what: str = "model") -> tuple[bytes, onnx.ModelProto]:
    """The file's exact bytes (what a sha256 binds) and the model decoded from them; a named error
    saying what was expected otherwise."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise BaseModelError(f"{p}: cannot read {what} ({exc.strerror or exc})") from None
    try:
        return data, onnx.load_from_string(data)
    except Exception as exc:  # protobuf's DecodeError has no stable import path
        raise BaseModelError(f"{p.name}: expected an ONNX model, found undecodable bytes ({exc})") from None


def _dims(value_info: onnx.ValueInfoProto) -> tuple:
    shape = value_info.type.tensor_type.shape
    return tuple(d.dim_value if d.HasField("dim_value") else None for d in shape.dim)


@dataclass
class BaseGraph:
    """A base ONNX model loaded once: bytes (for the binding digest), proto, and tensor shapes."""

    path: Path
    data: bytes
    model: onnx.ModelProto
    sha256: str
    opset: int
    ir_version: int
    input_name: str
    input_shape: tuple  # after the batch dim; None where symbolic
    logits_name: str
    _shapes: dict[str, tuple] | None = field(default=None, repr=False)
    _card: BaseCard | None = field(default=None, repr=False)
    card_path: Path | None = None  # None: base.card.json beside the model

    @classmethod
    def load(cls, path: PathLike, card_path: PathLike | None = None) -> "BaseGraph":
        """Read a base model; its card is read (and checked) when a patch first needs it."""
        p = Path(path)
        data, model = read_onnx(p, "base model")
        graph = model.graph
        init_names = {i.name for i in graph.initializer}
        inputs = [i for i in graph.input if i.name not in init_names]
        if len(inputs) != 1 or not graph.output:
            raise BaseModelError(
                f"{p.name}: expected one input and at least one output, found {len(inputs)} inputs "
                f"and {len(graph.output)} outputs"
            )
        opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
        if opset is None:
            raise BaseModelError(f"{p.name}: expected a default-domain opset import, found none")
        return cls(
            path=p,
            data=data,
            model=model,
            sha256=sha256_bytes(data),
            opset=int(opset),
            ir_version=int(model.ir_version),
            input_name=inputs[0].name,
            input_shape=_dims(inputs[0])[1:],
            logits_name=find_logits(model),  # the classifier tail's input, else the first output
            card_path=None if card_path is None else Path(card_path),
        )

    @property
    def card(self) -> BaseCard:
        """The base card beside the model (or at ``card_path``), checked against this very graph:
        same sha256 and logits, and its Relu inputs re-derived from the graph's own Relu nodes."""
        if self._card is None:
            path = self.card_path or card_path_for(self.path)
            card = BaseCard.load(path)
            name = Path(path).name
            if card.base_sha256 != self.sha256:
                raise BaseModelError(
                    f"{name}: card is for base sha256 {card.base_sha256[:16]}..., found {self.path.name} "
                    f"with sha256 {self.sha256[:16]}..."
                )
            found = relu_inputs(self.model, self.tensor_shapes())
            if card.relu_inputs != found or card.logits_name != self.logits_name:
                raise BaseModelError(
                    f"{name}: expected Relu inputs {[g.name for g in found]} and logits {self.logits_name!r} "
                    f"as in the graph, found {[g.name for g in card.relu_inputs]} and {card.logits_name!r}"
                )
            self._card = card
        return self._card

    def tensor_shapes(self) -> dict[str, tuple]:
        """Shapes (after the batch dim) of every tensor shape inference can name."""
        if self._shapes is None:
            inferred = onnx.shape_inference.infer_shapes(self.model)
            g = inferred.graph
            self._shapes = {v.name: _dims(v)[1:] for v in [*g.value_info, *g.output, *g.input]}
        return self._shapes

    def check_input(self, x: np.ndarray) -> np.ndarray:
        """Refuse arrays the base cannot take, with the shape and dtype it expects."""
        expected = "(N, " + ", ".join("?" if d is None else str(d) for d in self.input_shape) + ")"
        if not isinstance(x, np.ndarray):
            raise InputError(f"input: expected a numpy array of shape {expected}, found {type(x).__name__}")
        if x.dtype != np.float32:
            raise InputError(f"input: expected dtype float32 with shape {expected}, found {x.dtype}")
        ok = x.ndim == len(self.input_shape) + 1 and all(
            d is None or d == s for d, s in zip(self.input_shape, x.shape[1:])
        )
        if not ok:
            raise InputError(f"input: expected shape {expected}, found {tuple(x.shape)}")
        return np.ascontiguousarray(x)
