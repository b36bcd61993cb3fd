"""The device-side patch format, built by hand (no torch): manifest schema, container, canonical graph.

Every object here is tiny and synthetic so each refusal is pinned to exactly one deviation.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import io
import json
import sys
import zipfile

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from prune_edge.runtime import patchfile, patchgraph
from prune_edge.runtime.errors import IntegrityError, PatchFormatError, PatchVerificationError, StructureError
from prune_edge.runtime.fileio import sha256_bytes
from prune_edge.runtime.manifest import (
    FORMAT_VERSION,
    GatedTensor,
    Manifest,
    Record,
    canonical_bytes,
    derive_patch_id,
)
from prune_edge.runtime.merkle import ids_root
from prune_edge.runtime.patchfile import GRAPH_NAME, MANIFEST_NAME, pack, read_patch_file, unpack
from prune_edge.runtime.patchgraph import (
    DEFAULT_SCALE_LOG2,
    MIN_OPSET,
    OUTPUT_NAME,
    PREFIX,
    SCALE_LOG2_RANGE,
    SELECT_BLOCK,
    PatchParams,
    affine_from_scales,
    affine_from_scales_many,
    build_patch_graph,
    choose_scale_log2,
    completed_spec,
    excess_of,
    extract_params,
    form_of,
    quantize,
    screen_window,
    selection_neurons,
    sign_pattern,
    spec_rows,
)

C = 3  # classes
# One conv-like (C, H, W) tensor and one flat tensor: exercises Flatten + Concat ordering.
GATED = (GatedTensor("feat_a", (2, 2, 2)), GatedTensor("feat_b", (3,)))
M = sum(g.size for g in GATED)  # 11 gated values
LOGITS = "logits"
OPSET, IR = 20, 10
Q_LOWER, Q_UPPER = -1000.0, -1.0
BASE_SHA = "ab" * 32
STEP_LOG2 = -3  # delta = 1/8: |v| saturates at about 8, the scale of the test inputs
DELTA = 2.0**STEP_LOG2
GAMMAS = (1.5, 2.0, 1.25)  # float32-exact, one per record in turn
ROOTS = [ids_root(range(10 * r, 10 * r + 5), b"salt") for r in range(3)]  # one Merkle root per request
ID_RE = r"[0-9a-f]{32}"
# extra outputs of a patch graph, tapped by these tests
# SEL: the selection scores v_A . s_k,A (N, P'), int32, the first P columns the records' (the rest copies of
# the last record's, padding the row for the block argmax). VA: the M codes of v. NEX: -excess / 2 of the
# acting record (N, 1), sum_i min(s_i v_i, 0). GPRE: its gate before the clip, 1 + neg_w excess in float32 as the graph's Add does it.
GATE, K, SEL, VA, NEX, GPRE = (PREFIX + n for n in ("gate_max", "k", "g0_sel", "g0_va", "g0_nex", "g0_gpre"))


# ----------------------------------------------------------------------------- hand-built patches
def random_params(rng: np.random.Generator, p: int, c: int = C, m: int = M) -> PatchParams:
    """P records with distinct random sign patterns and random (T, t)."""
    while True:
        signs = rng.choice(np.array([-1, 1], np.int8), size=(p, m))
        if len(np.unique(signs, axis=0)) == p:
            break
    return PatchParams(
        signs=signs,
        gamma=rng.uniform(0.3, 2.0, size=p),
        T=rng.normal(size=(p, c, c)),
        t=rng.normal(size=(p, c)) * 3,
        scale_log2=STEP_LOG2,
    )


def with_form(params: PatchParams, form: str) -> PatchParams:
    """The same gates with T of the given form (general, 0 or -I)."""
    T = {"affine": params.T, "shift": np.zeros_like(params.T), "collapse": np.broadcast_to(-np.eye(params.n_classes), params.T.shape)}[form]
    out = PatchParams(params.signs, params.gamma, T, params.t, params.scale_log2)
    assert form_of(out) == form
    return out


def make_records(p: int, mode: str = "prune", alpha_value: float = 0.5) -> tuple[list[Record], np.ndarray, np.ndarray]:
    """Records whose certificate algebra holds, and their float64 (T, t)."""
    records, Ts, ts = [], [], []
    for k in range(p):
        target = k % C
        if mode == "prune":
            alpha = np.full(C - 1, alpha_value)
            lower, upper = np.full(C - 1, -3.0), np.full(C - 1, 2.0)
            beta = Q_UPPER - 0.25 - alpha * upper  # alpha * upper + P t = q_upper - 0.25
            mean_scale, mean_shift = 1.0, 0.0
        else:
            alpha, lower, upper = np.zeros(C - 1), None, None
            beta = np.full(C - 1, Q_UPPER)
            mean_scale, mean_shift = 0.0, 0.125
        T, t = affine_from_scales(target, alpha, beta, mean_scale, mean_shift, C)
        Ts.append(T)
        ts.append(t)
        records.append(
            Record(
                target=target, gamma=GAMMAS[k % len(GAMMAS)], alpha=tuple(alpha.tolist()), mean_scale=mean_scale,
                lower=None if lower is None else tuple(lower.tolist()),
                upper=None if upper is None else tuple(upper.tolist()), points=1 + k,
            )
        )
    return records, np.stack(Ts), np.stack(ts)


def rederive(manifest: Manifest, **changes) -> Manifest:
    """``manifest`` with ``changes`` and the patch id derived from the new content (as a server does)."""
    m = dataclasses.replace(manifest, **changes)
    return dataclasses.replace(m, patch_id=derive_patch_id(m.to_json()))


def make_patch(
    p: int = 2,
    mode: str = "prune",
    seed: int = 0,
    created: str = "2024-01-01T00:00:00Z",
    alpha_value: float = 0.5,
    chain: dict | None = None,
) -> tuple[Manifest, bytes]:
    """(manifest, graph bytes) of a small, fully consistent patch."""
    rng = np.random.default_rng(seed)
    records, T, t = make_records(p, mode, alpha_value)
    params = PatchParams(
        signs=rng.choice(np.array([-1, 1], np.int8), size=(p, M)), gamma=[r.gamma for r in records], T=T, t=t,
        scale_log2=STEP_LOG2,
    )
    form = form_of(params)
    graph = build_patch_graph(GATED, LOGITS, params, OPSET, IR, form).SerializeToString()
    draft = Manifest(
        patch_id="0" * 32, created=created, mode=mode, form=form, base_sha256=BASE_SHA, base_opset=OPSET,
        base_ir_version=IR, logits_name=LOGITS, n_classes=C, gated=GATED, graph_sha256=sha256_bytes(graph),
        graph_bytes=len(graph), q_lower=Q_LOWER, q_upper=Q_UPPER, records=tuple(records),
        gate_step_log2=STEP_LOG2, request={"kind": "points", "n_points": p, "id_roots": ROOTS[:1]},
        **({"chain": chain} if chain is not None else {}),
    )
    return rederive(draft), graph


def zip_members(members: list[tuple[str, bytes]], compress_type: int = zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members:
            info = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))
            info.compress_type = compress_type
            zf.writestr(info, data)
    return buf.getvalue()


def envelope_text(manifest: Manifest, signatures: list | None = None) -> str:
    return json.dumps(manifest.envelope(signatures), sort_keys=True, separators=(",", ":"))


@pytest.fixture(scope="module")
def tiny() -> tuple[Manifest, bytes]:
    return make_patch(p=3)


# ----------------------------------------------------------------------------- manifest
@pytest.mark.parametrize(
    "mode,alpha_value,form",
    [("prune", 0.5, "affine"), ("prune", 1.0, "shift"), ("collapse", 0.0, "collapse")],
    ids=["prune-affine", "prune-shift", "collapse"],
)
def test_manifest_round_trip(mode, alpha_value, form):
    manifest, _ = make_patch(p=3, mode=mode, alpha_value=alpha_value)
    assert manifest.form == form
    doc = manifest.to_json()
    again = Manifest.from_json(doc)
    assert again == manifest
    # Through real JSON text and back, and the signed bytes are stable and canonical.
    reparsed = Manifest.from_json(json.loads(json.dumps(doc)))
    assert reparsed == manifest
    assert reparsed.signed_bytes() == manifest.signed_bytes() == canonical_bytes(doc)
    assert json.loads(manifest.signed_bytes()) == doc
    # v3 fields: the gate step, the chain, the derived id, the widest gate; v4: a root per request, no beta.
    assert doc["format_version"] == FORMAT_VERSION == 8
    assert all(set(r) == {"target", "gamma", "alpha", "mean_scale", "lower", "upper", "points"} for r in doc["records"])
    assert doc["gate"] == {"step_log2": STEP_LOG2} and again.gate_step_log2 == STEP_LOG2
    assert doc["chain"] == {"position": 0, "after": [], "replaces": []}
    assert doc["request"] == {"kind": "points", "n_points": 3, "id_roots": ROOTS[:1]}
    assert manifest.patch_id == derive_patch_id(doc) == hashlib.sha256(
        canonical_bytes({k: v for k, v in doc.items() if k != "patch_id"})
    ).hexdigest()[:32]
    assert manifest.max_gate_width == pytest.approx(1 / min(GAMMAS))
    assert manifest.gated_size == M
    assert not hasattr(manifest, "prefix")


def test_manifest_round_trip_with_chain_and_classes():
    """Every optional v3 field survives the reader: chain ids, class requests."""
    a, _ = make_patch(p=1, seed=1)
    b, _ = make_patch(p=1, seed=2)
    m, _ = make_patch(p=2, chain={"position": 2, "after": [a.patch_id, b.patch_id], "replaces": [a.patch_id]})
    m = rederive(m, request={"kind": "class", "n_points": 40, "id_roots": [], "classes": [0, 2]})
    again = Manifest.from_json(json.loads(json.dumps(m.to_json())))
    assert again == m
    assert again.chain == {"position": 2, "after": [a.patch_id, b.patch_id], "replaces": [a.patch_id]}
    assert again.request["classes"] == [0, 2]


def test_patch_id_is_derived_from_the_content(tiny):
    """The id is the hash of everything signed but itself: any edit changes it, and an edit that keeps
    the old id is refused, naming patch_id and the id the content derives to."""
    manifest = tiny[0]
    rec = dataclasses.replace(manifest.records[0], points=99)
    edits = {
        "created": {"created": "2030-01-01T00:00:00Z"},
        "gate": {"gate_step_log2": STEP_LOG2 - 1},
        "chain": {"chain": {"position": 1, "after": [manifest.patch_id], "replaces": []}},
        "request": {"request": {**manifest.request, "n_points": 4}},
        "record": {"records": (rec, *manifest.records[1:])},
        "graph": {"graph_sha256": "cd" * 32},
        "q_upper": {"q_upper": -2.0},
    }
    ids = {manifest.patch_id}
    for name, change in edits.items():
        edited = dataclasses.replace(manifest, **change)
        derived = derive_patch_id(edited.to_json())
        assert derived != manifest.patch_id, name
        ids.add(derived)
        expected = rf"signed\.patch_id: expected {derived} \(sha256 of the manifest's content\), found '{manifest.patch_id}'"
        with pytest.raises(PatchFormatError, match=expected):
            Manifest.from_json(edited.to_json())
        fixed = rederive(manifest, **change)
        assert fixed.patch_id == derived and Manifest.from_json(fixed.to_json()) == fixed, name
    assert len(ids) == len(edits) + 1
    # The id itself is not hashed: any claimed id derives the same, and only the derived one passes.
    doc = manifest.to_json()
    doc["patch_id"] = "f" * 32
    assert derive_patch_id(doc) == manifest.patch_id
    with pytest.raises(PatchFormatError, match=r"signed\.patch_id"):
        Manifest.from_json(doc)


def _set(path: str, value):
    """A mutation that sets ``doc[path...] = value`` ('records.0.beta' style paths)."""

    def mutate(doc):
        *parents, last = path.split(".")
        node = doc
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value

    return mutate


def _delete(path: str):
    def mutate(doc):
        *parents, last = path.split(".")
        node = doc
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        del node[last]

    return mutate


NOT_DERIVED = r"signed\.patch_id: expected [0-9a-f]{32} \(sha256 of the manifest's content\)"

# (id, mutation, message). The patch id is re-derived after each mutation (as an author would), so
# every refusal here is the field's own, except the cases listed in KEEP_ID.
INVALID_MANIFESTS = [
    ("format_version_2", _set("format_version", 2), rf"signed\.format_version: expected {FORMAT_VERSION} \(this runtime's format\), found 2"),
    ("format_version_bool", _set("format_version", True), r"signed\.format_version: expected int, found True"),
    ("format_name", _set("format", "other-format"), r"signed\.format: expected 'prune-edge-patch'"),
    ("unknown_top_key", _set("extra", 1), r"signed: expected only keys .*found \['extra'\]"),
    ("unknown_base_key", _set("base.url", "http://x"), r"signed\.base: expected only keys"),
    ("unknown_record_key", _set("records.0.note", "hi"), r"signed\.records\[0\]: expected only keys"),
    ("base_sha_upper", _set("base.sha256", "AB" * 32), r"signed\.base\.sha256: expected 64 lowercase hex"),
    ("base_sha_short", _set("base.sha256", "ab" * 31), r"signed\.base\.sha256: expected 64 lowercase hex"),
    ("base_sha_nonhex", _set("base.sha256", "zz" * 32), r"signed\.base\.sha256"),
    ("graph_sha_bad", _set("graph.sha256", "0" * 63 + "g"), r"signed\.graph\.sha256: expected 64 lowercase hex"),
    ("patch_id_bad", _set("patch_id", "XYZ"), r"signed\.patch_id: expected .*lowercase hex digits, found 'XYZ'"),
    ("patch_id_16_digits", _set("patch_id", "0123456789abcdef"), r"signed\.patch_id: expected .*hex digits, found '0123456789abcdef'"),
    ("patch_id_64_digits", _set("patch_id", "ab" * 32), r"signed\.patch_id: expected .*hex digits"),
    ("patch_id_upper", _set("patch_id", "AB" * 16), r"signed\.patch_id: expected .*hex digits"),
    ("patch_id_other", _set("patch_id", "ab" * 16), NOT_DERIVED + r", found 'abab"),
    ("created_edited_keeping_id", _set("created", "2030-01-01T00:00:00Z"), NOT_DERIVED),
    ("alpha_edited_keeping_id", _set("records.0.alpha.0", 0.25), NOT_DERIVED),
    ("points_edited_keeping_id", _set("records.1.points", 50), NOT_DERIVED),
    ("gate_edited_keeping_id", _set("gate.step_log2", STEP_LOG2 + 1), NOT_DERIVED),
    ("chain_edited_keeping_id", _set("chain.position", 3), NOT_DERIVED),
    ("request_edited_keeping_id", _set("request.n_points", 9), NOT_DERIVED),
    ("created_missing", _delete("created"), r"signed\.created: expected a value"),
    ("created_int", _set("created", 1700000000), r"signed\.created: expected str, found 1700000000"),
    ("created_space", _set("created", "2024-01-01 00:00:00Z"), r"signed\.created: expected a UTC time YYYY-MM-DDTHH:MM:SSZ"),
    ("created_offset", _set("created", "2024-01-01T00:00:00+00:00"), r"signed\.created: expected a UTC time"),
    ("created_fraction", _set("created", "2024-01-01T00:00:00.5Z"), r"signed\.created: expected a UTC time"),
    ("created_no_zone", _set("created", "2024-01-01T00:00:00"), r"signed\.created: expected a UTC time"),
    ("created_free_text", _set("created", "yesterday \x1b[31m"), r"signed\.created: expected a UTC time"),
    ("mode_unknown", _set("mode", "retrain"), r"signed\.mode: expected one of"),
    ("form_unknown", _set("form", "general"), r"signed\.form: expected one of"),
    ("form_missing", _delete("form"), r"signed\.form: expected a value"),
    ("gate_missing", _delete("gate"), r"signed\.gate: expected a value, found 'nothing'"),
    ("gate_not_object", _set("gate", -3), r"signed\.gate: expected dict, found -3"),
    ("gate_step_missing", _delete("gate.step_log2"), r"signed\.gate\.step_log2: expected a value"),
    ("gate_step_too_fine", _set("gate.step_log2", SCALE_LOG2_RANGE[0] - 1), r"signed\.gate\.step_log2: expected an int in \[-24, 8\], found -25"),
    ("gate_step_too_coarse", _set("gate.step_log2", SCALE_LOG2_RANGE[1] + 1), r"signed\.gate\.step_log2: expected an int in \[-24, 8\], found 9"),
    ("gate_step_float", _set("gate.step_log2", -3.0), r"signed\.gate\.step_log2: expected int, found -3\.0"),
    ("gate_step_bool", _set("gate.step_log2", True), r"signed\.gate\.step_log2: expected int, found True"),
    ("gate_extra_key", _set("gate.width", 1.0), r"signed\.gate: expected only keys \['step_log2'\], found \['width'\]"),
    ("nan_alpha", _set("records.0.alpha.0", float("nan")), r"signed\.records\[0\]\.alpha: expected finite numbers"),
    ("beta_format3_key", _set("records.0.beta", [0.0, 0.0]), r"signed\.records\[0\]: expected only keys .*found \['beta'\]"),
    ("mean_shift_format3_key", _set("records.0.mean_shift", 0.0), r"signed\.records\[0\]: expected only keys .*found \['mean_shift'\]"),
    ("inf_gamma", _set("records.0.gamma", float("inf")), r"signed\.records\[0\]\.gamma: expected finite numbers"),
    ("gamma_zero", _set("records.0.gamma", 0.0), r"signed\.records\[0\]\.gamma: expected a positive number"),
    ("q_upper_zero", _set("specification.q_upper", 0.0), r"signed\.specification: expected q_lower < q_upper < 0"),
    ("q_upper_positive", _set("specification.q_upper", 0.5), r"q_lower < q_upper < 0"),
    ("q_lower_above_upper", _set("specification.q_lower", -0.5), r"q_lower < q_upper < 0"),
    ("q_upper_missing", _delete("specification.q_upper"), r"signed\.specification: expected finite numbers, found None"),
    ("target_too_big", _set("records.1.target", C), r"signed\.records\[1\]\.target: expected a class in \[0, 3\)"),
    ("target_negative", _set("records.0.target", -1), r"signed\.records\[0\]\.target: expected a class"),
    ("target_bool", _set("records.0.target", True), r"signed\.records\[0\]\.target: expected int, found True"),
    ("target_float", _set("records.0.target", 1.0), r"signed\.records\[0\]\.target: expected int, found 1\.0"),
    ("points_bool", _set("records.0.points", True), r"signed\.records\[0\]\.points: expected int"),
    ("points_zero", _set("records.0.points", 0), r"signed\.records\[0\]\.points: expected a positive count"),
    ("n_classes_bool", _set("n_classes", True), r"signed\.n_classes: expected int, found True"),
    ("n_classes_one", _set("n_classes", 1), r"signed\.n_classes: expected an int in \[2, 100000\]"),
    ("opset_bool", _set("base.opset", True), r"signed\.base\.opset: expected int, found True"),
    ("graph_bytes_str", _set("graph.bytes", "12"), r"signed\.graph\.bytes: expected int"),
    ("records_missing", _delete("records"), r"signed\.records: expected a value, found 'nothing'"),
    ("records_empty", _set("records", []), r"signed\.records: expected at least one record"),
    ("records_not_list", _set("records", {"0": 1}), r"signed\.records: expected list"),
    ("record_not_object", _set("records.0", [1, 2]), r"signed\.records\[0\]: expected an object"),
    ("alpha_short", _set("records.0.alpha", [0.5]), r"signed\.records\[0\]\.alpha: expected a list of 2 numbers"),
    ("alpha_bool_entry", _set("records.0.alpha.1", False), r"signed\.records\[0\]\.alpha: expected finite numbers, found False"),
    ("lower_bool_entry", _set("records.0.lower.1", False), r"signed\.records\[0\]\.lower: expected finite numbers, found False"),
    ("lower_missing_prune", _set("records.0.lower", None), r"signed\.records\[0\]\.lower: expected a list of 2"),
    ("gated_empty", _set("inputs.gated", []), r"signed\.inputs\.gated: expected at least one gated tensor"),
    ("gated_shape_bool", _set("inputs.gated.0.shape", [True, 2]), r"signed\.inputs\.gated\[0\]\.shape: expected a list of positive ints"),
    ("gated_shape_zero", _set("inputs.gated.1.shape", [0]), r"signed\.inputs\.gated\[1\]\.shape"),
    ("gated_name_bad", _set("inputs.gated.0.name", "a b"), r"signed\.inputs: expected tensor names"),
    ("gated_name_dup", _set("inputs.gated.1.name", "feat_a"), r"signed\.inputs: expected distinct tensor names"),
    ("logits_is_gated", _set("inputs.logits", "feat_b"), r"signed\.inputs: expected distinct tensor names"),
    ("chain_missing", _delete("chain"), r"signed\.chain: expected a value"),
    ("chain_negative", _set("chain.position", -1), r"signed\.chain: expected position >= 0"),
    ("chain_bad_id", _set("chain.replaces", ["nothex"]), r"signed\.chain: expected position >= 0 and lists of patch ids"),
    ("chain_after_missing", _delete("chain.after"), r"signed\.chain\.after: expected a value"),
    ("chain_after_short_id", _set("chain.after", ["0123456789abcdef"]), r"signed\.chain: expected position >= 0 and lists of patch ids"),
    ("chain_after_not_str", _set("chain.after", [7]), r"signed\.chain: expected position >= 0 and lists of patch ids"),
    ("chain_extra_key", _set("chain.note", "x"), r"signed\.chain: expected only keys"),
    ("request_not_object", _set("request", []), r"signed\.request: expected dict"),
    ("request_free_form_key", _set("request.note", "deleted at the user's request"), r"signed\.request: expected only keys \['classes', 'id_roots', 'kind', 'n_points', 'strategy'\], found \['note'\]"),
    ("request_format3_commitments", _set("request.id_commitments", []), r"signed\.request: expected only keys .*found \['id_commitments'\]"),
    ("request_kind_unknown", _set("request.kind", "everything"), r"signed\.request\.kind: expected one of \('points', 'class'\)"),
    ("request_kind_missing", _delete("request.kind"), r"signed\.request\.kind: expected a value"),
    ("request_n_points_missing", _delete("request.n_points"), r"signed\.request\.n_points: expected a value"),
    ("request_n_points_negative", _set("request.n_points", -1), r"signed\.request: expected n_points >= 0 and id_roots of 64 hex"),
    ("request_n_points_bool", _set("request.n_points", True), r"signed\.request\.n_points: expected int, found True"),
    ("request_roots_missing", _delete("request.id_roots"), r"signed\.request\.id_roots: expected a value"),
    ("request_roots_not_list", _set("request.id_roots", ROOTS[0]), r"signed\.request\.id_roots: expected list"),
    ("request_root_short", _set("request.id_roots.0", "ab" * 31), r"signed\.request: expected n_points >= 0 and id_roots"),
    ("request_root_upper", _set("request.id_roots.0", "AB" * 32), r"signed\.request: expected n_points >= 0 and id_roots"),
    ("request_root_free_text", _set("request.id_roots.0", "alice@example.com"), r"signed\.request: expected n_points >= 0 and id_roots"),
    ("request_classes_not_list", _set("request.classes", 3), r"signed\.request\.classes: expected list"),
    ("request_classes_negative", _set("request.classes", [0, -1]), r"signed\.request\.classes: expected a list of class indices"),
    ("request_classes_bool", _set("request.classes", [True]), r"signed\.request\.classes: expected a list of class indices"),
    ("request_classes_str", _set("request.classes", ["cat"]), r"signed\.request\.classes: expected a list of class indices"),
]
# Cases whose id stays as it was: the id is what is under test, or the content has no canonical hash.
KEEP_ID = {i for i, _, _ in INVALID_MANIFESTS if i.startswith("patch_id") or i.endswith("keeping_id")} | {"nan_alpha", "inf_gamma"}


@pytest.mark.parametrize("case,mutate,match", [pytest.param(i, m, r, id=i) for i, m, r in INVALID_MANIFESTS])
def test_invalid_manifest_refused(tiny, case, mutate, match):
    doc = copy.deepcopy(tiny[0].to_json())
    mutate(doc)
    if case not in KEEP_ID:
        doc["patch_id"] = derive_patch_id(doc)
    with pytest.raises(PatchFormatError, match=match) as info:
        Manifest.from_json(doc)
    msg = str(info.value)
    assert "\n" not in msg and len(msg) < 400
    assert info.value.check == "format" and isinstance(info.value, ValueError)


# Python's `$` also matches before a final "\n", so these strings pass the manifest's patterns.
TRAILING_NEWLINE = [
    ("created", _set("created", "2024-01-01T00:00:00Z\n"), r"signed\.created"),
    ("id_root", _set("request.id_roots.0", ROOTS[0] + "\n"), r"signed\.request"),
    ("chain_after", _set("chain.after", ["0" * 32 + "\n"]), r"signed\.chain"),
    ("base_sha256", _set("base.sha256", BASE_SHA + "\n"), r"signed\.base\.sha256"),
    ("gated_name", _set("inputs.gated.0.name", "feat_a\n"), r"signed\.inputs"),
]


@pytest.mark.parametrize("mutate,match", [pytest.param(m, r, id=i) for i, m, r in TRAILING_NEWLINE])
def test_trailing_newline_in_strings_refused(tiny, mutate, match):
    """A patch's strings reach terminals and logs: none may carry a line break of the author's choosing."""
    doc = copy.deepcopy(tiny[0].to_json())
    mutate(doc)
    doc["patch_id"] = derive_patch_id(doc)
    with pytest.raises(PatchFormatError, match=match):
        Manifest.from_json(doc)


def test_invalid_manifest_collapse_bounds():
    manifest, _ = make_patch(p=1, mode="collapse")
    doc = manifest.to_json()
    doc["records"][0]["lower"] = [0.0, 0.0]
    doc["patch_id"] = derive_patch_id(doc)
    with pytest.raises(PatchFormatError, match=r"signed\.records\[0\]\.lower/upper: expected null in collapse mode"):
        Manifest.from_json(doc)


def test_invalid_manifest_whole_document():
    with pytest.raises(PatchFormatError, match=r"signed: expected an object"):
        Manifest.from_json([1, 2, 3])


def test_valid_edge_values_accepted(tiny):
    """The validator is not over-strict: ints where floats are expected, the range ends of every
    bounded field, and an empty list of roots are fine (once the id is derived from that content)."""
    doc = copy.deepcopy(tiny[0].to_json())
    doc["specification"] = {"q_lower": -1000, "q_upper": -1}
    doc["records"][0]["target"] = C - 1
    doc["n_classes"] = C
    doc["request"] = {"kind": "class", "n_points": 0, "id_roots": [], "classes": []}
    doc["chain"] = {"position": 0, "after": [], "replaces": ["0" * 32]}
    for step in SCALE_LOG2_RANGE:
        doc["gate"] = {"step_log2": step}
        doc["patch_id"] = derive_patch_id(doc)
        m = Manifest.from_json(doc)
        assert m.gate_step_log2 == step
    assert m.q_upper == -1.0 and isinstance(m.q_upper, float)
    assert m.records[0].target == C - 1
    assert m.request == {"kind": "class", "n_points": 0, "id_roots": [], "classes": []}


# ----------------------------------------------------------------------------- container
def test_pack_unpack_round_trip(tiny):
    manifest, graph = tiny
    data = pack(manifest, graph)
    pf = unpack(data)
    assert pf.manifest == manifest
    assert pf.graph_bytes == graph
    assert pf.signatures == ()
    assert pf.size == len(data)
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        assert sorted(zf.namelist()) == sorted([MANIFEST_NAME, GRAPH_NAME])
        env = json.loads(zf.read(MANIFEST_NAME))
    assert env == {"signed": manifest.to_json(), "signatures": []}


def test_pack_is_deterministic(tiny, tmp_path):
    manifest, graph = tiny
    a = pack(manifest, graph)
    b = pack(Manifest.from_json(json.loads(json.dumps(manifest.to_json()))), bytes(graph))
    assert a == b
    # Rebuilding the same patch from scratch gives the same graph, id and file bytes ...
    m2, g2 = make_patch(p=3)
    assert g2 == graph and m2.patch_id == manifest.patch_id and pack(m2, g2) == a
    # ... and a different creation time changes only the manifest (and so the id), not the graph.
    m3, g3 = make_patch(p=3, created="2025-06-01T00:00:00Z")
    assert g3 == graph and m3.patch_id != manifest.patch_id and pack(m3, g3) != a
    assert unpack(pack(m3, g3)).manifest == m3
    # read_patch_file on disk agrees with unpack.
    path = tmp_path / "tiny.pepatch"
    path.write_bytes(a)
    assert read_patch_file(path).manifest == manifest


def test_t_rounding_keeps_every_certificate_and_only_lowers_rows():
    """The server stores t on the coarsest grid that keeps the record's certificate. Counterexample
    searched: records whose lowest patched row sits just above q_lower (a coarse grid's downward
    rounding would cross it) fall back to finer grids, and every rounded t passes the device's spec
    check; no row P t ever rises (the target wins by at least as much)."""
    from prune_edge.exporters.patch_export import T_GRID_LOG2, round_t_table
    from prune_edge.runtime.patchgraph import completed_specs
    from prune_edge.runtime.verify import patched_rows

    rng = np.random.default_rng(3)
    p = 60
    records, _, _ = make_records(p, "prune", 1.0)
    targets = np.array([r.target for r in records])
    alpha = np.ones((p, C - 1))
    lower = rng.uniform(-50, -10, size=(p, C - 1))
    upper = lower + rng.uniform(0, 8, size=(p, C - 1))
    # shifts putting each row's top at q_upper - 1e-4, or (every third record) its bottom at q_lower + 1e-5 * k
    beta = (Q_UPPER - 1e-4) - upper
    tight = np.arange(p) % 3 == 0
    beta[tight] = (Q_LOWER + 1e-5 * (1 + np.arange(p)[tight, None] % 7)) - lower[tight]
    upper[tight] = np.minimum(upper[tight], Q_UPPER - 1e-3 - beta[tight])
    _, t = affine_from_scales_many(targets, np.ones((p, C)), np.column_stack([beta, rng.normal(size=p)]), C)
    t = t.astype(np.float32)
    lo0, hi0 = patched_rows("prune", targets, alpha, lower, upper, t)
    ok0 = (hi0 <= Q_UPPER).all(axis=1) & (lo0 >= Q_LOWER).all(axis=1)
    recs = [dataclasses.replace(r, lower=tuple(lo), upper=tuple(up)) for r, lo, up in zip(records, lower, upper)]
    rounded = round_t_table(t, recs, "prune", Q_LOWER, Q_UPPER)
    lo, hi = patched_rows("prune", targets, alpha, lower, upper, rounded)
    held = (hi <= Q_UPPER).all(axis=1) & (lo >= Q_LOWER).all(axis=1)
    assert (held | ~ok0).all() and (rounded[~ok0] == t[~ok0]).all()  # certified stays certified; else untouched
    pbar = completed_specs(targets, C)
    rows = lambda tt: np.einsum("pij,pj->pi", pbar, tt.astype(np.float64))[:, :-1]  # noqa: E731
    assert (rows(rounded) <= rows(t)).all()
    g = 2.0**T_GRID_LOG2["prune"]
    coarse = (np.round(rounded / g) * g == rounded).all(axis=1)
    assert coarse[~tight].all()  # room to spare: the coarsest grid
    assert (~coarse[tight & ok0]).any()  # tight records needed a finer grid: the fallback was exercised
    assert np.abs(rounded - t).max() <= 2 * g


def test_build_patch_is_deterministic_given_created(monkeypatch):
    """The server-side builder: same inputs and SOURCE_DATE_EPOCH -> byte-identical patch files, with
    the gate step, chain and derived id the reader demands."""
    from prune_edge.exporters.patch_export import BaseRef, RecordCert, build_patch

    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    records, T, t = make_records(2)
    params = PatchParams(signs=np.ones((2, M), np.int8), gamma=[r.gamma for r in records], T=T, t=t, scale_log2=-5)
    certs = [RecordCert(r.target, r.gamma, r.alpha, r.mean_scale, r.lower, r.upper, r.points) for r in records]
    ref = BaseRef(BASE_SHA, OPSET, IR, LOGITS, C, GATED)
    request = {"kind": "points", "n_points": 2, "id_roots": ROOTS[:1]}
    m1, d1 = build_patch(ref, params, certs, "prune", Q_LOWER, Q_UPPER, request)
    m2, d2 = build_patch(ref, params, certs, "prune", Q_LOWER, Q_UPPER, dict(request))
    assert d1 == d2 and m1 == m2
    assert m1.created == "2023-11-14T22:13:20Z"
    assert m1.gate_step_log2 == -5 and m1.chain == {"position": 0, "after": [], "replaces": []}
    assert m1.patch_id == derive_patch_id(m1.to_json())
    assert unpack(d1).manifest == m1
    # A chained patch: the chain is signed content, so it has its own id.
    chain = {"position": 1, "after": [m1.patch_id], "replaces": []}
    m3, d3 = build_patch(ref, params, certs, "prune", Q_LOWER, Q_UPPER, request, chain=chain)
    assert unpack(d3).manifest.chain == chain and m3.patch_id != m1.patch_id
    # The builder does not validate (callers run verify_patch); a free-form request never gets past a reader.
    _, bad = build_patch(ref, params, certs, "prune", Q_LOWER, Q_UPPER, {**request, "note": "hi"})
    with pytest.raises(PatchFormatError, match=r"signed\.request: expected only keys"):
        unpack(bad)


def _refuses(data: bytes, match: str, error=PatchFormatError, named: bool = True):
    with pytest.raises(error, match=match) as info:
        unpack(data, source="x.pepatch")
    assert "\n" not in str(info.value)
    if named:  # container-level messages name the file they refuse
        assert str(info.value).startswith("x.pepatch: ")
    return info.value


def test_container_extra_member(tiny):
    manifest, graph = tiny
    data = zip_members([(MANIFEST_NAME, envelope_text(manifest).encode()), (GRAPH_NAME, graph), ("evil.sh", b"rm -rf /")])
    _refuses(data, r"expected exactly members \['manifest.json', 'patch.onnx'\], found .*evil\.sh")


def test_container_duplicate_member(tiny):
    manifest, graph = tiny
    with pytest.warns(UserWarning, match="Duplicate name"):
        data = zip_members([(MANIFEST_NAME, envelope_text(manifest).encode()), (GRAPH_NAME, graph), (GRAPH_NAME, graph)])
    _refuses(data, r"expected exactly members")


@pytest.mark.parametrize("keep", [MANIFEST_NAME, GRAPH_NAME])
def test_container_missing_member(tiny, keep):
    manifest, graph = tiny
    content = {MANIFEST_NAME: envelope_text(manifest).encode(), GRAPH_NAME: graph}
    _refuses(zip_members([(keep, content[keep])]), r"expected exactly members")


def test_container_subfolder_member_names(tiny):
    manifest, graph = tiny
    data = zip_members([("a/" + MANIFEST_NAME, envelope_text(manifest).encode()), (GRAPH_NAME, graph)])
    _refuses(data, r"expected exactly members")


@pytest.mark.parametrize("data", [b"", b"hello world", b"PK\x03\x04" + b"\0" * 60, b"\x08\x0a" * 100], ids=["empty", "text", "zip-magic-only", "protobuf-ish"])
def test_container_not_a_zip(data):
    _refuses(data, r"expected a patch file \(zip container\)")


@pytest.mark.parametrize("cut", ["one", "30", "half", "minus22", "minus1"])
def test_container_truncated(tiny, cut):
    data = pack(*tiny)
    n = {"one": 1, "30": 30, "half": len(data) // 2, "minus22": len(data) - 22, "minus1": len(data) - 1}[cut]
    _refuses(data[:n], r".")


def test_container_oversize(tiny, monkeypatch, tmp_path):
    data = pack(*tiny)
    assert unpack(data).manifest == tiny[0]
    monkeypatch.setattr(patchfile, "MAX_PATCH_BYTES", len(data) - 1)
    _refuses(data, rf"expected at most {len(data) - 1} bytes, found {len(data)}")
    path = tmp_path / "big.pepatch"
    path.write_bytes(data)
    with pytest.raises(PatchFormatError, match=r"big\.pepatch: expected at most"):
        read_patch_file(path)


def test_container_member_over_cap(tiny, monkeypatch):
    """A member's declared size is checked before it is decompressed (zip bombs)."""
    data = pack(*tiny)
    monkeypatch.setattr(patchfile, "MAX_MANIFEST_BYTES", 100)
    _refuses(data, r"member manifest\.json expected <= 100 bytes")


def test_container_unsupported_compression(tiny):
    manifest, graph = tiny
    data = zip_members([(MANIFEST_NAME, envelope_text(manifest).encode()), (GRAPH_NAME, graph)], zipfile.ZIP_BZIP2)
    _refuses(data, r"stored or deflated, found .* compression 12")


def test_container_other_encoding_of_same_content_refused(tiny):
    """Same manifest and graph, stored instead of deflated: content-equal but not the canonical bytes."""
    manifest, graph = tiny
    data = zip_members([(MANIFEST_NAME, envelope_text(manifest).encode()), (GRAPH_NAME, graph)], zipfile.ZIP_STORED)
    _refuses(data, r"canonical container encoding")


def pack_text(text: str, graph: bytes) -> bytes:
    """pack()'s exact zip encoding around any manifest text."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for name, data, level in ((MANIFEST_NAME, text.encode(), 6), (GRAPH_NAME, graph, 1)):
            info = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, data, compresslevel=level)
    return buf.getvalue()


def test_container_other_json_spelling_refused(tiny):
    """A manifest the schema accepts but spelt differently (ints for floats, id derived from that text)
    is not the canonical file of its content."""
    manifest, graph = tiny
    assert pack_text(envelope_text(manifest), graph) == pack(manifest, graph)  # the zip fields are pack's
    doc = manifest.to_json()
    doc["specification"] = {"q_lower": -1000, "q_upper": -1}
    doc["patch_id"] = derive_patch_id(doc)
    assert Manifest.from_json(doc).q_upper == -1.0
    text = json.dumps({"signed": doc, "signatures": []}, sort_keys=True, separators=(",", ":"))
    _refuses(pack_text(text, graph), r"canonical container encoding")
    # Same content, keys in another order: also not canonical.
    _refuses(pack_text(json.dumps(manifest.envelope(), separators=(",", ":")), graph), r"canonical container encoding")


def test_container_trailing_junk_refused(tiny):
    _refuses(pack(*tiny) + b"junk", r"canonical container encoding")


@pytest.mark.parametrize(
    "signatures",
    [[{"keyid": "00" * 32, "sig": "ff" * 64}], ["x"]],
    ids=["signature-object", "signature-string"],
)
def test_container_nonempty_signatures(tiny, signatures):
    data = pack(*tiny, signatures=signatures)
    _refuses(data, rf"expected an empty signatures list in format {FORMAT_VERSION}")


def test_container_signatures_not_list(tiny):
    manifest, graph = tiny
    env = json.dumps({"signed": manifest.to_json(), "signatures": {}})
    _refuses(zip_members([(MANIFEST_NAME, env.encode()), (GRAPH_NAME, graph)]), r"expected an empty signatures list")


@pytest.mark.parametrize(
    "envelope",
    [b"not json", b"\xff\xfe\x00", b"[]", b'{"signed": {}}', b'{"signed": {}, "signatures": [], "x": 1}'],
    ids=["text", "binary", "list", "no-signatures", "extra-key"],
)
def test_container_bad_envelope(tiny, envelope):
    _refuses(zip_members([(MANIFEST_NAME, envelope), (GRAPH_NAME, tiny[1])]), r"manifest\.json expected")


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_container_non_finite_json(tiny, constant):
    """Python's json accepts NaN/Infinity literals; the reader must not."""
    manifest, graph = tiny
    text = envelope_text(manifest)
    needle = '"gamma":1.5'
    assert needle in text
    bad = text.replace(needle, f'"gamma":{constant}', 1)
    _refuses(zip_members([(MANIFEST_NAME, bad.encode()), (GRAPH_NAME, graph)]), rf"expected valid JSON, found non-finite number {constant}")


def test_container_nan_written_by_pack_is_refused(tiny):
    """Even a manifest object carrying NaN that pack() writes out is refused on reading."""
    manifest, graph = tiny
    rec = dataclasses.replace(manifest.records[0], alpha=(float("nan"), 0.5))
    data = pack(dataclasses.replace(manifest, records=(rec, *manifest.records[1:])), graph)
    _refuses(data, r"non-finite number NaN")


def _nested(depth: int, kind: str) -> str:
    return "[" * depth + "]" * depth if kind == "list" else '{"a":' * depth + "0" + "}" * depth


DEEP_SPOTS = {  # where a nested value goes in an otherwise valid envelope
    "request": lambda env, v: env["signed"].__setitem__("request", v),
    "request.classes": lambda env, v: env["signed"]["request"].__setitem__("classes", v),
    "records.0.alpha": lambda env, v: env["signed"]["records"][0].__setitem__("alpha", [v, 0.5]),
    "chain.after": lambda env, v: env["signed"]["chain"].__setitem__("after", [v]),
    "signatures": lambda env, v: env.__setitem__("signatures", v),
}
_HOLE = "@@nested@@"


def _deep_file(manifest: Manifest, graph: bytes, spot: str, depth: int, kind: str) -> bytes:
    env = json.loads(envelope_text(manifest))
    DEEP_SPOTS[spot](env, _HOLE)
    text = json.dumps(env, sort_keys=True, separators=(",", ":")).replace(json.dumps(_HOLE), _nested(depth, kind))
    return pack_text(text, graph)


@pytest.mark.parametrize("kind", ["list", "object"])
@pytest.mark.parametrize("spot", sorted(DEEP_SPOTS))
def test_container_deeply_nested_json(tiny, spot, kind):
    """JSON nested far deeper than the format (100,000 levels) is a format refusal naming the file,
    never a RecursionError out of the reader."""
    _refuses(_deep_file(*tiny, spot, 100_000, kind), r"manifest\.json expected JSON nested a few levels, found nesting too deep")


def test_container_nesting_near_the_recursion_limit(tiny):
    """Around the interpreter's recursion limit the value is either too deep to parse or parsed and
    refused by the schema; neither path (parse, error message, id hashing) may raise RecursionError."""
    limit = sys.getrecursionlimit()
    outcomes = set()
    for spot in sorted(DEEP_SPOTS):
        for depth in range(max(1, limit - 300), limit + 50):
            try:
                unpack(_deep_file(*tiny, spot, depth, "list"), source="x.pepatch")
            except PatchFormatError as exc:
                outcomes.add("too deep" if "nesting too deep" in str(exc) else "schema")
            else:
                pytest.fail(f"{spot} nested {depth} deep was accepted")
    assert outcomes == {"too deep", "schema"}  # the sweep crossed the parser's limit


def test_container_invalid_manifest_inside(tiny):
    manifest, graph = tiny
    doc = manifest.to_json()
    doc["format_version"] = FORMAT_VERSION + 1
    doc["patch_id"] = derive_patch_id(doc)
    env = json.dumps({"signed": doc, "signatures": []})
    _refuses(zip_members([(MANIFEST_NAME, env.encode()), (GRAPH_NAME, graph)]), rf"signed\.format_version: expected {FORMAT_VERSION}")


def test_container_edited_manifest_without_new_id(tiny):
    """A manifest field edited inside a file, its id left as it was: refused, naming patch_id."""
    manifest, graph = tiny
    doc = manifest.to_json()
    doc["records"][0]["upper"][0] += 5.0
    env = json.dumps({"signed": doc, "signatures": []}, sort_keys=True, separators=(",", ":"))
    _refuses(pack_text(env, graph), NOT_DERIVED + rf", found '{manifest.patch_id}'")
    # pack() writes what it is given: the same edit on a Manifest object is refused the same way.
    rec = dataclasses.replace(manifest.records[0], upper=(manifest.records[0].upper[0] + 5.0, *manifest.records[0].upper[1:]))
    _refuses(pack(dataclasses.replace(manifest, records=(rec, *manifest.records[1:])), graph), NOT_DERIVED)


def test_graph_digest_mismatch(tiny):
    manifest, graph = tiny
    other = make_patch(p=3, seed=1)[1]
    assert len(other) == len(graph) and other != graph
    err = _refuses(pack(manifest, other), r"patch\.onnx expected sha256", IntegrityError)
    assert err.check == "integrity"
    # Right digest, wrong length (the id re-derived, so only the graph disagrees): also refused.
    err = _refuses(pack(rederive(manifest, graph_bytes=len(graph) + 1), graph), r"bytes\), found", IntegrityError)
    assert err.check == "integrity"
    # Right length, another graph's digest.
    _refuses(pack(rederive(manifest, graph_sha256=sha256_bytes(other)), graph), r"patch\.onnx expected sha256", IntegrityError)
    # A graph with one byte appended.
    _refuses(pack(manifest, graph + b"\0"), r"patch\.onnx expected sha256", IntegrityError)


def test_error_tree():
    for cls in (PatchFormatError, IntegrityError, StructureError):
        assert issubclass(cls, PatchVerificationError) and issubclass(cls, ValueError)


# ----------------------------------------------------------------------------- canonical graph
def reference_pre(z: np.ndarray, params: PatchParams) -> tuple[np.ndarray, np.ndarray]:
    """((N, P) float32 pre, (N, P) int excess) as the gate defines them, written out per coordinate:
    excess = 2 sum_i relu(-s_i v_i) with v the odd integers of float32 z, pre = 1 - gamma delta/4 excess
    (the one float32 product and sum the graph does)."""
    v = quantize(np.asarray(z, np.float32), params.scale_log2).astype(np.int64)
    excess = 2 * np.maximum(-params.signs[None].astype(np.int64) * v[:, None, :], 0).sum(axis=2)
    neg_w = params.gamma * np.float32(-params.delta / 4)  # a power-of-two scaling: exact
    return excess.astype(np.float32) * neg_w[None] + np.float32(1.0), excess


def reference_selection(z: np.ndarray, params: PatchParams) -> np.ndarray:
    """(N, P) int64 selection scores v_A . s_k,A on the records' selection values A, written out."""
    v = quantize(np.asarray(z, np.float32), params.scale_log2).astype(np.int64)
    a = selection_neurons(params.signs)
    return (v[:, None, a] * params.signs[None, :, a].astype(np.int64)).sum(axis=2)


def reference_match(z: np.ndarray, params: PatchParams) -> tuple[np.ndarray, np.ndarray]:
    """((N,) int64 k, (N,) bool has): the first record whose signs on the selection values A are the
    input's (the sign of v, i.e. [z / delta >= 0]), written out as a search over the records; k = 0 where none."""
    v = quantize(np.asarray(z, np.float32), params.scale_log2)
    a = selection_neurons(params.signs)
    equal = ((v[:, None, a] > 0) == (params.signs[None, :, a] > 0)).all(axis=2)  # (N, P)
    has = equal.any(axis=1)
    return np.where(has, equal.argmax(axis=1), 0), has


def reference_patch(z: np.ndarray, f: np.ndarray, params: PatchParams):
    """(out float64, gate, k*, pre) of format 8: one record acts, ``out = f + g (T_k* f + t_k*)`` with k*
    the first record whose signs on A are the input's and g = clip(pre[k*], 0, 1), its own gate; g = 0
    where no record has the input's signs on A. k* here is the product form's: the first maximal
    selection score, which is the matched record wherever there is one (checked)."""
    pre, _ = reference_pre(z, params)
    k = reference_selection(z, params).argmax(axis=1)
    k_match, has = reference_match(z, params)
    np.testing.assert_array_equal(k[has], k_match[has])
    g = np.where(has, np.clip(pre[np.arange(len(pre)), k], 0.0, 1.0), np.float32(0.0)).astype(np.float32)
    f64 = f.astype(np.float64)
    corr = np.einsum("ncd,nd->nc", params.T[k].astype(np.float64), f64) + params.t[k].astype(np.float64)
    return f64 + g[:, None].astype(np.float64) * corr, g, k, pre


def summed_patch(z: np.ndarray, f: np.ndarray, params: PatchParams) -> np.ndarray:
    """What format 2 computed: every open gate adds its record, ``f + sum_k g_k (T_k f + t_k)``."""
    pre, _ = reference_pre(z, params)
    g = np.clip(pre, 0.0, 1.0).astype(np.float64)
    f64 = f.astype(np.float64)
    return f64 + np.einsum("nk,kcd,nd->nc", g, params.T.astype(np.float64), f64) + g @ params.t.astype(np.float64)


def feeds(z: np.ndarray, f: np.ndarray, gated: tuple[GatedTensor, ...] = GATED) -> dict[str, np.ndarray]:
    out, at = {}, 0
    for g in gated:
        out[g.name] = np.ascontiguousarray(z[:, at : at + g.size].reshape(len(z), *g.shape), dtype=np.float32)
        at += g.size
    out[LOGITS] = f.astype(np.float32)
    return out


def session(model: onnx.ModelProto, *extra_outputs: str) -> ort.InferenceSession:
    model = copy.deepcopy(model)
    for name in extra_outputs:
        model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def run(params: PatchParams, z: np.ndarray, f: np.ndarray | None = None, form: str | None = None):
    """(out, gate (N,), k (N,), pre (N, P)) of the canonical graph of ``params`` on onnxruntime; pre is every
    record's gate before the clip as :func:`reference_pre` writes it out, after checking that the device's
    acting record is the reference's and that its pre (tapped) is the reference's, bit for bit."""
    f = np.zeros((len(z), params.n_classes), np.float32) if f is None else f
    model = build_patch_graph(GATED, LOGITS, params, OPSET, IR, form or form_of(params))
    out, gate, k, gpre = session(model, GATE, K, GPRE).run(None, feeds(z, f))
    pre, _ = reference_pre(z, params)
    np.testing.assert_array_equal(k, reference_selection(z, params).argmax(axis=1))
    np.testing.assert_array_equal(gpre[:, 0], pre[np.arange(len(z)), k])
    return out, gate.reshape(-1), k, pre


FORMS = ("affine", "shift", "collapse")


@pytest.fixture(scope="module", params=FORMS)
def canonical(request):
    """A random patch graph in each form: general T, T = 0 (shift) and T = -I (collapse)."""
    form = request.param
    params = with_form(random_params(np.random.default_rng(7), p=4), form)
    model = build_patch_graph(GATED, LOGITS, params, OPSET, IR, form)
    return params, model, form


def test_canonical_graph_is_valid_onnx(canonical):
    params, model, form = canonical
    onnx.checker.check_model(model, full_check=True)
    g = model.graph
    assert [i.name for i in g.input] == [t.name for t in GATED] + [LOGITS]
    assert [o.name for o in g.output] == [OUTPUT_NAME] == [PREFIX + "logits"]
    names = {t for n in g.node for t in n.output} | {i.name for i in g.initializer} | {n.name for n in g.node}
    assert all(n.startswith(PREFIX) for n in names), "every patch-internal name carries the fixed prefix"
    assert model.opset_import[0].version == OPSET and model.ir_version == IR
    # The parameters, by their canonical names, dtypes and shapes.
    inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    p = params.n_records
    # format 4: one bit per sign, (M, ceil(P/8)) uint8, first record in the high bit, padding 0
    assert "pe_g0_signs" not in inits
    packed = inits["pe_g0_signs_packed"]
    assert packed.dtype == np.uint8 and packed.shape == (M, (p + 7) // 8)
    bits = np.unpackbits(packed, axis=1)
    np.testing.assert_array_equal(bits[:, :p], (params.signs.T > 0).astype(np.uint8))
    assert not bits[:, p:].any()
    assert inits["pe_g0_neg_w"].dtype == np.float32 and inits["pe_g0_neg_w"].shape == (p,)
    np.testing.assert_array_equal(inits["pe_g0_neg_w"], -(params.gamma * np.float32(params.delta / 4)))
    # format 6: the selection values, a function of the signs (the device recomputes them)
    np.testing.assert_array_equal(inits["pe_g0_select"], selection_neurons(params.signs))
    assert inits["pe_g0_inv_delta"].shape == () and inits["pe_g0_inv_delta"] == np.float32(1 / DELTA)
    assert "pe_g0_half" not in inits  # no shift by half a step: the sign comes from a comparison
    assert inits["pe_t_table"].dtype == np.float32 and inits["pe_t_table"].shape == (p, C)
    np.testing.assert_array_equal(inits["pe_t_table"], params.t)
    assert ("pe_T_table" in inits) == (form == "affine")
    if form == "affine":
        assert inits["pe_T_table"].shape == (p, C, C)
        np.testing.assert_array_equal(inits["pe_T_table"], params.T)
    # One record acts: one integer product over the selection values only, an argmax over its scores, no
    # product over all records' corrections.
    ops = [n.op_type for n in g.node]
    assert ops.count("MatMulInteger") == 1 and ops.count("ArgMax") == 2 and "TopK" not in ops and "Gemm" not in ops
    assert [n.input for n in g.node if n.op_type == "MatMulInteger"] == [["pe_g0_va_sel", "pe_g0_sel_table", "pe_zp"]]
    assert [n.input[0] for n in g.node if n.op_type == "MatMul"] == (["pe_Tk"] if form == "affine" else [])
    # Same inputs -> same bytes.
    assert build_patch_graph(GATED, LOGITS, params, OPSET, IR, form).SerializeToString() == model.SerializeToString()


def test_build_patch_graph_refuses_what_it_cannot_build():
    params = random_params(np.random.default_rng(0), p=2)
    with pytest.raises(ValueError, match=r"opset >= 13"):
        build_patch_graph(GATED, LOGITS, params, 12, IR, "affine")
    with pytest.raises(ValueError, match=r"form: expected one of"):
        build_patch_graph(GATED, LOGITS, params, OPSET, IR, "general")
    with pytest.raises(ValueError, match=r"signs have 11 columns, gated tensors hold 3 values"):
        build_patch_graph(GATED[1:], LOGITS, params, OPSET, IR, "affine")


def test_extract_params_round_trip(canonical):
    params, model, form = canonical
    back = extract_params(model, params.n_records, M, C, form)
    np.testing.assert_array_equal(back.signs, params.signs)
    np.testing.assert_array_equal(back.gamma, params.gamma)  # exactly: neg_w is a power-of-two rescaling
    np.testing.assert_array_equal(back.T, params.T)
    np.testing.assert_array_equal(back.t, params.t)
    assert back.scale_log2 == params.scale_log2
    rebuilt = build_patch_graph(GATED, LOGITS, back, OPSET, IR, form)
    assert rebuilt == model


def _replace_init(model: onnx.ModelProto, name: str, array: np.ndarray | None) -> onnx.ModelProto:
    model = copy.deepcopy(model)
    inits = model.graph.initializer
    i = next(j for j, t in enumerate(inits) if t.name == name)
    del inits[i]
    if array is not None:
        inits.insert(i, numpy_helper.from_array(array, name))
    return model


@pytest.mark.parametrize(
    "name,array,match",
    [
        ("pe_g0_inv_delta", np.array(0.3, np.float32), r"quantization step expected a power of two"),
        ("pe_g0_inv_delta", np.array(2.0**30, np.float32), r"quantization step expected a power of two 2\^-24\.\.2\^8"),
        ("pe_g0_inv_delta", np.array(np.inf, np.float32), r"quantization step"),
        ("pe_g0_inv_delta", np.array(-256.0, np.float32), r"quantization step"),
        ("pe_g0_signs_packed", np.full((M, 1), 0xFF, np.uint8), r"sign padding bits expected 0, found 44 set"),
        ("pe_g0_signs_packed", np.ones((M, 1), np.int8), r"'pe_g0_signs_packed' expected dtype UINT8 shape \(11, 1\)"),
        ("pe_g0_signs_packed", np.ones((M, 4), np.uint8), r"'pe_g0_signs_packed' expected dtype UINT8 shape \(11, 1\)"),
        ("pe_g0_neg_w", np.ones((1, 4), np.float32), r"'pe_g0_neg_w' expected dtype FLOAT shape \(4,\)"),
        ("pe_t_table", np.ones((4, C + 1), np.float32), r"'pe_t_table' expected dtype FLOAT shape \(4, 3\)"),
        ("pe_T_table", None, r"expected initializer 'pe_T_table', found none"),
    ],
    ids=["delta-not-pow2", "delta-too-fine", "delta-inf", "delta-negative", "signs-padding", "signs-int8", "signs-unpacked",
         "neg_w-shape", "t-shape", "T-missing"],
)
def test_extract_params_refuses_non_canonical_tensors(name, array, match):
    params = random_params(np.random.default_rng(7), p=4)
    model = _replace_init(build_patch_graph(GATED, LOGITS, params, OPSET, IR, "affine"), name, array)
    with pytest.raises(StructureError, match=match):
        extract_params(model, params.n_records, M, C, "affine")


def test_canonical_graph_matches_reference(canonical):
    params, model, form = canonical
    rng = np.random.default_rng(11)
    n_each = 40
    rows = []
    for k in range(params.n_records):
        s = params.signs[k].astype(np.float64)
        inside = s * rng.uniform(0.05, 2.0, size=(n_each, M))  # exactly in record k's region
        partial = inside.copy()
        flip = rng.integers(0, M, size=n_each)
        partial[np.arange(n_each), flip] = -s[flip] * rng.uniform(0.001, 0.6 / params.gamma[k], size=n_each)
        rows += [inside, partial]
    rows.append(rng.normal(scale=DELTA, size=(2 * n_each, M)))  # near every boundary: many gates partly open
    rows.append(rng.normal(scale=1.5, size=(n_each, M)))  # anywhere
    z = np.concatenate(rows).astype(np.float32)
    f = (rng.normal(size=(len(z), C)) * 5).astype(np.float32)
    ref, g, k, pre = reference_patch(z, f, params)
    # The inputs cover closed, partially open and fully open gates, and rows with several open gates.
    assert (g == 1.0).any() and (g == 0.0).any() and ((g > 0.05) & (g < 0.95)).any()
    assert ((pre > 0.05).sum(axis=1) >= 2).sum() > 20
    sess = session(model, GATE, K, SEL, GPRE)
    out, gate, k_dev, sel_dev, gpre_dev = sess.run(None, feeds(z, f))
    p = params.n_records
    assert sel_dev.shape == (len(z), -(-p // SELECT_BLOCK) * SELECT_BLOCK) and sel_dev.dtype == np.int32
    assert (sel_dev[:, p:] == sel_dev[:, p - 1 : p]).all()  # padding: copies of the last record's column
    assert out.dtype == np.float32 and out.shape == (len(z), C)
    assert gate.shape == (len(z), 1) and k_dev.shape == (len(z),) and k_dev.dtype == np.int64
    # Selection and gate are integer arithmetic and one float32 product: the device's numbers are the reference's.
    np.testing.assert_array_equal(sel_dev[:, :p], reference_selection(z, params))
    np.testing.assert_array_equal(gpre_dev[:, 0], pre[np.arange(len(z)), k])
    np.testing.assert_array_equal(k_dev, k)
    np.testing.assert_array_equal(gate[:, 0], g)
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-4)
    # Batch independence: one row at a time gives the same numbers (dynamic batch).
    single = np.concatenate([sess.run(None, feeds(z[i : i + 1], f[i : i + 1]))[0] for i in range(0, len(z), 37)])
    np.testing.assert_allclose(single, out[::37], rtol=0, atol=5e-5)


@pytest.mark.parametrize("opset", [MIN_OPSET, OPSET])  # ReduceMax's axes: an attribute before 18, an input from it
def test_block_argmax_is_the_first_max_across_blocks(opset):
    """k* is the first maximal selection score of the row, as a TopK would pick it, with 70 records in three
    blocks (the last one padded with copies of record 69): near-boundary inputs make equal scores in
    different blocks common, so the search for a row where the block argmax picks a later record (or a
    padding column) has many chances. Where the gate is open (format 8: the best score is |v_A|_1), such a
    tie is between records with the same pattern: records 45, 66 and 69 repeat 3, 20 and 10 (other gates and
    tables), in later blocks and in the padding, and inputs on and beside those regions must get the first."""
    rng = np.random.default_rng(17)
    base = random_params(rng, p=70)
    signs = base.signs.copy()
    signs[[45, 66, 69]] = signs[[3, 20, 10]]
    params = PatchParams(signs, np.where(np.arange(70) % 3 == 0, 1.0, 2.0), base.T, base.t, base.scale_log2)
    z = rng.normal(scale=DELTA, size=(3000, M)).astype(np.float32)
    z[:200] = np.repeat(params.signs[::7], 20, axis=0) * DELTA  # inside some records' regions (gate 1)
    dup = np.repeat(params.signs[[3, 20, 10]], 40, axis=0) * rng.uniform(0.5, 3.0, size=(120, M)) * DELTA
    rest = np.setdiff1d(np.arange(M), selection_neurons(params.signs))
    j = rng.choice(rest, size=60)
    dup[np.arange(0, 120, 2), j] *= -0.3  # every other one beside the region: one violation outside A
    z[200:320] = dup
    f = (rng.normal(size=(len(z), C)) * 5).astype(np.float32)
    ref, g, k, pre = reference_patch(z, f, params)
    model = build_patch_graph(GATED, LOGITS, params, opset, IR, "affine")
    out, gate, k_dev = session(model, GATE, K).run(None, feeds(z, f))
    sel = reference_selection(z, params)
    top = sel == sel.max(axis=1, keepdims=True)
    blocks_at_max = np.array([len(np.unique(np.flatnonzero(row) // SELECT_BLOCK)) for row in top])
    assert (blocks_at_max >= 2).sum() > 100 and ((blocks_at_max >= 2) & (g > 0)).sum() > 20  # the hard cases occur
    assert set(k[200:320]) == {3, 20, 10} and ((g[200:320] > 0) & (g[200:320] < 1)).sum() > 20
    assert (g == 1).sum() >= 200 and ((g > 0) & (g < 1)).any()
    np.testing.assert_array_equal(k_dev, k)
    np.testing.assert_array_equal(gate[:, 0], g)
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-4)
    # the device's lookup stores the first record of each pattern: the same gates, the same records where open
    out_l, gate_l, k_l = session(build_patch_graph(GATED, LOGITS, params, opset, IR, "affine", lookup=True), GATE, K).run(None, feeds(z, f))
    assert out_l.tobytes() == out.tobytes() and gate_l.tobytes() == gate.tobytes()
    np.testing.assert_array_equal(k_l[g > 0], k[g > 0])


def test_canonical_graph_closed_gates_are_bit_exact(canonical):
    params, model, form = canonical
    rng = np.random.default_rng(3)
    z = (rng.normal(size=(500, M)) * 50).astype(np.float32)
    f = (rng.normal(size=(500, C)) * 10).astype(np.float32)
    _, g, _, pre = reference_patch(z, f, params)
    keep = (pre <= 0).all(axis=1)  # every gate closed
    assert keep.sum() > 100 and (g[keep] == 0).all() and (pre[keep] < -1).any()
    out = session(model).run(None, feeds(z[keep], f[keep]))[0]
    assert np.array_equal(out.view(np.uint32), f[keep].view(np.uint32)), "closed gates must return the base logits bit for bit"
    # A gate exactly at its edge (pre = 0, not below) is closed too: gamma 16 and one |v| = 1 violation
    # give pre = 1 - 16 * delta/4 * 2 = 0 for that record, and <= 0 for every other pattern.
    edge = PatchParams(params.signs, np.full(params.n_records, 16.0), params.T, params.t, params.scale_log2)
    zk = np.repeat(params.signs.astype(np.float32), 3, axis=0)
    zk[np.arange(len(zk)), np.arange(len(zk)) % M] = np.where(zk[np.arange(len(zk)), np.arange(len(zk)) % M] > 0, -1e-3 * DELTA, 0.0)
    fk = (rng.normal(size=(len(zk), C)) * 10).astype(np.float32)
    out, gate, _, pre = run(edge, zk, fk, form)
    assert (pre.max(axis=1) == 0).all() and (gate == 0).all()
    assert np.array_equal(out.view(np.uint32), fk.view(np.uint32))
    # Sanity: the same graph does change logits once a gate opens.
    zin = (params.signs[0].astype(np.float32) * 1.0)[None]
    out_open = session(model).run(None, feeds(zin, f[:1]))[0]
    assert not np.array_equal(out_open, f[:1])


UNPACK_OPS = ["Cast", "Gather", "Reshape", "Slice"]  # the sign unpacking of format 4, all on constants


def test_canonical_graph_already_simple(canonical):
    """onnxsim folds exactly the parameter path (format 4's sign unpacking, then the signs padded and
    stacked over the |v|_1 rows of the integer product, the weights negated and padded: constants
    onnxruntime folds at load too), never a node that reads the data (the tables are gathered by the
    data-dependent k*)."""
    onnxsim = pytest.importorskip("onnxsim")
    params, model, form = canonical
    simplified, ok = onnxsim.simplify(copy.deepcopy(model))
    assert ok
    constant, folded = {i.name for i in model.graph.initializer}, []
    for n in model.graph.node:  # topological order: constants propagate
        if all(i in constant for i in n.input if i):
            folded.append(n.name)
            constant.update(n.output)
    unpack = [n.name for n in model.graph.node if n.name.startswith(PREFIX + "g0_signs") and n.op_type in UNPACK_OPS]
    assert sorted(n.op_type for n in model.graph.node if n.name in unpack) == sorted(UNPACK_OPS)
    params_path = [PREFIX + "g0_" + k for k in ("rows", "sel_cols", "sel_table", "pos_w")]
    assert sorted(folded) == sorted(unpack + params_path)
    tables = {i.name: numpy_helper.to_array(i) for i in simplified.graph.initializer}
    p, a = params.signs.shape[0], selection_neurons(params.signs)
    np.testing.assert_array_equal(tables[PREFIX + "g0_rows"], params.signs)  # the unpacked signs, exactly
    np.testing.assert_array_equal(tables[PREFIX + "g0_sel_table"][:, :p], params.signs[:, a].T)
    flattens = sum(n.op_type == "Flatten" for n in model.graph.node)
    assert len(simplified.graph.node) >= len(model.graph.node) - len(folded) - flattens
    rng = np.random.default_rng(5)
    z = rng.normal(scale=DELTA, size=(16, M)).astype(np.float32)
    f = rng.normal(size=(16, C)).astype(np.float32)
    np.testing.assert_allclose(session(simplified).run(None, feeds(z, f))[0], session(model).run(None, feeds(z, f))[0], atol=1e-6)


def test_sign_unpacking_is_folded_by_onnxruntime(canonical, tmp_path):
    """The runtime's session (full optimisation) folds the sign unpacking, and the parameter path after
    it, into the int8 operand of the integer product at creation: the graph that runs has no sign lookup
    left, so packed storage costs no inference time."""
    params, model, form = canonical
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED  # as far as is portable to save
    opts.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    opt = onnx.load(tmp_path / "opt.onnx")
    inits = {i.name: i for i in opt.graph.initializer}
    assert not [n.name for n in opt.graph.node if n.name.startswith("pe_g0_signs")]
    assert "pe_g0_sign_lut" not in inits and "pe_g0_signs_packed" not in inits
    p, a = params.signs.shape[0], selection_neurons(params.signs)
    np.testing.assert_array_equal(numpy_helper.to_array(inits["pe_g0_rows"]), params.signs)
    np.testing.assert_array_equal(numpy_helper.to_array(inits["pe_g0_sel_table"])[:, :p], params.signs[:, a].T)


def test_gate_quantization_is_exactly_the_reference(canonical):
    """The device's Mul, Floor, QuantizeLinear, MatMulInteger and sums give exactly the integers the server
    reasons with: the odd v = 2 floor(z/delta) + 1 saturating at -128/127, sign(v) = [z >= 0], the
    selection scores v_A . s_A and every record's exact excess |v|_1 - v.s (ties, huge, tiny, zero and -0
    values; each record alone in a patch, so that it is the one whose excess the graph computes)."""
    params, model, form = canonical
    rng = np.random.default_rng(13)
    step = params.delta
    z = rng.normal(scale=20 * step, size=(240, M))
    z[:20] = (rng.integers(-600, 600, size=(20, M)) + 0.5) * step / 2  # exact ties of z/delta and neighbours
    z[20:30] = rng.choice([-1, 1], size=(10, M)) * 1e6  # saturation
    z[30:40] = rng.normal(scale=step / 10, size=(10, M))  # below half a step
    z[40] = -0.0
    z[41] = 0.0
    z[42:60] = rng.choice([0.0, -1e-3 * step, step / 2, -step / 2, step, -step, 63.75 * step, -64.5 * step], size=(18, M))
    z = z.astype(np.float32)
    zeros = np.zeros((len(z), C), np.float32)
    v_dev, sel_dev = session(model, VA, SEL).run([VA, SEL], feeds(z, zeros))
    excess_dev = np.stack([
        -2 * session(build_patch_graph(GATED, LOGITS, PatchParams(params.signs[k : k + 1], params.gamma[k : k + 1], params.T[k : k + 1],
                                                                 params.t[k : k + 1], params.scale_log2), OPSET, IR, form), NEX)
        .run([NEX], feeds(z, zeros))[0][:, 0]
        for k in range(params.n_records)
    ], axis=1)
    np.testing.assert_array_equal(sel_dev[:, : params.n_records], reference_selection(z, params))
    v = quantize(z, params.scale_log2)
    np.testing.assert_array_equal(v_dev.astype(np.int32) - 128, v)
    assert ((v % 2 == 1) | (v == -128)).all() and v.min() == -128 and v.max() == 127
    np.testing.assert_array_equal(np.sign(v), sign_pattern(z))  # the ReLU's own activation
    # hand-worked values: floor, so -0 and 0 are active and any negative, however tiny, is not
    worked = np.array([0.0, -0.0, -1e-3 * step, step / 2, step, 2 * step, 3 * step, -step, -1e6], np.float32)
    assert quantize(worked, params.scale_log2).tolist() == [1, 1, -1, 1, 3, 5, 7, -1, -128]
    # the graph's |v|_1 - v.s is, exactly, twice the summed disagreement written out per coordinate
    _, excess = reference_pre(z, params)
    np.testing.assert_array_equal(excess_dev, excess)
    np.testing.assert_array_equal(excess_of(v, params.signs), excess)
    assert (excess % 2 == 0).all() and ((excess == 0) == (sign_pattern(z)[:, None, :] == params.signs[None]).all(axis=2)).all()


def test_integer_arithmetic_is_exact_at_extreme_codes():
    """The selection's uint8 x int8 MatMulInteger and the acting record's excess are exact at the codes
    where x86 kernels without VNNI saturate (they add adjacent products in int16) and where float32 sums
    are largest: a gated width of a real base (1,016 values), every input saturated (codes 0 and 255)
    or at |v|_1 up to 127 x 1,016, records of every extreme pattern; batch 1 and 64 (the vector and matrix
    paths). Format 4's product (weights of -128 beside codes of 255) failed here on an AVX2-only CPU;
    format 6's product has weights +-1 only. Then across patches: two gate groups composed, each picking
    its record, the more open of the two acting."""
    m = 1016
    gated = (GatedTensor("wide", (m,)),)
    rng = np.random.default_rng(5)
    step = 2.0**STEP_LOG2
    rows = [np.full(m, 1e6), np.full(m, -1e6), np.where(np.arange(m) % 2, 1e6, -1e6), np.zeros(m), np.full(m, -0.0)]
    rows += list(rng.choice([-1e6, 1e6], size=(27, m)))
    for target in (m, m + 2, 64 * 127, 64 * 254 + 2, 127 * m - 2):  # |v|_1 from its least to nearly its most
        steps = (target - m) // 2  # each coordinate rises from 1 to 127 in 63 steps of 2
        v = np.ones(m)
        v[: steps // 63] = 127
        v[steps // 63] += 2 * (steps % 63)
        assert np.abs(v).sum() == target
        rows.append((v - 1) / 2 * step)  # floor(z / step) = (v - 1) / 2 exactly
    z = np.array(rows, np.float32)
    z = np.concatenate([z, (z * rng.choice([-1, 1], size=z.shape)).astype(np.float32)])
    signs = np.stack([np.ones(m), -np.ones(m), np.where(np.arange(m) % 2, 1, -1), *rng.choice([-1, 1], size=(13, m))])
    signs = np.concatenate([signs, sign_pattern(z[:8])]).astype(np.int8)
    signs = np.unique(signs, axis=0)  # distinct patterns (z[3] and z[4] read alike)
    p = len(signs)
    params = PatchParams(signs, np.full(p, 1e-6), np.zeros((p, C, C)), np.ones((p, C)), STEP_LOG2)
    model = build_patch_graph(gated, LOGITS, params, OPSET, IR, "shift")
    table = numpy_helper.to_array({i.name: i for i in model.graph.initializer}[PREFIX + "g0_select"])
    assert len(table) < m // 20  # a few values select among these patterns
    sess = session(model, SEL, NEX, K)
    v = quantize(z, STEP_LOG2)
    want_sel = v[:, table].astype(np.int64) @ signs[:, table].T.astype(np.int64)
    excess = excess_of(v, signs)
    assert excess.max() >= 2 * 127 * (m - 8) and (excess == 0).sum() >= 8 and np.abs(want_sel).max() >= 127 * len(table)
    for batch in (1, 64):
        sel, nex, k = (np.concatenate(parts) for parts in zip(*[
            sess.run([SEL, NEX, K], {"wide": z[i : i + batch], LOGITS: np.zeros((len(z[i : i + batch]), C), np.float32)})
            for i in range(0, len(z), batch)
        ]))
        np.testing.assert_array_equal(sel[:, :p], want_sel)
        np.testing.assert_array_equal(k, want_sel.argmax(axis=1))
        np.testing.assert_array_equal(-2 * nex[:, 0], excess[np.arange(len(z)), k])
    # Across patches: a device composes every verified patch into one gate graph, one selection per group
    # of records with the same gated tensors and step (runtime.compose); two groups here, int8 tables.
    from prune_edge.runtime.patchgraph import GateGroup, gate_nodes

    gammas = (np.full(9, 1e-6, np.float32), np.full(p - 9, 2e-6, np.float32))
    groups = [GateGroup(gated, signs[:9], gammas[0], STEP_LOG2), GateGroup(gated, signs[9:], gammas[1], STEP_LOG2 - 1)]
    runs = {}
    for lookup in (False, True):  # the product form (scores tapped), then the lookup a device composes
        nodes, inits, gate_name, k_name = gate_nodes(PREFIX, groups, OPSET, screen=lookup)
        outs = [gate_name, k_name] + ([] if lookup else [PREFIX + "g0_sel", PREFIX + "g1_sel"])
        graph = onnx.helper.make_graph(nodes, "g", [onnx.helper.make_tensor_value_info("wide", onnx.TensorProto.FLOAT, ["N", m])],
                                       [onnx.helper.make_empty_tensor_value_info(o) for o in outs], inits)
        model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", OPSET)], ir_version=IR)
        runs[lookup] = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(outs, {"wide": z})
    (gate, k, s0, s1), (gate_l, k_l) = runs[False], runs[True]
    picks, gates = [], []
    for gi, (rows_g, scale, gam) in enumerate(((signs[:9], STEP_LOG2, gammas[0]), (signs[9:], STEP_LOG2 - 1, gammas[1]))):
        ref = PatchParams(rows_g, gam, np.zeros((len(rows_g), C, C)), np.ones((len(rows_g), C)), scale)
        sel_g = reference_selection(z, ref)
        np.testing.assert_array_equal((s0, s1)[gi][:, : len(rows_g)], sel_g)
        kg = sel_g.argmax(axis=1)
        has = sel_g.max(axis=1) == np.abs(quantize(z, scale)[:, selection_neurons(rows_g)]).sum(axis=1)
        np.testing.assert_array_equal(has, reference_match(z, ref)[1])
        picks.append(kg + (0, 9)[gi])
        gates.append(np.where(has, np.clip(reference_pre(z, ref)[0][np.arange(len(z)), kg], 0, 1), np.float32(0)))
    first = np.stack(gates, axis=1).argmax(axis=1)
    np.testing.assert_array_equal(k, np.stack(picks, axis=1)[np.arange(len(z)), first])
    np.testing.assert_array_equal(gate[:, 0], np.maximum(*gates))
    assert gate_l.tobytes() == gate.tobytes() and (k_l[gate[:, 0] > 0] == k[gate[:, 0] > 0]).all()
    assert (gate == 1).sum() >= 8 and len(np.unique(first[gate[:, 0] > 0])) == 2


def test_gate_reads_every_negative_as_inactive():
    """No gap between the gate and the ReLU: the sign comes from ``z < 0``, so every negative z, down to
    the smallest float32 subnormal and a dead unit's -1e-11, is read inactive, and 0, -0 active."""
    for e in (-8, -3, 0):
        d = 2.0**e
        tiny = [-d * 2.0**-24, -d * 2.0**-25, -d * 2.0**-30, -1e-11, -1e-38, -1.4e-45]
        z = np.array([tiny + [0.0, -0.0] + [1.0] * (M - 8)], np.float32)
        assert (z[0, :6] < 0).all()  # still negative in float32
        v = quantize(z, e)[0, :8]
        assert v.tolist() == [-1] * 6 + [1, 1]
        params = PatchParams(np.ones((1, M), np.int8), [1.0], np.zeros((1, C, C)), np.ones((1, C)), e)
        assert (run(params, z)[3][0] < 1).all()  # six coordinates read inactive: the all-active gate is not 1
        inactive = np.where(np.arange(M) < 6, -1, 1).astype(np.int8)[None]
        params = PatchParams(inactive, [1.0], np.zeros((1, C, C)), np.ones((1, C)), e)
        assert (run(params, z)[3][0] == 1).all()  # ... and the pattern that reads them inactive is fully open


def _on_region_values(rng: np.random.Generator, signs: np.ndarray, n: int, step: float) -> np.ndarray:
    """(n, M) float32 z with sign_pattern(z) == signs on every row: corner values (0, -0, half and whole
    steps, the smallest negatives the gate reads exactly, saturation) and random magnitudes."""
    active = np.array([0.0, -0.0, 1e-3 * step, step / 2, step, 3 * step, 1e5 * step, np.float32(1e-30)])
    inactive = np.array([-1e-3 * step, -step * 2.0**-24, -step / 2, -step, -3 * step, -1e5 * step])
    z = np.where(
        signs[None] > 0,
        rng.choice(active, size=(n, len(signs))),
        rng.choice(inactive, size=(n, len(signs))),
    )
    random_rows = rng.random(n) < 0.3
    z[random_rows] = signs[None] * np.exp(rng.uniform(np.log(step / 100), np.log(1e4 * step), size=(random_rows.sum(), len(signs))))
    z = z.astype(np.float32)
    assert (sign_pattern(z) == signs[None]).all()
    return z


def test_gate_is_exactly_one_on_the_region(canonical):
    """On record k's region (every gated z with k's sign pattern, z = 0 and -0 counting as active, tiny
    negatives as inactive, any magnitude) its gate is 1 bit for bit and k acts, for any gamma; one
    coordinate of the wrong sign, by the smallest amount, takes k's gate below 1."""
    params, model, form = canonical
    rng = np.random.default_rng(17)
    sharp = PatchParams(params.signs, np.full(params.n_records, 1e4), params.T, params.t, params.scale_log2)
    for p in (params, sharp):
        for k in range(p.n_records):
            z = _on_region_values(rng, p.signs[k], 200, p.delta)
            f = (rng.normal(size=(len(z), C)) * 5).astype(np.float32)
            out, gate, k_dev, pre = run(p, z, f, form)
            assert (pre[:, k] == 1.0).all() and (gate == 1.0).all() and (k_dev == k).all()
            others = np.delete(pre, k, axis=1)
            assert (others < 1.0).all()
            full = f.astype(np.float64) + np.einsum("cd,nd->nc", p.T[k].astype(np.float64), f) + p.t[k]
            np.testing.assert_allclose(out, full, rtol=0, atol=1e-4)  # k's whole correction, nothing else
            # One flipped sign, as small as the gate can see: 0 for an inactive coordinate, -1e-3 delta
            # for an active one. k's excess is 2, its gate 1 - gamma delta/2 < 1.
            flipped = z[:M].copy()
            cols = np.arange(M)
            flipped[cols, cols] = np.where(p.signs[k] > 0, -1e-3 * p.delta, 0.0)
            _, gate, k_dev, pre = run(p, flipped, form=form)
            expect = np.float32(1) - p.gamma[k] * np.float32(p.delta / 2)
            assert (pre[:, k] == expect).all() and (pre[:, k] < 1).all()
            assert ((k_dev != k) | (gate < 1)).all()
            # a flip outside A leaves k acting with its partial gate; a flip inside A leaves k's signs on A,
            # so k no longer acts, and no record at all where none has the flipped signs on A (gate 0); where
            # another record acts (run() checked its gate is its own), the gate is 1 only on its own region
            _, has = reference_match(flipped, p)
            outside = ~np.isin(cols, selection_neurons(p.signs))
            assert outside.any() and (~outside).any()
            assert has[outside].all() and (k_dev[outside] == k).all() and (gate[outside] == np.clip(expect, 0, 1)).all()
            assert (gate[~has] == 0).all()
            assert ((gate < 1) | (sign_pattern(flipped) == p.signs[k_dev]).all(axis=1)).all()


CORNERS = np.array([0.0, -0.0, 1e-3, -1e-3, 0.5, -0.5, 1.0, -1.0, 2.0**-26, -(2.0**-26), 1e5, -1e5])  # in steps


def test_two_patterns_never_both_have_gate_one():
    """Search for an input on which two different patterns both have gate 1: with all 2^11 patterns in
    one patch, every input must open exactly one gate fully, the pattern the gate reads (which is the
    ReLU's own, sign_pattern(z), everywhere), and that record acts. Inputs:
    random draws, boundary values (0, -0, +-tiny, +-delta/2, +-delta, below the slack) and mixtures."""
    rng = np.random.default_rng(23)
    patterns = ((np.arange(2**M)[:, None] >> np.arange(M)[None]) & 1).astype(np.int8) * 2 - 1
    p = len(patterns)
    params = PatchParams(patterns, rng.uniform(0.3, 16.0, size=p), np.zeros((p, C, C)), rng.normal(size=(p, C)), STEP_LOG2)
    z = np.concatenate(
        [
            rng.choice(CORNERS, size=(1500, M)) * DELTA,  # adversarial corners only
            rng.choice(CORNERS[:8], size=(500, M)) * DELTA,  # the tie values around 0 only
            rng.normal(scale=DELTA, size=(500, M)),
            rng.normal(scale=100 * DELTA, size=(300, M)),
            np.where(rng.random((200, M)) < 0.5, 0.0, -1e-3 * DELTA),  # z = 0 next to z = -tiny
        ]
    ).astype(np.float32)
    _, gate, k, pre = run(params, z)
    full = pre == 1.0
    assert (full.sum(axis=1) == 1).all(), f"{int((full.sum(axis=1) != 1).sum())} inputs open != 1 gate fully"
    opened = full.argmax(axis=1)
    assert (k == opened).all() and (gate == 1.0).all()
    read = np.sign(quantize(z, STEP_LOG2)).astype(np.int8)
    np.testing.assert_array_equal(patterns[opened], read)
    tiny_negative = ((z < 0) & (z >= -DELTA * 2.0**-25)).any(axis=1)
    assert 500 < tiny_negative.sum() < 2000  # the corners a rounding-based sign would misread
    np.testing.assert_array_equal(patterns[opened], sign_pattern(z))
    # every other pattern disagrees somewhere, so its excess is at least 2
    _, excess = reference_pre(z[:200], params)
    assert ((excess == 0).sum(axis=1) == 1).all() and (np.sort(excess, axis=1)[:, 1] >= 2).all()


def _neighbour_params(rng: np.random.Generator, form: str) -> PatchParams:
    """Records whose patterns differ from a base pattern in one or two coordinates, with wide gates:
    near the base region several of them are partly open at once."""
    s0 = rng.choice(np.array([-1, 1], np.int8), size=M)
    flips = np.ones((4, M), np.int8)
    flips[1, 0] = flips[2, 1] = flips[2, 2] = flips[3, 3] = -1  # base, one flip, two flips, one flip
    signs = s0[None] * flips
    p = len(signs)
    params = PatchParams(signs, rng.uniform(0.4, 0.8, size=p), rng.normal(size=(p, C, C)), rng.normal(size=(p, C)) * 3, STEP_LOG2)
    return with_form(params, form)


@pytest.mark.parametrize("form", FORMS)
def test_only_the_selected_record_acts(form):
    """Where several gates are partly open, the output is f + g (T_k* f + t_k*) of the selected record
    alone, with its own gate, not the sum over open records that format 2 computed; where one gate is 1
    that record is the one selected and the others' partial gates add nothing to it."""
    rng = np.random.default_rng(29)
    params = _neighbour_params(rng, form)
    s0 = params.signs[0].astype(np.float64)
    n = 600
    z = s0 * rng.uniform(0.0, 3 * DELTA, size=(n, M))
    flip = rng.random((n, 4)) < 0.4  # the first four coordinates decide between the records
    z[:, :4] = np.where(flip, -z[:, :4], z[:, :4])
    z = z.astype(np.float32)
    f = (rng.normal(size=(n, C)) * 5).astype(np.float32)
    out, gate, k, pre = run(params, z, f)
    ref, g, k_ref, _ = reference_patch(z, f, params)
    np.testing.assert_array_equal(k, k_ref)
    np.testing.assert_array_equal(gate, g)
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-4)
    open_gates = np.sort(np.clip(pre, 0, 1), axis=1)
    several = open_gates[:, -2] >= 0.1  # a second gate at least 0.1 open
    assert several.sum() > 100
    old = summed_patch(z, f, params)
    assert (np.abs(old - out).max(axis=1)[several] > 1e-3).all(), "the summed corrections would differ"
    # Fully open rows beside partly open neighbours: exactly the acting record's full correction.
    beside = (open_gates[:, -1] == 1) & (open_gates[:, -2] > 0)
    assert beside.sum() > 20 and (gate[beside] == 1).all()
    kk = k[beside]
    full = f[beside].astype(np.float64) + np.einsum("ncd,nd->nc", params.T[kk].astype(np.float64), f[beside]) + params.t[kk]
    np.testing.assert_allclose(out[beside], full, rtol=0, atol=1e-4)


def test_ties_go_to_the_first_record():
    """Two records with the same pattern (what a device may run: :mod:`.interference` only demands they
    share a target), different gates and tables: on their region and beside it (a violation outside A) the
    first of them acts, whichever it is, in both forms. And an equal best score between different patterns
    acts on neither: s1 and s2 flip s0 at coordinates 2 and 7, the selection values of the three patterns;
    an input with s0's signs flipped at both scores 0 against s1 and s2, short of |v_A|_1, so no record
    has its signs on A: gate 0, the base logits bit for bit."""
    rng = np.random.default_rng(31)
    s0 = rng.choice(np.array([-1, 1], np.int8), size=M)
    s1, s2 = s0.copy(), s0.copy()
    s1[2], s2[7] = -s1[2], -s2[7]
    assert selection_neurons(np.stack([s0, s1, s2])).tolist() == [2, 7]
    z = s0.astype(np.float32) * np.float32(2 * DELTA)
    z[2], z[7] = -z[2], -z[7]  # disagrees with s1 at 7 only and with s2 at 2 only, by the same |v|
    z = z[None]
    f = (rng.normal(size=(1, C)) * 5).astype(np.float32)
    T, t = rng.normal(size=(3, C, C)), rng.normal(size=(3, C)) * 3
    params = PatchParams(np.stack([s1, s2, s0]), [0.5, 0.5, 0.5], T, t, STEP_LOG2)
    assert reference_selection(z, params)[0].tolist() == [0, 0, -2 * 5]  # |v| = 5 at 2 delta, |v_A|_1 = 10
    for model in (build_patch_graph(GATED, LOGITS, params, OPSET, IR, "affine"), lookup_twin(params, "affine", GATED)):
        out, gate = session(model, GATE).run(None, feeds(z, f))
        assert gate[0, 0] == 0 and out.tobytes() == f.tobytes()
    # duplicates of s1: on its region (gate 1) and with one violation outside A (the same partial gate for
    # gamma 0.5 and 1.0 would differ: gammas differ, so which record acts shows in the gate and the output)
    on = s1.astype(np.float32) * np.float32(2 * DELTA)
    beside = on.copy()
    j = next(i for i in range(M) if i not in (2, 7))
    beside[j] = -beside[j]
    zz = np.stack([on, beside])
    ff = (rng.normal(size=(2, C)) * 5).astype(np.float32)
    outs = []
    for order in ([0, 1, 2], [1, 0, 2]):
        dup = PatchParams(np.stack([s1, s1, s0]), np.array([0.5, 1.0, 0.5])[order], T[order], t[order], STEP_LOG2)
        ref, g, k, _ = reference_patch(zz, ff, dup)
        assert k.tolist() == [0, 0] and g[0] == 1 and 0 < g[1] < 1
        for model in (build_patch_graph(GATED, LOGITS, dup, OPSET, IR, "affine"), lookup_twin(dup, "affine", GATED)):
            out, gate, k_dev = session(model, GATE, K).run(None, feeds(zz, ff))
            assert k_dev.tolist() == [0, 0] and gate[:, 0].tolist() == g.tolist()
            np.testing.assert_allclose(out, ref, rtol=0, atol=1e-4)
        outs.append(out)
    assert not np.allclose(outs[0], outs[1], atol=1e-3)  # another first record, another correction


def test_selection_values_separate_every_distinct_pattern():
    """The certificate of format 6 needs: two records' signs agree on the selection values A only where their
    whole patterns agree. Searched on the tables where that is hardest: patterns one or two flips apart
    (a value only one pair disagrees on must be in A), duplicates, all 2^11 patterns, a single record;
    and A is a function of the set of patterns (row order and repeats change nothing), as the device's
    rebuild of a received graph and a chain's compaction need."""
    rng = np.random.default_rng(41)
    tables = [np.ones((1, M), np.int8), ((np.arange(2**M)[:, None] >> np.arange(M)[None]) & 1).astype(np.int8) * 2 - 1]
    for _ in range(60):
        m = int(rng.integers(5, 200))
        base = rng.choice(np.array([-1, 1], np.int8), size=m)
        rows = np.repeat(base[None], int(rng.integers(2, 40)), axis=0)
        for row in rows[1:]:
            row[rng.choice(m, size=int(rng.integers(1, 3)), replace=False)] *= -1
        tables.append(np.concatenate([rows, rows[rng.integers(0, len(rows), size=5)]]))  # with repeats
    for signs in tables:
        a = selection_neurons(signs)
        assert a.dtype == np.int64 and len(a) >= 1 and (np.diff(a) > 0).all() and a.max() < signs.shape[1]
        whole = len(np.unique(signs, axis=0))
        assert len(np.unique(signs[:, a], axis=0)) == whole
        if whole == 2:  # one value that tells the two apart is enough, and greedy takes one
            assert len(a) == 1
        shuffled = signs[rng.permutation(len(signs))]
        np.testing.assert_array_equal(selection_neurons(shuffled), a)
        np.testing.assert_array_equal(selection_neurons(np.unique(signs, axis=0)), a)
    assert len(selection_neurons(tables[1])) == M  # every pattern of M values needs all M


# ----------------------------------------------------------------------------- format 8: the lookup form
# 80 + 176 = 256 gated values: the selection values lie in a window of 96 of them, across both tensors.
WIDE = (GatedTensor("wide_a", (5, 4, 4)), GatedTensor("wide_b", (176,)))
M_WIDE = sum(g.size for g in WIDE)
# the looked-up record + 1 (N,) (0: none), and the matched inputs' -excess/2 (1, n, 1)
HIT, CAND_NEX = PREFIX + "g0_hit", PREFIX + "g0_nex_c"


def lookup_twin(params: PatchParams, form: str, gated: tuple[GatedTensor, ...] = WIDE) -> onnx.ModelProto:
    """The graph of ``params`` in the lookup form a device composes (``PatchedModel`` by default)."""
    model = build_patch_graph(gated, LOGITS, params, OPSET, IR, form, lookup=True)
    ops = [n.op_type for n in model.graph.node]
    assert "NonZero" in ops and "MatMulInteger" not in ops and "ArgMax" not in ops
    return model


def codes_to_z(v: np.ndarray) -> np.ndarray:
    """float32 gated values whose quantized codes are the odd integers ``v`` (z = delta (v - 1) / 2, exact)."""
    return (DELTA * (np.asarray(v, np.float64) - 1) / 2).astype(np.float32)


def gate_inputs(params: PatchParams, rng: np.random.Generator) -> np.ndarray:
    """Inputs where the lookup could part from the product: inside every region (gate 1); violations
    only outside the selection values A (the record is found, its gate partial or 0); one inside A (no
    record, or another one with those signs on A); per record, violations outside A of every odd size
    around where its gate closes (1 + neg_w excess exactly 0 on one side, just open on the other), and the
    same with one more violation inside A; signs at 0, -0 and the smallest negatives; then noise near every
    boundary and anywhere."""
    a = selection_neurons(params.signs)
    rest = np.setdiff1d(np.arange(params.signs.shape[1]), a)
    m = params.signs.shape[1]
    rows = []
    for k in range(params.n_records):
        s = params.signs[k].astype(np.int64)
        v = s * (2 * rng.integers(0, 6, size=(12, m)) + 1)  # odd codes with k's signs: inside k's region
        rows.append(v.copy())
        out = v.copy()
        j = rng.choice(rest, size=12)
        out[np.arange(12), j] = -s[j] * (2 * rng.integers(0, 20, size=12) + 1)
        rows.append(out)
        ina = v.copy()
        j = rng.choice(a, size=12)
        ina[np.arange(12), j] = -s[j] * (2 * rng.integers(0, 20, size=12) + 1)
        rows.append(ina)
        # two violations outside A, |v| = m and 1: excess 2(m + 1); the gate closes where 1 + neg_w 2(m + 1) <= 0,
        # at m + 1 = 16 / gamma exactly for gamma 0.5, 1 and 2 (a gate of exactly 0)
        closes = int(np.ceil(1.0 / (2 * params.gamma[k] * DELTA / 4)))
        ms = np.arange(max(1, closes - 7), min(127, closes + 6)) | 1
        edge = np.repeat(s[None] * 3, len(ms), axis=0)
        i, i2 = rest[k % len(rest)], rest[(k + 1) % len(rest)]
        edge[:, i], edge[:, i2] = -s[i] * ms, -s[i2]
        more = edge.copy()
        o = a[k % len(a)]
        more[:, o] = -s[o]
        rows += [edge, more]
    z = codes_to_z(np.concatenate(rows))
    signed = np.repeat(params.signs[:8].astype(np.float32), 4, axis=0) * np.float32(DELTA)
    signed[0::4][params.signs[:8] > 0] = 0.0
    signed[1::4][params.signs[:8] > 0] = -0.0  # 0 and -0 read active, as the ReLU's z >= 0
    signed[2::4][params.signs[:8] < 0] = -1.4e-45  # the smallest negative reads inactive
    noise = [rng.normal(scale=DELTA, size=(200, m)), rng.normal(scale=1.5, size=(100, m))]
    return np.concatenate([z, signed, *noise]).astype(np.float32)


@pytest.mark.parametrize("form", FORMS)
def test_lookup_gate_is_the_product_gate_bit_for_bit(form):
    """A device finds the acting record by a trie over the signs on A and computes the exact gate only for
    the inputs that have one; the patch file's graph scores every record and keeps the gate where the best
    score is |v_A|_1. Searched where they could part: gates at their closing edge, violations outside A
    only (record found, gate partial or 0), inside A (no record), signs at 0, -0 and -1.4e-45, and noise.
    Every output and gate equals the product form's bit for bit and the written-out reference's, and the
    acting record wherever a gate is open."""
    rng = np.random.default_rng(71)
    params = random_params(rng, p=40, m=M_WIDE)
    gamma = np.where(np.arange(40) % 2, params.gamma, np.resize([0.5, 1.0, 2.0], 40))  # powers of two: exact edges
    params = with_form(PatchParams(params.signs, gamma, params.T, params.t, params.scale_log2), form)
    model = build_patch_graph(WIDE, LOGITS, params, OPSET, IR, form)
    twin = lookup_twin(params, form)
    onnx.checker.check_model(twin, full_check=True)
    z = gate_inputs(params, rng)
    f = (rng.normal(size=(len(z), C)) * 5).astype(np.float32)
    out, gate, k = session(model, GATE, K).run(None, feeds(z, f, WIDE))
    out_t, gate_t, k_t, hit, nex_c = session(twin, GATE, K, HIT, CAND_NEX).run(None, feeds(z, f, WIDE))
    assert out.tobytes() == out_t.tobytes() and gate.tobytes() == gate_t.tobytes()
    open_ = gate[:, 0] > 0
    np.testing.assert_array_equal(k_t[open_], k[open_])
    # the reference: the first record with the input's signs on A, its own exact gate; none: gate 0, k 0
    _, g_ref, _, _ = reference_patch(z, f, params)
    k_ref, has = reference_match(z, params)
    np.testing.assert_array_equal(gate[:, 0], g_ref)
    np.testing.assert_array_equal(hit, np.where(has, k_ref + 1, 0))
    np.testing.assert_array_equal(k_t, k_ref)
    # the search reached every case: inputs without a record, with one whose gate is closed (exactly 0 at
    # the edge too), partial, or fully open; the exact gate computed for the matched inputs only
    assert nex_c.shape == (1, has.sum(), 1) and 100 < (~has).sum() < len(z)
    assert (has & (gate[:, 0] == 0)).sum() > 20 and ((gate > 0) & (gate < 1)).sum() > 20 and (gate == 1).sum() > 100
    pre, _ = reference_pre(z, params)
    edge = pre[np.arange(len(z)), k_ref]
    assert (has & (edge == 0)).sum() > 10 and (has & (edge > 0) & (edge < 0.05)).sum() > 10
    # Across patches: a device composes records of other steps into further groups, each with its own trie;
    # the most open group's record acts (first group on ties). Two groups, the same inputs.
    from prune_edge.runtime.patchgraph import GateGroup, gate_nodes

    half = params.n_records // 2
    groups = [GateGroup(WIDE, params.signs[:half], params.gamma[:half], STEP_LOG2),
              GateGroup(WIDE, params.signs[half:], params.gamma[half:], STEP_LOG2 - 1)]
    runs = {}
    for lookup in (True, False):
        nodes, inits, _, _ = gate_nodes(PREFIX, groups, OPSET, screen=lookup)
        inputs = [onnx.helper.make_tensor_value_info(g.name, onnx.TensorProto.FLOAT, ["N", *g.shape]) for g in WIDE]
        outs = [PREFIX + "gate_max", PREFIX + "k"]
        graph = onnx.helper.make_graph(nodes, "g", inputs, [onnx.helper.make_empty_tensor_value_info(o) for o in outs], inits)
        m = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", OPSET)], ir_version=IR)
        feed = {key: v for key, v in feeds(z, f, WIDE).items() if key != LOGITS}
        runs[lookup] = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(outs, feed)
    (gate2, k2), (gate2_p, k2_p) = runs[True], runs[False]
    assert gate2.tobytes() == gate2_p.tobytes()
    np.testing.assert_array_equal(k2[gate2[:, 0] > 0], k2_p[gate2[:, 0] > 0])
    gates, picks = [], []
    for gi, (lo, hi, scale) in enumerate(((0, half, STEP_LOG2), (half, params.n_records, STEP_LOG2 - 1))):
        ref = PatchParams(params.signs[lo:hi], params.gamma[lo:hi], params.T[lo:hi], params.t[lo:hi], scale)
        pre_g, _ = reference_pre(z, ref)
        kg, has_g = reference_match(z, ref)
        gates.append(np.where(has_g, np.clip(pre_g[np.arange(len(z)), kg], 0, 1), np.float32(0)))
        picks.append(kg + lo)
    first = np.stack(gates, axis=1).argmax(axis=1)
    np.testing.assert_array_equal(gate2[:, 0], np.maximum(*gates))
    np.testing.assert_array_equal(k2, np.stack(picks, axis=1)[np.arange(len(z)), first])
    assert all((g > 0).sum() > 50 for g in gates)


def test_lookup_reads_signs_across_gated_tensors():
    """Selection values in both gated tensors (a record that differs from another only at value 85, in the
    second tensor): the lookup reads each tensor's span of A with its own Slice and MatMul and adds the chunk
    codes; outputs and gates equal the product form's bit for bit on the inputs of the search above."""
    rng = np.random.default_rng(76)
    base = random_params(rng, p=30, m=M_WIDE)
    twin_row = base.signs[:1].copy()
    twin_row[0, 85] *= -1
    signs = np.concatenate([base.signs, twin_row])
    params = PatchParams(signs, np.resize([0.5, 1.0, 2.0], 31), rng.normal(size=(31, C, C)), rng.normal(size=(31, C)) * 3,
                         STEP_LOG2)
    a = selection_neurons(signs)
    assert 85 in a and (a < 80).any()
    lookup = lookup_twin(params, "affine")
    assert [n.op_type for n in lookup.graph.node].count("MatMul") == 3  # one per tensor, and T_k f
    z = gate_inputs(params, rng)
    f = (rng.normal(size=(len(z), C)) * 5).astype(np.float32)
    out, gate, k = session(build_patch_graph(WIDE, LOGITS, params, OPSET, IR, "affine"), GATE, K).run(None, feeds(z, f, WIDE))
    out_t, gate_t, k_t = session(lookup, GATE, K).run(None, feeds(z, f, WIDE))
    assert out.tobytes() == out_t.tobytes() and gate.tobytes() == gate_t.tobytes()
    np.testing.assert_array_equal(k_t[gate[:, 0] > 0], k[gate[:, 0] > 0])
    _, g_ref, _, _ = reference_patch(z, f, params)
    np.testing.assert_array_equal(gate[:, 0], g_ref)
    assert (gate == 1).sum() > 100 and ((gate > 0) & (gate < 1)).sum() > 20 and (k_t[gate[:, 0] == 1] == 30).sum() >= 12


@pytest.mark.parametrize("opset", [MIN_OPSET, OPSET])  # Split and ReduceL1 take other arguments from opset 18
def test_lookup_with_no_some_or_every_input_matched(opset):
    """The dynamic part of the lookup form (NonZero, Gather of matched rows, ScatterND) on batches where
    no input, every input, or a single input has a record, and on an empty batch."""
    rng = np.random.default_rng(72)
    params = with_form(random_params(rng, p=40, m=M_WIDE), "affine")
    lookup = build_patch_graph(WIDE, LOGITS, params, opset, IR, "affine", lookup=True)
    assert "NonZero" in [n.op_type for n in lookup.graph.node]
    onnx.checker.check_model(lookup, full_check=True)
    sess = session(lookup, GATE, K, CAND_NEX)
    product = session(build_patch_graph(WIDE, LOGITS, params, opset, IR, "affine"), GATE, K)
    far = rng.normal(scale=3.0, size=(400, M_WIDE)).astype(np.float32)
    far = far[~reference_match(far, params)[1]][:50]  # no record has their signs on A
    assert len(far) == 50
    inside = codes_to_z(params.signs[rng.integers(0, 40, size=50)].astype(np.int64) * 5)  # every gate 1
    one = np.concatenate([far[:20], inside[:1], far[20:]])
    for z, n_hit in ((far, 0), (inside, 50), (one, 1), (far[:0], 0)):
        f = (rng.normal(size=(len(z), C)) * 5).astype(np.float32)
        out, gate, k, nex_c = sess.run(None, feeds(z, f, WIDE))
        out_p, gate_p, k_p = product.run(None, feeds(z, f, WIDE))
        assert out.tobytes() == out_p.tobytes() and gate.tobytes() == gate_p.tobytes()
        np.testing.assert_array_equal(k[gate[:, 0] > 0], k_p[gate[:, 0] > 0])
        assert out.shape == (len(z), C) and gate.shape == (len(z), 1) and nex_c.shape == (1, n_hit, 1)
        assert (gate == 1).sum() == (n_hit if z is not far else 0)


def test_lookup_tables_find_the_first_record_with_the_signs():
    """The trie, walked as the graph walks it (one chunk of LOOKUP_BITS signs per level), finds for every
    record's signs on A the first record with them (duplicates included), and no record for every other
    sign string tried: all 2^|A| of them where |A| is small, random ones and one-flip neighbours otherwise;
    for |A| of 1, a multiple of LOOKUP_BITS and not, and 29 (500 random patterns)."""
    from prune_edge.runtime.patchgraph import LOOKUP_BITS, lookup_tables

    rng = np.random.default_rng(75)

    def walk(tables, bits):
        w = LOOKUP_BITS
        chunks = np.rint(bits.astype(np.float32) @ tables.weights).astype(np.int64)  # as the MatMul computes them
        index = chunks[:, 0] + (1 << w)
        for level, table in enumerate(tables.levels):
            out = table[index]
            if level < len(tables.levels) - 1:
                index = out + chunks[:, level + 1]
        return out, tables.records[index]

    for p, m in [(1, 11), (4, 11), (40, M_WIDE), (9, 5), (500, 384)]:
        params = random_params(rng, p=p, m=m)
        signs = np.concatenate([params.signs, params.signs[: max(1, p // 4)]])[rng.permutation(p + max(1, p // 4))]
        a = selection_neurons(signs)
        tables = lookup_tables(signs, a)
        assert len(tables.levels) == -(-len(a) // LOOKUP_BITS)
        assert tables.size <= (p + 2) * (1 << LOOKUP_BITS) * (len(tables.levels) + 1)  # linear in the records
        rec_bits = signs[:, a] > 0
        first = np.array([np.flatnonzero((rec_bits == row).all(axis=1))[0] for row in rec_bits])
        hit, k = walk(tables, rec_bits)
        np.testing.assert_array_equal(hit, first + 1)
        np.testing.assert_array_equal(k, first)
        if len(a) <= 12:
            trial = ((np.arange(2 ** len(a))[:, None] >> np.arange(len(a))) & 1).astype(bool)
        else:
            flips = np.repeat(rec_bits, 3, axis=0)
            flips[np.arange(len(flips)), rng.integers(0, len(a), size=len(flips))] ^= True
            trial = np.concatenate([flips, rng.integers(0, 2, size=(2000, len(a))).astype(bool)])
        known = {row.tobytes(): i for i, row in reversed(list(enumerate(rec_bits)))}
        want = np.array([known.get(row.tobytes(), -1) for row in trial])
        hit, k = walk(tables, trial)
        np.testing.assert_array_equal(hit, want + 1)
        np.testing.assert_array_equal(k, np.maximum(want, 0))
        assert (want < 0).any() or len(known) == 2 ** len(a)


def test_screen_window():
    """The window is a function of the set of patterns, SCREEN_WIDTH values on the stride grid whose signs
    separate every two distinct patterns (the selection values lie in it); every value where M is small or
    no window separates them (two pairs of patterns that differ only at the two ends)."""
    rng = np.random.default_rng(73)
    width, stride = patchgraph.SCREEN_WIDTH, patchgraph.SCREEN_STRIDE
    for m, p in [(M_WIDE, 40), (384, 500), (2 * width, 2), (2 * width - 1, 40), (11, 4)]:
        params = random_params(rng, p=p, m=m)
        start, w = screen_window(params.signs)
        if m < 2 * width:
            assert (start, w) == (0, m)
            continue
        assert w == width and start % stride == 0 and start + w <= m
        assert len(np.unique(params.signs[:, start : start + w], axis=0)) == p
        a = selection_neurons(params.signs)
        assert ((a >= start) & (a < start + w)).all()
        shuffled = np.concatenate([params.signs, params.signs[:3]])[rng.permutation(p + min(p, 3))]
        assert screen_window(shuffled) == (start, w)
        np.testing.assert_array_equal(selection_neurons(shuffled), a)
    # the first window that separates: patterns that differ only at value 100 need a window holding it
    s0 = rng.choice(np.array([-1, 1], np.int8), size=M_WIDE)
    s1 = s0.copy()
    s1[100] *= -1
    assert screen_window(np.stack([s0, s1])) == (32, width) and selection_neurons(np.stack([s0, s1])).tolist() == [100]
    s2 = s0.copy()
    s2[0], s2[-1] = -s2[0], -s2[-1]
    ends = np.stack([s0, s2, s2 * np.where(np.arange(M_WIDE) == 0, -1, 1).astype(np.int8)])
    assert screen_window(ends) == (0, M_WIDE)  # no window holds both value 0 and value 255
    assert selection_neurons(ends).tolist() == [0, M_WIDE - 1]


def test_structure_refusal_names_the_first_node_that_differs():
    """A graph with the canonical node count but two nodes in another order (what an out-of-date builder
    writes) is refused with the first differing node named, not only the count."""
    from prune_edge.runtime.verify import _first_difference

    params = random_params(np.random.default_rng(74), p=4, m=M_WIDE)
    model = build_patch_graph(WIDE, LOGITS, params, OPSET, IR, "affine")
    moved = copy.deepcopy(model)
    ops = [n.op_type for n in moved.graph.node]
    i = next(j for j in range(len(ops) - 1) if ops[j] != ops[j + 1])
    a, b = copy.deepcopy(moved.graph.node[i]), copy.deepcopy(moved.graph.node[i + 1])
    moved.graph.node[i].CopyFrom(b)
    moved.graph.node[i + 1].CopyFrom(a)
    msg = _first_difference(model, moved)
    assert msg == (f"expected {len(ops)} nodes, found {len(ops)}; the first that differs is node {i}: "
                   f"expected {ops[i]}, found {ops[i + 1]}")
    shorter = copy.deepcopy(model)
    del shorter.graph.node[-1]
    assert _first_difference(model, shorter).endswith(f"node {len(ops) - 1}: expected {ops[-1]}, found none")


def test_scale_choice():
    z = np.random.default_rng(0).normal(size=(1000, 8)).astype(np.float32)
    e = choose_scale_log2(z)
    top = np.quantile(np.abs(z), 0.5)
    assert 2.0**e * 64 <= top < 2.0 ** (e + 1) * 64  # the median |z| saturates v (64 steps of 2w + 1)
    assert choose_scale_log2(z * 2**10) == e + 10  # a power-of-two scaling moves the step with it
    assert choose_scale_log2(np.full((4, 4), 1e30, np.float32)) == SCALE_LOG2_RANGE[1]
    assert choose_scale_log2(np.full((4, 4), 1e-30, np.float32)) == SCALE_LOG2_RANGE[0]
    assert choose_scale_log2(np.zeros((3, 4), np.float32)) == DEFAULT_SCALE_LOG2
    assert choose_scale_log2(np.zeros((0, 4), np.float32)) == DEFAULT_SCALE_LOG2
    assert choose_scale_log2(np.full((3, 4), np.nan, np.float32)) == DEFAULT_SCALE_LOG2
    with pytest.raises(ValueError, match="scale_log2"):
        PatchParams(np.ones((1, 2), np.int8), np.ones(1), np.zeros((1, 2, 2)), np.zeros((1, 2)), scale_log2=40)
    with pytest.raises(ValueError, match="scale_log2"):
        PatchParams(np.ones((1, 2), np.int8), np.ones(1), np.zeros((1, 2, 2)), np.zeros((1, 2)), scale_log2=-25)


def test_certificate_algebra_identities():
    """PRUNE's closed form: P (I + T) = diag(alpha) P, P t = beta, and the added row keeps the mean."""
    rng = np.random.default_rng(0)
    for c in (2, 3, 10):
        for target in (0, c - 1):
            alpha = rng.uniform(0.01, 1.0, c - 1)
            beta = rng.normal(size=c - 1)
            T, t = affine_from_scales(target, alpha, beta, 1.0, 0.0, c)
            p = spec_rows(target, c)
            pbar = completed_spec(target, c)
            assert np.linalg.matrix_rank(pbar) == c
            np.testing.assert_allclose(p @ (np.eye(c) + T), np.diag(alpha) @ p, atol=1e-12)
            np.testing.assert_allclose(p @ t, beta, atol=1e-12)
            np.testing.assert_allclose(np.ones(c) @ (np.eye(c) + T), np.ones(c), atol=1e-12)
            assert (p[:, target] == -1).all() and (np.abs(p).sum(1) == 2).all()


def test_cheap_forms_are_exact():
    """alpha = 1 gives T = 0 and alpha = 0 gives T = -I exactly (no round-off), so form_of picks the
    shift and collapse graphs for PRUNE and collapse records; a batch matches record-by-record results."""
    rng = np.random.default_rng(1)
    targets = [0, 2, 1, 2]
    for a_value, form in ((1.0, "shift"), (0.0, "collapse")):
        a = np.full((4, C), a_value)
        b = rng.normal(size=(4, C))
        T, t = affine_from_scales_many(targets, a, b, C)
        assert form_of(PatchParams(np.ones((4, M), np.int8), np.ones(4), T, t)) == form
        for k, target in enumerate(targets):
            T1, t1 = affine_from_scales(target, a[k, :-1], b[k, :-1], a[k, -1], b[k, -1], C)
            np.testing.assert_array_equal(T[k], T1)
            np.testing.assert_allclose(t[k], t1, atol=1e-12)
    T, _ = affine_from_scales_many(targets, rng.uniform(0.1, 0.9, size=(4, C)), rng.normal(size=(4, C)), C)
    assert form_of(PatchParams(np.ones((4, M), np.int8), np.ones(4), T, np.zeros((4, C)))) == "affine"


# sha256 of the canonical graphs of fixed parameters, as format 8 writes them (measured on the code that
# introduced format 8: format 4's bit-packed signs; the record selected by a product over its selection
# values, its own gate, kept where the best score is |v_A|_1; formats 6 and 7 wrote the same graph without
# that last step at this width). A device re-builds this graph to check a file's structure, so any change
# here refuses every patch already shipped: it must come with a new format version, not silently.
FORMAT_CANONICAL_SHA256 = {
    "affine": "6de2eb4b648c4fc9dfc564dc6567b19ad5fd6d6bfe974fec44148b72fbfb6532",
    "shift": "c6d3e10c74741c7f83f18b493aaa7b40eb994807f47c563e42b128a1d873611f",
    "collapse": "88d73b091a7d87e5af20ec960a18dc6468406bc55ae438adcc0a620fd2503056",
}


@pytest.mark.parametrize("form", sorted(FORMAT_CANONICAL_SHA256))
def test_canonical_graph_bytes_are_pinned(form):
    params = random_params(np.random.default_rng(7), p=3)
    if form != "affine":
        c = params.T.shape[1]
        T = np.zeros_like(params.T) if form == "shift" else np.broadcast_to(-np.eye(c, dtype=np.float32), params.T.shape).copy()
        params = dataclasses.replace(params, T=T)
    data = build_patch_graph(GATED, LOGITS, params, OPSET, IR, form).SerializeToString()
    assert hashlib.sha256(data).hexdigest() == FORMAT_CANONICAL_SHA256[form]


# The canonical suppression graphs: constant margins exactly as before the affine form existed (digests
# measured on the code before it), the affine form as introduced. Same rule as above: a change refuses
# every suppression already shipped.
SUPPRESS_CANONICAL_SHA256 = {
    "constant-1": "5b28eabf1618b2cd297128fae72e682ce91ce98e191d514f3e9573d65d40d3d0",
    "constant-0-2": "7d61ad850986310783cd55238c148941ecea3c1e6b771eb30fa6fbaaeba6c348",
    "affine-0-2": "f1957ac60d3f486279b7380fa4f718ee4ebe681fe773082f6948db9cbc8f65c1",
}


def _suppress_params(key: str):
    from prune_edge.runtime.patchgraph import SuppressParams

    if key == "constant-1":
        return SuppressParams(np.array([1]), np.array([1.0], np.float32))
    if key == "constant-0-2":
        return SuppressParams(np.array([0, 2]), np.array([2.5, 0.75], np.float32))
    rng = np.random.default_rng(7)
    return SuppressParams(np.array([0, 2]), np.array([2.5, 0.75], np.float32), rng.normal(size=(2, C)), rng.normal(size=2))


@pytest.mark.parametrize("key", sorted(SUPPRESS_CANONICAL_SHA256))
def test_canonical_suppression_bytes_are_pinned(key):
    from prune_edge.runtime.patchgraph import build_suppress_graph, extract_suppress_params

    params = _suppress_params(key)
    graph = build_suppress_graph(LOGITS, params, C, OPSET, IR)
    assert hashlib.sha256(graph.SerializeToString()).hexdigest() == SUPPRESS_CANONICAL_SHA256[key]
    back = extract_suppress_params(graph, C)  # the device reads back exactly the numbers it was built from
    assert np.array_equal(back.classes, params.classes) and np.array_equal(back.margin, params.margin)
    assert back.affine == params.affine
    if params.affine:
        assert np.array_equal(back.weights, params.weights) and np.array_equal(back.bias, params.bias)


def test_affine_suppression_manifest_round_trip(tiny):
    """The affine part survives to_json/from_json exactly (float32 values through JSON); a constant
    margin's document has no affine key; a malformed affine part is refused with its path."""
    from prune_edge.exporters.patch_export import BaseRef, build_suppression_patch

    ref = BaseRef("ab" * 32, OPSET, IR, LOGITS, C, ())
    request = {**tiny[0].request, "kind": "class", "classes": [0, 2], "strategy": "suppress"}  # the format's id fields
    rng = np.random.default_rng(3)
    w, b = rng.normal(size=(2, C)).astype(np.float32), rng.normal(size=2).astype(np.float32)
    m, data = build_suppression_patch(ref, [2, 0], 1.5, -8, -1000.0, -1.0, request, affine=(w[::-1], b[::-1]))
    assert m.suppress["classes"] == [0, 2]
    assert np.array_equal(np.array(m.suppress["affine"]["weights"], np.float32), w)  # rows follow the sorted classes
    again = Manifest.from_json(json.loads(json.dumps(m.to_json())))
    assert again == m and again.to_json() == m.to_json()
    assert unpack(data).manifest == m
    plain, _ = build_suppression_patch(ref, [0, 2], 1.5, -8, -1000.0, -1.0, request)
    assert set(plain.to_json()["suppress"]) == {"classes", "margin"}
    doc = m.to_json()
    doc["suppress"]["affine"]["weights"] = doc["suppress"]["affine"]["weights"][:1]
    with pytest.raises(PatchVerificationError, match=r"suppress.affine.weights: expected one row per class \(2\)"):
        Manifest.from_json(doc)
    doc = m.to_json()
    doc["suppress"]["affine"]["weights"][1] = doc["suppress"]["affine"]["weights"][1][:-1]
    with pytest.raises(PatchVerificationError, match=r"suppress.affine.weights\[1\]: expected a list of 3 numbers"):
        Manifest.from_json(doc)
    doc = m.to_json()
    doc["suppress"]["affine"]["scale"] = 2.0
    with pytest.raises(PatchVerificationError, match="scale"):
        Manifest.from_json(doc)


# ----------------------------------------------------------------------------- bytes: record order, half-precision t
def _patch_of(params: PatchParams, reorder: bool) -> tuple[Manifest, onnx.ModelProto]:
    from prune_edge.exporters.patch_export import BaseRef, RecordCert, build_patch

    p = params.n_records
    certs = [RecordCert(k % C, float(params.gamma[k]), (0.0,) * (C - 1), 0.0, None, None, 1) for k in range(p)]
    request = {"kind": "points", "n_points": p, "id_roots": ROOTS[:1]}
    _, data = build_patch(BaseRef(BASE_SHA, OPSET, IR, LOGITS, C, GATED), params, certs, "collapse", Q_LOWER, Q_UPPER,
                          request, round_t=False, reorder=reorder)
    pf = unpack(data)
    return pf.manifest, onnx.load_from_string(pf.graph_bytes)


def test_compression_order_is_a_greedy_nearest_neighbour_permutation():
    """Records drawn as noisy copies of 4 prototypes, shuffled: the order is a permutation from record 0,
    each step goes to a nearest remaining pattern, it stays inside its block, and the summed distance
    of neighbours falls far below the shuffled order's (what lets deflate find the runs)."""
    from prune_edge.exporters.patch_export import compression_order

    rng = np.random.default_rng(5)
    protos = rng.choice(np.array([-1, 1], np.int8), size=(4, 96))
    signs = protos[rng.integers(0, 4, size=60)] * rng.choice(np.array([1, -1], np.int8), p=[0.95, 0.05], size=(60, 96))
    ham = lambda a, b: int((a != b).sum())  # noqa: E731
    for block in (2048, 7):
        order = compression_order(signs, block=block)
        assert sorted(order.tolist()) == list(range(60)) and order[0] == 0
        for lo in range(0, 60, block):
            seg = order[lo : lo + block]
            assert (seg >= lo).all() and (seg < lo + block).all()
            for i in range(len(seg) - 1):
                rest = seg[i + 1 :]
                assert ham(signs[seg[i]], signs[seg[i + 1]]) == min(ham(signs[seg[i]], signs[j]) for j in rest)
    order = compression_order(signs)
    total = lambda o: sum(ham(signs[a], signs[b]) for a, b in zip(o[:-1], o[1:]))  # noqa: E731
    assert total(order) < 0.3 * total(np.arange(60))


def test_record_order_changes_no_output():
    """The exporter's reordered patch and the same records in their given order: the manifests carry
    the same records (permuted with their graph rows) and both graphs give the same logits and gate bit
    for bit on inputs inside every record's region and around them, wherever one record has the highest
    selection score. (Where two tie, the first in the file acts: the order the server evaluated and shipped.)"""
    rng = np.random.default_rng(11)
    params = with_form(random_params(rng, p=9), "collapse")
    (m0, g0), (m1, g1) = _patch_of(params, False), _patch_of(params, True)
    p0 = extract_params(g0, 9, M, C, "collapse")
    p1 = extract_params(g1, 9, M, C, "collapse")
    perm = [int(np.flatnonzero((p0.signs == row).all(axis=1))[0]) for row in p1.signs]
    assert sorted(perm) == list(range(9)) and perm != list(range(9))  # a real reordering
    assert [m1.records[k] for k in range(9)] == [m0.records[j] for j in perm]
    np.testing.assert_array_equal(p1.t, p0.t[perm])
    # inputs in each record's region (its own signs, |z| a few steps) and random ones near the gates
    inside = (params.signs * rng.uniform(1, 4, size=params.signs.shape) * DELTA).astype(np.float32)
    near = rng.normal(scale=3 * DELTA, size=(300, M)).astype(np.float32)
    z = np.vstack([inside, near])
    f = rng.normal(size=(len(z), C)).astype(np.float32)
    out0, gate0 = session(g0, GATE).run(None, feeds(z, f))
    out1, gate1 = session(g1, GATE).run(None, feeds(z, f))
    sel = reference_selection(z, params)
    unique = (sel == sel.max(axis=1, keepdims=True)).sum(axis=1) == 1
    assert unique[:9].all() and 100 < unique.sum() < len(z)
    np.testing.assert_array_equal(out0[unique], out1[unique])
    np.testing.assert_array_equal(gate0[unique], gate1[unique])
    assert (gate0.reshape(-1)[:9] == 1).all() and (gate0[unique] > 0).sum() > 9


def test_half_precision_t_table_is_exact_folded_and_canonical(tmp_path):
    """A t table whose every value is a float16 (a prune patch's 2^-4 grid) is stored as float16 behind
    a Cast: read back as the same float32 t, the same outputs bit for bit as the float32 table,
    the Cast folded by onnxruntime at session creation; one value off the float16 grid keeps the whole
    table float32; and a float32 table of float16 values -- not what the canonical builder writes -- is
    refused by the device's structure check."""
    from prune_edge.runtime.verify import check_structure

    rng = np.random.default_rng(12)
    params = with_form(random_params(rng, p=5), "shift")
    params.t = (np.round(params.t * 16) / 16).astype(np.float32)  # on 2^-4, |t| < 2^7
    model = build_patch_graph(GATED, LOGITS, params, OPSET, IR, "shift")
    inits = {i.name: i for i in model.graph.initializer}
    assert inits[PREFIX + "t_table16"].data_type == onnx.TensorProto.FLOAT16 and PREFIX + "t_table" not in inits
    np.testing.assert_array_equal(extract_params(model, 5, M, C, "shift").t, params.t)
    off = PatchParams(params.signs, params.gamma, params.T, params.t.copy(), params.scale_log2)
    off.t[2, 1] += np.float32(2.0**-13)  # not a float16 any more
    model32 = build_patch_graph(GATED, LOGITS, off, OPSET, IR, "shift")
    assert {i.name for i in model32.graph.initializer} >= {PREFIX + "t_table"}
    assert PREFIX + "t_table16" not in {i.name for i in model32.graph.initializer}
    # the float32 graph of the same (float16-exact) values: same outputs, but not canonical
    forced = copy.deepcopy(model)
    g = forced.graph
    del g.node[[n.name for n in g.node].index(PREFIX + "t_table")]
    keep = [i for i in g.initializer if i.name != PREFIX + "t_table16"]
    del g.initializer[:]
    g.initializer.extend([*keep, numpy_helper.from_array(params.t, PREFIX + "t_table")])
    z = rng.normal(scale=3 * DELTA, size=(200, M)).astype(np.float32)
    f = rng.normal(size=(200, C)).astype(np.float32)
    np.testing.assert_array_equal(session(model).run(None, feeds(z, f))[0], session(forced).run(None, feeds(z, f))[0])
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    opts.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    opt = onnx.load(tmp_path / "opt.onnx")
    assert not [n for n in opt.graph.node if n.op_type == "Cast" and n.input[0] == PREFIX + "t_table16"]
    manifest, _ = make_patch(5, "prune")
    for graph, ok in ((model, True), (forced, False)):
        data = graph.SerializeToString()
        m = rederive(manifest, form="shift", graph_sha256=sha256_bytes(data), graph_bytes=len(data))
        pf = unpack(pack(m, data))
        if ok:
            check_structure(pf, "x.pepatch")
        else:
            with pytest.raises(StructureError, match="not the canonical"):
                check_structure(pf, "x.pepatch")
