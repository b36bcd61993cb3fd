"""Compose verified patches with an unchanged base graph into one ONNX model.

The base graph is copied, never edited in place. Every record of every patch joins one gated
correction (:mod:`.patchgraph`): records that gate on the same base tensors share one integer
product, all of them compete in one TopK, and the most-open record alone corrects the base logits.
So a device pays per record, not per patch file, and a long chain of patches runs as one batched
patch. The runtime builds this graph from the verified parameters (the very numbers whose canonical
graphs passed the structure check), so it is as canonical as each patch.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import onnx
from onnx import helper

from .errors import StructureError
from .patchgraph import GateGroup, correction_nodes, form_of_tables, gate_nodes
from .verify import VerifiedPatch

@dataclass(frozen=True)
class Composition:
    """The composed model and, for each record of it, (patch position, record index in the patch)."""

    model: onnx.ModelProto
    records: list[tuple[int, int]]
    output_names: tuple[str, ...]


def compose(base: onnx.ModelProto, patches: Sequence[VerifiedPatch], expose_gates: bool = False) -> Composition:
    """Merge ``patches`` into a copy of ``base``. With ``expose_gates`` the acting gate's value
    (N, 1) and its record index (N,) are extra outputs after the logits."""
    model = copy.deepcopy(base)
    graph = model.graph
    logits = graph.output[0].name
    if not patches:
        return Composition(model, [], (logits,))
    for vp in patches:
        if vp.manifest.logits_name != logits:
            raise StructureError(f"{vp.source}: patch reads logits {vp.manifest.logits_name!r}, base outputs {logits!r}")
    existing = {t for n in graph.node for t in n.output} | {i.name for i in graph.initializer} | {i.name for i in graph.input}
    prefix = "pe_"
    while any(name.startswith(prefix) for name in existing):
        prefix = "p" + prefix
    # group records by (gated tensors, step); records keep patch order inside a group
    keys: list[tuple] = []
    members: dict[tuple, list[int]] = {}
    for i, vp in enumerate(patches):
        key = (vp.manifest.gated, vp.params.scale_log2)
        if key not in members:
            keys.append(key)
            members[key] = []
        members[key].append(i)
    groups, records, Ts, ts = [], [], [], []
    for key in keys:
        idx = members[key]
        ps = [patches[i].params for i in idx]
        groups.append(GateGroup(key[0], np.concatenate([p.signs for p in ps]), np.concatenate([p.gamma for p in ps]), key[1]))
        for i, p in zip(idx, ps):
            records.extend((i, r) for r in range(p.n_records))
            Ts.append(p.T)
            ts.append(p.t)
    T, t = np.concatenate(Ts), np.concatenate(ts)
    out_name = prefix + "logits"
    nodes, inits, pre = gate_nodes(prefix, groups)
    more_nodes, more_inits = correction_nodes(prefix, pre, logits, T, t, form_of_tables(T), out_name)
    graph.node.extend(nodes + more_nodes)
    graph.initializer.extend(inits + more_inits)
    c = patches[-1].manifest.n_classes
    outputs = [helper.make_tensor_value_info(out_name, onnx.TensorProto.FLOAT, ["N", c])]
    names = [out_name]
    if expose_gates:
        # the acting gate's value (N, 1), 0 where no record is open, and its record (N,)
        outputs += [
            helper.make_tensor_value_info(prefix + "gate_max", onnx.TensorProto.FLOAT, ["N", 1]),
            helper.make_tensor_value_info(prefix + "k", onnx.TensorProto.INT64, ["N"]),
        ]
        names += [prefix + "gate_max", prefix + "k"]
    del graph.output[:]
    graph.output.extend(outputs)
    return Composition(model, records, tuple(names))
