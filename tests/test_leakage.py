"""What a patch reveals about the points it forgets (THREAT_MODEL.md, leakage), measured on the real
20-point patch: the membership oracle it is by design, and the LP reconstruction from its region."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("scipy")

from prune_edge.delivery.leakage import measure_leakage  # noqa: E402

RECORDS = 2  # LPs in 784 dimensions: about a second each


@pytest.fixture(scope="module")
def leak(mlp_bundle, patches, forget_ids) -> dict:
    return measure_leakage(mlp_bundle, patches["prune"][0], forget_ids, max_records=RECORDS)


def test_patch_is_a_membership_oracle_for_its_request(leak, forget_ids):
    """Run over the whole training set, the patch covers the requested points and no other: anyone
    holding a candidate learns whether it was forgotten (what verify-sample is for)."""
    m = leak["membership"]
    assert m["requested"] == len(forget_ids)
    assert m["precision"] == 1.0 and m["recall"] == 1.0


def test_lp_reconstruction_lands_in_the_region_the_device_gates(leak, mlp_bundle):
    """The attacker's LP point is in the record's region as the device reads it (its gate opens
    there), so the distances reported are those of a point the patch really gives away."""
    rows = leak["records"]
    assert len(rows) == RECORDS and all(r["found"] for r in rows)
    assert all(r["device_gate_open"] for r in rows)
    for r in rows:
        assert np.isfinite([r["lp_distance"], r["nn_distance"], r["mean_distance"]]).all()
        assert 0 <= r["rank_of_forgotten_point"] < len(mlp_bundle.dataset.x_train)
