"""Compose verified patches with an unchanged base graph into one ONNX model.

The base graph is copied, never edited in place. Every record of every patch joins one gated
correction (:mod:`.patchgraph`): records that gate on the same base tensors share one integer
selection (:func:`.patchgraph.gate_nodes`), and one record alone corrects the base logits. So a device pays per record, not per patch file, and a long chain of patches runs as
one batched patch. Suppression patches (mode ``suppress``) are applied after that correction, merged into one
suppression (:func:`.patchgraph.merge_suppressions`): ``gated correction -> suppression -> logits``.
The runtime builds this graph from the verified parameters (the very numbers whose canonical
graphs passed the structure check), so it is as canonical as each patch.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import onnx
from onnx import helper

from .basecard import find_logits
from .errors import StructureError
from .patchgraph import GateGroup, correction_nodes, form_of_tables, gate_nodes, merge_suppressions, suppress_nodes
from .verify import VerifiedPatch

@dataclass(frozen=True)
class Composition:
    """The composed model and, for each record of it, (patch position, record index in the patch)."""

    model: onnx.ModelProto
    records: list[tuple[int, int]]
    output_names: tuple[str, ...]
    logits_name: str  # where the patched logits are, among ``output_names``


def compose(base: onnx.ModelProto, patches: Sequence[VerifiedPatch], expose_gates: bool = False,
            screen: bool = True) -> Composition:
    """Merge ``patches`` into a copy of ``base``. With ``expose_gates`` the acting gate's value
    (N, 1) and its record index (N,) are extra outputs after the base's own (and the logits).
    ``screen``: each group looks up its acting record and computes the exact gate only for the inputs
    that have one (:func:`~.patchgraph.gate_nodes`, the lookup form); False composes the patch file's
    product form (the same outputs, fewer nodes: for a device that runs one input at a time).

    The correction sits at the base's logits tensor (:func:`~.basecard.find_logits`): the node that
    computed it now writes a renamed tensor, the patch reads that and writes the logits under their
    own name, so every consumer downstream (a Softmax, an ArgMax, a label lookup, a ZipMap, or the
    graph output itself) reads the patched logits. The base's outputs keep their names and order;
    the logits are appended as an output when the base does not output them itself. IR version,
    opsets (the ``ai.onnx.ml`` domain included) stay the base's."""
    model = copy.deepcopy(base)
    graph = model.graph
    logits = find_logits(model)
    for vp in patches:
        if vp.manifest.logits_name != logits:
            raise StructureError(f"{vp.source}: patch reads logits {vp.manifest.logits_name!r}, base logits are {logits!r}")
    outputs = list(graph.output)
    if logits not in {o.name for o in outputs}:
        c = patches[-1].manifest.n_classes if patches else None
        outputs.append(helper.make_tensor_value_info(logits, onnx.TensorProto.FLOAT, ["N", c] if c else None))
    records: list[tuple[int, int]] = []
    if patches:
        prefix, records = insert_patches(graph, patches, logits, screen)
        if expose_gates and records:
            # the acting gate's value (N, 1), 0 where no record is open, and its record (N,)
            outputs += [
                helper.make_tensor_value_info(prefix + "gate_max", onnx.TensorProto.FLOAT, ["N", 1]),
                helper.make_tensor_value_info(prefix + "k", onnx.TensorProto.INT64, ["N"]),
            ]
    del graph.output[:]
    graph.output.extend(outputs)
    return Composition(model, records, tuple(o.name for o in outputs), logits)


def insert_patches(graph: onnx.GraphProto, patches: Sequence[VerifiedPatch], logits: str, screen: bool = True
                   ) -> tuple[str, list[tuple[int, int]]]:
    """Splice one batched correction into ``graph`` right after the node that computes ``logits``
    (so the node list stays topologically sorted: the gates read Relu inputs computed before it).
    Returns the name prefix of the new tensors and (patch, record) for each record, in gate order."""
    existing = {t for n in graph.node for t in n.output} | {i.name for i in graph.initializer} | {i.name for i in graph.input}
    prefix = "pe_"
    while any(name.startswith(prefix) for name in existing):
        prefix = "p" + prefix
    suppressions = [vp.suppress for vp in patches if vp.suppress is not None]
    # group records by (gated tensors, step); records keep patch order inside a group
    keys: list[tuple] = []
    members: dict[tuple, list[int]] = {}
    for i, vp in enumerate(patches):
        if not vp.params.n_records:
            continue
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
    base_logits = prefix + "base_logits"
    at = next((k for k, node in enumerate(graph.node) if logits in node.output), None)
    if at is None:
        raise StructureError(f"base: no node computes the logits {logits!r}")
    producer = graph.node[at]
    producer.output[list(producer.output).index(logits)] = base_logits
    nodes, inits = [], []
    corrected = base_logits
    if records:
        corrected = prefix + "gated_logits" if suppressions else logits
        T, t = np.concatenate(Ts), np.concatenate(ts)
        opset = patches[0].manifest.base_opset  # the base's (check_binding)
        nodes, inits, gate, k = gate_nodes(prefix, groups, opset, screen=screen)
        more_nodes, more_inits = correction_nodes(prefix, gate, k, base_logits, T, t, form_of_tables(T), corrected)
        nodes, inits = nodes + more_nodes, inits + more_inits
    if suppressions:  # after the gated correction: no record targets a suppressed class (verify)
        n_classes = patches[0].manifest.n_classes
        s_nodes, s_inits = suppress_nodes(prefix + "s_", corrected, merge_suppressions(suppressions), n_classes, logits,
                                        repeats=True)
        nodes, inits = nodes + s_nodes, inits + s_inits
    rest = list(graph.node[at + 1 :])
    del graph.node[at + 1 :]
    graph.node.extend(nodes + rest)
    graph.initializer.extend(inits)
    return prefix, records
