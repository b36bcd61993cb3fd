"""Export a trained :class:`~prune_edge.models.PreactNet` to a single-file ``base.onnx``.

The exported graph has one input (``input``, (N, C, H, W) float32, dynamic batch) and one output
(``logits``). Every hidden pre-activation is a named tensor ``preact_i`` inside the graph: the device
runtime taps those names when it composes patches, so they are part of the base's public contract
(and listed in ``card.json``), without burdening plain inference with extra outputs.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import onnx
import torch

from ..models.nets import INPUT_NAME, LOGITS_NAME, PreactNet, preact_name
from ..runtime.fileio import PathLike, atomic_write_bytes, sha256_bytes


@dataclass(frozen=True)
class BaseExport:
    """What ``card.json`` records about an exported base graph."""

    path: Path
    sha256: str
    opset: int
    ir_version: int
    input_name: str
    logits_name: str
    preact_names: list[str]
    preact_shapes: list[list[int]]

    def to_card(self) -> dict:
        return {
            "file": self.path.name,
            "sha256": self.sha256,
            "opset": self.opset,
            "ir_version": self.ir_version,
            "input": self.input_name,
            "logits": self.logits_name,
            "preacts": list(self.preact_names),
            "preact_shapes": [list(s) for s in self.preact_shapes],
        }


class _AllOutputs(torch.nn.Module):
    """Export wrapper whose outputs carry the names we want the internal tensors to have."""

    def __init__(self, net: PreactNet):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor):
        preacts, logits = self.net.forward_all(x)
        return (logits, *preacts)


# What torch's exporter prints on every export that is none of the user's business: its op registry
# warns once per torchvision op it skips (torchvision is not a dependency), and torch's pytree
# deprecation shim warns from inside the exporter's own code.
_REGISTRY_LOGGER = "torch.onnx._internal.exporter._registration"
_PYTREE_WARNING = r".*isinstance\(treespec, LeafSpec\).*"


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence exactly those two messages for the duration of one export; everything else (and every
    other logger and warning) still reaches the user."""
    logger = logging.getLogger(_REGISTRY_LOGGER)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_PYTREE_WARNING, category=FutureWarning)
            yield
    finally:
        logger.setLevel(level)


def _simplify(model: onnx.ModelProto) -> onnx.ModelProto:
    """Run onnxsim; keep the original if simplification fails its own check."""
    import onnxsim

    simplified, ok = onnxsim.simplify(model)
    return simplified if ok else model


def to_onnx_model(net: PreactNet, input_shape: tuple[int, ...]) -> onnx.ModelProto:
    """Trace ``net`` (on CPU, eval mode) into a checked ModelProto with named pre-activations."""
    net = net.to("cpu").eval()
    names = [LOGITS_NAME] + [preact_name(i) for i in range(net.n_hidden)]
    example = torch.zeros((2, *input_shape), dtype=torch.float32)
    # The exporter reports progress on stdout; keep stdout for our own data (--json).
    with contextlib.redirect_stdout(sys.stderr), _quiet_exporter():
        program = torch.onnx.export(
            _AllOutputs(net).eval(),
            (example,),
            input_names=[INPUT_NAME],
            output_names=names,
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            dynamo=True,
            verbose=False,
        )
    model = _simplify(program.model_proto)
    # Keep the pre-activations as named internal tensors; only the logits stay a graph output.
    kept = [o for o in model.graph.output if o.name == LOGITS_NAME]
    del model.graph.output[:]
    model.graph.output.extend(kept)
    model.producer_name = "prune-edge"
    onnx.checker.check_model(model, full_check=True)
    produced = {o for n in model.graph.node for o in n.output}
    missing = [n for n in names if n not in produced]
    if missing:
        raise RuntimeError(f"exported graph lost tensors {missing}; onnxsim or the exporter renamed them")
    return model


def export_base(net: PreactNet, input_shape: tuple[int, ...], path: PathLike) -> BaseExport:
    """Export, simplify, check and atomically write ``base.onnx`` (one file, no external data)."""
    model = to_onnx_model(net, input_shape)
    data = model.SerializeToString()
    atomic_write_bytes(path, data)
    with torch.no_grad():
        preacts, _ = net.forward_all(torch.zeros((1, *input_shape)))
    return BaseExport(
        path=Path(path),
        sha256=sha256_bytes(data),
        opset=next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
        ir_version=int(model.ir_version),
        input_name=INPUT_NAME,
        logits_name=LOGITS_NAME,
        preact_names=[preact_name(i) for i in range(net.n_hidden)],
        preact_shapes=[list(z.shape[1:]) for z in preacts],
    )
