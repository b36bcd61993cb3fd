"""The one canonical patch graph, and the certificate algebra behind its parameters.

Records gate on the base's own hidden pre-activations ``z`` (the inputs of its Relu nodes). Each
value is read as an odd integer whose sign is the neuron's activation, exactly as the base's ReLU
sees it (``z >= 0`` is active)::

    v      = sat_int8(2 floor(z / delta) + 1)                   Mul, Floor, QuantizeLinear (N, M)
                                                                 odd (or -128), never 0, sign(v) = [z >= 0]
    excess = |v|_1 - v @ S^T  = 2 sum_i relu(-s_i v_i)          MatMulInteger        (N, P) even int >= 0
    score  = -gamma_k delta/4 * excess                           0 exactly iff x is in record k's region
    k*     = argmax_k score,  g = clip(1 + score[k*], 0, 1)      the most-open gate, first on ties (TopK)
    out    = f + g * (T_k* f + t_k*)                             at most one record acts on an input

Why this shape (the certificate issue):
- exact regions: ``excess_k = 0`` exactly when every gated neuron has the activation of record k's
  pattern, i.e. on the record's linear region; any other input has ``excess_k >= 2`` (each
  disagreeing neuron adds ``2|v_i| >= 2``). ``floor(z / delta) >= 0`` exactly when ``z >= 0`` (the
  division by a power of two is exact), so the sign is the ReLU's own, with no dead zone around zero to
  certify, not even for a dead unit whose pre-activation sits at -1e-11 on every input. So the sets
  where two different patterns' gates are 1 are disjoint *by construction*;
- one record acts: the correction comes from the most-open gate only, so where record k's gate is 1
  nothing else adds to it, whatever other records' gates are doing nearby. With disjoint gate-1 sets,
  each record's certificate (its target wins on its region) holds inside a patch and across every
  patch a device runs, checked by an integer comparison of patterns (:mod:`.interference`), not an LP;
- speed: one uint8 x int8 product for all gates, exact int32; the per-value work (floor, one
  quantization, |v|_1) is O(N M), independent of the number of records; selecting one record costs one
  TopK and a Gather instead of a (N, P) x (P, C) product.
Where every gate is 0 the correction is ``0 * (finite)``: the output equals the base logits (bit for bit,
except that a logit of exactly -0.0 may come out as +0.0; device policy caps |T| and |t|, so the
correction is always finite).

The correction has three forms, chosen per graph: ``shift`` (every T_k = 0), ``collapse`` (every
T_k = -I: ``out = f + g (t - f)``) and ``affine`` (a Gather of T_k and one batched product).
The server builds the canonical graph with :func:`build_patch_graph`; the device rebuilds it from
the received parameters and demands equality, so a patch file can only ever be this structure, and
composes every verified patch into one such graph (:func:`gated_correction`), grouped by gated tensors.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .errors import StructureError
from .manifest import GatedTensor

PRODUCER = "prune-edge"
FORMS = ("shift", "collapse", "affine")
PREFIX = "pe_"  # fixed: a patch's identity is its content hash, so names need not carry it
OUTPUT_NAME = PREFIX + "logits"
QUANT_ZERO_POINT = 128  # uint8 codes 0..255 stand for -128..127
SCALE_LOG2_RANGE = (-24, 8)  # delta from 2^-24 to 256: float32-exact scalings either way
DEFAULT_SCALE_LOG2 = -8
BATCH_DIM = "N"
MIN_OPSET = 13  # ReduceSum, Squeeze and Unsqueeze axes and Clip bounds as inputs


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


def _stacked_specs(targets: list[int] | np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(P, C, C) Pbar and Pbar^-1 of each record's target (one stack per distinct target)."""
    targets = np.asarray(targets, dtype=np.int64).reshape(-1)
    distinct, where = np.unique(targets, return_inverse=True)
    pairs = [_completed_spec_and_inverse(int(t), n_classes) for t in distinct]
    if not pairs:
        return np.zeros((0, n_classes, n_classes)), np.zeros((0, n_classes, n_classes))
    return np.stack([pb for pb, _ in pairs])[where], np.stack([iv for _, iv in pairs])[where]


def completed_specs(targets: list[int] | np.ndarray, n_classes: int) -> np.ndarray:
    """(P, C, C) :func:`completed_spec` of each target."""
    return _stacked_specs(targets, n_classes)[0]


def affine_from_scales(
    target: int, alpha: np.ndarray, beta: np.ndarray, mean_scale: float, mean_shift: float, n_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """PRUNE's closed form for one record: see :func:`affine_from_scales_many`."""
    a = np.append(np.asarray(alpha, dtype=np.float64), mean_scale)[None]
    b = np.append(np.asarray(beta, dtype=np.float64), mean_shift)[None]
    T, t = affine_from_scales_many([target], a, b, n_classes)
    return T[0], t[0]


def affine_from_scales_many(
    targets: list[int] | np.ndarray, a: np.ndarray, b: np.ndarray, n_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """PRUNE's closed form for P records at once: ``T = Pbar^-1 diag(a) Pbar - I = Pbar^-1 (diag(a) - I)
    Pbar``, ``t = Pbar^-1 b`` (float64), with ``a``, ``b`` of shape (P, C): (alpha, mean_scale) and
    (beta, mean_shift). Written the second way, a = 1 gives T = 0 exactly and a = 0 gives T = -I exactly,
    so the cheap graph forms apply without round-off."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, n_classes)
    b = np.asarray(b, dtype=np.float64).reshape(-1, n_classes)
    pbar, inv = _stacked_specs(targets, n_classes)
    T = (inv * (a - 1.0)[:, None, :]) @ pbar  # inv @ diag(a - 1): a column scaling, exactly
    T[~a.any(axis=1)] = -np.eye(n_classes)
    return T, np.einsum("pij,pj->pi", inv, b)


# ----------------------------------------------------------------------------- parameters
@dataclass
class PatchParams:
    """The numbers a patch graph carries, one row per record."""

    signs: np.ndarray  # int8 (P, M), entries in {-1, +1}
    gamma: np.ndarray  # float32 (P,)
    T: np.ndarray  # float32 (P, C, C)
    t: np.ndarray  # float32 (P, C)
    scale_log2: int = DEFAULT_SCALE_LOG2  # delta = 2^scale_log2, the gate's quantization step

    def __post_init__(self) -> None:
        self.signs = np.ascontiguousarray(self.signs, dtype=np.int8)
        self.gamma = np.ascontiguousarray(self.gamma, dtype=np.float32)
        self.T = np.ascontiguousarray(self.T, dtype=np.float32)
        self.t = np.ascontiguousarray(self.t, dtype=np.float32)
        self.scale_log2 = int(self.scale_log2)
        if not SCALE_LOG2_RANGE[0] <= self.scale_log2 <= SCALE_LOG2_RANGE[1]:
            raise ValueError(f"scale_log2: expected {SCALE_LOG2_RANGE[0]}..{SCALE_LOG2_RANGE[1]}, found {self.scale_log2}")

    @property
    def delta(self) -> float:
        return float(2.0**self.scale_log2)

    @property
    def n_records(self) -> int:
        return int(self.signs.shape[0])

    @property
    def n_classes(self) -> int:
        return int(self.t.shape[1])

    @property
    def gate_width(self) -> np.ndarray:
        """(P,) 1/gamma: the summed sign violation, in pre-activation units, at which a gate closes."""
        return 1.0 / self.gamma.astype(np.float64)


def quantize(z: np.ndarray, scale_log2: int) -> np.ndarray:
    """The odd integers v the gate sees, exactly as the graph computes them:
    ``v = clip(2 floor(z / delta) + 1, -128, 127)`` (z / delta is exact: delta is a power of two).
    ``sign(v) = [z >= 0]`` exactly: the ReLU's own activation, never a rounding of it; |v| grows with
    |z| in steps of delta/2."""
    z = np.asarray(z, np.float32)
    f = np.floor(z * np.float32(2.0**-scale_log2)).astype(np.float64)
    return np.clip(2 * f + 1, -128, 127).astype(np.int32)


def sign_pattern(z: np.ndarray) -> np.ndarray:
    """int8 +-1 activation pattern as the gate reads it: +1 where ``z >= 0`` (ReLU passes z), else -1.
    The one definition shared by the server's regions, its training view and the device's gate."""
    return np.where(np.asarray(z) >= 0, 1, -1).astype(np.int8)


def excess_of(v: np.ndarray, signs: np.ndarray) -> np.ndarray:
    """(N, P) int64 ``|v|_1 - v.s`` (= 2 sum_i relu(-s_i v_i)) of quantized values against sign rows:
    the integer each gate sees; 0 exactly where the pattern is the record's."""
    v = np.asarray(v, np.int64)
    return np.abs(v).sum(axis=1, keepdims=True) - v @ np.asarray(signs, np.int64).T


def choose_scale_log2(z: np.ndarray, quantile: float = 0.5) -> int:
    """delta = the power of two that puts the ``quantile`` of |z| at the int8 limit (64 steps of 2w+1).

    Resolution is what matters for a gate's soft edge: how finely a violation is measured. Signs
    survive saturation, so a saturated value only caps its share of a violation. Which inputs a
    record *certifies* does not depend on the step at all (the gate is 1 exactly on the region)."""
    if z.size == 0:
        return DEFAULT_SCALE_LOG2
    top = float(np.quantile(np.abs(z), quantile))
    if not np.isfinite(top) or top <= 0:
        return DEFAULT_SCALE_LOG2
    e = int(np.floor(np.log2(top / 64.0)))
    return int(np.clip(e, *SCALE_LOG2_RANGE))


def form_of(params: PatchParams) -> str:
    """The cheapest graph form that represents these parameters exactly."""
    return form_of_tables(params.T)


def form_of_tables(T: np.ndarray) -> str:
    if not T.any():
        return "shift"
    eye = np.broadcast_to(-np.eye(T.shape[-1], dtype=T.dtype), T.shape)
    return "collapse" if np.array_equal(T, eye) else "affine"


# ----------------------------------------------------------------------------- graph
@dataclass(frozen=True)
class GateGroup:
    """Records that gate on the same base tensors with the same step: one integer product for all."""

    gated: tuple[GatedTensor, ...]
    signs: np.ndarray  # int8 (P_g, M_g)
    gamma: np.ndarray  # float32 (P_g,)
    scale_log2: int

    @property
    def size(self) -> int:
        return sum(g.size for g in self.gated)


def _init(name: str, array: np.ndarray) -> TensorProto:
    array = np.asarray(array)
    return numpy_helper.from_array(np.ascontiguousarray(array) if array.ndim else array, name)


def neg_weight(gamma: np.ndarray, delta: float) -> np.ndarray:
    """-(gamma delta / 4) as float32: pre = 1 + neg_w * excess. A power-of-two rescaling of gamma,
    so gamma is recovered exactly from a received graph."""
    return (np.asarray(gamma, np.float32) * np.float32(-0.25) * np.float32(delta)).astype(np.float32)


def gate_nodes(prefix: str, groups: Sequence[GateGroup]) -> tuple[list[onnx.NodeProto], list[TensorProto], str]:
    """Nodes computing ``score`` (N, P) for every record of every group, in group order: the gate
    before its ``1 +`` and clip, so choosing the most-open record costs no extra pass over (N, P).

    Per group: flatten and concatenate its tensors (N, M_g), floor(z / delta), then one QuantizeLinear
    with scale 1/2 and zero point 129 writes the odd v = 2 floor + 1 as uint8 codes (read back with zero
    point 128; saturation keeps the sign), one MatMulInteger against the int8 signs and |v|_1;
    ``score = neg_w (|v|_1 - v.s)`` is exactly 0 on the record's region (gate exactly 1)."""
    nodes: list[onnx.NodeProto] = []
    inits: list[TensorProto] = [
        _init(prefix + "zp", np.array(QUANT_ZERO_POINT, np.uint8)),
        _init(prefix + "one", np.array([1.0], np.float32)),
        _init(prefix + "half_unit", np.array(0.5, np.float32)),
        _init(prefix + "zp_odd", np.array(QUANT_ZERO_POINT + 1, np.uint8)),
        _init(prefix + "unit", np.array(1.0, np.float32)),
        _init(prefix + "axis1", np.array([1], np.int64)),
    ]
    zp = prefix + "zp"
    pres = []
    for gi, group in enumerate(groups):
        p = f"{prefix}g{gi}_"
        delta = float(2.0**group.scale_log2)
        flat = []
        for i, g in enumerate(group.gated):
            if len(g.shape) == 1:
                flat.append(g.name)  # already (N, M_i)
                continue
            nodes.append(helper.make_node("Flatten", [g.name], [f"{p}flat{i}"], axis=1, name=f"{p}flat{i}"))
            flat.append(f"{p}flat{i}")
        z = flat[0]
        if len(flat) > 1:
            z = p + "z"
            nodes.append(helper.make_node("Concat", flat, [z], axis=1, name=z))
        nodes += [
            # floor(z / delta) >= 0 exactly where z >= 0: the activation as the ReLU sees it
            helper.make_node("Mul", [z, p + "inv_delta"], [p + "y"], name=p + "y"),
            helper.make_node("Floor", [p + "y"], [p + "fl"], name=p + "fl"),
            # codes 2 floor + 129 (saturating at 0 and 255): read with zero point 128, the odd v = 2 floor + 1
            helper.make_node("QuantizeLinear", [p + "fl", prefix + "half_unit", prefix + "zp_odd"], [p + "v"], name=p + "v"),
            # v.s for all records at once: uint8 (zero point 128) x int8 signs, exact int32
            helper.make_node("MatMulInteger", [p + "v", p + "signs", zp], [p + "vs"], name=p + "vs"),
            # |v|_1: integers below 2^24, exact in float32 in any summation order
            helper.make_node("DequantizeLinear", [p + "v", prefix + "unit", zp], [p + "vd"], name=p + "vd"),
            helper.make_node("Abs", [p + "vd"], [p + "vabs"], name=p + "vabs"),
            helper.make_node("ReduceSum", [p + "vabs", prefix + "axis1"], [p + "l1"], keepdims=1, name=p + "l1"),
            helper.make_node("Cast", [p + "vs"], [p + "vsf"], to=TensorProto.FLOAT, name=p + "vsf"),
            helper.make_node("Sub", [p + "l1", p + "vsf"], [p + "excess"], name=p + "excess"),
            helper.make_node("Mul", [p + "excess", p + "neg_w"], [p + "wv"], name=p + "wv"),
        ]
        inits += [
            _init(p + "inv_delta", np.array(1.0 / delta, np.float32)),  # exact: delta is a power of two
            _init(p + "signs", np.ascontiguousarray(group.signs.T)),  # (M, P) int8, the MatMulInteger operand
            _init(p + "neg_w", neg_weight(group.gamma, delta).reshape(1, -1)),
        ]
        pres.append(p + "wv")
    score = pres[0]
    if len(pres) > 1:
        score = prefix + "score"
        nodes.append(helper.make_node("Concat", pres, [score], axis=1, name=score))
    return nodes, inits, score


def correction_nodes(
    prefix: str, pre: str, logits_name: str, T: np.ndarray, t: np.ndarray, form: str, out_name: str
) -> tuple[list[onnx.NodeProto], list[TensorProto]]:
    """Nodes for ``out = f + g (T_k* f + t_k*)`` with k* the most-open gate (first on ties); ``pre`` is
    the (N, P) score of :func:`gate_nodes`."""
    if form not in FORMS:
        raise ValueError(f"form: expected one of {FORMS}, found {form!r}")
    n = lambda key: prefix + key  # noqa: E731
    nodes = [
        # the most-open record and its score in one op (TopK keeps the lower index on ties; measured
        # 145 us against ArgMax's 184 us plus a GatherElements on 256 x 1000 scores, one thread)
        helper.make_node("TopK", [pre, n("top1")], [n("gscore"), n("k1")], axis=1, largest=1, sorted=1, name=n("k1")),
        helper.make_node("Add", [n("gscore"), n("one")], [n("gpre")], name=n("gpre")),
        helper.make_node("Clip", [n("gpre"), n("zero"), n("one")], [n("gate_max")], name=n("gate_max")),
        helper.make_node("Squeeze", [n("k1"), n("axis1")], [n("k")], name=n("k")),
        helper.make_node("Gather", [n("t_table"), n("k")], [n("tk")], axis=0, name=n("tk")),
    ]
    inits = [
        _init(n("zero"), np.array([0.0], np.float32)),
        _init(n("top1"), np.array([1], np.int64)),
        _init(n("t_table"), np.asarray(t, np.float32)),
    ]
    if form == "shift":
        delta_name = n("tk")
    elif form == "collapse":
        # f + g (t - f): with g = 0 this is f + 0, the base logits bit for bit
        nodes.append(helper.make_node("Sub", [n("tk"), logits_name], [n("dk")], name=n("dk")))
        delta_name = n("dk")
    else:
        nodes += [
            helper.make_node("Gather", [n("T_table"), n("k")], [n("Tk")], axis=0, name=n("Tk")),
            helper.make_node("Unsqueeze", [logits_name, n("axis2")], [n("f3")], name=n("f3")),
            helper.make_node("MatMul", [n("Tk"), n("f3")], [n("Tf3")], name=n("Tf3")),
            helper.make_node("Squeeze", [n("Tf3"), n("axis2")], [n("Tf")], name=n("Tf")),
            helper.make_node("Add", [n("Tf"), n("tk")], [n("dk")], name=n("dk")),
        ]
        inits += [_init(n("T_table"), np.asarray(T, np.float32)), _init(n("axis2"), np.array([2], np.int64))]
        delta_name = n("dk")
    nodes += [
        helper.make_node("Mul", [delta_name, n("gate_max")], [n("corr")], name=n("corr")),
        helper.make_node("Add", [logits_name, n("corr")], [out_name], name=out_name),
    ]
    return nodes, inits


def _check_sizes(groups: Sequence[GateGroup]) -> None:
    for group in groups:
        if group.signs.shape[1] != group.size:
            raise ValueError(f"signs have {group.signs.shape[1]} columns, gated tensors hold {group.size} values")
        if 128 * group.size >= 2**24:
            raise ValueError(f"{group.size} gated values: |v|_1 could reach 2^24 and lose float32 exactness")


def build_patch_graph(
    gated: tuple[GatedTensor, ...] | list[GatedTensor],
    logits_name: str,
    params: PatchParams,
    opset: int,
    ir_version: int,
    form: str,
) -> onnx.ModelProto:
    """The canonical patch graph for these parameters (deterministic: same inputs, same bytes)."""
    if opset < MIN_OPSET:
        raise ValueError(f"patch graphs need opset >= {MIN_OPSET}, the base has {opset}")
    group = GateGroup(tuple(gated), params.signs, params.gamma, params.scale_log2)
    _check_sizes([group])
    nodes, inits, pre = gate_nodes(PREFIX, [group])
    more_nodes, more_inits = correction_nodes(PREFIX, pre, logits_name, params.T, params.t, form, OUTPUT_NAME)
    c = params.n_classes
    inputs = [helper.make_tensor_value_info(g.name, TensorProto.FLOAT, [BATCH_DIM, *g.shape]) for g in gated]
    inputs.append(helper.make_tensor_value_info(logits_name, TensorProto.FLOAT, [BATCH_DIM, c]))
    outputs = [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, [BATCH_DIM, c])]
    graph = helper.make_graph(nodes + more_nodes, PREFIX + "graph", inputs, outputs, inits + more_inits)
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset)], producer_name=PRODUCER, ir_version=ir_version
    )


def extract_params(model: onnx.ModelProto, n_records: int, gated_size: int, n_classes: int, form: str) -> PatchParams:
    """Read the parameters of a received graph by their canonical names; shapes and dtypes must fit."""
    g0 = PREFIX + "g0_"
    inits = {t.name: t for t in model.graph.initializer}
    expected = {
        g0 + "signs": (TensorProto.INT8, (gated_size, n_records)),
        g0 + "neg_w": (TensorProto.FLOAT, (1, n_records)),
        g0 + "inv_delta": (TensorProto.FLOAT, ()),
        PREFIX + "t_table": (TensorProto.FLOAT, (n_records, n_classes)),
    }
    if form == "affine":
        expected[PREFIX + "T_table"] = (TensorProto.FLOAT, (n_records, n_classes, n_classes))
    arrays = {}
    for key, (dtype, shape) in expected.items():
        tensor = inits.get(key)
        if tensor is None:
            raise StructureError(f"patch graph: expected initializer {key!r}, found none")
        if tensor.data_location == TensorProto.EXTERNAL:
            raise StructureError(f"patch graph: initializer {key!r} uses external data; expected inline")
        if tensor.data_type != dtype or tuple(tensor.dims) != shape:
            raise StructureError(
                f"patch graph: initializer {key!r} expected dtype {TensorProto.DataType.Name(dtype)} "
                f"shape {shape}, found {TensorProto.DataType.Name(tensor.data_type)} {tuple(tensor.dims)}"
            )
        arrays[key] = numpy_helper.to_array(tensor)
    inv_delta = float(arrays[g0 + "inv_delta"])
    mantissa, exponent = np.frexp(inv_delta) if np.isfinite(inv_delta) and inv_delta > 0 else (0.0, 0)
    scale_log2 = 1 - int(exponent)  # 1/delta = 0.5 * 2^exponent
    delta = 2.0**scale_log2
    if mantissa != 0.5 or not SCALE_LOG2_RANGE[0] <= scale_log2 <= SCALE_LOG2_RANGE[1]:
        raise StructureError(
            f"patch graph: quantization step expected a power of two 2^{SCALE_LOG2_RANGE[0]}..2^{SCALE_LOG2_RANGE[1]}, "
            f"found 1/{inv_delta!r}"
        )
    gamma = arrays[g0 + "neg_w"].reshape(-1) * np.float32(-4.0 / delta)
    signs = arrays[g0 + "signs"].T
    bad = ~np.isin(signs, (-1, 1))
    if bad.any():
        raise StructureError(f"patch graph: signs must be -1 or +1, found {int(bad.sum())} other values")
    c = n_classes
    if form == "affine":
        T = arrays[PREFIX + "T_table"]
    elif form == "shift":
        T = np.zeros((n_records, c, c), np.float32)
    else:
        T = np.broadcast_to(-np.eye(c, dtype=np.float32), (n_records, c, c))
    return PatchParams(signs=signs, gamma=gamma, T=T, t=arrays[PREFIX + "t_table"], scale_log2=scale_log2)


# ----------------------------------------------------------------------------- class suppression
# A patch of this form keeps a set S of classes from ever being the prediction, on every input:
#
#     mo    = max_{j not in S} f_j                                  Gather + TopK     (N, 1)
#     cap_K = mo - (margin_K + |mo| 2^-22)                          Abs, Mul, Add, Sub (N, C)
#     out_K = min(f_K, cap_K)  for K in S,   out_j = f_j  otherwise  Min, Where        (N, C)
#
# Every other logit is the input tensor itself (Where picks it), bit for bit. For K in S,
# out_K <= cap_K < mo = max_{j not in S} out_j for every finite mo, in float32 arithmetic: the
# subtrahend is at least margin_K > 0 and at least |mo| 2^-22, i.e. two units in the last place of
# mo, so the rounded difference lies strictly below mo (a plain ``mo - margin`` would round back to
# mo once |mo| >= 2^24 margin). The guarantee needs no region and no LP: it holds by construction.
SUPPRESS_FORM = "suppress"
SUPPRESS_PREFIX = PREFIX + "s_"
SUPPRESS_REL_SLACK = np.float32(2.0**-22)


@dataclass
class SuppressParams:
    """The numbers a suppression graph carries: the suppressed classes and each one's margin."""

    classes: np.ndarray  # int64 (S,), sorted, distinct
    margin: np.ndarray  # float32 (S,)

    def __post_init__(self) -> None:
        self.classes = np.ascontiguousarray(self.classes, dtype=np.int64).reshape(-1)
        self.margin = np.ascontiguousarray(self.margin, dtype=np.float32).reshape(-1)
        if self.classes.shape != self.margin.shape:
            raise ValueError(f"suppression: {len(self.classes)} classes but {len(self.margin)} margins")

    def tables(self, n_classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(keep indices, class mask, per-class margin) as the graph stores them; ValueError when the
        classes are not distinct, sorted, in range, or leave no class to predict."""
        c = self.classes
        if not len(c) or (np.diff(c) <= 0).any() or c[0] < 0 or c[-1] >= n_classes or len(c) >= n_classes:
            raise ValueError(f"suppressed classes expected sorted, distinct, in [0, {n_classes}) and fewer than "
                             f"{n_classes}, found {c.tolist()}")
        mask = np.zeros(n_classes, bool)
        mask[c] = True
        margin = np.zeros(n_classes, np.float32)
        margin[c] = self.margin
        return np.flatnonzero(~mask).astype(np.int64), mask, margin


def merge_suppressions(params: Sequence[SuppressParams]) -> SuppressParams:
    """One suppression equal to applying all of them: the union of classes, each at its largest margin
    (``min(f, mo - a, mo - b) = min(f, mo - max(a, b))``; mo is over the classes no patch suppresses)."""
    best: dict[int, float] = {}
    for p in params:
        for k, m in zip(p.classes.tolist(), p.margin.tolist()):
            best[k] = max(best.get(k, -np.inf), m)
    keys = sorted(best)
    return SuppressParams(np.array(keys, np.int64), np.array([best[k] for k in keys], np.float32))


def suppress_nodes(prefix: str, logits_in: str, params: SuppressParams, n_classes: int, out_name: str
                   ) -> tuple[list[onnx.NodeProto], list[TensorProto]]:
    """Nodes writing ``out_name`` = ``logits_in`` with every suppressed class capped below the best
    other class (see the block comment above)."""
    keep, mask, margin = params.tables(n_classes)
    n = lambda key: prefix + key  # noqa: E731
    nodes = [
        helper.make_node("Gather", [logits_in, n("keep")], [n("kept")], axis=1, name=n("kept")),
        helper.make_node("TopK", [n("kept"), n("top1")], [n("mo"), n("mo_k")], axis=1, largest=1, sorted=1, name=n("mo")),
        helper.make_node("Abs", [n("mo")], [n("mo_abs")], name=n("mo_abs")),
        helper.make_node("Mul", [n("mo_abs"), n("rel")], [n("slack")], name=n("slack")),
        helper.make_node("Add", [n("slack"), n("margin")], [n("drop")], name=n("drop")),
        helper.make_node("Sub", [n("mo"), n("drop")], [n("cap")], name=n("cap")),
        helper.make_node("Min", [logits_in, n("cap")], [n("low")], name=n("low")),
        # the other logits are logits_in itself, picked by the mask: untouched bit for bit
        helper.make_node("Where", [n("mask"), n("low"), logits_in], [out_name], name=out_name),
    ]
    inits = [
        _init(n("keep"), keep),
        _init(n("top1"), np.array([1], np.int64)),
        _init(n("rel"), np.array(SUPPRESS_REL_SLACK, np.float32)),
        _init(n("margin"), margin),
        _init(n("mask"), mask),
    ]
    return nodes, inits


def build_suppress_graph(logits_name: str, params: SuppressParams, n_classes: int, opset: int, ir_version: int
                         ) -> onnx.ModelProto:
    """The canonical suppression graph (logits in, suppressed logits out; deterministic bytes)."""
    if opset < MIN_OPSET:
        raise ValueError(f"patch graphs need opset >= {MIN_OPSET}, the base has {opset}")
    nodes, inits = suppress_nodes(SUPPRESS_PREFIX, logits_name, params, n_classes, OUTPUT_NAME)
    inputs = [helper.make_tensor_value_info(logits_name, TensorProto.FLOAT, [BATCH_DIM, n_classes])]
    outputs = [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, [BATCH_DIM, n_classes])]
    graph = helper.make_graph(nodes, PREFIX + "graph", inputs, outputs, inits)
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset)], producer_name=PRODUCER, ir_version=ir_version
    )


def extract_suppress_params(model: onnx.ModelProto, n_classes: int) -> SuppressParams:
    """The classes and margins a received suppression graph carries (its mask and margin tables)."""
    inits = {t.name: t for t in model.graph.initializer}
    arrays = {}
    for key, dtype in ((SUPPRESS_PREFIX + "mask", TensorProto.BOOL), (SUPPRESS_PREFIX + "margin", TensorProto.FLOAT)):
        tensor = inits.get(key)
        if tensor is None:
            raise StructureError(f"patch graph: expected initializer {key!r}, found none")
        if tensor.data_location == TensorProto.EXTERNAL:
            raise StructureError(f"patch graph: initializer {key!r} uses external data; expected inline")
        if tensor.data_type != dtype or tuple(tensor.dims) != (n_classes,):
            raise StructureError(
                f"patch graph: initializer {key!r} expected dtype {TensorProto.DataType.Name(dtype)} shape "
                f"({n_classes},), found {TensorProto.DataType.Name(tensor.data_type)} {tuple(tensor.dims)}"
            )
        arrays[key] = numpy_helper.to_array(tensor)
    classes = np.flatnonzero(arrays[SUPPRESS_PREFIX + "mask"]).astype(np.int64)
    return SuppressParams(classes, arrays[SUPPRESS_PREFIX + "margin"][classes])
