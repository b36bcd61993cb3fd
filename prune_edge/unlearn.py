"""Point unlearning end to end: base folder + forget ids -> certified, verified patch file."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .basedir import BaseBundle
from .evaluate import evaluate_patch
from .ledger import default_ledger, record_request
from .exporters.patch_export import BaseRef, RecordCert, build_patch, new_salt, points_request, write_patch
from .runtime.fileio import PathLike
from .runtime.manifest import GatedTensor
from .runtime.patchfile import unpack
from .runtime.verify import VerifiedPatch, check_patch_set, verify_patch
from .synth import SynthConfig, SynthResult, synthesize
from .train import resolve_device


def base_ref(bundle: BaseBundle, start: int) -> BaseRef:
    """The base identity and tensors a patch gating layers ``start..`` reads, from the card."""
    o = bundle.card["onnx"]
    gated = tuple(GatedTensor(n, tuple(s)) for n, s in zip(o["preacts"][start:], o["preact_shapes"][start:]))
    return BaseRef(o["sha256"], o["opset"], o["ir_version"], o["logits"], bundle.card["n_classes"], gated)


def certs_of(result: SynthResult) -> list[RecordCert]:
    return [
        RecordCert(r.target, r.gamma, r.alpha, r.mean_scale, r.lower, r.upper, len(r.members))
        for r in result.records
    ]


def build_point_patch(
    bundle: BaseBundle,
    forget_ids: np.ndarray,
    config: SynthConfig,
    out: PathLike,
    device: str = "auto",
    progress: bool = True,
    evaluate: bool = True,
    after: Sequence[PathLike] = (),
    ledger: PathLike | None = None,
    synth: Callable[..., SynthResult] | None = None,
    request: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Synthesise, package, self-verify and write a patch forgetting ``forget_ids``.

    ``after`` names the patches devices already run: they are verified first, points inside their
    regions are answered from them (not patched again), and the new patch is checked together with
    them, so a device running the whole chain keeps every certificate. The file is verified with the
    device's own checks before it is written (atomically), so the server never ships a patch a device
    would refuse. The ids and their salt go to the server's ledger (``ledger``, default ``ledger/`` in
    the base folder; see ``prune_edge.ledger``), never into the patch nor beside it.
    """
    ds = bundle.dataset
    dev = resolve_device(device)
    earlier: list[VerifiedPatch] = [verify_patch(p, bundle.graph) for p in after]
    check_patch_set(earlier)
    calibration = None
    if config.target == "unseen":  # shadow models' calibrated logits, cached in the base folder (prune_edge.targets)
        from .targets import unseen_calibration_logits

        # a class request: its points get the logits of models trained without the class
        classes = (request or {}).get("classes") if (request or {}).get("kind") == "class" else None
        calibration = unseen_calibration_logits(bundle, classes, progress=progress)
    # ``synth``: another strategy with synthesize's signature (prune_edge.sets); ``request``: fields it
    # adds to the manifest's request (strategy, class kind)
    result = (synth or synthesize)(bundle.net, ds.x_train, ds.y_train, forget_ids, config, activations=bundle.activations,
                        device=str(dev), progress=progress, after=[vp.record_set() for vp in earlier],
                        calibration=calibration)
    salt = new_salt()
    t0 = time.perf_counter()
    request = points_request(forget_ids, salt, **(request or {}))
    if request["kind"] == "class":  # the manifest names the classes; a class's ids are no secret to commit to
        request["id_roots"] = []
    chain = {
        "position": 1 + max((vp.manifest.chain["position"] for vp in earlier), default=-1),
        "after": [vp.manifest.patch_id for vp in earlier],
        "replaces": [],
    }
    manifest, data = build_patch(
        base_ref(bundle, result.start), result.params(), certs_of(result), config.mode, config.q_lower, config.q_upper,
        request, chain,
    )
    export_seconds = time.perf_counter() - t0
    new = verify_patch(unpack(data, source=Path(out).name), bundle.graph)
    check_patch_set([*earlier, new])
    write_patch(out, data)
    sidecar = {
        "patch_id": manifest.patch_id,
        "patch": str(Path(out).resolve()),
        "base_sha256": bundle.card["onnx"]["sha256"],
        "chain": chain,
        "ids": [int(i) for i in forget_ids],
        "id_salt": salt.hex(),
        "targets": {int(forget_ids[m]): r.target for r in result.records for m in r.members},
        "covered_by_earlier": {int(forget_ids[i]): {"patch": src, "record": rec} for i, (src, rec) in result.covered.items()},
    }
    ledger_entry = record_request(default_ledger(bundle.path) if ledger is None else ledger, sidecar)
    report: dict[str, Any] = {
        "patch": str(out),
        "patch_id": manifest.patch_id,
        "ledger_entry": str(ledger_entry),
        "mode": config.mode,
        "target": config.target,
        "gate_layers": config.gate_layers,
        "points": int(len(forget_ids)),
        "records": len(result.records),
        "already_covered": len(result.covered),
        "chain": chain,
        "build_seconds": result.stats["build_seconds"] + export_seconds,
        "synthesis": result.stats,
        "patch_bytes": len(data),
        "base_bytes": bundle.onnx_path.stat().st_size,
        "base_training_seconds": bundle.card["training"]["training_seconds"],
        "gammas": [r.gamma for r in result.records],
    }
    report["patch_to_base"] = report["patch_bytes"] / report["base_bytes"]
    if evaluate:
        report["evaluation"] = evaluate_patch(
            bundle.onnx_path, [*after, out], ds.x_train, ds.y_train, ds.x_test, ds.y_test, forget_ids
        )
        new_ids = [int(forget_ids[m]) for r in result.records for m in r.members]
        pred = dict(zip(map(int, forget_ids), report["evaluation"]["forget_pred_after"]))
        report["evaluation"]["forget_to_target"] = sum(pred[i] == sidecar["targets"][i] for i in new_ids)
        report["evaluation"]["forget_patched_here"] = len(new_ids)
    return report
