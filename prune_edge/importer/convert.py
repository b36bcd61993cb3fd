"""An :class:`ImportPlan` as the :class:`~prune_edge.models.nets.PreactNet` synthesis works on.

Synthesis reads a base as ``L_0 -> ReLU -> L_1 -> ... -> L_n = logits`` with each ``L_i`` an
``nn.Linear`` (on the flattened input, C order) or an ``nn.Conv2d``. An imported layer becomes:
- an ``nn.Conv2d`` when it is one 2-d convolution (a BatchNormalization after it folded in) with
  square kernel, equal strides and pads, and every layer before it is a convolution too (so the
  tensors keep their (C, H, W) shape);
- otherwise an ``nn.Linear`` holding the layer's exact affine map, read off by evaluating the layer
  (float64) on the origin and the unit vectors: any chain of affine operators (Transpose, Reshape,
  average pooling, BatchNormalization, Gemm, ...) is exactly one such map.
The net is float64 throughout: its maps are the graph's float32 weights composed without rounding.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..models.nets import PreactNet
from .graph import ImportPlan, Layer, run_layer
from .ops import attrs

ARCH = "imported"
_BASIS_CHUNK = 2048  # unit vectors evaluated per pass (bounds memory for wide layers)


def _conv_of(plan: ImportPlan, layer: Layer) -> nn.Conv2d | None:
    nodes = [n for n in layer.nodes if n.op_type not in ("Identity", "Cast")]
    if not nodes or nodes[0].op_type != "Conv" or len(nodes) > 2 or (len(nodes) == 2 and nodes[1].op_type != "BatchNormalization"):
        return None
    conv = nodes[0]
    a = attrs(conv)
    w = plan.consts[conv.input[1]].astype(np.float64)
    b = plan.consts[conv.input[2]].astype(np.float64) if len(conv.input) > 2 and conv.input[2] else np.zeros(len(w))
    strides, pads, dil = list(a.get("strides", [1, 1])), list(a.get("pads", [0, 0, 0, 0])), list(a.get("dilations", [1, 1]))
    square = w.ndim == 4 and w.shape[2] == w.shape[3] and len(set(strides)) == 1 and len(set(pads)) == 1 and set(dil) == {1}
    if not square or a.get("group", 1) != 1:
        return None
    if len(nodes) == 2:
        bn = nodes[1]
        scale, shift, mean, var = (plan.consts[i].astype(np.float64) for i in bn.input[1:5])
        s = scale / np.sqrt(var + attrs(bn).get("epsilon", 1e-5))
        w, b = w * s[:, None, None, None], (b - mean) * s + shift
    m = nn.Conv2d(w.shape[1], w.shape[0], w.shape[2], stride=strides[0], padding=pads[0], dtype=torch.float64)
    with torch.no_grad():
        m.weight.copy_(torch.from_numpy(w))
        m.bias.copy_(torch.from_numpy(b))
    return m


def _dense_of(plan: ImportPlan, layer: Layer) -> nn.Linear:
    d = int(np.prod(layer.in_shape))
    bias = run_layer(plan, layer, np.zeros((1, *layer.in_shape))).reshape(-1)
    cols = []
    for lo in range(0, d, _BASIS_CHUNK):
        hi = min(d, lo + _BASIS_CHUNK)
        basis = np.zeros((hi - lo, d))
        basis[np.arange(hi - lo), np.arange(lo, hi)] = 1.0
        cols.append(run_layer(plan, layer, basis.reshape(hi - lo, *layer.in_shape)).reshape(hi - lo, -1) - bias)
    weight = np.concatenate(cols).T  # (out, in)
    m = nn.Linear(d, weight.shape[0], dtype=torch.float64)
    with torch.no_grad():
        m.weight.copy_(torch.from_numpy(np.ascontiguousarray(weight)))
        m.bias.copy_(torch.from_numpy(bias))
    return m


def to_preactnet(plan: ImportPlan) -> PreactNet:
    """The plan's layers as a float64 PreactNet (eval mode), convolutions kept where they can be."""
    modules: list[nn.Module] = []
    conv_ok = len(plan.input_shape) == 3
    kinds = []
    for layer in plan.layers:
        m = _conv_of(plan, layer) if conv_ok else None
        if m is None:
            conv_ok = False
            m = _dense_of(plan, layer)
        modules.append(m)
        kinds.append("conv2d" if isinstance(m, nn.Conv2d) else "linear")
    net = PreactNet(modules, ARCH, {"layers": kinds})
    return net.eval()


@torch.no_grad()
def net_logits(net: PreactNet, x: np.ndarray, batch: int = 1024) -> np.ndarray:
    """The net's float64 logits on ``x`` (in the model's own input layout)."""
    out = [net(torch.from_numpy(np.asarray(x[i : i + batch], dtype=np.float64))).numpy() for i in range(0, len(x), batch)]
    return np.concatenate(out) if out else np.zeros((0, net.layers[-1].out_features))
