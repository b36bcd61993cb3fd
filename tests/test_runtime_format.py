"""The device-side patch format, built by hand (no torch): manifest schema, container, canonical graph.

Every object here is tiny and synthetic so each refusal is pinned to exactly one deviation.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import zipfile

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from prune_edge.runtime import patchfile
from prune_edge.runtime.errors import IntegrityError, PatchFormatError, PatchVerificationError
from prune_edge.runtime.fileio import sha256_bytes
from prune_edge.runtime.manifest import FORMAT_VERSION, GatedTensor, Manifest, Record, canonical_bytes
from prune_edge.runtime.patchfile import GRAPH_NAME, MANIFEST_NAME, pack, read_patch_file, unpack
from prune_edge.runtime.patchgraph import (
    DEFAULT_SCALE_LOG2,
    PatchParams,
    choose_scale_log2,
    quantize,
    affine_from_scales,
    build_patch_graph,
    completed_spec,
    extract_params,
    form_of,
    gate_name,
    output_name,
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
PATCH_ID = "0123456789abcdef0123456789abcdef"


# ----------------------------------------------------------------------------- hand-built patches
def random_params(rng: np.random.Generator, p: int, c: int = C, m: int = M) -> PatchParams:
    return PatchParams(
        signs=rng.choice(np.array([-1, 1], np.int8), size=(p, m)),
        gamma=rng.uniform(0.3, 2.0, size=p),
        T=rng.normal(size=(p, c, c)),
        t=rng.normal(size=(p, c)) * 3,
        scale_log2=-3,  # steps of 1/8: saturation at 16, about the scale of the test inputs
    )


def make_records(p: int, mode: str = "prune", alpha_value: float = 0.5) -> tuple[list[Record], np.ndarray, np.ndarray]:
    """Records whose certificate algebra holds, and their float64 (T, t)."""
    records, Ts, ts = [], [], []
    for k in range(p):
        target = k % C
        if mode == "prune":
            alpha = np.full(C - 1, alpha_value)
            lower, upper = np.full(C - 1, -3.0), np.full(C - 1, 2.0)
            beta = Q_UPPER - 0.25 - alpha * upper  # alpha * upper + beta = q_upper - 0.25
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
                target=target, gamma=1.5, alpha=tuple(alpha.tolist()), beta=tuple(beta.tolist()),
                mean_scale=mean_scale, mean_shift=mean_shift,
                lower=None if lower is None else tuple(lower.tolist()),
                upper=None if upper is None else tuple(upper.tolist()), points=1 + k,
            )
        )
    return records, np.stack(Ts), np.stack(ts)


def make_patch(
    p: int = 2, mode: str = "prune", seed: int = 0, created: str = "2024-01-01T00:00:00Z", alpha_value: float = 0.5
) -> tuple[Manifest, bytes]:
    """(manifest, graph bytes) of a small, fully consistent patch."""
    rng = np.random.default_rng(seed)
    records, T, t = make_records(p, mode, alpha_value)
    params = PatchParams(signs=rng.choice(np.array([-1, 1], np.int8), size=(p, M)), gamma=np.full(p, 1.5), T=T, t=t)
    form = form_of(params)
    draft = Manifest(
        patch_id=PATCH_ID, created=created, mode=mode, form=form, base_sha256=BASE_SHA, base_opset=OPSET,
        base_ir_version=IR, logits_name=LOGITS, n_classes=C, gated=GATED, graph_sha256="0" * 64,
        graph_bytes=0, q_lower=Q_LOWER, q_upper=Q_UPPER, records=tuple(records),
        request={"kind": "points", "n_points": p},
    )
    graph = build_patch_graph(draft.prefix, GATED, LOGITS, params, OPSET, IR, form).SerializeToString()
    return dataclasses.replace(draft, graph_sha256=sha256_bytes(graph), graph_bytes=len(graph)), graph


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
    assert manifest.prefix == f"pe_{PATCH_ID[:16]}_"
    assert manifest.gated_size == M


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


INVALID_MANIFESTS = [
    ("format_version_1", _set("format_version", 1), r"signed\.format_version: expected 2"),
    ("format_version_bool", _set("format_version", True), r"signed\.format_version: expected int, found True"),
    ("format_name", _set("format", "other-format"), r"signed\.format: expected 'prune-edge-patch'"),
    ("unknown_top_key", _set("extra", 1), r"signed: expected only keys .*found \['extra'\]"),
    ("unknown_base_key", _set("base.url", "http://x"), r"signed\.base: expected only keys"),
    ("unknown_record_key", _set("records.0.note", "hi"), r"signed\.records\[0\]: expected only keys"),
    ("base_sha_upper", _set("base.sha256", "AB" * 32), r"signed\.base\.sha256: expected 64 lowercase hex"),
    ("base_sha_short", _set("base.sha256", "ab" * 31), r"signed\.base\.sha256: expected 64 lowercase hex"),
    ("base_sha_nonhex", _set("base.sha256", "zz" * 32), r"signed\.base\.sha256"),
    ("graph_sha_bad", _set("graph.sha256", "0" * 63 + "g"), r"signed\.graph\.sha256: expected 64 lowercase hex"),
    ("patch_id_bad", _set("patch_id", "XYZ"), r"signed\.patch_id: expected 16-64 lowercase hex"),
    ("mode_unknown", _set("mode", "retrain"), r"signed\.mode: expected one of"),
    ("form_unknown", _set("form", "general"), r"signed\.form: expected one of"),
    ("form_missing", _delete("form"), r"signed\.form: expected a value"),
    ("nan_beta", _set("records.0.beta.0", float("nan")), r"signed\.records\[0\]\.beta: expected finite numbers"),
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
    ("beta_bool_entry", _set("records.0.beta.1", False), r"signed\.records\[0\]\.beta: expected finite numbers, found False"),
    ("lower_missing_prune", _set("records.0.lower", None), r"signed\.records\[0\]\.lower: expected a list of 2"),
    ("gated_empty", _set("inputs.gated", []), r"signed\.inputs\.gated: expected at least one gated tensor"),
    ("gated_shape_bool", _set("inputs.gated.0.shape", [True, 2]), r"signed\.inputs\.gated\[0\]\.shape: expected a list of positive ints"),
    ("gated_shape_zero", _set("inputs.gated.1.shape", [0]), r"signed\.inputs\.gated\[1\]\.shape"),
    ("gated_name_bad", _set("inputs.gated.0.name", "a b"), r"signed\.inputs: expected tensor names"),
    ("gated_name_dup", _set("inputs.gated.1.name", "feat_a"), r"signed\.inputs: expected distinct tensor names"),
    ("logits_is_gated", _set("inputs.logits", "feat_b"), r"signed\.inputs: expected distinct tensor names"),
    ("chain_negative", _set("chain.position", -1), r"signed\.chain: expected position >= 0"),
    ("chain_bad_id", _set("chain.replaces", ["nothex"]), r"signed\.chain: expected position >= 0 and a list of patch ids"),
    ("request_not_object", _set("request", []), r"signed\.request: expected dict"),
]


@pytest.mark.parametrize("mutate,match", [pytest.param(m, r, id=i) for i, m, r in INVALID_MANIFESTS])
def test_invalid_manifest_refused(tiny, mutate, match):
    doc = copy.deepcopy(tiny[0].to_json())
    mutate(doc)
    with pytest.raises(PatchFormatError, match=match) as info:
        Manifest.from_json(doc)
    msg = str(info.value)
    assert "\n" not in msg and len(msg) < 400
    assert info.value.check == "format" and isinstance(info.value, ValueError)


def test_invalid_manifest_collapse_bounds():
    manifest, _ = make_patch(p=1, mode="collapse")
    doc = manifest.to_json()
    doc["records"][0]["lower"] = [0.0, 0.0]
    with pytest.raises(PatchFormatError, match=r"signed\.records\[0\]\.lower/upper: expected null in collapse mode"):
        Manifest.from_json(doc)


def test_invalid_manifest_whole_document():
    with pytest.raises(PatchFormatError, match=r"signed: expected an object"):
        Manifest.from_json([1, 2, 3])


def test_valid_edge_values_accepted(tiny):
    """The validator is not over-strict: ints where floats are expected and the range ends are fine."""
    doc = copy.deepcopy(tiny[0].to_json())
    doc["specification"] = {"q_lower": -1000, "q_upper": -1}
    doc["records"][0]["target"] = C - 1
    doc["n_classes"] = C
    m = Manifest.from_json(doc)
    assert m.q_upper == -1.0 and isinstance(m.q_upper, float)
    assert m.records[0].target == C - 1


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
    # Rebuilding the same patch from scratch gives the same graph and file bytes ...
    m2, g2 = make_patch(p=3)
    assert g2 == graph and pack(m2, g2) == a
    # ... and a different creation time changes only the manifest (not the graph).
    m3, g3 = make_patch(p=3, created="2025-06-01T00:00:00Z")
    assert g3 == graph and pack(m3, g3) != a
    # read_patch_file on disk agrees with unpack.
    path = tmp_path / "tiny.pepatch"
    path.write_bytes(a)
    assert read_patch_file(path).manifest == manifest


def test_build_patch_is_deterministic_given_created(monkeypatch):
    """The server-side builder: same inputs and SOURCE_DATE_EPOCH -> byte-identical patch files."""
    from prune_edge.exporters.patch_export import BaseRef, RecordCert, build_patch

    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    records, T, t = make_records(2)
    params = PatchParams(signs=np.ones((2, M), np.int8), gamma=np.full(2, 1.5), T=T, t=t)
    certs = [RecordCert(r.target, r.gamma, r.alpha, r.beta, r.mean_scale, r.mean_shift, r.lower, r.upper, r.points) for r in records]
    ref = BaseRef(BASE_SHA, OPSET, IR, LOGITS, C, GATED)
    m1, d1 = build_patch(ref, params, certs, "prune", Q_LOWER, Q_UPPER, {"kind": "points"})
    m2, d2 = build_patch(ref, params, certs, "prune", Q_LOWER, Q_UPPER, {"kind": "points"})
    assert d1 == d2 and m1 == m2
    assert m1.created == "2023-11-14T22:13:20Z"
    assert unpack(d1).manifest == m1


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
    rec = dataclasses.replace(manifest.records[0], beta=(float("nan"), 0.0))
    data = pack(dataclasses.replace(manifest, records=(rec, *manifest.records[1:])), graph)
    _refuses(data, r"non-finite number NaN")


def test_container_invalid_manifest_inside(tiny):
    manifest, graph = tiny
    doc = manifest.to_json()
    doc["format_version"] = FORMAT_VERSION + 1
    env = json.dumps({"signed": doc, "signatures": []})
    # NOTE: manifest-schema messages do not name the file (Manifest.from_json has no source); reported.
    _refuses(zip_members([(MANIFEST_NAME, env.encode()), (GRAPH_NAME, graph)]), r"signed\.format_version: expected 2", named=False)


def test_graph_digest_mismatch(tiny):
    manifest, graph = tiny
    other = make_patch(p=3, seed=1)[1]
    assert len(other) == len(graph) and other != graph
    err = _refuses(pack(manifest, other), r"patch\.onnx expected sha256", IntegrityError)
    assert err.check == "integrity"
    # Right digest, wrong length: also refused.
    err = _refuses(pack(dataclasses.replace(manifest, graph_bytes=len(graph) + 1), graph), r"bytes\), found", IntegrityError)
    # A graph with one byte appended.
    _refuses(pack(manifest, graph + b"\0"), r"patch\.onnx expected sha256", IntegrityError)


def test_error_tree():
    for cls in (PatchFormatError, IntegrityError):
        assert issubclass(cls, PatchVerificationError) and issubclass(cls, ValueError)


# ----------------------------------------------------------------------------- canonical graph
def reference_patch(z: np.ndarray, f: np.ndarray, params: PatchParams) -> tuple[np.ndarray, np.ndarray]:
    """float64 f + sum_k g_k (T_k f + t_k), g_k = relu(1 - gamma_k delta sum_i relu(-s_ki q_i)) with q the
    int8 quantization of float32 z, the summed violation written out per coordinate."""
    q = quantize(z.astype(np.float32), params.scale_log2).astype(np.float64)
    f = f.astype(np.float64)
    s = params.signs.astype(np.float64)
    viol = np.maximum(-(q[:, None, :] * s[None]), 0.0).sum(axis=2) * params.delta
    g = np.maximum(1.0 - params.gamma.astype(np.float64)[None] * viol, 0.0)
    corr = np.einsum("nk,kcd,nd->nc", g, params.T.astype(np.float64), f) + g @ params.t.astype(np.float64)
    return f + corr, g


def feeds(z: np.ndarray, f: np.ndarray) -> dict[str, np.ndarray]:
    out, at = {}, 0
    for g in GATED:
        out[g.name] = np.ascontiguousarray(z[:, at : at + g.size].reshape(len(z), *g.shape), dtype=np.float32)
        at += g.size
    out[LOGITS] = f.astype(np.float32)
    return out


def session(model: onnx.ModelProto, *extra_outputs: str) -> ort.InferenceSession:
    model = copy.deepcopy(model)
    for name in extra_outputs:
        model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


FORMS = ("affine", "shift", "collapse")


@pytest.fixture(scope="module", params=FORMS)
def canonical(request):
    """A random patch graph in each form: general T, T = 0 (shift) and T = -I (collapse)."""
    form = request.param
    rng = np.random.default_rng(7)
    params = random_params(rng, p=4)
    if form == "shift":
        params = PatchParams(params.signs, params.gamma, np.zeros_like(params.T), params.t, params.scale_log2)
    elif form == "collapse":
        params = PatchParams(params.signs, params.gamma, np.broadcast_to(-np.eye(C), params.T.shape), params.t, params.scale_log2)
    assert form_of(params) == form
    prefix = "pe_fedcba9876543210_"
    model = build_patch_graph(prefix, GATED, LOGITS, params, OPSET, IR, form)
    return prefix, params, model, form


def test_canonical_graph_is_valid_onnx(canonical):
    prefix, params, model, form = canonical
    onnx.checker.check_model(model, full_check=True)
    g = model.graph
    assert [i.name for i in g.input] == [t.name for t in GATED] + [LOGITS]
    assert [o.name for o in g.output] == [output_name(prefix)]
    names = {t for n in g.node for t in n.output} | {i.name for i in g.initializer}
    assert all(n.startswith(prefix) for n in names), "every patch-internal name carries the prefix"
    assert model.opset_import[0].version == OPSET and model.ir_version == IR
    # Same inputs -> same bytes.
    assert build_patch_graph(prefix, GATED, LOGITS, params, OPSET, IR, form).SerializeToString() == model.SerializeToString()


def test_extract_params_round_trip(canonical):
    prefix, params, model, form = canonical
    back = extract_params(model, prefix, params.n_records, M, C, form)
    np.testing.assert_array_equal(back.signs, params.signs)
    np.testing.assert_array_equal(back.gamma, params.gamma)
    np.testing.assert_array_equal(back.T, params.T)
    np.testing.assert_array_equal(back.t, params.t)
    assert back.scale_log2 == params.scale_log2


def test_canonical_graph_matches_reference(canonical):
    prefix, params, model, form = canonical
    rng = np.random.default_rng(11)
    n_each = 40
    p = params.n_records
    rows = []
    for k in range(p):
        s = params.signs[k].astype(np.float64)
        inside = s * rng.uniform(0.05, 2.0, size=(n_each, M))  # exactly in record k's region
        partial = inside.copy()
        flip = rng.integers(0, M, size=n_each)
        partial[np.arange(n_each), flip] = -s[flip] * rng.uniform(0.01, 1.2 / params.gamma[k], size=n_each)
        rows += [inside, partial]
    rows.append(rng.normal(scale=1.5, size=(n_each, M)))  # anywhere
    z = np.concatenate(rows).astype(np.float32)
    f = (rng.normal(size=(len(z), C)) * 5).astype(np.float32)
    ref, g = reference_patch(z, f, params)
    # The inputs cover closed, partially open and fully open gates.
    assert (g == 1.0).any() and (g == 0.0).any() and ((g > 0.05) & (g < 0.95)).any()
    sess = session(model, gate_name(prefix))
    out, gate = sess.run(None, feeds(z, f))
    assert out.dtype == np.float32 and out.shape == (len(z), C)
    np.testing.assert_allclose(gate, g, rtol=0, atol=1e-5)
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-4)
    # Batch independence: one row at a time gives the same numbers (dynamic batch).
    single = np.concatenate([sess.run(None, feeds(z[i : i + 1], f[i : i + 1]))[0] for i in range(0, len(z), 37)])
    np.testing.assert_allclose(single, out[::37], rtol=0, atol=5e-5)


def test_canonical_graph_closed_gates_are_bit_exact(canonical):
    prefix, params, model, form = canonical
    rng = np.random.default_rng(3)
    z = (rng.normal(size=(500, M)) * 50).astype(np.float32)
    f = (rng.normal(size=(500, C)) * 10).astype(np.float32)
    _, g = reference_patch(z, f, params)
    # Keep rows whose every gate is closed by a clear margin (quantized violation * gamma >= 2).
    s = params.signs.astype(np.float64)
    q = quantize(z, params.scale_log2).astype(np.float64)
    viol = np.maximum(-(q[:, None, :] * s[None]), 0).sum(2) * params.delta * params.gamma[None]
    keep = (viol >= 2.0).all(axis=1)
    assert keep.sum() > 100 and (g[keep] == 0).all()
    out = session(model).run(None, feeds(z[keep], f[keep]))[0]
    assert np.array_equal(out, f[keep]), "closed gates must return the base logits bit for bit"
    # Sanity: the same graph does change logits once a gate opens.
    zin = (params.signs[0].astype(np.float32) * 1.0)[None]
    out_open = session(model).run(None, feeds(zin, f[:1]))[0]
    assert not np.array_equal(out_open, f[:1])


def test_canonical_graph_already_simple(canonical):
    """onnxsim can at most fold constant-only nodes (there are none now: the int8 signs feed
    MatMulInteger as stored) and drop Flatten nodes that are identities on already-flat inputs; every
    node that touches data survives."""
    onnxsim = pytest.importorskip("onnxsim")
    prefix, params, model, form = canonical
    simplified, ok = onnxsim.simplify(copy.deepcopy(model))
    assert ok
    constant = {i.name for i in model.graph.initializer}
    removable = []
    flat_inputs = {g.name for g in GATED if len(g.shape) == 1}
    for node in model.graph.node:
        if all(i in constant for i in node.input) or (node.op_type == "Flatten" and node.input[0] in flat_inputs):
            constant.update(node.output) if node.op_type != "Flatten" else None
            removable.append(node)
    assert {n.op_type for n in removable} <= {"Cast", "Mul", "Flatten"}
    data_nodes = [n for n in model.graph.node if n not in removable]
    assert len(simplified.graph.node) >= len(data_nodes)
    rng = np.random.default_rng(5)
    z = rng.normal(size=(16, M)).astype(np.float32)
    f = rng.normal(size=(16, C)).astype(np.float32)
    np.testing.assert_allclose(session(simplified).run(None, feeds(z, f))[0], session(model).run(None, feeds(z, f))[0], atol=1e-6)


def test_gate_quantization_is_exactly_the_reference(canonical):
    """The device's QuantizeLinear / MatMulInteger give exactly the integers the server reasons with:
    round half to even, saturation at +-128 steps, exact |q|_1 - q.s (ties, huge, tiny and -0 values)."""
    prefix, params, model, form = canonical
    rng = np.random.default_rng(13)
    step = params.delta
    z = rng.normal(scale=20 * step, size=(200, M))
    z[:20] = (rng.integers(-300, 300, size=(20, M)) + 0.5) * step  # exact ties
    z[20:30] = rng.choice([-1, 1], size=(10, M)) * 1e6  # saturation
    z[30:40] = rng.normal(scale=step / 10, size=(10, M))  # below half a step
    z[40, :] = -0.0
    z = z.astype(np.float32)
    f = np.zeros((len(z), C), np.float32)
    q_names = [f"{prefix}q{i}" for i in range(len(GATED))]
    sess = session(model, *q_names, prefix + "excess")
    outs = sess.run(None, feeds(z, f))
    q_dev = np.concatenate([q.reshape(len(z), -1) for q in outs[1:-1]], axis=1).astype(np.int32) - 128
    q = quantize(z, params.scale_log2).astype(np.int64)
    np.testing.assert_array_equal(q_dev, q)
    # the graph's |q|_1 - q.s is, exactly, twice the summed violation written out per coordinate
    violation = np.maximum(-params.signs[None, :, :].astype(np.int64) * q[:, None, :], 0).sum(2)
    np.testing.assert_array_equal(outs[-1], 2 * violation)


def test_gate_is_exactly_one_on_the_region(canonical):
    """Every coordinate agreeing in sign (any magnitude, saturated or not) gives gate 1 bit for bit,
    for any gamma; values of the wrong sign below half a step round to 0 and change nothing; one full
    step of the wrong sign closes a sharp gate."""
    prefix, params, model, form = canonical
    rng = np.random.default_rng(17)
    step = params.delta
    sharp = PatchParams(params.signs, np.full(params.n_records, 1e4), params.T, params.t, params.scale_log2)
    for p in (params, sharp):
        sess = session(build_patch_graph(prefix, GATED, LOGITS, p, OPSET, IR, form), gate_name(prefix))
        for k in range(p.n_records):
            s = p.signs[k].astype(np.float64)
            inside = s * np.exp(rng.uniform(np.log(step), np.log(1e5 * step), size=(50, M)))
            wrong_tiny = inside.copy()
            wrong_tiny[:, :3] = -s[:3] * rng.uniform(0, 0.49 * step, size=(50, 3))
            for z in (inside, wrong_tiny):
                gate = sess.run(None, feeds(z.astype(np.float32), np.zeros((50, C), np.float32)))[1]
                assert np.all(gate[:, k] == 1.0)
    wrong = (params.signs[0].astype(np.float32) * 10 * step)[None].copy()
    wrong[0, 0] *= -1
    sess = session(build_patch_graph(prefix, GATED, LOGITS, sharp, OPSET, IR, form), gate_name(prefix))
    assert sess.run(None, feeds(wrong, np.zeros((1, C), np.float32)))[1][0, 0] == 0.0


def test_scale_choice():
    z = np.random.default_rng(0).normal(size=(1000, 8)).astype(np.float32)
    e = choose_scale_log2(z)
    top = np.quantile(np.abs(z), 0.5)
    assert 2.0**e * 127 <= top < 2.0 ** (e + 1) * 127
    assert choose_scale_log2(np.zeros((3, 4), np.float32)) == DEFAULT_SCALE_LOG2
    with pytest.raises(ValueError, match="scale_log2"):
        PatchParams(np.ones((1, 2), np.int8), np.ones(1), np.zeros((1, 2, 2)), np.zeros((1, 2)), scale_log2=40)


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
