"""The device path (runtime, predict, certify) must work where torch cannot be imported."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
import textwrap

import numpy as np

# A meta-path hook that makes every torch import fail, as on a device without torch.
BLOCK_TORCH = textwrap.dedent(
    """
    import sys
    class _NoTorch:
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ImportError("torch is not available on this device")
            return None
    sys.meta_path.insert(0, _NoTorch())
    """
)


def _run(tmp_path, code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", BLOCK_TORCH + textwrap.dedent(code)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )


def test_import_runtime_without_torch(tmp_path):
    res = _run(tmp_path, """
        import prune_edge, prune_edge.runtime, prune_edge.cli
        from prune_edge.runtime import PatchedModel, certify_patch
        assert "torch" not in sys.modules
        print("ok")
    """)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"


def test_blocker_really_blocks(tmp_path):
    res = _run(tmp_path, "import torch")
    assert res.returncode != 0 and "not available on this device" in res.stderr


def test_predict_certify_and_verify_sample_without_torch(tmp_path, mlp_bundle, patches, forget_ids):
    """A device without torch: base.onnx and its base.card.json, a patch; certify (with a probe of its
    own inputs), predict and verify-sample all run and agree with the in-process runtime."""
    patch, _ = patches["prune"]
    x = mlp_bundle.dataset.x_test[:7]
    np.save(tmp_path / "x.npy", x)
    i = int(forget_ids[0])
    np.save(tmp_path / "s.npy", mlp_bundle.dataset.x_train[i])
    label = int(mlp_bundle.dataset.y_train[i])
    base = str(mlp_bundle.onnx_path)
    res = _run(tmp_path, f"""
        from prune_edge.cli import main
        import sys
        for args in (["certify", "--base", {base!r}, "--patch", {str(patch)!r}, "--probe", "x.npy", "--json"],
                     ["predict", "--base", {base!r}, "--patch", {str(patch)!r},
                      "--input", "x.npy", "--json", "--logits-out", "l.npy"],
                     ["verify-sample", "--base", {base!r}, "--patch", {str(patch)!r}, "--sample", "s.npy",
                      "--label", "{label}", "--json"]):
            try:
                main(args)
            except SystemExit as e:
                assert e.code in (0, None), (args[0], e.code)
        assert "torch" not in sys.modules
    """)
    assert res.returncode == 0, res.stderr
    docs = [json.loads(d) for d in res.stdout.replace("}\n{", "}\n\x00{").split("\x00")]
    assert len(docs) == 3
    assert docs[0]["passed"] is True and [c["name"] for c in docs[0]["set"]] == ["interference", "probe"]
    from prune_edge.runtime import PatchedModel

    expected = PatchedModel(mlp_bundle.onnx_path, [patch]).logits(x)
    assert docs[1]["labels"] == expected.argmax(1).tolist()
    np.testing.assert_array_equal(np.load(tmp_path / "l.npy"), expected)
    assert docs[2]["status"] == "forgotten" and docs[2]["covered_by"]["gate"] == 1.0


def test_plain_install_requires_no_torch():
    """The installed distribution's unconditional requirements are the device set (no torch)."""
    reqs = importlib.metadata.requires("prune-edge") or []
    plain = [r for r in reqs if "extra ==" not in r]
    names = {r.split(";")[0].split(">")[0].split("=")[0].split("<")[0].strip().lower() for r in plain}
    assert names == {"numpy", "onnx", "onnxruntime", "click"}
    server = [r for r in reqs if 'extra == "server"' in r]
    assert any(r.startswith("torch") for r in server)
