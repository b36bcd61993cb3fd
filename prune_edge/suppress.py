"""Whole-class requests as a class-suppression patch (``build-patch --forget-class K --strategy suppress``).

Per-point records certify the training points' own linear regions; a class's unseen test points
lie in other regions, so no record strategy keeps the class from being predicted on them (measured:
class-3 test accuracy stays 92% on the mnist5k MLP). A suppression patch instead caps the class's
logit below the best other class on every input, ``out_K = min(f_K, max_{j not in S} f_j - margin)``
(:mod:`.runtime.patchgraph`), leaving every other logit bit for bit: training and test accuracy on
the class are 0% by construction, and the other classes' accuracies can only rise (an input the
base wrongly called K now gets its runner-up). No LP, no region: the certificate is the graph itself.
Devices apply it after the gated corrections of the point patches they run; a set in which a record
targets a suppressed class is refused (:func:`.runtime.verify.check_suppressions`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from .basedir import BaseBundle
from .evaluate import evaluate_patch
from .exporters.patch_export import BaseRef, build_suppression_patch, write_patch
from .ledger import default_ledger, record_request
from .runtime.errors import RequestError
from .runtime.fileio import PathLike
from .runtime.patchfile import unpack
from .runtime.verify import check_patch_set, verify_patch
from .synth import SynthConfig

if TYPE_CHECKING:
    from .targets import AffineMargin

CLASS_STRATEGIES = ("suppress", "points", "representatives")
# Measured side by side in `prune-edge bench` (class rows): only suppression reaches the class's unseen
# points (test accuracy on the class 0% against 92% for the record strategies), with one tiny patch and
# no LP, so it is the default for --forget-class.
DEFAULT_CLASS_STRATEGY = "suppress"
DEFAULT_MARGIN = 1.0


def build_class_suppression(
    bundle: BaseBundle,
    classes: Sequence[int],
    out: PathLike,
    margin: float = DEFAULT_MARGIN,
    after: Sequence[PathLike] = (),
    ledger: PathLike | None = None,
    evaluate: bool = True,
    affine: "AffineMargin | None" = None,
) -> dict[str, Any]:
    """Build, self-verify (alone and with ``after``, the patches devices already run) and write a
    suppression patch for ``classes``; the class's training ids go to the server's ledger only.
    ``affine`` (``--target unseen``, :func:`.targets.affine_suppression_margin`): the margin follows the
    input, ``max(margin, w_K . f + b_K)``, so unseen images of the class get the spread of losses a
    model that never saw it gives, not one constant (``margin`` is then the floor)."""
    t0 = time.perf_counter()
    ds = bundle.dataset
    classes = sorted({int(k) for k in classes})
    if not margin > 0:
        raise RequestError(f"--margin: expected a positive number, found {margin!r}")
    from .sets import class_ids  # the range and "a class left" checks of every class request

    ids = class_ids(ds.y_train, classes, ds.n_classes)
    earlier = [verify_patch(p, bundle.graph) for p in after]
    check_patch_set(earlier)
    o = bundle.card["onnx"]
    ref = BaseRef(o["sha256"], o["opset"], o["ir_version"], o["logits"], bundle.card["n_classes"], ())
    spec = SynthConfig()
    # a class request's ids are the class itself: the manifest names the classes, not id commitments
    request = {"kind": "class", "n_points": int(len(ids)), "id_roots": [], "classes": classes, "strategy": "suppress"}
    chain = {
        "position": 1 + max((vp.manifest.chain["position"] for vp in earlier), default=-1),
        "after": [vp.manifest.patch_id for vp in earlier],
        "replaces": [],
    }
    if affine is not None and affine.classes != classes:
        raise RequestError(f"affine margin: expected one fitted for classes {classes}, found {affine.classes}")
    manifest, data = build_suppression_patch(ref, classes, margin, bundle.graph.card.gate_step_log2, spec.q_lower,
                                             spec.q_upper, request, chain,
                                             None if affine is None else (affine.weights, affine.bias))
    new = verify_patch(unpack(data, source=Path(out).name), bundle.graph)
    check_patch_set([*earlier, new])  # refuses a chain whose records target a suppressed class
    build_seconds = time.perf_counter() - t0
    write_patch(out, data)
    sidecar = {"patch_id": manifest.patch_id, "patch": str(Path(out).resolve()), "base_sha256": o["sha256"],
               "chain": chain, "ids": [int(i) for i in ids], "classes": classes, "strategy": "suppress"}
    entry = record_request(default_ledger(bundle.path) if ledger is None else ledger, sidecar)
    report: dict[str, Any] = {
        "patch": str(out), "patch_id": manifest.patch_id, "ledger_entry": str(entry), "strategy": "suppress",
        "mode": "suppress", "classes": classes, "margin": manifest.suppress["margin"], "points": int(len(ids)),
        "records": 0, "chain": chain, "build_seconds": build_seconds, "patch_bytes": len(data),
        "base_bytes": bundle.onnx_path.stat().st_size,
        "base_training_seconds": bundle.card["training"]["training_seconds"],
    }
    if affine is not None:
        report["affine_margin"] = affine.summary()
    report["patch_to_base"] = report["patch_bytes"] / report["base_bytes"]
    if evaluate:
        ev = evaluate_patch(bundle.onnx_path, [*after, out], ds.x_train, ds.y_train, ds.x_test, ds.y_test, ids)
        ev.pop("forget_pred_after", None)
        report["evaluation"] = ev
        report["class_test_accuracy"] = class_accuracies(bundle, [*after, out])
    return report


def class_accuracies(bundle: BaseBundle, patches: Sequence[PathLike]) -> dict[str, dict[int, float]]:
    """Per-class test accuracy of the base and of the patched model (onnxruntime)."""
    from .runtime.model import PatchedModel

    ds = bundle.dataset
    base = PatchedModel(bundle.onnx_path, base=bundle.graph).predict(ds.x_test)
    patched = PatchedModel(bundle.onnx_path, list(patches), base=bundle.graph).predict(ds.x_test)
    per = lambda pred: {int(c): float((pred[ds.y_test == c] == c).mean()) for c in np.unique(ds.y_test)}  # noqa: E731
    return {"before": per(base), "after": per(patched)}


def suppress_table_rows(r: dict[str, Any]) -> list[tuple[str, str]]:
    """The rows `build-patch` prints for a suppression patch."""
    from .report import pct

    acc = r["evaluation"]["accuracy"]
    per = r["class_test_accuracy"]
    rows = [("classes / training points", f"{r['classes']} / {r['points']}"),
            ("strategy", f"suppress (margin {r['margin']:g}; no records, no LP)")]
    if r.get("affine_margin"):
        a = r["affine_margin"]
        rows.append(("affine margin", f"max({r['margin']:g}, w . logits + b), fitted on {a['points']} training points "
                                      f"(R^2 {a['r2']}, bias {[round(b, 3) for b in a['bias']]}, max |w| {a['max_abs_weight']:.3g})"))
    rows += [(f"{k} accuracy", f"{pct(v['before'])} -> {pct(v['after'])}") for k, v in acc.items()]
    rows += [(f"test accuracy on class {c}", f"{pct(per['before'][c])} -> {pct(per['after'][c])}") for c in sorted(per["after"])]
    rows += [("build seconds", f"{r['build_seconds']:.3f}"),
             ("patch bytes", f"{r['patch_bytes']} ({pct(r['patch_to_base'])} of base {r['base_bytes']})"),
             ("patch", f"{r['patch']} (id {r['patch_id']})"),
             ("request recorded in", f"{r['ledger_entry']} (server only)")]
    return rows
