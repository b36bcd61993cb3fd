"""Unlearning outcomes of real patches, recomputed independently through onnxruntime, and the soundness
of the certificate on whole linear regions (LP vertices and convex combinations, not only the forget
points)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
from scipy.optimize import linprog  # noqa: E402

from prune_edge.basedir import load_base, train_base  # noqa: E402
from prune_edge.evaluate import LOCALITY_ATOL  # noqa: E402
from prune_edge.exporters.patch_export import commit_ids  # noqa: E402
from prune_edge.regions import compute_regions, region_lp  # noqa: E402
from prune_edge.requests import random_forget_ids  # noqa: E402
from prune_edge.runtime import PatchedModel, certify_patch, read_patch_file  # noqa: E402
from prune_edge.runtime.base import BaseGraph  # noqa: E402
from prune_edge.runtime.model import make_session  # noqa: E402
from prune_edge.runtime.patchgraph import completed_spec, extract_params, gate_name, quantize, spec_rows  # noqa: E402
from prune_edge.synth import SynthConfig  # noqa: E402
from prune_edge.unlearn import build_point_patch  # noqa: E402

MODES = ("prune", "collapse")
SPEC_TOL = 1e-3
REF_ATOL = 1e-4


# ----------------------------------------------------------------------------- helpers
def sidecar(path) -> dict:
    return json.loads(Path(str(path) + ".request.json").read_text())


def split_points(ds, forget_ids):
    keep = np.ones(len(ds.x_train), bool)
    keep[forget_ids] = False
    return {"retain": ds.x_train[keep], "test": ds.x_test}


def locality(base_onnx, patch_paths, x: np.ndarray) -> dict:
    base = PatchedModel(base_onnx)
    patched = PatchedModel(base_onnx, patch_paths)
    lb, lp = base.logits(x), patched.logits(x)
    delta = np.abs(lp - lb).max(axis=1)
    gates = np.concatenate(patched.gates(x), axis=1)
    closed = (gates == 0).all(axis=1)
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
    params = extract_params(onnx.load_from_string(pf.graph_bytes), m.prefix, len(m.records), m.gated_size, m.n_classes, m.form)
    return m, params


def reference_outputs(net, x: np.ndarray, start: int, params, gates: np.ndarray | None = None):
    """float64 f + sum_k g_k (T_k f + t_k), with g_k = relu(1 - gamma_k sum_i relu(-s_ki z_i)) computed
    from the float64 network (or the given gate values). Returns (outputs, gates, base logits)."""
    net64 = copy.deepcopy(net).double().eval()
    with torch.no_grad():
        preacts, f = net64.forward_all(torch.from_numpy(x.astype(np.float64)))
    z = torch.cat([p.flatten(1) for p in preacts[start:]], dim=1).numpy()
    f = f.numpy()
    s = params.signs.astype(np.float64)
    if gates is None:
        # sum_i relu(-s_i q_i) delta, q the gate's int8 quantization of z
        q = quantize(z.astype(np.float32), params.scale_log2).astype(np.float64)
        viol = np.maximum(-(q[:, None, :] * s[None]), 0.0).sum(axis=2) * params.delta
        gates = np.maximum(1.0 - params.gamma.astype(np.float64)[None] * viol, 0.0)
    out = f + np.einsum("nk,kcd,nd->nc", gates, params.T.astype(np.float64), f) + gates @ params.t.astype(np.float64)
    return out, gates, f, z


def record_members(regions, params) -> list[np.ndarray]:
    """Forget-list positions whose activation pattern is each record's signs (first one = representative)."""
    return [np.flatnonzero((regions.signs == params.signs[k]).all(axis=1)) for k in range(params.n_records)]


def region_points(lp, h_rep: np.ndarray, rng: np.random.Generator, n_vertices: int = 4, n_mix: int = 8):
    """LP vertices of the region (random objectives, HiGHS) and random convex combinations of them and
    the representative, all cast to float32 and kept only if still inside (tolerance 1e-6)."""
    vertices = []
    for _ in range(n_vertices):
        res = linprog(rng.normal(size=lp.a_ub.shape[1]), A_ub=lp.a_ub, b_ub=lp.b_ub, bounds=lp.bounds, method="highs")
        assert res.status == 0, res.message
        vertices.append(res.x)
    vertices = np.array(vertices)
    hull = np.vstack([vertices, h_rep[None]])
    mixes = rng.dirichlet(np.ones(len(hull)), size=n_mix) @ hull
    pts = np.vstack([vertices, mixes]).astype(np.float32)
    keep = [lp.contains(p.astype(np.float64), tol=1e-6) for p in pts]
    return pts[np.array(keep)], vertices


# ----------------------------------------------------------------------------- forgetting
@pytest.mark.parametrize("mode", MODES)
def test_forget_accuracy_zero(patches, mlp_bundle, forget_ids, mode):
    path, report = patches[mode]
    ev = report["evaluation"]
    assert ev["accuracy"]["forget"]["after"] == 0.0
    assert ev["forget_points"] == len(forget_ids) == 20
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
    assert side["patch_id"] == manifest.patch_id
    assert side["ids"] == [int(i) for i in forget_ids]
    targets = np.array([side["targets"][str(int(i))] for i in forget_ids])
    ds = mlp_bundle.dataset
    x, y = ds.x_train[forget_ids], ds.y_train[forget_ids]
    pred = PatchedModel(mlp_bundle.onnx_path, [path]).predict(x)
    np.testing.assert_array_equal(pred, targets)
    assert report["evaluation"]["forget_to_target"] == len(forget_ids)
    base_pred = PatchedModel(mlp_bundle.onnx_path).predict(x)
    assert (targets != y).all() and (targets != base_pred).all()
    # Every target is some record's target, and record point counts add up.
    assert set(targets.tolist()) <= {r.target for r in manifest.records}
    assert sum(r.points for r in manifest.records) == len(forget_ids)


@pytest.mark.parametrize("mode", MODES)
def test_patch_holds_no_plain_ids(patches, forget_ids, mode):
    """The manifest commits to the forgotten ids with a salt kept on the server."""
    path, _ = patches[mode]
    manifest = read_patch_file(path).manifest
    side = sidecar(path)
    assert manifest.request["id_commitments"] == commit_ids(forget_ids, bytes.fromhex(side["id_salt"]))
    assert manifest.request["id_commitments"] != commit_ids(forget_ids, b"")
    assert "ids" not in manifest.request and "id_salt" not in json.dumps(manifest.to_json())


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
    """Both patches composed in order: still forgotten (to the shared targets) and still local."""
    paths = [patches["prune"][0], patches["collapse"][0]]
    ds = mlp_bundle.dataset
    model = PatchedModel(mlp_bundle.onnx_path, paths)
    assert model.n_records == sum(len(read_patch_file(p).manifest.records) for p in paths)
    side = sidecar(paths[1])
    targets = np.array([side["targets"][str(int(i))] for i in forget_ids])
    np.testing.assert_array_equal(model.predict(ds.x_train[forget_ids]), targets)
    loc = locality(mlp_bundle.onnx_path, paths, ds.x_test)
    assert loc["unchanged"] * 1000 >= 999 * loc["points"] and loc["closed_bit_identical"]


# ----------------------------------------------------------------------------- soundness on regions
@pytest.fixture(scope="module")
def regions_of(mlp_bundle, forget_ids):
    cache = {}

    def get(manifest):
        start = mlp_bundle.card["onnx"]["preacts"].index(manifest.gated[0].name)
        if start not in cache:
            cache[start] = compute_regions(mlp_bundle.net, mlp_bundle.dataset.x_train[forget_ids], start)
        return start, cache[start]

    return get


SOUND_RECORDS = (0, 1, 2)


@pytest.fixture(scope="module")
def prune_region_samples(patches, mlp_bundle, regions_of):
    """Per checked record of the prune patch: its region LP, sample points (float32) and device outputs."""
    path = patches["prune"][0]
    manifest, params = patch_params(path)
    start, regions = regions_of(manifest)
    assert start == 0, "default gate layers 'all': regions live in input space"
    members = record_members(regions, params)
    model = PatchedModel(mlp_bundle.onnx_path, [path])
    rng = np.random.default_rng(0)
    out = {}
    for k in SOUND_RECORDS:
        assert len(members[k]) == manifest.records[k].points >= 1
        rep = int(members[k][0])
        lp = region_lp(regions, rep)
        pts, vertices = region_points(lp, regions.h[rep].numpy(), rng)
        x = pts.reshape(-1, *mlp_bundle.dataset.input_shape)
        out[k] = {
            "lp": lp, "rep": rep, "h_rep": regions.h[rep].numpy(), "pts": pts, "x": x, "vertices": vertices,
            "logits": model.logits(x), "gates": model.gates(x)[0],
        }
    return manifest, params, out


@pytest.mark.parametrize("k", SOUND_RECORDS)
def test_region_samples_are_in_the_region(prune_region_samples, mlp_bundle, k):
    manifest, params, samples = prune_region_samples
    s = samples[k]
    assert len(s["pts"]) >= 8, "too few sample points survived the float32 cast"
    # (i) inside the region polytope, and really spread over it (vertices are far from the representative).
    assert all(s["lp"].contains(p.astype(np.float64), tol=1e-6) for p in s["pts"])
    assert np.abs(s["vertices"] - s["h_rep"][None]).max(axis=1).min() > 0.1
    assert len({v.tobytes() for v in s["vertices"]}) == len(s["vertices"]), "distinct vertices"
    # The polytope IS the activation pattern: float64 pre-activations have the record's signs
    # (up to neurons sitting on the boundary, |z| <= 1e-6).
    _, _, _, z = reference_outputs(mlp_bundle.net, s["x"], 0, params)
    signs = params.signs[k].astype(np.float64)
    wrong = (np.where(z > 0, 1.0, -1.0) != signs[None]) & (np.abs(z) > 1e-6)
    assert not wrong.any()


@pytest.mark.parametrize("k", SOUND_RECORDS)
def test_target_wins_on_whole_region(prune_region_samples, mlp_bundle, k):
    """(ii) soundness: on every sampled region point the composed ONNX model predicts the record's
    target, and every specification row is <= q_upper (and >= q_lower)."""
    manifest, params, samples = prune_region_samples
    s, rec = samples[k], manifest.records[k]
    logits = s["logits"]
    assert (logits.argmax(1) == rec.target).all()
    rows = logits.astype(np.float64) @ spec_rows(rec.target, manifest.n_classes).T
    assert rows.max() <= manifest.q_upper + SPEC_TOL
    assert rows.min() >= manifest.q_lower - SPEC_TOL
    # The base's own rows lie inside the certified LP bounds on the region.
    _, _, f, _ = reference_outputs(mlp_bundle.net, s["x"], 0, params)
    base_rows = f @ spec_rows(rec.target, manifest.n_classes).T
    assert (base_rows >= np.asarray(rec.lower) - 1e-6).all() and (base_rows <= np.asarray(rec.upper) + 1e-6).all()


@pytest.mark.parametrize("k", SOUND_RECORDS)
def test_device_output_matches_reference_given_its_gates(prune_region_samples, mlp_bundle, k):
    """(iii-a) the composed graph computes f + sum_k g_k (T_k f + t_k) exactly as the float64 reference
    does when both use the same gate values (the device's, tapped from the graph)."""
    manifest, params, samples = prune_region_samples
    s = samples[k]
    ref, _, _, _ = reference_outputs(mlp_bundle.net, s["x"], 0, params, gates=s["gates"].astype(np.float64))
    np.testing.assert_allclose(s["logits"], ref, rtol=0, atol=REF_ATOL)
    # Only the record's own gate is open on its region; the gate is (numerically) fully open.
    others = np.delete(s["gates"], k, axis=1)
    assert (others == 0).all()
    assert (s["gates"][:, k] == 1.0).all()  # exactly open: the gate's integer excess is 0 on the region


def test_gate_exactly_open_and_output_exact_on_region(prune_region_samples, mlp_bundle):
    """(iii) on every sampled point of every checked region: the device gate is exactly 1 (to 1e-6) and
    the composed ONNX output equals the float64 reference f + sum_k g_k (T_k f + t_k) within 1e-4."""
    manifest, params, samples = prune_region_samples
    for k, s in samples.items():
        ref, g, _, _ = reference_outputs(mlp_bundle.net, s["x"], 0, params)
        assert np.abs(g[:, k] - 1.0).max() <= 1e-6  # float64: open (vertices sit on |z| ~ 1e-9 boundaries)
        np.testing.assert_allclose(s["gates"][:, k], 1.0, rtol=0, atol=1e-6)
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
    own = model.gates(x)[0].max(axis=1)
    assert (model.predict(x) != mlp_bundle.dataset.y_train[forget_ids]).all()
    np.testing.assert_allclose(own, 1.0, rtol=0, atol=1e-6)


def test_collapse_output_is_constant_on_region(patches, mlp_bundle, regions_of, forget_ids):
    """collapse: on a record's region the patched logits are the record's constant Pbar^-1 [beta; mean]
    (the target beats every class by exactly the margin), on its forget point and on region samples."""
    path = patches["collapse"][0]
    manifest, params = patch_params(path)
    start, regions = regions_of(manifest)
    members = record_members(regions, params)
    model = PatchedModel(mlp_bundle.onnx_path, [path])
    rng = np.random.default_rng(1)
    x_forget = mlp_bundle.dataset.x_train[forget_ids]
    for k in SOUND_RECORDS:
        rec = manifest.records[k]
        const = np.linalg.solve(completed_spec(rec.target, manifest.n_classes), np.append(rec.beta, rec.mean_shift))
        rep = int(members[k][0])
        pts, _ = region_points(region_lp(regions, rep), regions.h[rep].numpy(), rng, n_vertices=3, n_mix=4)
        x = np.concatenate([x_forget[members[k]], pts.reshape(-1, *mlp_bundle.dataset.input_shape)])
        out = model.logits(x)
        assert len(x) >= 5
        assert (out.argmax(1) == rec.target).all()
        # The gate is exactly 1 on the region, so only float32 rounding of t remains.
        np.testing.assert_allclose(out, np.broadcast_to(const, out.shape), rtol=0, atol=1e-4)
        assert np.ptp(out, axis=0).max() <= 1e-4
        rows = out.astype(np.float64) @ spec_rows(rec.target, manifest.n_classes).T
        np.testing.assert_allclose(rows, manifest.q_upper, atol=1e-4)


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
        cfg = SynthConfig(mode=mode, gate_layers="last:1", seed=0, lp_workers=1)
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
    pred = PatchedModel(bundle.onnx_path, [path]).predict(ds.x_train[ids])
    assert (pred != ds.y_train[ids]).all()
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
    of the gated layer's input, and the patch graph run alone on the float32 head tensors there."""
    bundle, built = cnn
    path, _, ids = built["prune"]
    manifest, params = patch_params(path)
    start = bundle.card["onnx"]["preacts"].index(manifest.gated[0].name)
    assert start == bundle.net.n_hidden - 1
    regions = compute_regions(bundle.net, bundle.dataset.x_train[ids], start)
    members = record_members(regions, params)
    graph = onnx.load_from_string(read_patch_file(path).graph_bytes)
    graph.graph.output.append(onnx.helper.make_empty_tensor_value_info(gate_name(manifest.prefix)))
    sess = make_session(graph.SerializeToString())
    rng = np.random.default_rng(2)
    net64 = copy.deepcopy(bundle.net).double().eval()
    samples = {}
    for k in range(len(manifest.records)):
        rep = int(members[k][0])
        lp = region_lp(regions, rep)
        pts, _ = region_points(lp, regions.h[rep].numpy(), rng, n_vertices=3, n_mix=5)
        assert len(pts) >= 5
        with torch.no_grad():
            pre32, f32 = bundle.net.forward_from(start, torch.from_numpy(pts))
            _, f64 = net64.forward_from(start, torch.from_numpy(pts.astype(np.float64)))
        feeds = {manifest.logits_name: f32.numpy()}
        feeds.update({g.name: p.numpy() for g, p in zip(manifest.gated, pre32)})
        out, gates = sess.run(None, feeds)
        samples[k] = {"out": out, "gates": gates, "f64": f64.numpy()}
    return manifest, params, samples


@pytest.mark.slow
def test_cnn_prune_sound_in_feature_space(cnn_region_samples):
    """Feature-space soundness: on sampled points of each record's region (input space of the gated
    layer) the target wins with every specification row <= q_upper, and the patch graph's output is the
    float64 reference f + sum_k g_k (T_k f + t_k) given the device's gate values."""
    manifest, params, samples = cnn_region_samples
    for k, rec in enumerate(manifest.records):
        s = samples[k]
        out = s["out"]
        assert (out.argmax(1) == rec.target).all()
        rows = out.astype(np.float64) @ spec_rows(rec.target, manifest.n_classes).T
        assert rows.max() <= manifest.q_upper + SPEC_TOL
        f, g = s["f64"], s["gates"].astype(np.float64)
        assert (g[:, k] > 0.5).all()  # the record's own gate is open there (exactly 1: see below)
        ref = f + np.einsum("nk,kcd,nd->nc", g, params.T.astype(np.float64), f) + g @ params.t.astype(np.float64)
        np.testing.assert_allclose(out, ref, rtol=0, atol=REF_ATOL)


@pytest.mark.slow
def test_cnn_gate_exactly_open_on_region(cnn_region_samples):
    manifest, params, samples = cnn_region_samples
    for k in samples:
        np.testing.assert_allclose(samples[k]["gates"][:, k], 1.0, rtol=0, atol=1e-6)


def test_synthesis_is_deterministic_by_seed(mlp_bundle, forget_ids):
    """Same seed: same targets, gates and affine maps; another seed: other confusing labels."""
    from prune_edge.synth import synthesize

    ds = mlp_bundle.dataset
    ids = forget_ids[:6]
    runs = [synthesize(mlp_bundle.net, ds.x_train, ds.y_train, ids, SynthConfig(mode="collapse", seed=s), progress=False)
            for s in (0, 0, 1)]
    a, b, c = (r.params() for r in runs)
    for x, y in ((a.signs, b.signs), (a.gamma, b.gamma), (a.T, b.T), (a.t, b.t)):
        np.testing.assert_array_equal(x, y)
    assert [r.target for r in runs[0].records] == [r.target for r in runs[1].records]
    assert [r.target for r in runs[0].records] != [r.target for r in runs[2].records]


def test_cached_training_activations_match_a_fresh_pass(mlp_bundle, forget_ids):
    """The server's per-base cache gives the same patterns, violations and records as computing
    everything from scratch, and its violations are the definition sum_i relu(-s_i q_i) delta on the
    gate's int8 quantization q of z."""
    import torch

    from prune_edge.activations import TrainActivations
    from prune_edge.synth import synthesize

    ds = mlp_bundle.dataset
    view = mlp_bundle.activations.view(1)
    with torch.no_grad():
        preacts, logits = mlp_bundle.net.forward_all(torch.from_numpy(ds.x_train[:50]))
    np.testing.assert_array_equal(view.z[:50], preacts[1].numpy())
    np.testing.assert_array_equal(view.logits[:50], logits.numpy())
    signs = view.signs(forget_ids[:3])
    assert set(np.unique(signs)) <= {-1, 1}
    q = quantize(view.z[:200], view.scale_log2).astype(np.float64)
    assert np.abs(q).max() <= 128 and (q != 0).mean() > 0.5  # the step resolves most values
    direct = np.maximum(-signs[None, :, :] * q[:, None, :], 0).sum(2)
    steps = view.violation_steps(signs)
    np.testing.assert_array_equal(steps[:200], 2 * direct)  # exact: integer sums
    assert np.all(steps[forget_ids[:3], np.arange(3)] == 0)

    ids = forget_ids[:6]
    cfg = SynthConfig(mode="collapse")
    cached = synthesize(mlp_bundle.net, ds.x_train, ds.y_train, ids, cfg, progress=False, activations=mlp_bundle.activations)
    fresh = synthesize(mlp_bundle.net, ds.x_train, ds.y_train, ids, cfg, progress=False,
                       activations=TrainActivations(mlp_bundle.net, ds.x_train))
    for a, b in zip((cached.params().signs, cached.params().gamma, cached.params().t),
                    (fresh.params().signs, fresh.params().gamma, fresh.params().t)):
        np.testing.assert_array_equal(a, b)


def test_violation_index_gives_exactly_the_product_minima(mlp_bundle, forget_ids):
    """The per-base nearest-violation index is a shortcut, never an approximation: gate widths and
    minima equal the full product's, including rows it must hand back to the product (a pattern that
    is not its row's own, an index row made only of excluded points)."""
    from prune_edge.activations import NO_POINT, TrainActivations
    from prune_edge.synth import synthesize

    ds = mlp_bundle.dataset
    fresh = TrainActivations(mlp_bundle.net, ds.x_train)  # not the shared bundle's: this test indexes it
    view = fresh.view(0)
    cfg = SynthConfig(mode="collapse")
    plain = synthesize(mlp_bundle.net, ds.x_train, ds.y_train, forget_ids, cfg, progress=False, activations=fresh)
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
    indexed = synthesize(mlp_bundle.net, ds.x_train, ds.y_train, forget_ids, cfg, progress=False, activations=fresh)
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
