"""Compose verified patches with an unchanged base graph into one ONNX model.

The base graph is copied, never edited in place: patch nodes read the base's own tensors by name
(its gated pre-activations and its logits), patches apply in order (each reads the previous patch's
logits), and the last patch's output becomes the graph output.
"""

from __future__ import annotations

import copy
from typing import Sequence

import onnx
from onnx import helper

from .errors import StructureError
from .patchgraph import gate_name, output_name
from .verify import VerifiedPatch


def compose(base: onnx.ModelProto, patches: Sequence[VerifiedPatch], expose_gates: bool = False) -> onnx.ModelProto:
    """Merge ``patches`` into a copy of ``base``; with ``expose_gates`` each patch's (N, P) gate
    tensor is an extra output (for ``verify-sample``), after the logits."""
    model = copy.deepcopy(base)
    graph = model.graph
    if not patches:
        return model
    existing = {t for n in graph.node for t in n.output} | {i.name for i in graph.initializer} | {i.name for i in graph.input}
    logits = graph.output[0].name
    seen: set[str] = set()
    for vp in patches:
        m = vp.manifest
        if m.patch_id in seen:
            raise StructureError(f"{vp.source}: patch id {m.patch_id} given twice; expected each patch once")
        seen.add(m.patch_id)
        if m.logits_name != base.graph.output[0].name:
            raise StructureError(f"{vp.source}: patch reads logits {m.logits_name!r}, base outputs {base.graph.output[0].name!r}")
        pg = vp.model.graph
        clash = ({t for n in pg.node for t in n.output} | {i.name for i in pg.initializer}) & existing
        if clash:
            raise StructureError(f"{vp.source}: patch tensor names collide with the graph: {sorted(clash)[:3]}")
        for node in pg.node:
            new = copy.deepcopy(node)
            # Chain: the patch's logits input is whatever the previous stage produced.
            for i, name in enumerate(new.input):
                if name == m.logits_name:
                    new.input[i] = logits
            graph.node.append(new)
            existing.update(new.output)
        graph.initializer.extend(copy.deepcopy(list(pg.initializer)))
        existing.update(i.name for i in pg.initializer)
        logits = output_name(m.prefix)
    c = patches[-1].manifest.n_classes
    outputs = [helper.make_tensor_value_info(logits, onnx.TensorProto.FLOAT, ["N", c])]
    if expose_gates:
        outputs += [
            helper.make_tensor_value_info(gate_name(vp.manifest.prefix), onnx.TensorProto.FLOAT, ["N", len(vp.manifest.records)])
            for vp in patches
        ]
    del graph.output[:]
    graph.output.extend(outputs)
    return model
