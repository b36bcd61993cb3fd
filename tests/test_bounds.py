"""Batched Lagrangian-dual LP bounds (prune_edge.bounds) against the exact HiGHS bounds on real regions of
the default base, in input and feature space: always sound, close, deterministic."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import prune_edge.bounds as bounds  # noqa: E402
from prune_edge.bounds import dual_lower_bounds  # noqa: E402
from prune_edge.regions import compute_regions, region_lp  # noqa: E402
from prune_edge.runtime.patchgraph import spec_rows  # noqa: E402

SOUND_TOL = 1e-9


def rel_gap(exact: np.ndarray, dual: np.ndarray) -> np.ndarray:
    return (exact - dual) / np.maximum(1.0, np.abs(exact))


def region_batch(bundle, start: int, n: int, seed: int) -> dict:
    """Stacked LPs of n real regions: both sides of every specification row (min of P f and of -P f, as
    prune needs), with HiGHS' certified bounds as the reference."""
    ds = bundle.dataset
    ids = np.random.default_rng(seed).choice(len(ds.x_train), n, replace=False)
    regions = compute_regions(bundle.net, ds.x_train[ids], start)
    a, b, c, exact = [], [], [], []
    for i, idx in enumerate(ids):
        lp = region_lp(regions, i)
        obj = spec_rows(int(ds.y_train[idx]), lp.jac_f.shape[0]) @ lp.jac_f
        obj = np.concatenate([obj, -obj])
        a.append(lp.a_ub)
        b.append(lp.b_ub)
        c.append(obj)
        exact.append([lp._minimise(o) for o in obj])
    lo, hi = regions.lower, regions.upper
    return dict(A=np.stack(a), bvec=np.stack(b), c=np.stack(c), exact=np.array(exact), lo=lo, hi=hi)


@pytest.fixture(scope="module")
def input_lps(mlp_bundle) -> dict:
    return region_batch(mlp_bundle, start=0, n=4, seed=1)


@pytest.fixture(scope="module")
def feature_lps(mlp_bundle) -> dict:
    return region_batch(mlp_bundle, start=1, n=2, seed=2)


def solve(lps: dict, **kw) -> np.ndarray:
    return dual_lower_bounds(lps["A"], lps["bvec"], lps["lo"], lps["hi"], lps["c"], **kw)


@pytest.mark.parametrize("space", ["input_lps", "feature_lps"])
def test_sound_and_close_to_highs(space, request):
    lps = request.getfixturevalue(space)
    dual = solve(lps)
    assert dual.shape == lps["exact"].shape and dual.dtype == np.float64
    assert np.all(dual <= lps["exact"] + SOUND_TOL), (dual - lps["exact"]).max()
    gap = rel_gap(lps["exact"], dual)
    assert np.median(gap) <= 0.01, np.median(gap)
    # The min side of each row (columns :9) converges fastest; the max side (fed as -c) has ~2x the
    # active constraints and a slower tail, hence only the median above for it.
    assert gap[:, :9].max() <= 0.02, gap[:, :9].max()
    # Far tighter than the box alone, which ignores every region constraint.
    box = solve(lps, steps=0)
    assert np.all(box <= dual) and np.median(rel_gap(lps["exact"], box)) > 10 * np.median(gap)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_both_compute_dtypes_sound(input_lps, monkeypatch, dtype):
    """float32 (CUDA, CPUs without native bf16) and bfloat16 products: sound and close either way."""
    monkeypatch.setattr(bounds, "COMPUTE_DTYPE", dtype)
    dual = solve(input_lps, steps=150)
    assert np.all(dual <= input_lps["exact"] + SOUND_TOL)
    assert np.median(rel_gap(input_lps["exact"], dual)) <= 0.01


def test_sound_whatever_the_multipliers(feature_lps):
    """The certificate is weak duality evaluated in float64: multipliers near the optimum (where a
    slip would show) or wild ones give a bound <= the exact one, never above it. This is what makes
    the optimiser's float32/bf16 shortcuts harmless."""
    a, b, c, lo, hi = (torch.from_numpy(feature_lps[k]) for k in ("A", "bvec", "c", "lo", "hi"))
    n = len(a)
    lo, hi = lo.expand(n, -1).contiguous(), hi.expand(n, -1).contiguous()
    row_l1 = a.abs() @ torch.maximum(lo.abs(), hi.abs())[:, :, None]
    s = bounds._scaled(a, b, c, lo, hi)
    good = bounds._ascend(s, 200)[0].double() * s.row_scale.double() * s.obj_scale[:, :, None]
    rng = np.random.default_rng(0)
    candidates = [good]
    for spread in (1e-3, 0.1, 1.0):  # multiplicative jitter, and extra weight on random rows
        candidates.append(good * torch.from_numpy(rng.uniform(1 - spread, 1 + spread, good.shape)))
        extra = rng.exponential(spread, good.shape) * (rng.random(good.shape) < 0.1)
        candidates.append(good + torch.from_numpy(extra))
    for mu in candidates:
        got = bounds._certify(mu, a, b, c, lo, hi, row_l1[:, :, 0]).numpy()
        assert np.all(got <= feature_lps["exact"] + SOUND_TOL), (got - feature_lps["exact"]).max()


def test_hand_made_lp():
    """min -x - 2y on [0, 1]^2 with x + y <= 1: optimum -2 at (0, 1) (dual mu = 2); and its maximum
    side, min x + 2y = 0 at the origin (mu = 0). Also with a per-region box, which moves the optimum."""
    a = np.array([[[1.0, 1.0]], [[1.0, 1.0]]])
    b = np.array([[1.0], [1.0]])
    c = np.array([[[-1.0, -2.0], [1.0, 2.0]]] * 2)
    got = dual_lower_bounds(a, b, np.zeros(2), np.ones(2), c)
    want = np.array([[-2.0, 0.0]] * 2)
    assert np.all(got <= want) and np.all(got >= want - 1e-3), got
    # Region 1 in [0.5, 2] x [0, 0.4]: min -x - 2y with x + y <= 1 -> x = 0.6, y = 0.4: -1.4.
    lo = np.array([[0.0, 0.0], [0.5, 0.0]])
    hi = np.array([[1.0, 1.0], [2.0, 0.4]])
    got = dual_lower_bounds(a, b, lo, hi, c)
    want = np.array([[-2.0, 0.0], [-1.4, 0.5]])
    assert np.all(got <= want) and np.all(got >= want - 1e-3), got


def test_deterministic(feature_lps):
    first = solve(feature_lps, steps=60)
    second = solve(feature_lps, steps=60)
    assert np.array_equal(first, second)


def test_degenerate_inputs():
    a = np.zeros((1, 2, 3))  # rows of norm 0: mu stays 0, the box bound remains
    c = np.array([[[1.0, -1.0, 0.0]]])
    got = dual_lower_bounds(a, np.zeros((1, 2)), np.zeros(3), np.ones(3), c, steps=5)
    assert got.shape == (1, 1) and -1.0 - 1e-9 <= got[0, 0] <= -1.0
    with pytest.raises(ValueError):
        dual_lower_bounds(a, np.zeros((1, 2)), np.zeros(3), np.full(3, np.inf), c)
    with pytest.raises(ValueError):
        dual_lower_bounds(a, np.zeros((1, 3)), np.zeros(3), np.ones(3), c)


def test_best_tracked_late_loses_nothing(input_lps, monkeypatch):
    """The ascent compares the dual only at mu = 0 and over the last (1 - TRACK_FROM) of its steps: on real
    regions (both sides of every row) the bounds equal those of tracking every step, and stay sound."""
    assert 0 < bounds.TRACK_FROM < 1
    late = solve(input_lps, steps=120)
    monkeypatch.setattr(bounds, "TRACK_FROM", 0.0)
    every = solve(input_lps, steps=120)
    assert np.all(late <= input_lps["exact"] + SOUND_TOL)
    assert np.all(late >= every - 1e-9 * np.maximum(1.0, np.abs(every))), (every - late).max()


def test_bounds_never_import_dynamo(tmp_path):
    """A build's dual bounds run in every ``prune-edge build-patch`` process: nothing on that path may pull
    in ``torch._dynamo`` (any torch optimizer does when first built: 1.3 s per process on a 2-core machine,
    as long as a 200-point build). Checked in a fresh interpreter, where nothing has imported it yet."""
    code = (
        "import sys\n"
        "import numpy as np\n"
        "from prune_edge.bounds import dual_lower_bounds\n"
        "rng = np.random.default_rng(0)\n"
        "A, b, c = rng.normal(size=(3, 8, 12)), rng.uniform(1, 2, size=(3, 8)), rng.normal(size=(3, 2, 12))\n"
        "out = dual_lower_bounds(A, b, -np.ones(12), np.ones(12), c, steps=20)\n"
        "assert out.shape == (3, 2) and np.isfinite(out).all()\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "False"
