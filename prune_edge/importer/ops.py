"""A float64 numpy evaluator of the ONNX operators an imported classifier's body may use.

Why our own evaluator and not a converter: onnx2torch needs torchvision, and installing it replaced
this project's torch 2.13 CPU wheel with a CUDA build (a torchvision that matches the CPU wheel does
not install beside it). The body of a feed-forward ReLU classifier needs a dozen operators, all
affine except Relu; evaluating them in float64 gives the exact affine map of each layer (see
:mod:`.convert`), which is all synthesis needs. Every operator refuses attributes that would break
the batch axis or that it does not implement, naming the node.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from .errors import UnsupportedModelError

# Ops that are affine in their one computed input (the others are constants); Relu ends a layer.
AFFINE_OPS = frozenset({
    "Gemm", "MatMul", "Add", "Sub", "Mul", "Div", "Conv", "BatchNormalization", "Flatten", "Reshape",
    "Transpose", "Cast", "Identity", "AveragePool", "GlobalAveragePool",
})
FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16}


def describe(node: onnx.NodeProto) -> str:
    """How errors name a node: op type and node name (or its first output when unnamed)."""
    return f"{node.op_type} node {node.name or node.output[0]!r}"


def attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _refuse(node: onnx.NodeProto, why: str) -> UnsupportedModelError:
    return UnsupportedModelError(f"{describe(node)}: {why}")


def _pads_2d(node: onnx.NodeProto, a: dict, k: int) -> list[int]:
    """Explicit pads (begin..., end...); auto_pad other than NOTSET is refused."""
    if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise _refuse(node, f"auto_pad {a['auto_pad']!r} is not supported (export with explicit pads)")
    return list(a.get("pads", [0] * (2 * k)))


def _conv2d(x: np.ndarray, w: np.ndarray, b: np.ndarray | None, strides, pads, dilations) -> np.ndarray:
    """Cross-correlation of (N, C, H, W) with (O, C, kh, kw), via an im2col view (float64)."""
    n, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    top, left, bottom, right = pads[0], pads[1], pads[2], pads[3]
    xp = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    sh, sw = strides
    dh, dw = dilations
    oh = (xp.shape[2] - dh * (kh - 1) - 1) // sh + 1
    ow = (xp.shape[3] - dw * (kw - 1) - 1) // sw + 1
    cols = np.empty((n, c, kh, kw, oh, ow), dtype=np.float64)
    for i in range(kh):
        for j in range(kw):
            cols[:, :, i, j] = xp[:, :, i * dh : i * dh + sh * (oh - 1) + 1 : sh, j * dw : j * dw + sw * (ow - 1) + 1 : sw]
    out = np.einsum("nckluv,ockl->nouv", cols, w, optimize=True)
    if b is not None:
        out = out + b.reshape(1, -1, 1, 1)
    return out


def _avgpool2d(node: onnx.NodeProto, x: np.ndarray, a: dict) -> np.ndarray:
    if x.ndim != 4:
        raise _refuse(node, f"expected a 4-d input, found {x.ndim}-d")
    if a.get("ceil_mode", 0):
        raise _refuse(node, "ceil_mode=1 is not supported")
    kh, kw = a["kernel_shape"]
    sh, sw = a.get("strides", [1, 1])
    pads = _pads_2d(node, a, 2)
    c = x.shape[1]
    w = np.zeros((c, c, kh, kw))
    w[np.arange(c), np.arange(c)] = 1.0
    total = _conv2d(x, w, None, (sh, sw), pads, (1, 1))
    if a.get("count_include_pad", 0) or not any(pads):
        return total / (kh * kw)
    count = _conv2d(np.ones((1, 1, *x.shape[2:])), np.ones((1, 1, kh, kw)), None, (sh, sw), pads, (1, 1))
    return total / count


def _reshape(node: onnx.NodeProto, x: np.ndarray, shape: np.ndarray, a: dict) -> np.ndarray:
    shape = [int(s) for s in shape]
    if not a.get("allowzero", 0):
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    out = x.reshape(shape)
    if out.shape[0] != x.shape[0]:
        raise _refuse(node, f"reshapes the batch axis (shape {shape}); export with a dynamic batch axis")
    return out


def apply(node: onnx.NodeProto, x: np.ndarray, consts: list[np.ndarray | None], data_at: int) -> np.ndarray:
    """``node`` on the computed tensor ``x`` (float64, batch first); ``consts`` holds the node's other
    inputs (None at ``data_at``, the computed one's position, and for omitted optional inputs)."""
    op, a = node.op_type, attrs(node)
    c = [None if v is None else np.asarray(v, dtype=np.float64) if v.dtype.kind == "f" else v for v in consts]
    if op in ("Identity",):
        return x
    if op == "Cast":
        if a.get("to") not in FLOAT_TYPES:
            raise _refuse(node, f"casts to {onnx.TensorProto.DataType.Name(a.get('to', 0))} before the logits")
        return x
    if op in ("Add", "Sub", "Mul", "Div"):
        other = c[1 - data_at]
        if op == "Div" and data_at == 1:
            raise _refuse(node, "divides by the computed tensor (not affine)")
        if other.ndim >= x.ndim and other.shape[0] != 1:
            raise _refuse(node, f"its constant {list(other.shape)} spans the batch axis")
        if op == "Add":
            return x + other
        if op == "Sub":
            return x - other if data_at == 0 else other - x
        return x * other if op == "Mul" else x / other
    if op == "MatMul":
        if data_at != 0 or x.ndim < 2:
            raise _refuse(node, "expected the computed tensor as the left operand")
        return x @ c[1]
    if op == "Gemm":
        if data_at != 0:
            raise _refuse(node, "expected the computed tensor as input A")
        if a.get("transA", 0):
            raise _refuse(node, "transA=1 would transpose the batch axis")
        B = c[1].T if a.get("transB", 0) else c[1]
        out = a.get("alpha", 1.0) * (x @ B)
        if len(c) > 2 and c[2] is not None:
            out = out + a.get("beta", 1.0) * c[2]
        return out
    if op == "Conv":
        if data_at != 0 or x.ndim != 4:
            raise _refuse(node, f"expected a 2-d convolution of the computed tensor, found a {x.ndim}-d input")
        w = c[1]
        if a.get("group", 1) != 1:
            raise _refuse(node, f"group={a['group']} is not supported")
        if w.ndim != 4:
            raise _refuse(node, f"expected a 2-d convolution, found a {w.ndim - 2}-d kernel")
        pads = _pads_2d(node, a, 2)
        return _conv2d(x, w, c[2] if len(c) > 2 else None, a.get("strides", [1, 1]), pads, a.get("dilations", [1, 1]))
    if op == "BatchNormalization":
        if a.get("training_mode", 0) or len(node.output) > 1 and any(node.output[1:]):
            raise _refuse(node, "training-mode batch normalisation is not supported")
        scale, bias, mean, var = c[1], c[2], c[3], c[4]
        shape = (1, -1) + (1,) * (x.ndim - 2)
        eps = a.get("epsilon", 1e-5)
        return (x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + eps) * scale.reshape(shape) + bias.reshape(shape)
    if op == "Flatten":
        if a.get("axis", 1) != 1:
            raise _refuse(node, f"axis={a['axis']} would mix the batch axis")
        return x.reshape(len(x), -1)
    if op == "Reshape":
        return _reshape(node, x, c[1], a)
    if op == "Transpose":
        perm = list(a.get("perm", range(x.ndim)[::-1]))
        if perm[0] != 0:
            raise _refuse(node, f"perm {perm} moves the batch axis")
        return x.transpose(perm)
    if op == "AveragePool":
        return _avgpool2d(node, x, a)
    if op == "GlobalAveragePool":
        return x.mean(axis=tuple(range(2, x.ndim)), keepdims=True)
    raise _refuse(node, "not supported before the logits")


def constant_value(node: onnx.NodeProto) -> np.ndarray:
    """The value of a Constant node (tensor, or one of the value_* scalar/list attributes)."""
    a = node.attribute[0] if len(node.attribute) == 1 else None
    if a is None:
        raise _refuse(node, "expected one value attribute")
    if a.name == "value":
        return numpy_helper.to_array(a.t)
    v = onnx.helper.get_attribute_value(a)
    if a.name in ("value_float", "value_floats"):
        return np.asarray(v, dtype=np.float32)
    if a.name in ("value_int", "value_ints"):
        return np.asarray(v, dtype=np.int64)
    raise _refuse(node, f"constant attribute {a.name!r} is not supported")

