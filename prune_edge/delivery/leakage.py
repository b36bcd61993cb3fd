"""What a published patch reveals about the points it forgets, measured (server side; torch, scipy).

Two attackers who hold the base and the patch (both are public to anyone who can fetch the repository):
- **membership**: one with candidate points (e.g. a copy of part of the training set) runs them
  through the patched model and reads which are covered by a record. Measured on the whole training
  set: of the points a record covers, how many were requested (precision) and how many requested
  points are covered (recall). By design (``verify-sample``) this is a membership oracle for the
  deletion request: it reveals *that* a candidate was forgotten.
- **reconstruction**: one without the point solves an LP for the point of the record's region (every
  gated pre-activation with the record's sign; an MLP whose every hidden layer is gated, so the
  region is one polytope in input space, within the data's box) nearest in L1 to the training mean,
  an attacker's natural prior. Measured: its L2 distance to the forgotten point, against the
  forgotten point's distance to its nearest other training point and to the mean (what the attacker
  knew without the patch), and whether the device's own gate opens there (the LP point is really in
  the record's region as the device reads it).
"""

from __future__ import annotations

from typing import Any

import numpy as np


def _mlp_weights(net) -> list[tuple[np.ndarray, np.ndarray]]:
    import torch

    out = []
    for layer in net.layers:
        if not isinstance(layer, torch.nn.Linear):
            raise ValueError("the reconstruction LP is implemented for MLP bases (Linear layers) only")
        out.append((layer.weight.detach().double().numpy(), layer.bias.detach().double().numpy()))
    return out


def region_lp_point(weights, signs: np.ndarray, prior: np.ndarray, lo: float, hi: float, margin: float) -> np.ndarray | None:
    """The point nearest ``prior`` (L1) with every hidden pre-activation of sign ``signs`` (+1: >= margin,
    -1: <= 0), inside the box [lo, hi]; None if the LP finds none."""
    from scipy.optimize import linprog

    d = prior.size
    A_rows, b_rows = [], []
    M, c = np.eye(d), np.zeros(d)  # the current layer's input as M x + c (piecewise linear, fixed pattern)
    offset = 0
    for W, b in weights[:-1]:
        Z, z0 = W @ M, W @ c + b  # pre-activations z = Z x + z0
        s = signs[offset:offset + len(b)].astype(np.float64)
        offset += len(b)
        # s = +1: z >= margin  ->  -Z x <= z0 - margin;  s = -1: z <= 0  ->  Z x <= -z0
        A_rows.append(-s[:, None] * Z)
        b_rows.append(np.where(s > 0, z0 - margin, -z0))
        active = (s > 0).astype(np.float64)
        M, c = active[:, None] * Z, active * z0
    A = np.vstack(A_rows)
    bvec = np.concatenate(b_rows)
    # variables [x, t]: minimise sum t with -t <= x - prior <= t
    eye = np.eye(d)
    A_ub = np.vstack([np.hstack([A, np.zeros((len(A), d))]), np.hstack([eye, -eye]), np.hstack([-eye, -eye])])
    b_ub = np.concatenate([bvec, prior, -prior])
    cost = np.concatenate([np.zeros(d), np.ones(d)])
    res = linprog(cost, A_ub=A_ub, b_ub=b_ub, bounds=[(lo, hi)] * d + [(0, None)] * d, method="highs")
    return res.x[:d] if res.status == 0 else None


def measure_leakage(bundle, patch_path, forget_ids: np.ndarray, max_records: int | None = None) -> dict[str, Any]:
    """Both measurements for one patch built for ``forget_ids`` on ``bundle``'s base (see module doc)."""
    import onnx

    from ..runtime import PatchedModel, read_patch_file
    from ..runtime.patchgraph import extract_params

    model = PatchedModel(bundle.onnx_path, [patch_path])
    x = bundle.dataset.x_train
    covered = model.coverage(x)
    requested = np.zeros(len(x), bool)
    requested[np.asarray(forget_ids)] = True
    hit = covered.covered
    membership = {
        "training_points": int(len(x)), "requested": int(requested.sum()), "covered": int(hit.sum()),
        "precision": float((hit & requested).sum() / max(1, hit.sum())),
        "recall": float((hit & requested).sum() / max(1, requested.sum())),
    }

    pf = read_patch_file(patch_path)
    m = pf.manifest
    if m.mode == "suppress":  # no regions: what it reveals is the classes its manifest names, nothing per point
        from ..runtime.errors import InputError

        raise InputError(f"{patch_path}: expected a patch with records (regions), found a class suppression "
                         f"(it names classes {(m.suppress or {}).get('classes')} and holds no region to reconstruct from)")
    params = extract_params(onnx.load_from_string(pf.graph_bytes), len(m.records), m.gated_size, m.n_classes, m.form)
    weights = _mlp_weights(bundle.net)
    if m.gated_size != sum(len(b) for _, b in weights[:-1]):
        raise ValueError("the reconstruction LP needs every hidden layer gated (gate_layers 'all')")
    flat = x.reshape(len(x), -1).astype(np.float64)
    prior = flat.mean(axis=0)
    lo, hi = float(flat.min()), float(flat.max())
    delta = 2.0 ** m.gate_step_log2
    rows = []
    ids = [int(i) for i in forget_ids if covered.record[i] >= 0]
    for i in ids[: max_records or len(ids)]:
        k = int(covered.record[i])
        point = region_lp_point(weights, params.signs[k], prior, lo, hi, margin=delta)
        xf = flat[i]
        others = np.delete(flat, i, axis=0)
        d_nn = float(np.sqrt(((others - xf) ** 2).sum(axis=1)).min())
        d_mean = float(np.linalg.norm(prior - xf))
        if point is None:
            rows.append({"id": i, "record": k, "found": False, "nn_distance": d_nn, "mean_distance": d_mean})
            continue
        inside = model.coverage(point.reshape(1, *x.shape[1:]).astype(np.float32))
        d_lp = float(np.linalg.norm(point - xf))
        rank = int((np.sqrt(((flat - point) ** 2).sum(axis=1)) < np.linalg.norm(flat[i] - point)).sum())
        rows.append({"id": i, "record": k, "found": True, "device_gate_open": bool(inside.covered[0] and inside.record[0] == k),
                     "lp_distance": d_lp, "nn_distance": d_nn, "mean_distance": d_mean,
                     "lp_over_nn": d_lp / d_nn, "lp_over_mean": d_lp / d_mean, "rank_of_forgotten_point": rank})
    found = [r for r in rows if r["found"]]
    summary = {
        "records_measured": len(rows), "lp_found": len(found),
        "lp_inside_device_region": int(sum(r["device_gate_open"] for r in found)),
        "median_lp_over_nn": float(np.median([r["lp_over_nn"] for r in found])) if found else None,
        "median_lp_over_mean": float(np.median([r["lp_over_mean"] for r in found])) if found else None,
        "closer_than_nearest_neighbour": int(sum(r["lp_over_nn"] < 1 for r in found)),
        "median_rank_of_forgotten_point": float(np.median([r["rank_of_forgotten_point"] for r in found])) if found else None,
    }
    return {"membership": membership, "reconstruction": summary, "records": rows}
