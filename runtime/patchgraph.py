"""The one canonical patch graph, and the certificate algebra behind its parameters.

Records gate on the base's own hidden pre-activations ``z`` (the inputs of its Relu nodes). Each
value is read as an odd integer whose sign is the neuron's activation, exactly as the base's ReLU
sees it (``z >= 0`` is active)::

    v      = sat_int8(2 floor(z / delta) + 1)                   Mul, Floor, QuantizeLinear (N, M)
                                                                 odd (or -128), never 0, sign(v) = [z >= 0]
    excess_k = |v|_1 - v . s_k = 2 sum_i relu(-s_ki v_i)          even int >= 0, 0 exactly on k's region
    k*     = the first record whose signs on A are the input's   a trie lookup (device) or (N, |A|) x (|A|, P)
                                                                 MatMulInteger, first ArgMax, score = |v_A|_1 (file)
    g      = clip(1 - gamma_k* delta/4 * excess_k*, 0, 1), 0 if none   the chosen record's gate alone
    out    = f + g * (T_k* f + t_k*)                             at most one record acts on an input

A = :func:`selection_neurons` of the records' signs: the few gated values whose signs tell every two
distinct patterns apart (29 for 500 random training points of the default MLP), all inside a window W
(:func:`screen_window`: 96 contiguous values of the 384). Format 8 acts only where the input's signs on A
are some record's (about 3% of the MNIST test images under a 500-record patch): a device finds that record
by one table lookup per 4 signs and computes the exact gate for those inputs alone (:func:`gate_nodes`).

Why this shape (the certificate issue):
- exact regions: ``excess_k = 0`` exactly when every gated neuron has the activation of record k's
  pattern, i.e. on the record's linear region; any other input has ``excess_k >= 2`` (each
  disagreeing neuron adds ``2|v_i| >= 2``). ``floor(z / delta) >= 0`` exactly when ``z >= 0`` (the
  division by a power of two is exact), so the sign is the ReLU's own, with no dead zone around zero to
  certify, not even for a dead unit whose pre-activation sits at -1e-11 on every input. So the sets
  where two different patterns' gates are 1 are disjoint *by construction*;
- one record acts, and on record k's region it is k (or a record with k's very pattern, which
  :mod:`.interference` demands share its target): the input's signs on A are k's, records with equal
  signs on A have equal patterns (A separates distinct patterns), and the first of them acts with gate 1.
  Each record's certificate (its target wins on its region) then holds inside a patch and across
  every patch a device runs, checked by an integer comparison of patterns, not an LP. Elsewhere the
  acting gate is the looked-up record's exact gate, or 0 where no record has the input's signs on A:
  outputs change only where some record's gate is open;
- speed: formats 5-7 scored every input against every record, (N, |A|) x (|A|, P) integer products and an
  argmax over (N, P), and screened the exact gate on a window: at batch 256 the 500-record set patch cost
  about 0.4 of the base on two threads of an AVX2 CPU and 0.2 on one. Format 8's lookup touches (N, |A|)
  signs and N table entries per level, and the exact gate only the inputs that have a record: about 0.1-0.15
  of the base (``docs/sets.md``, "Format 8"). The patch file keeps the product form, whose tables follow from
  the bit-packed signs by constant nodes; the trie is a function of the same verified signs, built by the
  device when it composes (:func:`lookup_tables`), so the file carries no more bytes.
Where every gate is 0 the correction is ``0 * (finite)``: the output equals the base logits (bit for bit,
except that a logit of exactly -0.0 may come out as +0.0; device policy caps |T| and |t|, so the
correction is always finite).

The correction has three forms, chosen per graph: ``shift`` (every T_k = 0), ``collapse`` (every
T_k = -I: ``out = f + g (t - f)``) and ``affine`` (a Gather of T_k and one batched product).
The server builds the canonical graph with :func:`build_patch_graph`; the device rebuilds it from
the received parameters and demands equality, so a patch file can only ever be this structure, and
composes every verified patch into one such graph (:mod:`.compose`), grouped by gated tensors.
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
    """Records that gate on the same base tensors with the same step: one selection among all of them."""

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


def pack_signs(signs: np.ndarray) -> np.ndarray:
    """(P, M) +-1 signs as the patch file stores them (format 4): (M, ceil(P/8)) uint8, one bit per
    record, the first record in the high bit, +1 as 1, padding bits 0 (8x smaller than int8)."""
    return np.packbits(np.asarray(signs).T > 0, axis=1)


def unpack_signs(packed: np.ndarray, n_records: int) -> np.ndarray:
    """Inverse of :func:`pack_signs`: (P, M) int8 +-1 (what :func:`_sign_lut` computes in the graph)."""
    bits = np.unpackbits(np.asarray(packed, np.uint8), axis=1)[:, :n_records]
    return (2 * bits.astype(np.int8) - 1).T


def _sign_lut() -> np.ndarray:
    """(256, 8) int8: row b holds the +-1 signs of byte b's bits, high bit first."""
    return (2 * np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).astype(np.int8) - 1)


def _unpack_nodes(p: str, packed: np.ndarray, n_records: int) -> tuple[list[onnx.NodeProto], list[TensorProto]]:
    """Nodes writing the (M, P) int8 MatMulInteger operand ``p + "signs"`` from its packed bits. Every
    input is an initializer, so onnxruntime folds them into a constant when the session is created:
    inference runs the same MatMulInteger on the same int8 table as with int8 storage."""
    nodes = [
        helper.make_node("Cast", [p + "signs_packed"], [p + "signs_idx"], to=TensorProto.INT64, name=p + "signs_idx"),
        helper.make_node("Gather", [p + "sign_lut", p + "signs_idx"], [p + "signs_bytes"], axis=0, name=p + "signs_bytes"),
        helper.make_node("Reshape", [p + "signs_bytes", p + "signs_shape"], [p + "signs_wide"], name=p + "signs_wide"),
        helper.make_node("Slice", [p + "signs_wide", p + "signs_from", p + "signs_to", p + "signs_axis"], [p + "signs"],
                         name=p + "signs"),
    ]
    inits = [
        _init(p + "signs_packed", packed),
        _init(p + "sign_lut", _sign_lut()),
        _init(p + "signs_shape", np.array([0, -1], np.int64)),  # (M, ceil(P/8), 8) -> (M, 8 ceil(P/8))
        _init(p + "signs_from", np.array([0], np.int64)),
        _init(p + "signs_to", np.array([n_records], np.int64)),
        _init(p + "signs_axis", np.array([1], np.int64)),
    ]
    return nodes, inits


SELECT_BLOCK = 32  # scores per block of the two-stage argmax: the score row is padded to a multiple of it


SCREEN_WIDTH = 96  # gated values the first stage quantizes (a contiguous window), when M >= 2 of them
SCREEN_STRIDE = 32  # where a window may start: 0, 32, 64, ...


def screen_window(signs: np.ndarray) -> tuple[int, int]:
    """(start, width) of the contiguous window of gated values the gate's first stage reads.

    The first window of ``SCREEN_WIDTH`` values (starts on a ``SCREEN_STRIDE`` grid) whose signs alone
    tell every two distinct patterns of ``signs`` apart, so the selection can look inside it; every value
    (0, M) when M < 2 ``SCREEN_WIDTH`` (screening would save little) or no window separates the patterns.
    A function of the signs alone: a device recomputes it from the parameters it verified."""
    bits = np.asarray(signs) > 0
    return _window(np.packbits(bits, axis=1).tobytes(), bits.shape)


@functools.lru_cache(maxsize=16)
def _window(packed: bytes, shape: tuple[int, int]) -> tuple[int, int]:
    p, m = shape
    if m < 2 * SCREEN_WIDTH:
        return 0, m
    bits = np.unpackbits(np.frombuffer(packed, np.uint8).reshape(p, (m + 7) // 8), axis=1, count=m)
    distinct = len(np.unique(bits, axis=0))
    for start in range(0, m - SCREEN_WIDTH + 1, SCREEN_STRIDE):
        if len(np.unique(bits[:, start : start + SCREEN_WIDTH], axis=0)) == distinct:
            return start, SCREEN_WIDTH
    return 0, m


def selection_neurons(signs: np.ndarray) -> np.ndarray:
    """The gated values whose signs tell every two distinct patterns of ``signs`` apart (sorted int64
    indices into all M values, at least one, all inside :func:`screen_window`): where the gate's first
    stage looks.

    Greedy and deterministic (a function of the signs alone, so a device recomputes it from the
    parameters it verified): each step adds the window's value that leaves the fewest pairs of patterns
    with equal signs on the chosen values, lowest index first on ties. Every step separates at least one
    pair (two distinct patterns differ somewhere in the window the chosen values do not look), so it ends
    with every distinct pattern alone; 500 random training points of the default MLP need 29 of the 96
    values of the window (22 of all 384)."""
    start, width = screen_window(signs)
    bits = np.asarray(signs)[:, start : start + width] > 0
    return start + _selection(np.packbits(bits, axis=1).tobytes(), bits.shape)


@functools.lru_cache(maxsize=16)
def _selection(packed: bytes, shape: tuple[int, int]) -> np.ndarray:
    """:func:`selection_neurons` of packed sign bits, cached: a device computes it for the structure check
    and again when it composes (30 ms for 1,000 records of the default MLP)."""
    patterns = np.unique(np.frombuffer(packed, np.uint8).reshape(shape[0], (shape[1] + 7) // 8), axis=0)
    bits = np.unpackbits(patterns, axis=1, count=shape[1]).astype(np.int32)  # one row per distinct pattern
    chosen: list[int] = []
    group = np.zeros(len(bits), np.int64)
    active = np.arange(len(bits)) if len(bits) > 1 else np.zeros(0, np.int64)  # rows not yet alone in their group
    while len(active):
        order = np.argsort(group[active], kind="stable")
        rows, keys = active[order], group[active][order]
        starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
        csum = np.zeros((len(rows) + 1, bits.shape[1]), np.int32)
        np.cumsum(bits[rows], axis=0, out=csum[1:])
        ends = np.r_[starts[1:], len(rows)]
        ones = (csum[ends] - csum[starts]).astype(np.int64)  # (groups, M) ones per group and value
        zeros = (ends - starts)[:, None] - ones
        pairs = (ones * (ones - 1) + zeros * (zeros - 1)).sum(axis=0)  # pairs still together after adding a value
        pairs[chosen] = np.iinfo(np.int64).max
        i = int(np.argmin(pairs))
        chosen.append(i)
        _, inverse, counts = np.unique(2 * group[active] + bits[active, i], return_inverse=True, return_counts=True)
        inverse = inverse.reshape(-1)
        group[active] = inverse
        active = active[counts[inverse] > 1]
    return np.array(sorted(chosen) or [0], np.int64)


def _argmax_nodes(p: str, scores: str, n_cols: int, opset: int) -> tuple[list[onnx.NodeProto], list[TensorProto]]:
    """Nodes writing ``p + "k1"`` (N, 1) int64, the first maximal column of (N, n_cols) ``scores``
    (n_cols a multiple of ``SELECT_BLOCK``): the max of each block of scores (one vectorised pass), the
    first block holding the row's max (ArgMax keeps the lower index on ties), then the first max inside
    it; as a TopK (k = 1) picks it, at a fraction of its cost (20 against 90 us on 256 x 512 scores)."""
    nodes = [
        helper.make_node("Reshape", [scores, p + "blocks"], [p + "s3"], name=p + "s3"),
        _reduce_max(p + "s3", 2, p + "block_max", 0, opset, p + "axis2"),
        helper.make_node("ArgMax", [p + "block_max"], [p + "kb"], axis=1, keepdims=1, name=p + "kb"),
        helper.make_node("GatherND", [p + "s3", p + "kb"], [p + "block"], batch_dims=1, name=p + "block"),
        helper.make_node("ArgMax", [p + "block"], [p + "ki"], axis=1, keepdims=1, name=p + "ki"),
        helper.make_node("Mul", [p + "kb", p + "block_size"], [p + "k0"], name=p + "k0"),
        helper.make_node("Add", [p + "k0", p + "ki"], [p + "k1"], name=p + "k1"),
    ]
    inits = [
        _init(p + "blocks", np.array([-1, n_cols // SELECT_BLOCK, SELECT_BLOCK], np.int64)),  # N = 0 too
        _init(p + "block_size", np.array(SELECT_BLOCK, np.int64)),
    ]
    if opset >= 18:
        inits.append(_init(p + "axis2", np.array([2], np.int64)))
    return nodes, inits


def _flatten_nodes(p: str, gated: Sequence[GatedTensor]) -> tuple[list[onnx.NodeProto], list[str]]:
    """Each gated tensor as (N, M_i) (a Flatten where it has more than one value axis)."""
    nodes, flat = [], []
    for i, g in enumerate(gated):
        z = g.name  # already (N, M_i)
        if len(g.shape) != 1:
            z = f"{p}flat{i}"
            nodes.append(helper.make_node("Flatten", [g.name], [z], axis=1, name=z))
        flat.append(z)
    return nodes, flat


def _concat_nodes(parts: list[str], name: str, axis: int = 1) -> tuple[list[onnx.NodeProto], str]:
    """``parts`` joined along ``axis`` as ``name``, or the one part itself (no node, no copy)."""
    if len(parts) == 1:
        return [], parts[0]
    return [helper.make_node("Concat", parts, [name], axis=axis, name=name)], name


def _quantize_nodes(prefix: str, p: str, z: str, sfx: str = "") -> tuple[list[onnx.NodeProto], str, str]:
    """Nodes reading gated values z (N, m) as the odd integers v: uint8 codes ``p + "va" + sfx`` (zero
    point 128) and their float32 values ``p + "vd" + sfx``."""
    va, vd = p + "va" + sfx, p + "vd" + sfx
    return [
        # floor(z / delta) >= 0 exactly where z >= 0: the activation as the ReLU sees it
        helper.make_node("Mul", [z, p + "inv_delta"], [p + "y" + sfx], name=p + "y" + sfx),
        helper.make_node("Floor", [p + "y" + sfx], [p + "fl" + sfx], name=p + "fl" + sfx),
        # codes 2 floor + 129 (saturating at 0 and 255): read with zero point 128, the odd v = 2 floor + 1
        helper.make_node("QuantizeLinear", [p + "fl" + sfx, prefix + "half_unit", prefix + "zp_odd"], [va], name=va),
        helper.make_node("DequantizeLinear", [va, prefix + "unit", prefix + "zp"], [vd], name=vd),
    ], va, vd


def _selection_nodes(prefix: str, p: str, va: str, select_in: str, n_cols: int, opset: int
                     ) -> tuple[list[onnx.NodeProto], list[TensorProto]]:
    """Stage 1: ``p + "k1"`` (N, 1), the first record maximising v_A . s_A, and the constant tables of the
    group (folded at load: (P, M) sign rows, the (|A|, P') selection table, -2 neg_w)."""
    nodes = [
        helper.make_node("Transpose", [p + "signs"], [p + "rows"], perm=[1, 0], name=p + "rows"),
        helper.make_node("Gather", [p + "signs", p + "select"], [p + "sel_cols"], axis=0, name=p + "sel_cols"),
        helper.make_node("Pad", [p + "sel_cols", p + "pad"], [p + "sel_table"], mode="edge", name=p + "sel_table"),
        helper.make_node("Mul", [p + "neg_w", prefix + "minus_two"], [p + "pos_w"], name=p + "pos_w"),
        # the codes at A, (N, |A|): a Gather along rows of the transposed codes (onnxruntime gathers
        # columns one byte at a time: 53 against 20 us for 22 of 384 values at batch 256)
        helper.make_node("Transpose", [va], [p + "va_t"], perm=[1, 0], name=p + "va_t"),
        helper.make_node("Gather", [p + "va_t", select_in], [p + "va_sel_t"], axis=0, name=p + "va_sel_t"),
        helper.make_node("Transpose", [p + "va_sel_t"], [p + "va_sel"], perm=[1, 0], name=p + "va_sel"),
        # v_A . s_k,A for every record, exact int32, and its first maximal column
        helper.make_node("MatMulInteger", [p + "va_sel", p + "sel_table", prefix + "zp"], [p + "sel"], name=p + "sel"),
    ]
    more_nodes, inits = _argmax_nodes(p, p + "sel", n_cols, opset)
    return nodes + more_nodes, inits


def _excess_nodes(prefix: str, p: str, rows: str, k: str, vd: str, axis: str, sfx: str = "") -> list[onnx.NodeProto]:
    """``p + "nex" + sfx`` = sum_i min(s_ki v_i, 0) = -excess_k / 2 over the last axis of ``vd`` (kept), for
    the records ``k`` and their sign rows in ``rows`` (P, m): integers, exact in float32 in any order."""
    n = lambda key: p + key + sfx  # noqa: E731
    return [
        helper.make_node("Gather", [rows, k], [n("srow8")], axis=0, name=n("srow8")),
        helper.make_node("Cast", [n("srow8")], [n("srow")], to=TensorProto.FLOAT, name=n("srow")),
        helper.make_node("Mul", [n("srow"), vd], [n("sv")], name=n("sv")),
        helper.make_node("Min", [n("sv"), prefix + "zero"], [n("miss")], name=n("miss")),
        helper.make_node("ReduceSum", [n("miss"), axis], [n("nex")], keepdims=1, name=n("nex")),
    ]


def _pre_nodes(prefix: str, p: str, nex: str, sfx: str = "") -> list[onnx.NodeProto]:
    """``p + "gpre" + sfx`` = 1 + neg_w excess, the gate before its clip: (-excess/2) (-2 neg_w) is the same
    real product as neg_w excess, so the same single float32 rounding."""
    return [
        helper.make_node("Mul", [nex, p + "pw"], [p + "score" + sfx], name=p + "score" + sfx),
        helper.make_node("Add", [p + "score" + sfx, prefix + "one"], [p + "gpre" + sfx], name=p + "gpre" + sfx),
    ]


def _own_gate_nodes(prefix: str, p: str, vd: str, k: str, pos_w: str, k_pw: str, axis: str, sfx: str, gate: str
                    ) -> list[onnx.NodeProto]:
    """The gate ``gate`` of the records ``k`` alone on the dequantized values ``vd``: -excess/2 summed over
    ``axis``, times -2 neg_w gathered from ``pos_w`` by ``k_pw`` (shaped like that sum), plus 1, clipped.
    Both forms of :func:`gate_nodes` use it, so their gates are the same float32 operations in the same order."""
    return [
        *_excess_nodes(prefix, p, p + "rows", k, vd, axis, sfx),
        helper.make_node("Gather", [pos_w, k_pw], [p + "pw"], axis=0, name=p + "pw"),
        *_pre_nodes(prefix, p, p + "nex" + sfx),
        helper.make_node("Clip", [p + "gpre", prefix + "zero", prefix + "one"], [gate], name=gate),
    ]


LOOKUP_BITS = 4  # sign bits per level of the lookup trie: 16-way nodes, tables of 16 (nodes + 1) entries


@dataclass(frozen=True)
class LookupTables:
    """A trie over the records' signs on the selection values A, read ``LOOKUP_BITS`` at a time.

    ``weights[j, l]`` = 2^(j mod LOOKUP_BITS) where A's j-th value is in level l's chunk: a (|A|, L) float32
    MatMul of the input's 0/1 signs on A gives each level's chunk code (exact integers < 16). Node 0 of
    every level is the sink (no record has this prefix), node 1 of level 0 the root. ``levels[l]``
    (int32, 16 (nodes_l + 1) entries) maps node * 16 + code to the next level's node * 16, and the last
    one maps to record + 1 (0: no record has these signs); ``records`` maps the same last index to the
    record itself (0 where none). Records with equal signs on A have equal whole patterns (A separates
    distinct patterns), and the first of them is stored: exactly the record the product form selects."""

    weights: np.ndarray
    levels: tuple[np.ndarray, ...]
    records: np.ndarray

    @property
    def size(self) -> int:
        """Table entries in all: what a device holds in memory for the lookup (4 bytes each, 8 for ``records``)."""
        return sum(t.size for t in self.levels) + self.records.size


def lookup_tables(signs: np.ndarray, select: np.ndarray) -> LookupTables:
    """:class:`LookupTables` of the records' ``signs`` on ``select`` (a function of the signs: a device
    builds them from the parameters it verified)."""
    bits = (np.asarray(signs)[:, select] > 0).astype(np.int64)
    p, a = bits.shape
    w = LOOKUP_BITS
    n_levels = -(-a // w)
    padded = np.zeros((p, n_levels * w), np.int64)
    padded[:, :a] = bits
    chunks = (padded.reshape(p, n_levels, w) << np.arange(w)).sum(axis=2)  # (P, L) codes < 2^w
    weights = np.zeros((a, n_levels), np.float32)
    weights[np.arange(a), np.arange(a) // w] = 2.0 ** (np.arange(a) % w)
    node, n_nodes, levels = np.ones(p, np.int64), 2, []  # every record starts at the root, node 1
    for level in range(n_levels):
        key = (node << w) + chunks[:, level]
        table = np.zeros(n_nodes << w, np.int64)
        if level < n_levels - 1:
            prefixes, inverse = np.unique(key, return_inverse=True)
            table[prefixes] = (1 + np.arange(len(prefixes))) << w  # next nodes 1.. (0 is the sink)
            node, n_nodes = 1 + inverse.reshape(-1), len(prefixes) + 1
            levels.append(table.astype(np.int32))
        else:
            first = np.unique(key, return_index=True)[1]  # the first record of each pattern on A
            table[key[first]] = first + 1
            levels.append(table.astype(np.int32))
            records = np.maximum(table - 1, 0)
    return LookupTables(weights, tuple(levels), records)


def _lookup_nodes(prefix: str, p: str, flat: list[str], sizes: list[int], select: np.ndarray,
                  tables: LookupTables, opset: int) -> tuple[list[onnx.NodeProto], list[TensorProto]]:
    """Nodes writing ``p + "hit"`` (N,) int32, record + 1 of the first record whose signs on ``select``
    are the input's (0: none), and ``p + "k1"`` (N, 1) int64, that record (0 where none): the signs on A
    as each level's chunk code (one MatMul per gated tensor A touches, over the span of A in it), then
    one Gather per level. The sign of v = 2 floor(z / delta) + 1 is [z / delta >= 0] (floor keeps the
    sign, -0 included), so the lookup reads exactly the signs the product form scores."""
    nodes, inits, partial, at = [], [], [], 0
    for i, (z, size) in enumerate(zip(flat, sizes)):
        mine = np.flatnonzero((select >= at) & (select < at + size))
        if len(mine):
            lo, hi = int(select[mine[0]]) - at, int(select[mine[-1]]) - at + 1
            weights = np.zeros((hi - lo, tables.weights.shape[1]), np.float32)
            weights[select[mine] - at - lo] = tables.weights[mine]
            n = lambda key: f"{p}{key}{i}"  # noqa: E731
            nodes += [
                helper.make_node("Slice", [z, n("a_from"), n("a_to"), prefix + "axis1"], [n("za")], name=n("za")),
                helper.make_node("Mul", [n("za"), p + "inv_delta"], [n("ya")], name=n("ya")),
                helper.make_node("GreaterOrEqual", [n("ya"), prefix + "zero"], [n("on")], name=n("on")),
                helper.make_node("Cast", [n("on")], [n("onf")], to=TensorProto.FLOAT, name=n("onf")),
                helper.make_node("MatMul", [n("onf"), n("a_w")], [n("cf")], name=n("cf")),
            ]
            inits += [_init(n("a_from"), np.array([lo], np.int64)), _init(n("a_to"), np.array([hi], np.int64)),
                      _init(n("a_w"), weights)]
            partial.append(n("cf"))
        at += size
    codes = partial[0]
    for j, more in enumerate(partial[1:]):  # chunk codes of values in different tensors add up (exact)
        nodes.append(helper.make_node("Add", [codes, more], [f"{p}cf_sum{j}"], name=f"{p}cf_sum{j}"))
        codes = f"{p}cf_sum{j}"
    n_levels = len(tables.levels)
    nodes.append(helper.make_node("Cast", [codes], [p + "codes"], to=TensorProto.INT32, name=p + "codes"))
    chunk = [f"{p}c{level}" for level in range(n_levels)]
    if n_levels == 1:
        chunk = [p + "codes"]
    elif opset >= 18:
        nodes.append(helper.make_node("Split", [p + "codes"], chunk, axis=1, num_outputs=n_levels, name=p + "split"))
    else:
        nodes.append(helper.make_node("Split", [p + "codes"], chunk, axis=1, name=p + "split"))
    index = p + "i0"
    nodes.append(helper.make_node("Add", [chunk[0], p + "root"], [index], name=index))
    inits.append(_init(p + "root", np.array([1 << LOOKUP_BITS], np.int32)))
    for level, table in enumerate(tables.levels):
        out = f"{p}n{level}"
        nodes.append(helper.make_node("Gather", [f"{p}trie{level}", index], [out], axis=0, name=out))
        inits.append(_init(f"{p}trie{level}", table))
        if level < n_levels - 1:
            index = f"{p}i{level + 1}"
            nodes.append(helper.make_node("Add", [out, chunk[level + 1]], [index], name=index))
    nodes += [
        helper.make_node("Gather", [p + "trie_k", index], [p + "k1"], axis=0, name=p + "k1"),
        helper.make_node("Squeeze", [f"{p}n{n_levels - 1}", prefix + "axis1"], [p + "hit"], name=p + "hit"),
    ]
    inits.append(_init(p + "trie_k", tables.records))
    return nodes, inits


def _matched_gate_nodes(prefix: str, p: str, flat: list[str], gate: str) -> list[onnx.NodeProto]:
    """The exact gate of the looked-up record, computed only for the inputs that have one (NonZero of
    ``p + "hit"``, a Gather of their rows, quantized and summed as the product form does it, the same
    float32 operations in the same order), scattered into zeros: ``gate`` (N, 1)."""
    gathered = [f"{p}zc{i}" for i in range(len(flat))]
    c_nodes, zc = _concat_nodes(gathered, p + "zc", axis=2)
    q_nodes, _, vd_c = _quantize_nodes(prefix, p, zc, "_c")
    return [
        helper.make_node("NonZero", [p + "hit"], [p + "nz"], name=p + "nz"),  # (1, n) inputs with a record
        helper.make_node("Unsqueeze", [p + "nz", prefix + "axis2"], [p + "idx"], name=p + "idx"),
        helper.make_node("Gather", [p + "k", p + "nz"], [p + "kc"], axis=0, name=p + "kc"),
        *[helper.make_node("Gather", [z, p + "nz"], [name], axis=0, name=name) for z, name in zip(flat, gathered)],
        *c_nodes,
        *q_nodes,
        *_own_gate_nodes(prefix, p, vd_c, p + "kc", p + "pos_w1", p + "kc", prefix + "axis2", "_c", p + "gate_c"),  # (1, n, 1)
        helper.make_node("Shape", [p + "k1"], [p + "nshape"], name=p + "nshape"),
        helper.make_node("ConstantOfShape", [p + "nshape"], [p + "closed"], value=helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0]),
                         name=p + "closed"),
        helper.make_node("ScatterND", [p + "closed", p + "idx", p + "gate_c"], [gate], name=gate),
    ]


def _match_nodes(prefix: str, p: str, n_blocks: int, opset: int) -> list[onnx.NodeProto]:
    """``p + "match"`` (N, 1) bool: the selected record's signs on A are the input's, i.e. its score
    v_A . s_A reaches |v_A|_1 (integers below 2^24: exact in float32). The maximal score is the maximum
    of the block maxima (with one block, that block's maximum itself)."""
    top = p + "block_max"
    nodes = []
    if n_blocks > 1:
        top = p + "sel_max"
        nodes.append(_reduce_max(p + "block_max", 1, top, 1, opset, prefix + "axis1"))
    return nodes + [
        helper.make_node("Cast", [top], [p + "sel_maxf"], to=TensorProto.FLOAT, name=p + "sel_maxf"),
        helper.make_node("DequantizeLinear", [p + "va_sel", prefix + "unit", prefix + "zp"], [p + "vd_sel"], name=p + "vd_sel"),
        _reduce_l1(p + "vd_sel", p + "l1_sel", opset, prefix + "axis1"),
        helper.make_node("Equal", [p + "sel_maxf", p + "l1_sel"], [p + "match"], name=p + "match"),
    ]


def gate_nodes(prefix: str, groups: Sequence[GateGroup], opset: int, packed: bool = False, screen: bool = True
               ) -> tuple[list[onnx.NodeProto], list[TensorProto], str, str]:
    """Nodes writing the acting record's gate ``prefix + "gate_max"`` (N, 1) and its index
    ``prefix + "k"`` (N,) int64 among every record of every group, in group order.

    What they compute (format 8), per group with gated values z (N, M) and selection values A
    (:func:`selection_neurons`, inside :func:`screen_window`): the odd integers v = 2 floor(z / delta) + 1,
    saturated to int8 (one QuantizeLinear with scale 1/2 and zero point 129 writes them as uint8 codes,
    read back with zero point 128); k = the first record whose signs on A are the input's; where there
    is one, its exact gate ``clip(1 - gamma_k delta/4 excess_k, 0, 1)`` with ``-excess_k / 2 =
    sum_i min(s_ki v_i, 0)`` in float32 (integers below 2^24: exact in any order); where none, gate 0
    and k = 0. Two forms compute it, output for output the same:
    - *product* (the patch file's canonical graph, ``packed`` or ``screen=False``): every input's codes
      at A times the records' signs there in one uint8 x int8 MatMulInteger (weights +-1: exact int32 on
      every kernel, an int16 pair is at most 2 x 255), k = the first maximal column (:func:`_argmax_nodes`;
      the row padded to a multiple of ``SELECT_BLOCK`` with copies of the last record's column), its gate
      on every input, kept where the maximal score is |v_A|_1 (:func:`_match_nodes`). Its tables follow
      from the signs by constant nodes (``packed``: unpacked from bits), so the file carries no more.
    - *lookup* (what a device composes, ``screen=True``): the signs on A as chunk codes, one Gather per
      level of a trie built from the verified signs (:func:`lookup_tables`, :func:`_lookup_nodes`), and
      the exact gate only for the inputs that have a record (:func:`_matched_gate_nodes`: about 3% of
      the MNIST test images under a 500-record patch). No (N, P) product and no pass over every input's
      M values: the patch costs about a tenth of the base at batch 256 where the product form cost 0.4.
    Why it is sound: on record k's region the input's signs are k's everywhere, on A too, so k or an
    earlier record with k's very pattern (A separates distinct patterns) acts, with excess 0: gate 1.
    Elsewhere the acting gate is the looked-up record's exact gate or 0, so an output changes only where
    some record's gate is open. With several groups (records gating on other tensors or another step),
    each group finds its record this way and the most open of those acts (first group on ties)."""
    nodes: list[onnx.NodeProto] = []
    inits: list[TensorProto] = [
        _init(prefix + "zp", np.array(QUANT_ZERO_POINT, np.uint8)),
        _init(prefix + "one", np.array([1.0], np.float32)),
        _init(prefix + "zero", np.array([0.0], np.float32)),
        _init(prefix + "minus_two", np.array(-2.0, np.float32)),
        _init(prefix + "half_unit", np.array(0.5, np.float32)),
        _init(prefix + "zp_odd", np.array(QUANT_ZERO_POINT + 1, np.uint8)),
        _init(prefix + "unit", np.array(1.0, np.float32)),
        _init(prefix + "axis1", np.array([1], np.int64)),
    ]
    lookup = screen and not packed
    if lookup:
        inits.append(_init(prefix + "axis2", np.array([2], np.int64)))
    single = len(groups) == 1
    gates, ks = [], []
    for gi, group in enumerate(groups):
        p = f"{prefix}g{gi}_"
        n_rec = int(group.signs.shape[0])
        gate = prefix + "gate_max" if single else p + "gate"
        select = selection_neurons(group.signs)
        f_nodes, flat = _flatten_nodes(p, group.gated)
        nodes += f_nodes
        inits.append(_init(p + "inv_delta", np.array(2.0 ** -group.scale_log2, np.float32)))  # exact: a power of two
        if lookup:
            l_nodes, l_inits = _lookup_nodes(prefix, p, flat, [g.size for g in group.gated], select,
                                             lookup_tables(group.signs, select), opset)
            nodes += l_nodes
            nodes.append(helper.make_node("Squeeze", [p + "k1", prefix + "axis1"], [p + "k"], name=p + "k"))
            nodes += _matched_gate_nodes(prefix, p, flat, gate)
            inits += l_inits + [
                _init(p + "rows", np.ascontiguousarray(group.signs)),  # (P, M) int8
                _init(p + "pos_w1", (neg_weight(group.gamma, 2.0**group.scale_log2) * np.float32(-2.0)).reshape(-1, 1)),
            ]
        else:
            pad = -n_rec % SELECT_BLOCK
            c_nodes, z = _concat_nodes(flat, p + "z")
            q_nodes, va, vd = _quantize_nodes(prefix, p, z)
            s_nodes, s_inits = _selection_nodes(prefix, p, va, p + "select", n_rec + pad, opset)
            nodes += c_nodes + q_nodes + s_nodes
            nodes.append(helper.make_node("Squeeze", [p + "k1", prefix + "axis1"], [p + "k"], name=p + "k"))
            nodes += _own_gate_nodes(prefix, p, vd, p + "k", p + "pos_w", p + "k1", prefix + "axis1", "", p + "gate_any")
            nodes += _match_nodes(prefix, p, (n_rec + pad) // SELECT_BLOCK, opset)
            nodes.append(helper.make_node("Where", [p + "match", p + "gate_any", prefix + "zero"], [gate], name=gate))
            inits += s_inits
            if packed:
                more_nodes, more_inits = _unpack_nodes(p, pack_signs(group.signs), n_rec)
                nodes, inits = more_nodes + nodes, inits + more_inits
            else:
                inits.append(_init(p + "signs", np.ascontiguousarray(group.signs.T)))  # (M, P) int8
            inits += [
                _init(p + "neg_w", neg_weight(group.gamma, 2.0**group.scale_log2)),
                _init(p + "select", select),
                _init(p + "pad", np.array([0, 0, 0, pad], np.int64)),
            ]
        gates.append(gate)
        ks.append(p + "k1")
    if single:
        nodes.append(helper.make_node("Squeeze", [ks[0], prefix + "axis1"], [prefix + "k"], name=prefix + "k"))
        return nodes, inits, prefix + "gate_max", prefix + "k"
    # several groups: the most open of their chosen records, the first group on ties
    offsets = np.cumsum([0] + [int(g.signs.shape[0]) for g in groups[:-1]])
    nodes += [helper.make_node("Concat", gates, [prefix + "gates"], axis=1, name=prefix + "gates"),
              helper.make_node("ArgMax", [prefix + "gates"], [prefix + "gsel"], axis=1, keepdims=1, name=prefix + "gsel"),
              _reduce_max(prefix + "gates", 1, prefix + "gate_max", 1, opset, prefix + "axis1")]
    ks_global = []
    for gi, k in enumerate(ks):
        name = f"{prefix}g{gi}_kg"
        nodes.append(helper.make_node("Add", [k, f"{prefix}g{gi}_offset"], [name], name=name))
        inits.append(_init(f"{prefix}g{gi}_offset", np.array(offsets[gi], np.int64)))
        ks_global.append(name)
    nodes += [helper.make_node("Concat", ks_global, [prefix + "ks"], axis=1, name=prefix + "ks"),
              helper.make_node("GatherElements", [prefix + "ks", prefix + "gsel"], [prefix + "k1"], axis=1, name=prefix + "k1"),
              helper.make_node("Squeeze", [prefix + "k1", prefix + "axis1"], [prefix + "k"], name=prefix + "k")]
    return nodes, inits, prefix + "gate_max", prefix + "k"


def _reduce_l1(x: str, out: str, opset: int, axes_name: str) -> onnx.NodeProto:
    """ReduceL1 over axis 1, kept: its axes are an attribute before opset 18, an input from it on."""
    if opset < 18:
        return helper.make_node("ReduceL1", [x], [out], axes=[1], keepdims=1, name=out)
    return helper.make_node("ReduceL1", [x, axes_name], [out], keepdims=1, name=out)


def _reduce_max(x: str, axis: int, out: str, keepdims: int, opset: int, axes_name: str) -> onnx.NodeProto:
    """ReduceMax over one axis: its axes are an attribute before opset 18, an input from it on."""
    if opset < 18:
        return helper.make_node("ReduceMax", [x], [out], axes=[axis], keepdims=keepdims, name=out)
    return helper.make_node("ReduceMax", [x, axes_name], [out], keepdims=keepdims, name=out)


def t16_exact(t: np.ndarray) -> bool:
    """Whether a t table is stored as float16: exactly when every value is a float16 (a prune patch's
    t sits on a 2^-4 grid with |t| < 2^7, exporters.patch_export.T_GRID_LOG2). The choice is a function
    of the values, so the device's canonical rebuild makes the same one; the Cast to float32 has a
    constant input and onnxruntime folds it at session creation, so inference runs the same float32
    table either way."""
    t = np.asarray(t, np.float32)
    with np.errstate(over="ignore"):
        return bool(t.size) and bool(np.array_equal(t.astype(np.float16).astype(np.float32), t))


def correction_nodes(
    prefix: str, gate: str, k: str, logits_name: str, T: np.ndarray, t: np.ndarray, form: str, out_name: str
) -> tuple[list[onnx.NodeProto], list[TensorProto]]:
    """Nodes for ``out = f + g (T_k f + t_k)`` with the acting record k (N,) and its gate g (N, 1) of
    :func:`gate_nodes`: one record's tables gathered per input, never a product over all records."""
    if form not in FORMS:
        raise ValueError(f"form: expected one of {FORMS}, found {form!r}")
    n = lambda key: prefix + key  # noqa: E731
    nodes = [helper.make_node("Gather", [n("t_table"), k], [n("tk")], axis=0, name=n("tk"))]
    inits: list[TensorProto] = []
    t32 = np.asarray(t, np.float32)
    if t16_exact(t32):  # half the bytes; a Cast of a constant, folded when the session is created
        nodes.insert(0, helper.make_node("Cast", [n("t_table16")], [n("t_table")], to=TensorProto.FLOAT, name=n("t_table")))
        inits.append(_init(n("t_table16"), t32.astype(np.float16)))
    else:
        inits.append(_init(n("t_table"), t32))
    if form == "shift":
        delta_name = n("tk")
    elif form == "collapse":
        # f + g (t - f): with g = 0 this is f + 0, the base logits bit for bit
        nodes.append(helper.make_node("Sub", [n("tk"), logits_name], [n("dk")], name=n("dk")))
        delta_name = n("dk")
    else:
        nodes += [
            helper.make_node("Gather", [n("T_table"), k], [n("Tk")], axis=0, name=n("Tk")),
            helper.make_node("Unsqueeze", [logits_name, n("axis2_c")], [n("f3")], name=n("f3")),
            helper.make_node("MatMul", [n("Tk"), n("f3")], [n("Tf3")], name=n("Tf3")),
            helper.make_node("Squeeze", [n("Tf3"), n("axis2_c")], [n("Tf")], name=n("Tf")),
            helper.make_node("Add", [n("Tf"), n("tk")], [n("dk")], name=n("dk")),
        ]
        inits += [_init(n("T_table"), np.asarray(T, np.float32)), _init(n("axis2_c"), np.array([2], np.int64))]
        delta_name = n("dk")
    nodes += [
        helper.make_node("Mul", [delta_name, gate], [n("corr")], name=n("corr")),
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
    lookup: bool = False,
) -> onnx.ModelProto:
    """The canonical patch graph for these parameters (deterministic: same inputs, same bytes): the
    product form of :func:`gate_nodes`, its sign table stored as bits. ``lookup=True`` builds the lookup
    form a device composes instead (the same outputs): not the canonical graph, so a device refuses it
    in a file."""
    if opset < MIN_OPSET:
        raise ValueError(f"patch graphs need opset >= {MIN_OPSET}, the base has {opset}")
    group = GateGroup(tuple(gated), params.signs, params.gamma, params.scale_log2)
    _check_sizes([group])
    nodes, inits, gate, k = gate_nodes(PREFIX, [group], opset, packed=not lookup, screen=lookup)
    more_nodes, more_inits = correction_nodes(PREFIX, gate, k, logits_name, params.T, params.t, form, OUTPUT_NAME)
    c = params.n_classes
    inputs = [helper.make_tensor_value_info(g.name, TensorProto.FLOAT, [BATCH_DIM, *g.shape]) for g in gated]
    inputs.append(helper.make_tensor_value_info(logits_name, TensorProto.FLOAT, [BATCH_DIM, c]))
    outputs = [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, [BATCH_DIM, c])]
    graph = helper.make_graph(nodes + more_nodes, PREFIX + "graph", inputs, outputs, inits + more_inits)
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset)], producer_name=PRODUCER, ir_version=ir_version
    )


def _read_init(inits: dict[str, TensorProto], key: str, dtype: int, shape: tuple[int, ...]) -> np.ndarray:
    """A received initializer by its canonical name, inline, of exactly this dtype and shape."""
    tensor = inits.get(key)
    if tensor is None:
        raise StructureError(f"patch graph: expected initializer {key!r}, found none")
    if tensor.data_location == TensorProto.EXTERNAL:
        raise StructureError(f"patch graph: initializer {key!r} uses external data; expected inline")
    if tensor.data_type != dtype or tuple(tensor.dims) != shape:
        raise StructureError(
            f"patch graph: initializer {key!r} expected dtype {TensorProto.DataType.Name(dtype)} shape "
            f"{shape}, found {TensorProto.DataType.Name(tensor.data_type)} {tuple(tensor.dims)}"
        )
    return numpy_helper.to_array(tensor)


def extract_params(model: onnx.ModelProto, n_records: int, gated_size: int, n_classes: int, form: str) -> PatchParams:
    """Read the parameters of a received graph by their canonical names; shapes and dtypes must fit."""
    g0 = PREFIX + "g0_"
    inits = {t.name: t for t in model.graph.initializer}
    expected = {
        g0 + "signs_packed": (TensorProto.UINT8, (gated_size, (n_records + 7) // 8)),
        g0 + "neg_w": (TensorProto.FLOAT, (n_records,)),
        g0 + "inv_delta": (TensorProto.FLOAT, ()),
    }
    if PREFIX + "t_table16" in inits:  # see t16_exact
        expected[PREFIX + "t_table16"] = (TensorProto.FLOAT16, (n_records, n_classes))
    else:
        expected[PREFIX + "t_table"] = (TensorProto.FLOAT, (n_records, n_classes))
    if form == "affine":
        expected[PREFIX + "T_table"] = (TensorProto.FLOAT, (n_records, n_classes, n_classes))
    arrays = {key: _read_init(inits, key, dtype, shape) for key, (dtype, shape) in expected.items()}
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
    packed = arrays[g0 + "signs_packed"]
    pad = np.unpackbits(packed, axis=1)[:, n_records:]
    if pad.any():  # the canonical graph would differ too; named here for a clearer refusal
        raise StructureError(f"patch graph: sign padding bits expected 0, found {int(pad.sum())} set")
    signs = unpack_signs(packed, n_records)
    c = n_classes
    if form == "affine":
        T = arrays[PREFIX + "T_table"]
    elif form == "shift":
        T = np.zeros((n_records, c, c), np.float32)
    else:
        T = np.broadcast_to(-np.eye(c, dtype=np.float32), (n_records, c, c))
    t = arrays[PREFIX + "t_table16"].astype(np.float32) if PREFIX + "t_table16" in arrays else arrays[PREFIX + "t_table"]
    return PatchParams(signs=signs, gamma=gamma, T=T, t=t, scale_log2=scale_log2)


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
#
# The affine form lets the margin follow the input (a model that never saw K is more or less sure
# against K depending on the image; a constant margin gives every unseen image of K the same loss):
#
#     m_K(x) = max(m_min_K, w_K . clip(f, -2^64, 2^64) + b_K)        Clip, MatMul, Add, Max, Gather
#
# and cap_K uses m_K(x) in place of margin_K. Why it keeps the guarantee: with finite logits the
# clipped f is finite and |w_K . clip(f) + b_K| <= C max|w| 2^64 + max|b|, which verify demands stay
# below 2^126 (policy caps |w| and |b|), so every partial sum is finite, never NaN, in any summation
# order; Max is exact, so m_K(x) >= m_min_K > 0, and rounding is monotone, so the subtrahend is at
# least the constant form's: cap_K is at most the constant form's cap, strictly below mo. The clip
# only feeds the margin (logits past 2^64 get the margin of a logit at 2^64, still >= m_min).
SUPPRESS_FORM = "suppress"
SUPPRESS_PREFIX = PREFIX + "s_"
SUPPRESS_REL_SLACK = np.float32(2.0**-22)
SUPPRESS_INPUT_CLIP = np.float32(2.0**64)  # the margin's inputs, |f| clipped here: w . f stays finite
SUPPRESS_MARGIN_BOUND = 2.0**126  # C max|w| clip + max|b| must stay below it (verify): no overflow


@dataclass
class SuppressParams:
    """The numbers a suppression graph carries: the suppressed classes and each one's margin, and for
    the affine form each one's weights and bias (``margin`` is then the floor m_min of m_K(x)).

    In a single patch the classes are distinct; a device's merged suppression (:func:`merge_suppressions`)
    may list a class once per patch that suppresses it (its margin is then the largest of them)."""

    classes: np.ndarray  # int64 (S,), sorted
    margin: np.ndarray  # float32 (S,): the constant margin, or the affine form's floor m_min
    weights: np.ndarray | None = None  # float32 (S, C): affine form only
    bias: np.ndarray | None = None  # float32 (S,): affine form only

    def __post_init__(self) -> None:
        self.classes = np.ascontiguousarray(self.classes, dtype=np.int64).reshape(-1)
        self.margin = np.ascontiguousarray(self.margin, dtype=np.float32).reshape(-1)
        if self.classes.shape != self.margin.shape:
            raise ValueError(f"suppression: {len(self.classes)} classes but {len(self.margin)} margins")
        if (self.weights is None) != (self.bias is None):
            raise ValueError("suppression: expected both affine weights and bias, or neither")
        if self.weights is not None:
            self.weights = np.ascontiguousarray(self.weights, dtype=np.float32)
            self.bias = np.ascontiguousarray(self.bias, dtype=np.float32).reshape(-1)
            if self.weights.ndim != 2 or self.weights.shape[0] != len(self.classes) or self.bias.shape != self.classes.shape:
                raise ValueError(f"suppression: affine weights (S, C) and bias (S,) expected for S = {len(self.classes)}, "
                                 f"found {self.weights.shape} and {self.bias.shape}")

    @property
    def affine(self) -> bool:
        return self.weights is not None

    def tables(self, n_classes: int, repeats: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(keep indices, class mask, per-class margin) as the graph stores them; ValueError when the
        classes are not distinct (unless ``repeats``), sorted, in range, or leave no class to predict."""
        c = self.classes
        step_bad = (np.diff(c) < 0).any() if repeats else (np.diff(c) <= 0).any()
        if not len(c) or step_bad or c[0] < 0 or c[-1] >= n_classes or len(np.unique(c)) >= n_classes:
            raise ValueError(f"suppressed classes expected sorted, distinct, in [0, {n_classes}) and fewer than "
                             f"{n_classes}, found {c.tolist()}")
        if self.affine and self.weights.shape[1] != n_classes:
            raise ValueError(f"suppression: affine weights expected {n_classes} columns, found {self.weights.shape[1]}")
        mask = np.zeros(n_classes, bool)
        mask[c] = True
        margin = np.zeros(n_classes, np.float32)
        margin[c] = self.margin
        return np.flatnonzero(~mask).astype(np.int64), mask, margin

    def term_indices(self, n_classes: int) -> list[np.ndarray]:
        """Per depth r, (C,) int64: the column of class K's r-th margin term (its last one past its
        count; 0 for a class not suppressed, whose value Where discards). Depth 1 in a single patch."""
        depth = int(np.bincount(self.classes, minlength=n_classes).max(initial=1))
        out = []
        for r in range(depth):
            idx = np.zeros(n_classes, np.int64)
            for k in np.unique(self.classes):
                cols = np.flatnonzero(self.classes == k)
                idx[k] = cols[min(r, len(cols) - 1)]
            out.append(idx)
        return out

    def margins_at(self, logits: np.ndarray) -> np.ndarray:
        """(N, S) the margin of each term on these logits, in float64 (the server's view of the graph)."""
        f = np.asarray(logits, np.float64)
        if not self.affine:
            return np.broadcast_to(self.margin.astype(np.float64), (len(f), len(self.classes)))
        lim = float(SUPPRESS_INPUT_CLIP)
        lin = np.clip(f, -lim, lim) @ self.weights.astype(np.float64).T + self.bias.astype(np.float64)
        return np.maximum(lin, self.margin.astype(np.float64))


def merge_suppressions(params: Sequence[SuppressParams]) -> SuppressParams:
    """One suppression equal to applying all of them: the union of classes, each at its largest margin
    (``min(f, mo - a, mo - b) = min(f, mo - max(a, b))``; mo is over the classes no patch suppresses).
    Constant margins merge into one number per class; once any is affine, every patch's class keeps its
    own term (a constant margin m is the term w = 0, b = 0, floor m) and the graph takes their maximum."""
    if not any(p.affine for p in params):
        best: dict[int, float] = {}
        for p in params:
            for k, m in zip(p.classes.tolist(), p.margin.tolist()):
                best[k] = max(best.get(k, -np.inf), m)
        keys = sorted(best)
        return SuppressParams(np.array(keys, np.int64), np.array([best[k] for k in keys], np.float32))
    c = next(p.weights.shape[1] for p in params if p.affine)
    terms = []
    for p in params:
        w = p.weights if p.affine else np.zeros((len(p.classes), c), np.float32)
        b = p.bias if p.affine else np.zeros(len(p.classes), np.float32)
        terms += [(int(k), float(m), w[i], float(b[i])) for i, (k, m) in enumerate(zip(p.classes.tolist(), p.margin.tolist()))]
    terms.sort(key=lambda t: t[0])  # stable: patch order within a class
    return SuppressParams(np.array([t[0] for t in terms], np.int64), np.array([t[1] for t in terms], np.float32),
                          np.stack([t[2] for t in terms]), np.array([t[3] for t in terms], np.float32))


def suppress_nodes(prefix: str, logits_in: str, params: SuppressParams, n_classes: int, out_name: str,
                   repeats: bool = False) -> tuple[list[onnx.NodeProto], list[TensorProto]]:
    """Nodes writing ``out_name`` = ``logits_in`` with every suppressed class capped below the best
    other class (see the block comment above). ``repeats``: a merged suppression, several terms per class."""
    keep, mask, margin = params.tables(n_classes, repeats)
    n = lambda key: prefix + key  # noqa: E731
    nodes = [
        helper.make_node("Gather", [logits_in, n("keep")], [n("kept")], axis=1, name=n("kept")),
        helper.make_node("TopK", [n("kept"), n("top1")], [n("mo"), n("mo_k")], axis=1, largest=1, sorted=1, name=n("mo")),
        helper.make_node("Abs", [n("mo")], [n("mo_abs")], name=n("mo_abs")),
        helper.make_node("Mul", [n("mo_abs"), n("rel")], [n("slack")], name=n("slack")),
    ]
    inits = [
        _init(n("keep"), keep),
        _init(n("top1"), np.array([1], np.int64)),
        _init(n("rel"), np.array(SUPPRESS_REL_SLACK, np.float32)),
    ]
    if params.affine:
        # m(x) = max(m_min, w . clip(f) + b) per term (N, T), then per class the max over its terms (N, C)
        nodes += [
            helper.make_node("Clip", [logits_in, n("clip_lo"), n("clip_hi")], [n("fc")], name=n("fc")),
            helper.make_node("MatMul", [n("fc"), n("weights")], [n("lin")], name=n("lin")),
            helper.make_node("Add", [n("lin"), n("bias")], [n("aff")], name=n("aff")),
            helper.make_node("Max", [n("aff"), n("floor")], [n("mt")], name=n("mt")),
        ]
        inits += [
            _init(n("clip_lo"), np.array(-SUPPRESS_INPUT_CLIP, np.float32)),
            _init(n("clip_hi"), np.array(SUPPRESS_INPUT_CLIP, np.float32)),
            _init(n("weights"), np.ascontiguousarray(params.weights.T)),  # (C, T): the MatMul operand
            _init(n("bias"), params.bias),
            _init(n("floor"), params.margin),
        ]
        m = None
        for r, idx in enumerate(params.term_indices(n_classes)):
            nodes.append(helper.make_node("Gather", [n("mt"), n(f"term{r}")], [n(f"m{r}")], axis=1, name=n(f"m{r}")))
            inits.append(_init(n(f"term{r}"), idx))
            if m is not None:
                nodes.append(helper.make_node("Max", [m, n(f"m{r}")], [n(f"mx{r}")], name=n(f"mx{r}")))
            m = n(f"mx{r}") if r else n(f"m{r}")
        margin_name = m
    else:
        inits.append(_init(n("margin"), margin))
        margin_name = n("margin")
    nodes += [
        helper.make_node("Add", [n("slack"), margin_name], [n("drop")], name=n("drop")),
        helper.make_node("Sub", [n("mo"), n("drop")], [n("cap")], name=n("cap")),
        helper.make_node("Min", [logits_in, n("cap")], [n("low")], name=n("low")),
        # the other logits are logits_in itself, picked by the mask: untouched bit for bit
        helper.make_node("Where", [n("mask"), n("low"), logits_in], [out_name], name=out_name),
    ]
    inits.append(_init(n("mask"), mask))
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
    """The classes and margins a received suppression graph carries (its mask and margin tables, and
    for the affine form its weights, bias and floor); the canonical rebuild checks everything else."""
    inits = {t.name: t for t in model.graph.initializer}
    mask = _read_init(inits, SUPPRESS_PREFIX + "mask", TensorProto.BOOL, (n_classes,))
    classes = np.flatnonzero(mask).astype(np.int64)
    if SUPPRESS_PREFIX + "weights" not in inits:
        margin = _read_init(inits, SUPPRESS_PREFIX + "margin", TensorProto.FLOAT, (n_classes,))
        return SuppressParams(classes, margin[classes])
    s = len(classes)
    weights = _read_init(inits, SUPPRESS_PREFIX + "weights", TensorProto.FLOAT, (n_classes, s))
    bias = _read_init(inits, SUPPRESS_PREFIX + "bias", TensorProto.FLOAT, (s,))
    floor = _read_init(inits, SUPPRESS_PREFIX + "floor", TensorProto.FLOAT, (s,))
    return SuppressParams(classes, floor, weights.T, bias)
