"""A device application that runs a patched model with onnxruntime alone: two sessions, no prune-edge.

This is the data flow an application in any language follows (the onnxruntime C, C++, Java, C# and
JavaScript APIs have the same Run call). Prepare the two graphs where Python runs, from patches that
pass every check:

    prune-edge export-sessions --base base-mlp/base.onnx --patch forget.pepatch --out device/

then on the device:

    python examples/two_sessions.py device/ x.npy

Session 1 is the unchanged base with its tapped tensors as extra outputs; session 2 is every
record of every patch as one graph. Where no gate is open, the patched logits equal the base's
bit for bit. Imports numpy and onnxruntime only.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort


def patched_logits(folder: Path, x: np.ndarray) -> np.ndarray:
    io = json.loads((folder / "io.json").read_text())
    base = ort.InferenceSession(str(folder / "base.tapped.onnx"), providers=["CPUExecutionProvider"])
    patch = ort.InferenceSession(str(folder / "patch.onnx"), providers=["CPUExecutionProvider"])
    feeds = io["base_outputs_to_patch_inputs"]
    tapped = base.run(feeds, {io["base_input"]: x})  # session 1: the base, its tapped tensors out
    (logits,) = patch.run([io["patched_logits"]], dict(zip(feeds, tapped)))  # session 2: the patch
    return logits


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: two_sessions.py SESSIONS_DIR INPUT.npy", file=sys.stderr)
        return 2
    x = np.load(argv[1]).astype(np.float32)
    print(json.dumps({"labels": patched_logits(Path(argv[0]), x).argmax(axis=1).tolist()}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
