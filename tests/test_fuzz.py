"""Hostile input, property-tested (issue 12): the patch reader, the manifest and the whole per-file
verification fed with generated files built from a real patch.

Properties, for every generated case:
- only our named errors (``PatchVerificationError`` and its children) ever come out, no other
  exception, no traceback;
- nothing malformed is accepted: mutated container bytes are accepted only if they are the original
  bytes; a mutated manifest (patch id and digests re-derived, as an attacker would) that passes every
  check round-trips exactly (nothing was coerced or ignored); a mutated graph (digest updated) is
  accepted only if it is the original graph;
- no hang: each case runs under a deadline;
- memory bounded: the Python/numpy peak of each case stays under a fixed cap (tracemalloc).

Default: 1,500 cases in total, derandomized (same cases on every run). Long mode:
``PRUNE_EDGE_FUZZ=long`` multiplies every count by 20 (about 30,000 cases).
"""

from __future__ import annotations

import copy
import io
import json
import os
import tracemalloc
import zipfile
from datetime import timedelta

import numpy as np
import onnx
from onnx import numpy_helper
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as hs

from prune_edge.runtime import BaseGraph, PatchVerificationError, unpack, verify_patch
from prune_edge.runtime.fileio import sha256_bytes
from prune_edge.runtime.manifest import Manifest, derive_patch_id
from prune_edge.runtime.patchgraph import PREFIX, unpack_signs
from prune_edge.runtime.patchfile import GRAPH_NAME, MANIFEST_NAME, _DEFLATE_LEVEL, _MANIFEST_DEFLATE_LEVEL, _ZIP_TIME

SCALE = 20 if os.environ.get("PRUNE_EDGE_FUZZ") == "long" else 1
MEMORY_CAP = 96 << 20  # bytes a single case may allocate at peak (patch files are capped at 64 MiB)


def fuzz_settings(n: int):
    return settings(max_examples=n * SCALE, deadline=timedelta(seconds=10), derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.data_too_large])


class _Short(bytes):
    """The honest file, shown by its size in hypothesis's failure reports (not 20 KB of bytes)."""

    def __repr__(self) -> str:
        return f"<honest patch, {len(self)} bytes>"


class _Base(BaseGraph):
    def __repr__(self) -> str:
        return f"<base {self.sha256[:12]}>"


@pytest.fixture(scope="module")
def honest(patches) -> bytes:
    return _Short(patches["prune"][0].read_bytes())


@pytest.fixture(scope="module")
def base(mlp_bundle) -> BaseGraph:
    b = _Base.load(mlp_bundle.onnx_path)
    b.card, b.tensor_shapes()  # loaded once, outside the measured cases
    return b


def bounded(fn, *args):
    """Run ``fn``; return its value or the named error it raised. Anything else fails the test (it
    propagates), and so does a peak allocation above ``MEMORY_CAP``."""
    tracemalloc.start()
    try:
        try:
            out = fn(*args)
        except PatchVerificationError as exc:
            out = exc
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < MEMORY_CAP, f"a case allocated {peak} bytes at peak"
    return out


def container(manifest_raw: bytes, graph: bytes) -> bytes:
    """A zip exactly as ``pack`` writes it, around any manifest bytes (so the canonical-encoding check
    does not stop the case before the manifest and graph checks run)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=_DEFLATE_LEVEL) as zf:
        for name, data, level in ((MANIFEST_NAME, manifest_raw, _MANIFEST_DEFLATE_LEVEL), (GRAPH_NAME, graph, _DEFLATE_LEVEL)):
            info = zipfile.ZipInfo(name, date_time=_ZIP_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, data, compresslevel=level)
    return buf.getvalue()


def encode(doc) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


# ----------------------------------------------------------------------------- 1. container bytes
byte_edits = hs.lists(
    hs.one_of(
        hs.tuples(hs.just("flip"), hs.integers(0, 1 << 20), hs.integers(0, 7)),
        hs.tuples(hs.just("cut"), hs.integers(0, 1 << 20), hs.just(0)),
        hs.tuples(hs.just("insert"), hs.integers(0, 1 << 20), hs.binary(min_size=1, max_size=64)),
        hs.tuples(hs.just("set"), hs.integers(0, 1 << 20), hs.binary(min_size=1, max_size=16)),
        hs.tuples(hs.just("append"), hs.just(0), hs.binary(min_size=1, max_size=256)),
    ),
    min_size=1, max_size=4,
)


PACKED_SIGNS = PREFIX + "g0_signs_packed"
VALUE_TABLES = {PACKED_SIGNS, PREFIX + "t_table", PREFIX + "t_table16"}  # t16: the t table when every value is a float16


def apply_edits(data: bytes, edits) -> bytes:
    b = bytearray(data)
    for op, pos, arg in edits:
        pos = pos % (len(b) + 1)
        if op == "flip" and b:
            b[pos % len(b)] ^= 1 << arg
        elif op == "cut":
            del b[pos:]
        elif op == "insert":
            b[pos:pos] = arg
        elif op == "set":
            b[pos:pos + len(arg)] = arg
        elif op == "append":
            b += arg
    return bytes(b)


@fuzz_settings(600)
@given(edits=byte_edits)
def test_mutated_container_bytes_refused_by_name(honest, edits):
    data = apply_edits(honest, edits)
    out = bounded(unpack, data, "fuzz")
    if not isinstance(out, PatchVerificationError):
        assert data == honest, "a patch file with altered bytes was accepted"


# ----------------------------------------------------------------------------- 2. manifest content
json_leaf = hs.one_of(
    hs.none(), hs.booleans(), hs.integers(-(1 << 70), 1 << 70), hs.floats(allow_nan=False, allow_infinity=False),
    hs.text(max_size=20), hs.sampled_from(["prune", "collapse", "affine", "shift", "0" * 64, "Relu", "NaN"]),
)
json_value = hs.recursive(json_leaf, lambda inner: hs.one_of(hs.lists(inner, max_size=4),
                                                              hs.dictionaries(hs.text(max_size=8), inner, max_size=4)),
                          max_leaves=12)


def _paths(doc, prefix=()):
    """Every (container, key) location in a JSON document, parents before children (down to a depth
    of 16: a deeply nested value is edited as a whole)."""
    if len(prefix) >= 16:
        return
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    for k, v in items:
        yield prefix + (k,)
        yield from _paths(v, prefix + (k,))


def _at(doc, path):
    for k in path[:-1]:
        doc = doc[k]
    return doc


manifest_edits = hs.lists(
    hs.tuples(hs.sampled_from(["replace", "delete", "add", "scale", "nest"]), hs.integers(0, 1 << 16), json_value),
    min_size=1, max_size=3,
)


def mutate_manifest(signed: dict, edits) -> dict:
    doc = copy.deepcopy(signed)
    for op, where, value in edits:
        paths = [p for p in _paths(doc) if p != ("patch_id",)]
        if not paths:
            break
        path = paths[where % len(paths)]
        parent, key = _at(doc, path), path[-1]
        if op == "replace":
            parent[key] = value
        elif op == "delete":
            del parent[key]
        elif op == "add" and isinstance(parent, dict):
            parent[f"x{where % 7}"] = value
        elif op == "add":
            parent.append(value)
        elif op == "scale" and isinstance(parent[key], (int, float)) and not isinstance(parent[key], bool):
            parent[key] = parent[key] * (-1.5 if where % 2 else 1e30)
        elif op == "nest":
            for _ in range(1 + where % 5000):  # deep nesting: JSON's recursion must be a named error
                value = [value]
            parent[key] = value
    return doc


@fuzz_settings(400)
@given(edits=manifest_edits)
def test_mutated_manifest_refused_or_exact(honest, base, edits):
    """An attacker edits the manifest (any field, any JSON value) and re-derives the patch id; the
    graph stays the honest one. What passes every check must read back exactly as written."""
    pf = read_patch_file_bytes(honest)
    signed = mutate_manifest(pf["signed"], edits)
    if isinstance(signed, dict) and "patch_id" in signed:
        try:
            signed["patch_id"] = derive_patch_id(signed)
        except (ValueError, TypeError, RecursionError):
            pass  # not encodable canonically: the reader must refuse it anyway
    try:
        raw = encode({"signed": signed, "signatures": []})
    except RecursionError:
        return  # cannot even be written by json; nothing to feed
    data = container(raw, pf["graph"])
    out = bounded(lambda: verify_patch(unpack(data, "fuzz"), base))
    if not isinstance(out, PatchVerificationError):
        assert out.manifest.to_json() == signed, "an accepted manifest does not read back as written"
        assert Manifest.from_json(signed) == out.manifest


def read_patch_file_bytes(data: bytes) -> dict:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        return {"signed": json.loads(zf.read(MANIFEST_NAME))["signed"], "graph": zf.read(GRAPH_NAME)}


@fuzz_settings(300)
@given(doc=json_value)
def test_arbitrary_json_manifest_refused_by_name(honest, doc):
    """Any JSON document as the manifest, with the honest graph: refused, by name."""
    pf = read_patch_file_bytes(honest)
    for raw in (encode(doc), encode({"signed": doc, "signatures": []})):
        out = bounded(unpack, container(raw, pf["graph"]), "fuzz")
        assert isinstance(out, PatchVerificationError)


# ----------------------------------------------------------------------------- 3. the graph
@fuzz_settings(200)
@given(edits=byte_edits)
@example(edits=[("flip", 3100, 0)]).via("a pattern bit, found by this test")
@example(edits=[("flip", 7023, 0)]).via("a low bit of t, found by this test")
def test_mutated_graph_with_updated_digest_refused_or_original(honest, base, edits):
    """The attacker edits ONNX bytes and updates the digest, size and patch id: the structure check
    (graph == canonical graph of its own parameters) refuses every graph but the original, and but one whose
    only change is in the two value tables whose meaning the device checks or leaves to the server: the pattern
    bits (format 4 stores one bit per sign, so a flipped bit is another well-formed pattern; which region a
    record gates is the server's word, as its bounds are) and the t table (a record's shift: a flipped low bit
    can keep the specification, and the certificate is checked on the stored t itself). Such a file is another
    well-formed patch, and its certificate must hold on the numbers it runs, re-checked here from scratch.
    (The delivery's signatures are what bind a file to its publisher.)"""
    pf = read_patch_file_bytes(honest)
    graph = apply_edits(pf["graph"], edits)
    signed = dict(pf["signed"], graph={**pf["signed"]["graph"], "sha256": sha256_bytes(graph), "bytes": len(graph)})
    signed["patch_id"] = derive_patch_id(signed)
    data = container(encode({"signed": signed, "signatures": []}), graph)
    out = bounded(lambda: verify_patch(unpack(data, "fuzz"), base))
    if not isinstance(out, PatchVerificationError) and graph != pf["graph"]:
        honest_g, got_g = onnx.load_from_string(pf["graph"]), onnx.load_from_string(graph)
        changed = {a.name for a, b in zip(honest_g.graph.initializer, got_g.graph.initializer) if a != b}
        assert changed and changed <= VALUE_TABLES, f"an altered patch graph was accepted (changed: {sorted(changed)})"
        bits = numpy_helper.to_array(next(i for i in got_g.graph.initializer if i.name == PACKED_SIGNS))
        for g in (honest_g, got_g):  # everything but those tables is the honest graph
            for name in changed:
                g.graph.initializer.remove(next(i for i in g.graph.initializer if i.name == name))
        assert honest_g == got_g, "an altered patch graph was accepted"
        m = out.manifest
        assert np.array_equal(out.params.signs, unpack_signs(bits, len(m.records)))
        for k, rec in enumerate(m.records):  # the target wins on the region with the shift the graph applies
            t = out.params.t[k].astype(np.float64)
            shift = np.delete(t, rec.target) - t[rec.target]  # rows e_j - e_target, j != target in order
            top = np.asarray(rec.alpha) * np.asarray(rec.upper) + shift if m.mode == "prune" else shift
            assert (top <= m.q_upper).all(), f"record {k}: an accepted shift breaks the specification"


def test_fuzz_reaches_past_the_container(honest, base):
    """The generators are not all stopped at the first check: the honest bytes pass, and a manifest
    edit with a re-derived id is refused by a later check than the container's."""
    assert verify_patch(unpack(honest, "fuzz"), base).manifest.patch_id == read_patch_file_bytes(honest)["signed"]["patch_id"]
    pf = read_patch_file_bytes(honest)
    signed = mutate_manifest(pf["signed"], [("scale", _path_index(pf["signed"], ("records", 0, "lower", 0)), None)])
    signed["patch_id"] = derive_patch_id(signed)
    out = bounded(lambda: verify_patch(unpack(container(encode({"signed": signed, "signatures": []}), pf["graph"]), "fuzz"), base))
    assert isinstance(out, PatchVerificationError) and out.check == "certificate"


def _path_index(doc, path) -> int:
    return [p for p in _paths(doc) if p != ("patch_id",)].index(path)
