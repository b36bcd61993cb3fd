"""Unlearning outcomes of real patches, recomputed independently through onnxruntime, and the soundness
of the certificate on whole linear regions (LP vertices and convex combinations, not only the forget
points), with the region as the device reads it: the sign pattern of its own float32 pre-activations,
``z >= 0`` active."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
from scipy.optimize import linprog  # noqa: E402

from conftest import PRUNE_BOUNDS, ledger_record  # noqa: E402
from prune_edge.basedir import load_base, train_base  # noqa: E402
from prune_edge.evaluate import LOCALITY_ATOL  # noqa: E402
from prune_edge.runtime.merkle import ids_root, inclusion_proof, verify_id  # noqa: E402
from prune_edge.regions import compute_regions, region_lp  # noqa: E402
from prune_edge.requests import random_forget_ids  # noqa: E402
from prune_edge.runtime import PatchedModel, certify_patch, read_patch_file  # noqa: E402
from prune_edge.runtime.base import BaseGraph  # noqa: E402
from prune_edge.runtime.model import make_session  # noqa: E402
from prune_edge.runtime.patchgraph import (  # noqa: E402
    PREFIX,
    excess_of,
    extract_params,
    quantize,
    selection_neurons,
    sign_pattern,
    spec_rows,
)
from prune_edge.synth import SynthConfig  # noqa: E402
from prune_edge.unlearn import build_point_patch  # noqa: E402

MODES = ("prune", "collapse")
SPEC_TOL = 1e-3
REF_ATOL = 1e-4


# ----------------------------------------------------------------------------- helpers
def sidecar(path) -> dict:
    """The server's ledger record of a patch (in its base folder's ledger/, never beside the patch)."""
    return ledger_record(path)


def split_points(ds, forget_ids):
    keep = np.ones(len(ds.x_train), bool)
    keep[forget_ids] = False
    return {"retain": ds.x_train[keep], "test": ds.x_test}


def locality(base_onnx, patch_paths, x: np.ndarray) -> dict:
    base = PatchedModel(base_onnx)
    patched = PatchedModel(base_onnx, patch_paths)
    lb, (lp, cover) = base.logits(x), patched.logits_and_coverage(x)
    delta = np.abs(lp - lb).max(axis=1)
    closed = ~cover.covered
    assert ((cover.patch == -1) == closed).all() and ((cover.record == -1) == closed).all()
    return {
        "points": len(x),
        "unchanged": int((delta <= LOCALITY_ATOL).sum()),
        "closed": int(closed.sum()),
        "closed_bit_identical": bool((lp[closed] == lb[closed]).all()),
        "label_changes": int((lp.argmax(1) != lb.argmax(1)).sum()),
    }


def patch_params(path):
    pf = read_patch_file(path)
    m = pf.manifest
    params = extract_params(onnx.load_from_string(pf.graph_bytes), len(m.records), m.gated_size, m.n_classes, m.form)
    return m, params


def device_preacts(onnx_path, names: list[str], x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The base's own float32 values of Relu inputs ``names`` (flattened, concatenated) and its logits,
    from a plain onnxruntime session on base.onnx: the numbers a device's gates read."""
    model = onnx.load(str(onnx_path))
    for name in names:
        model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    out = make_session(model.SerializeToString()).run(None, {model.graph.input[0].name: np.ascontiguousarray(x)})
    return np.concatenate([z.reshape(len(z), -1) for z in out[1:]], axis=1), out[0]


def reference_gates(z32: np.ndarray, params) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The gate semantics, recomputed from the device's float32 pre-activations: each value read as the
    odd integer v (``quantize``), excess_k = |v|_1 - v.s_k, pre_k = 1 - gamma_k delta/4 excess_k, and only
    the first record k* whose signs on the selection values A (``selection_neurons``) are the input's acts,
    with its own g = clip(pre[k*], 0, 1); where no record has them, none acts (g = 0, k* = 0). Returns
    (k*, g, excess)."""
    v = quantize(z32, params.scale_log2)
    excess = excess_of(v, params.signs)
    # the definition, independently: 2 sum_i relu(-s_ki v_i)
    np.testing.assert_array_equal(excess, 2 * np.maximum(-(v[:, None, :] * params.signs[None].astype(np.int64)), 0).sum(2))
    pre = 1.0 - params.gamma.astype(np.float64)[None] * (params.delta / 4) * excess
    a = selection_neurons(params.signs)
    equal = ((v[:, None, a] > 0) == (params.signs[None, :, a] > 0)).all(axis=2)
    k = np.where(equal.any(axis=1), equal.argmax(axis=1), 0)
    g = np.where(equal.any(axis=1), np.clip(pre[np.arange(len(pre)), k], 0.0, 1.0), 0.0)
    return k, g, excess


def reference_outputs(net, x: np.ndarray, params, k: np.ndarray, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float64 f + g (T_k f + t_k): one record acts (k, with gate g; g = 0: the base), f from the float64
    network. Returns (outputs, f)."""
    net64 = copy.deepcopy(net).double().eval()
    with torch.no_grad():
        _, f = net64.forward_all(torch.from_numpy(x.astype(np.float64)))
    f = f.numpy()
    T, t = params.T.astype(np.float64)[k], params.t.astype(np.float64)[k]
    out = f + g[:, None] * (np.einsum("ncd,nd->nc", T, f) + t)
    return out, f


def record_members(pattern: np.ndarray, params) -> list[np.ndarray]:
    """Forget-list positions whose device activation pattern is each record's signs (first one = representative)."""
    return [np.flatnonzero((pattern == params.signs[k]).all(axis=1)) for k in range(params.n_records)]


def on_device_signs(regions, pattern: np.ndarray):
    """The regions with the patterns the device reads (its float32 values, ``z >= 0``): the LPs are then
    over the region the gate is 1 on. The float64 pass agrees except on neurons within ~1e-6 of 0."""
    disagree = (regions.signs != pattern) & (np.abs(regions.off_z.numpy() + np.einsum(
        "bmd,bd->bm", regions.jac_z.numpy(), regions.h.numpy())) > 1e-6)
    assert not disagree.any(), "float64 and the device's float32 disagree on a pre-activation away from 0"
    regions.signs = pattern.copy()
    return regions


def region_points(lp, h_rep: np.ndarray, rng: np.random.Generator, n_vertices: int = 4, n_mix: int = 8,
                  shrink: float = 1e-5):
    """Points of a region polytope: vertices (random objectives, HiGHS) of the polytope with every
    constraint tightened by ``shrink`` times that neuron's scale (so float32 round-off cannot carry them
    across the boundary), random convex combinations of those and the representative, and the exact
    vertices themselves (on the boundary). All float32, and kept only if inside the LP (tolerance 1e-6).
    Returns (points, vertices of the tightened polytope, which points are exact boundary vertices)."""
    # Each constraint in units of its neuron's scale, so HiGHS's absolute 1e-7 feasibility tolerance
    # means the same for a dead unit (|z| ~ 1e-11 everywhere) as for any other.
    scale = np.abs(lp.b_ub) + np.abs(lp.a_ub) @ np.abs(lp.bounds).max(axis=1)
    scale = np.where(scale > 0, scale, 1.0)
    a, b = lp.a_ub / scale[:, None], lp.b_ub / scale
    inner, exact = [], []
    for _ in range(n_vertices):
        c = rng.normal(size=a.shape[1])
        for rhs, out in ((b - shrink, inner), (b, exact)):
            res = linprog(c, A_ub=a, b_ub=rhs, bounds=lp.bounds, method="highs")
            assert res.status == 0, res.message
            out.append(res.x)
    inner = np.array(inner)
    hull = np.vstack([inner, h_rep[None]])
    mixes = rng.dirichlet(np.ones(len(hull)), size=n_mix) @ hull
    pts = np.vstack([inner, mixes, np.array(exact)]).astype(np.float32)
    on_boundary = np.arange(len(pts)) >= len(inner) + n_mix
    keep = np.array([lp.contains(p.astype(np.float64), tol=1e-6) for p in pts])
    return pts[keep], inner, on_boundary[keep]


# ----------------------------------------------------------------------------- forgetting
@pytest.mark.parametrize("mode", MODES)
def test_forget_accuracy_zero(patches, mlp_bundle, forget_ids, mode):
    path, report = patches[mode]
    ev = report["evaluation"]
    assert ev["accuracy"]["forget"]["after"] == 0.0
    assert ev["forget_points"] == ev["forget_patched_here"] == len(forget_ids) == 20
    assert report["already_covered"] == 0 and report["chain"] == {"position": 0, "after": [], "replaces": []}
    ds = mlp_bundle.dataset
    x, y = ds.x_train[forget_ids], ds.y_train[forget_ids]
    pred = PatchedModel(mlp_bundle.onnx_path, [path]).predict(x)
    assert (pred != y).all()
    assert pred.tolist() == ev["forget_pred_after"]
    base_pred = PatchedModel(mlp_bundle.onnx_path).predict(x)
    assert ev["forget_changed"] == int((pred != base_pred).sum()) == len(forget_ids)


@pytest.mark.parametrize("mode", MODES)
def test_forget_points_get_their_target(patches, mlp_bundle, forget_ids, mode):
    path, report = patches[mode]
    side = sidecar(path)
    manifest = read_patch_file(path).manifest
    assert side["patch_id"] == manifest.patch_id and side["covered_by_earlier"] == {}
    assert side["ids"] == [int(i) for i in forget_ids]
    targets = np.array([side["targets"][str(int(i))] for i in forget_ids])
    ds = mlp_bundle.dataset
    x, y = ds.x_train[forget_ids], ds.y_train[forget_ids]
    logits, cover = PatchedModel(mlp_bundle.onnx_path, [path]).logits_and_coverage(x)
    np.testing.assert_array_equal(logits.argmax(1), targets)
    assert report["evaluation"]["forget_to_target"] == len(forget_ids)
    base_pred = PatchedModel(mlp_bundle.onnx_path).predict(x)
    assert (targets != y).all() and (targets != base_pred).all()
    # Every target is some record's target, and record point counts add up.
    assert set(targets.tolist()) <= {r.target for r in manifest.records}
    assert sum(r.points for r in manifest.records) == len(forget_ids)
    # Each forget point lies in its record's region as the device reads it: that record acts, its gate
    # exactly 1 (the certificate covers the point, not a partly open gate), with its target.
    assert (cover.patch == 0).all() and (cover.gate == 1.0).all()
    assert [manifest.records[r].target for r in cover.record] == targets.tolist()
    names = [g.name for g in manifest.gated]
    z, _ = device_preacts(mlp_bundle.onnx_path, names, x)
    _, params = patch_params(path)
    np.testing.assert_array_equal(params.signs[cover.record], sign_pattern(z))


@pytest.mark.parametrize("mode", MODES)
def test_patch_holds_no_plain_ids(patches, forget_ids, mode):
    """The manifest commits to the forgotten ids by one Merkle root, with a salt kept on the server; the
    ledger's proof of each id opens that root, and no id outside the request has one."""
    path, _ = patches[mode]
    manifest = read_patch_file(path).manifest
    side = sidecar(path)
    salt = bytes.fromhex(side["id_salt"])
    assert manifest.request["id_roots"] == [ids_root(forget_ids, salt)]
    assert manifest.request["id_roots"] != [ids_root(forget_ids, b"")]
    assert "ids" not in manifest.request and "id_salt" not in json.dumps(manifest.to_json())
    for i in forget_ids[:3]:
        proof = inclusion_proof(side["ids"], salt, int(i))
        assert verify_id(int(i), salt, proof, manifest.request["id_roots"][0])
        assert not verify_id(int(i) + 100_000, salt, proof, manifest.request["id_roots"][0])


@pytest.mark.parametrize("mode", MODES)
def test_retained_and_test_logits_unchanged(patches, mlp_bundle, forget_ids, mode):
    path, report = patches[mode]
    for name, x in split_points(mlp_bundle.dataset, forget_ids).items():
        loc = locality(mlp_bundle.onnx_path, [path], x)
        assert loc["unchanged"] * 1000 >= 999 * loc["points"], (name, loc)
        # Locality guarantee: where every gate is closed the output is the base's, bit for bit.
        assert loc["closed_bit_identical"]
        assert loc["closed"] <= loc["unchanged"]
        # Independent figures agree with the build report.
        rep = report["evaluation"]["locality"][name]
        assert rep["points"] == loc["points"] and rep["unchanged"] == loc["unchanged"]
        assert rep["gate_touched"] == loc["points"] - loc["closed"]


@pytest.mark.parametrize("mode", MODES)
def test_patch_is_small(patches, mlp_bundle, mode):
    path, report = patches[mode]
    size, base_size = path.stat().st_size, mlp_bundle.onnx_path.stat().st_size
    assert size / base_size < 0.02
    assert report["patch_bytes"] == size and report["base_bytes"] == base_size
    assert size / len(read_patch_file(path).manifest.records) < 1000  # well under 1 KB per record


def test_chained_patches(patches, mlp_bundle, forget_ids):
    """Both patches for the same points composed: same regions and same targets (same seed), so they
    may run together; the first patch's record acts (first on ties), forgotten and still local."""
    paths = [patches["prune"][0], patches["collapse"][0]]
    ds = mlp_bundle.dataset
    model = PatchedModel(mlp_bundle.onnx_path, paths)
    assert model.n_records == sum(len(read_patch_file(p).manifest.records) for p in paths)
    sides = [sidecar(p) for p in paths]
    assert sides[0]["targets"] == sides[1]["targets"]
    targets = np.array([sides[1]["targets"][str(int(i))] for i in forget_ids])
    x = ds.x_train[forget_ids]
    logits, cover = model.logits_and_coverage(x)
    np.testing.assert_array_equal(logits.argmax(1), targets)
    assert (cover.patch == 0).all() and (cover.gate == 1.0).all()
    # the first patch acts alone: its logits, bit for bit
    np.testing.assert_array_equal(logits, PatchedModel(mlp_bundle.onnx_path, paths[:1]).logits(x))
    loc = locality(mlp_bundle.onnx_path, paths, ds.x_test)
    assert loc["unchanged"] * 1000 >= 999 * loc["points"] and loc["closed_bit_identical"]


def test_chain_built_after_an_earlier_patch(chain, mlp_bundle, forget_ids, second_ids):
    """A second request built --after the first patch: its manifest names the first, points already in
    one of the first patch's regions are answered by it (not patched again), and a device running both
    forgets both requests, each point to its own record's target with that gate exactly open."""
    ds = mlp_bundle.dataset
    first, second, report = chain["first"], chain["second"], chain["report"]
    m1, m2 = read_patch_file(first).manifest, read_patch_file(second).manifest
    assert m2.chain == report["chain"] == {"position": 1, "after": [m1.patch_id], "replaces": []}
    # already covered: recomputed from the device's own patterns against the first patch's records
    _, p1 = patch_params(first)
    z2, _ = device_preacts(mlp_bundle.onnx_path, [g.name for g in m1.gated], ds.x_train[second_ids])
    inside = [np.flatnonzero((p1.signs == s).all(axis=1)) for s in sign_pattern(z2)]
    covered = {int(second_ids[i]): int(r[0]) for i, r in enumerate(inside) if len(r)}
    assert report["already_covered"] == len(covered)
    side = sidecar(second)
    assert {int(i): v["record"] for i, v in side["covered_by_earlier"].items()} == covered
    ev = report["evaluation"]
    assert ev["forget_patched_here"] == len(second_ids) - len(covered) == sum(r.points for r in m2.records)
    assert ev["forget_to_target"] == ev["forget_patched_here"] and ev["accuracy"]["forget"]["after"] == 0.0

    model = PatchedModel(mlp_bundle.onnx_path, [first, second])
    t1 = sidecar(first)["targets"]
    for ids, expected_patch in ((forget_ids, 0), (second_ids, 1)):
        x, y = ds.x_train[ids], ds.y_train[ids]
        logits, cover = model.logits_and_coverage(x)
        pred = logits.argmax(1)
        assert (pred != y).all()
        assert (cover.gate == 1.0).all()
        for i, p, pt, r in zip(ids.tolist(), pred.tolist(), cover.patch.tolist(), cover.record.tolist()):
            if expected_patch == 0:
                assert pt == 0 and p == t1[str(i)]
            elif i in covered:
                assert pt == 0 and r == covered[i] and p == m1.records[r].target
            else:
                assert pt == 1 and p == side["targets"][str(i)] == m2.records[r].target
    # order on the device does not matter where a gate is fully open: the regions do not meet
    swapped = PatchedModel(mlp_bundle.onnx_path, [second, first])
    both = ds.x_train[np.concatenate([forget_ids, second_ids])]
    np.testing.assert_array_equal(swapped.predict(both), model.predict(both))
    loc = locality(mlp_bundle.onnx_path, [first, second], ds.x_test)
    assert loc["unchanged"] * 1000 >= 999 * loc["points"] and loc["closed_bit_identical"]


# ----------------------------------------------------------------------------- soundness on regions
@pytest.fixture(scope="module")
def regions_of(mlp_bundle, forget_ids):
    """The forget points' regions (float64 affine maps) with the patterns the device reads."""
    cache = {}

    def get(manifest):
        names = [g.name for g in manifest.gated]
        start = mlp_bundle.card["onnx"]["preacts"].index(names[0])
        if start not in cache:
            x = mlp_bundle.dataset.x_train[forget_ids]
            z, _ = device_preacts(mlp_bundle.onnx_path, names, x)
            cache[start] = on_device_signs(compute_regions(mlp_bundle.net, x, start), sign_pattern(z))
        return start, cache[start]

    return get


SOUND_RECORDS = (0, 1, 2)


@pytest.fixture(scope="module")
def prune_region_samples(patches, mlp_bundle, regions_of):
    """Per checked record of the prune patch: its region LP, sample points (float32), the device's own
    pattern on them, and the composed model's outputs and coverage."""
    path = patches["prune"][0]
    manifest, params = patch_params(path)
    start, regions = regions_of(manifest)
    assert start == 0, "default gate layers 'all': regions live in input space"
    members = record_members(regions.signs, params)
    model = PatchedModel(mlp_bundle.onnx_path, [path])
    names = [g.name for g in manifest.gated]
    rng = np.random.default_rng(0)
    out = {}
    for k in SOUND_RECORDS:
        assert len(members[k]) == manifest.records[k].points >= 1
        rep = int(members[k][0])
        lp = region_lp(regions, rep)
        pts, vertices, on_boundary = region_points(lp, regions.h[rep].numpy(), rng)
        x = pts.reshape(-1, *mlp_bundle.dataset.input_shape)
        z32, _ = device_preacts(mlp_bundle.onnx_path, names, x)
        logits, cover = model.logits_and_coverage(x)
        out[k] = {
            "lp": lp, "rep": rep, "h_rep": regions.h[rep].numpy(), "pts": pts, "x": x, "vertices": vertices,
            "z32": z32, "inside": (sign_pattern(z32) == params.signs[k]).all(axis=1), "on_boundary": on_boundary,
            "logits": logits, "cover": cover,
        }
    return manifest, params, out


@pytest.mark.parametrize("k", SOUND_RECORDS)
def test_region_samples_are_in_the_region(prune_region_samples, k):
    manifest, params, samples = prune_region_samples
    s = samples[k]
    # (i) inside the region polytope, really spread over it (vertices are far from the representative),
    # and inside the region as the device reads it (its float32 pattern is the record's), but for
    # exact vertices that float32 round-off may carry across a boundary.
    assert all(s["lp"].contains(p.astype(np.float64), tol=1e-6) for p in s["pts"])
    assert np.abs(s["vertices"] - s["h_rep"][None]).max(axis=1).min() > 0.1
    assert len({v.tobytes() for v in s["vertices"]}) == len(s["vertices"]), "distinct vertices"
    assert (~s["on_boundary"]).sum() >= 10, "too few sample points survived the float32 cast"
    # tightened vertices and the mixes: never carried across a boundary by float32
    assert s["inside"][~s["on_boundary"]].all()


@pytest.mark.parametrize("k", SOUND_RECORDS)
def test_target_wins_on_whole_region(prune_region_samples, mlp_bundle, k):
    """(ii) soundness: on every sampled point of the region as the device reads it, the record acts with
    its gate exactly 1, the composed ONNX model predicts the record's target, and every specification row
    is <= q_upper (and >= q_lower). Off the region (float32 across a boundary) its gate is below 1."""
    manifest, params, samples = prune_region_samples
    s, rec = samples[k], manifest.records[k]
    inside, cover = s["inside"], s["cover"]
    assert (cover.patch[inside] == 0).all() and (cover.record[inside] == k).all() and (cover.gate[inside] == 1.0).all()
    assert not ((cover.record[~inside] == k) & (cover.gate[~inside] == 1.0)).any()
    logits = s["logits"][inside]
    assert (logits.argmax(1) == rec.target).all()
    rows = logits.astype(np.float64) @ spec_rows(rec.target, manifest.n_classes).T
    assert rows.max() <= manifest.q_upper + SPEC_TOL
    assert rows.min() >= manifest.q_lower - SPEC_TOL
    # The base's own rows lie inside the certified bounds on the region.
    _, f = reference_outputs(mlp_bundle.net, s["x"][inside], params, np.zeros(inside.sum(), int), np.zeros(inside.sum()))
    base_rows = f @ spec_rows(rec.target, manifest.n_classes).T
    assert (base_rows >= np.asarray(rec.lower) - 1e-5).all() and (base_rows <= np.asarray(rec.upper) + 1e-5).all()


@pytest.mark.parametrize("k", SOUND_RECORDS)
def test_device_output_matches_reference_given_its_coverage(prune_region_samples, mlp_bundle, k):
    """(iii-a) the composed graph computes f + g (T_k f + t_k) for the one acting record k exactly as the
    float64 reference does when both use the device's (record, gate), on every sample point."""
    manifest, params, samples = prune_region_samples
    s = samples[k]
    cover = s["cover"]
    acting = np.where(cover.covered, cover.record, 0)
    ref, _ = reference_outputs(mlp_bundle.net, s["x"], params, acting, cover.gate.astype(np.float64))
    np.testing.assert_allclose(s["logits"], ref, rtol=0, atol=REF_ATOL)


def test_gate_exactly_open_and_output_exact_on_region(prune_region_samples, mlp_bundle):
    """(iii) the gate semantics recomputed from the device's float32 pre-activations (quantize, excess,
    pre, the argmax record acts) agree with the device's coverage on every sample point; on the region
    the excess is exactly 0, so the gate is exactly 1, and the composed ONNX output equals the float64
    reference within 1e-4."""
    manifest, params, samples = prune_region_samples
    for k, s in samples.items():
        kr, g, excess = reference_gates(s["z32"], params)
        inside = s["inside"]
        assert (excess[inside, k] == 0).all() and (excess[~inside, k] >= 2).all()  # 0 exactly on the region
        others = np.delete(excess, k, axis=1)
        assert (others[inside] >= 2).all()  # no other record's gate is 1 there
        assert (kr[inside] == k).all() and (g[inside] == 1.0).all()
        cover = s["cover"]
        bad = np.flatnonzero(np.abs(cover.gate - g) > 1e-6)
        a = selection_neurons(params.signs)
        assert not len(bad), (f"record {k}: device gate {cover.gate[bad]} record {cover.record[bad]}, reference {g[bad]} "
                              f"record {kr[bad]}; z on A {s['z32'][bad][:, a]}")
        assert (cover.record[g > 0] == kr[g > 0]).all() and (cover.record[g == 0] == -1).all()
        ref, _ = reference_outputs(mlp_bundle.net, s["x"], params, kr, g)
        np.testing.assert_allclose(s["logits"], ref, rtol=0, atol=REF_ATOL)


def test_narrow_gate_still_forgets(mlp_bundle, forget_ids, tmp_path):
    """A fixed narrow gate (SynthConfig.gamma = 1000, a documented knob) must not break soundness: the
    gate is exactly open on each record's own forget point and every forget point is forgotten."""
    path = tmp_path / "narrow.pepatch"
    cfg = SynthConfig(mode="collapse", gamma=1000.0, seed=0)
    report = build_point_patch(mlp_bundle, forget_ids, cfg, path, device="cpu", progress=False, evaluate=False)
    assert report["gammas"] == [1000.0] * report["records"]
    model = PatchedModel(mlp_bundle.onnx_path, [path])
    x = mlp_bundle.dataset.x_train[forget_ids]
    logits, cover = model.logits_and_coverage(x)
    assert (logits.argmax(1) != mlp_bundle.dataset.y_train[forget_ids]).all()
    assert (cover.gate == 1.0).all() and (cover.patch == 0).all()
    assert sorted(set(cover.record.tolist())) == list(range(report["records"]))


def test_collapse_output_is_constant_on_region(patches, mlp_bundle, regions_of, forget_ids):
    """collapse: on a record's region (as the device reads it) the patched logits are the record's
    graph's constant t (the target beats every class by the margin), on its forget point and on region
    samples."""
    path = patches["collapse"][0]
    manifest, params = patch_params(path)
    start, regions = regions_of(manifest)
    members = record_members(regions.signs, params)
    model = PatchedModel(mlp_bundle.onnx_path, [path])
    names = [g.name for g in manifest.gated]
    rng = np.random.default_rng(1)
    x_forget = mlp_bundle.dataset.x_train[forget_ids]
    for k in SOUND_RECORDS:
        rec = manifest.records[k]
        const = params.t[k].astype(np.float64)
        rep = int(members[k][0])
        pts, _, on_boundary = region_points(region_lp(regions, rep), regions.h[rep].numpy(), rng, n_vertices=3, n_mix=4)
        x = np.concatenate([x_forget[members[k]], pts.reshape(-1, *mlp_bundle.dataset.input_shape)])
        z32, _ = device_preacts(mlp_bundle.onnx_path, names, x)
        inside = (sign_pattern(z32) == params.signs[k]).all(axis=1)
        interior = np.r_[np.ones(len(members[k]), bool), ~on_boundary]
        assert inside[interior].all() and interior.sum() >= 8
        x = x[inside]
        out, cover = model.logits_and_coverage(x)
        assert (cover.record == k).all() and (cover.gate == 1.0).all()
        assert (out.argmax(1) == rec.target).all()
        # The gate is exactly 1 on the region, so only float32 rounding of t remains.
        np.testing.assert_allclose(out, np.broadcast_to(const, out.shape), rtol=0, atol=1e-4)
        assert np.ptp(out, axis=0).max() <= 1e-4
        rows = out.astype(np.float64) @ spec_rows(rec.target, manifest.n_classes).T
        np.testing.assert_allclose(rows, np.broadcast_to(rows[0], rows.shape), atol=1e-4)
        # inside the spec, and no further from q_upper than the stored t's grid moves it (export)
        assert rows.max() <= manifest.q_upper and rows.max() >= manifest.q_upper - 0.1


# ----------------------------------------------------------------------------- CNN, gated at the head
@pytest.fixture(scope="module")
def cnn(tmp_path_factory):
    root = tmp_path_factory.mktemp("cnn")
    train_base("mnist5k", "cnn", root / "base", seed=0, epochs=2, progress=False)
    bundle = load_base(root / "base")
    ids = random_forget_ids(len(bundle.dataset.x_train), 10, seed=1)
    built = {}
    for mode, n in (("collapse", 10), ("prune", 3)):
        path = root / f"cnn-{mode}.pepatch"
        cfg = SynthConfig(mode=mode, gate_layers="last:1", seed=0, lp_workers=1, bounds=PRUNE_BOUNDS)
        report = build_point_patch(bundle, ids[:n], cfg, path, device="cpu", progress=False)
        built[mode] = (path, report, ids[:n])
    return bundle, built


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_cnn_patch_forgets_locally(cnn, mode, record_property):
    bundle, built = cnn
    path, report, ids = built[mode]
    ds = bundle.dataset
    assert bundle.card["arch"] == "cnn" and bundle.card["metrics"]["test_accuracy"] > 0.5
    manifest = read_patch_file(path).manifest
    assert [g.name for g in manifest.gated] == [bundle.card["onnx"]["preacts"][-1]]
    assert certify_patch(path, BaseGraph.load(bundle.onnx_path)).passed
    logits, cover = PatchedModel(bundle.onnx_path, [path]).logits_and_coverage(ds.x_train[ids])
    pred = logits.argmax(1)
    assert (pred != ds.y_train[ids]).all()
    assert (cover.gate == 1.0).all()
    side = sidecar(path)
    np.testing.assert_array_equal(pred, [side["targets"][str(int(i))] for i in ids])
    assert report["evaluation"]["accuracy"]["forget"]["after"] == 0.0
    figures = {"records": report["records"], "patch_to_base": report["patch_to_base"]}
    for name, x in split_points(ds, ids).items():
        loc = locality(bundle.onnx_path, [path], x)
        assert loc["unchanged"] * 100 >= 99 * loc["points"], (name, loc)
        assert loc["closed_bit_identical"]
        figures[name] = f"{loc['unchanged']}/{loc['points']} unchanged, {loc['label_changes']} label changes"
    assert path.stat().st_size / bundle.onnx_path.stat().st_size < 0.02
    record_property("cnn_figures", figures)
    print(f"CNN {mode}: {figures}")


@pytest.fixture(scope="module")
def cnn_region_samples(cnn):
    """Per record of the CNN prune patch (gated at the head): points of its region in the feature space
    of the gated layer's input, and the patch graph run alone on the float32 head tensors there, with
    its acting record and gate exposed."""
    bundle, built = cnn
    path, _, ids = built["prune"]
    manifest, params = patch_params(path)
    start = bundle.card["onnx"]["preacts"].index(manifest.gated[0].name)
    assert start == bundle.net.n_hidden - 1
    x_ids = bundle.dataset.x_train[ids]
    z_ids, _ = device_preacts(bundle.onnx_path, [g.name for g in manifest.gated], x_ids)
    regions = on_device_signs(compute_regions(bundle.net, x_ids, start), sign_pattern(z_ids))
    members = record_members(regions.signs, params)
    graph = onnx.load_from_string(read_patch_file(path).graph_bytes)
    for name in ("gate_max", "k"):
        graph.graph.output.append(onnx.helper.make_empty_tensor_value_info(PREFIX + name))
    sess = make_session(graph.SerializeToString())
    rng = np.random.default_rng(2)
    net64 = copy.deepcopy(bundle.net).double().eval()
    samples = {}
    for k in range(len(manifest.records)):
        rep = int(members[k][0])
        lp = region_lp(regions, rep)
        pts, _, on_boundary = region_points(lp, regions.h[rep].numpy(), rng, n_vertices=3, n_mix=5)
        with torch.no_grad():
            pre32, f32 = bundle.net.forward_from(start, torch.from_numpy(pts))
            _, f64 = net64.forward_from(start, torch.from_numpy(pts.astype(np.float64)))
        feeds = {manifest.logits_name: f32.numpy()}
        feeds.update({g.name: p.numpy() for g, p in zip(manifest.gated, pre32)})
        out, gate, acting = sess.run(None, feeds)
        z32 = np.concatenate([p.numpy().reshape(len(pts), -1) for p in pre32], axis=1)
        inside = (sign_pattern(z32) == params.signs[k]).all(axis=1)
        assert inside[~on_boundary].all() and (~on_boundary).sum() >= 5, f"record {k}: {inside.sum()} of {len(pts)} points on the region"
        samples[k] = {"out": out, "gate": gate.reshape(-1), "k": acting, "f64": f64.numpy(), "z32": z32, "inside": inside}
    return manifest, params, samples


@pytest.mark.slow
def test_cnn_prune_sound_in_feature_space(cnn_region_samples):
    """Feature-space soundness: on sampled points of each record's region (input space of the gated
    layer, pattern as the gate reads it) the target wins with every specification row <= q_upper, and
    the patch graph's output is the float64 reference f + g (T_k f + t_k) given the acting record and gate."""
    manifest, params, samples = cnn_region_samples
    for k, rec in enumerate(manifest.records):
        s = samples[k]
        inside = s["inside"]
        out = s["out"][inside]
        assert (out.argmax(1) == rec.target).all()
        rows = out.astype(np.float64) @ spec_rows(rec.target, manifest.n_classes).T
        assert rows.max() <= manifest.q_upper + SPEC_TOL
        assert (s["k"][inside] == k).all()
        f, g, kk = s["f64"], s["gate"].astype(np.float64), s["k"]
        ref = f + g[:, None] * (np.einsum("ncd,nd->nc", params.T.astype(np.float64)[kk], f) + params.t.astype(np.float64)[kk])
        np.testing.assert_allclose(s["out"], ref, rtol=0, atol=REF_ATOL)


@pytest.mark.slow
def test_cnn_gate_exactly_open_on_region(cnn_region_samples):
    manifest, params, samples = cnn_region_samples
    for k, s in samples.items():
        kr, g, _ = reference_gates(s["z32"], params)
        assert (s["gate"][s["inside"]] == 1.0).all() and (kr[s["inside"]] == k).all()
        np.testing.assert_allclose(s["gate"], g, rtol=0, atol=1e-6)
        assert not ((s["k"][~s["inside"]] == k) & (s["gate"][~s["inside"]] == 1.0)).any()


def test_synthesis_is_deterministic_by_seed(mlp_bundle, forget_ids):
    """Same seed: same targets, gates and affine maps; another seed: other confusing labels."""
    from prune_edge.synth import synthesize

    ds = mlp_bundle.dataset
    ids = forget_ids[:6]
    runs = [synthesize(mlp_bundle.net, ds.x_train, ds.y_train, ids, SynthConfig(mode="collapse", seed=s),
                       mlp_bundle.activations, progress=False)
            for s in (0, 0, 1)]
    a, b, c = (r.params() for r in runs)
    for x, y in ((a.signs, b.signs), (a.gamma, b.gamma), (a.T, b.T), (a.t, b.t)):
        np.testing.assert_array_equal(x, y)
    assert [r.target for r in runs[0].records] == [r.target for r in runs[1].records]
    assert [r.target for r in runs[0].records] != [r.target for r in runs[2].records]


def fresh_activations(bundle):
    from prune_edge.activations import TrainActivations

    card = bundle.graph.card
    return TrainActivations(bundle.graph, bundle.dataset.x_train, card.gate_step_log2, [g.name for g in card.relu_inputs])


def test_cached_training_activations_match_a_fresh_pass(mlp_bundle, forget_ids):
    """The server's per-base cache holds the device's own numbers (onnxruntime on base.onnx, the card's
    step): the same patterns, violations and records as computing everything from scratch, and its
    violations are the definition |v|_1 - v.s = 2 sum_i relu(-s_i v_i) on the odd integers v the gate reads."""
    import torch

    from prune_edge.synth import synthesize

    ds = mlp_bundle.dataset
    view = mlp_bundle.activations.view(1)
    card = mlp_bundle.graph.card
    assert view.scale_log2 == card.gate_step_log2
    z_dev, logits_dev = device_preacts(mlp_bundle.onnx_path, ["preact_1"], ds.x_train[:50])
    np.testing.assert_array_equal(view.z[:50], z_dev)  # bit for bit the device's values
    np.testing.assert_array_equal(view.logits[:50], logits_dev)
    with torch.no_grad():
        preacts, logits = mlp_bundle.net.forward_all(torch.from_numpy(ds.x_train[:50]))
    np.testing.assert_allclose(view.z[:50], preacts[1].numpy(), rtol=0, atol=1e-4)
    np.testing.assert_allclose(view.logits[:50], logits.numpy(), rtol=0, atol=1e-4)
    signs = view.signs(forget_ids[:3])
    assert set(np.unique(signs)) <= {-1, 1}
    np.testing.assert_array_equal(signs, sign_pattern(view.z[forget_ids[:3]]))
    # the odd integers: sign(v) is exactly [z >= 0] on every training value (dead units included), and the
    # step resolves most values (|v| > 1)
    z = view.z
    v = quantize(z, view.scale_log2)
    np.testing.assert_array_equal(np.where(v > 0, 1, -1), sign_pattern(z))
    assert np.all((v % 2 == 1) | (v == -128)) and np.abs(v).max() <= 128
    assert (np.abs(v) > 1).mean() > 0.5
    np.testing.assert_array_equal(view.q, v)
    direct = np.maximum(-signs[None, :, :].astype(np.int64) * v[:200, None, :], 0).sum(2)
    steps = view.violation_steps(signs)
    np.testing.assert_array_equal(steps[:200], 2 * direct)  # exact: integer sums
    np.testing.assert_array_equal(steps, excess_of(v, signs))
    assert np.all(steps[forget_ids[:3], np.arange(3)] == 0)  # 0 exactly on the own pattern

    ids = forget_ids[:6]
    cfg = SynthConfig(mode="collapse")
    cached = synthesize(mlp_bundle.net, ds.x_train, ds.y_train, ids, cfg, mlp_bundle.activations, progress=False)
    fresh = synthesize(mlp_bundle.net, ds.x_train, ds.y_train, ids, cfg, fresh_activations(mlp_bundle), progress=False)
    for a, b in zip((cached.params().signs, cached.params().gamma, cached.params().t),
                    (fresh.params().signs, fresh.params().gamma, fresh.params().t)):
        np.testing.assert_array_equal(a, b)


def test_violation_index_gives_exactly_the_product_minima(mlp_bundle, forget_ids):
    """The per-base nearest-violation index is a shortcut, never an approximation: gate widths and
    minima equal the full product's, including rows it must hand back to the product (a pattern that
    is not its row's own, an index row made only of excluded points)."""
    from prune_edge.activations import NO_POINT
    from prune_edge.synth import synthesize

    ds = mlp_bundle.dataset
    fresh = fresh_activations(mlp_bundle)  # not the shared bundle's: this test indexes it
    view = fresh.view(0)
    cfg = SynthConfig(mode="collapse")
    plain = synthesize(mlp_bundle.net, ds.x_train, ds.y_train, forget_ids, cfg, fresh, progress=False)
    view.build_index(k=3, chunk=700)
    assert view.nearest_steps.shape == (len(ds.x_train), 3)
    assert np.all(np.diff(view.nearest_steps, axis=1) >= 0) and np.all(view.nearest_steps[:, 0] == 0)
    # Count the sign rows that fall back to the full product, so the test sees the index in use.
    product = view.violation_steps
    fallback_rows = []

    def counted(signs):
        fallback_rows.append(len(signs))
        return product(signs)

    view.violation_steps = counted
    indexed = synthesize(mlp_bundle.net, ds.x_train, ds.y_train, forget_ids, cfg, fresh, progress=False)
    np.testing.assert_array_equal(plain.params().gamma, indexed.params().gamma)
    assert fallback_rows == [], "every gate width should have come from the index"

    rows = forget_ids[:4].copy()
    signs = view.signs(rows)
    signs[1, 7] *= -1  # not row 1's own pattern: the index does not apply
    exclude = [rows[:1], rows[1:2], view.nearest_ids[rows[2]], np.array([], dtype=np.int64)]  # row 2: all excluded
    mins = view.min_violation_steps(signs, rows, exclude)
    assert fallback_rows == [2]  # rows 1 and 2 from the product, rows 0 and 3 from the index
    brute = product(signs).astype(np.int64)
    for p, e in enumerate(exclude):
        brute[e, p] = NO_POINT
    np.testing.assert_array_equal(mins, brute.min(axis=0))


def test_lazy_region_lp_bounds_equal_the_full_lp(mlp_bundle, forget_ids):
    """Rows enter a region's HiGHS model lazily; the bounds still are those of the LP over every row:
    a sound lower bound on scipy's full-row minimum (up to its 1e-7 feasibility tolerance) and equal to it,
    on a real region, in input space and in feature space."""
    ds = mlp_bundle.dataset
    for start in (0, 1):
        regions = compute_regions(mlp_bundle.net, ds.x_train[forget_ids[:1]], start)
        lp = region_lp(regions, 0)
        rows = spec_rows(3 if ds.y_train[forget_ids[0]] != 3 else 4, ds.n_classes)
        lower, upper = lp.row_bounds(rows)
        assert len(lp._rows) < len(lp.b_ub), "every row was needed: nothing lazy was exercised"
        for i in (0, 5):
            c = rows[i] @ lp.jac_f
            lo = linprog(c, A_ub=lp.a_ub, b_ub=lp.b_ub, bounds=lp.bounds, method="highs")
            hi = linprog(-c, A_ub=lp.a_ub, b_ub=lp.b_ub, bounds=lp.bounds, method="highs")
            ref_lo, ref_hi = lo.fun + rows[i] @ lp.off_f, -hi.fun + rows[i] @ lp.off_f
            assert lower[i] <= ref_lo + 1e-6 and upper[i] >= ref_hi - 1e-6
            assert abs(lower[i] - ref_lo) < 1e-6 and abs(upper[i] - ref_hi) < 1e-6


def test_choose_target_avoids_labels_and_predictions():
    from prune_edge.runtime.errors import RequestError
    from prune_edge.synth import choose_target

    picks = {choose_target(d, {3}, {5}, 10) for d in np.linspace(0, 0.999, 64)}
    assert picks == set(range(10)) - {3, 5}  # uniform draws reach every allowed class, never 3 or 5
    assert choose_target(0.7, {0}, {1}, 2) == 1  # two classes, misclassified point: the only other class
    with pytest.raises(RequestError, match="cover all 2 classes"):
        choose_target(0.5, {0, 1}, {1}, 2)


def test_bounds_round_outward_to_short_numbers():
    """Prune bounds are rounded outward before the shift is computed: every stored bound still bounds
    (lower below every row's own lower, upper above its upper), upper by less than 0.1, and the numbers
    are short: one floored integer per record repeated on its rows, uppers on the 0.1 grid."""
    from prune_edge.synth import _round_outward

    rng = np.random.default_rng(4)
    lower = rng.uniform(-300, -5, size=(50, 9))
    upper = lower + rng.uniform(0, 80, size=(50, 9))
    lo, up = _round_outward(lower, upper)
    assert (lo <= lower).all() and (up >= upper).all() and (up - upper < 0.1 + 1e-9).all()
    assert (lo == lo[:, :1]).all() and (lo[:, 0] == np.floor(lower.min(axis=1))).all()
    assert np.allclose(up * 10, np.round(up * 10), atol=1e-6)
    e_lo, e_up = _round_outward(np.zeros((0, 9)), np.zeros((0, 9)))
    assert e_lo.shape == e_up.shape == (0, 9)


def test_tighten_largest_keeps_every_bound_sound_and_the_largest_tight(patches, mlp_bundle, forget_ids, regions_of, tmp_path):
    """By default the dual ascent stops rows clearly below their region's largest upper bound. Against every
    bound tightened to the end (--tighten all) on the same request: the same records and the same largest
    bound per record (up to the 0.1 grid), the stopped ones looser, never tighter, and every stored bound
    still sound (counterexample search: HiGHS' exact maximum of each row over its record's region, for every
    record and row, stopped rows included, never above it); both patches forget their points."""
    default_path, default_report = patches["prune"]
    all_path = tmp_path / "tighten-all.pepatch"
    all_report = build_point_patch(mlp_bundle, forget_ids, SynthConfig(mode="prune", seed=0, tighten="all"),
                                   all_path, device="cpu", progress=False)
    assert default_report["synthesis"]["bounds_stopped_early"] > 0 == all_report["synthesis"]["bounds_stopped_early"]
    assert [(r["synthesis"]["shift"], r["synthesis"]["tighten"]) for r in (default_report, all_report)] == [
        ("per-row", "largest"), ("per-row", "all")]  # what the build did, in its report
    default, every = read_patch_file(default_path).manifest, read_patch_file(all_path).manifest
    assert [r.target for r in default.records] == [r.target for r in every.records]
    up_d = np.array([r.upper for r in default.records])
    up_a = np.array([r.upper for r in every.records])
    assert np.all(np.abs(up_d.max(axis=1) - up_a.max(axis=1)) <= 0.1 + 1e-9)
    assert np.all(up_d >= up_a - 0.1 - 1e-9) and np.any(up_d > up_a + 1.0)
    # the stored bounds are what the device's certificate stands on: each must hold at the LP's worst point
    manifest, params = patch_params(default_path)
    start, regions = regions_of(manifest)
    members = record_members(regions.signs, params)
    stopped = 0
    for k in range(len(manifest.records)):  # every record, every row: the upper side is what certifies
        lp = region_lp(regions, int(members[k][0]))
        rows = spec_rows(manifest.records[k].target, manifest.n_classes)
        exact_upper = np.array([-lp._minimise(-(row @ lp.jac_f)) + row @ lp.off_f for row in rows])
        assert np.all(exact_upper <= up_d[k] + 1e-9), (k, exact_upper - up_d[k])
        stopped += int((up_d[k] > exact_upper + 1.0).sum())
    assert stopped > 0  # the search reached stopped rows, whose bounds are loose
    x = mlp_bundle.dataset.x_train[forget_ids]
    for path in (default_path, all_path):
        assert (PatchedModel(mlp_bundle.onnx_path, [path]).predict(x) != mlp_bundle.dataset.y_train[forget_ids]).all()


def test_common_shift_moves_every_row_by_the_largest_need(patches, mlp_bundle, forget_ids, tmp_path):
    """--shift common: every row of a record moves by what its largest upper bound needs (no row's lower side
    binds with q_lower = -1000), so the target wins by more than with PRUNE's per-row shift, on the same
    stored bounds; the device's certificate check passes and the points are forgotten."""
    from prune_edge.runtime.patchgraph import completed_spec

    path = tmp_path / "common.pepatch"
    build_point_patch(mlp_bundle, forget_ids, SynthConfig(mode="prune", seed=0, shift="common"), path, device="cpu",
                      progress=False)
    manifest, params = patch_params(path)
    per_row, per_row_params = patch_params(patches["prune"][0])
    assert [r.upper for r in manifest.records] == [r.upper for r in per_row.records]  # same bounds, other shifts
    for k, rec in enumerate(manifest.records):
        shift = completed_spec(rec.target, manifest.n_classes) @ params.t[k].astype(np.float64)
        own = completed_spec(rec.target, manifest.n_classes) @ per_row_params.t[k].astype(np.float64)
        top = max(rec.upper)
        assert np.ptp(shift[:-1]) <= 1e-4 and manifest.q_upper - top - 0.13 <= shift[0] <= manifest.q_upper - top + 1e-3
        assert np.all(shift[:-1] <= own[:-1] + 0.125)  # both on the t grid (< 0.125 from the exact shift)
    model = PatchedModel(mlp_bundle.onnx_path, [path])  # verified, certificate included
    x = mlp_bundle.dataset.x_train[forget_ids]
    z, z_own = model.logits(x), PatchedModel(mlp_bundle.onnx_path, [patches["prune"][0]]).logits(x)
    assert (z.argmax(1) == z_own.argmax(1)).all()
    margin = lambda v: np.diff(np.sort(v, axis=1)[:, -2:], axis=1)[:, 0]  # noqa: E731
    assert np.all(margin(z) >= margin(z_own) - 1e-3) and np.median(margin(z)) > np.median(margin(z_own)) + 1.0
