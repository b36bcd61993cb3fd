"""Unlearning metrics through onnxruntime (the device path): accuracies and logit locality."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .runtime.fileio import PathLike
from .runtime.model import PatchedModel

LOCALITY_ATOL = 1e-5


def _acc(pred: np.ndarray, y: np.ndarray) -> float | None:
    # None (JSON null, "n/a" in tables) for an empty split, e.g. a request that forgets every point
    return float((pred == y).mean()) if len(y) else None


def evaluate_patch(
    base_onnx: PathLike,
    patches: Sequence[PathLike],
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    forget_ids: np.ndarray,
) -> dict[str, Any]:
    """Accuracy before/after on forget, retain and test; how many retained and test points keep
    their logits (max |delta| <= 1e-5), and how many any gate touches."""
    base = PatchedModel(base_onnx)
    patched = PatchedModel(base_onnx, patches)
    keep = np.ones(len(x_train), bool)
    keep[forget_ids] = False
    splits = {
        "forget": (x_train[forget_ids], y_train[forget_ids]),
        "retain": (x_train[keep], y_train[keep]),
        "test": (x_test, y_test),
    }
    out: dict[str, Any] = {"accuracy": {}, "locality": {}}
    for name, (x, y) in splits.items():
        lb, (lp, cover) = base.logits(x), patched.logits_and_coverage(x)
        out["accuracy"][name] = {"before": _acc(lb.argmax(1), y), "after": _acc(lp.argmax(1), y)}
        if name != "forget":
            delta = np.abs(lp - lb).max(axis=1)
            out["locality"][name] = {
                "points": int(len(x)),
                "unchanged": int((delta <= LOCALITY_ATOL).sum()),
                "bit_identical": int((lp == lb).all(axis=1).sum()),
                "gate_touched": int(cover.covered.sum()),
                "max_abs_delta": float(delta.max()) if len(delta) else 0.0,
            }
        else:
            out["forget_changed"] = int((lp.argmax(1) != lb.argmax(1)).sum())
            out["forget_points"] = int(len(x))
            out["forget_pred_after"] = lp.argmax(1).tolist()
    return out
