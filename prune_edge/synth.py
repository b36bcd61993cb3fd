"""PRUNE patch synthesis for forget points: regions -> certified affine maps -> gate widths.

For each forget point (points that share an activation pattern merge into one record):
1. pick a random "confusing" target label (not the true label, and not the base's prediction unless
   that leaves no class, as with two classes and a misclassified point);
2. ``prune``: bound every specification row e_j - e_target over the region with two LPs, then scale
   (alpha) and shift (beta) each row into [q_lower, q_upper] -- PRUNE's closed form;
   ``collapse``: alpha = 0, so the region's output becomes a constant where the target wins by the
   margin (no LP, certified by construction);
3. choose the widest gate (smallest gamma) that, with a safety factor, stays closed on every retained
   training point and every other record's forget points.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .activations import NO_POINT, GatedView, TrainActivations
from .models.nets import PreactNet
from .lp import row_bounds_many
from .regions import Regions, compute_regions, parse_gate_layers, region_lp
from .runtime.errors import RequestError
from .runtime.patchgraph import PatchParams, affine_from_scales_many, spec_rows

MODES = ("prune", "collapse")


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
    lp_workers: int | None = None  # processes for the region LPs; None: all cores

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, found {self.mode!r}")
        if self.gamma is not None and not (0 < self.gamma < float("inf")):
            raise ValueError(f"gamma: expected a positive finite number, found {self.gamma}")
        if not self.margin > 0:
            raise ValueError(f"margin: expected > 0, found {self.margin}")

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

    def params(self) -> PatchParams:
        return PatchParams(
            signs=np.stack([r.signs for r in self.records]),
            gamma=np.array([r.gamma for r in self.records]),
            T=np.stack([r.T for r in self.records]),
            t=np.stack([r.t for r in self.records]),
            scale_log2=self.scale_log2,
        )


def _round_outward(lower: np.ndarray, upper: np.ndarray, decimals: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """Round LP bounds outward to ``decimals``: still sound, and the manifest stays short."""
    q = 10.0**decimals
    return np.floor(lower * q) / q, np.ceil(upper * q) / q


def _prune_scales(lower: np.ndarray, upper: np.ndarray, q_lower: float, q_upper: float) -> tuple[np.ndarray, np.ndarray]:
    """PRUNE: per row, scale the interval to fit the specification width, then shift it inside."""
    # Aim a hair inside the specification so float rounding of alpha * v + beta cannot leave it.
    q_lower_in = q_lower + 1e-6 * (1.0 + abs(q_lower))
    q_upper_in = q_upper - 1e-6 * (1.0 + np.abs(upper))
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
    device: str = "cpu",
    progress: bool = True,
    activations: TrainActivations | None = None,
) -> SynthResult:
    """Build certified records that move every forget point to a confusing label.

    ``activations`` (the training set through this base, see :mod:`.activations`) is what a server
    keeps between requests; without it the one forward pass over the training set is paid here.
    """
    t0 = time.perf_counter()
    n_classes = net.layers[-1].out_features  # (regions and the training view put the net in eval mode)
    start = parse_gate_layers(config.gate_layers, net.n_hidden)
    view = (activations or TrainActivations(net, x_train)).view(start)
    rng = np.random.default_rng(config.seed)
    if config.mode == "prune":
        # PRUNE needs each region's affine map and constraints (float64) for its LPs.
        regions: Regions | None = compute_regions(net, x_train[forget_ids], start, device=device)
        signs = regions.signs
        logits = regions.off_f.numpy() + np.einsum("bcd,bd->bc", regions.jac_f.numpy(), regions.h.numpy())
    else:
        # Collapse needs no LP, hence no Jacobian: forget points are training points, so their
        # patterns and logits are rows of the training set's view.
        regions = None
        signs = view.signs(forget_ids)
        logits = view.logits[forget_ids].astype(np.float64)
    t_regions = time.perf_counter() - t0
    # Points with the same pattern share one region, hence one record.
    groups: dict[bytes, list[int]] = {}
    for i, s in enumerate(signs):
        groups.setdefault(s.tobytes(), []).append(i)
    preds = logits.argmax(1).tolist()
    labels = y_train[forget_ids].tolist()
    draws = rng.random(len(groups)).tolist()  # one draw per record, in record order: deterministic by seed
    plans = []
    for members, draw in zip(groups.values(), draws):
        target = choose_target(draw, {labels[i] for i in members}, {preds[i] for i in members}, n_classes)
        plans.append((members, target))
    lp_solves, t_lp = 0, 0.0
    if config.mode == "prune":
        t1 = time.perf_counter()
        tasks = [(region_lp(regions, members[0]), spec_rows(target, n_classes)) for members, target in plans]
        bounds = row_bounds_many(tasks, config.lp_workers, progress=progress)
        lp_solves = sum(b[2] for b in bounds)
        t_lp = time.perf_counter() - t1
    # Every record's scales, then PRUNE's closed form for all of them at once.
    reps = [members[0] for members, _ in plans]
    p, rows = len(plans), n_classes - 1
    if config.mode == "prune":
        lower, upper = _round_outward(np.stack([bd[0] for bd in bounds]), np.stack([bd[1] for bd in bounds]))
        alpha, beta = _prune_scales(lower, upper, config.q_lower, config.q_upper)
        mean_scale, mean_shift = np.ones(p), np.zeros(p)
    else:
        lower = upper = None
        alpha, beta = np.zeros((p, rows)), np.full((p, rows), config.q_upper)
        mean_scale, mean_shift = np.zeros(p), np.round(logits[reps].mean(axis=1), 6)  # the region's mean logit
    T, t = affine_from_scales_many([target for _, target in plans], np.column_stack([alpha, mean_scale]),
                                   np.column_stack([beta, mean_shift]), n_classes)
    records = [
        RecordData(
            signs=signs[rep].copy(), gamma=float("nan"), target=target, alpha=alpha[k], beta=beta[k],
            mean_scale=float(mean_scale[k]), mean_shift=float(mean_shift[k]),
            lower=None if lower is None else lower[k], upper=None if upper is None else upper[k], T=T[k], t=t[k],
            members=list(members),
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
        "gate_seconds": t_end - t_gates,
        "records": len(records),
        "points": int(len(forget_ids)),
        "gated_values": int(signs.shape[1]),
        "gate_start_layer": start,
        "gate_scale_log2": view.scale_log2,
        "unavoidable_overlaps": overlaps,
    }
    return SynthResult(records=records, start=start, scale_log2=view.scale_log2, stats=stats)


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
    v_min = np.where(mins == NO_POINT, np.inf, mins * (view.step / 2))
    # v_min <= 0: the record shares its exact region with such a point (counted; no gate can exclude
    # it); inf: nothing else to keep out, so the tightest gate is the cautious one.
    with np.errstate(divide="ignore"):
        gamma = np.where(np.isfinite(v_min) & (v_min > 0), config.gate_safety / v_min, config.max_gamma)
    for r, g in zip(records, np.minimum(gamma, config.max_gamma).tolist()):
        r.gamma = g
    overlaps = int((v_min <= 0).sum())
    return overlaps
