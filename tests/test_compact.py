"""Streams of requests built --after each other, and `compact` merging the chain into one file."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("torch")

from click.testing import CliRunner  # noqa: E402

from prune_edge.requests import random_forget_ids  # noqa: E402
from prune_edge.runtime import read_patch_file  # noqa: E402
from prune_edge.runtime.model import PatchedModel  # noqa: E402
from prune_edge.sets import SetConfig, build_set_patch  # noqa: E402
from prune_edge.synth import SynthConfig  # noqa: E402

from test_sets import device_regions  # noqa: E402

REQUESTS, EACH = 5, 4


@pytest.fixture(scope="module")
def stream(tmp_path_factory, mlp_bundle):
    """Five requests of four points, each built --after the ones before it (collapse: no LP, fast)."""
    out = tmp_path_factory.mktemp("stream")
    ids = random_forget_ids(len(mlp_bundle.dataset.x_train), REQUESTS * EACH, seed=31)
    paths, held = [], []
    for i in range(REQUESTS):
        path = out / f"s{i}.pepatch"
        build_set_patch(mlp_bundle, ids[i * EACH:(i + 1) * EACH], SynthConfig(mode="collapse", seed=i), path,
                        SetConfig(), device="cpu", progress=False, evaluate=False, after=paths, ledger=out / "ledger")
        paths.append(path)
        inside, pred = device_regions(mlp_bundle, paths, ids[: (i + 1) * EACH])
        held.append((inside, pred))
    return {"dir": out, "ids": ids, "paths": paths, "held": held}


def test_stream_keeps_every_earlier_request_forgotten(stream, mlp_bundle):
    y = mlp_bundle.dataset.y_train[stream["ids"]]
    for i, (inside, pred) in enumerate(stream["held"]):
        n = (i + 1) * EACH
        assert inside.all() and (pred != y[:n]).all(), f"after request {i + 1}"
    for i, p in enumerate(stream["paths"]):
        chain = read_patch_file(p).manifest.chain
        assert chain["position"] == i and len(chain["after"]) == i


def test_request_for_forgotten_points_is_answered_from_the_chain(stream, mlp_bundle, tmp_path):
    out = tmp_path / "again.pepatch"
    report = build_set_patch(mlp_bundle, stream["ids"][:6], SynthConfig(mode="collapse"), out, SetConfig(), device="cpu",
                             progress=False, after=stream["paths"], ledger=tmp_path / "ledger")
    assert report["patch"] is None and not out.exists()
    answered = report["answered_from_chain"]
    assert sorted(answered) == sorted(int(i) for i in stream["ids"][:6])
    assert {a["patch"] for a in answered.values()} <= {p.name for p in stream["paths"]} | {str(p) for p in stream["paths"]}


def test_compact_equals_the_chain_and_certifies(stream, mlp_bundle, tmp_path):
    from prune_edge.cli import main

    ds = mlp_bundle.dataset
    out = tmp_path / "merged.pepatch"
    base = str(mlp_bundle.onnx_path)
    runner = CliRunner()
    r = runner.invoke(main, ["compact", *map(str, stream["paths"]), "--base", base, "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    m = read_patch_file(out).manifest
    ids = [read_patch_file(p).manifest.patch_id for p in stream["paths"]]
    assert m.chain["replaces"] == ids == json.loads(r.output)["replaces"] and m.chain["after"] == []
    assert m.request["n_points"] == REQUESTS * EACH and m.request["id_roots"] == [
        r for p in stream["paths"] for r in read_patch_file(p).manifest.request["id_roots"]] and len(m.request["id_roots"]) == REQUESTS
    chain, merged = PatchedModel(base, stream["paths"]), PatchedModel(base, [out])
    assert merged.n_records == chain.n_records
    for x in (ds.x_train, ds.x_test):
        assert np.abs(merged.logits(x) - chain.logits(x)).max() <= 1e-5
    r = runner.invoke(main, ["certify", "--base", base, "--patch", str(out)])
    assert r.exit_code == 0, r.output
    inside, _ = device_regions(mlp_bundle, [out], stream["ids"])
    assert inside.all()
    # the merged file serves as --after for the next request: its points are answered from it
    report = build_set_patch(mlp_bundle, stream["ids"][:3], SynthConfig(mode="collapse"), tmp_path / "n.pepatch",
                             SetConfig(), device="cpu", progress=False, after=[out], ledger=tmp_path / "ledger")
    assert report["patch"] is None and len(report["answered_from_chain"]) == 3


def test_compact_refuses_patches_that_cannot_share_a_file(chain, mlp_bundle, tmp_path):
    from prune_edge.cli import main

    out = tmp_path / "mixed.pepatch"
    base = str(mlp_bundle.onnx_path)
    # a valid chain (prune, then collapse --after it) whose records cannot share one manifest mode
    r = CliRunner().invoke(main, ["compact", str(chain["first"]), str(chain["second"]), "--base", base, "--out", str(out)])
    assert r.exit_code == 1 and "expected patches with one mode" in r.output and not out.exists()
    r = CliRunner().invoke(main, ["compact", str(chain["first"]), "--base", base, "--out", str(out)])
    assert r.exit_code == 1 and "at least two patches" in r.output and not out.exists()
