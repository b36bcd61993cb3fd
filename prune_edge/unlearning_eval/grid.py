"""The evaluation grid: bases, shadow models and every method on every seed, then the metrics.

Everything heavy is a task (a module-level function with picklable arguments) that goes through
:mod:`.executor`; the metrics are computed here, in the driver, from the logits the tasks return.
Two sets of shadow models are trained, and kept apart on purpose:

* the *attacker's* K shadows (LiRA): random halves of the pool train + test (each pool point is in
  about half of them), the base's architecture and recipe, seeds the server never used;
* the *server's* calibration models for ``prune-unseen`` (:mod:`prune_edge.targets`): K fold models
  of the training set (each point out of exactly one), other seeds; no test point enters them, so the
  attacks' unseen points are not data the target was fitted on; and for
  each ``class:K`` request, models trained on the training set without class K. The attack never sees
  them.

U-LiRA (:mod:`.ulira`) applies each of ``ulira_methods`` (by default every method but prune-confuse)
to the first ``ulira_shadows`` attacker shadows.
"""

from __future__ import annotations

import functools
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import metrics as M
from .baselines import BASELINES, RECIPES

PRUNE_METHODS = {
    # name: (mode, target)
    "prune-confuse": ("prune", "confuse"),
    "collapse-confuse": ("collapse", "confuse"),
    "prune-unseen": ("collapse", "unseen"),
    "prune-unseen-pointcal": ("collapse", "unseen"),  # class requests calibrated like point requests (the contrast)
}
PRUNE_RECIPES = {
    "prune-confuse": {"paper": "PRUNE: Li et al., Neural Networks 201, 2026 (arXiv 2505.06520)",
                      "recipe": "certified point patches, mode prune (dual bounds, 200 steps), random confusing label, margin 1, widest safe gate"},
    "collapse-confuse": {"paper": "PRUNE's completeness construction (alpha = 0)",
                         "recipe": "certified point patches, mode collapse: the region's output a constant where a random confusing label wins by 1"},
    "prune-unseen": {"paper": "this project (prune_edge.targets)",
                     "recipe": "certified collapse-form patches whose constant is the output of a model that never saw the point: of the one of K server fold models (K = --shadows, each trained on (K-1)/K of the training set) whose folds did not hold it (out-of-fold logits; no test point used); for class:K, of one of --class-shadows models trained without class K; every non-target logit capped at the certificate's margin"},
}
PRUNE_RECIPES["prune-unseen-pointcal"] = {
    "paper": "this project (prune_edge.targets)",
    "recipe": "prune-unseen with the out-of-fold constants for every request: on class:K each point gets what a model that saw other images of K but not this one gives (identical to prune-unseen on random:N)"}
# A class request can also be answered by a suppression patch (prune_edge.suppress): no records, the class's
# logit kept below the best other class on every input. It has no meaning for point requests.
CLASS_METHODS = {
    "prune-suppress": {"paper": "this project (prune_edge.suppress; a class-level PRUNE-style patch)",
                       "recipe": "one suppression patch: out_K = min(f_K, max_{j != K} f_j - margin), margin 1, every other logit the base's bit for bit; class requests only"},
    "prune-suppress-cal": {"paper": "this project (prune_edge.suppress, prune_edge.targets.class_suppression_margin)",
                           "recipe": "prune-suppress with the margin prune-suppress-unseen calibrates (rule match); no records"},
    "prune-suppress-unseen": {"paper": "this project (prune_edge.targets, prune_edge.suppress)",
                              "recipe": "two patches a device runs together: prune-unseen's records for the class's training points (constants of models trained without the class), then a suppression patch whose margin makes a loss attack on the server's own data unable to tell the records' outputs from suppressed out-of-fold outputs of the class's points (rule match: AUC 0.5 on a 0.1 grid; no test point read)"},
    "prune-suppress-unseen-median": {"paper": "this project (prune_edge.targets, prune_edge.suppress)",
                                     "recipe": "prune-suppress-unseen with the margin = median over the class's training points of (best other - class logit) of the models trained without the class (rule median)"},
    "prune-suppress-affine": {"paper": "this project (prune_edge.suppress, prune_edge.targets.fit_affine_suppression)",
                              "recipe": "one suppression patch whose margin follows the input: max(1, w . f(x) + b), w and b fitted by least squares on the class's training points only (target: the gap models trained without the class give them; features: the base's logits); no records"},
    "prune-suppress-unseen-affine": {"paper": "this project (prune_edge.targets, prune_edge.suppress)",
                                     "recipe": "prune-unseen's records for the class's training points, then prune-suppress-affine's suppression (its margin reads the records' outputs on their regions)"},
}
# class methods whose margin (or records) come from the class calibration: method -> margin rule
CALIBRATED_CLASS_METHODS = {"prune-suppress-cal": "match", "prune-suppress-unseen": "match", "prune-suppress-unseen-median": "median",
                            "prune-suppress-affine": "affine", "prune-suppress-unseen-affine": "affine"}
SUPPRESSION_ONLY_METHODS = ("prune-suppress-cal", "prune-suppress-affine")  # calibrated, but no records
PRUNE_RECIPES.update(CLASS_METHODS)
ALL_METHODS = (*PRUNE_METHODS, *CLASS_METHODS, *BASELINES)


def applies(method: str, kind: str) -> bool:
    """Whether ``method`` answers a request of ``kind`` ("random" or "class")."""
    return method not in CLASS_METHODS or kind == "class"

# U-LiRA unlearns every shadow with the method: all but prune-confuse, whose bound computation takes
# tens of seconds per patch (its confusing constant is what collapse-confuse measures)
ULIRA_METHODS = tuple(m for m in ALL_METHODS if m != "prune-confuse" and m not in CLASS_METHODS)
ATTACK_SEED = 7919  # the attacker's shadow seeds and membership draw; disjoint from every server seed


@dataclass
class GridConfig:
    dataset: str = "mnist5k"
    arch: str = "mlp"
    forget: tuple[str, ...] = ("random:200", "class:3")
    methods: tuple[str, ...] = ALL_METHODS
    seeds: int = 3
    shadows: int = 16
    epochs: int | None = None
    workers: int = 1
    ray_address: str | None = None
    quick: bool = False
    class_shadows: int = 4  # prune-unseen's calibration for class requests: models trained without the class
    ulira_shadows: int = 8  # U-LiRA: the first this many attacker shadows, unlearned by each method
    ulira_methods: tuple[str, ...] = ULIRA_METHODS
    extra: dict[str, Any] = field(default_factory=dict)


def parse_forget(spec: str) -> tuple[str, int]:
    """``random:N`` or ``class:K`` -> (kind, number)."""
    kind, _, num = spec.partition(":")
    if kind not in ("random", "class") or not num.isdigit():
        raise ValueError(f"--forget: expected random:N or class:K, found {spec!r}")
    return kind, int(num)


def request_ids(spec: str, y_train: np.ndarray, seed: int) -> np.ndarray:
    from ..requests import random_forget_ids

    kind, num = parse_forget(spec)
    if kind == "random":
        return random_forget_ids(len(y_train), num, seed)
    ids = np.flatnonzero(y_train == num).astype(np.int64)
    if not len(ids):
        raise ValueError(f"--forget {spec}: no training point has label {num}")
    return ids


# ----------------------------------------------------------------------------- tasks
def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)  # small models: one thread is fastest, and far faster on a busy machine


@functools.lru_cache(maxsize=2)
def _dataset(name: str) -> Any:
    from ..data import load_dataset

    return load_dataset(name)


def task_base(dataset: str, arch: str, folder: str, seed: int, epochs: int | None) -> dict[str, Any]:
    """Train one base folder (ONNX, weights, card); its seed is also the request's."""
    from ..basedir import train_base

    _one_thread()
    card = train_base(dataset, arch, folder, seed=seed, epochs=epochs, device="cpu", progress=False)
    from ..basedir import ONNX_NAME
    from ..runtime.model import PatchedModel

    ds = _dataset(dataset)  # per-class test counts: a class request judges the base on the retained classes only
    pred = PatchedModel(Path(folder) / ONNX_NAME, []).predict(ds.x_test)
    correct = [int(((pred == c) & (ds.y_test == c)).sum()) for c in range(ds.n_classes)]
    count = [int((ds.y_test == c).sum()) for c in range(ds.n_classes)]
    return {"folder": folder, "test_accuracy": card["metrics"]["test_accuracy"], "seconds": card["training"]["training_seconds"],
            "test_correct_per_class": correct, "test_count_per_class": count}


def retained_accuracy(base: dict[str, Any], classes: list[int]) -> float:
    """A base's test accuracy on the test points whose label is not in ``classes`` (from its per-class counts)."""
    keep = [c for c in range(len(base["test_count_per_class"])) if c not in classes]
    return sum(base["test_correct_per_class"][c] for c in keep) / sum(base["test_count_per_class"][c] for c in keep)


def task_shadow(dataset: str, arch: str, member: np.ndarray, seed: int, epochs: int | None,
                folder: str | None = None) -> np.ndarray:
    """Train on the pool points in ``member`` (pool = train then test), return logits on the whole pool;
    with ``folder``, also keep the shadow as a base folder (U-LiRA unlearns it)."""
    from ..train import TrainConfig, fit, predict_logits

    _one_thread()
    ds = _dataset(dataset)
    x = np.concatenate([ds.x_train, ds.x_test])
    y = np.concatenate([ds.y_train, ds.y_test])
    config = TrainConfig(arch=arch, seed=seed, epochs=epochs)
    net, stats = fit(x[member], y[member], ds.n_classes, config, device="cpu", progress=False)
    if folder is not None:
        from .ulira import write_shadow_base

        write_shadow_base(net, member, config, stats, dataset, folder)
    return predict_logits(net, x).astype(np.float32)


def _latency_ms(onnx: Path, patches: list[Path], x: np.ndarray, repeats: int = 20) -> float:
    from ..runtime.model import PatchedModel

    m = PatchedModel(onnx, patches)
    m.logits(x)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        m.logits(x)
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def task_method(folder: str, method: str, request: str, seed: int) -> dict[str, Any]:
    """One method on one base and request: logits on train and test, seconds, bytes, latency."""
    from ..basedir import load_base
    from ..runtime.model import PatchedModel

    _one_thread()
    bundle = load_base(folder)
    ds = bundle.dataset
    ids = request_ids(request, ds.y_train, seed)
    onnx = bundle.onnx_path
    base_bytes = onnx.stat().st_size
    batch = ds.x_test[:256]
    out: dict[str, Any] = {"method": method, "seed": seed, "request": request, "forget_ids": ids}
    if method in CLASS_METHODS:
        from ..runtime.verify import check_patch_set, verify_patch
        from ..suppress import DEFAULT_MARGIN, build_class_suppression

        kind, num = parse_forget(request)
        path = Path(folder) / "patches" / f"{method}-{request.replace(':', '')}.pepatch"
        path.parent.mkdir(exist_ok=True)
        margin, records, seconds, nbytes, n_records, affine = DEFAULT_MARGIN, [], 0.0, 0, 0, None
        if method in CALIBRATED_CLASS_METHODS:
            from ..runtime.policy import DEFAULT_POLICY
            from ..synth import SynthConfig
            from ..targets import (ClassCalibration, UnseenCalibration, class_calibration_name, class_suppression_margin,
                                   fit_affine_suppression)
            from ..unlearn import build_point_patch
            from .ulira import _with_calibration

            t0 = time.perf_counter()
            point = UnseenCalibration.load(Path(folder) / "unseen-calibration.npz").logits
            ccal = ClassCalibration.load(Path(folder) / class_calibration_name([num]))
            if CALIBRATED_CLASS_METHODS[method] == "affine":  # margin = its floor; w, b on the class's training points
                base_f = PatchedModel(onnx).logits(ds.x_train[ccal.ids])
                affine = fit_affine_suppression(base_f, ccal.logits, ds.y_train[ccal.ids], [num], DEFAULT_POLICY.max_abs_T,
                                                DEFAULT_POLICY.max_abs_t)
            else:
                margin = class_suppression_margin(ccal.logits, point[ccal.ids], ds.y_train[ccal.ids], [num],
                                                  CALIBRATED_CLASS_METHODS[method])
            seconds += time.perf_counter() - t0
            if method not in SUPPRESSION_ONLY_METHODS:  # the class's training points: prune-unseen's records
                rec_path = path.with_name(path.stem + "-records.pepatch")
                rep = build_point_patch(bundle, ids, SynthConfig(mode="collapse", seed=seed, target="unseen"), rec_path,
                                        device="cpu", progress=False, evaluate=False, synth=_with_calibration(ccal.apply(point)))
                records, n_records = [rec_path], rep["records"]
                seconds, nbytes = seconds + rep["build_seconds"], rep["patch_bytes"]
        rep = build_class_suppression(bundle, [num], path, margin=margin, after=records, evaluate=False, affine=affine)
        patches = [*records, path]
        check_patch_set([verify_patch(p, bundle.graph) for p in patches])  # the device's checks, as a set; raises if any fails
        model = PatchedModel(onnx, patches)
        out.update(logits_train=model.logits(ds.x_train), logits_test=model.logits(ds.x_test),
                   seconds=seconds + rep["build_seconds"], ship_bytes=nbytes + rep["patch_bytes"], certified=True,
                   latency_ms=_latency_ms(onnx, patches, batch), records=n_records, margin=margin)
        return out
    if method in PRUNE_METHODS:
        from ..runtime.verify import verify_patch
        from ..synth import SynthConfig
        from ..unlearn import build_point_patch

        mode, target = PRUNE_METHODS[method]
        path = Path(folder) / "patches" / f"{method}-{request.replace(':', '')}.pepatch"
        path.parent.mkdir(exist_ok=True)
        synth = None
        kind, num = parse_forget(request)
        if method == "prune-unseen" and kind == "class":  # rows of the class from models trained without it
            from ..targets import ClassCalibration, UnseenCalibration, class_calibration_name
            from .ulira import _with_calibration

            point = UnseenCalibration.load(Path(folder) / "unseen-calibration.npz").logits
            synth = _with_calibration(ClassCalibration.load(Path(folder) / class_calibration_name([num])).apply(point))
        rep = build_point_patch(bundle, ids, SynthConfig(mode=mode, seed=seed, target=target), path, device="cpu",
                                progress=False, evaluate=False, synth=synth)
        verify_patch(path, bundle.graph)  # the device's checks, format to certificate; raises if any fails
        model = PatchedModel(onnx, [path])
        out.update(logits_train=model.logits(ds.x_train), logits_test=model.logits(ds.x_test),
                   seconds=rep["build_seconds"], ship_bytes=rep["patch_bytes"], certified=True,
                   latency_ms=_latency_ms(onnx, [path], batch), records=rep["records"])
        return out
    from .baselines import unlearn

    res = unlearn(method, bundle.net, ds.x_train, ds.y_train, ids, ds.n_classes, bundle.train_config, seed)
    copies = res.extra.get("shards_retrained", 1) if method == "sisa" else 1
    n_models = res.extra.get("shards", 1)
    out.update(logits_train=res.logits(ds.x_train), logits_test=res.logits(ds.x_test), seconds=res.seconds,
               ship_bytes=base_bytes * copies, certified=None, latency_ms=n_models * _latency_ms(onnx, [], batch), **res.extra)
    return out


# ----------------------------------------------------------------------------- metrics
def run_metrics(run: dict[str, Any], retrain: dict[str, Any], y_train: np.ndarray, y_test: np.ndarray, unseen: np.ndarray,
                lira: tuple[np.ndarray, np.ndarray], n_train: int, seed: int,
                forgotten_classes: tuple[int, ...] = ()) -> tuple[dict[str, Any], dict[str, Any]]:
    """The per-run numbers, and the attack scores (for ROC plots). ``test_acc_retained`` is the test
    accuracy on the points whose label is not a forgotten class (all test points for a point request):
    forgetting a class loses its test images by definition, so a class request is judged on the rest."""
    ids = run["forget_ids"]
    keep = np.ones(n_train, bool)
    keep[ids] = False
    lt, ls = run["logits_train"], run["logits_test"]
    pred_t, pred_s = lt.argmax(1), ls.argmax(1)
    retained = ~np.isin(y_test, list(forgotten_classes))
    r_t, r_s = retrain["logits_train"].argmax(1), retrain["logits_test"].argmax(1)
    loss_f = M.per_sample_loss(lt[ids], y_train[ids])
    loss_u = M.per_sample_loss(ls[unseen], y_test[unseen])
    shadow_conf, shadow_in = lira
    pool_f, pool_u = ids, n_train + unseen
    conf_f = M.logit_confidence(lt[ids], y_train[ids])
    conf_u = M.logit_confidence(ls[unseen], y_test[unseen])
    lira_f = M.lira_scores(conf_f, shadow_conf[:, pool_f], shadow_in[:, pool_f])
    lira_u = M.lira_scores(conf_u, shadow_conf[:, pool_u], shadow_in[:, pool_u])
    ulira = run.get("ulira")
    if ulira is not None:  # (unlearned shadows' confidences on the candidates, their membership, unseen test idx)
        u_conf, u_in, neg = ulira
        nf = len(ids)
        t_conf = np.concatenate([conf_f, M.logit_confidence(ls[neg], y_test[neg])])
        u_scores = M.lira_scores(t_conf, u_conf, u_in)
        ul = M.attack_summary(u_scores[:nf], u_scores[nf:])
    loss = M.attack_summary(-loss_f, -loss_u)
    lr = M.attack_summary(lira_f, lira_u)
    ch = M.challenge_attack(loss_f, loss_u, seed=seed)
    row = {
        "forget_acc": M.accuracy(pred_t[ids], y_train[ids]),
        "retain_acc": M.accuracy(pred_t[keep], y_train[keep]),
        "test_acc": M.accuracy(pred_s, y_test),
        "test_acc_retained": M.accuracy(pred_s[retained], y_test[retained]),
        "agree_forget": M.agreement(pred_t[ids], r_t[ids]),
        "agree_test": M.agreement(pred_s, r_s),
        "mean_loss_forget": float(loss_f.mean()),
        "mean_loss_unseen": float(loss_u.mean()),
        "loss_auc": loss["auc"], "loss_tpr_1pct": loss["tpr_at_1pct_fpr"], "loss_tpr_0.1pct": loss["tpr_at_0.1pct_fpr"],
        "challenge_acc": ch["accuracy"],
        "lira_auc": lr["auc"], "lira_tpr_1pct": lr["tpr_at_1pct_fpr"], "lira_tpr_0.1pct": lr["tpr_at_0.1pct_fpr"],
        "ulira_auc": ul["auc"] if ulira is not None else None,
        "ulira_tpr_1pct": ul["tpr_at_1pct_fpr"] if ulira is not None else None,
        "ulira_tpr_0.1pct": ul["tpr_at_0.1pct_fpr"] if ulira is not None else None,
        "seconds": float(run["seconds"]), "ship_bytes": int(run["ship_bytes"]), "latency_ms": float(run["latency_ms"]),
    }
    if run.get("certified") is not None:
        row["certified"] = bool(run["certified"])
    if run.get("margin") is not None:  # a suppression patch's margin (calibrated per base for the calibrated methods)
        row["margin"] = float(run["margin"])
    scores = {"loss": (-loss_f, -loss_u), "lira": (lira_f, lira_u)}
    if ulira is not None:
        scores["ulira"] = (u_scores[:nf], u_scores[nf:])
    return row, scores


METRIC_KEYS = ("forget_acc", "retain_acc", "test_acc", "test_acc_retained", "agree_forget", "agree_test", "mean_loss_forget", "mean_loss_unseen",
               "loss_auc", "loss_tpr_1pct", "loss_tpr_0.1pct", "challenge_acc", "lira_auc", "lira_tpr_1pct",
               "lira_tpr_0.1pct", "ulira_auc", "ulira_tpr_1pct", "ulira_tpr_0.1pct", "seconds", "ship_bytes", "latency_ms")


def acceptance(summary: dict[str, dict[str, Any]], base_test: dict[str, Any], certified: bool,
               method: str = "prune-unseen", kind: str = "random") -> dict[str, Any]:
    """The issue's bar for ``method`` (prune-unseen) against retrain (on the means over seeds); each
    item says its numbers, so the report can say plainly which hold. For a class request ``base_test``
    is the base's accuracy on the retained classes' test points and the test item compares the method's
    accuracy on those same points (a model without the class necessarily loses the class's images)."""
    if method not in summary or "retrain" not in summary:
        return {}
    u, r = summary[method], summary["retrain"]
    g = lambda s, k: s[k]["mean"]  # noqa: E731
    items = {
        "loss_auc_within_0.05_of_retrain": (abs(g(u, "loss_auc") - g(r, "loss_auc")) <= 0.05, g(u, "loss_auc"), g(r, "loss_auc")),
        "lira_tpr_1pct_at_most_retrain_plus_0.01": (g(u, "lira_tpr_1pct") <= g(r, "lira_tpr_1pct") + 0.01, g(u, "lira_tpr_1pct"), g(r, "lira_tpr_1pct")),
        "forget_acc_within_5pp_of_retrain": (abs(g(u, "forget_acc") - g(r, "forget_acc")) <= 0.05, g(u, "forget_acc"), g(r, "forget_acc")),
        **({"retained_class_test_acc_within_0.5pp_of_base": (abs(g(u, "test_acc_retained") - base_test["mean"]) <= 0.005,
                                                             g(u, "test_acc_retained"), base_test["mean"])} if kind == "class" else
           {"test_acc_within_0.5pp_of_base": (abs(g(u, "test_acc") - base_test["mean"]) <= 0.005, g(u, "test_acc"), base_test["mean"])}),
        "certificate_checks_pass": (certified, None, None),
    }
    if g(u, "ulira_tpr_1pct") is not None and g(r, "ulira_tpr_1pct") is not None:  # beyond the bar: U-LiRA too
        items["ulira_tpr_1pct_at_most_retrain_plus_0.01"] = (g(u, "ulira_tpr_1pct") <= g(r, "ulira_tpr_1pct") + 0.01,
                                                             g(u, "ulira_tpr_1pct"), g(r, "ulira_tpr_1pct"))
    return {k: {"holds": bool(v[0]), "value": v[1], "reference": v[2]} for k, v in items.items()}


def machine() -> dict[str, Any]:
    import os

    import onnxruntime
    import torch

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__, "cuda": torch.cuda.is_available()}


# ----------------------------------------------------------------------------- driver
def run_grid(cfg: GridConfig, out: Path, progress: bool = True) -> dict[str, Any]:
    """Run the grid into ``out``; return the JSON-able results (also written by :mod:`.report`)."""
    from ..targets import calibrate_unseen, class_calibration, class_calibration_name, fold_masks
    from .executor import make_executor
    from .ulira import attacker_calibration, candidates, task_ulira, write_shadow_calibration

    _one_thread()
    t_start = time.perf_counter()
    requests = {f: parse_forget(f) for f in cfg.forget}
    unknown = [m for m in cfg.methods if m not in ALL_METHODS]
    if unknown:
        raise ValueError(f"--methods: unknown {unknown}; expected a subset of {list(ALL_METHODS)}")
    methods = list(dict.fromkeys(["retrain", *cfg.methods]))  # agreement needs retrain
    u_methods = tuple(m for m in cfg.ulira_methods if m in methods)
    ku = min(cfg.ulira_shadows, cfg.shadows) if u_methods else 0
    ds = _dataset(cfg.dataset)
    n_train, n_test = len(ds.y_train), len(ds.y_test)
    y_pool = np.concatenate([ds.y_train, ds.y_test])
    seeds = list(range(cfg.seeds))
    out.mkdir(parents=True, exist_ok=True)
    classes = sorted({num for kind, num in requests.values() if kind == "class"})
    with make_executor(cfg.workers, cfg.ray_address) as ex:
        folders = [str(out / "bases" / f"seed{s}") for s in seeds]
        bases = ex.map(task_base, [(cfg.dataset, cfg.arch, f, s, cfg.epochs) for f, s in zip(folders, seeds)], "bases", progress)
        # Attacker's shadows on the pool (train + test; the first ku kept as base folders for U-LiRA);
        # server's calibration shadows on the training set only, and per class request without the class.
        attack_in = np.random.default_rng(ATTACK_SEED).random((cfg.shadows, n_train + n_test)) < 0.5
        shadow_dirs = [str(out / "shadows" / f"k{k}") if k < ku else None for k in range(cfg.shadows)]
        jobs = [(cfg.dataset, cfg.arch, attack_in[k], ATTACK_SEED + k, cfg.epochs, shadow_dirs[k]) for k in range(cfg.shadows)]
        use_unseen = any(PRUNE_METHODS.get(m, ("", ""))[1] == "unseen" or m in CALIBRATED_CLASS_METHODS for m in methods)
        if "prune-unseen" not in methods and not any(m in CALIBRATED_CLASS_METHODS for m in methods):
            classes = []  # only prune-unseen and the calibrated suppressions calibrate class requests without the class
        calib_in = np.zeros_like(attack_in)
        class_jobs: list[int] = []
        if use_unseen:
            calib_in[:, :n_train] = fold_masks(n_train, cfg.shadows, seed=0)
            jobs += [(cfg.dataset, cfg.arch, calib_in[k], 10_000 + k, cfg.epochs) for k in range(cfg.shadows)]
            for c in classes:
                without = np.zeros(n_train + n_test, bool)
                without[:n_train] = ds.y_train != c
                jobs += [(cfg.dataset, cfg.arch, without, 20_000 + 100 * c + k, cfg.epochs) for k in range(cfg.class_shadows)]
                class_jobs += [c] * cfg.class_shadows
        t0 = time.perf_counter()
        shadow_logits = ex.map(task_shadow, jobs, "shadow models", progress)
        shadow_seconds = time.perf_counter() - t0
        attack_logits = np.stack(shadow_logits[: cfg.shadows])
        shadow_conf = np.stack([M.logit_confidence(l, y_pool) for l in attack_logits])
        calibrations: dict[str, Any] = {}
        class_pool: dict[int, Any] = {}  # class -> calibration of the class's pool points (train and test), for U-LiRA
        if use_unseen:
            cl = np.stack(shadow_logits[cfg.shadows : 2 * cfg.shadows])
            cal = calibrate_unseen(cl[:, :n_train], calib_in[:, :n_train], ds.y_train)  # no test point enters the fit
            calibrations["points"] = cal.summary()
            rest = shadow_logits[2 * cfg.shadows :]
            for c in classes:
                lg = np.stack([l for l, cc in zip(rest, class_jobs) if cc == c])
                ids = np.flatnonzero(ds.y_train == c)
                ccal = class_calibration(lg[:, ids], ids, ds.y_train[ids], [c])
                calibrations[f"class:{c}"] = ccal.summary()
                pool_ids = np.flatnonzero(y_pool == c)
                class_pool[c] = class_calibration(lg[:, pool_ids], pool_ids, y_pool[pool_ids], [c])
                for f in folders:
                    ccal.save(Path(f) / class_calibration_name([c]))
            for f in folders:  # the calibration depends on the training set only: the same for every base
                cal.save(Path(f) / "unseen-calibration.npz")
        tasks = [(f, m, req, s) for req in cfg.forget for f, s in zip(folders, seeds) for m in methods
                 if applies(m, requests[req][0])]
        runs = ex.map(task_method, tasks, "methods x seeds", progress)
        ulira_jobs, ulira_keys = [], []
        if ku:
            # The attacker's own unseen calibration per shadow: one other shadow that never saw the point.
            att_cal = [attacker_calibration(attack_logits, attack_in, k) for k in range(ku)]
            for k in range(ku):
                write_shadow_calibration(shadow_dirs[k], att_cal[k], cfg.shadows)
            for req, (kind, num) in requests.items():
                for s in seeds:
                    cand, neg = candidates(kind, num, request_ids(req, ds.y_train, s), ds.y_test, n_train, s)
                    for k in range(ku):
                        pool_cal = class_pool[num].apply(att_cal[k]) if kind == "class" and num in class_pool else att_cal[k]
                        ulira_jobs.append((shadow_dirs[k], cfg.dataset, u_methods, cand, pool_cal, s))
                        ulira_keys.append((req, s, k, cand, neg))
        t0 = time.perf_counter()
        ulira_out = ex.map(task_ulira, ulira_jobs, "U-LiRA shadows", progress) if ulira_jobs else []
        ulira_seconds = time.perf_counter() - t0

    by_key = {(r["request"], r["seed"], r["method"]): r for r in runs}
    for req in cfg.forget:  # U-LiRA inputs per run: unlearned shadows' confidences, membership, unseen idx
        for s in seeds:
            got = [(key, o) for key, o in zip(ulira_keys, ulira_out) if key[0] == req and key[1] == s]
            if not got:
                continue
            cand, neg = got[0][0][3], got[0][0][4]
            u_in = np.stack([attack_in[key[2], cand] for key, _ in got])
            for m in u_methods:
                u_conf = np.stack([M.logit_confidence(o[m], y_pool[cand]) for _, o in got])
                by_key[(req, s, m)]["ulira"] = (u_conf, u_in, neg)

    results: dict[str, Any] = {
        "config": {**asdict(cfg), "methods": methods},
        "machine": machine(),
        "recipes": {**PRUNE_RECIPES, **RECIPES},
        "bases": {"per_seed": bases, "test_acc": M.mean_std([b["test_accuracy"] for b in bases])},
        "shadows": {"attack": cfg.shadows, "calibration": cfg.shadows if use_unseen else 0,
                    "class_calibration": cfg.class_shadows if use_unseen and classes else 0,
                    "ulira": ku, "ulira_methods": list(u_methods) if ku else [], "ulira_seconds": ulira_seconds,
                    "seconds_all": shadow_seconds, "calibration_summary": calibrations},
        "requests": {},
    }
    for req in cfg.forget:
        kind, num = parse_forget(req)
        unseen = np.arange(n_test) if kind == "random" else np.flatnonzero(ds.y_test == num)
        per: dict[str, list[dict[str, Any]]] = {m: [] for m in methods if applies(m, kind)}
        gone = (num,) if kind == "class" else ()
        base_ref = M.mean_std([retained_accuracy(b, list(gone)) for b in bases]) if kind == "class" else results["bases"]["test_acc"]
        roc: dict[str, Any] = {}
        for s in seeds:
            ret = by_key[(req, s, "retrain")]
            for m in per:
                row, scores = run_metrics(by_key[(req, s, m)], ret, ds.y_train, ds.y_test, unseen, (shadow_conf, attack_in),
                                          n_train, s, gone)
                per[m].append(row)
                if s == seeds[0]:
                    roc[m] = {k: [v[0].tolist(), v[1].tolist()] for k, v in scores.items()}
        summary = {m: {k: M.mean_std([r[k] for r in rows]) for k in METRIC_KEYS} for m, rows in per.items()}
        certified = lambda m: all(r.get("certified", False) for r in per.get(m, []))  # noqa: E731
        results["requests"][req] = {
            "unseen_points": "all test points" if kind == "random" else f"test points of class {num}",
            "forget_points": int(len(by_key[(req, seeds[0], "retrain")]["forget_ids"])),
            "runs": per, "summary": summary, "scores_seed0": roc,
            "base_test_acc_retained": base_ref,
            "suppression_margins": {m: M.mean_std([r.get("margin") for r in rows]) for m, rows in per.items() if m in CLASS_METHODS},
            "acceptance_prune_unseen": acceptance(summary, base_ref, certified("prune-unseen"), kind=kind),
        }
        if kind == "class":
            for m in ("prune-unseen-pointcal", *CLASS_METHODS):
                if m in summary:
                    results["requests"][req][f"acceptance_{m.replace('-', '_')}"] = acceptance(
                        summary, base_ref, certified(m), m, kind)
    results["total_seconds"] = time.perf_counter() - t_start
    return results
