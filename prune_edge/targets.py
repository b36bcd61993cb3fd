"""What a patch record maps its region to: PRUNE's confusing label, or what an unseen point gets.

``confuse`` (PRUNE): a random label that is neither the point's label nor the base's prediction, with
the margin of the certificate. Forgotten points then stand out: wrong with high confidence, where a
model retrained without them gets most of them right with ordinary confidence, so a loss-threshold
attack separates them from unseen points.

``unseen``: the region's output is a constant ``c`` (a collapse-form record, alpha = 0) chosen so the
forgotten points look like points the model never saw:

* ``c`` is the output of a model that never saw the point: the base's architecture and recipe trained
  with the training set split into K folds (K = :data:`DEFAULT_SHADOWS`), model k on every fold but
  fold k, so each point is out of exactly one model, trained on (K-1)/K of the data (15/16 here: about
  what a retrain without a 200-point request sees). These are plain out-of-fold predictions; the
  test split is never read, so an evaluation comparing forgotten points with test points does not
  compare against data the target was fitted on;
* with other memberships (a point out of several shadows, as in LiRA's random halves) ``c`` is the
  mean over the shadows it was out of, times one temperature ``a`` that undoes the averaging: the
  certified mean's losses are fitted (smallest Kolmogorov-Smirnov distance over a grid) to the losses
  single shadows give to their own out-of-training points. With folds the mean is one model and the
  fit returns about 1;
* the certificate needs the record's target to win by the margin, so every other row is capped at
  ``c_j - c_t <= q_upper``: the target is argmax c, and only points the shadows were unsure of (a
  margin below 1) move, to a margin of exactly 1.

Class requests (every training point of class K): fold models saw other images of K and predict K
for them, which is not what a model that never saw the *class* gives. :func:`build_class_calibration`
trains M models of the base's recipe on the training set without the class (each a retrain without
the class, with its own seed); each of the class's points takes the output of one of them (point p of
the class: model p mod M), and those rows replace the fold rows. What this cannot do: a point patch
changes the output on the forgotten points' regions only, so unseen images of the class keep the
base's answer (its class), and forgotten points mapped elsewhere stand out against them (a
loss-threshold attack separates them completely, see ``evaluate-unlearning``). Looking like a model
without the class on *unseen* inputs needs those inputs patched too, which no point record does.

What the device certifies on the region (the collapse certificate, unchanged, checked in
``runtime.verify``): the output is exactly that constant, its argmax wins every row by at least the
margin, and the base's logits everywhere else are untouched. What remains the server's word, like the
stored bounds of a prune record: that ``c`` came from models trained without the point. The label
may equal the true label (as it would for a retrained model about test-accuracy of the time): unseen
does not promise a wrong prediction, it promises the prediction and confidence of a model that never
saw the point. The device needs no new field: to it an unseen record is a collapse record.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

TARGETS = ("confuse", "unseen")
DEFAULT_SHADOWS = 16
CALIBRATION_NAME = "unseen-calibration.npz"
_SCALES = np.geomspace(0.25, 4.0, 61)


def _ce(logits: np.ndarray, y: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    return np.log(np.exp(z).sum(axis=1)) - z[np.arange(len(y)), y]


def certified_output(c: np.ndarray, margin: float, inset: float = 1e-4) -> tuple[np.ndarray, np.ndarray]:
    """(targets, outputs): the argmax of each row of ``c`` and ``c`` with every other entry capped
    ``margin + inset`` below it, i.e. the constant a collapse record can certify."""
    c = np.asarray(c, dtype=np.float64)
    t = c.argmax(axis=1)
    top = c[np.arange(len(c)), t][:, None]
    out = np.minimum(c, top - margin - inset)
    out[np.arange(len(c)), t] = top[:, 0]
    return t, out


def _ks(a: np.ndarray, b: np.ndarray) -> float:
    grid = np.sort(np.concatenate([a, b]))
    fa = np.searchsorted(np.sort(a), grid, side="right") / len(a)
    fb = np.searchsorted(np.sort(b), grid, side="right") / len(b)
    return float(np.abs(fa - fb).max())


CALIBRATION_VERSION = 2  # 1 fitted the temperature on the test split; cached files of version 1 are rebuilt


def fit_temperature(mean_logits: np.ndarray, y: np.ndarray, reference_losses: np.ndarray, margin: float = 1.0) -> tuple[float, float]:
    """(a, KS distance): the scale whose certified output ``a * mean_logits`` has per-point losses
    distributed most like ``reference_losses`` (the losses single models give to points they never saw)."""
    ks = [_ks(reference_losses, _ce(certified_output(a * mean_logits, margin)[1], y)) for a in _SCALES]
    best = int(np.argmin(ks))
    return float(_SCALES[best]), float(ks[best])


@dataclass
class UnseenCalibration:
    """Per training point, the logits a model that never saw it gives, temperature-calibrated."""

    logits: np.ndarray  # (n_train, C) float64: a * mean logits of the shadows the point was out of
    scale: float  # the temperature a
    shadows: int
    out_counts: np.ndarray  # (n_train,) how many shadows each point was out of
    ks_distance: float  # losses of the calibrated mean vs single shadows, on their out-of-training points
    out_accuracy: float  # accuracy of the (uncalibrated) shadow mean on the training points, out-of-shadow
    version: int = CALIBRATION_VERSION

    def save(self, path: str | Path) -> None:
        from .runtime.fileio import atomic_path

        with atomic_path(path) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, logits=self.logits, scale=self.scale, shadows=self.shadows, out_counts=self.out_counts,
                         ks_distance=self.ks_distance, out_accuracy=self.out_accuracy, version=self.version)

    @classmethod
    def load(cls, path: str | Path) -> "UnseenCalibration":
        with np.load(path) as z:
            if "version" not in z.files:
                return cls(z["logits"], float(z["scale"]), int(z["shadows"]), z["out_counts"], float(z["ks_distance"]), float("nan"), 1)
            return cls(z["logits"], float(z["scale"]), int(z["shadows"]), z["out_counts"], float(z["ks_distance"]),
                       float(z["out_accuracy"]), int(z["version"]))

    def summary(self) -> dict[str, Any]:
        return {"shadows": self.shadows, "scale": self.scale, "ks_distance": self.ks_distance,
                "out_accuracy": self.out_accuracy, "min_out_count": int(self.out_counts.min()),
                "fitted_on": "the calibration shadows' own out-of-training points (no held-out point)"}


def calibrate_unseen(train_logits: np.ndarray, in_mask: np.ndarray, y_train: np.ndarray, margin: float = 1.0) -> UnseenCalibration:
    """From K shadows' logits on the training set (K, N, C) and their membership (K, N): per point, the
    mean logits of the shadows it was out of, times the temperature that makes the certified mean's
    losses look like a single shadow's losses on its own out-of-training points.

    A point that was in every shadow (probability 2^-K) gets the mean over all shadows instead."""
    out = ~np.asarray(in_mask, bool)
    counts = out.sum(axis=0)
    tl = np.asarray(train_logits, np.float64)
    y = np.asarray(y_train)
    mean_out = (tl * out[:, :, None]).sum(axis=0) / np.maximum(counts, 1)[:, None]
    mean_out[counts == 0] = tl.mean(axis=0)[counts == 0]
    reference = np.concatenate([_ce(tl[k][out[k]], y[out[k]]) for k in range(len(tl)) if out[k].any()])
    scale, ks = fit_temperature(mean_out, y, reference, margin)
    return UnseenCalibration(
        logits=scale * mean_out, scale=scale, shadows=int(tl.shape[0]), out_counts=counts, ks_distance=ks,
        out_accuracy=float((mean_out.argmax(1) == y)[counts > 0].mean()) if (counts > 0).any() else float("nan"),
    )


DEFAULT_CLASS_SHADOWS = 4


@dataclass
class ClassCalibration:
    """For a class request: the logits that models trained without the class give to its training points."""

    classes: tuple[int, ...]
    ids: np.ndarray  # (P,) training ids of the classes' points
    logits: np.ndarray  # (P, C) a * mean logits of the models trained without the classes
    scale: float
    shadows: int
    ks_distance: float

    def save(self, path: str | Path) -> None:
        from .runtime.fileio import atomic_path

        with atomic_path(path) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, classes=np.array(self.classes), ids=self.ids, logits=self.logits, scale=self.scale,
                         shadows=self.shadows, ks_distance=self.ks_distance)

    @classmethod
    def load(cls, path: str | Path) -> "ClassCalibration":
        with np.load(path) as z:
            return cls(tuple(int(c) for c in z["classes"]), z["ids"], z["logits"], float(z["scale"]), int(z["shadows"]),
                       float(z["ks_distance"]))

    def apply(self, point_logits: np.ndarray) -> np.ndarray:
        """The per-point calibration with the classes' rows replaced."""
        out = np.array(point_logits, np.float64, copy=True)
        out[self.ids] = self.logits
        return out

    def summary(self) -> dict[str, Any]:
        return {"classes": list(self.classes), "points": int(len(self.ids)), "shadows": self.shadows, "scale": self.scale,
                "ks_distance": self.ks_distance, "label_is_a_forgotten_class": float(np.isin(self.logits.argmax(1), self.classes).mean())}


def class_calibration(logits: np.ndarray, ids: np.ndarray, y: np.ndarray, classes: Sequence[int], margin: float = 1.0) -> ClassCalibration:
    """From M models trained without ``classes``, their logits (M, P, C) on the classes' points ``ids``
    (labels ``y``): point p takes model p mod M's output (one model that never saw the class, as a
    retrain without it gives), times the temperature fitted against all M models' losses (about 1)."""
    lg = np.asarray(logits, np.float64)
    one = lg[np.arange(lg.shape[1]) % len(lg), np.arange(lg.shape[1])]
    reference = _ce(lg.reshape(-1, lg.shape[-1]), np.tile(np.asarray(y), len(lg)))
    scale, ks = fit_temperature(one, np.asarray(y), reference, margin)
    return ClassCalibration(tuple(sorted(int(c) for c in classes)), np.asarray(ids, np.int64), scale * one, scale, len(lg), ks)


# ----------------------------------------------------------------------------- class suppression margin
MARGIN_RULES = ("match", "median")


def suppressed(logits: np.ndarray, classes: Sequence[int], margin: float) -> np.ndarray:
    """What a suppression patch outputs (:mod:`prune_edge.suppress`): each class of ``classes`` capped
    ``margin`` below the best class outside them, every other logit unchanged."""
    out = np.array(logits, np.float64, copy=True)
    rest = np.delete(out, list(classes), axis=1).max(axis=1)
    for k in classes:
        out[:, k] = np.minimum(out[:, k], rest - margin)
    return out


def loss_auc(loss_pos: np.ndarray, loss_neg: np.ndarray) -> float:
    """P(loss of a positive < loss of a negative), ties counted half: the loss-threshold attack's AUC
    (the attack scores by -loss: :func:`.unlearning_eval.metrics.roc_auc` of the negated losses)."""
    from .unlearning_eval.metrics import roc_auc

    return roc_auc(-np.asarray(loss_pos, np.float64), -np.asarray(loss_neg, np.float64))


def class_suppression_margin(forget_logits: np.ndarray, proxy_unseen: np.ndarray, y: np.ndarray, classes: Sequence[int],
                             rule: str = "match", record_margin: float = 1.0) -> float:
    """The margin of a class's suppression patch that runs after its ``--target unseen`` records, from
    the server's training data only (never a test point):

    * ``forget_logits``: the records' constants, the outputs models trained without the class give to the
      class's training points (:class:`ClassCalibration`);
    * ``proxy_unseen``: the out-of-fold logits of the same points (:class:`UnseenCalibration`): what a
      model of the base's recipe that saw other images of the class, but not this one, answers, i.e.
      the server's stand-in for how the base answers an unseen image of the class.

    ``median``: the median over the class's points of (best other logit - class logit) of the constants.
    It under-shoots: the suppression also lifts every forgotten point whose gap is below the margin, so
    forgotten points end up more confidently wrong than the (all-at-the-margin) unseen ones.
    ``match``: the margin at which a loss-threshold attack on the server's data cannot tell the records'
    certified outputs, suppressed, from the proxy unseen images, suppressed (AUC closest to 0.5 on a
    0.1 grid from 1 to 64; the AUC rises with the margin)."""
    if rule not in MARGIN_RULES:
        raise ValueError(f"margin rule: expected one of {MARGIN_RULES}, found {rule!r}")
    cls = sorted(int(c) for c in classes)
    f = np.asarray(forget_logits, np.float64)
    if rule == "median":
        gap = np.delete(f, cls, axis=1).max(axis=1) - f[:, cls].max(axis=1)
        return float(max(np.median(gap), record_margin))
    rec = certified_output(f, record_margin)[1]
    y = np.asarray(y)
    grid = np.round(np.arange(1.0, 64.0001, 0.1), 1)
    aucs = np.array([loss_auc(_ce(suppressed(rec, cls, m), y), _ce(suppressed(proxy_unseen, cls, m), y)) for m in grid])
    return float(grid[int(np.argmin(np.abs(aucs - 0.5)))])


def fold_masks(n: int, k: int, seed: int) -> np.ndarray:
    """(k, n) membership of k fold models: a random split of the n points into k folds; model j trains
    on every fold but fold j, so each point is out of exactly one model (deterministic by seed)."""
    fold = np.random.default_rng(seed).permutation(n) % k
    return fold[None, :] != np.arange(k)[:, None]


def shadow_config(config: Any, seed: int, k: int) -> Any:
    """Shadow k's recipe: the base's, with its own seed."""
    from .train import TrainConfig

    return TrainConfig(**{**config.__dict__, "seed": 10_000 + seed * 1000 + k})


def build_unseen_calibration(bundle: Any, shadows: int = DEFAULT_SHADOWS, seed: int = 0, progress: bool = True,
                             margin: float = 1.0) -> UnseenCalibration:
    """Train ``shadows`` fold models of the base's recipe (each on all folds of the training set but
    its own; CPU, in this process): every point's out-of-fold logits (the test split is not read). A
    server pays this once per base (see :func:`load_or_build_calibration`)."""
    from tqdm.auto import tqdm

    import torch

    from .train import fit, predict_logits

    ds = bundle.dataset
    masks = fold_masks(len(ds.x_train), shadows, seed)
    tl = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small models: one thread is fastest, and far faster on a busy machine
    try:
        for k in tqdm(range(shadows), desc="unseen shadows", disable=not progress, leave=False):
            net, _ = fit(ds.x_train[masks[k]], ds.y_train[masks[k]], ds.n_classes, shadow_config(bundle.train_config, seed, k),
                         device="cpu", progress=False)
            tl.append(predict_logits(net, ds.x_train))
    finally:
        torch.set_num_threads(threads)
    return calibrate_unseen(np.stack(tl), masks, ds.y_train, margin)


def load_or_build_calibration(bundle: Any, shadows: int | None = None, progress: bool = True) -> UnseenCalibration:
    """The base folder's cached calibration (``unseen-calibration.npz``, bound to the base by living in
    its folder), built on first use with ``shadows`` (default :data:`DEFAULT_SHADOWS`) models; a cached
    one is used whatever its K unless ``shadows`` asks for another."""
    path = Path(bundle.path) / CALIBRATION_NAME
    if path.exists():
        cal = UnseenCalibration.load(path)
        if shadows in (None, cal.shadows) and len(cal.logits) == len(bundle.dataset.x_train) and cal.version == CALIBRATION_VERSION:
            return cal
    cal = build_unseen_calibration(bundle, shadows or DEFAULT_SHADOWS, progress=progress)
    cal.save(path)
    return cal


def class_shadow_config(config: Any, classes: Sequence[int], k: int) -> Any:
    """Model k without ``classes``: the base's recipe with its own seed (apart from the point shadows')."""
    from .train import TrainConfig

    return TrainConfig(**{**config.__dict__, "seed": 20_000 + 100 * min(classes) + k})


def class_calibration_name(classes: Sequence[int]) -> str:
    return f"unseen-calibration-class{'-'.join(str(c) for c in sorted(set(int(c) for c in classes)))}.npz"


def build_class_calibration(bundle: Any, classes: Sequence[int], shadows: int = DEFAULT_CLASS_SHADOWS, progress: bool = True,
                            margin: float = 1.0) -> ClassCalibration:
    """Train ``shadows`` models of the base's recipe on the training set without ``classes`` (CPU, in
    this process); calibrate the classes' points on them. Once per base and class set."""
    from tqdm.auto import tqdm

    import torch

    from .train import fit, predict_logits

    ds = bundle.dataset
    ids = np.flatnonzero(np.isin(ds.y_train, list(classes)))
    keep = ~np.isin(ds.y_train, list(classes))
    logits = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for k in tqdm(range(shadows), desc="unseen class shadows", disable=not progress, leave=False):
            net, _ = fit(ds.x_train[keep], ds.y_train[keep], ds.n_classes, class_shadow_config(bundle.train_config, classes, k),
                         device="cpu", progress=False)
            logits.append(predict_logits(net, ds.x_train[ids]))
    finally:
        torch.set_num_threads(threads)
    return class_calibration(np.stack(logits), ids, ds.y_train[ids], classes, margin)


def load_or_build_class_calibration(bundle: Any, classes: Sequence[int], shadows: int | None = None,
                                    progress: bool = True) -> ClassCalibration:
    """The base folder's cached class calibration, built on first use (see :func:`build_class_calibration`)."""
    path = Path(bundle.path) / class_calibration_name(classes)
    if path.exists():
        cal = ClassCalibration.load(path)
        if shadows in (None, cal.shadows):
            return cal
    cal = build_class_calibration(bundle, classes, shadows or DEFAULT_CLASS_SHADOWS, progress=progress)
    cal.save(path)
    return cal


def unseen_calibration_logits(bundle: Any, classes: Sequence[int] | None = None, progress: bool = True) -> np.ndarray:
    """What ``--target unseen`` maps each training point to: the per-point calibration, and for a class
    request (``classes``) the rows of the classes' points from models trained without the classes."""
    logits = load_or_build_calibration(bundle, progress=progress).logits
    if classes:
        logits = load_or_build_class_calibration(bundle, classes, progress=progress).apply(logits)
    return logits


@dataclass
class UnseenRows:
    """Per record: target, the rows' shifts beta (rows e_j - e_target) and the mean logit."""

    targets: list[int]
    beta: np.ndarray  # (P, C-1)
    mean_shift: np.ndarray  # (P,)


def unseen_rows(calibration: np.ndarray, groups: Sequence[Sequence[int]], ids: np.ndarray, forced: Sequence[set],
                margin: float, q_lower: float, inset: float = 1e-4) -> UnseenRows:
    """The collapse-form numbers of each record: ``c`` = mean calibrated logits of its points; a target
    forced by an earlier patch's record (``forced``) replaces argmax c, then every other row is capped
    at ``-margin - inset`` so the certificate holds."""
    targets, betas, shifts = [], [], []
    c_all = np.asarray(calibration, np.float64)
    for members, must in zip(groups, forced):
        c = c_all[ids[list(members)]].mean(axis=0)
        t = next(iter(must)) if must else int(c.argmax())
        rows = np.delete(c - c[t], t)  # rows e_j - e_t, j != t, in spec_rows order
        rows = np.clip(rows, q_lower + 1.0, -margin - inset)
        targets.append(int(t))
        betas.append(np.floor(rows * 1e6) / 1e6)
        shifts.append(round(float(c.mean()), 6))
    return UnseenRows(targets, np.array(betas), np.array(shifts))


def calibrated_suppression_margin(bundle: Any, classes: Sequence[int], rule: str = "match", progress: bool = True) -> float:
    """The suppression margin :func:`class_suppression_margin` gives for ``classes`` on this base, from
    its cached calibrations (built on first use: the fold models and the models without the classes;
    no test point is read). It is meant for the suppression that runs after the classes' ``--target
    unseen`` records."""
    point = load_or_build_calibration(bundle, progress=progress).logits
    cal = load_or_build_class_calibration(bundle, classes, progress=progress)
    return class_suppression_margin(cal.logits, point[cal.ids], bundle.dataset.y_train[cal.ids], classes, rule)


# ----------------------------------------------------------------------------- affine suppression margin
@dataclass
class AffineMargin:
    """m_K(x) = max(floor, w_K . f(x) + b_K) per suppressed class (runtime.patchgraph's affine form)."""

    classes: list[int]
    weights: np.ndarray  # (S, C) float32
    bias: np.ndarray  # (S,) float32
    r2: list[float]  # per class, of the fit on its training points
    points: int  # training points fitted on (all classes)
    clipped: int  # weights or biases clipped to the device policy's caps

    def summary(self) -> dict[str, Any]:
        return {"classes": self.classes, "r2": [round(r, 4) for r in self.r2], "points": self.points, "clipped": self.clipped,
                "max_abs_weight": float(np.abs(self.weights).max()), "bias": [float(b) for b in self.bias]}


def fit_affine_suppression(base_logits: np.ndarray, without_logits: np.ndarray, y: np.ndarray, classes: Sequence[int],
                           max_abs_w: float, max_abs_b: float) -> AffineMargin:
    """Least squares, per class K of ``classes``, of the gap the models trained without the classes give
    the class's training points (best class outside ``classes`` minus K's logit: the margin a retrain
    leaves them) on the base's logits at those points, plus a bias. Training points only: a test image
    is never fitted on. Deterministic (one lstsq; no randomness). Weights and bias are clipped to the
    device policy's caps (verify refuses more), which a sane fit never reaches."""
    cls = sorted(int(c) for c in classes)
    f = np.asarray(base_logits, np.float64)
    g = np.asarray(without_logits, np.float64)
    y = np.asarray(y)
    rest = np.delete(g, cls, axis=1).max(axis=1)
    weights, bias, r2, clipped = [], [], [], 0
    for k in cls:
        sel = y == k
        target = rest[sel] - g[sel, k]
        x = np.c_[np.ones(int(sel.sum())), f[sel]]
        coef, *_ = np.linalg.lstsq(x, target, rcond=None)
        res = target - x @ coef
        r2.append(float(1 - res.var() / target.var()) if target.var() > 0 else 0.0)
        w, b = np.clip(coef[1:], -max_abs_w, max_abs_w), float(np.clip(coef[0], -max_abs_b, max_abs_b))
        clipped += int((w != coef[1:]).sum()) + int(b != coef[0])
        weights.append(w)
        bias.append(b)
    return AffineMargin(cls, np.array(weights, np.float32), np.array(bias, np.float32), r2, int(np.isin(y, cls).sum()), clipped)


def affine_suppression_margin(bundle: Any, classes: Sequence[int], progress: bool = True) -> AffineMargin:
    """The affine margin :func:`fit_affine_suppression` gives for ``classes`` on this base: targets from the
    cached class calibration (models trained without the classes, built on first use), features the
    base's own ONNX logits on the classes' training points (what the device's suppression reads when no
    record patch runs before it). No test point is read."""
    from .runtime.model import PatchedModel
    from .runtime.policy import DEFAULT_POLICY

    cal = load_or_build_class_calibration(bundle, classes, progress=progress)
    ds = bundle.dataset
    base = PatchedModel(bundle.onnx_path, base=bundle.graph).logits(ds.x_train[cal.ids])
    return fit_affine_suppression(base, cal.logits, ds.y_train[cal.ids], classes, DEFAULT_POLICY.max_abs_T, DEFAULT_POLICY.max_abs_t)
