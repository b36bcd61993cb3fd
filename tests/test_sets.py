"""Set requests: both strategies end with every point certified (or named), measured on the device path."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("torch")

from click.testing import CliRunner  # noqa: E402

from prune_edge.activations import tapped_forward  # noqa: E402
from prune_edge.requests import random_forget_ids, write_forget_ids  # noqa: E402
from prune_edge.runtime import read_patch_file  # noqa: E402
from prune_edge.runtime.errors import PatchFormatError, RequestError  # noqa: E402
from prune_edge.runtime.manifest import Manifest  # noqa: E402
from prune_edge.runtime.model import PatchedModel  # noqa: E402
from prune_edge.runtime.patchgraph import sign_pattern  # noqa: E402
from prune_edge.sets import SetConfig, build_set_patch  # noqa: E402
from prune_edge.synth import SynthConfig  # noqa: E402


def device_regions(bundle, patches, ids):
    """Per point: is it inside the region of the record that acts on it? From an independent onnxruntime
    pass over the base (the device's float32 pattern) and the composed model's own acting record."""
    ds = bundle.dataset
    zs, _ = tapped_forward(bundle.graph, ds.x_train[ids], bundle.activations.relu_inputs)
    own = sign_pattern(np.concatenate(zs, axis=1))
    model = PatchedModel(bundle.onnx_path, patches)
    logits, cover = model.logits_and_coverage(ds.x_train[ids])
    inside = np.zeros(len(ids), bool)
    for i in range(len(ids)):
        if cover.patch[i] < 0:
            continue
        rec = model.patches[cover.patch[i]].params.signs[cover.record[i]]
        inside[i] = cover.gate[i] == 1.0 and np.array_equal(rec, own[i, own.shape[1] - len(rec):])
    return inside, logits.argmax(1)


# prune requests stay small (their dual bounds are the cost); collapse shows the loop on more points
@pytest.mark.parametrize("strategy, mode, n", [("points", "prune", 8), ("representatives", "prune", 8),
                                               ("representatives", "collapse", 30)])
def test_every_point_ends_certified(tmp_path, mlp_bundle, strategy, mode, n):
    ds = mlp_bundle.dataset
    ids = random_forget_ids(len(ds.x_train), n, seed=21)
    path = tmp_path / f"{strategy}.pepatch"
    sets = SetConfig(strategy=strategy, cluster_size=3)
    report = build_set_patch(mlp_bundle, ids, SynthConfig(mode=mode, seed=0), path, sets, device="cpu", progress=False,
                             ledger=tmp_path / "ledger")
    inside, pred = device_regions(mlp_bundle, [path], ids)
    assert inside.all() and report["uncertified_ids"] == []
    assert (pred != ds.y_train[ids]).all()  # forgotten: every point moved off its label
    m = read_patch_file(path).manifest
    assert m.request["strategy"] == strategy and m.request["n_points"] == len(ids)
    # records = distinct patterns of the request (regions never merge distinct patterns)
    patterns = {r.tobytes() for r in mlp_bundle.activations.view(0).signs(ids)}
    assert len(m.records) == len(patterns)
    if strategy == "representatives":
        rounds = report["synthesis"]["rounds"]
        assert rounds and rounds[0]["representatives"] == int(np.ceil(n / 3)) and rounds[0]["uncertified_before"] == n
        # a round certifies the points its representatives' regions hold, never a point outside them
        assert all(r["certified"] >= r["records"] for r in rounds)
    # locality on the test set: whatever a gate touches is counted, nothing else changes
    loc = report["evaluation"]["locality"]["test"]
    assert loc["unchanged"] >= loc["points"] - loc["gate_touched"]


def test_budget_names_the_points_left(tmp_path, mlp_bundle):
    ds = mlp_bundle.dataset
    ids = random_forget_ids(len(ds.x_train), 12, seed=22)
    path = tmp_path / "partial.pepatch"
    with pytest.raises(RequestError, match=r"7 of 12 points left uncertified within the budget of 5 records"):
        build_set_patch(mlp_bundle, ids, SynthConfig(mode="collapse"), path, SetConfig(budget=5), device="cpu",
                        progress=False, ledger=tmp_path / "ledger")
    assert not path.exists()
    report = build_set_patch(mlp_bundle, ids, SynthConfig(mode="collapse"), path, SetConfig(budget=5, allow_partial=True),
                             device="cpu", progress=False, ledger=tmp_path / "ledger")
    left = report["uncertified_ids"]
    assert len(left) == 7 and report["records"] == 5
    inside, _ = device_regions(mlp_bundle, [path], ids)
    # the ids reported are exactly the points outside every record's region
    assert sorted(int(i) for i in ids[~inside]) == sorted(left)


def test_cli_strategy_budget_and_partial(tmp_path, mlp_base):
    from prune_edge.cli import main

    ids = np.array([5, 50, 500, 1500, 2500, 3500])
    forget = tmp_path / "ids.txt"
    write_forget_ids(forget, ids)
    out = tmp_path / "p.pepatch"
    args = ["build-patch", "--base", str(mlp_base), "--forget", str(forget), "--mode", "collapse", "--out", str(out),
            "--ledger", str(tmp_path / "ledger")]
    runner = CliRunner()
    r = runner.invoke(main, [*args, "--budget", "2"])
    assert r.exit_code == 1 and "4 of 6 points left uncertified" in r.output and "Traceback" not in r.output
    assert not out.exists()
    r = runner.invoke(main, [*args, "--budget", "2", "--allow-partial", "--strategy", "representatives", "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert doc["strategy"] == "representatives" and len(doc["uncertified_ids"]) == 4
    assert read_patch_file(out).manifest.request["strategy"] == "representatives"
    r = runner.invoke(main, [*args[:-4], "--forget-class", "3", "--out", str(out)])
    assert r.exit_code == 2 and "exactly one of --forget" in r.output


def test_manifest_refuses_unknown_strategy(patches):
    doc = json.loads(json.dumps(read_patch_file(patches["collapse"][0]).manifest.to_json()))
    doc["request"]["strategy"] = "clusters"
    with pytest.raises(PatchFormatError, match=r"request\.strategy: expected one of"):
        Manifest.from_json(doc)


def test_synthesis_calls_follow_the_chunk(tmp_path, mlp_bundle):
    """By default an MLP's factored prune bounds take CHUNK_FACTORED points per synthesis call and other
    builds CHUNK_GENERIC; a given chunk splits the request into calls, each built after the records of
    the calls before it. Every point ends inside its record's region on the device path either way."""
    from prune_edge.sets import CHUNK_FACTORED, CHUNK_GENERIC

    ds = mlp_bundle.dataset
    n = 40
    assert CHUNK_GENERIC < n <= CHUNK_FACTORED
    ids = random_forget_ids(len(ds.x_train), n, seed=22)
    for mode, chunk, calls in (("prune", None, 1), ("prune", 16, 3), ("collapse", None, 2)):
        path = tmp_path / f"{mode}-{chunk}.pepatch"
        report = build_set_patch(mlp_bundle, ids, SynthConfig(mode=mode, seed=0), path, SetConfig(chunk=chunk),
                                 device="cpu", progress=False, evaluate=False, ledger=tmp_path / "ledger")
        syn = report["synthesis"]
        assert syn["synthesis_calls"] == calls and syn["certified"] == n and not report["uncertified_ids"], (mode, chunk)
        inside, _ = device_regions(mlp_bundle, [path], ids)
        assert inside.all()
    with pytest.raises(ValueError, match="chunk: expected at least 1 point per synthesis call, found 0"):
        SetConfig(chunk=0)
