"""Metric functions on hand-computed cases, and LiRA on a synthetic Gaussian case with a known answer."""

from __future__ import annotations

import math

import numpy as np
import pytest

from prune_edge.targets import calibrate_unseen, certified_output, class_calibration, fit_temperature, fold_masks
from prune_edge.unlearning_eval import metrics as M


def test_auc_of_known_scores():
    # pairs (pos, neg): 0.8>0.6, 0.8>0.2, 0.4<0.6, 0.4>0.2 -> 3 of 4
    assert M.roc_auc([0.8, 0.4], [0.6, 0.2]) == pytest.approx(0.75)
    assert M.roc_auc([3, 2], [1, 0]) == 1.0
    assert M.roc_auc([0, 1], [2, 3]) == 0.0
    # a tie counts one half: pairs (1 vs 1) = 0.5, (1 vs 0) = 1, (2 vs 1) = 1, (2 vs 0) = 1 -> 3.5 / 4
    assert M.roc_auc([1, 2], [1, 0]) == pytest.approx(0.875)
    assert M.roc_auc([5.0], [5.0]) == pytest.approx(0.5)


def test_tpr_at_fixed_fpr():
    neg = np.arange(100.0)  # 0..99: one false positive is 1% FPR
    pos = np.array([99.5, 98.5, 50.0])
    # threshold 98.5: negatives >= 98.5 = {99} (1%), positives = {99.5, 98.5}
    assert M.tpr_at_fpr(pos, neg, 0.01) == pytest.approx(2 / 3)
    # no false positive allowed: threshold 99.5 keeps only 99.5
    assert M.tpr_at_fpr(pos, neg, 0.001) == pytest.approx(1 / 3)
    assert M.tpr_at_fpr(pos, neg, 1.0) == 1.0
    f, t = M.roc_curve(pos, neg)
    assert f[0] == t[0] == 0.0 and f[-1] == t[-1] == 1.0 and np.all(np.diff(f) >= 0) and np.all(np.diff(t) >= 0)


def test_agreement_accuracy_and_losses():
    assert M.agreement(np.array([0, 1, 2, 3]), np.array([0, 1, 0, 3])) == 0.75
    assert M.accuracy(np.array([], int), np.array([], int)) is None
    assert M.per_sample_loss(np.array([[0.0, 0.0]]), np.array([0]))[0] == pytest.approx(math.log(2))
    # p = 3/4 -> log(p / (1 - p)) = log 3
    assert M.logit_confidence(np.array([[math.log(3), 0.0]]), np.array([0]))[0] == pytest.approx(math.log(3))
    s = M.mean_std([0.5, 0.7, None])
    assert s["mean"] == pytest.approx(0.6) and s["std"] == pytest.approx(math.sqrt(0.02)) and s["n"] == 2


def test_challenge_attack_separable_and_indistinguishable():
    rng = np.random.default_rng(0)
    sep = M.challenge_attack(rng.uniform(0, 1, 200), rng.uniform(2, 3, 300))
    assert sep["accuracy"] == 1.0
    same = M.challenge_attack(rng.exponential(1, 400), rng.exponential(1, 400))
    assert abs(same["accuracy"] - 0.5) < 0.1


def test_lira_gaussian_known_answer():
    """Per-point means m_i vary widely; IN confidences are m_i + 2 + N(0, 1), OUT are m_i + N(0, 1).
    With known (fixed) variance 1 the likelihood ratio is monotone in c - m_i, so LiRA's AUC is
    Phi(2 / sqrt 2) = 0.9214 and its TPR at 1% FPR is Phi(2 - z_0.99) = 0.372; a global loss-style
    threshold, blind to m_i, does much worse."""
    from scipy.stats import norm

    rng = np.random.default_rng(1)
    n, k, d = 4000, 64, 2.0
    m = rng.normal(0, 4, n)
    shadow_in = rng.random((k, n)) < 0.5
    shadow = m[None, :] + d * shadow_in + rng.normal(0, 1, (k, n))
    member = np.arange(n) < n // 2
    target = m + d * member + rng.normal(0, 1, n)
    scores = M.lira_scores(target, shadow, shadow_in)
    res = M.attack_summary(scores[member], scores[~member])
    assert res["auc"] == pytest.approx(norm.cdf(d / math.sqrt(2)), abs=0.015)
    assert res["tpr_at_1pct_fpr"] == pytest.approx(norm.cdf(d - norm.ppf(0.99)), abs=0.05)
    assert M.roc_auc(target[member], target[~member]) < res["auc"] - 0.2


def test_certified_output_caps_rows_at_the_margin():
    t, out = certified_output(np.array([[3.0, 2.5, 0.0], [0.0, 5.0, 1.0]]), margin=1.0)
    assert t.tolist() == [0, 1]
    assert out[0] == pytest.approx([3.0, 2.0 - 1e-4, 0.0])  # 2.5 was inside the margin: capped
    assert out[1] == pytest.approx([0.0, 5.0, 1.0])  # already winning by 4: unchanged


def test_calibrate_unseen_uses_only_shadows_that_never_saw_the_point():
    # 2 shadows, 2 training points: point 0 is out of shadow 1 only, point 1 out of shadow 0 only, so
    # each point's constant is one model's output and the losses it gets are exactly the single
    # shadows' out-of-training losses: the temperature is 1 with a KS distance of 0.
    train = np.array([[[9.0, 0.0], [0.0, 3.0]], [[3.0, 0.0], [0.0, 9.0]]])
    in_mask = np.array([[True, False], [False, True]])
    cal = calibrate_unseen(train, in_mask, np.array([0, 1]))
    assert cal.out_counts.tolist() == [1, 1]
    assert cal.scale == pytest.approx(1.0) and cal.ks_distance == 0.0
    assert cal.logits == pytest.approx(np.array([[3.0, 0.0], [0.0, 3.0]]))


def test_fold_masks_leave_each_point_out_of_exactly_one_model():
    m = fold_masks(103, 16, seed=0)
    assert m.shape == (16, 103) and ((~m).sum(axis=0) == 1).all()
    assert abs((~m).sum(axis=1) - 103 / 16).max() < 1  # folds of equal size
    assert (fold_masks(103, 16, seed=0) == m).all() and not (fold_masks(103, 16, seed=1) == m).all()


def test_temperature_undoes_averaging():
    """Averaging shrinks logits; here the mean is exactly half of what single models give on points
    they never saw, so the fitted temperature is 2 (on the grid) with a KS distance of 0."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 300)
    single = rng.normal(0, 1, (300, 4))
    single[np.arange(300), y] += rng.uniform(1.5, 6.0, 300)  # winners by more than the margin
    single[np.arange(300), (y + 1) % 4] = single[np.arange(300), y] - rng.uniform(1.2, 3.0, 300)
    ref = M.per_sample_loss(single, y)
    scale, ks = fit_temperature(single / 2, y, ref, margin=1.0)
    assert scale == pytest.approx(2.0) and ks < 0.05  # (float rounding at a = 2 flips a few exact ties)


def test_class_calibration_takes_one_model_without_the_class_per_point():
    # 2 models trained without class 1, 3 points of class 1 (ids 4, 7, 9): point p gets model p mod 2
    lg = np.array([[[2.0, -5.0, 0.0], [0.0, -5.0, 2.0], [2.0, -5.0, 0.0]],
                   [[0.0, -5.0, 2.0], [2.0, -5.0, 0.0], [0.0, -5.0, 2.0]]])
    cal = class_calibration(lg, np.array([4, 7, 9]), np.array([1, 1, 1]), [1])
    assert cal.scale == pytest.approx(1.0)
    assert cal.logits == pytest.approx(lg[[0, 1, 0], [0, 1, 2]])
    full = cal.apply(np.zeros((10, 3)))
    assert full[[4, 7, 9]] == pytest.approx(cal.logits) and (full[[0, 1, 2, 3, 5, 6, 8]] == 0).all()
    assert cal.summary()["label_is_a_forgotten_class"] == 0.0


def test_attacker_calibration_takes_the_next_shadow_that_never_saw_the_point():
    from prune_edge.unlearning_eval.ulira import attacker_calibration

    logits = np.arange(3)[:, None, None] + np.zeros((3, 3, 2))  # shadow j outputs j everywhere
    in_mask = np.array([[True, True, False], [False, True, True], [True, False, True]])
    # shadow 0: point 0 -> shadow 1 (out), point 1 -> shadow 2 (shadow 1 saw it), point 2 -> shadow 1 saw it,
    # shadow 2 saw it: nobody else -> mean 1
    got = attacker_calibration(logits, in_mask, 0)[:, 0]
    assert got.tolist() == [1.0, 2.0, 1.0]
    assert attacker_calibration(logits, in_mask, 1)[:, 0].tolist() == [1.0, 2.0, 0.0]


def test_loss_auc_is_the_loss_attacks_auc_with_ties():
    """targets.loss_auc (rank form, no sklearn on the server path) against metrics' AUC of -loss, on
    rounded draws full of ties, over seeds."""
    from prune_edge.targets import loss_auc

    for seed in range(20):
        rng = np.random.default_rng(seed)
        a, b = rng.normal(size=rng.integers(1, 60)).round(1), rng.normal(0.4, size=rng.integers(1, 80)).round(1)
        assert loss_auc(a, b) == pytest.approx(M.attack_summary(-a, -b)["auc"], abs=1e-12), seed


def test_suppressed_caps_the_class_below_the_best_other_and_leaves_the_rest():
    from prune_edge.targets import suppressed

    rng = np.random.default_rng(0)
    z = rng.normal(0, 5, (500, 6))
    for classes, m in (([2], 3.0), ([0, 4], 0.5)):
        out = suppressed(z, classes, m)
        rest = [j for j in range(6) if j not in classes]
        assert (out[:, rest] == z[:, rest]).all()
        for k in classes:  # exactly min(f_K, max_{j not in S} f_j - m): no input predicts a suppressed class
            assert (out[:, k] == np.minimum(z[:, k], z[:, rest].max(1) - m)).all()
        assert not np.isin(out.argmax(1), classes).any()


def test_class_suppression_margin_rules():
    """median: the median gap of the constants; match: the grid margin at which the server-side loss
    attack (records' certified outputs, suppressed, vs proxy unseen outputs, suppressed) is closest to
    0.5, checked with metrics' own AUC on every neighbouring grid point."""
    from prune_edge.targets import class_suppression_margin, suppressed

    rng = np.random.default_rng(1)
    n, K = 300, 2
    f = rng.normal(0, 3, (n, 5))
    f[:, K] -= rng.normal(15, 4, n)  # models without the class: the class far below the best other
    proxy = rng.normal(0, 3, (n, 5))
    proxy[:, K] += 8  # the base-like model predicts the class on its unseen images
    y = np.full(n, K)
    gap = np.delete(f, K, 1).max(1) - f[:, K]
    assert class_suppression_margin(f, proxy, y, [K], "median") == pytest.approx(np.median(gap))
    m = class_suppression_margin(f, proxy, y, [K], "match")

    def server_auc(mm: float) -> float:
        lf = M.per_sample_loss(suppressed(certified_output(f, 1.0)[1], [K], mm), y)
        return M.attack_summary(-lf, -M.per_sample_loss(suppressed(proxy, [K], mm), y))["auc"]

    assert abs(server_auc(m) - 0.5) < 0.05
    assert all(abs(server_auc(m) - 0.5) <= abs(server_auc(mm) - 0.5) + 1e-12 for mm in (m - 0.1, m + 0.1) if mm >= 1)
    assert server_auc(1.0) < 0.3 and m > np.median(gap)  # the median under-shoots: it lifts half the forgotten points
    with pytest.raises(ValueError, match="expected one of"):
        class_suppression_margin(f, proxy, y, [K], "mean")


def test_margin_study_affine_margin_recovers_retraining_when_the_gap_is_affine():
    """Known answer for the offline margin study: when the no-class model's gap is exactly an affine
    function of the base's logits, and retraining answers the test images with that gap and the
    forgotten ones with the records' constants, the fitted margin has R^2 1 and its loss-attack AUC is
    retraining's, though the test images are shifted (a constant margin cannot follow that)."""
    from prune_edge.unlearning_eval.margin_study import gap, study, suppress_per_input

    rng = np.random.default_rng(3)
    k, C, P, U = 1, 5, 200, 120
    w = rng.normal(0, 0.3, C)
    w[k] = 0.05  # (the class's own logit is large: a small weight keeps every gap well above the record margin)
    g = lambda f: 12 + f @ w  # noqa: E731
    bf = rng.normal(0, 2, (P, C)) + 10 * np.eye(C)[k]  # the base predicts the class on its training images...
    bu = rng.normal(0.7, 2.5, (U, C)) + 8 * np.eye(C)[k]  # ... and on the (shifted) test images
    without_f = suppress_per_input(bf, k, g(bf))  # the no-class model: the class exactly g below the best other
    rec = certified_output(without_f, 1.0)[1]
    ru = suppress_per_input(bu, k, g(bu))
    assert (g(bf) > 2).all() and (g(bu) > 2).all() and np.allclose(gap(without_f, k), g(bf))
    res = study(k, np.full(P, k), np.full(U, k), [bf], [bu], [rec], [ru], without_f[None], ru[None], bf, scan=(5, 10))
    fit = res["affine_margin"]["fit_on_base_logits"]
    assert fit["r2"]["mean"] == pytest.approx(1.0) and fit["corr_retrain_gap"]["mean"] == pytest.approx(1.0)
    assert fit["records_kept"]["mean"] == pytest.approx(res["retrain_auc"]["mean"], abs=1e-9)
    assert abs(res["constant_margin"]["match"]["auc"]["mean"] - res["retrain_auc"]["mean"]) > 0.05
