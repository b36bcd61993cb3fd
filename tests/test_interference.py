"""Records never break each other's certificates: a counterexample search over every pair of records.

For every ordered pair (k, j) of the 40 records a device runs (a 20-point prune patch and a 20-point
collapse patch built --after it), an LP finds the point strictly inside record k's region (margin
0.01 on every neuron that can reach it) closest to record j's region: where j's correction would leak
into k's region if it could. Every such point must be predicted as record k's target.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")

from prune_edge.audit import interference_search, summed_semantics  # noqa: E402
from prune_edge.runtime import PatchedModel  # noqa: E402
from prune_edge.runtime.patchgraph import sign_pattern  # noqa: E402
from prune_edge.activations import tapped_forward  # noqa: E402


@pytest.fixture(scope="module")
def search(mlp_bundle, chain):
    model = PatchedModel(mlp_bundle.onnx_path, [chain["first"], chain["second"]])
    return model, interference_search(mlp_bundle.net, model)


def test_every_pair_searched(search, chain):
    model, r = search
    assert r["records"] == model.n_records == 20 + chain["report"]["records"]
    assert r["regions_without_margin_points"] == []
    # every ordered pair with different patterns (interference forbids equal ones across targets)
    assert r["pairs"] == r["records"] * (r["records"] - 1)


def test_points_are_strictly_inside_their_record_region(search, mlp_bundle):
    """The LP's points really are where the search says: the device reads record k's pattern there,
    so its gate is exactly 1 and record k acts."""
    model, r = search
    signs = np.concatenate([vp.params.signs for vp in model.patches])
    zs, _ = tapped_forward(model.base, r["points"], [g.name for g in model.patches[0].manifest.gated])
    z = np.concatenate(zs, axis=1)
    assert np.array_equal(sign_pattern(z), signs[r["k"]])
    cover = model.coverage(r["points"])
    assert (cover.gate == 1.0).all()
    acting = np.array([sum(len(p.manifest.records) for p in model.patches[:pi]) + rec
                       for pi, rec in zip(cover.patch, cover.record)])
    assert np.array_equal(acting, r["k"])


def test_no_pair_breaks_a_certificate(search):
    """The property: inside record k's region the prediction is k's target, whoever else is near."""
    _, r = search
    assert r["device_failures"] == 0


def test_the_search_finds_what_summing_records_would_break(search):
    """Why only one record acts: on the same points, adding every open gate's correction (the earlier
    semantics) moves some predictions off their record's target, so the search is not vacuous."""
    model, r = search
    assert r["summed_failures"] > 0
    summed = summed_semantics(model, r["points"]).argmax(1)
    assert int((summed != r["targets"]).sum()) == r["summed_failures"]
