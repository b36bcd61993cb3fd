"""The training set seen through one base: gated pre-activations and logits, computed once.

Every unlearning request needs the same two things about the whole training set: the activation
pattern and logits of the points to forget (they are training points), and the gate violation of
every retained point (to choose gate widths). Both come from one forward pass over the training set
that does not depend on the request, so a server that keeps a base loaded pays it once, not per
request: a ``collapse`` request is then a few array lookups and one uint8 x int8 product, computed by
the same onnxruntime kernel and on the same integers as the device's gates.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper

from .models.nets import PreactNet
from .runtime.model import make_session
from .runtime.patchgraph import QUANT_ZERO_POINT, choose_scale_log2, quantize


@torch.no_grad()
def gated_forward(net: PreactNet, x: np.ndarray, start: int, batch: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, M) float32 gated pre-activations (layers start.., concatenated like the patch graph does)
    and the (N, C) logits, in batches."""
    zs, logits = [], []
    for i in range(0, len(x), batch):
        preacts, out = net.forward_all(torch.from_numpy(x[i : i + batch]))
        zs.append(torch.cat([z.flatten(1) for z in preacts[start:]], dim=1))
        logits.append(out)
    return torch.cat(zs), torch.cat(logits)


@dataclass
class GatedView:
    """The training set's gated values for gates starting at one hidden layer."""

    z: np.ndarray  # (N, M) float32 pre-activations, layers start.. concatenated
    logits: np.ndarray  # (N, C) float32
    scale_log2: int  # the gate's quantization step 2^e, chosen from this training set
    q: np.ndarray  # (N, M) int8 codes of the gate's integers (quantize(z))
    l1: np.ndarray  # (N,) int32 |q|_1
    _product: ort.InferenceSession | None = field(default=None, repr=False, compare=False)

    def signs(self, rows: np.ndarray) -> np.ndarray:
        """Activation patterns (int8 +-1, zero counts as inactive) of the given training rows."""
        return np.where(self.z[rows] > 0, 1, -1).astype(np.int8)

    def violation_steps(self, signs: np.ndarray) -> np.ndarray:
        """(N, P) int32 ``|q|_1 - q.s`` (= 2 sum_i relu(-s_i q_i); times delta/2 it is the violation in
        the units of a gate's 1/gamma) of every training point against P sign rows: exactly the integer the device's gate sees, from the same uint8 x int8 onnxruntime
        kernel (about 2.5x faster than a float32 BLAS product here)."""
        qs = self._session().run(None, {"signs": np.ascontiguousarray(signs.T, dtype=np.int8)})[0]
        return self.l1[:, None] - qs

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
    """Lazily computed :class:`GatedView` per gate start layer, for one (base, training set) pair."""

    def __init__(self, net: PreactNet, x_train: np.ndarray):
        self.net = net.eval()
        self.x_train = x_train
        self._views: dict[int, GatedView] = {}

    def view(self, start: int) -> GatedView:
        if start not in self._views:
            z_t, logits_t = gated_forward(self.net, self.x_train, start)
            z = np.ascontiguousarray(z_t.numpy(), dtype=np.float32)
            e = choose_scale_log2(z)
            q = quantize(z, e)
            self._views[start] = GatedView(z=z, logits=logits_t.numpy().astype(np.float32), scale_log2=e,
                                           q=q.astype(np.int8), l1=np.abs(q).sum(1).astype(np.int32))
        return self._views[start]
