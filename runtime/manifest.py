"""The patch manifest: a strict, versioned JSON document validated before anything else is read.

Layout of ``manifest.json`` inside a patch file (TUF style, signature slot from day one)::

    {"signed": {...the fields of Manifest...}, "signatures": []}

The bytes that a signature covers are :func:`canonical_bytes` of ``signed`` (sorted keys, fixed
separators, ASCII), so re-serialising a manifest never changes what was signed.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

from .errors import PatchFormatError

FORMAT_NAME = "prune-edge-patch"
# 8: the acting record is the first whose signs on the selection values are the input's, else none (gate
#    0): devices find it by a lookup trie and compute its gate only where there is one (patchgraph.gate_nodes);
# 7: the gate first quantizes and bounds on a window of the gated values (patchgraph.screen_window) and
#    computes the exact gate only where that bound is open; the selection values lie in the window;
# 6: the gate selects its record in two stages (patchgraph.gate_nodes: a product over the few values
#    that tell the records' patterns apart, then the chosen record's exact gate), no |v|_1 in a product;
# 5: the gate's |v|_1 enters the integer product in chunks of 64, not 128 (patchgraph.L1_BASE: exact on
#    x86 kernels that add pairs of uint8 x int8 products in saturating int16);
# 4: one Merkle root of salted id commitments per request (runtime.merkle), no beta / mean shift in
#    records (the device reads the shift from the graph's t), bit-packed signs in the graph;
# 3: exact-pattern gates, one record acts per input, gate step and chain in the manifest, patch id =
#    hash of the content; 2: int8 gates summed over records; 1: float32 gates.
FORMAT_VERSION = 8
# "suppress": a class-suppression patch (no records, no gates: the ``suppress`` object below)
MODES = ("prune", "collapse", "suppress")
FORMS = ("shift", "collapse", "affine", "suppress")  # graph forms, see patchgraph
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_NAME = re.compile(r"^[A-Za-z0-9_./:-]{1,128}$")
_PATCH_ID = re.compile(r"^[0-9a-f]{32}$")
_CREATED = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z$")
REQUEST_KINDS = ("points", "class")
REQUEST_STRATEGIES = ("points", "representatives", "suppress")  # how a request became a patch (prune_edge.sets, .suppress)


def canonical_bytes(obj: Any) -> bytes:
    """Deterministic JSON encoding used for hashing and signing."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def derive_patch_id(signed: Mapping[str, Any]) -> str:
    """A patch's id: sha256 of its signed content without the id itself (32 hex digits). Derived, never
    chosen, so a second file cannot claim an existing patch's id (and be refused as its duplicate)."""
    return hashlib.sha256(canonical_bytes({k: v for k, v in signed.items() if k != "patch_id"})).hexdigest()[:32]


def _fail(where: str, expected: str, found: Any) -> PatchFormatError:
    text = repr(found)
    if len(text) > 60:
        text = text[:57] + "..."
    return PatchFormatError(f"manifest {where}: expected {expected}, found {text}")


def _get(d: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(d, Mapping):
        raise _fail(where, "an object", d)
    if key not in d:
        raise _fail(f"{where}.{key}", "a value", "nothing")
    value = d[key]
    # bool is an int in Python; never accept it where a number is expected.
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise _fail(f"{where}.{key}", getattr(kind, "__name__", str(kind)), value)
    if not isinstance(value, kind):
        name = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise _fail(f"{where}.{key}", name, value)
    return value


def _only_keys(d: Mapping[str, Any], allowed: set[str], where: str) -> None:
    if not isinstance(d, Mapping):  # e.g. a gated entry that is null or a number (found by tests/test_fuzz.py)
        raise _fail(where, "an object", d)
    extra = sorted(set(d) - allowed)
    if extra:
        raise _fail(where, f"only keys {sorted(allowed)}", extra)


def _finite_list(values: Any, n: int, where: str) -> list[float]:
    if not isinstance(values, list) or len(values) != n:
        raise _fail(where, f"a list of {n} numbers", values)
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise _fail(where, "finite numbers", v)
        out.append(float(v))
    return out


@dataclass(frozen=True)
class GatedTensor:
    """A base tensor that the patch gates on: its name in the base graph and its shape after N."""

    name: str
    shape: tuple[int, ...]

    @property
    def size(self) -> int:
        return int(math.prod(self.shape))


@dataclass(frozen=True)
class Record:
    """One gated affine patch g(x) * (T f(x) + t) and the certificate data that justifies it.

    The specification rows are ``e_j - e_target`` for every class j != target, in increasing j.
    On the record's region the base's row values lie in [lower_i, upper_i] (two LPs each, ``prune``
    mode) and the patch maps them to ``alpha_i * v + (P t)_i``, which must lie in the manifest's
    [q_lower, q_upper]. ``collapse`` has alpha = 0, so no bounds are needed. ``mean_scale`` is alpha
    on the added row (1,...,1)/C. The shifts are not stored here (format 4): the device computes
    ``P t`` from the graph's own t table, the numbers that act, so a second copy could only disagree.
    """

    target: int
    gamma: float
    alpha: tuple[float, ...]
    mean_scale: float
    lower: tuple[float, ...] | None
    upper: tuple[float, ...] | None
    points: int

    def to_json(self) -> dict[str, Any]:
        d = {name: getattr(self, name) for name in _RECORD_FIELDS}
        for k in ("alpha", "lower", "upper"):
            d[k] = None if d[k] is None else list(d[k])
        return d


_RECORD_FIELDS = tuple(f.name for f in fields(Record))  # dataclasses.fields() is slow per call


@dataclass(frozen=True)
class Manifest:
    """Everything a device must know about a patch before it parses a single ONNX byte."""

    patch_id: str
    created: str
    mode: str
    form: str
    base_sha256: str
    base_opset: int
    base_ir_version: int
    logits_name: str
    n_classes: int
    gated: tuple[GatedTensor, ...]
    graph_sha256: str
    graph_bytes: int
    q_lower: float
    q_upper: float
    records: tuple[Record, ...]
    gate_step_log2: int
    request: dict[str, Any] = field(default_factory=dict)
    chain: dict[str, Any] = field(default_factory=lambda: {"position": 0, "after": [], "replaces": []})
    # mode "suppress" only: {"classes": [K, ...], "margin": m} and, for a margin that follows the input,
    # "affine": {"weights": [[w_K over C logits], ...], "bias": [b_K, ...]}. Absent from every other file, so files
    # written before it existed keep their bytes and ids. Ranges are the certificate check's (verify).
    suppress: dict[str, Any] | None = None
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION

    @property
    def max_gate_width(self) -> float:
        """The widest gate (1/gamma, summed pre-activation violation at which it closes)."""
        return max((1.0 / r.gamma for r in self.records), default=0.0)

    @property
    def gated_size(self) -> int:
        return sum(g.size for g in self.gated)

    def to_json(self) -> dict[str, Any]:
        doc = {
            "format": self.format,
            "format_version": self.format_version,
            "patch_id": self.patch_id,
            "created": self.created,
            "mode": self.mode,
            "form": self.form,
            "base": {
                "sha256": self.base_sha256,
                "opset": self.base_opset,
                "ir_version": self.base_ir_version,
            },
            "inputs": {
                "logits": self.logits_name,
                "gated": [{"name": g.name, "shape": list(g.shape)} for g in self.gated],
            },
            "n_classes": self.n_classes,
            "gate": {"step_log2": self.gate_step_log2},
            "graph": {"sha256": self.graph_sha256, "bytes": self.graph_bytes},
            "specification": {"q_lower": self.q_lower, "q_upper": self.q_upper},
            "records": [r.to_json() for r in self.records],
            "request": self.request,
            "chain": self.chain,
        }
        if self.suppress is not None:
            doc["suppress"] = {"classes": list(self.suppress["classes"]), "margin": self.suppress["margin"]}
            if "affine" in self.suppress:  # absent for a constant margin: those files keep their bytes
                aff = self.suppress["affine"]
                doc["suppress"]["affine"] = {"weights": [list(w) for w in aff["weights"]], "bias": list(aff["bias"])}
        return doc

    def envelope(self, signatures: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """The document stored as ``manifest.json``."""
        return {"signed": self.to_json(), "signatures": list(signatures or [])}

    def signed_bytes(self) -> bytes:
        """The canonical bytes a signature covers."""
        return canonical_bytes(self.to_json())

    @classmethod
    def from_json(cls, doc: Any) -> "Manifest":
        """Validate a parsed ``signed`` object field by field; raise PatchFormatError on the first
        deviation, naming the field, what was expected and what was found."""
        w = "signed"
        if not isinstance(doc, dict):
            raise _fail(w, "an object", doc)
        _only_keys(
            doc,
            {"format", "format_version", "patch_id", "created", "mode", "form", "base", "inputs", "n_classes",
             "gate", "graph", "specification", "records", "request", "chain", "suppress"},
            w,
        )
        if _get(doc, "format", str, w) != FORMAT_NAME:
            raise _fail(f"{w}.format", repr(FORMAT_NAME), doc["format"])
        version = _get(doc, "format_version", int, w)
        if version != FORMAT_VERSION:
            raise _fail(f"{w}.format_version", f"{FORMAT_VERSION} (this runtime's format)", version)
        patch_id = _get(doc, "patch_id", str, w)
        if not _PATCH_ID.fullmatch(patch_id):
            raise _fail(f"{w}.patch_id", "32 lowercase hex digits", patch_id)
        created = _get(doc, "created", str, w)
        if not _CREATED.fullmatch(created):
            raise _fail(f"{w}.created", "a UTC time YYYY-MM-DDTHH:MM:SSZ", created)
        mode = _get(doc, "mode", str, w)
        if mode not in MODES:
            raise _fail(f"{w}.mode", f"one of {MODES}", mode)
        form = _get(doc, "form", str, w)
        if form not in FORMS:
            raise _fail(f"{w}.form", f"one of {FORMS}", form)
        suppressing = mode == "suppress"
        if (form == "suppress") != suppressing:
            raise _fail(f"{w}.form", "'suppress' exactly in mode 'suppress'", form)
        base = _get(doc, "base", dict, w)
        _only_keys(base, {"sha256", "opset", "ir_version"}, f"{w}.base")
        base_sha = _get(base, "sha256", str, f"{w}.base")
        if not _HEX64.fullmatch(base_sha):
            raise _fail(f"{w}.base.sha256", "64 lowercase hex digits", base_sha)
        inputs = _get(doc, "inputs", dict, w)
        _only_keys(inputs, {"logits", "gated"}, f"{w}.inputs")
        logits_name = _get(inputs, "logits", str, f"{w}.inputs")
        gated_docs = _get(inputs, "gated", list, f"{w}.inputs")
        if suppressing and gated_docs:
            raise _fail(f"{w}.inputs.gated", "no gated tensors in mode 'suppress'", gated_docs)
        if not suppressing and not gated_docs:
            raise _fail(f"{w}.inputs.gated", "at least one gated tensor", gated_docs)
        gated = []
        for i, g in enumerate(gated_docs):
            gw = f"{w}.inputs.gated[{i}]"
            _only_keys(g, {"name", "shape"}, gw)
            name = _get(g, "name", str, gw)
            shape = _get(g, "shape", list, gw)
            if not shape or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape):
                raise _fail(f"{gw}.shape", "a list of positive ints", shape)
            gated.append(GatedTensor(name, tuple(shape)))
        names = [logits_name] + [g.name for g in gated]
        for name in names:
            if not _NAME.fullmatch(name):
                raise _fail(f"{w}.inputs", "tensor names of [A-Za-z0-9_./:-]", name)
        if len(set(names)) != len(names):
            raise _fail(f"{w}.inputs", "distinct tensor names", names)
        n_classes = _get(doc, "n_classes", int, w)
        if not 2 <= n_classes <= 100_000:
            raise _fail(f"{w}.n_classes", "an int in [2, 100000]", n_classes)
        gate = _get(doc, "gate", dict, w)
        _only_keys(gate, {"step_log2"}, f"{w}.gate")
        step_log2 = _get(gate, "step_log2", int, f"{w}.gate")
        if not -24 <= step_log2 <= 8:
            raise _fail(f"{w}.gate.step_log2", "an int in [-24, 8]", step_log2)
        graph = _get(doc, "graph", dict, w)
        _only_keys(graph, {"sha256", "bytes"}, f"{w}.graph")
        graph_sha = _get(graph, "sha256", str, f"{w}.graph")
        if not _HEX64.fullmatch(graph_sha):
            raise _fail(f"{w}.graph.sha256", "64 lowercase hex digits", graph_sha)
        spec = _get(doc, "specification", dict, w)
        _only_keys(spec, {"q_lower", "q_upper"}, f"{w}.specification")
        q_lower, q_upper = _finite_list([spec.get("q_lower"), spec.get("q_upper")], 2, f"{w}.specification")
        if not q_lower < q_upper < 0:
            raise _fail(f"{w}.specification", "q_lower < q_upper < 0 (a strict margin)", [q_lower, q_upper])
        record_docs = _get(doc, "records", list, w)
        if suppressing and record_docs:
            raise _fail(f"{w}.records", "no records in mode 'suppress'", record_docs)
        if not suppressing and not record_docs:
            raise _fail(f"{w}.records", "at least one record", record_docs)
        suppress = None
        if suppressing:
            suppress = _suppress(_get(doc, "suppress", dict, w), f"{w}.suppress", n_classes)
        elif "suppress" in doc:
            raise _fail(f"{w}.suppress", "absent outside mode 'suppress'", doc["suppress"])
        records = [_record(r, n_classes, mode, f"{w}.records[{i}]") for i, r in enumerate(record_docs)]
        request = _request(_get(doc, "request", dict, w), f"{w}.request")
        chain = _get(doc, "chain", dict, w)
        _only_keys(chain, {"position", "after", "replaces"}, f"{w}.chain")
        position = _get(chain, "position", int, f"{w}.chain")
        after = _get(chain, "after", list, f"{w}.chain")
        replaces = _get(chain, "replaces", list, f"{w}.chain")
        ids_ok = all(isinstance(r, str) and _PATCH_ID.fullmatch(r) for r in after + replaces)
        if position < 0 or not ids_ok or len(after) > 100_000 or len(replaces) > 100_000:
            raise _fail(f"{w}.chain", "position >= 0 and lists of patch ids", chain)
        derived = derive_patch_id(doc)
        if patch_id != derived:
            raise _fail(f"{w}.patch_id", f"{derived} (sha256 of the manifest's content)", patch_id)
        return cls(
            patch_id=patch_id,
            created=created,
            mode=mode,
            form=form,
            base_sha256=base_sha,
            base_opset=_get(base, "opset", int, f"{w}.base"),
            base_ir_version=_get(base, "ir_version", int, f"{w}.base"),
            logits_name=logits_name,
            n_classes=n_classes,
            gated=tuple(gated),
            graph_sha256=graph_sha,
            graph_bytes=_get(graph, "bytes", int, f"{w}.graph"),
            q_lower=q_lower,
            q_upper=q_upper,
            records=tuple(records),
            gate_step_log2=step_log2,
            request=request,
            chain={"position": position, "after": list(after), "replaces": list(replaces)},
            suppress=suppress,
        )


def _suppress(doc: dict, w: str, n_classes: int) -> dict[str, Any]:
    """The suppression's parameters, type-checked only: the certificate check (verify) owns what they
    must satisfy (classes in range and distinct, margin > 0, affine weights within policy), so a forged
    value is refused by name there. ``affine`` (optional): per class a weight row over the n_classes
    logits and a bias; the margin is then the floor of m_K(x) (runtime.patchgraph)."""
    _only_keys(doc, {"classes", "margin", "affine"}, w)
    classes = _get(doc, "classes", list, w)
    if not classes or len(classes) > 100_000 or not all(isinstance(c, int) and not isinstance(c, bool) for c in classes):
        raise _fail(f"{w}.classes", "a non-empty list of class indices", classes)
    margin = _finite_list([doc.get("margin")], 1, f"{w}.margin")[0]
    out: dict[str, Any] = {"classes": list(classes), "margin": margin}
    if "affine" in doc:
        aff = _get(doc, "affine", dict, w)
        _only_keys(aff, {"weights", "bias"}, f"{w}.affine")
        rows = _get(aff, "weights", list, f"{w}.affine")
        if len(rows) != len(classes):
            raise _fail(f"{w}.affine.weights", f"one row per class ({len(classes)})", f"{len(rows)} rows")
        weights = [_finite_list(r, n_classes, f"{w}.affine.weights[{i}]") for i, r in enumerate(rows)]
        bias = _finite_list(aff.get("bias"), len(classes), f"{w}.affine.bias")
        out["affine"] = {"weights": weights, "bias": bias}
    return out


def _request(doc: dict, w: str) -> dict[str, Any]:
    """The request summary: its kind, a point count and one Merkle root of salted id commitments per
    request it covers (:mod:`.merkle`), nothing free-form (a patch's text reaches terminals and logs,
    so it carries no strings of the author's choosing)."""
    _only_keys(doc, {"kind", "n_points", "id_roots", "classes", "strategy"}, w)
    kind = _get(doc, "kind", str, w)
    if kind not in REQUEST_KINDS:
        raise _fail(f"{w}.kind", f"one of {REQUEST_KINDS}", kind)
    n_points = _get(doc, "n_points", int, w)
    roots = _get(doc, "id_roots", list, w)
    if n_points < 0 or len(roots) > 100_000 or not all(isinstance(c, str) and _HEX64.fullmatch(c) for c in roots):
        raise _fail(w, "n_points >= 0 and id_roots of 64 hex digits", doc)
    out: dict[str, Any] = {"kind": kind, "n_points": n_points, "id_roots": list(roots)}
    if "classes" in doc:
        classes = _get(doc, "classes", list, w)
        if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in classes):
            raise _fail(f"{w}.classes", "a list of class indices", classes)
        out["classes"] = list(classes)
    if "strategy" in doc:
        strategy = _get(doc, "strategy", str, w)
        if strategy not in REQUEST_STRATEGIES:
            raise _fail(f"{w}.strategy", f"one of {REQUEST_STRATEGIES}", strategy)
        out["strategy"] = strategy
    return out


def _record(doc: Any, n_classes: int, mode: str, w: str) -> Record:
    _only_keys(
        doc if isinstance(doc, dict) else {},
        {"target", "gamma", "alpha", "mean_scale", "lower", "upper", "points"},
        w,
    )
    target = _get(doc, "target", int, w)
    if not 0 <= target < n_classes:
        raise _fail(f"{w}.target", f"a class in [0, {n_classes})", target)
    gamma = _finite_list([doc.get("gamma")], 1, f"{w}.gamma")[0]
    if not gamma > 0:
        raise _fail(f"{w}.gamma", "a positive number", gamma)
    rows = n_classes - 1
    alpha = _finite_list(doc.get("alpha"), rows, f"{w}.alpha")
    mean_scale = _finite_list([doc.get("mean_scale")], 1, f"{w}.mean_scale")[0]
    if mode == "prune":
        lower = _finite_list(doc.get("lower"), rows, f"{w}.lower")
        upper = _finite_list(doc.get("upper"), rows, f"{w}.upper")
    else:
        if doc.get("lower") is not None or doc.get("upper") is not None:
            raise _fail(f"{w}.lower/upper", "null in collapse mode", [doc.get("lower"), doc.get("upper")])
        lower = upper = None
    points = _get(doc, "points", int, w)
    if points < 1:
        raise _fail(f"{w}.points", "a positive count", points)
    return Record(
        target=target,
        gamma=gamma,
        alpha=tuple(alpha),
        mean_scale=mean_scale,
        lower=None if lower is None else tuple(lower),
        upper=None if upper is None else tuple(upper),
        points=points,
    )
