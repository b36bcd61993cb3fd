"""Read a user's ONNX classifier as one chain: affine layer, Relu, affine layer, ..., logits, tail.

The body (everything the logits depend on) must be a single chain from the graph input through
affine operators (:data:`.ops.AFFINE_OPS`) and Relu nodes; the Relu inputs are the hidden
pre-activations PRUNE gates on, and the tensor the classifier tail reads is the logits (found as the
device finds it, :func:`prune_edge.runtime.basecard.find_logits`). Whatever follows the logits must
be a classifier tail (:data:`TAIL_OPS`). Anything else is refused with one line naming the node.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from ..runtime.basecard import ML_DOMAIN, find_logits, relu_inputs
from ..runtime.errors import BaseModelError
from .errors import UnsupportedModelError
from .ops import AFFINE_OPS, apply, constant_value, describe

DEFAULT_DOMAINS = ("", "ai.onnx")
TAIL_OPS = frozenset({"Softmax", "LogSoftmax", "ArgMax", "Cast", "Reshape", "Identity", "Flatten", "Squeeze", "Unsqueeze"})
TAIL_ML_OPS = frozenset({"ArrayFeatureExtractor", "ZipMap", "LabelEncoder"})


@dataclass
class Layer:
    """One affine layer: the nodes from its input tensor to its output (a Relu input, or the logits)."""

    nodes: list[onnx.NodeProto]
    input_name: str
    output_name: str
    in_shape: tuple[int, ...] = ()
    out_shape: tuple[int, ...] = ()

    def ops(self) -> list[str]:
        return [n.op_type for n in self.nodes]


@dataclass
class ImportPlan:
    """What the importer found in a model: the chain of layers, the logits and the tail."""

    model: onnx.ModelProto
    input_name: str
    input_shape: tuple[int, ...]  # after the batch axis
    logits_name: str
    layers: list[Layer]
    tail: list[onnx.NodeProto]
    consts: dict[str, np.ndarray] = field(repr=False, default_factory=dict)

    @property
    def relu_names(self) -> list[str]:
        return [layer.output_name for layer in self.layers[:-1]]

    @property
    def n_classes(self) -> int:
        return int(np.prod(self.layers[-1].out_shape))

    @property
    def opset(self) -> int:
        return next(int(o.version) for o in self.model.opset_import if o.domain in DEFAULT_DOMAINS)

    def input_layout(self) -> str:
        """The input layout in words: flat vectors, or the image axes the first layer implies."""
        if len(self.input_shape) == 1:
            return f"flat vectors (N, {self.input_shape[0]})"
        first = self.layers[0].nodes[0] if self.layers[0].nodes else None
        dims = ", ".join(map(str, self.input_shape))
        if first is not None and first.op_type == "Transpose" and len(self.input_shape) == 3:
            from .ops import attrs

            if list(attrs(first).get("perm", [])) == [0, 3, 1, 2]:
                return f"NHWC (N, {dims})"
        return f"NCHW (N, {dims})" if len(self.input_shape) == 3 else f"(N, {dims})"

    def layer_rows(self) -> list[dict[str, Any]]:
        return [
            {"ops": layer.ops(), "input": layer.input_name, "output": layer.output_name,
             "in_shape": list(layer.in_shape), "out_shape": list(layer.out_shape),
             "relu": i < len(self.layers) - 1}
            for i, layer in enumerate(self.layers)
        ]

    def summary(self) -> dict[str, Any]:
        """JSON-able report (``inspect-base``)."""
        return {
            "supported": True,
            "ir_version": int(self.model.ir_version),
            "opsets": {o.domain or "ai.onnx": int(o.version) for o in self.model.opset_import},
            "producer": f"{self.model.producer_name} {self.model.producer_version}".strip(),
            "input": self.input_name,
            "input_layout": self.input_layout(),
            "layers": self.layer_rows(),
            "relu_count": len(self.layers) - 1,
            "relu_inputs": self.relu_names,
            "logits": self.logits_name,
            "n_classes": self.n_classes,
            "tail": [f"{n.op_type}" + (f" ({n.domain})" if n.domain not in DEFAULT_DOMAINS else "") for n in self.tail],
            "outputs": [o.name for o in self.model.graph.output],
        }


def _dims(vi: onnx.ValueInfoProto) -> list:
    return [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]


def _input(model: onnx.ModelProto) -> tuple[str, tuple[int, ...]]:
    init = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in init]
    if len(inputs) != 1:
        raise UnsupportedModelError(f"model: expected one input, found {[i.name for i in inputs]}")
    vi = inputs[0]
    if not vi.type.HasField("tensor_type") or vi.type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
        raise UnsupportedModelError(f"input {vi.name!r}: expected a float32 tensor")
    dims = _dims(vi)
    if len(dims) < 2:
        raise UnsupportedModelError(f"input {vi.name!r}: expected a batch axis and at least one more, found shape {dims}")
    if dims[0] is not None and dims[0] != 0:
        raise UnsupportedModelError(
            f"input {vi.name!r}: batch axis fixed at {dims[0]}; export with a dynamic batch axis "
            "(torch: dynamic_axes / dynamic_shapes; skl2onnx: the default)"
        )
    if any(d is None for d in dims[1:]):
        raise UnsupportedModelError(f"input {vi.name!r}: expected static dimensions after the batch axis, found {dims}")
    return vi.name, tuple(int(d) for d in dims[1:])


def analyse(model: onnx.ModelProto) -> ImportPlan:
    """Split ``model`` into layers and tail, or refuse naming the first node it cannot take."""
    graph = model.graph
    if not any(o.domain in DEFAULT_DOMAINS for o in model.opset_import):
        raise UnsupportedModelError("model: expected a default-domain opset import, found none")
    for node in graph.node:
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            raise UnsupportedModelError(f"{describe(node)}: control flow (subgraphs) is not supported")
    external = [i.name for i in graph.initializer if i.data_location == onnx.TensorProto.EXTERNAL]
    if external:
        raise UnsupportedModelError(
            f"initializer {external[0]!r}: stored in an external data file; save the model as one file "
            "(onnx.save(model, path, save_as_external_data=False)) so its sha256 covers the weights"
        )
    input_name, input_shape = _input(model)
    consts: dict[str, np.ndarray] = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in DEFAULT_DOMAINS:
            consts[node.output[0]] = constant_value(node)
    try:
        logits = find_logits(model)
    except BaseModelError as exc:
        raise UnsupportedModelError(str(exc).replace("base: ", "model: ")) from None
    producer = {o: n for n in graph.node for o in n.output if o}
    # the body: every node the logits depend on (constants aside)
    needed, stack, body_ids = set(), [logits], set()
    while stack:
        t = stack.pop()
        if t in needed or t in consts or t == input_name:
            continue
        needed.add(t)
        node = producer.get(t)
        if node is None:
            raise UnsupportedModelError(f"model: tensor {t!r} before the logits has no producer")
        body_ids.add(id(node))
        stack.extend(i for i in node.input if i)
    body = [n for n in graph.node if id(n) in body_ids]
    layers: list[Layer] = []
    cur, start, nodes = input_name, input_name, []
    for node in body:
        data = [i for i in node.input if i and i not in consts]
        if data != [cur]:
            raise UnsupportedModelError(
                f"{describe(node)}: reads {data}, expected only the chain's tensor {cur!r} "
                "(branches and skip connections are not supported)"
            )
        if node.domain not in DEFAULT_DOMAINS:
            raise UnsupportedModelError(f"{describe(node)}: domain {node.domain!r} before the logits is not supported")
        if node.op_type == "Relu":
            layers.append(Layer(nodes, start, cur))
            cur = start = node.output[0]
            nodes = []
        elif node.op_type in AFFINE_OPS:
            nodes.append(node)
            cur = node.output[0]
        else:
            raise UnsupportedModelError(
                f"{describe(node)}: not supported before the logits (a ReLU network may use "
                f"{', '.join(sorted(AFFINE_OPS | {'Relu'}))})"
            )
    if cur != logits:
        raise UnsupportedModelError(f"model: the chain ends at {cur!r}, not at the logits {logits!r}")
    if not nodes:
        raise UnsupportedModelError(f"model: the logits {logits!r} are a Relu output; expected an affine layer after the last Relu")
    layers.append(Layer(nodes, start, cur))
    if len(layers) < 2:
        raise UnsupportedModelError("model: no Relu before the logits; PRUNE needs hidden ReLU layers to gate on")
    # every data tensor of the chain is read once in the body, and the tail reads only the logits
    chain = {input_name} | {n.output[0] for n in body}
    consumers: dict[str, int] = {}
    for n in body:
        for i in n.input:
            consumers[i] = consumers.get(i, 0) + 1
    tail = [n for n in graph.node if id(n) not in body_ids and not (n.op_type == "Constant" and n.domain in DEFAULT_DOMAINS)]
    for node in tail:
        allowed = node.op_type in (TAIL_ML_OPS if node.domain == ML_DOMAIN else TAIL_OPS if node.domain in DEFAULT_DOMAINS else ())
        if not allowed:
            raise UnsupportedModelError(
                f"{describe(node)}: not supported after the logits (a classifier tail may use "
                f"{', '.join(sorted(TAIL_OPS))} and ai.onnx.ml {', '.join(sorted(TAIL_ML_OPS))})"
            )
        early = [i for i in node.input if i in chain and i != logits]
        if early:
            raise UnsupportedModelError(f"{describe(node)}: reads {early[0]!r} before the logits; only the logits may leave the chain")
    for o in graph.output:
        if o.name in chain and o.name != logits:
            raise UnsupportedModelError(f"output {o.name!r}: a tensor before the logits; only the logits may leave the chain")
    plan = ImportPlan(model, input_name, input_shape, logits, layers, tail, consts)
    _shapes(plan)
    return plan


def run_layer(plan: ImportPlan, layer: Layer, x: np.ndarray) -> np.ndarray:
    """The layer's nodes on a float64 batch ``x`` (its input tensor)."""
    for node in layer.nodes:
        ins = list(node.input)
        data_at = next(k for k, i in enumerate(ins) if i and i not in plan.consts)
        consts = [None if (k == data_at or not i) else plan.consts[i] for k, i in enumerate(ins)]
        x = apply(node, x, consts, data_at)
    return x


def _shapes(plan: ImportPlan) -> None:
    """Fill each layer's shapes by running a batch of two through the chain, and check that the Relu
    inputs are the ones a device re-derives from the graph (same names, same order)."""
    x = np.zeros((2, *plan.input_shape))
    for layer in plan.layers:
        layer.in_shape = tuple(x.shape[1:])
        x = run_layer(plan, layer, x)
        if x.shape[0] != 2:
            raise UnsupportedModelError(f"layer ending at {layer.output_name!r}: moves the batch axis")
        layer.out_shape = tuple(x.shape[1:])
    if len(plan.layers[-1].out_shape) != 1 or plan.n_classes < 2:
        raise UnsupportedModelError(f"logits {plan.logits_name!r}: expected shape (N, C) with C >= 2, found (N, {', '.join(map(str, plan.layers[-1].out_shape))})")
    shapes = {layer.output_name: layer.out_shape for layer in plan.layers}
    found = [g.name for g in relu_inputs(plan.model, shapes)]
    if found != plan.relu_names:
        raise UnsupportedModelError(f"model: Relu inputs {found} in graph order, expected the chain's {plan.relu_names}")
