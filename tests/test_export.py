"""The exported base: ONNX parity with torch, the public tensor contract in card.json, determinism."""

from __future__ import annotations

import copy
import hashlib
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

torch = pytest.importorskip("torch")

from prune_edge.basedir import CARD_NAME, DEVICE_CARD_NAME, ONNX_NAME, WEIGHTS_NAME  # noqa: E402
from prune_edge.train import TrainConfig, fit  # noqa: E402

PARITY_ATOL = 1e-4


@pytest.fixture(scope="module")
def onnx_model(mlp_base) -> onnx.ModelProto:
    return onnx.load(str(mlp_base / ONNX_NAME), load_external_data=False)


@pytest.fixture(scope="module")
def card(mlp_base) -> dict:
    return json.loads((mlp_base / CARD_NAME).read_text())


def ort_session(model_or_path) -> ort.InferenceSession:
    data = model_or_path.SerializeToString() if isinstance(model_or_path, onnx.ModelProto) else str(model_or_path)
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("batch", [1, 3, 256])
def test_onnx_logits_match_torch(mlp_bundle, batch):
    x = mlp_bundle.dataset.x_test[:batch]
    assert x.dtype == np.float32 and x.shape == (batch, 1, 28, 28)
    out = ort_session(mlp_bundle.onnx_path).run(None, {"input": x})
    assert len(out) == 1
    logits = out[0]
    with torch.no_grad():
        ref = mlp_bundle.net(torch.from_numpy(x)).numpy()
    assert logits.shape == (batch, 10) and logits.dtype == np.float32
    np.testing.assert_allclose(logits, ref, rtol=0, atol=PARITY_ATOL)
    assert (logits.argmax(1) == ref.argmax(1)).all()


def test_onnx_preacts_match_torch(mlp_bundle, onnx_model, card):
    """The named pre-activation tensors patches tap carry exactly torch's hidden pre-activations."""
    names = card["onnx"]["preacts"]
    model = copy.deepcopy(onnx_model)
    for name in names:
        model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    x = mlp_bundle.dataset.x_test[:256]
    out = ort_session(model).run(None, {"input": x})
    with torch.no_grad():
        preacts, logits = mlp_bundle.net.forward_all(torch.from_numpy(x))
    np.testing.assert_allclose(out[0], logits.numpy(), rtol=0, atol=PARITY_ATOL)
    assert len(out) - 1 == len(preacts) == mlp_bundle.net.n_hidden == len(names)
    for got, want, shape in zip(out[1:], preacts, card["onnx"]["preact_shapes"]):
        assert got.shape == (256, *shape) == tuple(want.shape)
        np.testing.assert_allclose(got, want.numpy(), rtol=0, atol=PARITY_ATOL)
        # Both signs occur: these are pre-activations, not post-ReLU values.
        assert (got < 0).any() and (got > 0).any()


def test_onnx_checker_full(onnx_model):
    onnx.checker.check_model(onnx_model, full_check=True)


def test_card_names_exist_in_graph(onnx_model, card):
    o = card["onnx"]
    g = onnx_model.graph
    produced = {t for n in g.node for t in n.output}
    init_names = {i.name for i in g.initializer}
    inputs = [i.name for i in g.input if i.name not in init_names]
    assert inputs == [o["input"]] == ["input"]
    assert o["logits"] == "logits" and o["logits"] in produced
    assert o["preacts"] == [f"preact_{i}" for i in range(len(o["preact_shapes"]))]
    for name in o["preacts"]:
        assert name in produced, f"card names {name!r}, the graph produces no such tensor"
    # The shapes in the card are the ones shape inference finds (what check_binding compares).
    inferred = onnx.shape_inference.infer_shapes(onnx_model).graph
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim[1:]] for v in [*inferred.value_info, *inferred.output]}
    for name, shape in zip(o["preacts"], o["preact_shapes"]):
        assert shapes[name] == shape
    assert shapes[o["logits"]] == [card["n_classes"]]
    assert o["opset"] == next(op.version for op in onnx_model.opset_import if op.domain in ("", "ai.onnx"))
    assert o["ir_version"] == onnx_model.ir_version


def test_single_output_single_file(mlp_base, onnx_model):
    g = onnx_model.graph
    assert [out.name for out in g.output] == ["logits"]
    assert len(g.initializer) > 0
    for t in g.initializer:
        assert t.data_location != onnx.TensorProto.EXTERNAL and not onnx.external_data_helper.uses_external_data(t), t.name
    # (plus ledger/, the server's request records, once a patch has been built from this base)
    assert sorted(p.name for p in mlp_base.iterdir() if p.name != "ledger") == sorted([CARD_NAME, DEVICE_CARD_NAME, ONNX_NAME, WEIGHTS_NAME])
    assert DEVICE_CARD_NAME == "base.card.json"


def test_device_card_binds_the_base(mlp_base, mlp_bundle, onnx_model, card):
    """base.card.json: the base's own sha256, its Relu inputs in graph order with the card's shapes,
    and the gates' step, chosen from the training set's Relu inputs as computed by onnxruntime."""
    from prune_edge.runtime.base import BaseGraph
    from prune_edge.runtime.basecard import BaseCard
    from prune_edge.runtime.patchgraph import choose_scale_log2

    dev = BaseCard.load(mlp_base / DEVICE_CARD_NAME)
    assert dev.base_sha256 == hashlib.sha256((mlp_base / ONNX_NAME).read_bytes()).hexdigest() == card["onnx"]["sha256"]
    assert dev.logits_name == "logits" and dev.n_classes == card["n_classes"] == 10
    relu_in = [n.input[0] for n in onnx_model.graph.node if n.op_type == "Relu"]
    assert [g.name for g in dev.relu_inputs] == relu_in == card["onnx"]["preacts"]
    assert [list(g.shape) for g in dev.relu_inputs] == card["onnx"]["preact_shapes"]
    assert card["device_card"] == {"file": DEVICE_CARD_NAME, "gate_step_log2": dev.gate_step_log2}
    # the step: recomputed independently from every Relu input on the whole training set
    model = copy.deepcopy(onnx_model)
    for name in relu_in:
        model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    out = ort_session(model).run(None, {"input": mlp_bundle.dataset.x_train})
    z = np.concatenate([o.reshape(len(o), -1) for o in out[1:]], axis=1)
    assert dev.gate_step_log2 == choose_scale_log2(z)
    # the device reads it beside base.onnx and checks it against the graph
    assert BaseGraph.load(mlp_base / ONNX_NAME).card == dev


def test_dynamic_batch(onnx_model, mlp_bundle):
    g = onnx_model.graph
    dim0 = g.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_param and not dim0.HasField("dim_value")
    assert [d.dim_value for d in g.input[0].type.tensor_type.shape.dim[1:]] == [1, 28, 28]
    assert g.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    out0 = g.output[0].type.tensor_type.shape.dim[0]
    assert out0.dim_param and not out0.HasField("dim_value")
    sess = ort_session(onnx_model)
    x = mlp_bundle.dataset.x_test[:64]
    whole = sess.run(None, {"input": x})[0]
    parts = np.concatenate([sess.run(None, {"input": x[i : i + 7]})[0] for i in range(0, 64, 7)])
    np.testing.assert_allclose(parts, whole, rtol=0, atol=1e-5)


def test_card_accuracy_and_digests(mlp_base, mlp_bundle, card):
    ds = mlp_bundle.dataset
    assert card["arch"] == "mlp" and card["dataset"]["name"] == "mnist5k"
    assert card["metrics"]["measured_with"] == "onnxruntime"
    assert card["metrics"]["test_accuracy"] >= 0.93
    sess = ort_session(mlp_base / ONNX_NAME)
    acc = float((sess.run(None, {"input": ds.x_test})[0].argmax(1) == ds.y_test).mean())
    assert acc == pytest.approx(card["metrics"]["test_accuracy"], abs=1e-12)
    train_acc = float((sess.run(None, {"input": ds.x_train})[0].argmax(1) == ds.y_train).mean())
    assert train_acc == pytest.approx(card["metrics"]["train_accuracy"], abs=1e-12)
    assert hashlib.sha256((mlp_base / ONNX_NAME).read_bytes()).hexdigest() == card["onnx"]["sha256"]
    assert hashlib.sha256((mlp_base / WEIGHTS_NAME).read_bytes()).hexdigest() == card["weights"]["sha256"]


SUBSET = 500


def _fit(ds, seed: int):
    config = TrainConfig(arch="mlp", seed=seed, epochs=1)
    net, stats = fit(ds.x_train[:SUBSET], ds.y_train[:SUBSET], ds.n_classes, config, device="cpu", progress=False)
    return net.state_dict(), stats


def test_training_is_deterministic_by_seed(mlp_bundle):
    ds = mlp_bundle.dataset
    a, stats_a = _fit(ds, 0)
    b, stats_b = _fit(ds, 0)
    c, _ = _fit(ds, 1)
    assert list(a) == list(b) == list(c) and len(a) == 6
    for key in a:
        assert torch.equal(a[key], b[key]), f"same seed, different {key}"
    assert stats_a["final_loss"] == stats_b["final_loss"]
    assert any(not torch.equal(a[key], c[key]) for key in a), "seed 1 trained the same weights as seed 0"
    # Training really happened: weights moved away from a fresh seed-0 init (1 epoch, 8 steps).
    torch.manual_seed(0)
    from prune_edge.models.nets import build_model

    fresh = build_model("mlp", (1, 28, 28), 10).state_dict()
    assert all(not torch.equal(a[key], fresh[key]) for key in a)
