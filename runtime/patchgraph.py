"""The one canonical patch graph, and the certificate algebra behind its parameters.

A patch file holding P records computes, from base tensors only::

    z      = concat(flatten(z_l) for each gated tensor)             (N, M)
    excess = relu((1 - rho) |z|_1 - z @ S^T)                        (N, P)   S: signs in {-1, +1}
    gate   = relu(1 - gamma/2 * excess)                             (N, P)   (computed as one clip)
    out    = f + sum_k gate_k (T_k f + t_k)                         (N, C)

The correction has three forms, named in the manifest, so the common cases cost one small product:
``shift`` (every T_k = 0: PRUNE with alpha = 1)        out = f + gate @ t   (one Gemm)
``collapse`` (every T_k = -I: alpha = 0)               out = f + gate @ t - rowsum(gate) * f
``affine`` (anything else)                             out = f + [gate (x) f, gate] @ [T_1^T..T_P^T; t]

``(|z|_1 - z.s)/2`` is the summed sign violation sum_i relu(-s_i z_i), so all P gates cost one MatMul
and all corrections one more (method note, section 2). On a record's own region the two float32 sums
are equal in exact arithmetic but not after rounding; ``rho`` (:func:`dead_zone`, fixed by M, not a
parameter) is a bound on that relative rounding error, so the excess is exactly 0 and the gate exactly
1 on the region, whatever gamma is. The server builds this graph with
:func:`build_patch_graph`; the device rebuilds it from the received parameters and the manifest and
demands equality, so a patch file can only ever be this structure. The graph is already minimal:
onnxsim could only fold its constant prologue (the int8 signs' Cast and the gamma scalings), which is
kept on purpose so the file stays small; onnxruntime folds it once when the session loads. Where every gate is 0 the correction
is an exact 0, so the output equals the base logits bit for bit.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .errors import StructureError
from .manifest import GatedTensor

PRODUCER = "prune-edge"
FORMS = ("shift", "collapse", "affine")
OUTPUT_SUFFIX = "logits"
BATCH_DIM = "N"


# ----------------------------------------------------------------------------- certificate algebra
def spec_rows(target: int, n_classes: int) -> np.ndarray:
    """P: one row ``e_j - e_target`` per class j != target (the target must win)."""
    others = [j for j in range(n_classes) if j != target]
    rows = np.zeros((n_classes - 1, n_classes))
    rows[np.arange(n_classes - 1), others] = 1.0
    rows[:, target] = -1.0
    return rows


def completed_spec(target: int, n_classes: int) -> np.ndarray:
    """Pbar: P plus the row (1,...,1)/C, orthogonal to every row of P, hence invertible."""
    return np.vstack([spec_rows(target, n_classes), np.full((1, n_classes), 1.0 / n_classes)])


@functools.lru_cache(maxsize=1024)
def _completed_spec_and_inverse(target: int, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(Pbar, Pbar^-1), read-only; cached because a patch has many records but few distinct targets."""
    pbar = completed_spec(target, n_classes)
    inv = np.linalg.inv(pbar)
    pbar.flags.writeable = inv.flags.writeable = False
    return pbar, inv


def affine_from_scales(
    target: int, alpha: np.ndarray, beta: np.ndarray, mean_scale: float, mean_shift: float, n_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """PRUNE's closed form: ``T = Pbar^-1 diag(a) Pbar - I = Pbar^-1 (diag(a) - I) Pbar``,
    ``t = Pbar^-1 b`` (float64). Written the second way, a = 1 gives T = 0 exactly and a = 0 gives
    T = -I exactly, so the cheap graph forms apply without round-off."""
    pbar, inv = _completed_spec_and_inverse(target, n_classes)
    a = np.append(np.asarray(alpha, float), mean_scale)
    b = np.append(np.asarray(beta, float), mean_shift)
    if not a.any():
        T = -np.eye(n_classes)
    else:
        T = inv @ np.diag(a - 1.0) @ pbar
    return T, inv @ b


# ----------------------------------------------------------------------------- parameters
@dataclass
class PatchParams:
    """The numbers a patch graph carries, one row per record."""

    signs: np.ndarray  # int8 (P, M), entries in {-1, +1}
    gamma: np.ndarray  # float32 (P,)
    T: np.ndarray  # float32 (P, C, C)
    t: np.ndarray  # float32 (P, C)

    def __post_init__(self) -> None:
        self.signs = np.ascontiguousarray(self.signs, dtype=np.int8)
        self.gamma = np.ascontiguousarray(self.gamma, dtype=np.float32)
        self.T = np.ascontiguousarray(self.T, dtype=np.float32)
        self.t = np.ascontiguousarray(self.t, dtype=np.float32)

    @property
    def n_records(self) -> int:
        return int(self.signs.shape[0])

    @property
    def n_classes(self) -> int:
        return int(self.t.shape[1])


def dead_zone(gated_size: int) -> float:
    """rho for M gated values: (3M + 1) float32 unit roundoffs. |z|_1 and z.s each carry a relative
    summation error below M u, so on the region (1 - rho)|z|_1 - z.s is never positive."""
    return float((3 * gated_size + 1) * 2.0**-24)


def form_of(params: PatchParams) -> str:
    """The cheapest graph form that represents these parameters exactly."""
    if not params.T.any():
        return "shift"
    eye = np.broadcast_to(-np.eye(params.n_classes, dtype=np.float32), params.T.shape)
    return "collapse" if np.array_equal(params.T, eye) else "affine"


def _names(prefix: str) -> dict[str, str]:
    keys = ["signs", "half_gamma", "affine", "one", "zero", "neg_keep", "axis1", "axis2", "flat_shape",
            "z", "abs", "l1", "l1_coef", "signs_f", "signs_h", "bias", "acc", "gate", "gate3", "f3", "gf3", "gf",
            "feat", "mass", "keep_f", "kept_logits", OUTPUT_SUFFIX]
    return {k: prefix + k for k in keys}


def output_name(prefix: str) -> str:
    """Name of the patched-logits output of a patch graph with this prefix."""
    return prefix + OUTPUT_SUFFIX


def gate_name(prefix: str) -> str:
    """Name of the (N, P) gate tensor, tapped by ``verify-sample`` to say which record covers a sample."""
    return prefix + "gate"


def _affine_matrix(params: PatchParams, form: str) -> np.ndarray:
    if form in ("shift", "collapse"):
        return params.t
    p, c = params.n_records, params.n_classes
    # rows k*C + j hold T_k[:, j] (so (gate (x) f) @ W = sum_k g_k T_k f); then the t_k rows.
    return np.concatenate([params.T.transpose(0, 2, 1).reshape(p * c, c), params.t], axis=0)


def _affine_shape(form: str, p: int, c: int) -> tuple[int, int]:
    return (p, c) if form in ("shift", "collapse") else (p * (c + 1), c)


MIN_OPSET = 13  # axes/split as inputs, Clip bounds as inputs


def _initializers(prefix: str, params: PatchParams, form: str) -> list[TensorProto]:
    n = _names(prefix)
    arrays = {
        "signs": np.ascontiguousarray(params.signs.T),  # (M, P) int8; cast and scaled once, folded at load
        "half_gamma": (params.gamma * np.float32(0.5)).astype(np.float32).reshape(1, -1),
        "affine": _affine_matrix(params, form).astype(np.float32),
        "one": np.array([1.0], np.float32),
        "zero": np.array([0.0], np.float32),
        "neg_keep": np.array([-(1.0 - dead_zone(params.signs.shape[1]))], np.float32),
        "axis1": np.array([1], np.int64),
    }
    if form == "affine":
        arrays["axis2"] = np.array([2], np.int64)
        arrays["flat_shape"] = np.array([0, params.n_records * params.n_classes], np.int64)
    return [numpy_helper.from_array(v, n[k]) for k, v in arrays.items()]


def _reduce(op: str, x: str, out: str, axes: str, opset: int) -> onnx.NodeProto:
    """Reduce over axis 1, keeping dims; axes moved from attribute to input in opset 13 (ReduceSum)
    and 18 (ReduceL1)."""
    if op == "ReduceSum" or opset >= 18:
        return helper.make_node(op, [x, axes], [out], keepdims=1, name=out)
    return helper.make_node(op, [x], [out], axes=[1], keepdims=1, name=out)


def build_patch_graph(
    prefix: str,
    gated: tuple[GatedTensor, ...] | list[GatedTensor],
    logits_name: str,
    params: PatchParams,
    opset: int,
    ir_version: int,
    form: str,
) -> onnx.ModelProto:
    """The canonical patch graph for these parameters (deterministic: same inputs, same bytes).

    The gate is computed as ``clip(1 - gamma/2 ((1 - rho)|z|_1 - z.s), 0, 1)``, which equals
    ``relu(1 - gamma/2 * excess)`` with excess >= 0: gamma/2 is folded into the signs at load time, the
    |z|_1 term enters through Gemm's C input, and one Clip is the only elementwise pass over (N, P).
    Few, large nodes matter: on CPU each extra node costs about as much as a 10^6-MAC product.
    """
    if form not in FORMS:
        raise ValueError(f"form: expected one of {FORMS}, found {form!r}")
    if opset < MIN_OPSET:
        raise ValueError(f"patch graphs need opset >= {MIN_OPSET}, the base has {opset}")
    n = _names(prefix)
    c = params.n_classes
    sizes = [g.size for g in gated]
    if params.signs.shape[1] != sum(sizes):
        raise ValueError(f"signs have {params.signs.shape[1]} columns, gated tensors hold {sum(sizes)} values")
    nodes = []
    flat = []
    for i, g in enumerate(gated):
        name = f"{prefix}flat{i}"
        nodes.append(helper.make_node("Flatten", [g.name], [name], axis=1, name=name))
        flat.append(name)
    z = flat[0]
    if len(flat) > 1:
        z = n["z"]
        nodes.append(helper.make_node("Concat", flat, [z], axis=1, name=z))
    nodes += [
        helper.make_node("Abs", [z], [n["abs"]], name=n["abs"]),
        _reduce("ReduceSum", n["abs"], n["l1"], n["axis1"], opset),
        # folded at load: gamma/2 * signs, and -(1 - rho) gamma/2
        helper.make_node("Cast", [n["signs"]], [n["signs_f"]], to=TensorProto.FLOAT, name=n["signs_f"]),
        helper.make_node("Mul", [n["signs_f"], n["half_gamma"]], [n["signs_h"]], name=n["signs_h"]),
        helper.make_node("Mul", [n["half_gamma"], n["neg_keep"]], [n["l1_coef"]], name=n["l1_coef"]),
        # 1 - gamma/2 (1 - rho)|z|_1 (outer product plus one), then + gamma/2 z.s, then clip to [0, 1]
        helper.make_node("Gemm", [n["l1"], n["l1_coef"], n["one"]], [n["bias"]], name=n["bias"]),
        helper.make_node("Gemm", [z, n["signs_h"], n["bias"]], [n["acc"]], name=n["acc"]),
        helper.make_node("Clip", [n["acc"], n["zero"], n["one"]], [n["gate"]], name=n["gate"]),
    ]
    out_name = n[OUTPUT_SUFFIX]
    if form == "shift":
        nodes.append(helper.make_node("Gemm", [n["gate"], n["affine"], logits_name], [out_name], name=out_name))
    elif form == "collapse":
        nodes += [
            _reduce("ReduceSum", n["gate"], n["mass"], n["axis1"], opset),
            helper.make_node("Sub", [n["one"], n["mass"]], [n["keep_f"]], name=n["keep_f"]),
            helper.make_node("Mul", [logits_name, n["keep_f"]], [n["kept_logits"]], name=n["kept_logits"]),
            helper.make_node("Gemm", [n["gate"], n["affine"], n["kept_logits"]], [out_name], name=out_name),
        ]
    else:
        nodes += [
            helper.make_node("Unsqueeze", [n["gate"], n["axis2"]], [n["gate3"]], name=n["gate3"]),
            helper.make_node("Unsqueeze", [logits_name, n["axis1"]], [n["f3"]], name=n["f3"]),
            helper.make_node("Mul", [n["gate3"], n["f3"]], [n["gf3"]], name=n["gf3"]),
            helper.make_node("Reshape", [n["gf3"], n["flat_shape"]], [n["gf"]], name=n["gf"]),
            helper.make_node("Concat", [n["gf"], n["gate"]], [n["feat"]], axis=1, name=n["feat"]),
            helper.make_node("Gemm", [n["feat"], n["affine"], logits_name], [out_name], name=out_name),
        ]
    inputs = [helper.make_tensor_value_info(g.name, TensorProto.FLOAT, [BATCH_DIM, *g.shape]) for g in gated]
    inputs.append(helper.make_tensor_value_info(logits_name, TensorProto.FLOAT, [BATCH_DIM, c]))
    outputs = [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, [BATCH_DIM, c])]
    graph = helper.make_graph(nodes, prefix + "graph", inputs, outputs, _initializers(prefix, params, form))
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset)], producer_name=PRODUCER, ir_version=ir_version
    )


def extract_params(
    model: onnx.ModelProto, prefix: str, n_records: int, gated_size: int, n_classes: int, form: str
) -> PatchParams:
    """Read the parameters of a received graph by their canonical names; shapes and dtypes must fit."""
    n = _names(prefix)
    inits = {t.name: t for t in model.graph.initializer}
    expected = {
        "signs": (TensorProto.INT8, (gated_size, n_records)),
        "half_gamma": (TensorProto.FLOAT, (1, n_records)),
        "affine": (TensorProto.FLOAT, _affine_shape(form, n_records, n_classes)),
    }
    arrays = {}
    for key, (dtype, shape) in expected.items():
        tensor = inits.get(n[key])
        if tensor is None:
            raise StructureError(f"patch graph: expected initializer {n[key]!r}, found none")
        if tensor.data_location == TensorProto.EXTERNAL:
            raise StructureError(f"patch graph: initializer {n[key]!r} uses external data; expected inline")
        if tensor.data_type != dtype or tuple(tensor.dims) != shape:
            raise StructureError(
                f"patch graph: initializer {n[key]!r} expected dtype {TensorProto.DataType.Name(dtype)} "
                f"shape {shape}, found {TensorProto.DataType.Name(tensor.data_type)} {tuple(tensor.dims)}"
            )
        arrays[key] = numpy_helper.to_array(tensor)
    signs = arrays["signs"].T
    bad = ~np.isin(signs, (-1, 1))
    if bad.any():
        raise StructureError(f"patch graph: signs must be -1 or +1, found {int(bad.sum())} other values")
    affine = arrays["affine"]
    p, c = n_records, n_classes
    if form == "affine":
        T, t = affine[: p * c].reshape(p, c, c).transpose(0, 2, 1), affine[p * c :]
    else:
        T = np.zeros((p, c, c), np.float32) if form == "shift" else np.broadcast_to(-np.eye(c, dtype=np.float32), (p, c, c))
        t = affine
    return PatchParams(signs=signs, gamma=arrays["half_gamma"].reshape(-1) * np.float32(2.0), T=T, t=t)
