"""Verification of real patch files: every check passes on honest patches, and every kind of damage or
tampering is refused by the right check, with one line, before anything is composed."""

from __future__ import annotations

import copy
import dataclasses
import io
import shutil
import struct
import zipfile

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

pytest.importorskip("torch")

from prune_edge.basedir import train_base  # noqa: E402
from prune_edge.runtime import (  # noqa: E402
    CHECKS,
    BaseGraph,
    CertificateError,
    IncompatibleBaseError,
    IntegrityError,
    InterferenceError,
    LocalityError,
    PatchedModel,
    PatchFormatError,
    PatchVerificationError,
    StructureError,
    certify_patch,
    pack,
    read_patch_file,
    unpack,
    verify_patch,
)
from prune_edge.runtime.compose import compose  # noqa: E402
from prune_edge.runtime.fileio import sha256_bytes  # noqa: E402
from prune_edge.runtime.manifest import derive_patch_id  # noqa: E402
from prune_edge.runtime.model import make_session  # noqa: E402
from prune_edge.runtime.patchgraph import (  # noqa: E402
    PatchParams,
    affine_from_scales,
    build_patch_graph,
    completed_spec,
    extract_params,
    OUTPUT_NAME,
    PREFIX,
    form_of,
)
from prune_edge.runtime.verify import VerifiedPatch  # noqa: E402

MODES = ("prune", "collapse")


# ----------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def base(mlp_bundle) -> BaseGraph:
    return BaseGraph.load(mlp_bundle.onnx_path)


@pytest.fixture(scope="module")
def other_base(tmp_path_factory):
    """A second base with the same recipe but seed 1: same architecture, different weights."""
    out = tmp_path_factory.mktemp("other-base") / "base-mlp-seed1"
    train_base("mnist5k", "mlp", out, seed=1, progress=False)
    return out / "base.onnx"


def parts(path):
    pf = read_patch_file(path)
    return pf.manifest, pf.graph_bytes


G0 = PREFIX + "g0_"  # the canonical graph's names of its (single) gate group


def params_of(manifest, graph_bytes) -> PatchParams:
    m = manifest
    return extract_params(onnx.load_from_string(graph_bytes), len(m.records), m.gated_size, m.n_classes, m.form)


def canonical_bytes_of(manifest, params: PatchParams, form: str | None = None) -> bytes:
    m = manifest
    return build_patch_graph(m.gated, m.logits_name, params, m.base_opset, m.base_ir_version, form or m.form).SerializeToString()


def repack(path, manifest, graph_bytes: bytes, rehash: bool = True, **changes):
    """Write a patch file with ``changes`` applied to the manifest. By default (what a tamperer who
    knows the format does) its graph digest and size are updated to match ``graph_bytes`` and its
    patch id is re-derived from the edited content; ``rehash=False`` leaves all three as they were."""
    manifest = dataclasses.replace(manifest, **changes)
    if rehash:
        manifest = dataclasses.replace(manifest, graph_sha256=sha256_bytes(graph_bytes), graph_bytes=len(graph_bytes))
        manifest = dataclasses.replace(manifest, patch_id=derive_patch_id(manifest.to_json()))
    path.write_bytes(pack(manifest, graph_bytes))
    return path


def with_params(manifest, graph, **changes) -> bytes:
    """The canonical graph of the patch's parameters with ``changes`` (arrays) applied."""
    return canonical_bytes_of(manifest, dataclasses.replace(params_of(manifest, graph), **changes))


def replace_record(manifest, k: int, **changes):
    recs = list(manifest.records)
    recs[k] = dataclasses.replace(recs[k], **changes)
    return tuple(recs)


def assert_refused(path, base_path, error: type[PatchVerificationError], failed: str, match: str | None = None):
    """The file is refused by verify_patch, PatchedModel and certify_patch, naming check ``failed``."""
    base = BaseGraph.load(base_path)
    with pytest.raises(error, match=match) as info:
        verify_patch(path, base)
    msg = str(info.value)
    assert msg and "\n" not in msg and len(msg) < 500, msg
    assert info.value.check == failed
    model = None
    with pytest.raises(error):
        model = PatchedModel(base_path, [path])
    assert model is None
    report = certify_patch(path, base)
    assert not report.passed
    statuses = {c.name: c.status for c in report.checks}
    assert [c.name for c in report.checks] == list(CHECKS)
    i = CHECKS.index(failed)
    assert all(statuses[n] == "pass" for n in CHECKS[:i]), statuses
    assert statuses[failed] == "fail" and report.failure.name == failed
    assert all(statuses[n] == "skipped" for n in CHECKS[i + 1 :]), statuses
    assert report.failure.detail == msg
    assert report.to_json()["passed"] is False
    return info.value


def expect_any_refusal(fn, original: bytes | None = None):
    """Run ``fn`` (which verifies the damaged file); it must raise a PatchVerificationError.

    Zip metadata the reader would ignore counts too: the container must be canonical byte for byte.
    """
    try:
        fn()
    except PatchVerificationError as exc:
        assert "\n" not in str(exc)
        return exc
    pytest.fail("a damaged patch file was accepted")


# ----------------------------------------------------------------------------- honest patches pass
@pytest.mark.parametrize("mode", MODES)
def test_real_patches_pass_every_check(patches, base, mode):
    path, _ = patches[mode]
    report = certify_patch(path, base)
    assert [(c.name, c.status) for c in report.checks] == [(n, "pass") for n in CHECKS]
    assert report.passed and report.failure is None
    assert report.manifest.mode == mode
    vp = verify_patch(path, base)
    assert vp.manifest == report.manifest
    assert vp.manifest.base_sha256 == base.sha256
    assert vp.params.n_records == len(vp.manifest.records) == len(report.manifest.records) >= 1
    # The report is JSON-able for the certify command.
    doc = report.to_json()
    assert doc["passed"] is True and doc["patch_id"] == vp.manifest.patch_id


@pytest.mark.parametrize("mode", MODES)
def test_real_patch_forms(patches, mode):
    """The manifest's graph form is the cheapest exact one for its parameters."""
    manifest, graph = parts(patches[mode][0])
    params = params_of(manifest, graph)
    assert form_of(params) == manifest.form
    if mode == "collapse":
        assert manifest.form == "collapse"


# ----------------------------------------------------------------------------- binding
@pytest.mark.parametrize("mode", MODES)
def test_patch_for_another_base_is_refused(patches, other_base, mode):
    path, _ = patches[mode]
    err = assert_refused(path, other_base, IncompatibleBaseError, "binding", r"bound to base sha256")
    assert path.name in str(err)


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda m: {"gated": (dataclasses.replace(m.gated[0], name="preact_9"), *m.gated[1:])}, r"'preact_9' .*found no such tensor"),
        (lambda m: {"gated": (dataclasses.replace(m.gated[0], shape=(255,)), *m.gated[1:])}, r"of shape \(N, 255\), found shape \(256,\)"),
        (lambda m: {"base_opset": m.base_opset - 1}, r"expected base opset"),
        (lambda m: {"base_sha256": "0" * 64}, r"bound to base sha256 0000"),
        (lambda m: {"logits_name": "relu"}, r"reads logits 'relu', expected the base's output 'logits'"),
    ],
    ids=["gated-name", "gated-shape", "opset", "base-sha", "logits-not-the-output"],
)
def test_binding_manifest_edits_refused(patches, mlp_bundle, tmp_path, change, match):
    manifest, graph = parts(patches["prune"][0])
    path = repack(tmp_path / "p.pepatch", manifest, graph, **change(manifest))
    assert_refused(path, mlp_bundle.onnx_path, IncompatibleBaseError, "binding", match)


# ----------------------------------------------------------------------------- damaged files
def _zip_positions(data: bytes) -> dict[str, int]:
    """Byte positions of fields that matter in the patch container."""
    zf = zipfile.ZipFile(io.BytesIO(data))
    info = {i.filename: i for i in zf.infolist()}
    pos = {}
    for short, name in (("manifest", "manifest.json"), ("graph", "patch.onnx")):
        zi = info[name]
        name_len, extra_len = struct.unpack("<HH", data[zi.header_offset + 26 : zi.header_offset + 30])
        start = zi.header_offset + 30 + name_len + extra_len
        pos[f"{short}-data-first"] = start
        pos[f"{short}-data-middle"] = start + zi.compress_size // 2
        # (not the very last bytes: they hold only the end-of-block code, whose corruption zlib
        # tolerates once all data is out -- the sweep test covers those)
        pos[f"{short}-data-near-end"] = start + zi.compress_size - 16
        pos[f"{short}-local-magic"] = zi.header_offset
        pos[f"{short}-local-name"] = zi.header_offset + 30
    cd = struct.unpack("<I", data[-22 + 16 : -22 + 20])[0]
    assert data[cd : cd + 4] == b"PK\x01\x02"
    entry = cd
    for _ in range(2):
        name_len, extra_len, comment_len = struct.unpack("<HHH", data[entry + 28 : entry + 34])
        name = data[entry + 46 : entry + 46 + name_len].decode()
        short = "manifest" if name == "manifest.json" else "graph"
        pos[f"{short}-cd-crc"] = entry + 16
        pos[f"{short}-cd-csize"] = entry + 20
        pos[f"{short}-cd-size"] = entry + 24
        pos[f"{short}-cd-offset"] = entry + 42
        pos[f"{short}-cd-name"] = entry + 46
        entry += 46 + name_len + extra_len + comment_len
    pos["eocd-magic"] = len(data) - 22
    pos["eocd-cd-offset"] = len(data) - 22 + 16
    pos["eocd-entries"] = len(data) - 22 + 10
    return pos


FLIP_POSITIONS = [
    "manifest-data-first", "manifest-data-middle", "manifest-data-near-end",
    "graph-data-first", "graph-data-middle", "graph-data-near-end",
    "manifest-local-magic", "manifest-local-name", "graph-local-magic", "graph-local-name",
    "manifest-cd-crc", "graph-cd-crc", "manifest-cd-size", "graph-cd-csize", "graph-cd-offset",
    "manifest-cd-name", "graph-cd-name", "eocd-magic", "eocd-cd-offset", "eocd-entries",
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("where", FLIP_POSITIONS)
def test_flipped_byte_refused(patches, mlp_bundle, tmp_path, mode, where):
    data = patches[mode][0].read_bytes()
    i = _zip_positions(data)[where]
    bad = bytearray(data)
    bad[i] ^= 0xFF
    path = tmp_path / "flipped.pepatch"
    path.write_bytes(bytes(bad))
    base = BaseGraph.load(mlp_bundle.onnx_path)
    exc = expect_any_refusal(lambda: verify_patch(path, base), original=data)
    assert path.name in str(exc) or "manifest" in str(exc)
    model = None
    with pytest.raises(PatchVerificationError):
        model = PatchedModel(mlp_bundle.onnx_path, [path])
    assert model is None
    report = certify_patch(path, base)
    assert not report.passed and report.failure.name in CHECKS
    assert report.checks[-1].status in ("skipped", "fail")


def test_flip_sweep_refuses_every_flip(patches):
    """Flip every byte of the prune patch, one at a time: every single flip is refused with a
    PatchVerificationError (never another exception), zip metadata included (canonical container)."""
    data = patches["prune"][0].read_bytes()
    accepted = []
    for i in range(len(data)):
        bad = bytearray(data)
        bad[i] ^= 0xFF
        try:
            unpack(bytes(bad))
        except PatchVerificationError:
            continue
        accepted.append(i)
    assert accepted == []


@pytest.mark.parametrize("cut", [0, 1, 29, 100, "half", "minus-22", "minus-1"])
def test_truncated_file_refused(patches, mlp_bundle, tmp_path, cut):
    data = patches["prune"][0].read_bytes()
    n = {"half": len(data) // 2, "minus-22": len(data) - 22, "minus-1": len(data) - 1}.get(cut, cut)
    path = tmp_path / "short.pepatch"
    path.write_bytes(data[:n])
    assert_refused(path, mlp_bundle.onnx_path, PatchFormatError, "format")


def test_missing_file_refused(mlp_bundle, tmp_path):
    assert_refused(tmp_path / "absent.pepatch", mlp_bundle.onnx_path, PatchFormatError, "format", r"absent\.pepatch: cannot read")


def test_graph_swapped_without_rehash(patches, mlp_bundle, tmp_path):
    manifest, _ = parts(patches["prune"][0])
    _, other_graph = parts(patches["collapse"][0])
    path = repack(tmp_path / "swap.pepatch", manifest, other_graph, rehash=False)
    assert_refused(path, mlp_bundle.onnx_path, IntegrityError, "integrity", r"patch\.onnx expected sha256")


# ----------------------------------------------------------------------------- structure tampering
def _tamper_append_offset(model: onnx.ModelProto, c: int) -> None:
    """Add a constant to the output after the gated correction: changes outputs everywhere."""
    last = model.graph.node[-1]
    last.output[0] = PREFIX + "evil_pre"
    last.name = PREFIX + "evil_pre"
    offset = np.zeros(c, np.float32)
    offset[0] = 50.0
    model.graph.initializer.append(numpy_helper.from_array(offset, PREFIX + "offset"))
    model.graph.node.append(helper.make_node("Add", [PREFIX + "evil_pre", PREFIX + "offset"], [OUTPUT_NAME], name=OUTPUT_NAME))


def _tamper_sum_offset(model: onnx.ModelProto, c: int) -> None:
    """Replace the final Add by a Sum that also adds a constant initializer."""
    last = model.graph.node[-1]
    offset = np.full(c, 3.0, np.float32)
    model.graph.initializer.append(numpy_helper.from_array(offset, PREFIX + "offset"))
    new = helper.make_node("Sum", [*last.input, PREFIX + "offset"], list(last.output), name=last.name)
    model.graph.node.remove(last)
    model.graph.node.append(new)


def _tamper_relu_to_identity(model, c):
    """Drop the gate's clamp: the gate would no longer be 0 away from the region."""
    node = next(n for n in model.graph.node if n.op_type == "Clip")
    node.op_type = "Identity"
    del node.input[1:]


def _tamper_keepdims(model, c):
    node = next(n for n in model.graph.node if n.op_type == "ReduceSum")
    node.attribute[0].i = 0


def _tamper_unused_initializer(model, c):
    model.graph.initializer.append(numpy_helper.from_array(np.zeros(3, np.float32), PREFIX + "spare"))


def _replace_initializer(model, name, change) -> None:
    """Swap initializer ``name`` for ``change(its array)``, keeping its place and name."""
    init = next(i for i in model.graph.initializer if i.name == name)
    init.CopyFrom(numpy_helper.from_array(change(numpy_helper.to_array(init).copy()), init.name))


def _tamper_sign_lut_zero(model, c):
    def drop(arr):
        arr[:, 0] = 0  # every byte's high bit read as 0: record 0 ignores those neurons, a larger region
        return arr

    _replace_initializer(model, G0 + "sign_lut", drop)


def _tamper_signs_float(model, c):
    _replace_initializer(model, G0 + "signs_packed", lambda arr: arr.astype(np.float32))


def _tamper_signs_unpacked(model, c):
    """Format 3's int8 sign table in place of the packed bits and their unpacking."""
    unpacked = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == G0 + "signs_packed"))
    signs = (2 * np.unpackbits(unpacked, axis=1).astype(np.int8) - 1)
    keep = [n for n in model.graph.node if not n.name.startswith(G0 + "signs")]
    del model.graph.node[:]
    model.graph.node.extend(keep)
    inits = [i for i in model.graph.initializer if not i.name.startswith(G0 + "sign")]
    del model.graph.initializer[:]
    model.graph.initializer.extend(inits + [numpy_helper.from_array(signs, G0 + "signs")])


def _tamper_sign_padding(model, c):
    def pad(arr):
        arr[:, -1] |= 1  # the last byte's low bit: padding unless the record count is a multiple of 8
        return arr

    _replace_initializer(model, G0 + "signs_packed", pad)


def _tamper_delta_not_power_of_two(model, c):
    _replace_initializer(model, G0 + "inv_delta", lambda arr: np.array(0.03, np.float32))


def _tamper_opset(model, c):
    model.opset_import[0].version += 1


def _tamper_doc_string(model, c):
    model.doc_string = "harmless?"


def _tamper_swap_nodes(model, c):
    nodes = list(model.graph.node)
    i = next(k for k, n in enumerate(nodes) if n.op_type == "Min")
    assert nodes[i + 1].op_type == "ReduceSum"
    nodes[i], nodes[i + 1] = nodes[i + 1], nodes[i]  # Min and ReduceSum: an invalid order, refused anyway
    del model.graph.node[:]
    model.graph.node.extend(nodes)


def _tamper_metadata(model, c):
    model.metadata_props.append(onnx.StringStringEntryProto(key="k", value="v"))


STRUCTURE_TAMPERS = {
    "append-offset": (_tamper_append_offset, r"not the canonical gated-affine graph"),
    "sum-offset": (_tamper_sum_offset, r"not the canonical"),
    "clip-to-identity": (_tamper_relu_to_identity, r"not the canonical"),
    "reducesum-keepdims": (_tamper_keepdims, r"not the canonical"),
    "unused-initializer": (_tamper_unused_initializer, r"expected \d+ initializers, found \d+ \(extra \[.*spare"),
    "sign-lut-zero": (_tamper_sign_lut_zero, r"not the canonical"),
    "signs-float": (_tamper_signs_float, r"'pe_g0_signs_packed' expected dtype UINT8"),
    "signs-unpacked": (_tamper_signs_unpacked, r"expected initializer 'pe_g0_signs_packed', found none"),
    "sign-padding": (_tamper_sign_padding, r"sign padding bits expected 0, found \d+ set|not the canonical"),
    "delta-not-power-of-two": (_tamper_delta_not_power_of_two, r"quantization step expected a power of two"),
    "opset": (_tamper_opset, r"not the canonical"),
    "doc-string": (_tamper_doc_string, r"not the canonical"),
    "node-order": (_tamper_swap_nodes, r"not the canonical"),
    "metadata": (_tamper_metadata, r"not the canonical"),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("tamper", list(STRUCTURE_TAMPERS))
def test_structure_tamper_refused(patches, mlp_bundle, tmp_path, mode, tamper):
    fn, match = STRUCTURE_TAMPERS[tamper]
    manifest, graph = parts(patches[mode][0])
    model = onnx.load_from_string(graph)
    fn(model, manifest.n_classes)
    new = model.SerializeToString()
    assert new != graph
    path = repack(tmp_path / "tampered.pepatch", manifest, new)
    # The container itself is fine: digest and size match the tampered graph.
    assert unpack(path.read_bytes()).graph_bytes == new
    assert_refused(path, mlp_bundle.onnx_path, StructureError, "structure", match)


def run_composed(base: BaseGraph, vps, x, expose_gates: bool = False) -> list[np.ndarray]:
    """Outputs of the base composed with ``vps`` (no set check): logits, and with ``expose_gates``
    the acting gate (N, 1) and its record (N,)."""
    model = compose(base.model, vps, expose_gates=expose_gates).model
    return make_session(model.SerializeToString()).run(None, {base.input_name: x})


def run_patch_graph(base: BaseGraph, patch_model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """A received patch graph run as it is, fed with the base tensors it reads: what a runtime that
    spliced the file's graph into the base (instead of rebuilding it from the verified parameters,
    as :func:`compose` does) would serve."""
    names = [i.name for i in patch_model.graph.input]
    tapped = copy.deepcopy(base.model)
    tapped.graph.output.extend(
        helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in names if n != base.logits_name
    )
    feeds = make_session(tapped.SerializeToString()).run(names, {base.input_name: x})
    return make_session(patch_model.SerializeToString()).run(None, dict(zip(names, feeds)))[0]


def test_offset_tamper_would_change_untouched_points(patches, mlp_bundle):
    """Why the structure check matters: the append-offset graph, run as received, moves the logits of
    every test point (no gate is open on them), while the honest graph moves none. (Composition never
    runs a received graph: it rebuilds the canonical one from the verified parameters.)"""
    base = BaseGraph.load(mlp_bundle.onnx_path)
    honest = verify_patch(patches["prune"][0], base)
    model = copy.deepcopy(honest.model)
    _tamper_append_offset(model, honest.manifest.n_classes)
    x = mlp_bundle.dataset.x_test[:200]
    plain = run_composed(base, [], x)[0]
    good, bad = run_patch_graph(base, honest.model, x), run_patch_graph(base, model, x)
    assert np.array_equal(plain, good)
    assert np.array_equal(plain, run_composed(base, [honest], x)[0])
    assert np.allclose(bad[:, 0] - plain[:, 0], 50.0, atol=1e-3)
    evil = dataclasses.replace(honest, source="evil", model=model)
    assert np.array_equal(plain, run_composed(base, [evil], x)[0])


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda m: {"records": m.records[:-1]}, r"initializer .* expected dtype .* shape"),
        (lambda m: {"gated": m.gated[1:]}, r"."),
        (lambda m: {"form": "affine" if m.form != "affine" else "shift"}, r"expected initializer 'pe_T_table'|not the canonical"),
        (lambda m: {"gate_step_log2": m.gate_step_log2 + 1}, r"patch graph gates with step 2\^-?\d+, its manifest says"),
    ],
    ids=["drop-record", "drop-gated-tensor", "other-form", "other-gate-step"],
)
@pytest.mark.parametrize("mode", MODES)
def test_manifest_graph_mismatch_refused(patches, mlp_bundle, tmp_path, mode, change, match):
    manifest, graph = parts(patches[mode][0])
    path = repack(tmp_path / "mismatch.pepatch", manifest, graph, **change(manifest))
    assert_refused(path, mlp_bundle.onnx_path, StructureError, "structure", match)


def test_undecodable_graph_refused(patches, mlp_bundle, tmp_path):
    manifest, _ = parts(patches["prune"][0])
    path = repack(tmp_path / "junk.pepatch", manifest, b"\xff" * 64)
    assert_refused(path, mlp_bundle.onnx_path, StructureError, "structure")


# ----------------------------------------------------------------------------- certificate tampering
def _shifts(manifest, graph, k: int = 0) -> np.ndarray:
    """Record k's shifts (P t, then the mean row) as the device computes them from the graph's t."""
    rec = manifest.records[k]
    return completed_spec(rec.target, manifest.n_classes) @ params_of(manifest, graph).t[k].astype(np.float64)


def _edge_row(manifest, graph, k: int = 0) -> int:
    """The specification row of record k that its certificate leaves least room: its patched top,
    alpha * upper + P t, is nearest q_upper (with the default common shift, the row of the largest upper
    bound; the other rows end further inside, so an edit of those may still certify)."""
    rec = manifest.records[k]
    top = np.asarray(rec.alpha) * np.asarray(rec.upper) + _shifts(manifest, graph, k)[:-1]
    return int(np.argmax(top))


def _cert_upper_in_manifest(manifest, graph):
    """prune: record 0's stored upper bound raised on its edge row (what format 3's beta edit became: the
    manifest's certificate numbers no longer fit the graph's shift)."""
    rec = manifest.records[0]
    upper = list(rec.upper)
    upper[_edge_row(manifest, graph)] += 0.5
    return {"records": replace_record(manifest, 0, upper=tuple(upper))}, graph


def _cert_t_in_graph(manifest, graph):
    """The t entry of the class on record 0's edge row raised: that row moves up, past q_upper."""
    t = params_of(manifest, graph).t.copy()
    others = [c for c in range(manifest.n_classes) if c != manifest.records[0].target]
    edge = others[_edge_row(manifest, graph)] if manifest.mode == "prune" else (manifest.records[0].target + 1) % manifest.n_classes
    t[0, edge] += 0.5  # collapse: every row sits at q_upper
    return {}, with_params(manifest, graph, t=t)


def _cert_consistent_spec_violation(manifest, graph):
    """Move record 0 so the target no longer wins: the graph's t shifted as PRUNE's closed form would
    for a larger beta (the manifest has nothing to keep consistent in format 4)."""
    rec = manifest.records[0]
    # Shift every row by more than its certified width: on the whole region each row e_j - e_target
    # becomes positive, i.e. every other class beats the target.
    width = 0.0 if rec.lower is None else np.asarray(rec.upper) - np.asarray(rec.lower)
    b = _shifts(manifest, graph)
    new_beta = b[:-1] + width + 2.0 * abs(manifest.q_upper) + 5.0
    p = params_of(manifest, graph)
    T0, t0 = affine_from_scales(rec.target, np.asarray(rec.alpha), new_beta, rec.mean_scale, b[-1], manifest.n_classes)
    T, t = p.T.copy(), p.t.copy()
    T[0], t[0] = T0, t0
    return {}, with_params(manifest, graph, T=T, t=t)


def _cert_nan_t_in_graph(manifest, graph):
    """A NaN offset in record 1: every comparison with NaN is false, so a check written as a
    violation test would let it through, and 0 * NaN would then poison outputs."""
    t = params_of(manifest, graph).t.copy()
    t[1, 0] = np.nan
    return {}, with_params(manifest, graph, t=t)


def _cert_spec_within_float_slack(manifest, graph):
    """Record 0's stored t moved so one patched row ends 1e-4 above q_upper: the spec is checked on the
    stored t with no tolerance (q_upper < 0 is the margin itself)."""
    rec = manifest.records[0]
    p = params_of(manifest, graph)
    upper = np.zeros(manifest.n_classes - 1) if rec.upper is None else np.asarray(rec.upper)
    alpha = np.asarray(rec.alpha)
    b = _shifts(manifest, graph)
    beta = b[:-1].copy()
    beta[0] = manifest.q_upper + 1e-4 - alpha[0] * upper[0]  # row 0 patched to q_upper + 1e-4 at its top
    T0, t0 = affine_from_scales(rec.target, alpha, beta, rec.mean_scale, b[-1], manifest.n_classes)
    T, t = p.T.copy(), p.t.copy()
    T[0], t[0] = T0, t0
    return {}, with_params(manifest, graph, T=T, t=t)


def _cert_gamma_in_manifest(manifest, graph):
    return {"records": replace_record(manifest, 0, gamma=manifest.records[0].gamma * 2)}, graph


def _cert_gamma_in_graph(manifest, graph):
    gamma = params_of(manifest, graph).gamma.copy()
    gamma[1] *= 2.0  # a narrower gate: within the policy, so only the certificate sees it
    return {}, with_params(manifest, graph, gamma=gamma)


def _cert_target(manifest, graph):
    rec = manifest.records[0]
    return {"records": replace_record(manifest, 0, target=(rec.target + 1) % manifest.n_classes)}, graph


def _cert_alpha_above_one(manifest, graph):
    """prune: alpha > 1 widens the rows; T, t and the form are updated consistently."""
    rec = manifest.records[0]
    alpha = np.asarray(rec.alpha).copy()
    alpha[0] = 1.5
    p = params_of(manifest, graph)
    b = _shifts(manifest, graph)
    T0, t0 = affine_from_scales(rec.target, alpha, b[:-1], rec.mean_scale, b[-1], manifest.n_classes)
    T, t = p.T.copy(), p.t.copy()
    T[0], t[0] = T0, t0
    params = dataclasses.replace(p, T=T, t=t)
    form = form_of(params)
    return {"records": replace_record(manifest, 0, alpha=tuple(alpha.tolist())), "form": form}, canonical_bytes_of(manifest, params, form)


def _cert_bounds_swapped(manifest, graph):
    rec = manifest.records[0]
    return {"records": replace_record(manifest, 0, lower=rec.upper, upper=rec.lower)}, graph


def _cert_collapse_alpha(manifest, graph):
    rec = manifest.records[0]
    return {"records": replace_record(manifest, 0, alpha=(0.5, *rec.alpha[1:]))}, graph


def _cert_mean_scale(manifest, graph):
    rec = manifest.records[0]
    return {"records": replace_record(manifest, 0, mean_scale=rec.mean_scale + 0.5)}, graph


ALGEBRA = r"P\(I\+T\) = diag\(alpha\) P does not hold within 1e-05"
SPEC = r"patched rows expected inside"
CERT_TAMPERS = {
    "upper-in-manifest": (("prune",), _cert_upper_in_manifest, r"record 0 .*" + SPEC),
    "t-in-graph": (("prune", "collapse"), _cert_t_in_graph, r"record 0 .*" + SPEC),
    "consistent-spec-violation": (("prune", "collapse"), _cert_consistent_spec_violation, r"record 0 .*patched rows expected inside"),
    "spec-within-float-slack": (("prune", "collapse"), _cert_spec_within_float_slack, r"record 0 .*patched rows expected inside \[-1000, -1\], found \[.*, -0\.999[89]\d*\]"),  # float32 t: ~1e-4 above
    "gamma-in-manifest": (("prune", "collapse"), _cert_gamma_in_manifest, r"record 0 .*expected gamma"),
    "gamma-in-graph": (("prune", "collapse"), _cert_gamma_in_graph, r"record 1 .*expected gamma"),
    # prune: T depends on the target (closed form); collapse: T = -I for any target, P t moves
    "target": (("prune", "collapse"), _cert_target, r"record 0 .*(closed form|" + ALGEBRA + "|" + SPEC + ")"),
    "alpha-above-one": (("prune",), _cert_alpha_above_one, r"record 0 .*0 < alpha <= 1"),
    "bounds-swapped": (("prune",), _cert_bounds_swapped, r"record 0 .*lower <= upper"),
    "collapse-alpha": (("collapse",), _cert_collapse_alpha, r"record 0 .*collapse expects alpha = 0"),
    "mean-scale": (("prune", "collapse"), _cert_mean_scale, r"record 0 .*(prune expects 0 < alpha <= 1 and mean scale 1|collapse expects alpha = 0)"),
}


@pytest.mark.parametrize(
    "mode,tamper",
    [(mode, name) for name, (modes, _, _) in CERT_TAMPERS.items() for mode in modes],
)
def test_certificate_tamper_refused(patches, mlp_bundle, tmp_path, mode, tamper):
    _, fn, match = CERT_TAMPERS[tamper]
    manifest, graph = parts(patches[mode][0])
    changes, new_graph = fn(manifest, graph)
    path = repack(tmp_path / "cert.pepatch", manifest, new_graph, **changes)
    assert_refused(path, mlp_bundle.onnx_path, CertificateError, "certificate", match)


@pytest.mark.parametrize("mode", MODES)
def test_nan_offset_refused(patches, mlp_bundle, tmp_path, mode):
    """A NaN in the graph's t: refused by the policy's cap on |t| (written as what must hold, so NaN
    fails), before the certificate is even read."""
    manifest, graph = parts(patches[mode][0])
    changes, new_graph = _cert_nan_t_in_graph(manifest, graph)
    path = repack(tmp_path / "nan.pepatch", manifest, new_graph, **changes)
    assert_refused(path, mlp_bundle.onnx_path, LocalityError, "locality", r"record 1 has \|t\| up to .* or a non-finite entry")


def test_infinite_half_precision_offset_refused(patches, mlp_bundle, tmp_path):
    """An attacker's t that is all float16 values but one infinity: the canonical graph stores it as
    float16 (inf is a float16), so the structure check accepts the storage, and the policy's cap on
    |t| refuses the value, as for any non-finite offset."""
    manifest, graph = parts(patches["prune"][0])
    t = params_of(manifest, graph).t.copy()
    assert (t.astype(np.float16).astype(np.float32) == t).all()  # a prune t: stored as float16
    t[1, 0] = np.inf
    new_graph = with_params(manifest, graph, t=t)
    inits = {i.name for i in onnx.load_from_string(new_graph).graph.initializer}
    assert "pe_t_table16" in inits and "pe_t_table" not in inits
    path = repack(tmp_path / "inf.pepatch", manifest, new_graph)
    assert_refused(path, mlp_bundle.onnx_path, LocalityError, "locality", r"record 1 has \|t\| up to .* or a non-finite entry")


def test_manifest_edit_without_new_id_refused(patches, mlp_bundle, tmp_path):
    """The patch id is derived from the signed content: an edit that keeps the old id (and digest)
    is refused by the format check, before any graph byte is read."""
    manifest, graph = parts(patches["prune"][0])
    changes, _ = _cert_upper_in_manifest(manifest, graph)
    path = repack(tmp_path / "stale-id.pepatch", manifest, graph, rehash=False, **changes)
    match = r"patch_id: expected [0-9a-f]{32} \(sha256 of the manifest's content\), found '" + manifest.patch_id
    assert_refused(path, mlp_bundle.onnx_path, PatchFormatError, "format", match)
    # the same edit with the id re-derived passes the format check and reaches the certificate
    rehashed = repack(tmp_path / "new-id.pepatch", manifest, graph, **changes)
    assert_refused(rehashed, mlp_bundle.onnx_path, CertificateError, "certificate", SPEC)


def _record0_points(base: BaseGraph, honest: VerifiedPatch, x: np.ndarray) -> np.ndarray:
    """Rows of ``x`` on which the honest patch's record 0 acts (gate open)."""
    _, gate, k = run_composed(base, [honest], x, expose_gates=True)
    return np.flatnonzero((k == 0) & (gate.reshape(-1) > 0))


def test_consistent_spec_violation_is_a_real_attack(patches, mlp_bundle, forget_ids):
    """Composed without verification, the spec-violating patch really lets the original label win on
    record 0's forget point; the certificate check is what stops it."""
    manifest, graph = parts(patches["prune"][0])
    changes, new_graph = _cert_consistent_spec_violation(manifest, graph)
    evil_manifest = dataclasses.replace(manifest, graph_sha256=sha256_bytes(new_graph), graph_bytes=len(new_graph), **changes)
    model = onnx.load_from_string(new_graph)
    evil = VerifiedPatch("evil", evil_manifest, model, params_of(evil_manifest, new_graph))
    base = BaseGraph.load(mlp_bundle.onnx_path)
    honest = verify_patch(patches["prune"][0], base)
    x = mlp_bundle.dataset.x_train[forget_ids]
    members = _record0_points(base, honest, x)
    assert len(members) >= 1
    target = manifest.records[0].target
    assert (run_composed(base, [honest], x[members])[0].argmax(1) == target).all()
    assert (run_composed(base, [evil], x[members])[0].argmax(1) != target).all()


# ----------------------------------------------------------------------------- composition refusals
def test_duplicate_patch_refused(patches, mlp_bundle, tmp_path):
    path = patches["prune"][0]
    model = None
    with pytest.raises(InterferenceError, match=r"is also given as .*expected each patch once") as info:
        model = PatchedModel(mlp_bundle.onnx_path, [path, path])
    assert model is None and "\n" not in str(info.value)
    # Identity is the patch id, not the file name.
    renamed = tmp_path / "renamed.pepatch"
    shutil.copyfile(path, renamed)
    with pytest.raises(InterferenceError, match=r"is also given as"):
        PatchedModel(mlp_bundle.onnx_path, [path, renamed])


def test_one_bad_patch_refuses_the_whole_set(patches, mlp_bundle, other_base, tmp_path):
    """A good patch followed by a bad one: the constructor raises, nothing is returned or composed."""
    good = patches["prune"][0]
    data = patches["collapse"][0].read_bytes()
    bad = tmp_path / "bad.pepatch"
    bad.write_bytes(data[: len(data) // 3])
    model = None
    with pytest.raises(PatchFormatError):
        model = PatchedModel(mlp_bundle.onnx_path, [good, bad])
    assert model is None
    with pytest.raises(IncompatibleBaseError):
        model = PatchedModel(other_base, [good])
    assert model is None
    # The honest set still loads and the base alone is untouched.
    ok = PatchedModel(mlp_bundle.onnx_path, [good])
    assert ok.n_records == len(read_patch_file(good).manifest.records)
    x = mlp_bundle.dataset.x_test[:50]
    plain = make_session(BaseGraph.load(mlp_bundle.onnx_path).data).run(None, {"input": x})[0]
    np.testing.assert_array_equal(PatchedModel(mlp_bundle.onnx_path).logits(x), plain)


@pytest.mark.parametrize("tamper", ["gamma-in-graph", "consistent-spec-violation"])
def test_certificate_blocks_name_the_first_failing_record(patches, mlp_bundle, tmp_path, monkeypatch, tamper):
    """Records are checked in blocks; with one record per block the refusal still names the record
    that fails (here record 1 in the second block, record 0 in the first)."""
    import prune_edge.runtime.verify as verify_module

    monkeypatch.setattr(verify_module, "_CERT_BLOCK_VALUES", 1)
    _, fn, match = CERT_TAMPERS[tamper]
    manifest, graph = parts(patches["prune"][0])
    changes, new_graph = fn(manifest, graph)
    path = repack(tmp_path / "cert.pepatch", manifest, new_graph, **changes)
    assert_refused(path, mlp_bundle.onnx_path, CertificateError, "certificate", match)
    verify_patch(patches["prune"][0], BaseGraph.load(mlp_bundle.onnx_path))  # the honest patch still passes


def test_nan_offset_is_a_real_attack(patches, mlp_bundle, forget_ids):
    """Composed without verification, a NaN in record 1's offset (class 0) turns class 0's logit into
    NaN on every input where record 1 is the selected record, even where its gate is closed
    (0 * NaN), and argmax reads NaN as the maximum; the cap on |t| is what stops it."""
    manifest, graph = parts(patches["collapse"][0])
    _, new_graph = _cert_nan_t_in_graph(manifest, graph)
    evil_manifest = dataclasses.replace(manifest, graph_sha256=sha256_bytes(new_graph), graph_bytes=len(new_graph))
    evil = VerifiedPatch("evil", evil_manifest, onnx.load_from_string(new_graph), params_of(evil_manifest, new_graph))
    base = BaseGraph.load(mlp_bundle.onnx_path)
    ds = mlp_bundle.dataset
    x = np.concatenate([ds.x_test[:200], ds.x_train[forget_ids]])  # record 1's own point is among them
    out, _, k = run_composed(base, [evil], x, expose_gates=True)
    poisoned = np.isnan(out[:, 0])
    assert poisoned.any() and np.array_equal(poisoned, k == 1)
    assert (out[poisoned].argmax(1) == 0).all()
