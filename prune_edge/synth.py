"""PRUNE patch synthesis for forget points: regions -> certified affine maps -> gate widths.

For each forget point (points that share an activation pattern merge into one record):
1. pick a random "confusing" target label (not the true label, and not the base's prediction unless
   that leaves no class, as with two classes and a misclassified point); where the region meets a
   record of a patch the devices already run (``after``), take that record's target instead, so the
   two can never disagree on an input (and a point already inside such a region is not re-patched);
2. ``prune``: bound every specification row e_j - e_target over the region (sound Lagrangian dual
   bounds by default, exact HiGHS LPs with ``bounds="exact"``), then scale (alpha) and shift (beta)
   each row into [q_lower, q_upper] -- PRUNE's closed form;
   ``collapse``: alpha = 0, so the region's output becomes a constant where the target wins by the
   margin (no LP, certified by construction);
3. choose the widest gate (smallest gamma) that, with a safety factor, stays closed on every retained
   training point and every other record's forget points, and no wider than the device policy.
The region of a record is exactly where its gate is 1 (see ``runtime.patchgraph``), so certifying
the region certifies every input the record acts on in full.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from .activations import NO_POINT, GatedView, TrainActivations
from .lp import row_bounds_many
from .models.nets import PreactNet
from .regions import Regions, compute_regions, parse_gate_layers, region_lp
from .mlp_bounds import MLPRegions, chain_dual_lower_bounds, is_mlp, mlp_regions
from .runtime.errors import RequestError
from .runtime.interference import RecordSet, meeting_targets
from .runtime.manifest import GatedTensor
from .runtime.patchgraph import PatchParams, affine_from_scales_many, spec_rows
from .runtime.policy import DEFAULT_POLICY

MODES = ("prune", "collapse")
BOUNDS = ("dual", "exact")
# How a prune record shifts its specification rows into [q_lower, q_upper] (see _prune_scales):
# "per-row" shifts each row by what its own upper bound needs (PRUNE's closed form as written);
# "common" shifts every row by what the largest upper bound needs (the target's logit raised).
SHIFTS = ("per-row", "common")
# Which dual upper bounds are tightened to the end: "largest" stops a row's ascent (bounds.DROP_AT) once
# its bound is clearly below its region's largest, "all" runs every row to the end. Under "common" only
# the largest matters; under "per-row" a stopped row is shifted by its looser bound, a little more than
# it needs (1,000 points: target margin over the runner-up on the forget points, median 13.0 logits
# against 10.5 with "all"; the build 3.8 s against 10.5 s; docs/sets.md).
TIGHTEN = ("largest", "all")
# "Clearly below": max(DOMINANCE_ABS, DOMINANCE_REL * |largest|) logits. Measured on 1,000 regions of
# the default MLP: no region's largest bound moved by more than 0.05 against running every row to the end
# (margins of 2-4 logits decided at step 20 moved 3-14 regions' by up to 2.7).
DOMINANCE_ABS = 6.0
DOMINANCE_REL = 0.2
# Aim this far inside the specification, so the float32 rounding of the stored t (checked by the
# device on the stored tensors, with no tolerance) cannot leave it.
SPEC_INSET = 1e-4
# Dual bounds of an MLP base through its shared weights (prune_edge.mlp_bounds) rather than on each
# region's materialised constraint matrix: the same bounds; a 200-point build at 200 steps measured 4.2x
# less CPU time (11.4 s -> 2.7 s, one thread). False: the generic path (what conv bases always use).
FACTORED_MLP = True


@dataclass(frozen=True)
class SynthConfig:
    """Knobs of patch synthesis. Defaults follow the method note."""

    mode: str = "prune"
    gate_layers: str = "all"
    gamma: float | None = None  # None: widest safe gate per record
    seed: int = 0
    margin: float = 1.0  # q_upper = -margin: the target wins by at least this much on the region
    q_lower: float = -1000.0
    gate_safety: float = 2.0  # gate closes at 1/safety of the nearest other point's violation
    max_gamma: float = 1e4
    max_gate_width: float = DEFAULT_POLICY.max_gate_width  # 1/gamma never above the device policy
    bounds: str = "dual"  # "dual": sound Lagrangian bounds (torch); "exact": HiGHS LPs
    # Adam steps of the dual bounds. Measured on the default MLP (40 points, input space, upper sides, gap
    # relative to max(1, |LP optimum|)): 120 steps median 0.12% (p90 2.8%, max 17%), 200 steps median 0.03%
    # (p90 1.1%, max 13%) at 1.6x the build time; feature space (last:1) stays below 0.02% median either way.
    # The float64 certificate holds for any count; fewer steps only shift a patched row a little further.
    dual_steps: int = 120
    lp_workers: int | None = None  # processes for the exact region LPs; None: all cores
    target: str = "confuse"  # what a record maps its region to: PRUNE's confusing label or "unseen" (prune_edge.targets)
    shift: str = "per-row"  # prune: each row shifted by its own bound's need ("per-row") or all by the largest's ("common")
    tighten: str = "largest"  # prune, dual bounds of an MLP: tighten each region's largest bound to the end, or "all"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, found {self.mode!r}")
        if self.gamma is not None and not (0 < self.gamma < float("inf")):
            raise ValueError(f"gamma: expected a positive finite number, found {self.gamma}")
        if not self.margin > 0:
            raise ValueError(f"margin: expected > 0, found {self.margin}")
        if self.bounds not in BOUNDS:
            raise ValueError(f"bounds: expected one of {BOUNDS}, found {self.bounds!r}")
        if self.shift not in SHIFTS:
            raise ValueError(f"shift: expected one of {SHIFTS}, found {self.shift!r}")
        if self.tighten not in TIGHTEN:
            raise ValueError(f"tighten: expected one of {TIGHTEN}, found {self.tighten!r}")
        if self.target not in ("confuse", "unseen"):
            raise ValueError(f"target: expected confuse or unseen, found {self.target!r}")
        if self.target == "unseen" and self.mode != "collapse":
            raise ValueError("target unseen: its records are collapse-form (a calibrated constant output); use mode collapse")

    @property
    def q_upper(self) -> float:
        return -float(self.margin)


@dataclass
class RecordData:
    """One synthesised record (region) before export."""

    signs: np.ndarray  # int8 (M,)
    gamma: float
    target: int
    alpha: np.ndarray
    beta: np.ndarray
    mean_scale: float
    mean_shift: float
    lower: np.ndarray | None
    upper: np.ndarray | None
    T: np.ndarray
    t: np.ndarray
    members: list[int]  # positions in the forget list


@dataclass
class SynthResult:
    records: list[RecordData]
    start: int  # first gated hidden layer
    scale_log2: int  # the gates' quantization step 2^e (see runtime.patchgraph)
    stats: dict[str, Any] = field(default_factory=dict)
    covered: dict[int, tuple[str, int]] = field(default_factory=dict)  # forget position -> (patch source, record)

    def params(self) -> PatchParams:
        return PatchParams(
            signs=np.stack([r.signs for r in self.records]),
            gamma=np.array([r.gamma for r in self.records]),
            T=np.stack([r.T for r in self.records]),
            t=np.stack([r.t for r in self.records]),
            scale_log2=self.scale_log2,
        )


def _round_outward(lower: np.ndarray, upper: np.ndarray, decimals: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Round LP bounds outward (a looser bound is still sound) so the manifest stays short: the bounds
    are most of a prune manifest's bytes. ``upper`` is rounded up to ``decimals`` (1: a patched row
    moves by < 0.1 more than the exact bound would; the dual bounds' own gap to the LP optimum is of
    that order, bench row "bound gap"). ``lower`` only meets q_lower (-1000 by default), so each
    record keeps one number, its rows' minimum floored to an integer, repeated on every row (the
    manifest's shape is unchanged and deflate stores the repeats in a few bytes; a squeeze it would
    force is still certified, just by a smaller alpha). 200 points: 9.8 KB of manifest at 2 decimals
    and per-row integer lowers, 6.1 KB as here (measured, deflate)."""
    q = 10.0**decimals
    low = np.floor(lower.min(axis=-1, keepdims=True))
    return np.broadcast_to(low, lower.shape).copy(), np.ceil(upper * q) / q


def _inset(q: float | np.ndarray) -> float | np.ndarray:
    return SPEC_INSET + 1e-6 * np.abs(q)


def _prune_scales(lower: np.ndarray, upper: np.ndarray, q_lower: float, q_upper: float,
                  shift: str = "per-row") -> tuple[np.ndarray, np.ndarray]:
    """PRUNE: per row, scale the interval to fit the specification width, then shift it inside.

    ``per-row``: each row moves by what its own bounds need (0 when already inside). ``common``: every
    row of a record moves by the largest need, the most negative shift any row needs (a row whose
    lower side would then leave the specification moves only as far as it can, which still keeps its
    upper side inside, since the scaled interval fits). In logits that raises the target against all
    classes alike, and a row's bound only has to be below the largest one, not tight."""
    # Aim a little inside the specification so float32 rounding of the stored t cannot leave it.
    q_lower_in = q_lower + _inset(q_lower)
    q_upper_in = q_upper - _inset(upper)
    alpha = np.ones_like(upper)
    beta = np.zeros_like(upper)
    width, room = upper - lower, q_upper_in - q_lower_in
    squeeze = width > room
    alpha[squeeze] = room[squeeze] / width[squeeze]
    beta[squeeze] = q_upper_in[squeeze] - alpha[squeeze] * upper[squeeze]
    fits = ~squeeze
    high, low = fits & (upper > q_upper_in), fits & (lower < q_lower_in)
    beta[high] = (q_upper_in - upper)[high]
    beta[low] = (q_lower_in - lower)[low]
    if shift == "common":
        need = np.minimum(beta, 0.0).min(axis=-1, keepdims=True)  # the largest downward shift of any row
        beta = np.maximum(need, q_lower_in - alpha * lower)  # <= q_upper_in - alpha * upper, as width fits
    # Short decimals for the manifest; rounding beta down keeps the upper side inside.
    return alpha, np.floor(beta * 1e6) / 1e6


def choose_target(draw: float, labels: set[int], preds: set[int], n_classes: int) -> int:
    """The class at uniform ``draw`` in [0, 1) among those that are neither a true label nor a current
    prediction of the region's points; when that leaves none (two classes and a misclassified point),
    among those that are not a true label (the method's own rule)."""
    choices = [c for c in range(n_classes) if c not in labels and c not in preds]
    if not choices:
        choices = [c for c in range(n_classes) if c not in labels]
    if not choices:
        raise RequestError(
            f"no target label for the forget points sharing one region: their labels cover all {n_classes} classes"
        )
    return choices[min(int(draw * len(choices)), len(choices) - 1)]


def synthesize(
    net: PreactNet,
    x_train: np.ndarray,
    y_train: np.ndarray,
    forget_ids: np.ndarray,
    config: SynthConfig,
    activations: TrainActivations,
    device: str = "cpu",
    progress: bool = True,
    after: Sequence[RecordSet] = (),
    calibration: np.ndarray | None = None,
) -> SynthResult:
    """Build certified records that move every forget point to a confusing label.

    ``activations`` (the training set through this base's ONNX graph, see :mod:`.activations`) is
    what a server keeps between requests. ``after`` holds the records of the patches devices already
    run: points inside their regions are reported as covered, not patched again, and new records take
    the target of any old record whose region they meet.
    """
    t0 = time.perf_counter()
    n_classes = net.layers[-1].out_features
    start = parse_gate_layers(config.gate_layers, net.n_hidden)
    view = activations.view(start)
    gated = tuple(GatedTensor(n, s) for n, s in _gated_of(activations, start))
    rng = np.random.default_rng(config.seed)
    forget_ids = np.asarray(forget_ids, dtype=np.int64)
    covered = _covered_by(activations, after, forget_ids)
    todo = np.array([i for i in range(len(forget_ids)) if i not in covered], dtype=np.int64)
    if not len(todo):
        raise RequestError(f"every one of the {len(forget_ids)} points is already covered by the patches given with --after")
    ids = forget_ids[todo]
    # The device's own float32 values (onnxruntime on base.onnx): patterns exactly as its gates read them.
    signs = view.signs(ids)
    logits = view.logits[ids].astype(np.float64)
    # Points with the same pattern share one region, hence one record.
    groups: dict[bytes, list[int]] = {}
    for i, s in enumerate(signs):
        groups.setdefault(s.tobytes(), []).append(i)
    preds = logits.argmax(1).tolist()
    labels = y_train[ids].tolist()
    draws = rng.random(len(groups)).tolist()  # one draw per record, in record order: deterministic by seed
    reps = [members[0] for members in groups.values()]
    forced = meeting_targets(after, gated, signs[reps]) if after else [set() for _ in reps]
    plans = []
    for members, draw, must in zip(groups.values(), draws, forced):
        member_labels = {labels[i] for i in members}
        if len(must) > 1 or (must and must & member_labels and config.target == "confuse"):
            raise RequestError(
                f"training point {int(ids[members[0]])}: its region meets earlier records with targets {sorted(must)}; "
                "no target keeps both certificates (try --gate-layers all)"
            )
        target = next(iter(must)) if must else choose_target(draw, member_labels, {preds[i] for i in members}, n_classes)
        plans.append((members, target))
    if config.target == "unseen":  # label and output of a model that never saw the points (prune_edge.targets)
        from .targets import unseen_rows

        if calibration is None:
            raise ValueError("target unseen needs the calibration logits (prune_edge.targets.load_or_build_calibration)")
        unseen = unseen_rows(calibration, [m for m, _ in plans], ids, forced, config.margin, config.q_lower)
        plans = [(m, tg) for (m, _), tg in zip(plans, unseen.targets)]
    t_regions = time.perf_counter() - t0
    p, rows = len(plans), n_classes - 1
    lp_solves, t_lp, bound_stats = 0, 0.0, {}
    if config.mode == "prune":
        t1 = time.perf_counter()
        # PRUNE needs each region's affine map and constraints (float64) for its bounds; the pattern
        # is the device's (float32), which the float64 pass agrees with up to a neuron at exactly 0.
        regions: Regions | MLPRegions
        if factored_bounds(net, config):  # no per-region matrices (prune_edge.mlp_bounds)
            regions = mlp_regions(net, x_train[ids[reps]], start, signs[reps], device=device)
        else:
            regions = compute_regions(net, x_train[ids[reps]], start, device=device)
            regions.signs = signs[reps]
        lower, upper, lp_solves, bound_stats = _region_bounds(regions, [tg for _, tg in plans], config, device, progress)
        t_lp = time.perf_counter() - t1
        lower, upper = _round_outward(lower, upper)
        alpha, beta = _prune_scales(lower, upper, config.q_lower, config.q_upper, config.shift)
        mean_scale, mean_shift = np.ones(p), np.zeros(p)
    else:
        lower = upper = None
        alpha = np.zeros((p, rows))
        beta = np.full((p, rows), np.floor((config.q_upper - SPEC_INSET) * 1e6) / 1e6)
        mean_scale, mean_shift = np.zeros(p), np.round(logits[reps].mean(axis=1), 6)  # the region's mean logit
        if config.target == "unseen":
            beta, mean_shift = unseen.beta, unseen.mean_shift
    T, t = affine_from_scales_many([target for _, target in plans], np.column_stack([alpha, mean_scale]),
                                   np.column_stack([beta, mean_shift]), n_classes)
    records = [
        RecordData(
            signs=signs[rep].copy(), gamma=float("nan"), target=target, alpha=alpha[k], beta=beta[k],
            mean_scale=float(mean_scale[k]), mean_shift=float(mean_shift[k]),
            lower=None if lower is None else lower[k], upper=None if upper is None else upper[k], T=T[k], t=t[k],
            members=[int(todo[i]) for i in members],
        )
        for k, ((members, target), rep) in enumerate(zip(plans, reps))
    ]
    t_gates = time.perf_counter()
    overlaps = _set_gates(view, forget_ids, records, config)
    t_end = time.perf_counter()
    stats = {
        "build_seconds": t_end - t0,
        "regions_seconds": t_regions,
        "lp_seconds": t_lp,
        "lp_solves": lp_solves,
        "bounds": config.bounds if config.mode == "prune" else None,
        "shift": config.shift if config.mode == "prune" else None,
        "tighten": config.tighten if factored_bounds(net, config) else None,  # the generic path runs every row
        **bound_stats,
        "gate_seconds": t_end - t_gates,
        "records": len(records),
        "points": int(len(forget_ids)),
        "already_covered": len(covered),
        "gated_values": int(signs.shape[1]),
        "gate_start_layer": start,
        "gate_scale_log2": view.scale_log2,
        "unavoidable_overlaps": overlaps,
    }
    return SynthResult(records=records, start=start, scale_log2=view.scale_log2, stats=stats, covered=covered)


def factored_bounds(net: PreactNet, config: SynthConfig) -> bool:
    """True when a prune build's bounds go through the MLP's shared weights (prune_edge.mlp_bounds)."""
    return config.mode == "prune" and config.bounds == "dual" and FACTORED_MLP and is_mlp(net)


def _gated_of(activations: TrainActivations, start: int) -> list[tuple[str, tuple[int, ...]]]:
    shapes = activations.graph.tensor_shapes()
    return [(n, tuple(shapes[n])) for n in activations.relu_inputs[start:]]


def _covered_by(activations: TrainActivations, after: Sequence[RecordSet], forget_ids: np.ndarray) -> dict[int, tuple[str, int]]:
    """Forget positions already inside a region of an earlier record: forgotten, certified, done."""
    out: dict[int, tuple[str, int]] = {}
    names = activations.relu_inputs
    for s in after:
        k = len(names) - len(s.gated)
        if k < 0 or tuple(names[k:]) != tuple(g.name for g in s.gated):
            continue
        table = {row.tobytes(): r for r, row in enumerate(s.signs)}
        for i, row in enumerate(activations.view(k).signs(forget_ids)):
            r = table.get(row.tobytes())
            if r is not None and i not in out:
                out[i] = (s.source, r)
    return out


def _region_bounds(
    regions: Regions | MLPRegions, targets: list[int], config: SynthConfig, device: str, progress: bool
) -> tuple[np.ndarray, np.ndarray, int, dict[str, Any]]:
    """Sound [lower, upper] of every specification row over every region.

    Only bounds that can change the patch are optimised: a row's lower side keeps its box bound when
    that already fits the specification (then alpha and beta depend on the upper side alone)."""
    n_classes = regions.off_f.shape[1]
    specs = [spec_rows(tg, n_classes) for tg in targets]
    if isinstance(regions, MLPRegions):
        obj, const = regions.objectives(np.stack(specs))  # (B, C-1, D), (B, C-1)
    else:
        obj = np.einsum("bkc,bcd->bkd", np.stack(specs), regions.jac_f.numpy())
        const = np.einsum("bkc,bc->bk", np.stack(specs), regions.off_f.numpy())
    lo, hi = regions.lower, regions.upper
    box_lower = np.minimum(obj * lo, obj * hi).sum(axis=2) + const
    if config.bounds == "exact":
        tasks = [(region_lp(regions, b), specs[b]) for b in range(len(targets))]
        bounds = row_bounds_many(tasks, config.lp_workers, progress=progress)
        lower, upper = np.stack([bd[0] for bd in bounds]), np.stack([bd[1] for bd in bounds])
        return lower, upper, sum(bd[2] for bd in bounds), {}
    if isinstance(regions, MLPRegions):
        mlp = regions

        def minimum(sel: np.ndarray | None, c: np.ndarray, keep=None) -> np.ndarray:
            return chain_dual_lower_bounds(mlp if sel is None else mlp.subset(sel), c, steps=config.dual_steps, keep=keep)
    else:
        from .bounds import dual_lower_bounds

        lps = [region_lp(regions, b) for b in range(len(targets))]
        A = np.stack([lp.a_ub for lp in lps])
        bvec = np.stack([lp.b_ub for lp in lps])

        def minimum(sel: np.ndarray | None, c: np.ndarray, keep=None) -> np.ndarray:  # keep: all rows run to the end
            a, b = (A, bvec) if sel is None else (A[sel], bvec[sel])
            return dual_lower_bounds(a, b, lo, hi, c, steps=config.dual_steps, device=device)
    stopped = np.zeros(const.shape, dtype=bool)  # rows whose ascent stopped early (a stopped row never resumes)

    def undominated(est: np.ndarray) -> np.ndarray:
        """The rows whose upper bound so far is not clearly below its region's largest (tighten largest)."""
        up = -est + const
        top = up.max(axis=1, keepdims=True)
        wanted = up > top - np.maximum(DOMINANCE_ABS, DOMINANCE_REL * np.abs(top))
        stopped[:] |= ~wanted
        return wanted

    upper = -minimum(None, -obj, undominated if config.tighten == "largest" else None) + const
    room = (config.q_upper - _inset(upper)) - (config.q_lower + _inset(config.q_lower))
    keep = (box_lower >= config.q_lower + _inset(config.q_lower)) & (upper - box_lower <= room)
    lower = box_lower.copy()
    if not keep.all():
        need = np.flatnonzero(~keep.all(axis=1))
        lower[need] = minimum(need, obj[need]) + const[need]
    return lower, upper, 0, {"bounds_skipped": int(keep.sum()), "bounds_optimised": int(upper.size + (~keep).sum()),
                             "bounds_stopped_early": int(stopped.sum())}


def _set_gates(view: GatedView, forget_ids: np.ndarray, records: list[RecordData], config: SynthConfig) -> int:
    """Give each record the widest gate that stays closed on every point it must not touch.

    The gate opens where violation < 1/gamma; with gamma = safety / v_min it closes at v_min/safety,
    well before the nearest retained point or other record's forget point. Returns how many records
    share their exact region with such a point (their gate cannot exclude it)."""
    if config.gamma is not None:
        for r in records:
            r.gamma = float(config.gamma)
        return 0
    exclude = [forget_ids[r.members] for r in records]  # a record's own forget points may open its gate
    rows = np.array([forget_ids[r.members[0]] for r in records])
    mins = view.min_violation_steps(np.stack([r.signs for r in records]), rows, exclude)  # exact integers
    v_min = np.where(mins == NO_POINT, np.inf, mins * (view.step / 4))  # in pre-activation units
    # v_min <= 0: the record shares its exact region with such a point (counted; no gate can exclude
    # it); inf: nothing else to keep out, so the tightest gate is the cautious one.
    with np.errstate(divide="ignore"):
        gamma = np.where(np.isfinite(v_min) & (v_min > 0), config.gate_safety / v_min, config.max_gamma)
    # never wider than the device policy: 1/gamma <= max_gate_width (a hair inside, for float32 gamma)
    gamma = np.maximum(gamma, (1.0 + 1e-6) / config.max_gate_width)
    for r, g in zip(records, np.minimum(gamma, config.max_gamma).tolist()):
        r.gamma = g
    overlaps = int((v_min <= 0).sum())
    return overlaps
