"""The one canonical patch graph, and the certificate algebra behind its parameters.

A patch file holding P records computes, from base tensors only::

    q      = clip(round(z / delta), -128, 127)   z = concat(flatten(z_l)), delta = 2^e   (N, M) int
    excess = delta * (|q|_1 - q @ S^T)          = 2 delta sum_i relu(-s_i q_i) >= 0      (N, P)
    gate   = clip(1 - gamma/2 * excess, 0, 1)                                              (N, P)
    out    = f + sum_k gate_k (T_k f + t_k)                                                (N, C)

The correction has three forms, named in the manifest, so the common cases cost one small product:
``shift`` (every T_k = 0: PRUNE with alpha = 1)        out = f + gate @ t   (one Gemm)
``collapse`` (every T_k = -I: alpha = 0)               out = gate @ t + (1 - rowsum(gate)) * f
``affine`` (anything else)                             out = f + [gate (x) f, gate] @ [T_1^T..T_P^T; t]

Why the gate is computed on 8-bit integers (QuantizeLinear, then one MatMulInteger against the int8
signs with int32 accumulation):
- exactness: ``|q|_1 - q.s`` is an exact integer, and it is 0 wherever every coordinate agrees in sign
  with the record's pattern (or rounds to 0). So on the record's linear region the excess is exactly 0
  and the gate exactly 1, for any gamma and whatever rounding the base's own float32 ops had: no
  rounding dead zone to reason about. Rounding only widens the gate=1 set by |z_i| < delta/2, and
  saturation at +-128 delta keeps every sign;
- speed: one uint8 x int8 product replaces a float32 one (measured 2-3x less time for the gate product
  on CPU), which is what keeps 1000 point patches cheap next to the base;
- summed violation ``sum_i relu(-s_i q_i) = (|q|_1 - q.s)/2``, so all P gates cost one product and all
  corrections one more (method note, section 2), never a broadcast over patches x neurons.
The server builds this graph with :func:`build_patch_graph`; the device rebuilds it from the received
parameters and the manifest and demands equality, so a patch file can only ever be this structure.
The graph is already minimal: onnxsim could only fold constant scalings, which onnxruntime folds when
the session loads. Where every gate is 0 the correction is an exact 0, so the output equals the base
logits bit for bit.
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
QUANT_ZERO_POINT = 128  # uint8 codes 0..255 stand for -128..127
SCALE_LOG2_RANGE = (-24, 8)  # delta from 2^-24 to 256: float32-exact scalings either way
DEFAULT_SCALE_LOG2 = -8
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


def quantize(z: np.ndarray, scale_log2: int) -> np.ndarray:
    """The integers the gate sees, exactly as QuantizeLinear (uint8, zero point 128) gives them:
    round half to even of z / 2^e, saturated to [-128, 127] (z / 2^e is exact in float32)."""
    scaled = np.asarray(z, np.float32) * np.float32(2.0 ** -scale_log2)
    return np.clip(np.rint(scaled), -128, 127).astype(np.int32)


def choose_scale_log2(z: np.ndarray, quantile: float = 0.5) -> int:
    """delta = the power of two that puts the ``quantile`` of |z| at the int8 limit (127 steps).

    Resolution is what matters: a point differing from a pattern only in values below delta/2 is seen
    as inside, so a fine step keeps gates closed on more retained points. Saturation costs nothing
    for that, as signs survive it; it only caps each value's share of a violation at 128 steps, so
    violations weigh mostly how many values disagree. Measured on the default MLP (1000 forget points,
    gates on layer 2 only): retained points sharing a gate's integer pattern 63 at the 0.99 quantile,
    40 at the median, 39 at any finer step (the exact-pattern duplicates no gate can separate)."""
    if z.size == 0:
        return DEFAULT_SCALE_LOG2
    top = float(np.quantile(np.abs(z), quantile))
    if not np.isfinite(top) or top <= 0:
        return DEFAULT_SCALE_LOG2
    e = int(np.floor(np.log2(top / 127.0)))
    return int(np.clip(e, *SCALE_LOG2_RANGE))


def form_of(params: PatchParams) -> str:
    """The cheapest graph form that represents these parameters exactly."""
    if not params.T.any():
        return "shift"
    eye = np.broadcast_to(-np.eye(params.n_classes, dtype=np.float32), params.T.shape)
    return "collapse" if np.array_equal(params.T, eye) else "affine"


def _names(prefix: str) -> dict[str, str]:
    keys = ["signs", "neg_w", "affine", "one", "zero", "unit", "delta", "zp", "axis1", "axis2", "flat_shape",
            "q", "qs", "qf", "qabs", "l1", "qsf", "excess", "wv", "pre", "gate", "gate3", "f3", "gf3", "gf",
            "feat", "mass", "ones_p", "minus_one", "kept_logits", OUTPUT_SUFFIX]
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


MIN_OPSET = 13  # ReduceSum axes and Clip bounds as inputs


def _initializers(prefix: str, params: PatchParams, form: str) -> list[TensorProto]:
    n = _names(prefix)
    arrays = {
        "signs": np.ascontiguousarray(params.signs.T),  # (M, P) int8, the MatMulInteger operand as stored
        # -(gamma/2) delta per record: a power-of-two rescaling of gamma/2, so gamma is recovered exactly
        "neg_w": (-(params.gamma * np.float32(0.5)) * np.float32(params.delta)).astype(np.float32).reshape(1, -1),
        "affine": _affine_matrix(params, form).astype(np.float32),
        "one": np.array([1.0], np.float32),
        "zero": np.array([0.0], np.float32),
        "unit": np.array(1.0, np.float32),
        "delta": np.array(params.delta, np.float32),
        "zp": np.array(QUANT_ZERO_POINT, np.uint8),
        "axis1": np.array([1], np.int64),
    }
    if form == "collapse":
        arrays["ones_p"] = np.ones((params.n_records, 1), np.float32)
        arrays["minus_one"] = np.array([-1.0], np.float32)
    if form == "affine":
        arrays["axis2"] = np.array([2], np.int64)
        arrays["flat_shape"] = np.array([0, params.n_records * params.n_classes], np.int64)
    return [numpy_helper.from_array(v, n[k]) for k, v in arrays.items()]


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

    The gate is ``clip(1 - gamma/2 * delta (|q|_1 - q.s), 0, 1)`` with q the int8 quantization of the
    gated values (module docstring). The (N, P) work is one integer product and four elementwise
    passes; everything per value (quantization, |q|_1) is O(N M), independent of P.
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
    if 128 * sum(sizes) >= 2**24:
        raise ValueError(f"{sum(sizes)} gated values: |q|_1 could reach 2^24 and lose float32 exactness")
    nodes = []
    flat = []
    for i, g in enumerate(gated):
        if len(g.shape) == 1:
            flat.append(g.name)  # already (N, M_i): a Flatten would only copy
            continue
        name = f"{prefix}flat{i}"
        nodes.append(helper.make_node("Flatten", [g.name], [name], axis=1, name=name))
        flat.append(name)
    quant = []
    for i, name in enumerate(flat):
        q_name = f"{prefix}q{i}"
        nodes.append(helper.make_node("QuantizeLinear", [name, n["delta"], n["zp"]], [q_name], name=q_name))
        quant.append(q_name)
    q = quant[0]
    if len(quant) > 1:
        q = n["q"]
        nodes.append(helper.make_node("Concat", quant, [q], axis=1, name=q))
    nodes += [
        # q.s for all records at once: uint8 (zero point 128) x int8 signs, exact int32
        helper.make_node("MatMulInteger", [q, n["signs"], n["zp"]], [n["qs"]], name=n["qs"]),
        # |q|_1: integers below 2^24, so exact in float32 in any summation order (Abs + ReduceSum
        # measured faster than ReduceL1 in onnxruntime)
        helper.make_node("DequantizeLinear", [q, n["unit"], n["zp"]], [n["qf"]], name=n["qf"]),
        helper.make_node("Abs", [n["qf"]], [n["qabs"]], name=n["qabs"]),
        helper.make_node("ReduceSum", [n["qabs"], n["axis1"]], [n["l1"]], keepdims=1, name=n["l1"]),
        helper.make_node("Cast", [n["qs"]], [n["qsf"]], to=TensorProto.FLOAT, name=n["qsf"]),
        # |q|_1 - q.s: an exact, even, non-negative integer; 0 on the record's region
        helper.make_node("Sub", [n["l1"], n["qsf"]], [n["excess"]], name=n["excess"]),
        helper.make_node("Mul", [n["excess"], n["neg_w"]], [n["wv"]], name=n["wv"]),
        helper.make_node("Add", [n["wv"], n["one"]], [n["pre"]], name=n["pre"]),
        helper.make_node("Clip", [n["pre"], n["zero"], n["one"]], [n["gate"]], name=n["gate"]),
    ]
    out_name = n[OUTPUT_SUFFIX]
    if form == "shift":
        nodes.append(helper.make_node("Gemm", [n["gate"], n["affine"], logits_name], [out_name], name=out_name))
    elif form == "collapse":
        nodes += [
            # sum(gate) - 1, then -f (1 - sum(gate)); the last Gemm subtracts it (beta = -1). With every
            # gate 0 these are -1, -f and 0 + f: the base logits bit for bit.
            helper.make_node("Gemm", [n["gate"], n["ones_p"], n["minus_one"]], [n["mass"]], name=n["mass"]),
            helper.make_node("Mul", [logits_name, n["mass"]], [n["kept_logits"]], name=n["kept_logits"]),
            helper.make_node("Gemm", [n["gate"], n["affine"], n["kept_logits"]], [out_name], beta=-1.0, name=out_name),
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
        "neg_w": (TensorProto.FLOAT, (1, n_records)),
        "affine": (TensorProto.FLOAT, _affine_shape(form, n_records, n_classes)),
        "delta": (TensorProto.FLOAT, ()),
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
    delta = float(arrays["delta"])
    mantissa, exponent = np.frexp(delta) if np.isfinite(delta) else (0.0, 0)
    scale_log2 = int(exponent) - 1
    if mantissa != 0.5 or not SCALE_LOG2_RANGE[0] <= scale_log2 <= SCALE_LOG2_RANGE[1]:
        raise StructureError(
            f"patch graph: quantization step expected a power of two 2^{SCALE_LOG2_RANGE[0]}..2^{SCALE_LOG2_RANGE[1]}, "
            f"found {delta!r}"
        )
    gamma = arrays["neg_w"].reshape(-1) * np.float32(-2.0 / delta)
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
    return PatchParams(signs=signs, gamma=gamma, T=T, t=t, scale_log2=scale_log2)
