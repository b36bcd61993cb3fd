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


def test_adversarial_search_finds_no_input_predicted_k(suppressed, mlp_bundle):
    """Counterexample search: gradient ascent on the base's preference for class 3 from many starts
    (class-3 test images, noise, blank, inputs far outside [0, 1] where logits are huge), then an exact
    LP per linear region reached, maximising f_3 - f_j over the region for every j; every input found
    is run through the patched onnxruntime model. None is predicted 3, and 3 stays below the best
    other logit, though the base predicts 3 on (nearly) all of them."""
    import torch

    from prune_edge.regions import compute_regions, region_lp

    ds = mlp_bundle.dataset
    import copy

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
    found.append(np.asarray(lp_points, np.float32).reshape(-1, *ds.x_test.shape[1:]))
    x_all = np.concatenate(found)
    after, before = suppressed["model"].logits(x_all), suppressed["base"].logits(x_all)
    assert np.isfinite(after).all() and np.abs(before).max() > 1e4  # the far inputs reach huge logits
    others = [j for j in range(ds.n_classes) if j != K]
    assert (before.argmax(1) == K).mean() > 0.9  # the search did find inputs the base calls 3 ...
    assert not (after.argmax(1) == K).any()  # ... and the patched model calls none of them 3
    assert (after[:, K] < after[:, others].max(1)).all()
    assert np.array_equal(after[:, others].view(np.uint32), before[:, others].view(np.uint32))
    assert len(lp_points) == 8 * (ds.n_classes - 1)


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
