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
    r = CliRunner().invoke(main, ["build-patch", "--base", str(mlp_base), "--forget-class", "3", "--mode", "collapse",
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
