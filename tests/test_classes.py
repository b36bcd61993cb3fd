"""Whole-class requests (--forget-class): every training point of the class ends certified and forgotten."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("torch")

from click.testing import CliRunner  # noqa: E402

from prune_edge.runtime import read_patch_file  # noqa: E402

from test_sets import device_regions  # noqa: E402


def test_forget_class_cli(tmp_path, mlp_base, mlp_bundle):
    from prune_edge.cli import main

    ds = mlp_bundle.dataset
    out = tmp_path / "class3.pepatch"
    r = CliRunner().invoke(main, ["build-patch", "--base", str(mlp_base), "--forget-class", "3", "--strategy", "points", "--mode", "collapse",
                                  "--out", str(out), "--ledger", str(tmp_path / "ledger"), "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    ids = np.flatnonzero(ds.y_train == 3)
    m = read_patch_file(out).manifest
    assert m.request["kind"] == "class" and m.request["classes"] == [3] and m.request["n_points"] == len(ids)
    assert doc["uncertified_ids"] == [] and doc["evaluation"]["accuracy"]["forget"]["after"] == 0.0
    inside, pred = device_regions(mlp_bundle, [out], ids)
    assert inside.all() and not (pred == 3).any()  # training accuracy on class 3: 0%, each point certified
    assert all(r.target != 3 for r in m.records)


@pytest.mark.parametrize("args, code, match", [
    (["--forget-class", "10"], 1, "expected classes in [0, 10)"),
    (["--forget-class", "3", "--forget", "ids.txt"], 2, "exactly one of --forget"),
])
def test_forget_class_refusals(tmp_path, mlp_base, args, code, match):
    from prune_edge.cli import main

    (tmp_path / "ids.txt").write_text("1\n")
    args = [a if a != "ids.txt" else str(tmp_path / "ids.txt") for a in args]
    out = tmp_path / "p.pepatch"
    r = CliRunner().invoke(main, ["build-patch", "--base", str(mlp_base), *args, "--out", str(out)])
    assert r.exit_code == code and match in r.output and not out.exists()


# ----------------------------------------------------------------------------- class suppression
K = 3


@pytest.fixture(scope="module")
def suppressed(tmp_path_factory, mlp_base, mlp_bundle):
    """Class 3 forgotten the default way for a class request (no --strategy: a suppression patch)."""
    from prune_edge.cli import main

    out = tmp_path_factory.mktemp("suppress") / "class3.pepatch"
    r = CliRunner().invoke(main, ["build-patch", "--base", str(mlp_base), "--forget-class", str(K), "--out", str(out),
                                  "--ledger", str(out.parent / "ledger"), "--json"])
    assert r.exit_code == 0, r.output
    from prune_edge.runtime.model import PatchedModel

    return {"path": out, "report": json.loads(r.output), "model": PatchedModel(mlp_bundle.onnx_path, [out]),
            "base": PatchedModel(mlp_bundle.onnx_path)}


def test_suppression_forgets_the_class_on_train_and_test(suppressed, mlp_bundle):
    """Class 3 through onnxruntime: training and test accuracy on it 0%, every other class's test
    accuracy at least the base's (an input the base called 3 gets its runner-up), every logit but 3
    bit-identical to the base on every training and test image."""
    ds = mlp_bundle.dataset
    m = read_patch_file(suppressed["path"]).manifest
    assert (m.mode, m.form, m.records, m.gated) == ("suppress", "suppress", (), ())
    assert m.suppress == {"classes": [K], "margin": 1.0}
    assert m.request["kind"] == "class" and m.request["strategy"] == "suppress" and m.request["classes"] == [K]
    others = [j for j in range(ds.n_classes) if j != K]
    for x, y in ((ds.x_train, ds.y_train), (ds.x_test, ds.y_test)):
        after, before = suppressed["model"].logits(x), suppressed["base"].logits(x)
        assert np.array_equal(after[:, others].view(np.uint32), before[:, others].view(np.uint32))
        assert (after[:, K] < after[:, others].max(1) - 0.999).all()
        pred, base_pred = after.argmax(1), before.argmax(1)
        assert not (pred == K).any()  # accuracy on the class: 0% (train and test)
        assert (pred[base_pred != K] == base_pred[base_pred != K]).all()
        for c in others:
            assert (pred[y == c] == c).mean() >= (base_pred[y == c] == c).mean()
    assert (suppressed["base"].predict(ds.x_test[ds.y_test == K]) == K).mean() > 0.5  # the base did know class 3
    per = suppressed["report"]["class_test_accuracy"]["after"]
    assert per[str(K)] == 0.0


def _margin_to_k(net, x):
    """f_K - max_{j != K} f_j of the base (torch, float32): what an attacker maximises."""
    import torch

    f = net(x)
    others = torch.cat([f[:, :K], f[:, K + 1:]], dim=1)
    return f[:, K] - others.max(dim=1).values


@pytest.fixture(scope="module")
def adversarial_inputs(mlp_bundle):
    """Counterexample search: gradient ascent on the base's preference for class 3 from many starts
    (class-3 test images, noise, blank, inputs far outside [0, 1] where logits are huge), then an exact
    LP per linear region reached, maximising f_3 - f_j over the region for every j."""
    import copy

    import torch

    from prune_edge.regions import compute_regions, region_lp

    ds = mlp_bundle.dataset
    net = copy.deepcopy(mlp_bundle.net).float().eval()  # a copy: the session's bundle stays as it is
    g = torch.Generator().manual_seed(0)
    starts = torch.cat([torch.from_numpy(ds.x_test[ds.y_test == K][:24]), torch.rand((16, *ds.x_test.shape[1:]), generator=g),
                        torch.zeros((1, *ds.x_test.shape[1:])), torch.full((1, *ds.x_test.shape[1:]), 0.5)])
    found = []
    for lo, hi in ((0.0, 1.0), (-1e3, 1e3), (-1e6, 1e6)):  # the box, then far outside it (huge logits)
        x = (starts * (hi - lo) + lo if hi > 1 else starts).clone().requires_grad_(True)
        step = (hi - lo) / 50
        for _ in range(40):
            loss = _margin_to_k(net, x).sum()
            (grad,) = torch.autograd.grad(loss, x)
            with torch.no_grad():
                x += step * grad.sign()
                x.clamp_(lo, hi)
        found.append(x.detach().numpy().astype(np.float32))
    x_box = found[0]
    # exact LPs over the regions the in-box search reached: the inputs where 3 beats each j by the most
    regions = compute_regions(copy.deepcopy(net).double(), x_box[:8].astype(np.float64), start=0)
    jac = regions.jac_f.numpy()
    lp_points = []
    for b in range(8):
        lp = region_lp(regions, b)
        for j in range(ds.n_classes):
            if j != K:
                lp_points.append(lp.solve(-(jac[b, K] - jac[b, j])))
    assert len(lp_points) == 8 * (ds.n_classes - 1)
    found.append(np.asarray(lp_points, np.float32).reshape(-1, *ds.x_test.shape[1:]))
    return np.concatenate(found)


@pytest.mark.parametrize("form", ["constant", "affine"])
def test_adversarial_search_finds_no_input_predicted_k(form, suppressed, affine_suppressed, adversarial_inputs):
    """Every input the search found is run through the patched onnxruntime model (the constant-margin and
    the affine-margin suppression): none is predicted 3, and 3 stays below the best other logit, though
    the base predicts 3 on (nearly) all of them; every other logit is the base's bit for bit."""
    patched = (suppressed if form == "constant" else affine_suppressed)["model"]
    x_all = adversarial_inputs
    after, before = patched.logits(x_all), suppressed["base"].logits(x_all)
    n_classes = before.shape[1]
    assert np.isfinite(after).all() and np.abs(before).max() > 1e4  # the far inputs reach huge logits
    others = [j for j in range(n_classes) if j != K]
    assert (before.argmax(1) == K).mean() > 0.9  # the search did find inputs the base calls 3 ...
    assert not (after.argmax(1) == K).any()  # ... and the patched model calls none of them 3
    assert (after[:, K] < after[:, others].max(1)).all()
    assert np.array_equal(after[:, others].view(np.uint32), before[:, others].view(np.uint32))


def test_suppression_composes_after_point_patches_and_splits(suppressed, forget_ids, mlp_bundle, tmp_path):
    """A point patch (records with targets other than 3) then the suppression: one batched graph, the
    gated correction first; the split two-session form gives the same logits; a class whose class
    some record targets is refused for that chain."""
    import onnxruntime as ort

    from prune_edge.runtime import BaseGraph, PatchedModel, PatchVerificationError
    from prune_edge.runtime.split import split_sessions
    from prune_edge.suppress import build_class_suppression

    from prune_edge.synth import SynthConfig
    from prune_edge.unlearn import build_point_patch

    ds = mlp_bundle.dataset
    point = tmp_path / "points.pepatch"  # three points: their records target at most three classes
    build_point_patch(mlp_bundle, forget_ids[:3], SynthConfig(mode="collapse"), point, device="cpu", progress=False,
                      evaluate=False, ledger=tmp_path / "ledger")
    targets = {r.target for r in read_patch_file(point).manifest.records}
    free = next(k for k in range(ds.n_classes) if k not in targets)
    taken = sorted(targets)[0]
    sup = tmp_path / "free.pepatch"
    build_class_suppression(mlp_bundle, [free], sup, after=[point], ledger=tmp_path / "ledger", evaluate=False)
    assert read_patch_file(sup).manifest.chain["position"] == 1
    both, alone = PatchedModel(mlp_bundle.onnx_path, [point, sup]), PatchedModel(mlp_bundle.onnx_path, [point])
    x = np.concatenate([ds.x_train, ds.x_test])
    fb, fa = both.logits(x), alone.logits(x)
    others = [j for j in range(ds.n_classes) if j != free]
    assert np.array_equal(fb[:, others], fa[:, others]) and not (fb.argmax(1) == free).any()
    assert both.n_records == alone.n_records
    graph = BaseGraph.load(mlp_bundle.onnx_path)
    split = split_sessions(graph, both.patches)
    s1 = ort.InferenceSession(split.base.SerializeToString(), providers=["CPUExecutionProvider"])
    s2 = ort.InferenceSession(split.patch.SerializeToString(), providers=["CPUExecutionProvider"])
    tapped = dict(zip([o.name for o in s1.get_outputs()], s1.run(None, {split.input_name: x})))
    patched = s2.run([split.logits_name], {n: tapped[n] for n in split.feeds})[0]
    assert np.array_equal(patched, fb)
    with pytest.raises(Exception, match="to target a suppressed class"):
        build_class_suppression(mlp_bundle, [taken], tmp_path / "taken.pepatch", after=[point], ledger=tmp_path / "ledger")
    assert not (tmp_path / "taken.pepatch").exists()
    with pytest.raises(PatchVerificationError, match="to target a suppressed class"):
        PatchedModel(mlp_bundle.onnx_path, [point, _suppression_of(mlp_bundle, [taken], tmp_path / "t2.pepatch")])


def _suppression_of(bundle, classes, path):
    """A suppression patch written without the chain check (what another server might ship)."""
    from prune_edge.suppress import build_class_suppression

    build_class_suppression(bundle, classes, path, ledger=path.parent / "ledger", evaluate=False)
    return path


def test_compact_merges_suppressions(mlp_bundle, tmp_path):
    from prune_edge.cli import main
    from prune_edge.runtime.model import PatchedModel

    a, b = _suppression_of(mlp_bundle, [3], tmp_path / "a.pepatch"), _suppression_of(mlp_bundle, [7], tmp_path / "b.pepatch")
    out = tmp_path / "ab.pepatch"
    base = str(mlp_bundle.onnx_path)
    r = CliRunner().invoke(main, ["compact", str(a), str(b), "--base", base, "--out", str(out)])
    assert r.exit_code == 0, r.output
    m = read_patch_file(out).manifest
    assert m.suppress["classes"] == [3, 7] and len(m.chain["replaces"]) == 2
    x = mlp_bundle.dataset.x_test
    merged, chain = PatchedModel(base, [out]).logits(x), PatchedModel(base, [a, b]).logits(x)
    assert np.array_equal(merged, chain) and not np.isin(merged.argmax(1), [3, 7]).any()
    r = CliRunner().invoke(main, ["certify", "--base", base, "--patch", str(out)])
    assert r.exit_code == 0, r.output


def test_suppress_strategy_needs_a_class(tmp_path, mlp_base):
    from prune_edge.cli import main

    (tmp_path / "ids.txt").write_text("1\n")
    out = tmp_path / "p.pepatch"
    r = CliRunner().invoke(main, ["build-patch", "--base", str(mlp_base), "--forget", str(tmp_path / "ids.txt"),
                                  "--strategy", "suppress", "--out", str(out)])
    assert r.exit_code == 2 and "expected --forget-class" in r.output and not out.exists()


def test_verify_sample_names_the_suppression(suppressed, mlp_bundle, tmp_path):
    """A class-3 sample is forgotten, covered by the suppression (not by a gate); another label is not."""
    from prune_edge.cli import main

    ds = mlp_bundle.dataset
    i = int(np.flatnonzero(ds.y_test == K)[0])
    np.save(tmp_path / "s.npy", ds.x_test[i:i + 1])
    args = ["verify-sample", "--base", str(mlp_bundle.onnx_path), "--patch", str(suppressed["path"]),
            "--sample", str(tmp_path / "s.npy"), "--json", "--label"]
    r = CliRunner().invoke(main, [*args, str(K)])
    doc = json.loads(r.output)
    assert r.exit_code == 0 and doc["status"] == "forgotten" and doc["covered_by"]["suppressed_class"] == K
    r = CliRunner().invoke(main, [*args, str((K + 1) % ds.n_classes)])
    assert r.exit_code == 1 and json.loads(r.output)["status"] == "not covered"


def test_margin_rule_takes_the_margin_from_the_cached_calibration(tmp_path, mlp_base, mlp_bundle):
    """`--margin-rule` computes the suppression's margin from the base folder's cached calibrations (here
    written by hand into a copy of the base, so no model is trained): the manifest's margin is the one
    targets.class_suppression_margin gives on those files; it refuses --margin and a non-suppress build."""
    import shutil

    from prune_edge.cli import main
    from prune_edge.runtime.model import PatchedModel
    from prune_edge.targets import (CALIBRATION_NAME, ClassCalibration, UnseenCalibration, class_calibration_name,
                                    class_suppression_margin)

    base = tmp_path / "base"
    shutil.copytree(mlp_base, base, ignore=shutil.ignore_patterns("ledger", "patches", "*.npz"))
    ds = mlp_bundle.dataset
    rng = np.random.default_rng(0)
    point = PatchedModel(mlp_bundle.onnx_path).logits(ds.x_train).astype(np.float64) + rng.normal(0, 1, (len(ds.y_train), ds.n_classes))
    UnseenCalibration(point, 1.0, 16, np.ones(len(point), np.int64), 0.0, 0.9).save(base / CALIBRATION_NAME)
    ids = np.flatnonzero(ds.y_train == K)
    without = point[ids].copy()
    without[:, K] -= rng.normal(15, 4, len(ids))  # what models without the class would say
    ClassCalibration((K,), ids, without, 1.0, 4, 0.0).save(base / class_calibration_name([K]))
    out = tmp_path / "s.pepatch"
    run = lambda *a: CliRunner().invoke(main, ["build-patch", "--base", str(base), "--forget-class", str(K), *a,  # noqa: E731
                                               "--out", str(out), "--ledger", str(tmp_path / "ledger"), "--json"])
    r = run("--margin-rule", "match")
    assert r.exit_code == 0, r.output
    want = class_suppression_margin(without, point[ids], ds.y_train[ids], [K], "match")
    assert read_patch_file(out).manifest.suppress["margin"] == pytest.approx(want) and want > 1.0
    assert json.loads(r.output)["margin"] == pytest.approx(want)
    out.unlink()
    for args, match in ((("--margin-rule", "median", "--margin", "2"), "expected no --margin"),
                        (("--margin-rule", "median", "--strategy", "points"), "expected --forget-class K with the suppress")):
        r = run(*args)
        assert r.exit_code == 2 and match in r.output and not out.exists()


# ----------------------------------------------------------------------------- affine suppression
def _calibrated_base_copy(tmp_path, mlp_base, mlp_bundle, seed: int = 0):
    """A copy of the base with hand-written calibration caches (no model trained): the point calibration
    (base logits plus noise) and a class calibration whose class-3 logit sits a per-point gap below,
    a gap that depends on the base's own logits (what an affine fit can follow)."""
    import shutil

    from prune_edge.runtime.model import PatchedModel
    from prune_edge.targets import CALIBRATION_NAME, ClassCalibration, UnseenCalibration, class_calibration_name

    base = tmp_path / "base"
    shutil.copytree(mlp_base, base, ignore=shutil.ignore_patterns("ledger", "patches", "*.npz"))
    ds = mlp_bundle.dataset
    rng = np.random.default_rng(seed)
    f = PatchedModel(mlp_bundle.onnx_path).logits(ds.x_train).astype(np.float64)
    point = f + rng.normal(0, 1, f.shape)
    UnseenCalibration(point, 1.0, 16, np.ones(len(point), np.int64), 0.0, 0.9).save(base / CALIBRATION_NAME)
    ids = np.flatnonzero(ds.y_train == K)
    without = f[ids].copy()
    without[:, K] = np.delete(without, K, axis=1).max(1) - (8.0 + 0.5 * f[ids, K] + rng.normal(0, 1, len(ids)))
    ClassCalibration((K,), ids, without, 1.0, 4, 0.0).save(base / class_calibration_name([K]))
    return base, ids, without


@pytest.fixture(scope="module")
def affine_suppressed(tmp_path_factory, mlp_base, mlp_bundle):
    """Class 3 forgotten with `--target unseen`: a suppression whose margin follows the input, fitted on
    the (hand-written) class calibration of a copy of the base."""
    from prune_edge.cli import main
    from prune_edge.runtime.model import PatchedModel

    tmp = tmp_path_factory.mktemp("affine")
    base, ids, without = _calibrated_base_copy(tmp, mlp_base, mlp_bundle)
    out = tmp / "class3-affine.pepatch"
    r = CliRunner().invoke(main, ["build-patch", "--base", str(base), "--forget-class", str(K), "--target", "unseen",
                                  "--out", str(out), "--ledger", str(tmp / "ledger"), "--json"])
    assert r.exit_code == 0, r.output
    return {"path": out, "report": json.loads(r.output), "model": PatchedModel(mlp_bundle.onnx_path, [out]),
            "ids": ids, "without": without}


def test_affine_suppression_fit_and_onnxruntime(affine_suppressed, mlp_bundle):
    """The manifest carries the least-squares fit of the class calibration's gaps on the base's logits at
    the class's training points (weights exactly those of targets.fit_affine_suppression); through
    onnxruntime on all 5,000 images class 3 is never predicted, its logit sits max(1, w . f + b) below
    the best other class wherever the base's logit was above that cap, the margin varies with the input,
    and every other logit is the base's bit for bit."""
    from prune_edge.runtime.model import PatchedModel
    from prune_edge.runtime.patchgraph import SuppressParams
    from prune_edge.runtime.policy import DEFAULT_POLICY
    from prune_edge.targets import fit_affine_suppression

    ds = mlp_bundle.dataset
    m = read_patch_file(affine_suppressed["path"]).manifest
    base = PatchedModel(mlp_bundle.onnx_path)
    ids = affine_suppressed["ids"]
    want = fit_affine_suppression(base.logits(ds.x_train[ids]), affine_suppressed["without"], ds.y_train[ids], [K],
                                  DEFAULT_POLICY.max_abs_T, DEFAULT_POLICY.max_abs_t)
    assert m.suppress["margin"] == 1.0 and m.suppress["affine"]["weights"] == want.weights.tolist()
    assert m.suppress["affine"]["bias"] == want.bias.tolist() and want.r2[0] > 0.5
    assert affine_suppressed["report"]["affine_margin"]["r2"] == [round(want.r2[0], 4)]
    sp = SuppressParams([K], [1.0], want.weights, want.bias)
    x = np.concatenate([ds.x_train, ds.x_test])
    assert len(x) == 5000
    after, before = affine_suppressed["model"].logits(x), base.logits(x)
    others = [j for j in range(ds.n_classes) if j != K]
    assert np.array_equal(after[:, others].view(np.uint32), before[:, others].view(np.uint32))
    assert not (after.argmax(1) == K).any()
    mo, margin = before[:, others].max(1).astype(np.float64), sp.margins_at(before)[:, 0]
    assert (margin >= 1.0).all() and margin.std() > 0.5  # not one constant: it follows the input
    cap = mo - margin
    capped = before[:, K] > cap + 1e-3 * (1 + np.abs(mo))
    assert capped.sum() > 300  # the cap acts on many images (every one the base called 3, and more)
    np.testing.assert_allclose(after[capped, K], cap[capped], rtol=0, atol=1e-4 * (1 + np.abs(mo[capped]).max()))
    assert np.array_equal(after[~capped & (before[:, K] < cap - 1e-3 * (1 + np.abs(mo))), K],
                          before[~capped & (before[:, K] < cap - 1e-3 * (1 + np.abs(mo))), K])


@pytest.mark.parametrize("weights", ["fitted", "policy-max"])
def test_affine_suppression_logit_space_search(weights, affine_suppressed):
    """The guarantee in logit space, on a suppression graph run alone by onnxruntime: the patch's own
    (fitted) graph, and the same graph with the largest weights and most negative bias the default
    policy allows (|w| = 16 with alternating signs, b = -1e4). Inputs: logits where class 3 leads, ties,
    scales up to 1e30 and float32's largest, logits chosen so that w . f overflows float32 (f = +-3e38
    along the signs of w: without the clip, inf, and inf - inf = NaN), plus a random search that keeps
    the input where out_3 - max_{j != 3} out_j is largest. Class 3 is never predicted and stays
    strictly below the best other class; every other logit is the input's bit for bit."""
    from prune_edge.runtime.model import make_session
    from prune_edge.runtime.patchgraph import SuppressParams, build_suppress_graph

    m = read_patch_file(affine_suppressed["path"]).manifest
    c = m.n_classes
    w = np.array(m.suppress["affine"]["weights"][0], np.float32)
    b = np.float32(m.suppress["affine"]["bias"][0])
    if weights == "policy-max":
        w, b = np.where(np.arange(c) % 2 == 0, 16.0, -16.0).astype(np.float32), np.float32(-1e4)
    sp = SuppressParams([K], [m.suppress["margin"]], w[None], [b])
    sess = make_session(build_suppress_graph(m.logits_name, sp, c, m.base_opset, m.base_ir_version).SerializeToString())
    rng = np.random.default_rng(0)
    big = np.float32(3e38)
    rows = []
    for scale in (1e-30, 1e-3, 1.0, 1e3, 1e8, 1e20, 1e30, 3e37):
        f = (rng.normal(size=(64, c)) * scale).astype(np.float32)
        f[:, K] = np.abs(f).max(1) * np.float32(1.0001)  # class 3 leads
        rows.append(f)
        g = f.copy()
        g[:, K] = np.delete(g, K, axis=1).max(1)  # ties
        rows.append(g)
    for sign in (1, -1):  # w . f -> +-inf in float32 without the clip (policy-max weights)
        over = (sign * np.sign(w)[None].repeat(8, 0) * big).astype(np.float32)
        over[:, K] = big
        rows.append(over)
        if weights == "policy-max":
            with np.errstate(over="ignore", invalid="ignore"):
                assert not np.isfinite((over * w).sum(1, dtype=np.float32) + b).any()
    f = np.concatenate(rows).astype(np.float32)
    run = lambda z: sess.run(None, {m.logits_name: z})[0]  # noqa: E731
    others = [j for j in range(c) if j != K]
    lead = lambda out: out[:, K] - out[:, others].max(1)  # noqa: E731
    best = f[:64].copy()
    for _ in range(30):  # perturb the best-so-far logits, keep those that bring 3 closest to winning
        cand = (best + rng.normal(size=best.shape).astype(np.float32) * np.float32(10.0 ** rng.integers(-3, 30))).astype(np.float32)
        cand[:, K] = np.float32(np.finfo(np.float32).max) * np.float32(0.9)
        keep = lead(run(cand)) > lead(run(best))
        best[keep] = cand[keep]
        f = np.concatenate([f, cand])
    assert np.isfinite(f).all()
    out = run(f)
    assert not (out.argmax(1) == K).any() and (out[:, K] < out[:, others].max(1)).all()
    assert np.array_equal(out[:, others].view(np.uint32), f[:, others].view(np.uint32))


def test_affine_suppression_composes_merges_and_compacts(affine_suppressed, mlp_bundle, tmp_path):
    """An affine suppression of 3 with a constant one of 3 (margin 30) and one of 7, run together: one
    merged suppression whose margin for 3 is the larger of the two on each input (numpy model of the
    graph, to float32 rounding), 3 and 7 never predicted, other logits bit for bit; `compact` refuses
    to merge two suppressions of 3 with affine margins and merges the disjoint 7 + affine 3 into one
    patch with the same logits as the chain."""
    from prune_edge.cli import main
    from prune_edge.runtime.model import PatchedModel
    from prune_edge.runtime.patchgraph import SuppressParams
    from prune_edge.suppress import build_class_suppression

    ds = mlp_bundle.dataset
    aff = affine_suppressed["path"]
    base = str(mlp_bundle.onnx_path)
    x = ds.x_test
    f = PatchedModel(base).logits(x)
    a = read_patch_file(aff).manifest.suppress
    m_aff = SuppressParams([K], [1.0], np.array(a["affine"]["weights"]), np.array(a["affine"]["bias"])).margins_at(f)[:, 0]
    const = float(np.float32(np.round(np.median(m_aff), 1)))  # each term wins on about half the inputs
    s_c, s1, s7 = tmp_path / "sc.pepatch", tmp_path / "s1.pepatch", tmp_path / "s7.pepatch"
    build_class_suppression(mlp_bundle, [K], s_c, margin=const, ledger=tmp_path / "ledger", evaluate=False)
    build_class_suppression(mlp_bundle, [K], s1, ledger=tmp_path / "ledger", evaluate=False)
    build_class_suppression(mlp_bundle, [7], s7, ledger=tmp_path / "ledger", evaluate=False)
    out = PatchedModel(base, [aff, s_c, s7]).logits(x)
    keep = [j for j in range(ds.n_classes) if j not in (K, 7)]
    assert np.array_equal(out[:, keep].view(np.uint32), f[:, keep].view(np.uint32))
    assert not np.isin(out.argmax(1), [K, 7]).any()
    mo = f[:, keep].max(1).astype(np.float64)
    want = np.minimum(f[:, K], mo - np.maximum(m_aff, const))
    np.testing.assert_allclose(out[:, K], want, rtol=0, atol=1e-4 * (1 + np.abs(mo).max()))
    both = f[:, K] > mo - np.minimum(m_aff, const) + 1e-3
    assert (both & (m_aff > const)).any() and (both & (m_aff < const)).any()  # each term decides somewhere
    r = CliRunner().invoke(main, ["compact", str(aff), str(s1), "--base", base, "--out", str(tmp_path / "x.pepatch")])
    assert r.exit_code != 0 and "expected disjoint classes" in r.output
    merged = tmp_path / "m.pepatch"
    r = CliRunner().invoke(main, ["compact", str(aff), str(s7), "--base", base, "--out", str(merged)])
    assert r.exit_code == 0, r.output
    assert read_patch_file(merged).manifest.suppress["affine"]["weights"][0] == a["affine"]["weights"][0]
    assert np.array_equal(PatchedModel(base, [merged]).logits(x), PatchedModel(base, [aff, s7]).logits(x))


def test_target_unseen_refuses_a_margin_rule(tmp_path, mlp_base):
    from prune_edge.cli import main

    out = tmp_path / "p.pepatch"
    r = CliRunner().invoke(main, ["build-patch", "--base", str(mlp_base), "--forget-class", str(K), "--target", "unseen",
                                  "--margin-rule", "match", "--out", str(out)])
    assert r.exit_code == 2 and "expected no --target unseen" in r.output and not out.exists()
