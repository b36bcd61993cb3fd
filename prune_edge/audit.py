"""Searching for a counterexample to the records' certificates, as an auditor would.

For every ordered pair of records (k, j) of the patches a device runs, an LP finds the point that is
strictly inside record k's region (every gated neuron keeps k's sign with ``margin`` to spare, inside
the input box; a neuron that cannot reach the margin anywhere in the box, such as a dead unit whose
pre-activation stays within 1e-9 of 0, keeps half of its reach instead) and closest to record j's region (smallest summed violation of j's pattern, which is
linear on k's region). If any record's correction could leak into k's region, it is at such points,
so predicting them through onnxruntime checks k's certificate where it is most at risk. The same
points, run through the earlier semantics (every open gate adds its correction), show what the
one-record-acts semantics prevents.
"""

from __future__ import annotations

import copy
import math
import multiprocessing
import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from .lp import InfeasibleRegion, RegionLP, fork_map
from .models.nets import PreactNet
from .runtime.model import PatchedModel
from .runtime.patchgraph import excess_of, quantize


@torch.no_grad()
def pattern_affine(net: PreactNet, signs: np.ndarray, input_shape: tuple[int, ...]) -> tuple[np.ndarray, ...]:
    """For gates on every hidden layer: (J_z, c_z, J_f, c_f) with z = J_z x + c_z and logits
    f = J_f x + c_f on the region of sign pattern ``signs`` (float64, x flattened)."""
    net64 = copy.deepcopy(net).to(dtype=torch.float64).eval()
    d = math.prod(input_shape)
    basis = torch.cat([torch.zeros(1, d, dtype=torch.float64), torch.eye(d, dtype=torch.float64)]).reshape(d + 1, *input_shape)
    h, zs, offset = basis, [], 0
    mask_all = torch.from_numpy(np.asarray(signs) > 0)
    for i in range(len(net64.layers)):
        z = net64._affine(i, h)
        if i == len(net64.layers) - 1:
            f = z
            break
        n = z[0].numel()
        zs.append(z.flatten(1))
        h = z * mask_all[offset : offset + n].reshape(z.shape[1:]).to(z.dtype)
        offset += n
    Z = torch.cat(zs, dim=1)
    return (Z[1:] - Z[0]).T.numpy(), Z[0].numpy(), (f[1:] - f[0]).T.numpy(), f[0].numpy()


# HiGHS scaling for the pair LPs (see RegionLP): its default equilibration halves their time here.
PAIR_LP_SCALING = 1


@dataclass
class PairPoint:
    """The point inside record ``k``'s region closest to record ``j``'s."""

    k: int
    j: int
    x: np.ndarray  # flattened input


def _search_one(task: tuple) -> tuple[int, list[tuple[int, np.ndarray]], bool]:
    """All LPs of one record k: its region with margins, one objective per other record j, solved by
    :meth:`prune_edge.lp.RegionLP.solve` (warm started, rows entering lazily)."""
    k, jz, cz, signs, js, margin = task
    s = signs[k].astype(np.float64)
    reach = np.maximum(s[:, None] * jz, 0.0).sum(axis=1) + s * cz  # max of s_i z_i over the box
    d = jz.shape[1]
    box = np.stack([np.zeros(d), np.ones(d)], axis=1)
    # s_i z_i >= m_i  <=>  -s_i J_i x <= s_i c_i - m_i
    lp = RegionLP(-(s[:, None] * jz), s * cz - np.minimum(margin, np.maximum(reach, 0.0) / 2), box,
                  np.zeros((0, d)), np.zeros(0), scale_strategy=PAIR_LP_SCALING)
    found: list[tuple[int, np.ndarray]] = []
    for j in js:
        differ = signs[j] != signs[k]
        if not differ.any():
            continue  # same pattern: the interference check compares their targets
        try:
            x = lp.solve((s[differ, None] * jz[differ]).sum(axis=0))
        except InfeasibleRegion:
            return k, found, True
        found.append((j, np.clip(x, 0.0, 1.0)))
    return k, found, False


def closest_points(net: PreactNet, signs: np.ndarray, input_shape: tuple[int, ...], margin: float = 0.01,
                   pairs: Sequence[tuple[int, int]] | None = None, workers: int | None = None,
                   progress: bool = False) -> tuple[list[PairPoint], list[int]]:
    """One LP per ordered pair (k, j), records spread over processes. Returns the points and the
    records whose region has no point with these margins (nothing strictly inside to check)."""
    from tqdm.auto import tqdm

    signs = np.asarray(signs)
    p = len(signs)
    wanted: dict[int, list[int]] = {}
    for k, j in pairs if pairs is not None else [(k, j) for k in range(p) for j in range(p) if j != k]:
        wanted.setdefault(k, []).append(j)
    tasks = ((k, *pattern_affine(net, signs[k], input_shape)[:2], signs, js, margin) for k, js in wanted.items())
    workers = min(len(wanted), workers or os.cpu_count() or 1)
    bar = dict(total=len(wanted), desc="pair LPs", unit="record", disable=not progress, leave=False)
    if workers <= 1 or "fork" not in multiprocessing.get_all_start_methods():
        results = [_search_one(t) for t in tqdm(tasks, **bar)]
    else:
        results = fork_map(_search_one, tasks, workers, bar)
    points = [PairPoint(k, j, x) for k, found, _ in results for j, x in found]
    return points, [k for k, _, empty in results if empty]


def summed_semantics(model: PatchedModel, x: np.ndarray) -> np.ndarray:
    """Logits as the earlier runtime composed records: f + sum_j g_j (T_j f + t_j), every open gate
    adding its correction (computed from the same verified parameters, for comparison only)."""
    from .activations import tapped_forward

    if any(vp.manifest.mode == "suppress" for vp in model.patches):
        raise ValueError("summed semantics compares gated records; a class suppression has none")
    f = model.base_logits(x).astype(np.float64)
    out = f.copy()
    for vp in model.patches:
        zs, _ = tapped_forward(model.base, x, [g.name for g in vp.manifest.gated])
        v = quantize(np.concatenate(zs, axis=1), vp.params.scale_log2)
        pre = 1.0 - vp.params.gamma.astype(np.float64)[None] * vp.params.delta / 4 * excess_of(v, vp.params.signs)
        g = np.clip(pre, 0.0, 1.0)
        out += np.einsum("np,pij,nj->ni", g, vp.params.T.astype(np.float64), f) + g @ vp.params.t.astype(np.float64)
    return out


def interference_search(net: PreactNet, model: PatchedModel, margin: float = 0.01) -> dict:
    """Run the pair search over every record the model runs (gates on every layer) and predict the
    points with the device's semantics and with the summed one."""
    signs = np.concatenate([vp.params.signs for vp in model.patches])
    targets = np.concatenate([[r.target for r in vp.manifest.records] for vp in model.patches])
    input_shape = tuple(model.base.input_shape)
    points, empty = closest_points(net, signs, input_shape, margin)
    x = np.stack([pt.x for pt in points]).reshape(-1, *input_shape).astype(np.float32) if points else np.zeros((0, *input_shape), np.float32)
    want = np.array([targets[pt.k] for pt in points], dtype=np.int64)
    device = model.predict(x) if len(x) else np.zeros(0, np.int64)
    summed = summed_semantics(model, x).argmax(1) if len(x) else np.zeros(0, np.int64)
    return {
        "records": int(len(signs)),
        "pairs": len(points),
        "regions_without_margin_points": sorted(set(empty)),
        "device_failures": int((device != want).sum()),
        "summed_failures": int((summed != want).sum()),
        "points": x,
        "k": np.array([pt.k for pt in points]),
        "targets": want,
    }
