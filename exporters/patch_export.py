"""Package synthesised records as a patch file: canonical graph + manifest, written atomically.

The format (container, manifest schema, canonical graph) is defined once in ``prune_edge.runtime``;
this module only fills it in, so whatever the server writes is exactly what a device checks.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import os
import secrets
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ..runtime.fileio import PathLike, atomic_write_bytes, sha256_bytes
from ..runtime.manifest import GatedTensor, Manifest, Record, derive_patch_id
from ..runtime.merkle import ids_root
from ..runtime.patchfile import pack
from ..runtime.patchgraph import SUPPRESS_FORM, PatchParams, SuppressParams, build_patch_graph, build_suppress_graph, form_of
from ..runtime.verify import patched_rows

# The t table is stored on the coarsest power-of-two grid, from 2^T_GRID_LOG2[mode] down to 2^-20, on
# which the record's certificate still holds (checked exactly as a device does): float32 values with
# short mantissas compress. Rounded so every row P t only decreases (target up, others down): the
# target wins by a little more, never less. `collapse`: 2^-12 moves a patched logit by < 2.5e-4, so an
# `--target unseen` constant stays within 1e-3 of its calibration (2^-6 moved those logits by up to
# 0.02, measured). `prune`: its shift is only as precise as its bounds (upper rounded up to 0.1, the
# dual bounds' gap to the LP optimum of that order), so 2^-4 (a row moves by < 0.125 more) costs the
# certificate nothing and saves 2.1 KB of a 200-point patch (graph 15.9 -> 13.8 KB, measured).
T_GRID_LOG2 = {"prune": -4, "collapse": -12}
_T_GRID_FINEST = -20


@dataclass(frozen=True)
class BaseRef:
    """What a patch pins about its base: digest, opset/IR and the tensors it reads."""

    sha256: str
    opset: int
    ir_version: int
    logits_name: str
    n_classes: int
    gated: tuple[GatedTensor, ...]


@dataclass(frozen=True)
class RecordCert:
    """Certificate data of one record (what the manifest stores besides the graph tensors)."""

    target: int
    gamma: float
    alpha: Sequence[float]
    mean_scale: float
    lower: Sequence[float] | None
    upper: Sequence[float] | None
    points: int


def _created() -> str:
    # SOURCE_DATE_EPOCH pins the timestamp for reproducible files.
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    when = _dt.datetime.fromtimestamp(int(epoch), _dt.timezone.utc) if epoch else _dt.datetime.now(_dt.timezone.utc)
    return when.replace(microsecond=0).isoformat().replace("+00:00", "Z")


def points_request(ids: Sequence[int], salt: bytes, **extra: Any) -> dict[str, Any]:
    """A point request's manifest summary: its size and the Merkle root of its salted id commitments
    (:mod:`..runtime.merkle`). The salt stays on the server, so a device cannot test guesses of small
    integer ids; a data holder given the salt and an audit path can check their own id."""
    return {"kind": "points", "n_points": int(len(ids)), "id_roots": [ids_root(ids, salt)], **extra}


def compression_order(signs: np.ndarray, block: int = 2048) -> np.ndarray:
    """An order of the records in which consecutive sign patterns are close: greedy nearest neighbour
    in Hamming distance from the first record (ties to the lowest index), within consecutive blocks of
    ``block`` records (a block's distance matrix is one float32 product, exact below 2^24 columns). The
    graph stores the signs neuron-major, one bit per record, so similar neighbours make the long runs
    deflate finds (200-point patch: sign bits 6.4 -> 5.1 KB, measured). The order changes no output on
    any record's region (the record with that pattern acts, gate 1) nor where one record has the highest
    selection score; where two tie, the first acts, so the server evaluates the records in this order
    (every figure comes from the bytes it ships)."""
    s = np.asarray(signs, np.float32)
    order: list[int] = []
    for lo in range(0, len(s), block):
        rows = s[lo : lo + block]
        dist = (s.shape[1] - rows @ rows.T) / 2  # Hamming distances of the +-1 patterns
        seen = np.zeros(len(rows), bool)
        cur = 0
        while True:
            seen[cur] = True
            order.append(lo + cur)
            if seen.all():
                break
            cur = int(np.where(seen, np.inf, dist[cur]).argmin())
    return np.asarray(order, np.int64)


def round_t_table(t: np.ndarray, certs: Sequence[RecordCert | Record], mode: str, q_lower: float, q_upper: float) -> np.ndarray:
    """``t`` (P, C) with each record's row on the coarsest grid 2^e (e = T_GRID_LOG2[mode] .. -20) whose
    patched rows still lie in [q_lower, q_upper] under the device's own computation (verify.patched_rows);
    a record no grid keeps certified keeps its float32 t. Deterministic."""
    t = np.asarray(t, np.float32)
    p, c = t.shape
    if not p:
        return t
    targets = np.array([r.target for r in certs], np.int64)
    alpha = np.array([r.alpha for r in certs], np.float64).reshape(p, c - 1)
    lower = upper = None
    if mode == "prune":
        lower = np.array([r.lower for r in certs], np.float64).reshape(p, c - 1)
        upper = np.array([r.upper for r in certs], np.float64).reshape(p, c - 1)
    up = np.zeros((p, c), bool)
    up[np.arange(p), targets] = True  # the target's entry rounds up, every other entry down
    out = t.copy()
    todo = np.ones(p, bool)
    t64 = t.astype(np.float64)
    for e in range(T_GRID_LOG2[mode], _T_GRID_FINEST - 1, -2):
        g = 2.0**e
        cand = np.where(up, np.ceil(t64 / g), np.floor(t64 / g)) * g
        cand32 = cand.astype(np.float32)
        exact = cand32.astype(np.float64) == cand  # on the grid in float32 too (|t| < 2^24 g)
        lo, hi = patched_rows(mode, targets, alpha, lower, upper, cand32)
        ok = todo & exact.all(axis=1) & (hi <= q_upper).all(axis=1) & (lo >= q_lower).all(axis=1)
        out[ok] = cand32[ok]
        todo &= ~ok
        if not todo.any():
            break
    return out


def build_patch(
    base: BaseRef,
    params: PatchParams,
    certs: Sequence[RecordCert],
    mode: str,
    q_lower: float,
    q_upper: float,
    request: dict[str, Any],
    chain: dict[str, Any] | None = None,
    round_t: bool = True,
    reorder: bool = True,
) -> tuple[Manifest, bytes]:
    """Return (manifest, patch-file bytes) for these records. Deterministic apart from ``created``.

    ``round_t``: store t on a coarse grid (:func:`round_t_table`); ``reorder``: write the records in
    :func:`compression_order`. Both off where records are copied whose t and order are already what
    devices run (``compact``). The patch id is derived from the content (:func:`derive_patch_id`),
    after the graph digest is in."""
    if reorder:
        perm = compression_order(params.signs)
        params = dataclasses.replace(params, signs=params.signs[perm], gamma=params.gamma[perm], T=params.T[perm],
                                     t=params.t[perm])
        certs = [certs[i] for i in perm]

    def rows(values: list[Sequence[float] | None]) -> list[tuple[float, ...] | None]:
        # One float64 conversion per field for all records, not one per record and field.
        if any(v is None for v in values):
            return [None if v is None else tuple(np.asarray(v, dtype=np.float64).tolist()) for v in values]
        return [tuple(r) for r in np.asarray(values, dtype=np.float64).reshape(len(values), -1).tolist()]

    alpha, lower, upper = (rows([getattr(c, k) for c in certs]) for k in ("alpha", "lower", "upper"))
    gammas = np.asarray([c.gamma for c in certs], dtype=np.float32).astype(np.float64).tolist()
    records = tuple(
        Record(
            target=int(c.target),
            gamma=gammas[k],
            alpha=alpha[k],
            mean_scale=float(c.mean_scale),
            lower=lower[k],
            upper=upper[k],
            points=int(c.points),
        )
        for k, c in enumerate(certs)
    )
    if round_t:
        params = dataclasses.replace(params, t=round_t_table(params.t, records, mode, q_lower, q_upper))
    form = form_of(params)
    graph = build_patch_graph(base.gated, base.logits_name, params, base.opset, base.ir_version, form)
    graph_bytes = graph.SerializeToString()
    chain = dict(chain or {"position": 0, "after": [], "replaces": []})
    draft = Manifest(
        patch_id="0" * 32, created=_created(), mode=mode, form=form, base_sha256=base.sha256, base_opset=base.opset,
        base_ir_version=base.ir_version, logits_name=base.logits_name, n_classes=base.n_classes,
        gated=tuple(base.gated), graph_sha256=sha256_bytes(graph_bytes), graph_bytes=len(graph_bytes),
        q_lower=float(q_lower), q_upper=float(q_upper), records=records, gate_step_log2=params.scale_log2,
        request=dict(request), chain=chain,
    )
    manifest = dataclasses.replace(draft, patch_id=derive_patch_id(draft.to_json()))
    # No reader round trip here: callers run the device's whole verify_patch on these bytes before
    # anything is written (see prune_edge.unlearn), which includes the strict manifest reader.
    return manifest, pack(manifest, graph_bytes)


def build_suppression_patch(
    base: BaseRef,
    classes: Sequence[int],
    margin: float,
    gate_step_log2: int,
    q_lower: float,
    q_upper: float,
    request: dict[str, Any],
    chain: dict[str, Any] | None = None,
    affine: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[Manifest, bytes]:
    """Return (manifest, patch-file bytes) of a class suppression: no records, no gated tensors, the
    canonical suppression graph of ``classes`` at ``margin`` (see :mod:`..runtime.patchgraph`).
    ``gate_step_log2`` is the base card's (a device checks it on every patch); the specification is
    carried as for any patch and bounds nothing here. ``affine``: (weights (S, C), bias (S,)) per class
    of the sorted ``classes``, a margin max(margin, w . f + b) that follows the input."""
    order = np.argsort(np.asarray(classes, np.int64), kind="stable")
    classes = sorted(int(k) for k in classes)
    margin = float(np.float32(margin))  # the value the graph stores, exactly
    weights = bias = None
    if affine is not None:  # float32: the values the graph stores, exactly (the manifest repeats them)
        weights = np.asarray(affine[0], np.float32).reshape(len(classes), -1)[order]
        bias = np.asarray(affine[1], np.float32).reshape(-1)[order]
    params = SuppressParams(np.array(classes, np.int64), np.full(len(classes), margin, np.float32), weights, bias)
    graph = build_suppress_graph(base.logits_name, params, base.n_classes, base.opset, base.ir_version)
    graph_bytes = graph.SerializeToString()
    draft = Manifest(
        patch_id="0" * 32, created=_created(), mode="suppress", form=SUPPRESS_FORM, base_sha256=base.sha256,
        base_opset=base.opset, base_ir_version=base.ir_version, logits_name=base.logits_name, n_classes=base.n_classes,
        gated=(), graph_sha256=sha256_bytes(graph_bytes), graph_bytes=len(graph_bytes), q_lower=float(q_lower),
        q_upper=float(q_upper), records=(), gate_step_log2=int(gate_step_log2), request=dict(request),
        chain=dict(chain or {"position": 0, "after": [], "replaces": []}),
        suppress={"classes": classes, "margin": margin} if affine is None else {
            "classes": classes, "margin": margin,
            "affine": {"weights": [[float(v) for v in row] for row in weights], "bias": [float(v) for v in bias]}},
    )
    manifest = dataclasses.replace(draft, patch_id=derive_patch_id(draft.to_json()))
    return manifest, pack(manifest, graph_bytes)


def write_patch(path: PathLike, data: bytes) -> None:
    """Atomic write (temp file + rename): a failed build never leaves a partial patch."""
    atomic_write_bytes(path, data)


def new_salt() -> bytes:
    return secrets.token_bytes(16)
