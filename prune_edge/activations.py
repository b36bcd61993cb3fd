"""The training set seen through one base: gated pre-activations and logits, computed once.

Every unlearning request needs the same two things about the whole training set: the activation
pattern and logits of the points to forget (they are training points), and the gate violation of
every retained point (to choose gate widths). Both come from one forward pass over the training set
that does not depend on the request, so a server that keeps a base loaded pays it once, not per
request: a ``collapse`` request is then a few array lookups and one uint8 x int8 product, computed by
the same onnxruntime kernel and on the same integers as the device's gates.

A server that answers many requests against one base can go one step further and index, once, each
training point's nearest neighbours in gate-violation terms (:meth:`GatedView.build_index`): a gate
width is then a lookup in its representative's row instead of a product over the whole training set.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from .runtime.base import BaseGraph
from .runtime.model import make_session
from .runtime.patchgraph import QUANT_ZERO_POINT, choose_scale_log2, quantize, sign_pattern

NO_POINT = np.iinfo(np.int32).max  # "no training point to keep out": the minimum over an empty set
__all__ = ["NO_POINT", "GatedView", "TrainActivations", "sign_pattern", "tapped_forward", "choose_base_step"]


def tapped_forward(base: BaseGraph, x: np.ndarray, names: Sequence[str], batch: int = 2048) -> tuple[list[np.ndarray], np.ndarray]:
    """The base's own float32 values of tensors ``names`` (flattened to (N, -1)) and its logits,
    computed by onnxruntime on the very graph a device runs: the patterns the server records are
    then bit for bit the ones the device's gates read."""
    model = copy.deepcopy(base.model)
    shapes = base.tensor_shapes()
    del model.graph.output[:]  # the logits first (a converter's first output may be a label)
    model.graph.output.append(helper.make_tensor_value_info(base.logits_name, TensorProto.FLOAT, ["N", *shapes[base.logits_name]]))
    for name in names:
        model.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", *shapes[name]]))
    session = make_session(model.SerializeToString(), spin=False)
    zs: list[list[np.ndarray]] = [[] for _ in names]
    logits = []
    for i in range(0, len(x), batch):
        out = session.run(None, {base.input_name: np.ascontiguousarray(x[i : i + batch], dtype=np.float32)})
        logits.append(out[0])
        for j, z in enumerate(out[1:]):
            zs[j].append(z.reshape(len(z), -1))
    return [np.concatenate(z) if z else np.zeros((0, 0), np.float32) for z in zs], np.concatenate(logits)


def choose_base_step(base: BaseGraph, x_train: np.ndarray, names: Sequence[str]) -> int:
    """The gates' quantization step for a base, from its training set's Relu inputs (all layers)."""
    zs, _ = tapped_forward(base, x_train, names)
    return choose_scale_log2(np.concatenate(zs, axis=1))


@dataclass
class GatedView:
    """The training set's gated values for gates starting at one hidden layer."""

    z: np.ndarray  # (N, M) float32 pre-activations, layers start.. concatenated
    logits: np.ndarray  # (N, C) float32
    scale_log2: int  # the gate's quantization step 2^e (the base card's)
    q: np.ndarray  # (N, M) int8: the odd values v the gate reads (quantize(z))
    l1: np.ndarray  # (N,) int32 |v|_1
    _product: ort.InferenceSession | None = field(default=None, repr=False, compare=False)
    nearest_ids: np.ndarray | None = field(default=None, repr=False)  # (N, K) int32, see build_index
    nearest_steps: np.ndarray | None = field(default=None, repr=False)  # (N, K) int32, ascending per row

    def signs(self, rows: np.ndarray) -> np.ndarray:
        """Activation patterns (int8 +-1, ``z >= 0`` active, as the gate reads them) of training rows."""
        return sign_pattern(self.z[rows])

    def violation_steps(self, signs: np.ndarray) -> np.ndarray:
        """(N, P) int32 ``|v|_1 - v.s`` of every training point against P sign rows.

        It equals 2 sum_i relu(-s_i v_i), 0 exactly on the pattern's region; times delta/4 it is the
        violation in the units of a gate's 1/gamma. Exactly the integer the device's gate sees, from
        the same uint8 x int8 onnxruntime kernel (about 2.5x faster than a float32 BLAS product here)."""
        qs = self._session().run(None, {"signs": np.ascontiguousarray(signs.T, dtype=np.int8)})[0]
        return self.l1[:, None] - qs

    def build_index(self, k: int = 64, chunk: int = 512, progress: bool = False) -> None:
        """For every training point f, keep the ``k`` training points n with the smallest
        ``violation_steps`` against f's own pattern (f itself and its pattern twins first, at 0).

        A record's pattern is almost always a forget point's own pattern, and its gate width is the
        minimum over the training points outside the record: the first entry of that row not in the
        record. That makes a request's gate widths O(records x k) lookups instead of an (N x M) x (M x P)
        product; the one-off cost is the N x N product (chunked, so memory stays O(N x chunk))."""
        from tqdm.auto import tqdm

        n = len(self.q)
        k = min(k, n)
        chunk = max(1, min(chunk, (1 << 23) // n))  # a block holds at most 8M int32 (N = 60k: 139 rows)
        ids = np.empty((n, k), dtype=np.int32)
        steps = np.empty((n, k), dtype=np.int32)
        for lo in tqdm(range(0, n, chunk), desc="violation index", unit="chunk", disable=not progress, leave=False):
            rows = np.arange(lo, min(n, lo + chunk))
            block = np.ascontiguousarray(self.violation_steps(self.signs(rows)).T)  # (rows, N)
            part = np.argpartition(block, k - 1, axis=1)[:, :k]
            vals = np.take_along_axis(block, part, axis=1)
            order = np.argsort(vals, axis=1, kind="stable")
            ids[rows] = np.take_along_axis(part, order, axis=1)
            steps[rows] = np.take_along_axis(vals, order, axis=1)
        self.nearest_ids, self.nearest_steps = ids, steps

    def min_violation_steps(self, signs: np.ndarray, rows: np.ndarray, exclude: Sequence[np.ndarray]) -> np.ndarray:
        """(P,) the smallest ``violation_steps`` of any training point outside ``exclude[p]`` against
        sign row p (``NO_POINT`` where nothing is left), exact whichever way it is computed.

        ``rows[p]`` is a training point whose own pattern sign row p is expected to be. Where it is and
        the index holds a point outside ``exclude[p]``, the answer is that point's entry: the index row
        is the head of the full ascending order, so its first outsider is the minimum. Every other row
        (no index, a pattern that differs, or an index row made of excluded points only) gets the product.
        """
        n = len(self.q)
        out = np.full(len(signs), NO_POINT, dtype=np.int64)
        rows = np.asarray(rows, dtype=np.int64)
        found = np.zeros(len(signs), dtype=bool)
        if self.nearest_ids is not None and len(signs):
            own = np.all(self.signs(rows) == signs, axis=1)  # sign row p is row p's own pattern
            cand = self.nearest_ids[rows].astype(np.int64)  # (P, K)
            # One membership test for all records: key p * N + id, looked up in the sorted keys
            # (np.isin's generic path costs more than the rest of a 20-point request's gates).
            keys = np.sort(np.concatenate([p * n + np.asarray(e, dtype=np.int64) for p, e in enumerate(exclude)]))
            query = np.arange(len(signs))[:, None] * n + cand
            if len(keys):
                outside = keys[np.minimum(np.searchsorted(keys, query), len(keys) - 1)] != query
            else:
                outside = np.ones(query.shape, dtype=bool)
            found = own & outside.any(axis=1)
            first = outside.argmax(axis=1)
            out[found] = self.nearest_steps[rows[found], first[found]]
        todo = np.flatnonzero(~found)
        if len(todo):
            steps = self.violation_steps(signs[todo]).astype(np.int64)
            for j, p in enumerate(todo):
                steps[exclude[p], j] = NO_POINT
            out[todo] = steps.min(axis=0) if len(steps) else NO_POINT
        return out

    @property
    def step(self) -> float:
        """delta, the gate's quantization step."""
        return float(2.0**self.scale_log2)

    def _session(self) -> ort.InferenceSession:
        if self._product is None:
            n, m = self.q.shape
            codes = (self.q.astype(np.int16) + QUANT_ZERO_POINT).astype(np.uint8)
            graph = helper.make_graph(
                [helper.make_node("MatMulInteger", ["codes", "signs", "zp"], ["qs"])], "train_violations",
                [helper.make_tensor_value_info("signs", TensorProto.INT8, [m, "P"])],
                [helper.make_tensor_value_info("qs", TensorProto.INT32, [n, "P"])],
                [numpy_helper.from_array(codes, "codes"), numpy_helper.from_array(np.array(QUANT_ZERO_POINT, np.uint8), "zp")],
            )
            model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
            self._product = make_session(model.SerializeToString(), spin=False)
        return self._product


class TrainActivations:
    """Lazily computed :class:`GatedView` per gate start layer, for one (base, training set) pair,
    computed by onnxruntime on the base graph (the device's own numbers) with the card's step."""

    def __init__(self, graph: BaseGraph, x_train: np.ndarray, scale_log2: int, relu_inputs: Sequence[str]):
        self.graph = graph
        self.x_train = x_train
        self.scale_log2 = int(scale_log2)
        self.relu_inputs = list(relu_inputs)
        self._all: tuple[list[np.ndarray], np.ndarray] | None = None
        self._views: dict[int, GatedView] = {}

    def view(self, start: int) -> GatedView:
        if start not in self._views:
            if self._all is None:
                self._all = tapped_forward(self.graph, self.x_train, self.relu_inputs)
            zs, logits = self._all
            z = np.ascontiguousarray(np.concatenate(zs[start:], axis=1), dtype=np.float32)
            v = quantize(z, self.scale_log2)
            self._views[start] = GatedView(z=z, logits=logits.astype(np.float32), scale_log2=self.scale_log2,
                                           q=v.astype(np.int8), l1=np.abs(v).sum(1).astype(np.int32))
        return self._views[start]
