"""Why a class suppression with a constant margin cannot reach retraining's loss-attack AUC, and what an
input-dependent margin would give: an offline numpy study (no runtime form is built or changed).

``python -m prune_edge.unlearning_eval.margin_study --dataset mnist5k --forget-class 3 --seeds 3`` trains,
per seed, the base and a retrain without the class (the grid's recipes and seeds), once the server's
models without the class (``--class-shadows``) and the fold models (``--folds``), then prints JSON:

* ``split_auc``: each model without the class, training images of the class vs its test images. These
  models never saw the class, so any distance from 0.5 is the data split's, not unlearning's;
* ``constant_margin``: records (constants of the models without the class) then a suppression with a
  constant margin, loss-attack AUC on the class's test images, for a scan of margins and for the
  ``median`` and ``match`` rules of :func:`prune_edge.targets.class_suppression_margin`;
* ``affine_margin``: margin(x) = a + w . f(x) fitted by least squares on the class's *training* points
  (target: the models without the class's best-other-minus-class gap; features: the base's logits, or the
  fold models' out-of-fold logits), applied to the base's logits on the class's test images. Test images
  are only ever scored, never fitted on.
"""

from __future__ import annotations

import argparse
import json
from typing import Any, Sequence

import numpy as np

from ..targets import _ce, certified_output, class_suppression_margin, loss_auc, suppressed


def gap(logits: np.ndarray, k: int) -> np.ndarray:
    """Best other logit minus class ``k``'s logit, per row (what a suppression margin fixes)."""
    return np.delete(logits, k, axis=1).max(axis=1) - logits[:, k]


def suppress_per_input(logits: np.ndarray, k: int, margin: np.ndarray) -> np.ndarray:
    """out_k = min(f_k, max_{j != k} f_j - margin(x)): a suppression whose margin varies per input."""
    out = np.array(logits, np.float64, copy=True)
    out[:, k] = np.minimum(out[:, k], np.delete(out, k, axis=1).max(axis=1) - margin)
    return out


def fit_affine_margin(features: np.ndarray, target_gap: np.ndarray) -> tuple[np.ndarray, float]:
    """(w, R^2): least squares target_gap ~ [1, features] . w."""
    x = np.c_[np.ones(len(features)), features]
    w, *_ = np.linalg.lstsq(x, target_gap, rcond=None)
    res = target_gap - x @ w
    return w, float(1 - res.var() / target_gap.var())


def affine_margin(features: np.ndarray, w: np.ndarray) -> np.ndarray:
    return np.c_[np.ones(len(features)), features] @ w


def study(k: int, y_forget: np.ndarray, y_unseen: np.ndarray, bases_f: Sequence[np.ndarray], bases_u: Sequence[np.ndarray],
          retrains_f: Sequence[np.ndarray], retrains_u: Sequence[np.ndarray], without_f: np.ndarray, without_u: np.ndarray,
          oof_f: np.ndarray, scan: Sequence[float] = (8, 12, 15, 18, 21, 24, 27, 30, 35, 40)) -> dict[str, Any]:
    """The numbers, from logits only: per seed the base's and the retrain's logits on the class's training
    points (``_f``) and test points (``_u``); the M models without the class on both (M, P, C); the fold
    models' out-of-fold logits on the training points. Point p of the class takes model p mod M (as
    :func:`prune_edge.targets.class_calibration`)."""
    m = len(without_f)
    one = without_f[np.arange(len(y_forget)) % m, np.arange(len(y_forget))]
    rec = certified_output(one, 1.0)[1]  # the records' constants
    lf_rec = _ce(rec, y_forget)
    ms = lambda v: {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0,  # noqa: E731
                    "per_seed": [round(float(x), 4) for x in v]}
    out: dict[str, Any] = {
        "retrain_auc": ms([loss_auc(_ce(r, y_forget), _ce(u, y_unseen)) for r, u in zip(retrains_f, retrains_u)]),
        "split_auc": [round(loss_auc(_ce(without_f[i], y_forget), _ce(without_u[i], y_unseen)), 4) for i in range(m)],
        "median_gap_without_class": {"train": float(np.median(gap(one, k))), "test": float(np.median(gap(without_u.reshape(-1, without_u.shape[-1]), k)))},
    }
    const = lambda mg: ms([loss_auc(_ce(suppressed(rec, [k], mg), y_forget), _ce(suppressed(b, [k], mg), y_unseen))  # noqa: E731
                           for b in bases_u])
    out["constant_margin"] = {"scan": {str(mg): round(const(mg)["mean"], 4) for mg in scan}}
    for rule in ("median", "match"):
        mg = class_suppression_margin(one, oof_f, y_forget, [k], rule)
        out["constant_margin"][rule] = {"margin": mg, "auc": const(mg)}
    out["constant_margin"]["plain_suppression_auc"] = {str(mg): round(ms([loss_auc(_ce(suppressed(bf, [k], mg), y_forget), _ce(suppressed(bu, [k], mg), y_unseen))
                                                                           for bf, bu in zip(bases_f, bases_u)])["mean"], 4) for mg in (1.0, 22.4)}
    target = gap(one, k)
    aff: dict[str, Any] = {}
    per_base = {"records_kept": [], "records_then_margin": [], "r2": [], "corr_retrain_gap": []}
    for bf, bu, ru in zip(bases_f, bases_u, retrains_u):
        w, r2 = fit_affine_margin(bf, target)  # the base's own logits on the class's training points
        lu = _ce(suppress_per_input(bu, k, affine_margin(bu, w)), y_unseen)
        per_base["records_kept"].append(loss_auc(lf_rec, lu))
        per_base["records_then_margin"].append(loss_auc(_ce(suppress_per_input(rec, k, affine_margin(bf, w)), y_forget), lu))
        per_base["r2"].append(r2)
        per_base["corr_retrain_gap"].append(float(np.corrcoef(affine_margin(bu, w), gap(ru, k))[0, 1]))
    aff["fit_on_base_logits"] = {key: ms(v) for key, v in per_base.items()}
    w, r2 = fit_affine_margin(oof_f, target)  # one fit for every base, on the fold models' out-of-fold logits
    aff["fit_on_out_of_fold_logits"] = {"r2": r2, "records_kept": ms([loss_auc(lf_rec, _ce(suppress_per_input(b, k, affine_margin(b, w)), y_unseen))
                                                                      for b in bases_u])}
    out["affine_margin"] = aff
    return out


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    from ..targets import fold_masks
    from .grid import _dataset, task_base, task_shadow

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", default="mnist5k")
    ap.add_argument("--arch", default="mlp")
    ap.add_argument("--forget-class", type=int, default=3)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--class-shadows", type=int, default=4)
    ap.add_argument("--folds", type=int, default=16)
    ap.add_argument("--out", required=True, help="folder for the base folders")
    a = ap.parse_args(argv)
    from pathlib import Path

    from ..basedir import load_base
    from ..train import predict_logits

    ds = _dataset(a.dataset)
    k, n = a.forget_class, len(ds.y_train)
    x = np.concatenate([ds.x_train, ds.x_test])
    pool_y = np.concatenate([ds.y_train, ds.y_test])
    fid, uid = np.flatnonzero(ds.y_train == k), n + np.flatnonzero(ds.y_test == k)
    without = np.zeros(len(pool_y), bool)
    without[:n] = ds.y_train != k
    bases, retrains = [], []
    for s in range(a.seeds):  # the grid's seeds: base seed s, retrain seed s, models without the class 20000 + 100 k + j
        folder = str(Path(a.out) / f"seed{s}")
        task_base(a.dataset, a.arch, folder, s, None)
        bases.append(predict_logits(load_base(folder).net, x))
        retrains.append(task_shadow(a.dataset, a.arch, without, s, None))
    wo = np.stack([task_shadow(a.dataset, a.arch, without, 20_000 + 100 * k + j, None) for j in range(a.class_shadows)])
    masks = fold_masks(n, a.folds, seed=0)
    oof = np.zeros((len(fid), ds.n_classes))
    for j in range(a.folds):  # each point's out-of-fold model (the grid's fold models and seeds)
        mem = np.zeros(len(pool_y), bool)
        mem[:n] = masks[j]
        lg = task_shadow(a.dataset, a.arch, mem, 10_000 + j, None)
        out_j = ~masks[j][fid]
        oof[out_j] = lg[fid[out_j]]
    res = study(k, ds.y_train[fid], ds.y_test[uid - n], [b[fid] for b in bases], [b[uid] for b in bases],
                [r[fid] for r in retrains], [r[uid] for r in retrains], wo[:, fid], wo[:, uid], oof)
    print(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
