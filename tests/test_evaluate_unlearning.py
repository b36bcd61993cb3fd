"""`prune-edge evaluate-unlearning --quick` end to end (digits MLP, one seed, four shadows, U-LiRA on four
unlearned shadows; a random and a class request): the report's structure and sanity, the unseen target's
constants (point and class calibration) checked through onnxruntime, and the Ray executor."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from prune_edge.cli import main

N_FORGET = 50
CLASS = 3


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "quick"
    res = CliRunner().invoke(main, ["evaluate-unlearning", "--dataset", "digits", "--forget", f"random:{N_FORGET}",
                                    "--forget", f"class:{CLASS}", "--quick", "--out", str(out)])
    assert res.exit_code == 0, res.output
    return out, json.loads((out / "results.json").read_text()), res.output


def test_quick_report_structure(quick_run):
    out, results, stdout = quick_run
    assert results["config"]["seeds"] == 1 and results["shadows"]["attack"] == 4
    req = results["requests"][f"random:{N_FORGET}"]
    assert req["forget_points"] == N_FORGET
    from prune_edge.unlearning_eval.grid import ALL_METHODS, CLASS_METHODS, ULIRA_METHODS

    assert set(results["config"]["methods"]) == set(ALL_METHODS)
    assert set(req["summary"]) == set(ALL_METHODS) - set(CLASS_METHODS)  # a suppression answers class requests only
    assert set(results["requests"][f"class:{CLASS}"]["summary"]) == set(ALL_METHODS)
    u_methods = results["shadows"]["ulira_methods"]
    assert results["shadows"]["ulira"] == 4 and set(u_methods) == set(ULIRA_METHODS) == set(ALL_METHODS) - {"prune-confuse", *CLASS_METHODS}
    for method, stats in req["summary"].items():
        for key in ("forget_acc", "test_acc", "agree_forget", "loss_auc", "challenge_acc", "lira_auc",
                    "lira_tpr_1pct", "lira_tpr_0.1pct", "seconds", "ship_bytes", "latency_ms"):
            assert stats[key]["n"] == 1, (method, key)
        for key in ("ulira_auc", "ulira_tpr_1pct", "ulira_tpr_0.1pct"):  # measured exactly for the U-LiRA methods
            assert stats[key]["n"] == (1 if method in u_methods else 0), (method, key)
        assert 0.0 <= stats["loss_auc"]["mean"] <= 1.0 and stats["seconds"]["mean"] > 0
        assert results["recipes"][method]["paper"] and results["recipes"][method]["recipe"]
    report = (out / "report.md").read_text()
    assert "| prune-unseen |" in report and "## Recipes" in report and "## Machine" in report and "U-LiRA AUC" in report
    assert "Acceptance (prune-unseen-pointcal vs retrain" in report  # the class request's contrast
    for name in ("forget_vs_test.png", "roc.png", "cost.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    svg = (out / "forget_vs_test.svg").read_text()
    assert svg.lstrip().startswith("<?xml") and "<svg" in svg and "retrain" in svg  # the text copy docs can carry
    assert "retrain" in stdout and "wrote" in stdout


def test_quick_report_sanity(quick_run):
    _, results, _ = quick_run
    s = results["requests"][f"random:{N_FORGET}"]["summary"]
    # retraining never saw the forget points: they are as hard as test points (binomial sd ~3 pp at 50 points)
    assert abs(s["retrain"]["forget_acc"]["mean"] - s["retrain"]["test_acc"]["mean"]) <= 0.1
    assert s["retrain"]["agree_forget"]["mean"] == 1.0
    # PRUNE's confusing label: every forget point moves, the rest is untouched
    assert s["prune-confuse"]["forget_acc"]["mean"] == 0.0
    assert s["prune-confuse"]["test_acc"]["mean"] == pytest.approx(results["bases"]["test_acc"]["mean"])
    # ... and a loss-threshold attack sees it at once; the unseen target does not stand out like that
    assert s["prune-confuse"]["loss_auc"]["mean"] < 0.1
    assert s["prune-unseen"]["loss_auc"]["mean"] > 0.3
    assert s["prune-unseen"]["ship_bytes"]["mean"] < s["retrain"]["ship_bytes"]["mean"]
    acc = results["requests"][f"random:{N_FORGET}"]["acceptance_prune_unseen"]
    assert acc["certificate_checks_pass"]["holds"]
    # U-LiRA: shadows unlearned with the confusing target give forgotten points away completely
    assert s["collapse-confuse"]["ulira_auc"]["mean"] > 0.9 and s["retrain"]["ulira_auc"]["mean"] < 0.75
    # class request: calibrated without the class, no forgotten point keeps its label (as retraining);
    # calibrated point by point, most do (the fold models saw other images of the class)
    c = results["requests"][f"class:{CLASS}"]["summary"]
    assert c["retrain"]["forget_acc"]["mean"] == 0.0 and c["prune-unseen"]["forget_acc"]["mean"] == 0.0
    assert c["prune-unseen-pointcal"]["forget_acc"]["mean"] > 0.5
    for key in ("acceptance_prune_unseen", "acceptance_prune_unseen_pointcal", "acceptance_prune_suppress"):
        assert results["requests"][f"class:{CLASS}"][key]["certificate_checks_pass"]["holds"]
    # the suppression answers the class's unseen test images too: none predicted as the class, like retraining
    assert c["prune-suppress"]["forget_acc"]["mean"] == 0.0 and c["prune-suppress"]["ship_bytes"]["mean"] < 5000
    cal = results["shadows"]["calibration_summary"]
    assert cal["class:3"]["label_is_a_forgotten_class"] == 0.0 and cal["points"]["min_out_count"] == 1


def test_unseen_patch_outputs_the_calibrated_constant(quick_run):
    """Through onnxruntime, each forgotten point's patched logits are the certified constant built from
    the calibration file (shadows that never saw it), up to a common shift of all logits."""
    from prune_edge.basedir import load_base
    from prune_edge.runtime.model import PatchedModel
    from prune_edge.targets import UnseenCalibration, certified_output
    from prune_edge.unlearning_eval.grid import request_ids

    out, _, _ = quick_run
    folder = out / "bases" / "seed0"
    bundle = load_base(folder)
    ids = request_ids(f"random:{N_FORGET}", bundle.dataset.y_train, 0)
    cal = UnseenCalibration.load(folder / "unseen-calibration.npz")
    targets, want = certified_output(cal.logits[ids], margin=1.0)
    got = PatchedModel(bundle.onnx_path, [folder / "patches" / f"prune-unseen-random{N_FORGET}.pepatch"]).logits(bundle.dataset.x_train[ids])
    assert (got.argmax(1) == targets).all()
    centred = lambda a: a - a.mean(axis=1, keepdims=True)  # noqa: E731
    assert np.abs(centred(got) - centred(want)).max() < 1e-3
    assert (np.sort(got, 1)[:, -1] - np.sort(got, 1)[:, -2] >= 1.0 - 1e-3).all()  # the certificate's margin


def test_class_unseen_patch_outputs_the_class_calibration(quick_run):
    """Through onnxruntime, each forgotten point of the class gets the certified constant of a model
    trained without the class (the class calibration file), never the class itself."""
    from prune_edge.basedir import load_base
    from prune_edge.runtime.model import PatchedModel
    from prune_edge.targets import ClassCalibration, certified_output, class_calibration_name

    out, _, _ = quick_run
    folder = out / "bases" / "seed0"
    bundle = load_base(folder)
    cal = ClassCalibration.load(folder / class_calibration_name([CLASS]))
    assert (bundle.dataset.y_train[cal.ids] == CLASS).all() and len(cal.ids) == (bundle.dataset.y_train == CLASS).sum()
    targets, want = certified_output(cal.logits, margin=1.0)
    got = PatchedModel(bundle.onnx_path, [folder / "patches" / f"prune-unseen-class{CLASS}.pepatch"]).logits(bundle.dataset.x_train[cal.ids])
    assert (got.argmax(1) == targets).all() and (targets != CLASS).all()
    centred = lambda a: a - a.mean(axis=1, keepdims=True)  # noqa: E731
    assert np.abs(centred(got) - centred(want)).max() < 1e-3


def test_class_request_is_judged_on_the_retained_classes(quick_run):
    """A class request's test-accuracy item compares accuracies on the test points whose label is not
    the class (the base's recomputed here through onnxruntime); a point request keeps the overall one."""
    from prune_edge.basedir import load_base
    from prune_edge.runtime.model import PatchedModel

    out, results, _ = quick_run
    bundle = load_base(out / "bases" / "seed0")
    ds = bundle.dataset
    keep = ds.y_test != CLASS
    base_retained = float((PatchedModel(bundle.onnx_path, []).predict(ds.x_test[keep]) == ds.y_test[keep]).mean())
    req = results["requests"][f"class:{CLASS}"]
    assert req["base_test_acc_retained"]["mean"] == pytest.approx(base_retained)
    for key in [k for k in req if k.startswith("acceptance_")]:
        method = key[len("acceptance_"):].replace("_", "-")
        item = req[key]["retained_class_test_acc_within_0.5pp_of_base"]
        assert "test_acc_within_0.5pp_of_base" not in req[key]
        assert item["value"] == req["summary"][method]["test_acc_retained"]["mean"] and item["reference"] == pytest.approx(base_retained)
    # retraining loses the class's test images: overall accuracy falls by about the class's share, not the rest
    s = req["summary"]["retrain"]
    assert s["test_acc"]["mean"] < s["test_acc_retained"]["mean"] - 0.05
    r = results["requests"][f"random:{N_FORGET}"]
    assert "test_acc_within_0.5pp_of_base" in r["acceptance_prune_unseen"]
    for m, st in r["summary"].items():
        assert st["test_acc_retained"]["mean"] == st["test_acc"]["mean"], m
    assert "test acc (retained classes)" in (out / "report.md").read_text()


def test_suppress_unseen_runs_records_then_a_calibrated_suppression(quick_run):
    """prune-suppress-unseen's two files pass the device's set checks; through onnxruntime the class's
    forgotten points get the records' constants (models without the class) with the class capped at the
    margin, and no test image of the class is predicted as the class. The margin is the one the cached
    calibration files (training data only) give."""
    from prune_edge.basedir import load_base
    from prune_edge.runtime.model import PatchedModel
    from prune_edge.runtime.verify import check_patch_set, verify_patch
    from prune_edge.targets import (ClassCalibration, UnseenCalibration, certified_output, class_calibration_name,
                                    class_suppression_margin, suppressed)

    out, results, _ = quick_run
    folder = out / "bases" / "seed0"
    bundle = load_base(folder)
    ds = bundle.dataset
    patches = [folder / "patches" / f"prune-suppress-unseen-class{CLASS}-records.pepatch",
               folder / "patches" / f"prune-suppress-unseen-class{CLASS}.pepatch"]
    check_patch_set([verify_patch(p, bundle.graph) for p in patches])
    cal = ClassCalibration.load(folder / class_calibration_name([CLASS]))
    point = UnseenCalibration.load(folder / "unseen-calibration.npz").logits
    margin = class_suppression_margin(cal.logits, point[cal.ids], ds.y_train[cal.ids], [CLASS], "match")
    run = results["requests"][f"class:{CLASS}"]["runs"]["prune-suppress-unseen"][0]
    assert run["margin"] == pytest.approx(margin) and margin > 1.0
    model = PatchedModel(bundle.onnx_path, patches)
    want = suppressed(certified_output(cal.logits, 1.0)[1], [CLASS], margin)
    got = model.logits(ds.x_train[cal.ids])
    centred = lambda a: a - a.mean(axis=1, keepdims=True)  # noqa: E731
    # (0.05: the patch file may store its constants rounded; a wrong order or margin is off by the margin's size)
    assert np.abs(centred(got) - centred(want)).max() < 0.05
    test_pred = model.logits(ds.x_test[ds.y_test == CLASS])
    assert (test_pred.argmax(1) != CLASS).all()
    others = np.delete(test_pred, CLASS, axis=1).max(1)
    assert (others - test_pred[:, CLASS] >= margin - 1e-3).all()  # every unseen image of the class at least the margin below


def test_suppress_affine_is_the_fit_build_patch_computes(quick_run):
    """prune-suppress-affine's file carries exactly the affine margin `build-patch --target unseen` fits
    from the base folder's cached class calibration (training points only); through onnxruntime no test
    image of the class is predicted as the class, and the margins it leaves them vary with the image."""
    from prune_edge.basedir import load_base
    from prune_edge.runtime import read_patch_file
    from prune_edge.runtime.model import PatchedModel
    from prune_edge.runtime.verify import verify_patch
    from prune_edge.targets import affine_suppression_margin

    out, _, _ = quick_run
    folder = out / "bases" / "seed0"
    bundle = load_base(folder)
    path = folder / "patches" / f"prune-suppress-affine-class{CLASS}.pepatch"
    verify_patch(path, bundle.graph)
    want = affine_suppression_margin(bundle, [CLASS], progress=False)  # cached: no model trained here
    m = read_patch_file(path).manifest
    assert m.suppress["affine"] == {"weights": want.weights.tolist(), "bias": want.bias.tolist()}
    x = bundle.dataset.x_test[bundle.dataset.y_test == CLASS]
    got = PatchedModel(bundle.onnx_path, [path]).logits(x)
    gap = np.delete(got, CLASS, axis=1).max(1) - got[:, CLASS]
    assert (gap > 0).all() and gap.std() > 0.1


def test_grid_calibration_is_what_build_patch_computes(quick_run):
    """The grid trains its calibration models as tasks; `build-patch --target unseen` trains them in
    process from the base folder. Both must give the same constants, or the grid measures another target."""
    from prune_edge.basedir import load_base
    from prune_edge.targets import (ClassCalibration, UnseenCalibration, build_class_calibration,
                                    build_unseen_calibration, class_calibration_name)

    out, results, _ = quick_run
    folder = out / "bases" / "seed0"
    bundle = load_base(folder)
    point = build_unseen_calibration(bundle, shadows=results["shadows"]["calibration"], progress=False)
    assert np.abs(point.logits - UnseenCalibration.load(folder / "unseen-calibration.npz").logits).max() < 1e-4
    cls = build_class_calibration(bundle, [CLASS], shadows=results["shadows"]["class_calibration"], progress=False)
    saved = ClassCalibration.load(folder / class_calibration_name([CLASS]))
    assert (cls.ids == saved.ids).all() and np.abs(cls.logits - saved.logits).max() < 1e-4


def test_bad_forget_spec_is_a_usage_error(tmp_path):
    res = CliRunner().invoke(main, ["evaluate-unlearning", "--forget", "some:3", "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "random:N or class:K" in res.output


def test_ray_local_mode_runs_tasks_in_order():
    """The Ray path (--ray-address) on a local Ray instance: the same module-level task functions,
    results in submission order."""
    ray = pytest.importorskip("ray")
    from prune_edge.unlearning_eval.executor import make_executor
    from prune_edge.unlearning_eval.metrics import roc_auc

    try:
        ex = make_executor(ray_address="local")
        assert ex.name == "ray"
        got = ex.map(roc_auc, [([0.8, 0.4], [0.6, 0.2]), ([3, 2], [1, 0]), ([0, 1], [2, 3])], progress=False)
        assert got == pytest.approx([0.75, 1.0, 0.0])
    finally:
        ray.shutdown()


def test_unseen_constant_without_the_margin_is_refused(quick_run, tmp_path):
    """An attacker's unseen record: the calibrated constant left uncapped (a row at -0.5, so the target
    wins by less than the certificate's margin), written consistently into the manifest and the
    canonical graph with our own tools. The device refuses it at the certificate check; the honest file
    passes every check."""
    import dataclasses

    import onnx

    from prune_edge.runtime import PatchVerificationError, pack, read_patch_file, verify_patch
    from prune_edge.runtime.base import BaseGraph
    from prune_edge.runtime.fileio import sha256_bytes
    from prune_edge.runtime.manifest import derive_patch_id
    from prune_edge.runtime.patchgraph import (PatchParams, affine_from_scales_many, build_patch_graph, completed_spec,
                                               extract_params, form_of)

    out, _, _ = quick_run
    folder = out / "bases" / "seed0"
    honest = folder / "patches" / f"prune-unseen-random{N_FORGET}.pepatch"
    base = BaseGraph.load(folder / "base.onnx")
    verify_patch(honest, base)
    pf = read_patch_file(honest)
    m = pf.manifest
    params = extract_params(onnx.load_from_string(pf.graph_bytes), len(m.records), m.gated_size, m.n_classes, m.form)
    rec = m.records[0]
    b = completed_spec(rec.target, m.n_classes) @ params.t[0].astype(np.float64)  # the shifts the device reads from t
    b[0] = -0.5
    T, t = affine_from_scales_many([rec.target], np.zeros((1, m.n_classes)), b[None], m.n_classes)
    new_T, new_t = params.T.copy(), params.t.copy()
    new_T[0], new_t[0] = T[0], t[0]
    forged = PatchParams(signs=params.signs, gamma=params.gamma, T=new_T, t=new_t, scale_log2=params.scale_log2)
    graph = build_patch_graph(m.gated, m.logits_name, forged, m.base_opset, m.base_ir_version, form_of(forged)).SerializeToString()
    fm = dataclasses.replace(m, form=form_of(forged), graph_sha256=sha256_bytes(graph), graph_bytes=len(graph))
    fm = dataclasses.replace(fm, patch_id=derive_patch_id(fm.to_json()))
    path = tmp_path / "forged-unseen.pepatch"
    path.write_bytes(pack(fm, graph))
    with pytest.raises(PatchVerificationError, match="patched rows expected inside"):
        verify_patch(path, base)
