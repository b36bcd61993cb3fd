"""U-LiRA (Hayes et al., "Inexact unlearning needs more careful evaluations to avoid a false sense of
privacy", SaTML 2025, arXiv 2403.01218): LiRA whose shadow models were *unlearned by the method under test*.

Plain LiRA compares a forgotten point's confidence with shadows that trained on it and shadows that
never saw it; an inexact method leaves traces that neither side models. U-LiRA asks the question the
method must answer: does a model that learnt the point and then unlearnt it *with this method* look
like a model that never saw it? Per point it fits one Gaussian to the unlearned shadows' confidences
and one to the never-saw shadows', and scores the target by the likelihood ratio.

Here the attacker's shadows are the LiRA shadows (random halves of the pool train + test). For one
request, the candidate points are the request's forget points plus as many unseen points (all test
points of the class for ``class:K``); in shadow k every candidate that was in its training set is
unlearned with the method (a forget set of about the request's size), so each candidate is unlearned
in about half of the shadows and never seen by the rest. PRUNE methods need a base folder per shadow:
:func:`write_shadow_base` writes one (ONNX, weights, device card) for the shadow's own training set,
and the unseen target's calibration for it comes from the *other* attacker shadows: each point takes
the output of one shadow that never saw it (:func:`attacker_calibration`), the analogue in the
shadows' half-size world of the server's out-of-fold models; for ``class:K`` the class's points take
the models trained without the class.
"""

from __future__ import annotations

import functools
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

SHADOW_META = "shadow.json"


def write_shadow_base(net: Any, member: np.ndarray, config: Any, stats: dict[str, Any], dataset: str, folder: str | Path) -> None:
    """A base folder for an attacker shadow: base.onnx, weights.pt, the device card (its gate step from
    the shadow's own training set) and a card with what :func:`load_shadow_base` and the patch builder
    read. Its training set is the pool (train then test) rows in ``member`` (members.npy)."""
    import torch

    from ..basedir import ONNX_NAME, WEIGHTS_NAME, write_device_card
    from ..exporters.onnx_base import export_base
    from .grid import _dataset

    ds = _dataset(dataset)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    x = np.concatenate([ds.x_train, ds.x_test])[member]
    export = export_base(net, ds.input_shape, folder / ONNX_NAME)
    torch.save(net.state_dict(), folder / WEIGHTS_NAME)
    write_device_card(folder / ONNX_NAME, x, ds.n_classes)
    np.save(folder / "members.npy", np.asarray(member, bool))
    card = {"arch": config.arch, "config": net.config, "input_shape": list(ds.input_shape), "n_classes": ds.n_classes,
            "training": {**config.to_card(), "training_seconds": stats["training_seconds"]}, "onnx": export.to_card(),
            "dataset": {"source": dataset, "shadow_of_pool": True}}
    (folder / SHADOW_META).write_text(json.dumps(card, indent=2) + "\n")


def load_shadow_base(folder: str | Path, dataset: str) -> Any:
    """A :class:`~prune_edge.basedir.BaseBundle` whose training set is the shadow's pool members."""
    import torch

    from ..basedir import WEIGHTS_NAME, BaseBundle
    from ..data.dataset import Dataset
    from ..models.nets import build_model
    from .grid import _dataset

    folder = Path(folder)
    card = json.loads((folder / SHADOW_META).read_text())
    ds = _dataset(dataset)
    member = np.load(folder / "members.npy")
    x = np.concatenate([ds.x_train, ds.x_test])
    y = np.concatenate([ds.y_train, ds.y_test])
    net = build_model(card["arch"], card["input_shape"], card["n_classes"], card["config"])
    net.load_state_dict(torch.load(folder / WEIGHTS_NAME, map_location="cpu", weights_only=True))
    net.eval()
    data = Dataset(name=f"{dataset}-shadow", x_train=x[member], y_train=y[member], x_test=x[~member], y_test=y[~member],
                   n_classes=ds.n_classes, split="shadow")
    return BaseBundle(path=folder, card=card, net=net, dataset=data)


def candidates(kind: str, num: int, forget_ids: np.ndarray, y_test: np.ndarray, n_train: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(pool indices of the candidate points: forget points then unseen ones, the unseen test indices)."""
    if kind == "class":
        neg = np.flatnonzero(y_test == num)
    else:
        neg = np.sort(np.random.default_rng(seed + 4099).choice(len(y_test), min(len(forget_ids), len(y_test)), replace=False))
    return np.concatenate([np.asarray(forget_ids, np.int64), n_train + neg]), neg


def _with_calibration(logits: np.ndarray):
    """synthesize with the given unseen calibration (a class request's rows replaced), whatever the
    folder's cached file holds."""
    from ..synth import synthesize

    def synth(*args: Any, calibration: Any = None, **kwargs: Any) -> Any:
        return synthesize(*args, calibration=logits, **kwargs)

    return synth


def task_ulira(folder: str, dataset: str, methods: tuple[str, ...], cand: np.ndarray, calibration: np.ndarray | None,
               seed: int) -> dict[str, np.ndarray]:
    """Apply each method to shadow ``folder`` with forget set = the candidates in its training set;
    return each unlearned shadow's logits on the candidates (float32)."""
    from ..runtime.model import PatchedModel
    from ..runtime.verify import verify_patch
    from ..synth import SynthConfig
    from ..unlearn import build_point_patch
    from .baselines import unlearn
    from .grid import PRUNE_METHODS, _one_thread

    _one_thread()
    bundle = load_shadow_base(folder, dataset)
    member = np.load(Path(folder) / "members.npy")
    local = np.cumsum(member) - 1  # pool index -> row of the shadow's training set
    forget = np.sort(local[cand[member[cand]]])
    ds = _dataset_pool(dataset)
    xc = ds[0][cand]
    out: dict[str, np.ndarray] = {}
    for method in methods:
        if method in PRUNE_METHODS:
            mode, target = PRUNE_METHODS[method]
            synth = _with_calibration(calibration[member]) if target == "unseen" else None
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "p.pepatch"
                build_point_patch(bundle, forget, SynthConfig(mode=mode, seed=seed, target=target), path, device="cpu",
                                  progress=False, evaluate=False, ledger=Path(tmp) / "ledger", synth=synth)
                verify_patch(path, bundle.graph)
                out[method] = PatchedModel(bundle.onnx_path, [path]).logits(xc).astype(np.float32)
        else:
            res = unlearn(method, bundle.net, bundle.dataset.x_train, bundle.dataset.y_train, forget, bundle.dataset.n_classes,
                          bundle.train_config, seed)
            out[method] = res.logits(xc).astype(np.float32)
    return out


@functools.lru_cache(maxsize=2)
def _dataset_pool(dataset: str) -> tuple[np.ndarray, np.ndarray]:
    from .grid import _dataset

    ds = _dataset(dataset)
    return np.concatenate([ds.x_train, ds.x_test]), np.concatenate([ds.y_train, ds.y_test])


def attacker_calibration(logits: np.ndarray, in_mask: np.ndarray, k: int) -> np.ndarray:
    """For shadow ``k``: per pool point, the logits (K, N, C) of the next shadow (cyclically) that never
    saw it; the mean of all shadows for a point every other shadow saw."""
    K, N = in_mask.shape
    out = np.asarray(logits, np.float64).mean(axis=0)
    done = np.zeros(N, bool)
    for step in range(1, K):
        j = (k + step) % K
        pick = ~in_mask[j] & ~done
        out[pick] = logits[j][pick]
        done |= pick
    return out


def write_shadow_calibration(folder: str | Path, pool_logits: np.ndarray, shadows: int) -> None:
    """The attacker's point calibration for shadow ``folder`` (rows of its members), cached where
    :func:`prune_edge.targets.load_or_build_calibration` looks, so no shadow of a shadow is trained."""
    from ..targets import UnseenCalibration

    member = np.load(Path(folder) / "members.npy")
    UnseenCalibration(logits=pool_logits[member], scale=1.0, shadows=shadows, out_counts=np.ones(int(member.sum()), np.int64),
                      ks_distance=float("nan"), out_accuracy=float("nan")).save(Path(folder) / "unseen-calibration.npz")
