"""Verified patches as two plain ONNX files, for device applications that are not written in Python.

A C, C++, Java, C# or JavaScript application has onnxruntime but not this package. It can still run
patches without any code of ours: session 1 runs the base with its tapped tensors as extra outputs
(the gated Relu inputs and the logits: the same graph, the same weights, so the same float32 values
the Python runtime's gates read), and session 2 runs the patch correction, fed with those tensors,
and outputs the patched logits. Every record of every patch joins that one correction, with the
same semantics as :func:`.compose.compose` (one selected record acts, :mod:`.patchgraph`), so a chain
runs as one session, not one per file.

The split is made only from patches that passed every check (:func:`.verify.verify_patch`,
:func:`.verify.check_patch_set`), by whoever can run Python (a gateway, the provisioning step, the
update service): the device application then runs graphs, it does not verify them.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Sequence

import onnx
from onnx import TensorProto, helper

from .base import BaseGraph
from .compose import insert_patches
from .errors import StructureError
from .verify import VerifiedPatch

TAPPED_SUFFIX = ".tapped.onnx"


@dataclass(frozen=True)
class SplitSessions:
    """The two graphs and how to wire them: session 2's inputs are session 1's outputs of the same name."""

    base: onnx.ModelProto  # the base with ``feeds`` added as outputs (its own outputs first, unchanged)
    patch: onnx.ModelProto  # inputs ``feeds``; output ``logits_name``, the patched logits
    input_name: str
    feeds: tuple[str, ...]  # the gated tensors the patches read, then the logits
    logits_name: str

    def io(self) -> dict:
        """The wiring, as the JSON a device application reads."""
        return {
            "base_input": self.input_name,
            "base_outputs_to_patch_inputs": list(self.feeds),
            "patched_logits": self.logits_name,
            "semantics": "patched = patch(base tapped outputs); where every gate is closed, patched == base logits bit for bit",
        }


def split_sessions(base: BaseGraph, patches: Sequence[VerifiedPatch]) -> SplitSessions:
    """Build the tapped base and the standalone batched correction for ``patches`` (already verified
    against ``base``, in the order the device runs them)."""
    if not patches:
        raise StructureError("split: expected at least one verified patch, found none")
    logits = base.logits_name
    shapes = base.tensor_shapes()
    gated: list[str] = []
    for vp in patches:
        if vp.manifest.logits_name != logits:
            raise StructureError(f"{vp.source}: patch reads logits {vp.manifest.logits_name!r}, base logits are {logits!r}")
        gated += [g.name for g in vp.manifest.gated if g.name not in gated]
    feeds = (*gated, logits)

    def value_info(name: str) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", *shapes[name]])

    tapped = copy.deepcopy(base.model)
    have = {o.name for o in tapped.graph.output}
    tapped.graph.output.extend(value_info(n) for n in feeds if n not in have)

    # The correction alone: a graph whose "base" is one Identity from the fed logits, so the same
    # splice the runtime uses for composition builds it (one code path, one semantics).
    fed = "pe_in_" + logits
    graph = helper.make_graph(
        [helper.make_node("Identity", [fed], [logits])],
        "prune_edge_patch_session",
        [value_info(n) for n in gated] + [helper.make_tensor_value_info(fed, TensorProto.FLOAT, ["N", *shapes[logits]])],
        [value_info(logits)],
    )
    insert_patches(graph, patches, logits)
    graph.input[-1].name = logits  # the application feeds session 1's logits under their own name ...
    for node in graph.node:  # ... so the Identity reads them directly
        node.input[:] = [logits if i == fed else i for i in node.input]
    out_name = "patched_" + logits
    for node in graph.node:
        node.output[:] = [out_name if o == logits else o for o in node.output]
    graph.output[0].name = out_name
    opsets = [o for o in base.model.opset_import if o.domain in ("", "ai.onnx")]
    patch = helper.make_model(graph, opset_imports=opsets, producer_name="prune-edge")
    patch.ir_version = base.ir_version
    onnx.checker.check_model(patch)
    return SplitSessions(tapped, patch, base.input_name, feeds, out_name)
