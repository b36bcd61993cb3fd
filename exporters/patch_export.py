"""Package synthesised records as a patch file: canonical graph + manifest, written atomically.

The format (container, manifest schema, canonical graph) is defined once in ``prune_edge.runtime``;
this module only fills it in, so whatever the server writes is exactly what a device checks.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import os
import secrets
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ..runtime.fileio import PathLike, atomic_write_bytes, sha256_bytes
from ..runtime.manifest import GatedTensor, Manifest, Record, derive_patch_id
from ..runtime.patchfile import pack
from ..runtime.patchgraph import SUPPRESS_FORM, PatchParams, SuppressParams, build_patch_graph, build_suppress_graph, form_of


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
    beta: Sequence[float]
    mean_scale: float
    mean_shift: float
    lower: Sequence[float] | None
    upper: Sequence[float] | None
    points: int


def _created() -> str:
    # SOURCE_DATE_EPOCH pins the timestamp for reproducible files.
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    when = _dt.datetime.fromtimestamp(int(epoch), _dt.timezone.utc) if epoch else _dt.datetime.now(_dt.timezone.utc)
    return when.replace(microsecond=0).isoformat().replace("+00:00", "Z")


def commit_ids(ids: Sequence[int], salt: bytes) -> list[str]:
    """Salted commitments to the forgotten ids, sorted so the order leaks nothing. The salt stays on
    the server (see :func:`build_patch`), so a device cannot test guesses of small integer ids."""
    return sorted(hashlib.sha256(salt + str(int(i)).encode()).hexdigest() for i in ids)


def build_patch(
    base: BaseRef,
    params: PatchParams,
    certs: Sequence[RecordCert],
    mode: str,
    q_lower: float,
    q_upper: float,
    request: dict[str, Any],
    chain: dict[str, Any] | None = None,
) -> tuple[Manifest, bytes]:
    """Return (manifest, patch-file bytes) for these records. Deterministic apart from ``created``.

    The patch id is derived from the content (:func:`derive_patch_id`), after the graph digest is in."""

    def rows(values: list[Sequence[float] | None]) -> list[tuple[float, ...] | None]:
        # One float64 conversion per field for all records, not one per record and field.
        if any(v is None for v in values):
            return [None if v is None else tuple(np.asarray(v, dtype=np.float64).tolist()) for v in values]
        return [tuple(r) for r in np.asarray(values, dtype=np.float64).reshape(len(values), -1).tolist()]

    alpha, beta, lower, upper = (rows([getattr(c, k) for c in certs]) for k in ("alpha", "beta", "lower", "upper"))
    gammas = np.asarray([c.gamma for c in certs], dtype=np.float32).astype(np.float64).tolist()
    records = tuple(
        Record(
            target=int(c.target),
            gamma=gammas[k],
            alpha=alpha[k],
            beta=beta[k],
            mean_scale=float(c.mean_scale),
            mean_shift=float(c.mean_shift),
            lower=lower[k],
            upper=upper[k],
            points=int(c.points),
        )
        for k, c in enumerate(certs)
    )
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
) -> tuple[Manifest, bytes]:
    """Return (manifest, patch-file bytes) of a class suppression: no records, no gated tensors, the
    canonical suppression graph of ``classes`` at ``margin`` (see :mod:`..runtime.patchgraph`).
    ``gate_step_log2`` is the base card's (a device checks it on every patch); the specification is
    carried as for any patch and bounds nothing here."""
    classes = sorted(int(k) for k in classes)
    margin = float(np.float32(margin))  # the value the graph stores, exactly
    params = SuppressParams(np.array(classes, np.int64), np.full(len(classes), margin, np.float32))
    graph = build_suppress_graph(base.logits_name, params, base.n_classes, base.opset, base.ir_version)
    graph_bytes = graph.SerializeToString()
    draft = Manifest(
        patch_id="0" * 32, created=_created(), mode="suppress", form=SUPPRESS_FORM, base_sha256=base.sha256,
        base_opset=base.opset, base_ir_version=base.ir_version, logits_name=base.logits_name, n_classes=base.n_classes,
        gated=(), graph_sha256=sha256_bytes(graph_bytes), graph_bytes=len(graph_bytes), q_lower=float(q_lower),
        q_upper=float(q_upper), records=(), gate_step_log2=int(gate_step_log2), request=dict(request),
        chain=dict(chain or {"position": 0, "after": [], "replaces": []}),
        suppress={"classes": classes, "margin": margin},
    )
    manifest = dataclasses.replace(draft, patch_id=derive_patch_id(draft.to_json()))
    return manifest, pack(manifest, graph_bytes)


def write_patch(path: PathLike, data: bytes) -> None:
    """Atomic write (temp file + rename): a failed build never leaves a partial patch."""
    atomic_write_bytes(path, data)


def new_salt() -> bytes:
    return secrets.token_bytes(16)
