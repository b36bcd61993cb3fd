"""A non-Python device's path: `export-sessions` then two plain onnxruntime sessions (the example
in examples/two_sessions.py, run as a program) give the composed model's logits exactly."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from click.testing import CliRunner

from prune_edge.cli import EXIT_VERIFY, main
from prune_edge.runtime import PatchedModel

ROOT = Path(__file__).resolve().parents[1]


def test_two_sessions_equal_the_composed_chain(tmp_path, mlp_bundle, chain, forget_ids, second_ids):
    base = str(mlp_bundle.onnx_path)
    patches = [str(chain["first"]), str(chain["second"])]
    result = CliRunner().invoke(main, ["export-sessions", "--base", base, "--patch", patches[0], "--patch", patches[1],
                                       "--out", str(tmp_path / "dev"), "--json"])
    assert result.exit_code == 0, result.output
    io = json.loads(result.stdout)
    assert io == json.loads((tmp_path / "dev" / "io.json").read_text())
    ds = mlp_bundle.dataset
    keep = np.setdiff1d(np.arange(len(ds.x_train)), np.concatenate([forget_ids, second_ids]))[:300]
    x = np.concatenate([ds.x_train[forget_ids], ds.x_train[second_ids], ds.x_train[keep], ds.x_test[:300]])
    np.save(tmp_path / "x.npy", x)

    sys.path.insert(0, str(ROOT / "examples"))
    try:
        from two_sessions import patched_logits
    finally:
        sys.path.pop(0)
    split = patched_logits(tmp_path / "dev", x)
    model = PatchedModel(base, patches)
    np.testing.assert_array_equal(split, model.logits(x))  # same graph pieces, same float32 values
    base_logits = model.base_logits(x)
    closed = ~model.coverage(x).covered
    assert closed.sum() >= 550 and np.array_equal(split[closed], base_logits[closed])  # bit for bit where no gate opens
    n = len(forget_ids) + len(second_ids)
    assert (split[:n].argmax(1) != ds.y_train[np.concatenate([forget_ids, second_ids])]).all()

    run = subprocess.run([sys.executable, str(ROOT / "examples" / "two_sessions.py"), str(tmp_path / "dev"),
                          str(tmp_path / "x.npy")], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["labels"] == split.argmax(1).tolist()


def test_export_sessions_refuses_a_tampered_patch(tmp_path, mlp_bundle, patches):
    """Only verified patches are split: a damaged file exits 3 and writes nothing."""
    bad = tmp_path / "bad.pepatch"
    data = bytearray(Path(patches["prune"][0]).read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad.write_bytes(bytes(data))
    result = CliRunner().invoke(main, ["export-sessions", "--base", str(mlp_bundle.onnx_path), "--patch", str(bad),
                                       "--out", str(tmp_path / "dev")])
    assert result.exit_code == EXIT_VERIFY
    assert not (tmp_path / "dev").exists()


def test_composition_in_the_product_form_gives_the_same_outputs(mlp_bundle, chain, forget_ids, second_ids):
    """A device may compose the patch file's product form instead of the lookup (``screen=False``, for inputs
    that come one at a time): on the chain's forget points, retained points and test images the logits and
    the gate are the lookup model's bit for bit, and the acting record wherever a gate is open; only the
    lookup has the data-dependent stage, only the product form a product over every record."""
    base = str(mlp_bundle.onnx_path)
    patches = [str(chain["first"]), str(chain["second"])]
    screened = PatchedModel(base, patches)
    direct = PatchedModel(base, screened.patches, screen=False)
    ops = lambda m: [n.op_type for n in m.model.graph.node]  # noqa: E731
    assert ops(screened).count("NonZero") == 1 and "NonZero" not in ops(direct)
    assert "MatMulInteger" not in ops(screened) and ops(direct).count("MatMulInteger") == 1
    ds = mlp_bundle.dataset
    x = np.concatenate([ds.x_train[forget_ids], ds.x_train[second_ids], ds.x_train[:500], ds.x_test[:500]])
    a, ca = screened.logits_and_coverage(x)
    b, cb = direct.logits_and_coverage(x)
    assert a.tobytes() == b.tobytes()
    np.testing.assert_array_equal(ca.gate, cb.gate)
    np.testing.assert_array_equal(ca.record, cb.record)  # -1 where the gate is closed
    assert (ca.gate[: len(forget_ids) + len(second_ids)] == 1).all()
    for i in (0, len(forget_ids), len(x) - 1):  # one input at a time too
        assert screened.logits(x[i : i + 1]).tobytes() == direct.logits(x[i : i + 1]).tobytes() == a[i : i + 1].tobytes()
