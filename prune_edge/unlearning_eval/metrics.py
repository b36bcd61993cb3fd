"""Unlearning metrics: accuracies, agreement with retraining, and membership inference attacks.

Every attack here scores points so that a *higher* score means "more likely a member" and is read on
forgotten points (positives) against points the model never saw (negatives). An unlearning method is
as good as retraining when its numbers sit where retraining's do (loss-threshold AUC near 0.5, not
near 0: a method that pushes forgotten points far past unseen ones is detectable too).
"""

from __future__ import annotations

from typing import Any

import numpy as np


def accuracy(pred: np.ndarray, y: np.ndarray) -> float | None:
    """Fraction of correct predictions; None for an empty split (JSON null)."""
    return float((np.asarray(pred) == np.asarray(y)).mean()) if len(y) else None


def agreement(pred_a: np.ndarray, pred_b: np.ndarray) -> float | None:
    """Fraction of points where two models predict the same label (e.g. a method and retraining)."""
    return accuracy(pred_a, pred_b)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def per_sample_loss(logits: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Cross-entropy of each point (float64, stable)."""
    return -log_softmax(logits)[np.arange(len(y)), np.asarray(y)]


def logit_confidence(logits: np.ndarray, y: np.ndarray) -> np.ndarray:
    """LiRA's statistic: log(p / (1 - p)) of the true class, computed stably as
    logit_y - logsumexp(other logits) (Carlini et al. 2022, Sec. IV: makes confidences near Gaussian)."""
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(y)
    own = z[np.arange(len(y)), y]
    other = z.copy()
    other[np.arange(len(y)), y] = -np.inf
    m = other.max(axis=1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(other - m).sum(axis=1))
    return own - lse


def roc_auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(score of a positive > score of a negative) + 0.5 P(tie): the Mann-Whitney form of the ROC
    AUC, exact with ties (no curve interpolation)."""
    pos, neg = np.asarray(pos, np.float64), np.asarray(neg, np.float64)
    if not len(pos) or not len(neg):
        raise ValueError("roc_auc needs at least one positive and one negative score")
    allv = np.concatenate([pos, neg])
    order = np.argsort(allv, kind="mergesort")
    ranks = np.empty(len(allv))
    sorted_v = allv[order]
    # average ranks over ties (1-based)
    _, start, counts = np.unique(sorted_v, return_index=True, return_counts=True)
    avg = start + (counts + 1) / 2.0
    ranks[order] = np.repeat(avg, counts)
    r_pos = ranks[: len(pos)].sum()
    return float((r_pos - len(pos) * (len(pos) + 1) / 2.0) / (len(pos) * len(neg)))


def roc_curve(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) at every threshold "score >= s", from the strictest down; starts at (0, 0)."""
    pos, neg = np.asarray(pos, np.float64), np.asarray(neg, np.float64)
    thresholds = np.unique(np.concatenate([pos, neg]))[::-1]
    sp, sn = np.sort(pos), np.sort(neg)
    tpr = (len(sp) - np.searchsorted(sp, thresholds, side="left")) / len(sp)
    fpr = (len(sn) - np.searchsorted(sn, thresholds, side="left")) / len(sn)
    return np.concatenate([[0.0], fpr]), np.concatenate([[0.0], tpr])


def tpr_at_fpr(pos: np.ndarray, neg: np.ndarray, fpr: float) -> float:
    """The largest TPR of a threshold whose FPR is at most ``fpr`` (no interpolation: with 1,000
    negatives, 0.1% FPR allows exactly one false positive)."""
    f, t = roc_curve(pos, neg)
    return float(t[f <= fpr + 1e-12].max())


def attack_summary(pos: np.ndarray, neg: np.ndarray) -> dict[str, float]:
    """AUC and TPR at 1% and 0.1% FPR of one attack's scores."""
    return {
        "auc": roc_auc(pos, neg),
        "tpr_at_1pct_fpr": tpr_at_fpr(pos, neg, 0.01),
        "tpr_at_0.1pct_fpr": tpr_at_fpr(pos, neg, 0.001),
    }


def loss_threshold_scores(logits: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Yeom et al. (CSF 2018): a low loss means "member"; the score is the negated loss."""
    return -per_sample_loss(logits, y)


def challenge_attack(loss_forget: np.ndarray, loss_unseen: np.ndarray, seed: int = 0, n_splits: int = 10) -> dict[str, float]:
    """The NeurIPS 2023 Machine Unlearning challenge starter kit's attack: logistic regression on the
    per-sample loss, forget (1) vs unseen (0), balanced by subsampling the larger side, scored by
    cross-validated accuracy (StratifiedShuffleSplit, 10 splits, as in the kit). 0.5 = cannot tell."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedShuffleSplit, cross_val_score

    rng = np.random.default_rng(seed)
    n = min(len(loss_forget), len(loss_unseen))
    f = rng.choice(loss_forget, n, replace=False)
    u = rng.choice(loss_unseen, n, replace=False)
    x = np.concatenate([f, u])[:, None]
    y = np.concatenate([np.ones(n), np.zeros(n)])
    cv = StratifiedShuffleSplit(n_splits=n_splits, random_state=seed)
    scores = cross_val_score(LogisticRegression(), x, y, cv=cv, scoring="accuracy")
    return {"accuracy": float(scores.mean()), "accuracy_std": float(scores.std())}


def lira_scores(
    target_conf: np.ndarray,
    shadow_conf: np.ndarray,
    shadow_in: np.ndarray,
    fixed_variance: bool = True,
) -> np.ndarray:
    """Online LiRA (Carlini et al., "Membership inference attacks from first principles", S&P 2022,
    arXiv 2112.03570): per point, fit Gaussians to the shadow models' logit-scaled confidences when the
    point was IN their training set and when it was OUT, and score the target model's confidence by
    the log-likelihood ratio log N(c; mu_in, s_in) - log N(c; mu_out, s_out).

    ``target_conf`` (N,), ``shadow_conf`` (K, N), ``shadow_in`` (K, N) bool. With few shadows the
    paper's fixed-variance variant (one variance per side, pooled over all points) is the stable one
    and the default. A point with no IN (or OUT) shadow falls back to the pooled mean of that side.
    """
    c = np.asarray(shadow_conf, np.float64)
    m_in = np.asarray(shadow_in, bool)
    m_out = ~m_in

    def side(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = mask.sum(axis=0)
        mu = np.where(n > 0, (c * mask).sum(axis=0) / np.maximum(n, 1), (c * mask).sum() / max(mask.sum(), 1))
        resid = np.where(mask, c - mu[None, :], 0.0)
        if fixed_variance:
            var = np.full(c.shape[1], (resid**2).sum() / max(mask.sum() - 1, 1))
        else:
            var = np.where(n > 1, (resid**2).sum(axis=0) / np.maximum(n - 1, 1), (resid**2).sum() / max(mask.sum() - 1, 1))
        return mu, np.maximum(var, 1e-12)

    mu_in, var_in = side(m_in)
    mu_out, var_out = side(m_out)
    t = np.asarray(target_conf, np.float64)
    ll_in = -0.5 * ((t - mu_in) ** 2 / var_in + np.log(var_in))
    ll_out = -0.5 * ((t - mu_out) ** 2 / var_out + np.log(var_out))
    return ll_in - ll_out


def mean_std(values: list[float | None]) -> dict[str, Any]:
    """Mean and sample std over seeds (None entries skipped; std 0 for one value)."""
    v = np.array([x for x in values if x is not None], dtype=np.float64)
    if not len(v):
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "n": int(len(v))}
