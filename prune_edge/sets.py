"""Set requests (hundreds of points, whole classes): two strategies, one certified end state.

``points``: one record per distinct activation pattern, built in one :func:`.synth.synthesize` call.

``representatives`` (PRUNE's loop): cluster the still-uncertified points (k-means on the gated
pre-activations, where regions live), take the member nearest each centroid, build its record with
the widest gate the retained training set and the device policy allow (so it also reaches cluster
members), re-evaluate the composed model through onnxruntime, repeat for ``rounds`` rounds, then
certify whatever is left point by point.

What "a gate that covers the cluster's members" can honestly mean here: a record's certificate holds
on its region, one sign pattern of the gated layers, and its gate is 1 exactly there. A member with
another pattern only sees a partial gate: its prediction may change, but nothing certifies it. On
the mnist5k MLP 200 random training points have 200 distinct patterns over all layers and 199 over
the last layer alone (1000: 1000 and 994; class 3: 400 and 399; ``sets_bench.distinct_patterns``),
so no choice of representatives or of gated layers merges them:
a certified end state needs one record per pattern whichever strategy built it. Both strategies
therefore end with every point inside the region of some record (checked exactly, on the device's
own float32 patterns, through onnxruntime), or name the points left when a ``budget`` of records
runs out; the representative rounds add time and change what happens *before* certification.

Whole classes default to neither: records certify the training points' own regions and miss the
class's unseen points, so ``--forget-class`` builds a class-suppression patch (:mod:`.suppress`)
unless ``--strategy points|representatives`` is given.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from typing import Any, Sequence

import numpy as np
from tqdm import tqdm

from .activations import NO_POINT, TrainActivations
from .basedir import BaseBundle
from .exporters.patch_export import build_patch
from .models.nets import PreactNet
from .runtime.errors import RequestError
from .runtime.interference import RecordSet
from .runtime.manifest import GatedTensor
from .runtime.model import PatchedModel
from .runtime.patchfile import unpack
from .runtime.verify import VerifiedPatch, verify_patch
from .synth import RecordData, SynthConfig, SynthResult, _covered_by, _gated_of, factored_bounds, synthesize

STRATEGIES = ("points", "representatives")
# Measured side by side in `prune-edge bench` (sets rows): the same records, bytes and certified reach,
# and the representative rounds cost time, so one record per point is the default.
DEFAULT_STRATEGY = "points"
# Points per synthesis call. The generic dual bounds hold every region's constraint matrix (about 2.4 MB per
# region on the mnist5k MLP), so conv bases take small chunks. An MLP's factored bounds (prune_edge.mlp_bounds)
# hold ~20 KB per (region, row) pair, and their ascent runs its matrix products and elementwise steps on larger
# batches more efficiently: 256 regions' upper bounds at 120 steps, 2 threads, measured side by side:
# 1.34-1.40 s in chunks of 32, 1.03-1.08 s of 64, 0.90-0.95 s of 128, 1.02-1.05 s of 256; a 1,000-point
# prune build 6.2-6.5 s in chunks of 32 against 4.4-5.3 s of 128, alternating in one process.
CHUNK_GENERIC = 32
CHUNK_FACTORED = 128


@dataclass(frozen=True)
class SetConfig:
    """How a set request becomes records."""

    strategy: str = DEFAULT_STRATEGY
    cluster_size: int = 8  # representatives: about this many uncertified points per k-means cluster
    rounds: int = 2  # representative rounds before the rest is certified point by point
    budget: int | None = None  # most records this patch may hold; None: as many as the points need
    allow_partial: bool = False  # write the patch even when the budget leaves points uncertified
    # points per synthesis call; None: CHUNK_GENERIC, or CHUNK_FACTORED where the bounds are an MLP's factored ones
    chunk: int | None = None

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy: expected one of {STRATEGIES}, found {self.strategy!r}")
        if self.budget is not None and self.budget < 1:
            raise ValueError(f"budget: expected at least 1 record, found {self.budget}")
        if self.cluster_size < 1 or self.rounds < 0:
            raise ValueError("cluster_size >= 1 and rounds >= 0 expected")
        if self.chunk is not None and self.chunk < 1:
            raise ValueError(f"chunk: expected at least 1 point per synthesis call, found {self.chunk}")


def kmeans_representatives(z: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Indices into ``z`` of the member nearest each of ``k`` k-means centroids (deterministic by seed)."""
    from sklearn.cluster import KMeans

    km = KMeans(n_clusters=k, n_init=1, random_state=seed).fit(z)
    reps = []
    for c in range(k):
        members = np.flatnonzero(km.labels_ == c)
        if len(members):
            d = ((z[members] - km.cluster_centers_[c]) ** 2).sum(axis=1)
            reps.append(int(members[int(np.argmin(d))]))
    return np.unique(np.array(reps, dtype=np.int64))


class _Composer:
    """The records so far, packaged and verified exactly as a device would, run through onnxruntime."""

    def __init__(self, bundle: BaseBundle, earlier: Sequence[VerifiedPatch], start: int, config: SynthConfig):
        from .unlearn import base_ref

        self.bundle, self.earlier, self.config = bundle, list(earlier), config
        self.ref = base_ref(bundle, start)

    def model(self, result: SynthResult) -> PatchedModel:
        from .unlearn import certs_of

        request = {"kind": "points", "n_points": 0, "id_roots": []}
        _, data = build_patch(self.ref, result.params(), certs_of(result), self.config.mode, self.config.q_lower,
                              self.config.q_upper, request)
        vp = verify_patch(unpack(data, source="in-progress"), self.bundle.graph)
        return PatchedModel(self.bundle.onnx_path, [*self.earlier, vp], base=self.bundle.graph)


def certified_mask(model: PatchedModel, x: np.ndarray, signs: np.ndarray, y: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(certified, forgotten) per input: certified = the acting record's gate is 1 and its pattern is the
    input's own (``signs``, the device's float32 pattern on the record's gated tensors), i.e. the input lies
    in the region its certificate covers; forgotten = the patched label differs from ``y`` (or the base's)."""
    logits, cover = model.logits_and_coverage(x)
    pred = logits.argmax(1)
    ref = model.base_logits(x).argmax(1) if y is None else y
    certified = np.zeros(len(x), bool)
    for i in np.flatnonzero(cover.gate >= 1.0):
        vp = model.patches[int(cover.patch[i])]
        rec = vp.params.signs[int(cover.record[i])]
        certified[i] = np.array_equal(rec, signs[i, signs.shape[1] - len(rec):])
    return certified, pred != ref


def _remap(result: SynthResult, positions: np.ndarray) -> list[RecordData]:
    """Records of a call on a subset, with members as positions in the whole request."""
    for r in result.records:
        r.members = [int(positions[m]) for m in r.members]
    return result.records


def _widen_gates(activations: TrainActivations, start: int, records: list[RecordData], request_ids: np.ndarray,
                 config: SynthConfig) -> None:
    """The widest gate that still closes (with the safety factor) before the nearest training point
    outside the whole request, and no wider than the device policy: it may open on other members."""
    view = activations.view(start)
    signs = np.stack([r.signs for r in records])
    rows = np.array([request_ids[r.members[0]] for r in records])
    mins = view.min_violation_steps(signs, rows, [request_ids] * len(records))
    v_min = np.where(mins == NO_POINT, np.inf, mins * (view.step / 4))
    with np.errstate(divide="ignore"):
        gamma = np.where(np.isfinite(v_min) & (v_min > 0), config.gate_safety / v_min, config.max_gamma)
    gamma = np.clip(gamma, (1.0 + 1e-6) / config.max_gate_width, config.max_gamma)
    for r, g in zip(records, gamma.tolist()):
        r.gamma = g


def synthesize_set(
    net: PreactNet,
    x_train: np.ndarray,
    y_train: np.ndarray,
    forget_ids: np.ndarray,
    config: SynthConfig,
    activations: TrainActivations,
    device: str = "cpu",
    progress: bool = True,
    after: Sequence[RecordSet] = (),
    *,
    sets: SetConfig,
    bundle: BaseBundle,
    earlier: Sequence[VerifiedPatch] = (),
    **synth_kwargs: Any,
) -> SynthResult:
    """:func:`.synth.synthesize` for a set request under ``sets`` (same signature plus the set options).

    Raises :class:`RequestError` naming the points left uncertified when the budget runs out, unless
    ``sets.allow_partial``."""
    t0 = time.perf_counter()
    from .regions import parse_gate_layers

    start = parse_gate_layers(config.gate_layers, net.n_hidden)
    forget_ids = np.asarray(forget_ids, dtype=np.int64)
    covered = _covered_by(activations, after, forget_ids)
    remaining = np.array([i for i in range(len(forget_ids)) if i not in covered], dtype=np.int64)
    if not len(remaining):
        raise RequestError(f"every one of the {len(forget_ids)} points is already covered by the patches given with --after")
    gated = tuple(GatedTensor(n, s) for n, s in _gated_of(activations, start))
    view = activations.view(start)
    own_signs = view.signs(forget_ids)
    composer = _Composer(bundle, earlier, start, config)
    budget = sets.budget if sets.budget is not None else math.inf
    records: list[RecordData] = []
    rounds: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []  # each synthesize call's own stats

    def so_far() -> list[RecordSet]:
        if not records:
            return list(after)
        return [*after, RecordSet("this request", gated, np.stack([r.signs for r in records]),
                                  np.array([r.target for r in records]))]

    def evaluate(positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        model = composer.model(SynthResult(records, start, view.scale_log2))
        return certified_mask(model, x_train[forget_ids[positions]], own_signs[positions], y_train[forget_ids[positions]])

    if sets.strategy == "representatives":
        for r in range(sets.rounds):
            k = int(min(math.ceil(len(remaining) / sets.cluster_size), budget - len(records)))
            if k < 1 or k >= len(remaining):
                break  # a representative per point is the point round below
            reps = remaining[kmeans_representatives(view.z[forget_ids[remaining]].astype(np.float64), k, config.seed + r)]
            res = synthesize(net, x_train, y_train, forget_ids[reps], replace(config, seed=config.seed + 7919 * (r + 1)),
                             activations, device=device, progress=False, after=so_far(), **synth_kwargs)
            parts.append(res.stats)
            new = _remap(res, reps)
            if config.gamma is None:  # a fixed --gamma is the user's choice, kept as given
                _widen_gates(activations, start, new, forget_ids, config)
            records += new
            cert, forgot = evaluate(remaining)
            rounds.append({"round": r + 1, "representatives": int(len(reps)), "records": len(new),
                           "uncertified_before": int(len(remaining)), "certified": int(cert.sum()),
                           "forgotten_uncertified": int((forgot & ~cert).sum())})
            remaining = remaining[~cert]
            if int(cert.sum()) <= len(reps):
                break  # no gate reached another member: a further round would only add k-means and re-evaluation
    if len(remaining) and len(records) < budget:
        take = remaining[: int(min(len(remaining), budget - len(records)))]
        # in chunks (CHUNK_GENERIC, CHUNK_FACTORED); records of earlier chunks are `after` for later ones
        chunk = sets.chunk or (CHUNK_FACTORED if factored_bounds(net, config) else CHUNK_GENERIC)
        chunks = range(0, len(take), chunk)
        for lo in tqdm(chunks, desc="records", unit="chunk", disable=not progress or len(chunks) < 2, leave=False):
            part = take[lo : lo + chunk]
            res = synthesize(net, x_train, y_train, forget_ids[part], replace(config, seed=config.seed + lo), activations,
                             device=device, progress=False, after=so_far(), **synth_kwargs)
            parts.append(res.stats)
            records += _remap(res, part)
    # The end state, measured on the device path: which points lie in the region of an acting record.
    todo = np.array([i for i in range(len(forget_ids)) if i not in covered], dtype=np.int64)
    cert, forgot = evaluate(todo)
    left = todo[~cert]
    stats = {
        **_merge_stats(parts),
        "strategy": sets.strategy,
        "build_seconds": time.perf_counter() - t0,
        "records": len(records),
        "points": int(len(forget_ids)),
        "already_covered": len(covered),
        "certified": int(cert.sum()),
        "forgotten": int(forgot.sum()),
        "uncertified_ids": [int(forget_ids[i]) for i in left],
        "forgotten_uncertified": int((forgot & ~cert).sum()),
        "rounds": rounds,
        "gate_start_layer": start,
        "gate_scale_log2": view.scale_log2,
        "budget": sets.budget,
    }
    if len(left) and not sets.allow_partial:
        shown = ", ".join(str(int(forget_ids[i])) for i in left[:20])
        more = f" and {len(left) - 20} more" if len(left) > 20 else ""
        raise RequestError(
            f"{len(left)} of {len(todo)} points left uncertified within the budget of {sets.budget} records: "
            f"training ids {shown}{more} (raise --budget, or --allow-partial to write the patch anyway)"
        )
    return SynthResult(records=records, start=start, scale_log2=view.scale_log2, stats=stats, covered=covered)


def _merge_stats(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """synthesize's stats over several calls: counts and seconds add up, settings are the last call's."""
    settings = ("gated_values", "gate_start_layer", "gate_scale_log2")
    out: dict[str, Any] = {}
    for st in parts:
        for k, v in st.items():
            if k in out and isinstance(v, (int, float)) and not isinstance(v, bool) and k not in settings:
                out[k] += v
            else:
                out[k] = v
    out["synthesis_calls"] = len(parts)
    return out


def class_ids(y_train: np.ndarray, classes: Sequence[int], n_classes: int) -> np.ndarray:
    """Training ids of every point of ``classes`` (a whole-class request)."""
    bad = [c for c in classes if not 0 <= c < n_classes]
    if bad:
        raise RequestError(f"--forget-class: expected classes in [0, {n_classes}), found {bad}")
    if len(set(classes)) >= n_classes:
        raise RequestError(f"--forget-class: forgetting all {n_classes} classes leaves no label to move to")
    return np.flatnonzero(np.isin(y_train, list(classes))).astype(np.int64)


def build_set_patch(
    bundle: BaseBundle,
    forget_ids: np.ndarray,
    config: SynthConfig,
    out: Any,
    sets: SetConfig = SetConfig(),
    device: str = "auto",
    progress: bool = True,
    evaluate: bool = True,
    after: Sequence[Any] = (),
    classes: Sequence[int] | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """:func:`.unlearn.build_point_patch` with a set strategy; the strategy (and the classes of a class
    request) go into the manifest's request. Extra keyword arguments pass through (e.g. ``ledger``)."""
    import functools

    from .unlearn import build_point_patch

    earlier = [verify_patch(p, bundle.graph) for p in after]
    covered = _covered_by(bundle.activations, [vp.record_set() for vp in earlier], np.asarray(forget_ids))
    if earlier and len(covered) == len(forget_ids):
        # every point is already forgotten, certified, by the chain: answered from it, nothing to write
        return {"patch": None, "points": int(len(forget_ids)), "strategy": sets.strategy,
                "answered_from_chain": {int(forget_ids[i]): {"patch": src, "record": rec} for i, (src, rec) in covered.items()}}
    synth = functools.partial(synthesize_set, sets=sets, bundle=bundle, earlier=earlier)
    request: dict[str, Any] = {"strategy": sets.strategy}
    if classes is not None:
        request.update(kind="class", classes=sorted(int(c) for c in classes))
    report = build_point_patch(bundle, forget_ids, config, out, device=device, progress=progress, evaluate=evaluate,
                               after=after, synth=synth, request=request, **kwargs)
    report["strategy"] = sets.strategy
    report["uncertified_ids"] = report["synthesis"]["uncertified_ids"]
    return report


__all__ = ["STRATEGIES", "DEFAULT_STRATEGY", "SetConfig", "synthesize_set", "build_set_patch", "certified_mask",
           "class_ids", "kmeans_representatives"]
