"""The command line: exit codes, one-line errors, nothing written on bad input."""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from prune_edge.cli import EXIT_FAILURE, EXIT_USAGE, EXIT_VERIFY, main
from prune_edge.runtime import read_patch_file
from conftest import ledger_record


@pytest.fixture()
def runner():
    return CliRunner()


def _one_line_error(result) -> str:
    err = result.stderr.strip().splitlines()
    assert len(err) == 1, f"expected one error line on stderr, found {err}"
    assert "Traceback" not in result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit)
    return err[0]


@pytest.mark.parametrize(
    "content, match",
    [
        pytest.param("", "at least one", id="empty"),
        pytest.param("1\n1\n", "duplicate", id="duplicate"),
        pytest.param("4000\n", r"\[0, 4000\)", id="out-of-range"),
        pytest.param("-1\n", r"\[0, 4000\)", id="negative"),
        pytest.param("3.5\n", "integer", id="not-an-int"),
    ],
)
def test_build_patch_refuses_bad_ids(runner, tmp_path, mlp_base, content, match):
    ids = tmp_path / "ids.txt"
    ids.write_text(content)
    out = tmp_path / "p.pepatch"
    result = runner.invoke(main, ["build-patch", "--base", str(mlp_base), "--forget", str(ids), "--out", str(out)])
    assert result.exit_code == EXIT_FAILURE
    line = _one_line_error(result)
    assert line.startswith("error:") and re.search(match, line)
    assert not out.exists() and list(tmp_path.iterdir()) == [ids]


def test_build_patch_bad_gate_layers_is_usage_error(runner, tmp_path, mlp_base, forget_file):
    result = runner.invoke(main, ["build-patch", "--base", str(mlp_base), "--forget", str(forget_file),
                                  "--gate-layers", "last:9", "--out", str(tmp_path / "p.pepatch")])
    assert result.exit_code == EXIT_USAGE
    assert "last:K" in result.stderr


def test_build_patch_json_and_certify(runner, tmp_path, mlp_base, mlp_bundle):
    ids = tmp_path / "ids.txt"
    ids.write_text("5\n17\n")
    out = tmp_path / "two.pepatch"
    result = runner.invoke(main, ["build-patch", "--base", str(mlp_base), "--forget", str(ids), "--mode", "collapse",
                                  "--out", str(out), "--json"])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)  # stdout is exactly one JSON document
    assert report["points"] == 2 and report["evaluation"]["accuracy"]["forget"]["after"] == 0.0
    assert report["already_covered"] == 0 and report["evaluation"]["forget_patched_here"] == 2
    assert report["chain"] == {"position": 0, "after": [], "replaces": []}
    cert = runner.invoke(main, ["certify", "--base", str(mlp_bundle.onnx_path), "--patch", str(out), "--json"])
    assert cert.exit_code == 0
    doc = json.loads(cert.stdout)
    assert doc["passed"] and [c["name"] for c in doc["patches"][0]["checks"]] == [
        "format", "integrity", "binding", "structure", "locality", "certificate"]
    assert all(c["status"] == "pass" for c in doc["patches"][0]["checks"])
    assert [(c["name"], c["status"]) for c in doc["set"]] == [("interference", "pass")]
    assert doc["policy"]["max_gate_width"] == 1.0


def test_build_patch_dual_steps_trade_bound_tightness(runner, tmp_path, mlp_base, mlp_bundle):
    """--dual-steps reaches the bounds: 0 steps is the box bound, never tighter than the default ascent's
    and looser somewhere; both patches forget their points and pass certify."""
    ids = tmp_path / "ids.txt"
    ids.write_text("5\n17\n40\n")
    uppers = {}
    for steps in ("0", None):
        out = tmp_path / f"s{steps}.pepatch"
        args = ["build-patch", "--base", str(mlp_base), "--forget", str(ids), "--out", str(out), "--json"]
        result = runner.invoke(main, args + (["--dual-steps", steps] if steps else []))
        assert result.exit_code == 0, result.stderr
        assert json.loads(result.stdout)["evaluation"]["accuracy"]["forget"]["after"] == 0.0
        assert runner.invoke(main, ["certify", "--base", str(mlp_bundle.onnx_path), "--patch", str(out)]).exit_code == 0
        recs = read_patch_file(out).manifest.records  # same regions in the same order (same patterns)
        uppers[steps] = np.array([r.upper for r in recs])
    box, tight = uppers["0"], uppers[None]
    assert box.shape == tight.shape and (box >= tight).all() and (box > tight + 0.5).any()
    bad = runner.invoke(main, ["build-patch", "--base", str(mlp_base), "--forget", str(ids), "--out",
                               str(tmp_path / "x.pepatch"), "--dual-steps", "-1"])
    assert bad.exit_code == 2 and "--dual-steps" in bad.output


def test_build_patch_after_chain_certify_set_and_probe(runner, tmp_path, mlp_base, mlp_bundle, patches, forget_ids):
    """build-patch --after: the new patch names the earlier one and is checked with it; certify checks
    the pair as a set, and --probe refuses a set whose gates open on too many of the device's inputs."""
    first = patches["prune"][0]
    ids = tmp_path / "ids.txt"
    ids.write_text("5\n17\n")
    out = tmp_path / "next.pepatch"
    result = runner.invoke(main, ["build-patch", "--base", str(mlp_base), "--forget", str(ids), "--mode", "prune",
                                  "--bounds", "exact", "--after", str(first), "--out", str(out), "--json"])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    first_id = patches["prune"][1]["patch_id"]
    assert report["chain"] == {"position": 1, "after": [first_id], "replaces": []}
    assert report["synthesis"]["bounds"] == "exact" and report["synthesis"]["lp_solves"] > 0
    assert report["evaluation"]["accuracy"]["forget"]["after"] == 0.0
    inspect = json.loads(runner.invoke(main, ["inspect", str(out), "--json"]).stdout)
    assert inspect["manifest"]["chain"] == report["chain"]

    base = ["certify", "--base", str(mlp_bundle.onnx_path), "--patch", str(first), "--patch", str(out)]
    ds = mlp_bundle.dataset
    np.save(tmp_path / "test.npy", ds.x_test)
    np.save(tmp_path / "forget.npy", ds.x_train[np.r_[forget_ids, 5, 17]])
    cert = runner.invoke(main, base + ["--probe", str(tmp_path / "test.npy"), "--json"])
    assert cert.exit_code == 0, cert.stderr
    doc = json.loads(cert.stdout)
    assert doc["passed"] and [(c["name"], c["status"]) for c in doc["set"]] == [("interference", "pass"), ("probe", "pass")]
    # the forgotten points themselves: every one opens a gate, far above --max-open
    cert = runner.invoke(main, base + ["--probe", str(tmp_path / "forget.npy"), "--max-open", "0.5"])
    assert cert.exit_code == EXIT_VERIFY
    line = _one_line_error(cert)
    assert line.startswith("error: patch set refused (probe)") and "22 of 22" in line
    # the same patch twice is refused as a set
    cert = runner.invoke(main, ["certify", "--base", str(mlp_bundle.onnx_path), "--patch", str(out), "--patch", str(out)])
    assert cert.exit_code == EXIT_VERIFY and "refused (interference)" in _one_line_error(cert)


def test_certify_max_gate_width_refuses_wider_gates(runner, mlp_bundle, patches):
    """A device policy narrower than a patch's widest gate refuses it at the locality check."""
    from prune_edge.runtime import read_patch_file

    patch = patches["collapse"][0]
    widest = read_patch_file(patch).manifest.max_gate_width
    assert 0 < widest <= 1.0
    args = ["certify", "--base", str(mlp_bundle.onnx_path), "--patch", str(patch), "--json"]
    assert runner.invoke(main, args + ["--max-gate-width", str(widest * 1.001)]).exit_code == 0
    result = runner.invoke(main, args + ["--max-gate-width", str(widest * 0.5)])
    assert result.exit_code == EXIT_VERIFY
    checks = {c["name"]: c["status"] for c in json.loads(result.stdout)["patches"][0]["checks"]}
    assert checks["structure"] == "pass" and checks["locality"] == "fail" and checks["certificate"] == "skipped"
    assert "refused (locality)" in _one_line_error(result)


def test_certify_refuses_tampered_file(runner, tmp_path, mlp_bundle, patches):
    patch, _ = patches["prune"]
    data = bytearray(patch.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad = tmp_path / "bad.pepatch"
    bad.write_bytes(bytes(data))
    result = runner.invoke(main, ["certify", "--base", str(mlp_bundle.onnx_path), "--patch", str(bad)])
    assert result.exit_code == EXIT_VERIFY
    assert "FAIL" in result.stdout
    assert _one_line_error(result).startswith("error: ")
    # predict refuses it too: a patch that fails verification is never applied
    np.save(tmp_path / "x.npy", mlp_bundle.dataset.x_test[:2])
    pred = runner.invoke(main, ["predict", "--base", str(mlp_bundle.onnx_path), "--patch", str(bad), "--input", str(tmp_path / "x.npy")])
    assert pred.exit_code == EXIT_VERIFY and pred.stdout == ""


def test_certify_refuses_other_base(runner, tmp_path, mlp_bundle, patches):
    import shutil

    import onnx

    from prune_edge.basedir import write_device_card

    other = tmp_path / "other.onnx"
    model = onnx.load(str(mlp_bundle.onnx_path))
    model.doc_string = "a different file"  # same graph, different bytes
    onnx.save(model, str(other))
    args = ["certify", "--base", str(other), "--patch", str(patches["collapse"][0])]
    # no base card beside it: the device cannot bind anything to it (its own input error, not the patch's)
    result = runner.invoke(main, args)
    assert result.exit_code == EXIT_FAILURE and "base card" in _one_line_error(result)
    # the card of another base (the original's): refused, it is not this graph's card
    shutil.copy(mlp_bundle.onnx_path.with_name("base.card.json"), tmp_path / "other.card.json")
    result = runner.invoke(main, args)
    assert result.exit_code == EXIT_FAILURE and "card is for base sha256" in _one_line_error(result)
    # its own card: the patch is refused at binding
    write_device_card(other, mlp_bundle.dataset.x_train, mlp_bundle.dataset.n_classes)
    result = runner.invoke(main, args)
    assert result.exit_code == EXIT_VERIFY
    assert "binding" in _one_line_error(result)


@pytest.mark.parametrize(
    "array, match",
    [
        pytest.param(np.zeros((2, 1, 28, 28), np.float64), "float32", id="dtype"),
        pytest.param(np.zeros((2, 784), np.float32), "shape", id="shape"),
        pytest.param(np.where(np.arange(1568).reshape(2, 1, 28, 28) < 2, np.nan, 0).astype(np.float32), "found 2 NaN or infinite", id="nan"),
    ],
)
def test_predict_refuses_bad_input(runner, tmp_path, mlp_bundle, array, match):
    np.save(tmp_path / "x.npy", array)
    result = runner.invoke(main, ["predict", "--base", str(mlp_bundle.onnx_path), "--input", str(tmp_path / "x.npy")])
    assert result.exit_code == EXIT_FAILURE
    assert match in _one_line_error(result)


def test_predict_labels_and_logits(runner, tmp_path, mlp_bundle):
    x = mlp_bundle.dataset.x_test[:5]
    np.save(tmp_path / "x.npy", x)
    result = runner.invoke(main, ["predict", "--base", str(mlp_bundle.onnx_path), "--input", str(tmp_path / "x.npy"),
                                  "--logits-out", str(tmp_path / "l.npy")])
    assert result.exit_code == 0
    logits = np.load(tmp_path / "l.npy")
    assert logits.shape == (5, 10)
    assert [int(v) for v in result.stdout.split()] == logits.argmax(1).tolist()


def test_verify_sample(runner, tmp_path, mlp_bundle, patches, forget_ids):
    from prune_edge.runtime import read_patch_file

    patch, _ = patches["prune"]
    records = read_patch_file(patch).manifest.records
    ds = mlp_bundle.dataset
    i = int(forget_ids[0])
    np.save(tmp_path / "s.npy", ds.x_train[i])
    args = ["verify-sample", "--base", str(mlp_bundle.onnx_path), "--patch", str(patch), "--sample", str(tmp_path / "s.npy"), "--json"]
    result = runner.invoke(main, args + ["--label", str(int(ds.y_train[i]))])
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["status"] == "forgotten" and doc["label_differs"] and doc["label"] == int(ds.y_train[i])
    cov = doc["covered_by"]
    assert cov["gate"] == 1.0 and cov["certified"]
    assert doc["patched_prediction"] == cov["target"] == records[cov["record"]].target
    side = ledger_record(patch)
    assert cov["patch_id"] == side["patch_id"] and cov["target"] == side["targets"][str(i)]
    # the table names the covering record and the status
    table = runner.invoke(main, args[:-1] + ["--label", str(int(ds.y_train[i]))])
    assert table.exit_code == 0 and "forgotten" in table.stdout and f"record {cov['record']}" in table.stdout
    # a training point outside every request: no gate is open, the device's answer is the base's
    keep = next(j for j in range(len(ds.x_train)) if j not in set(forget_ids.tolist()))
    np.save(tmp_path / "s.npy", ds.x_train[keep])
    result = runner.invoke(main, args + ["--label", str(int(ds.y_train[keep]))])
    assert result.exit_code == EXIT_FAILURE
    doc = json.loads(result.stdout)
    assert doc["status"] == "not covered" and doc["covered_by"] is None
    assert doc["patched_prediction"] == doc["base_prediction"]
    # a label the model cannot output would always read as forgotten: refused
    result = runner.invoke(main, args + ["--label", str(ds.n_classes)])
    assert result.exit_code == EXIT_FAILURE and "expected a class in [0, 10)" in _one_line_error(result)


def test_inspect(runner, patches, mlp_bundle):
    patch, report = patches["collapse"]
    result = runner.invoke(main, ["inspect", str(patch), "--json"])
    assert result.exit_code == 0
    doc = json.loads(result.stdout)
    assert doc["manifest"]["patch_id"] == report["patch_id"] and doc["manifest"]["mode"] == "collapse"
    assert len(doc["manifest"]["request"]["id_roots"]) == 1 and "ids" not in doc["manifest"]["request"]
    assert doc["manifest"]["chain"] == {"position": 0, "after": [], "replaces": []}
    assert doc["manifest"]["gate"]["step_log2"] == mlp_bundle.graph.card.gate_step_log2
    assert doc["max_gate_width"] == pytest.approx(1 / min(report["gammas"])) and 0 < doc["max_gate_width"] <= 1.0
    with zipfile.ZipFile(patch) as zf:
        assert sorted(zf.namelist()) == ["manifest.json", "patch.onnx"]
    table = runner.invoke(main, ["inspect", str(patch)])
    assert table.exit_code == 0
    assert "max gate width" in table.stdout and f"2^{mlp_bundle.graph.card.gate_step_log2}" in table.stdout
    assert "position 0, after 0 patches" in table.stdout


def test_dataset_export_roundtrip(runner, tmp_path):
    out = tmp_path / "digits.npz"
    result = runner.invoke(main, ["dataset", "export", "digits", "--out", str(out), "--json"])
    assert result.exit_code == 0
    from prune_edge.data import load_dataset

    a, b = load_dataset("digits"), load_dataset(str(out))
    np.testing.assert_array_equal(a.x_train, b.x_train)
    np.testing.assert_array_equal(a.y_test, b.y_test)


def test_dataset_export_bad_name(runner, tmp_path):
    result = runner.invoke(main, ["dataset", "export", "no-such-data", "--out", str(tmp_path / "x.npz")])
    assert result.exit_code == EXIT_FAILURE
    assert _one_line_error(result).startswith("error:")
    assert not (tmp_path / "x.npz").exists()


def test_train_base_cuda_without_gpu_is_usage_error(runner, tmp_path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    result = runner.invoke(main, ["train-base", "--device", "cuda", "--out", str(tmp_path / "b")])
    assert result.exit_code == EXIT_USAGE
    assert not (tmp_path / "b").exists()


def test_train_base_bad_dataset_is_a_failure_not_usage(runner, tmp_path):
    result = runner.invoke(main, ["train-base", "--dataset", str(tmp_path / "missing.npz"), "--out", str(tmp_path / "b")])
    assert result.exit_code == EXIT_FAILURE
    assert _one_line_error(result).startswith("error: ") and "missing.npz" in result.stderr
    assert not (tmp_path / "b").exists()


def test_train_base_from_user_npz(runner, tmp_path):
    """A user's own .npz trains a base and the card says where it came from."""
    assert runner.invoke(main, ["dataset", "export", "digits", "--out", str(tmp_path / "d.npz")]).exit_code == 0
    result = runner.invoke(main, ["train-base", "--dataset", str(tmp_path / "d.npz"), "--epochs", "2",
                                  "--out", str(tmp_path / "b"), "--json"])
    assert result.exit_code == 0, result.stderr
    card = json.loads(result.stdout)
    assert card["dataset"]["source"].endswith("d.npz") and card["input_shape"] == [1, 8, 8]
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["base.card.json", "base.onnx", "card.json", "weights.pt"]


def test_forgetting_every_training_point_reports_no_retain_accuracy(runner, tmp_path):
    """An empty retained set has no accuracy: null in strict JSON and n/a in the table, never NaN."""
    assert runner.invoke(main, ["dataset", "export", "digits", "--out", str(tmp_path / "d.npz")]).exit_code == 0
    base = tmp_path / "b"
    assert runner.invoke(main, ["train-base", "--dataset", str(tmp_path / "d.npz"), "--epochs", "2", "--out", str(base)]).exit_code == 0
    n = json.loads((base / "card.json").read_text())["dataset"]["n_train"]
    (tmp_path / "all.txt").write_text("".join(f"{i}\n" for i in range(n)))
    args = ["build-patch", "--base", str(base), "--forget", str(tmp_path / "all.txt"), "--mode", "collapse"]
    result = runner.invoke(main, args + ["--out", str(tmp_path / "all.pepatch"), "--json"])
    assert result.exit_code == 0, result.stderr

    def no_nan(name):
        raise AssertionError(f"{name} in JSON output")

    acc = json.loads(result.stdout, parse_constant=no_nan)["evaluation"]["accuracy"]
    assert acc["retain"] == {"before": None, "after": None} and acc["forget"]["after"] == 0.0
    result = runner.invoke(main, args + ["--out", str(tmp_path / "all2.pepatch")])
    assert result.exit_code == 0 and "n/a -> n/a" in result.stdout and "nan" not in result.stdout


def test_dataset_export_corrupted_idx_folder(runner, tmp_path):
    """A real-format folder with a wrong magic number: one line naming the file, exit 1, nothing written."""
    import struct

    folder = tmp_path / "mnist"
    folder.mkdir()
    for stem, magic, dims in (("train-images-idx3-ubyte", 0x803, (4, 28, 28)), ("train-labels-idx1-ubyte", 0x801, (4,)),
                              ("t10k-images-idx3-ubyte", 0x803, (2, 28, 28)), ("t10k-labels-idx1-ubyte", 0x801, (2,))):
        header = struct.pack(">I", magic if stem != "t10k-images-idx3-ubyte" else 0x12345678)
        header += b"".join(struct.pack(">I", d) for d in dims)
        (folder / stem).write_bytes(header + bytes(int(np.prod(dims))))
    out = tmp_path / "x.npz"
    result = runner.invoke(main, ["dataset", "export", str(folder), "--out", str(out)])
    assert result.exit_code == EXIT_FAILURE
    line = _one_line_error(result)
    assert "t10k-images-idx3-ubyte" in line and "0x12345678" in line
    assert not out.exists()


def test_demo_runs_the_whole_pipeline(runner, tmp_path):
    out = tmp_path / "demo"
    result = runner.invoke(main, ["demo", "--out", str(out), "--points", "3", "--json"])
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    ev = doc["report"]["evaluation"]
    assert ev["accuracy"]["forget"]["after"] == 0.0 and ev["forget_to_target"] == 3
    assert doc["certify"]["passed"] and [l["batch"] for l in doc["latency"]] == [1, 256]
    assert "forget accuracy" in doc["table"] and (out / "demo.json").exists() and (out / "forget.txt").exists()
