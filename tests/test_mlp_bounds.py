"""Dual bounds through an MLP's shared weights (prune_edge.mlp_bounds) against the materialised regions of
prune_edge.regions: the same LP and the same products, and bounds never above the exact HiGHS optimum, on
real regions of the default base (input and feature space) and on a deeper random MLP."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import prune_edge.bounds as bounds  # noqa: E402
import prune_edge.mlp_bounds as mb  # noqa: E402
from prune_edge.models.nets import mlp  # noqa: E402
from prune_edge.regions import compute_regions, region_lp  # noqa: E402
from prune_edge.runtime.patchgraph import spec_rows  # noqa: E402

SOUND_TOL = 1e-9


def both_forms(net, x: np.ndarray, start: int):
    """(materialised regions, factored regions) of the same points with the same signs."""
    g = compute_regions(net, x, start)
    return g, mb.mlp_regions(net, x, start, g.signs)


def stacked_lp(g):
    lps = [region_lp(g, b) for b in range(len(g.h))]
    return lps, np.stack([lp.a_ub for lp in lps]), np.stack([lp.b_ub for lp in lps])


@pytest.fixture(scope="module")
def deep_net():
    """An untrained 3-hidden-layer MLP (random weights): a chain of three masked layers."""
    torch.manual_seed(3)
    return mlp((24,), 5, hidden=(20, 16, 12)).double()


@pytest.mark.parametrize("start", [0, 1])
def test_factored_regions_are_the_materialised_ones(mlp_bundle, start):
    ds = mlp_bundle.dataset
    ids = np.random.default_rng(start).choice(len(ds.x_train), 5, replace=False)
    g, m = both_forms(mlp_bundle.net, ds.x_train[ids], start)
    jz, jf = m.jacobians()
    scale = float(g.jac_z.abs().max())
    assert torch.allclose(jz, g.jac_z, rtol=0, atol=1e-12 * scale)
    assert torch.allclose(jf, g.jac_f, rtol=0, atol=1e-12 * float(g.jac_f.abs().max()))
    assert torch.allclose(m.off_z, g.off_z, rtol=0, atol=1e-10) and torch.allclose(m.off_f, g.off_f, rtol=0, atol=1e-10)
    assert np.array_equal(m.lower, g.lower) and np.array_equal(m.upper, g.upper)
    specs = np.stack([spec_rows(int(y), 10) for y in ds.y_train[ids]])
    c, const = m.objectives(specs)
    assert np.allclose(c, np.einsum("bkc,bcd->bkd", specs, g.jac_f.numpy()), rtol=0, atol=1e-12)
    assert np.allclose(const, np.einsum("bkc,bc->bk", specs, g.off_f.numpy()), rtol=0, atol=1e-10)


@pytest.mark.parametrize("which", ["default-input", "default-feature", "deep"])
def test_products_equal_the_materialised_ones(mlp_bundle, deep_net, which):
    """A^T mu and A u through the chain equal the products with A itself (float64, 1e-9 relative), and
    the float32 products of a step agree to float32 accuracy."""
    rng = np.random.default_rng(7)
    if which == "deep":
        net, x, start = deep_net, rng.random((6, 24)), 1
    else:
        ds = mlp_bundle.dataset
        net, start = mlp_bundle.net, 0 if which == "default-input" else 1
        x = ds.x_train[rng.choice(len(ds.x_train), 4, replace=False)]
    g, m = both_forms(net, x, start)
    _, a, _ = stacked_lp(g)
    a = torch.from_numpy(a)
    bsz, rows, d = a.shape
    s = torch.from_numpy(m.signs.astype(np.float64))[:, None, :]
    mu = torch.from_numpy(rng.exponential(1.0, (bsz, 3, rows)))
    c = torch.from_numpy(rng.normal(size=(bsz, 3, d)))
    want = torch.baddbmm(c, mu, a)
    got = mb.backward_chain(m.hidden, m.masks, mb._split(-s * mu, m.sizes), c)
    assert float((got - want).abs().max()) <= 1e-9 * float(want.abs().max())
    u = torch.from_numpy(rng.random((bsz, 3, d)))
    want_rows = torch.bmm(u, a.transpose(1, 2))
    got_rows = -s * mb.forward_chain(m.hidden, m.masks, u)
    assert float((got_rows - want_rows).abs().max()) <= 1e-9 * float(want_rows.abs().max())
    ops = mb._ChainProducts(m, torch.float32, 3)  # J = -s A: the step's products, float32
    j32 = (-s.transpose(1, 2) * a).float()
    nu = mu.float()
    assert torch.allclose(ops.cols(nu, c.float()), torch.baddbmm(c.float(), nu, j32), rtol=1e-4, atol=1e-4)
    assert torch.allclose(ops.rows(u.float()), torch.bmm(u.float(), j32.transpose(1, 2)), rtol=1e-4, atol=1e-4)


def test_row_norms_and_negligible_rows(deep_net):
    """Row norms (float32 Gram estimate, float64 where small) equal the materialised rows' float64 norms,
    also for a deep row scaled down to ~1e-13 of the others, which the negligible-row rule must drop."""
    net = mlp((24,), 5, hidden=(20, 16, 12)).double()
    net.load_state_dict(deep_net.state_dict())
    with torch.no_grad():
        net.layers[2].weight[3] *= 1e-13  # row 3 of the third gated layer: |J row| ~ 1e-13 |others|
    x = np.random.default_rng(0).random((8, 24))
    g, m = both_forms(net, x, 0)
    width = torch.from_numpy(g.upper - g.lower)
    want = g.jac_z.mul(width).norm(dim=2)
    got = mb.row_norms(m, width)
    assert torch.allclose(got, want, rtol=1e-5, atol=0)
    tiny = 20 + 16 + 3
    assert torch.allclose(got[:, tiny], want[:, tiny], rtol=1e-9, atol=0)  # recomputed in float64
    live = got > bounds.NEGLIGIBLE * got.amax(dim=1, keepdim=True)
    assert not live[:, tiny].any() and live.sum() == live.numel() - len(x)


def exact_and_chain(net, x, start, objectives, steps):
    g, m = both_forms(net, x, start)
    lps, a, b = stacked_lp(g)
    exact = np.array([[lp._minimise(o) for o in objectives[i]] for i, lp in enumerate(lps)])
    chain = mb.chain_dual_lower_bounds(m, objectives, steps=steps)
    generic = bounds.dual_lower_bounds(a, b, g.lower, g.upper, objectives, steps=steps)
    return exact, chain, generic, m


def rel_gap(exact, dual):
    return (exact - dual) / np.maximum(1.0, np.abs(exact))


@pytest.mark.parametrize("start,n", [(0, 6), (1, 5)])
def test_never_above_the_exact_lp(mlp_bundle, start, n):
    """Counterexample search: many real regions, both sides of every specification row plus random
    directions, input and feature space; and multipliers jittered around the optimiser's, certified."""
    ds = mlp_bundle.dataset
    rng = np.random.default_rng(10 + start)
    ids = rng.choice(len(ds.x_train), n, replace=False)
    g0 = compute_regions(mlp_bundle.net, ds.x_train[ids], start)
    specs = np.stack([spec_rows(int(t), 10) for t in rng.integers(0, 10, n)])
    obj = np.einsum("bkc,bcd->bkd", specs, g0.jac_f.numpy())
    rand = rng.normal(size=(n, 2, obj.shape[2])) * np.abs(obj).mean()
    objectives = np.concatenate([obj, -obj, rand], axis=1)
    exact, chain, generic, m = exact_and_chain(mlp_bundle.net, ds.x_train[ids], start, objectives, steps=120)
    assert np.all(chain <= exact + SOUND_TOL), (chain - exact).max()
    gap, gap_generic = rel_gap(exact, chain), rel_gap(exact, generic)
    # as tight as the materialised path (same schedule; only the products' rounding differs)
    assert np.median(gap) <= max(0.01, 2 * np.median(gap_generic)), (np.median(gap), np.median(gap_generic))
    box = mb.chain_dual_lower_bounds(m, objectives, steps=0)
    assert np.all(box <= chain) and np.median(rel_gap(exact, box)) > 10 * np.median(gap)
    # any multipliers certify: jitter the optimiser's and add weight on random rows
    c64 = torch.from_numpy(objectives)
    lo, hi = torch.from_numpy(m.lower), torch.from_numpy(m.upper)
    s = mb._scaled(m, c64, lo, hi)
    mu = bounds._ascend(s, 60)[0].double() * s.row_scale.double() * s.obj_scale[:, :, None]
    for spread in (1e-3, 0.1, 1.0):
        jitter = mu * torch.from_numpy(rng.uniform(1 - spread, 1 + spread, mu.shape))
        extra = mu + torch.from_numpy(rng.exponential(spread, mu.shape) * (rng.random(mu.shape) < 0.1))
        for cand in (jitter, extra):
            got = mb._certify(cand, m, c64, lo, hi).numpy()
            assert np.all(got <= exact + SOUND_TOL), (got - exact).max()


def test_deep_mlp_never_above_the_exact_lp(deep_net, monkeypatch):
    """Three masked layers (the chain's loops run more than once), input and feature space. float32
    products: bfloat16 ones on these tiny layers are slow on CPU (the default MLP tests cover them)."""
    monkeypatch.setattr(bounds, "COMPUTE_DTYPE", torch.float32)
    rng = np.random.default_rng(4)
    x = rng.random((8, 24))
    for start in (0, 1, 2):
        g = compute_regions(deep_net, x, start)
        obj = np.einsum("kc,bcd->bkd", spec_rows(2, 5), g.jac_f.numpy())
        objectives = np.concatenate([obj, -obj, rng.normal(size=(8, 2, obj.shape[2]))], axis=1)
        exact, chain, generic, _ = exact_and_chain(deep_net, x, start, objectives, steps=120)
        assert np.all(chain <= exact + SOUND_TOL), (start, (chain - exact).max())
        assert np.median(rel_gap(exact, chain)) <= 0.01, (start, np.median(rel_gap(exact, chain)))


def test_deterministic_and_checked(mlp_bundle):
    ds = mlp_bundle.dataset
    x = ds.x_train[:3]
    g, m = both_forms(mlp_bundle.net, x, 0)
    c = np.random.default_rng(0).normal(size=(3, 2, 784))
    assert np.array_equal(mb.chain_dual_lower_bounds(m, c, steps=40), mb.chain_dual_lower_bounds(m, c, steps=40))
    with pytest.raises(ValueError, match="expected shape"):
        mb.chain_dual_lower_bounds(m, c[:, :, :10], steps=5)
    with pytest.raises(ValueError, match="signs: expected shape"):
        mb.mlp_regions(mlp_bundle.net, x, 0, g.signs[:, :10])


@pytest.mark.parametrize("start", [0, 1])
def test_unseen_variables_left_out_of_the_ascent_only(mlp_bundle, monkeypatch, start):
    """The ascent skips LP variables no constraint sees (pixels never lit in training, whose first-layer
    weights decayed to ~0; in feature space, features of zero width). Counterexample search on the
    bounds it returns: objectives that load those variables heavily (their box term is then most of
    the optimum, and only the float64 certificate accounts for it), both directions, against HiGHS;
    and the bounds stay as tight as with every variable in the ascent."""
    ds = mlp_bundle.dataset
    rng = np.random.default_rng(30 + start)
    ids = rng.choice(len(ds.x_train), 4, replace=False)
    g, m = both_forms(mlp_bundle.net, ds.x_train[ids], start)
    lo, hi = torch.from_numpy(m.lower), torch.from_numpy(m.upper)
    col = (m.weights[0] * (hi - lo)).norm(dim=0)
    unseen = (col <= bounds.NEGLIGIBLE * col.max()).numpy()
    assert unseen.any() and not unseen.all()  # the base has such variables, else this tests nothing
    specs = np.stack([spec_rows(int(t), 10) for t in rng.integers(0, 10, len(ids))])
    obj = np.einsum("bkc,bcd->bkd", specs, g.jac_f.numpy())
    heavy = rng.normal(size=(len(ids), 2, obj.shape[2])) * np.abs(obj).mean() * np.where(unseen, 20.0, 1.0)
    only = rng.normal(size=(len(ids), 1, obj.shape[2])) * unseen  # nothing but unseen variables: the box bound
    objectives = np.concatenate([obj, -obj, heavy, -heavy, only], axis=1)
    s = mb._scaled(m, torch.from_numpy(objectives), lo, hi)
    assert s.c.shape[2] == int((~unseen).sum()) and s.ops.w32[0].shape[1] == s.c.shape[2]
    exact, chain, _, _ = exact_and_chain(mlp_bundle.net, ds.x_train[ids], start, objectives, steps=120)
    assert np.all(chain <= exact + SOUND_TOL), (chain - exact).max()
    box = np.minimum(objectives * m.lower, objectives * m.upper).sum(axis=2)
    assert np.allclose(chain[:, -1], box[:, -1], rtol=0, atol=1e-9) and np.allclose(exact[:, -1], box[:, -1], atol=1e-6)
    monkeypatch.setattr(mb, "SKIP_UNSEEN", False)
    assert mb._scaled(m, torch.from_numpy(objectives), lo, hi).c.shape[2] == obj.shape[2]
    every = mb.chain_dual_lower_bounds(m, objectives, steps=120)
    gap, gap_every = rel_gap(exact, chain), rel_gap(exact, every)
    assert np.median(gap) <= max(1e-3, 1.5 * np.median(gap_every)), (np.median(gap), np.median(gap_every))


@pytest.mark.parametrize("start", [0, 1])
def test_objectives_stopped_early_stay_sound_and_the_kept_ones_tight(mlp_bundle, start):
    """``keep`` stops some (region, objective) pairs at bounds.DROP_AT (what --tighten largest asks for
    rows below their region's largest bound). Counterexample search against HiGHS on real regions: every
    bound, stopped or not, never above the LP optimum; the pairs kept to the end are as tight as in a full
    ascent; stopped ones are looser."""
    ds = mlp_bundle.dataset
    rng = np.random.default_rng(50 + start)
    ids = rng.choice(len(ds.x_train), 5, replace=False)
    g = compute_regions(mlp_bundle.net, ds.x_train[ids], start)
    specs = np.stack([spec_rows(int(t), 10) for t in rng.integers(0, 10, len(ids))])
    objectives = -np.einsum("bkc,bcd->bkd", specs, g.jac_f.numpy())  # upper bounds of every row
    asked, answers = [], []

    def keep(est):  # every other pair, and each region's pair with the largest upper bound so far
        asked.append(est.copy())
        wanted = np.zeros(est.shape, dtype=bool)
        wanted[:, ::2] = True
        wanted[np.arange(len(est)), est.argmin(axis=1)] = True
        answers.append(wanted)
        return wanted

    exact, full, _, m = exact_and_chain(mlp_bundle.net, ds.x_train[ids], start, objectives, steps=120)
    early = mb.chain_dual_lower_bounds(m, objectives, steps=120, keep=keep)
    assert len(asked) == len(bounds.DROP_AT) and all(a.shape == exact.shape for a in asked)
    assert np.all(early <= exact + SOUND_TOL), (early - exact).max()
    kept = np.logical_and.reduce(answers)  # a stopped pair never resumes
    assert kept[:, ::2].all() and not kept.all()
    # the kept pairs ascend as in a full run (on fewer rows the float32 products round differently, and the
    # non-smooth ascent follows: equally tight, not bit for bit)
    gap_early, gap_full = rel_gap(exact, early), rel_gap(exact, full)
    assert np.median(gap_early[kept]) <= max(1e-3, 1.5 * np.median(gap_full[kept])), (np.median(gap_early[kept]), np.median(gap_full[kept]))
    stopped = ~kept
    assert np.median(gap_early[stopped]) > 2 * np.median(gap_full[stopped])
    every = mb.chain_dual_lower_bounds(m, objectives, steps=120, keep=lambda est: np.ones(est.shape, dtype=bool))
    assert np.all(every <= exact + SOUND_TOL) and np.median(rel_gap(exact, every)) <= max(1e-3, 1.5 * np.median(gap_full))
