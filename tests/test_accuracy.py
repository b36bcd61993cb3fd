"""Default recipes reach the accuracy the project promises, measured through onnxruntime."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")

from prune_edge.basedir import load_base, train_base  # noqa: E402
from prune_edge.runtime import PatchedModel  # noqa: E402


@pytest.mark.slow
@pytest.mark.parametrize(
    "dataset, arch, floor",
    [
        pytest.param("mnist5k", "cnn", 0.95, id="mnist5k-cnn"),
        pytest.param("digits", "mlp", 0.95, id="digits-mlp"),
    ],
)
def test_default_recipe_accuracy(tmp_path, dataset, arch, floor):
    out = tmp_path / f"{dataset}-{arch}"
    card = train_base(dataset, arch, out, seed=0, progress=False)
    bundle = load_base(out)
    ds = bundle.dataset
    acc = float((PatchedModel(bundle.onnx_path).predict(ds.x_test) == ds.y_test).mean())
    assert acc == pytest.approx(card["metrics"]["test_accuracy"])
    assert acc >= floor, f"{dataset} {arch}: test accuracy {acc:.4f} through onnxruntime, expected >= {floor}"
    assert json.loads((out / "card.json").read_text())["training"]["epochs"] == card["training"]["epochs"]


def test_mnist5k_mlp_accuracy(mlp_bundle):
    ds = mlp_bundle.dataset
    acc = float((PatchedModel(mlp_bundle.onnx_path).predict(ds.x_test) == ds.y_test).mean())
    assert acc >= 0.93, f"mnist5k mlp: test accuracy {acc:.4f} through onnxruntime, expected >= 0.93"
