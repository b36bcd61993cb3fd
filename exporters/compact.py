"""Merge a chain of verified patches into one patch file with the same outputs (``prune-edge compact``).

A device composes every record of every patch into one gated correction, records in patch order
(:mod:`prune_edge.runtime.compose`), and one record, selected over all of them, acts (first on ties; the
selection values are a function of all the records' signs). Concatenating the records of the chain in
that same order into one patch therefore gives the same graph arithmetic,
hence the same logits, and keeps every record's certificate data unchanged: ``certify`` of the result
re-checks them all, and its manifest names the ids it ``replaces``. Torch-free (numpy + runtime).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ..runtime.errors import RequestError
from ..runtime.manifest import Manifest
from ..runtime.patchgraph import PatchParams
from ..runtime.verify import VerifiedPatch
from .patch_export import BaseRef, RecordCert, build_patch, build_suppression_patch


def _same(patches: Sequence[VerifiedPatch], what: str, key: Any) -> Any:
    values = {repr(key(vp)) for vp in patches}
    if len(values) != 1:
        raise RequestError(f"compact: expected patches with one {what}, found {len(values)} ({', '.join(sorted(values))[:200]})")
    return key(patches[0])


def compact_patches(patches: Sequence[VerifiedPatch]) -> tuple[Manifest, bytes]:
    """One patch holding every record of ``patches`` (a verified chain, in device order).

    Refuses, naming the field, patches that cannot share one file: another base, gated tensors, gate
    step, mode or specification. The request sums the point counts and keeps every request's id root."""
    if len(patches) < 2:
        raise RequestError(f"compact: expected at least two patches, found {len(patches)}")
    ms = [vp.manifest for vp in patches]
    _same(patches, "base", lambda vp: vp.manifest.base_sha256)
    _same(patches, "set of gated tensors", lambda vp: vp.manifest.gated)
    _same(patches, "gate step", lambda vp: vp.params.scale_log2)
    mode = _same(patches, "mode", lambda vp: vp.manifest.mode)
    q_lower, q_upper = _same(patches, "specification", lambda vp: (vp.manifest.q_lower, vp.manifest.q_upper))
    m0 = ms[0]
    ref = BaseRef(m0.base_sha256, m0.base_opset, m0.base_ir_version, m0.logits_name, m0.n_classes, m0.gated)
    if mode == "suppress":
        return _compact_suppressions(patches, ref, q_lower, q_upper)
    ps = [vp.params for vp in patches]
    params = PatchParams(
        signs=np.concatenate([p.signs for p in ps]), gamma=np.concatenate([p.gamma for p in ps]),
        T=np.concatenate([p.T for p in ps]), t=np.concatenate([p.t for p in ps]), scale_log2=ps[0].scale_log2,
    )
    certs = [RecordCert(r.target, r.gamma, r.alpha, r.mean_scale, r.lower, r.upper, r.points)
             for m in ms for r in m.records]
    kinds = {m.request.get("kind", "points") for m in ms}
    request: dict[str, Any] = {
        "kind": kinds.pop() if len(kinds) == 1 else "points",
        "n_points": sum(int(m.request.get("n_points", 0)) for m in ms),
        # one root per merged request, in chain order (each opens with its own ledger record's salt)
        "id_roots": [r for m in ms for r in m.request.get("id_roots", [])],
    }
    classes = sorted({c for m in ms for c in m.request.get("classes", [])})
    if classes and request["kind"] == "class":
        request["classes"] = classes
    strategies = {m.request.get("strategy") for m in ms}
    if len(strategies) == 1 and None not in strategies:
        request["strategy"] = strategies.pop()
    replaced = [m.patch_id for m in ms]
    chain = {
        "position": min(int(m.chain["position"]) for m in ms),
        # what the chain itself ran after, less the patches it now replaces
        "after": [pid for m in ms for pid in m.chain["after"] if pid not in replaced],
        "replaces": replaced,
    }
    chain["after"] = list(dict.fromkeys(chain["after"]))
    # t as the chain stored it: the merged patch computes exactly what the chain did
    return build_patch(ref, params, certs, mode, q_lower, q_upper, request, chain, round_t=False, reorder=False)


def _chain_of(ms: Sequence[Manifest]) -> dict[str, Any]:
    replaced = [m.patch_id for m in ms]
    after = [pid for m in ms for pid in m.chain["after"] if pid not in replaced]
    return {"position": min(int(m.chain["position"]) for m in ms), "after": list(dict.fromkeys(after)), "replaces": replaced}


def _compact_suppressions(patches: Sequence[VerifiedPatch], ref: BaseRef, q_lower: float, q_upper: float) -> tuple[Manifest, bytes]:
    """Suppressions of one margin merge into the suppression of the union of their classes (the same
    graph arithmetic as the composed chain: see :func:`..runtime.patchgraph.merge_suppressions`)."""
    margin = _same(patches, "suppression margin", lambda vp: vp.manifest.suppress["margin"])
    ms = [vp.manifest for vp in patches]
    classes = sorted({int(k) for m in ms for k in m.suppress["classes"]})
    request = {"kind": "class", "n_points": sum(int(m.request.get("n_points", 0)) for m in ms),
               "id_roots": [r for m in ms for r in m.request.get("id_roots", [])],
               "classes": classes, "strategy": "suppress"}
    affine = None
    if any(vp.suppress.affine for vp in patches):  # affine margins stack as rows: one row per class
        if sum(len(m.suppress["classes"]) for m in ms) != len(classes):
            raise RequestError(f"compact: affine suppressions expected disjoint classes, found {[m.suppress['classes'] for m in ms]}")
        rows = {int(k): (sp.weights[i] if sp.affine else np.zeros(ref.n_classes, np.float32), sp.bias[i] if sp.affine else 0.0)
                for sp in (vp.suppress for vp in patches) for i, k in enumerate(sp.classes.tolist())}
        affine = (np.stack([rows[k][0] for k in classes]), np.array([rows[k][1] for k in classes], np.float32))
    return build_suppression_patch(ref, classes, margin, ms[0].gate_step_log2, q_lower, q_upper, request, _chain_of(ms),
                                   affine)
