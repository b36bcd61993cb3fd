"""Bring your own model: ReLU classifiers prune-edge did not train, imported from the user's ONNX file.

Each supported model (skl2onnx MLPClassifier at IR 8 / opset 17 with its ai.onnx.ml tail, torch MLP
and CNN through both exporters, a torch model with a BatchNormalization node) is imported from the
user's file, patched to forget 20 training points, and checked through the model's OWN outputs
(label, probabilities, ZipMap) in real onnxruntime sessions: every forgotten point changes label,
the test labels do not, certify passes, and the user's file is byte-for-byte what it was. A model
with a Sigmoid hidden layer is refused, naming the node.
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from prune_edge.basedir import load_base  # noqa: E402
from prune_edge.cli import main  # noqa: E402
from prune_edge.data import load_dataset  # noqa: E402
from prune_edge.importer import LOGITS_ATOL, UnsupportedModelError, import_torch_module, inspect_model  # noqa: E402
from prune_edge.importer.convert import net_logits  # noqa: E402
from prune_edge.importer.torch_module import export_module  # noqa: E402
from prune_edge.requests import random_forget_ids, write_forget_ids  # noqa: E402
from prune_edge.runtime.model import PatchedModel  # noqa: E402
from prune_edge.synth import SynthConfig  # noqa: E402
from prune_edge.unlearn import build_point_patch  # noqa: E402

N_FORGET = 20
MODELS = ["sklearn-mlp", "torch-mlp-legacy", "torch-mlp-dynamo", "torch-cnn-legacy", "torch-cnn-dynamo", "torch-bn-legacy",
          "torch-nhwc-legacy"]


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _fit(net: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int = 8) -> nn.Module:
    """A few epochs of Adam: the point is a real trained classifier, not a good one."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    net.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
            opt.step()
    return net.eval()


class _NHWC(nn.Module):
    """A CNN whose input is channels-last (N, H, W, C), as many deployed models are."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 16, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(256, 64),
                                  nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x.permute(0, 3, 1, 2))


def _torch_nets() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {
        "mlp": nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10)),
        # conv + BatchNorm (folded by both exporters) + average pooling + a ReLU head
        "cnn": nn.Sequential(nn.Conv2d(1, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.AvgPool2d(2),
                             nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)),
        # BatchNorm1d after a Linear: the TorchScript exporter keeps it as a BatchNormalization node
        "bn": nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.BatchNorm1d(128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(),
                            nn.Linear(64, 10)),
    }


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """This module on one thread (torch and BLAS): its models are tiny, and multi-threaded kernels on
    a busy 2-core machine were far slower (the sklearn fit measured 18 s against 0.6 s)."""
    from threadpoolctl import threadpool_limits

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(1):
            yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def users(tmp_path_factory, one_thread) -> dict:
    """The users' side: their trained models saved as ONNX files (and their data), made once."""
    return _make_users(tmp_path_factory)


def _make_users(tmp_path_factory) -> dict:
    warnings.filterwarnings("ignore")
    logging.getLogger("torch").setLevel(logging.ERROR)
    root = tmp_path_factory.mktemp("import")
    ds = load_dataset("digits")
    flat = root / "digits-flat.npz"  # sklearn takes flat vectors: its x_train is (N, 64)
    np.savez(flat, x_train=ds.x_train.reshape(len(ds.x_train), -1), y_train=ds.y_train,
             x_test=ds.x_test.reshape(len(ds.x_test), -1), y_test=ds.y_test)
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier
    from skl2onnx import to_onnx

    xf = ds.x_train.reshape(len(ds.x_train), -1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf = MLPClassifier((128, 64), activation="relu", max_iter=100, random_state=0).fit(xf, ds.y_train)
    skl = to_onnx(clf, xf[:1], target_opset={"": 17, "ai.onnx.ml": 1})
    skl.ir_version = 8  # skl2onnx picks the IR from the opset; the deployed file is IR 8
    files = {"sklearn-mlp": (root / "sklearn-mlp.onnx", str(flat))}
    onnx.save(skl, files["sklearn-mlp"][0])
    x, y = torch.from_numpy(ds.x_train), torch.from_numpy(ds.y_train)
    nets = {name: _fit(net, x, y) for name, net in _torch_nets().items()}
    for name in ("mlp", "cnn", "bn"):
        for exporter in ("legacy", "dynamo"):
            if (name, exporter) == ("bn", "dynamo"):
                continue  # torch.export folds the BatchNorm away: covered by the cnn
            path = root / f"torch-{name}-{exporter}.onnx"
            export_module(nets[name], x[:2], path, dynamo=exporter == "dynamo")
            files[f"torch-{name}-{exporter}"] = (path, "digits")
    # channels-last: the dataset's x_train is (N, 8, 8, 1), the model's own layout
    nhwc_npz = root / "digits-nhwc.npz"
    xh, xth = (np.ascontiguousarray(a.transpose(0, 2, 3, 1)) for a in (ds.x_train, ds.x_test))
    np.savez(nhwc_npz, x_train=xh, y_train=ds.y_train, x_test=xth, y_test=ds.y_test)
    nets["nhwc"] = _fit(_NHWC(), torch.from_numpy(xh), y)
    files["torch-nhwc-legacy"] = (export_module(nets["nhwc"], torch.from_numpy(xh[:2]), root / "torch-nhwc-legacy.onnx"), str(nhwc_npz))
    sigmoid = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Sigmoid(), nn.Linear(32, 10)).eval()
    files["sigmoid"] = (export_module(sigmoid, x[:2], root / "sigmoid.onnx"), "digits")
    return {"root": root, "files": files, "nets": nets, "digest": {k: sha256(p) for k, (p, _) in files.items()}}


def _probabilities(outputs: dict, logits_name: str) -> np.ndarray | None:
    """The model's probability output as (N, C): a Softmax tensor or a ZipMap's list of dicts."""
    for name, v in outputs.items():
        if name == logits_name:
            continue
        if isinstance(v, list) and v and isinstance(v[0], dict):
            return np.array([[d[k] for k in sorted(d)] for d in v])
        if isinstance(v, np.ndarray) and v.dtype == np.float32 and v.ndim == 2:
            return v
    return None


@pytest.mark.parametrize("name", MODELS)
def test_imported_model_forgets_through_its_own_outputs(users, name):
    src, dataset = users["files"][name]
    out = users["root"] / f"base-{name}"
    # import-base from the command line, the Python entry point for the torch module once
    result = cli("import-base", src, "--dataset", dataset, "--out", out, "--json")
    assert result.exit_code == 0, result.output
    card = json.loads(result.stdout)
    # the folder holds the user's exact bytes, the import matches onnxruntime on the whole dataset
    assert (out / "base.onnx").read_bytes() == Path(src).read_bytes()
    assert card["onnx"]["sha256"] == users["digest"][name]
    assert card["import"]["checked_points"] == card["dataset"]["n_train"] + card["dataset"]["n_test"]
    plan = inspect_model(src)
    if name == "torch-nhwc-legacy":
        assert plan.input_layout() == "NHWC (N, 8, 8, 1)"
    if name == "torch-bn-legacy":
        assert "BatchNormalization" in {n.op_type for n in onnx.load(src).graph.node}
    if name == "sklearn-mlp":
        m = onnx.load(src)
        assert m.ir_version == 8 and {o.domain or "": o.version for o in m.opset_import}[""] == 17
        assert plan.logits_name != m.graph.output[0].name  # the first output is the label, not the logits

    bundle = load_base(out)
    ds = bundle.dataset
    # the imported net (what synthesis bounds) is the graph onnxruntime runs: logits within 1e-5
    # (relative above 1 in magnitude), on the test split as on the training split the import checked
    ort = PatchedModel(out / "base.onnx").logits(ds.x_test).astype(np.float64)
    gap = np.abs(net_logits(bundle.net, ds.x_test) - ort) / np.maximum(1.0, np.abs(ort))
    assert gap.max() <= LOGITS_ATOL, gap.max()
    ids = random_forget_ids(len(ds.x_train), N_FORGET, seed=0)
    patch = users["root"] / f"{name}.pepatch"
    if name == "sklearn-mlp":  # build-patch from the command line, as for a trained base
        forget = users["root"] / "forget.txt"
        write_forget_ids(forget, ids)
        r = cli("build-patch", "--base", out, "--forget", forget, "--out", patch, "--device", "cpu", "--json")
        assert r.exit_code == 0, r.output
    else:
        build_point_patch(bundle, ids, SynthConfig(seed=0), patch, device="cpu", progress=False)

    # the device: certify, then the user's own outputs, base vs patched, in onnxruntime sessions
    r = cli("certify", "--base", out / "base.onnx", "--patch", patch)
    assert r.exit_code == 0, r.output
    base, patched = PatchedModel(out / "base.onnx"), PatchedModel(out / "base.onnx", [patch])
    # composed graph keeps the user's IR, opsets (ai.onnx.ml included) and output names
    user = onnx.load(src)
    assert patched.model.ir_version == user.ir_version
    assert {(o.domain, o.version) for o in patched.model.opset_import} == {(o.domain, o.version) for o in user.opset_import}
    assert [o.name for o in patched.model.graph.output][: len(user.graph.output)] == [o.name for o in user.graph.output]
    xf, xt = ds.x_train[ids], ds.x_test
    before, after = base.outputs(xf), patched.outputs(xf)
    labels_before, labels_after = np.array(base.labels(xf)), np.array(patched.labels(xf))
    assert (labels_after != labels_before).all(), f"{int((labels_after == labels_before).sum())} forgotten points kept their label"
    probs_before, probs_after = _probabilities(before, base.logits_name), _probabilities(after, patched.logits_name)
    if probs_after is not None:
        # the tail reads the patched logits: its probabilities are their softmax, and their argmax moved
        lo = patched.logits(xf).astype(np.float64)
        soft = np.exp(lo - lo.max(1, keepdims=True))
        np.testing.assert_allclose(probs_after, soft / soft.sum(1, keepdims=True), atol=1e-5)
        assert (probs_after.argmax(1) != probs_before.argmax(1)).all()
        assert (probs_after.argmax(1) == labels_after).all()
    else:  # no tail: the model's one output is the logits
        assert list(after) == [patched.logits_name]
        assert (after[patched.logits_name].argmax(1) != before[base.logits_name].argmax(1)).all()
    test_same = np.mean(np.array(patched.labels(xt)) == np.array(base.labels(xt)))
    assert test_same >= 0.999, f"test labels unchanged on {test_same:.2%}"
    # and predict from the command line: labels for any model, the patched logits wherever they sit
    np.save(users["root"] / "x.npy", xf)
    lo_path = users["root"] / f"{name}-logits.npy"
    r = cli("predict", "--base", out / "base.onnx", "--patch", patch, "--input", users["root"] / "x.npy",
            "--json", "--logits-out", lo_path)
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["labels"] == labels_after.tolist()
    np.testing.assert_array_equal(np.load(lo_path), patched.logits(xf))
    # the user's file, byte for byte
    assert sha256(src) == users["digest"][name]


def test_torch_module_entry_point(users, tmp_path):
    """From a torch module and an example input: the base folder holds the exported file, whose
    logits are the module's."""
    net = users["nets"]["cnn"]
    ds = load_dataset("digits")
    card = import_torch_module(net, torch.from_numpy(ds.x_train[:2]), "digits", tmp_path / "base")
    bundle = load_base(tmp_path / "base")
    assert card["onnx"]["sha256"] == sha256(tmp_path / "base" / "base.onnx")
    with torch.no_grad():
        expected = net(torch.from_numpy(ds.x_test)).numpy()
    np.testing.assert_allclose(PatchedModel(bundle.onnx_path).logits(ds.x_test), expected, atol=1e-4)
    assert [type(m).__name__ for m in bundle.net.layers] == ["Conv2d", "Linear", "Linear"]


def test_sigmoid_hidden_layer_is_refused_naming_the_node(users, tmp_path):
    src, _ = users["files"]["sigmoid"]
    node = next(n for n in onnx.load(src).graph.node if n.op_type == "Sigmoid")
    with pytest.raises(UnsupportedModelError, match=f"Sigmoid node '{node.name}'"):
        inspect_model(src)
    for args in (("inspect-base", src), ("import-base", src, "--dataset", "digits", "--out", tmp_path / "b")):
        r = cli(*args)
        assert r.exit_code == 1
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and node.name in lines[0] and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "b").exists()
    assert sha256(src) == users["digest"]["sigmoid"]


def test_inspect_base_reports_what_it_found(users):
    src, _ = users["files"]["sklearn-mlp"]
    r = cli("inspect-base", src, "--json")
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert s["relu_count"] == 2 and s["n_classes"] == 10 and s["input_layout"] == "flat vectors (N, 64)"
    assert s["logits"] == s["layers"][-1]["output"] and s["relu_inputs"] == [x["output"] for x in s["layers"][:-1]]
    assert "ZipMap (ai.onnx.ml)" in s["tail"] and "Softmax" in s["tail"]


def test_patch_reading_the_probabilities_is_refused_at_binding(users, tmp_path):
    """The attacker's patch for a model with a tail: the same certified records, but reading (and so
    correcting) the Softmax output, a tensor of the very same (N, 10) shape, instead of the logits the
    card names. The device refuses it at binding; the honest twin passes every check."""
    import dataclasses

    from prune_edge.exporters.patch_export import build_patch, new_salt, points_request
    from prune_edge.runtime.errors import IncompatibleBaseError
    from prune_edge.runtime.patchfile import unpack
    from prune_edge.runtime.verify import verify_patch
    from prune_edge.unlearn import base_ref, certs_of
    from prune_edge.synth import synthesize

    src, dataset = users["files"]["sklearn-mlp"]
    r = cli("import-base", src, "--dataset", dataset, "--out", tmp_path / "base")
    assert r.exit_code == 0, r.output
    bundle = load_base(tmp_path / "base")
    softmax = next(n for n in bundle.graph.model.graph.node if n.op_type == "Softmax")
    assert softmax.input[0] == bundle.graph.logits_name == bundle.graph.card.logits_name
    ids = random_forget_ids(len(bundle.dataset.x_train), 5, seed=3)
    config = SynthConfig(seed=3)
    result = synthesize(bundle.net, bundle.dataset.x_train, bundle.dataset.y_train, ids, config,
                        activations=bundle.activations, progress=False)
    honest = base_ref(bundle, result.start)
    request = points_request(ids, new_salt())
    chain = {"position": 0, "after": [], "replaces": []}
    for ref, refused in ((honest, False), (dataclasses.replace(honest, logits_name=softmax.output[0]), True)):
        assert bundle.graph.tensor_shapes()[ref.logits_name] == (10,)
        _, data = build_patch(ref, result.params(), certs_of(result), config.mode, config.q_lower, config.q_upper,
                              request, chain)
        patch = unpack(data, source="p.pepatch")
        if refused:
            with pytest.raises(IncompatibleBaseError, match=f"reads logits '{softmax.output[0]}'"):
                verify_patch(patch, bundle.graph)
        else:
            verify_patch(patch, bundle.graph)
