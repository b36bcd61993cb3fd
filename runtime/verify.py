"""Checks a device runs on patch files before it trusts them, in a fixed order.

Per file: ``format -> integrity -> binding -> structure -> locality -> certificate``. Each check only
runs if the ones before it passed, and no ONNX byte is parsed before the graph's digest matched the
manifest. Then, over every patch a device runs together: ``interference`` (no two records with
different targets share a region) and the policy's totals. :func:`verify_patch` raises the first
failure (for use); :func:`certify_patch` returns a report with every check's verdict.

What the checks prove, whoever built the patch (the device needs no trust in the server for these):
- the graph *is* the canonical gated-affine graph of its own parameters, gating only on the base's
  Relu inputs (a suffix of them, as the base card lists) with the card's quantization step, so it
  changes nothing where its gates are 0, acts through at most one record per input, and its gates
  open no further than the policy's width past their regions;
- every correction is finite and bounded (caps on |T| and |t|), the record counts are bounded;
- each record's numbers carry its certificate: the closed form of PRUNE, and its stored bounds mapped
  into the specification, checked on the stored float32 tensors with absolute tolerances.
- a suppression patch (mode ``suppress``, no records) *is* the canonical suppression graph of the
  classes and margin its manifest names, with classes in range and a margin > 0 (for a margin that
  follows the input, also its weights and bias: the manifest's, finite, within policy): then no input is
  ever predicted as a suppressed class (by construction, :mod:`.patchgraph`), and a set whose records
  target a suppressed class is refused (:func:`check_suppressions`).
What stays the server's word: that the stored bounds are the region's (the LPs), and that the
patterns are the forgotten points' (the request's Merkle root of salted id commitments binds the
request, not the data; see :mod:`.merkle`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx

from .base import BaseGraph
from .errors import (
    CertificateError,
    IncompatibleBaseError,
    InterferenceError,
    LocalityError,
    PatchVerificationError,
    StructureError,
)
from .fileio import PathLike
from .interference import RecordSet, check_interference
from .manifest import Manifest
from .patchfile import PatchFile, read_patch_file
from .patchgraph import (
    SUPPRESS_INPUT_CLIP,
    SUPPRESS_MARGIN_BOUND,
    PatchParams,
    SuppressParams,
    affine_from_scales_many,
    build_patch_graph,
    build_suppress_graph,
    completed_specs,
    extract_params,
    extract_suppress_params,
)
from .policy import DEFAULT_POLICY, DevicePolicy

CHECKS = ("format", "integrity", "binding", "structure", "locality", "certificate")
# float32 storage of T: entries of |T| <= 16 round by < 1e-6; P(I+T) = diag(alpha) P to this, absolutely.
_T_ATOL = 1e-5
_CERT_BLOCK_VALUES = 1 << 20  # records per certificate block: about this many values in each (block, C, C)


@dataclass(frozen=True)
class VerifiedPatch:
    """A patch that passed every check: safe to compose with the base it is bound to."""

    source: str
    manifest: Manifest
    model: onnx.ModelProto
    params: PatchParams  # no records (P = 0) for a suppression patch
    suppress: SuppressParams | None = None  # mode "suppress": the classes it keeps from being predicted

    def record_set(self) -> RecordSet:
        targets = np.array([r.target for r in self.manifest.records], dtype=np.int64)
        return RecordSet(self.source, self.manifest.gated, self.params.signs, targets)


@dataclass
class CheckResult:
    name: str
    status: str  # "pass", "fail" or "skipped"
    detail: str = ""


@dataclass
class PatchReport:
    """Verdict of every check on one patch file."""

    source: str
    checks: list[CheckResult] = field(default_factory=list)
    manifest: Manifest | None = None
    verified: VerifiedPatch | None = None

    @property
    def passed(self) -> bool:
        return all(c.status == "pass" for c in self.checks)

    @property
    def failure(self) -> CheckResult | None:
        return next((c for c in self.checks if c.status == "fail"), None)

    def to_json(self) -> dict:
        return {
            "patch": self.source,
            "passed": self.passed,
            "patch_id": self.manifest.patch_id if self.manifest else None,
            "checks": [{"name": c.name, "status": c.status, "detail": c.detail} for c in self.checks],
        }


# ----------------------------------------------------------------------------- individual checks
def check_binding(manifest: Manifest, base: BaseGraph, source: str) -> None:
    """The patch names this exact base (sha256), its opset/IR, and tensors the base really has."""
    if manifest.base_sha256 != base.sha256:
        raise IncompatibleBaseError(
            f"{source}: bound to base sha256 {manifest.base_sha256[:16]}..., "
            f"found base {base.path.name} with sha256 {base.sha256[:16]}..."
        )
    if (manifest.base_opset, manifest.base_ir_version) != (base.opset, base.ir_version):
        raise IncompatibleBaseError(
            f"{source}: expected base opset {manifest.base_opset} IR {manifest.base_ir_version}, "
            f"found opset {base.opset} IR {base.ir_version}"
        )
    if manifest.logits_name != base.logits_name:
        # The logits the base card names (re-derived from the graph: the classifier tail's input, else
        # the first output). Any other (N, C) tensor would be corrected instead, the outputs left alone.
        raise IncompatibleBaseError(
            f"{source}: reads logits {manifest.logits_name!r}, expected the base's output {base.logits_name!r}"
        )
    shapes = base.tensor_shapes()
    wanted = [(manifest.logits_name, (manifest.n_classes,))] + [(g.name, g.shape) for g in manifest.gated]
    for name, shape in wanted:
        if shapes.get(name) != tuple(shape):
            raise IncompatibleBaseError(
                f"{source}: expected base tensor {name!r} of shape (N, {', '.join(map(str, shape))}), "
                f"found {('shape ' + str(shapes[name])) if name in shapes else 'no such tensor'}"
            )


def check_structure(patch: PatchFile, source: str) -> tuple[onnx.ModelProto, PatchParams]:
    """Parse the (digest-checked) graph and demand it equals the canonical graph of its parameters."""
    m = patch.manifest
    try:
        model = onnx.load_from_string(patch.graph_bytes)
    except Exception as exc:
        raise StructureError(f"{source}: patch graph expected ONNX, found undecodable bytes ({exc})") from None
    if m.mode == "suppress":
        return model, _check_suppress_structure(m, model, source)
    params = extract_params(model, len(m.records), m.gated_size, m.n_classes, m.form)
    if params.scale_log2 != m.gate_step_log2:
        raise StructureError(
            f"{source}: patch graph gates with step 2^{params.scale_log2}, its manifest says 2^{m.gate_step_log2}"
        )
    try:
        canonical = build_patch_graph(m.gated, m.logits_name, params, m.base_opset, m.base_ir_version, m.form)
    except ValueError as exc:
        raise StructureError(f"{source}: no canonical patch graph exists for this manifest: {exc}") from None
    if model != canonical:
        raise StructureError(f"{source}: patch graph is not the canonical gated-affine graph: {_first_difference(canonical, model)}")
    return model, params


def no_records(manifest: Manifest) -> PatchParams:
    """The (empty) record tables of a patch without records, e.g. a suppression."""
    c = manifest.n_classes
    return PatchParams(np.zeros((0, manifest.gated_size), np.int8), np.zeros(0), np.zeros((0, c, c)), np.zeros((0, c)),
                       manifest.gate_step_log2)


def _check_suppress_structure(m: Manifest, model: onnx.ModelProto, source: str) -> SuppressParams:
    """A suppression graph must be the canonical one of the classes and margins it carries."""
    sp = extract_suppress_params(model, m.n_classes)
    try:
        canonical = build_suppress_graph(m.logits_name, sp, m.n_classes, m.base_opset, m.base_ir_version)
    except ValueError as exc:
        raise StructureError(f"{source}: no canonical suppression graph exists for this graph: {exc}") from None
    if model != canonical:
        raise StructureError(f"{source}: patch graph is not the canonical suppression graph: {_first_difference(canonical, model)}")
    return sp


def check_suppression(manifest: Manifest, sp: SuppressParams, source: str, policy: DevicePolicy = DEFAULT_POLICY) -> None:
    """A suppression's certificate: its classes lie in [0, C), are distinct and leave a class to
    predict, its margin is positive, and the graph suppresses exactly those classes by that margin.
    Then ``out_K < max_{j not in S} out_j`` for every input by construction (patchgraph). An affine
    margin (the margin is then its floor m_min) must be the manifest's numbers exactly, finite, with
    |w| <= policy max_abs_T and |b| <= policy max_abs_t (the caps of a record's correction of the same
    logits), and C max|w| 2^64 + max|b| below 2^126, so m_K(x) is finite and >= m_min on every input."""
    c = manifest.n_classes
    classes = list(manifest.suppress["classes"])
    margin = manifest.suppress["margin"]
    where = f"{source}: suppression"
    if not all(0 <= k < c for k in classes):
        raise CertificateError(f"{where}: classes expected in [0, {c}), found {classes}")
    if classes != sorted(set(classes)) or len(classes) >= c:
        raise CertificateError(f"{where}: classes expected sorted, distinct and fewer than {c}, found {classes}")
    if not margin > 0:  # NaN fails too
        raise CertificateError(f"{where}: margin expected > 0, found {margin!r}")
    if sp.classes.tolist() != classes:
        raise CertificateError(f"{where}: graph suppresses classes {sp.classes.tolist()}, its manifest says {classes}")
    if not (sp.margin == np.float32(margin)).all():
        raise CertificateError(f"{where}: graph margins {sp.margin.tolist()}, its manifest says {margin!r}")
    aff = manifest.suppress.get("affine")
    if (aff is not None) != sp.affine:
        say = lambda a: "an affine margin" if a else "a constant margin"  # noqa: E731
        raise CertificateError(f"{where}: graph has {say(sp.affine)}, its manifest says {say(aff is not None)}")
    if aff is None:
        return
    w, b = sp.weights, sp.bias
    if not (np.isfinite(w).all() and np.isfinite(b).all()):
        raise CertificateError(f"{where}: affine margin weights and bias expected finite, found NaN or inf in the graph")
    w_m, b_m = np.array(aff["weights"], np.float32), np.array(aff["bias"], np.float32)
    if not (np.array_equal(w, w_m) and np.array_equal(b, b_m)):
        bad = int((w != w_m).sum() + (b != b_m).sum())
        raise CertificateError(f"{where}: graph affine margin differs from its manifest in {bad} numbers; expected equal")
    w_max, b_max = float(np.abs(w).max(initial=0.0)), float(np.abs(b).max(initial=0.0))
    if w_max > policy.max_abs_T or b_max > policy.max_abs_t:
        raise CertificateError(f"{where}: affine margin |w| <= {policy.max_abs_T:g} and |b| <= {policy.max_abs_t:g} "
                               f"expected (device policy), found {w_max:g} and {b_max:g}")
    if c * w_max * float(SUPPRESS_INPUT_CLIP) + b_max >= SUPPRESS_MARGIN_BOUND:
        raise CertificateError(f"{where}: affine margin could overflow float32 (C |w| 2^64 + |b| = "
                               f"{c * w_max * float(SUPPRESS_INPUT_CLIP) + b_max:g}); expected below 2^126")


def check_locality(manifest: Manifest, params: PatchParams, base: BaseGraph, policy: DevicePolicy, source: str) -> None:
    """Everything that decides where a gate opens is the base card's or within the device policy."""
    card = base.card
    m = manifest
    if m.gate_step_log2 != card.gate_step_log2:
        kind = "coarser" if m.gate_step_log2 > card.gate_step_log2 else "finer"
        raise LocalityError(
            f"{source}: gate step expected 2^{card.gate_step_log2} (base card), found 2^{m.gate_step_log2} ({kind})"
        )
    relus = card.relu_inputs
    if len(m.gated) > len(relus) or tuple(m.gated) != relus[len(relus) - len(m.gated):]:
        raise LocalityError(
            f"{source}: gates on {[g.name for g in m.gated]}, expected a suffix of the base's Relu inputs "
            f"{[g.name for g in relus]} (base card)"
        )
    if not len(m.records) <= policy.max_records_per_patch:
        raise LocalityError(f"{source}: {len(m.records)} records, the device policy allows at most {policy.max_records_per_patch} per patch")
    width = params.gate_width
    ok = width <= policy.max_gate_width  # written as what must hold: NaN fails
    if not ok.all():
        k = int(np.argmin(ok))
        raise LocalityError(
            f"{source}: record {k} gate width 1/gamma = {width[k]:.4g}, the device policy allows at most "
            f"{policy.max_gate_width:g}"
        )
    for name, arr, cap in (("T", params.T, policy.max_abs_T), ("t", params.t, policy.max_abs_t)):
        held = (np.abs(arr) <= cap).all(axis=tuple(range(1, arr.ndim)))  # per record; no records: empty
        if not held.all():
            k = int(np.argmin(held))
            raise LocalityError(
                f"{source}: record {k} has |{name}| up to {float(np.nanmax(np.abs(arr[k]))):.4g} or a non-finite "
                f"entry, the device policy allows at most {cap:g}"
            )


def _first_difference(expected: onnx.ModelProto, found: onnx.ModelProto) -> str:
    eg, fg = expected.graph, found.graph
    e_ops, f_ops = [n.op_type for n in eg.node], [n.op_type for n in fg.node]
    if e_ops != f_ops:
        at = next((i for i, (e, f) in enumerate(zip(e_ops, f_ops)) if e != f), min(len(e_ops), len(f_ops)))
        return (f"expected {len(e_ops)} nodes, found {len(f_ops)}; the first that differs is node {at}: expected "
                f"{e_ops[at] if at < len(e_ops) else 'none'}, found {f_ops[at] if at < len(f_ops) else 'none'}")
    for en, fn in zip(eg.node, fg.node):
        if en != fn:
            return f"node {en.name!r} expected inputs {list(en.input)}, found {list(fn.input)} or other attributes"
    e_init, f_init = [i.name for i in eg.initializer], [i.name for i in fg.initializer]
    if e_init != f_init:
        extra, missing = sorted(set(f_init) - set(e_init)), sorted(set(e_init) - set(f_init))
        return f"expected {len(e_init)} initializers, found {len(f_init)} (extra {extra[:3]}, missing {missing[:3]})"
    if [o.name for o in eg.output] != [o.name for o in fg.output] or list(eg.input) != list(fg.input):
        return "graph inputs or outputs differ"
    return "model metadata (opset, IR version, producer, doc strings or metadata) differs"


def check_certificate(manifest: Manifest, params: PatchParams, policy: DevicePolicy, source: str) -> None:
    """Every record's numbers carry its certificate, checked on the stored float32 tensors: T follows
    from alpha by PRUNE's closed form, ``P(I+T) = diag(alpha) P``, and the stored region bounds mapped
    through alpha and the *stored* ``P t`` lie inside [q_lower, q_upper] (no tolerance there: q_upper < 0
    is the margin itself). The shift exists only in the graph (format 4), so nothing can disagree with it.

    Records are checked in blocks with array operations (a 1000-point patch is checked in
    milliseconds); the error names the first failing record and its first failing check.
    """
    c = manifest.n_classes
    if manifest.mode == "suppress":
        raise CertificateError(f"{source}: a suppression is checked by check_suppression, not as records")
    block = max(1, _CERT_BLOCK_VALUES // (c * c))  # keeps the (block, C, C) arrays small
    for lo in range(0, len(manifest.records), block):
        _check_certificate_block(manifest, params, policy, lo, min(len(manifest.records), lo + block), source)


def patched_rows(mode: str, targets: np.ndarray, alpha: np.ndarray, lower: np.ndarray | None, upper: np.ndarray | None,
                 t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(P, C-1) lowest and highest patched specification rows on each record's region: the stored bounds
    mapped through alpha plus the shift ``P t`` of the *stored* float32 t (the numbers that act; collapse:
    the shift alone). The one computation behind the spec check, shared with the server's t rounding."""
    c = t.shape[1]
    pt = np.einsum("pij,pj->pi", completed_specs(targets, c), np.asarray(t, np.float32).astype(np.float64))
    shift = pt[:, : c - 1]
    if mode == "prune":
        return alpha * lower + shift, alpha * upper + shift
    return shift, shift


def _check_certificate_block(manifest: Manifest, params: PatchParams, policy: DevicePolicy, lo: int, hi: int, source: str) -> None:
    c = manifest.n_classes
    recs = manifest.records[lo:hi]
    targets = np.array([r.target for r in recs], dtype=np.int64)
    alpha = np.array([r.alpha for r in recs], dtype=np.float64).reshape(len(recs), c - 1)
    a_ext = np.column_stack([alpha, [r.mean_scale for r in recs]])
    gamma = params.gamma[lo:hi]
    T = params.T[lo:hi].astype(np.float64)

    # Each check is a (records,) mask of passes, in the order a record is read. Written as what must
    # hold (never as a violation test), so a NaN anywhere fails: NaN compares false.
    held: list[tuple[np.ndarray, str]] = []
    held.append((gamma == np.array([r.gamma for r in recs], dtype=np.float32), "gamma"))
    if manifest.mode == "collapse":
        held.append(((alpha == 0).all(axis=1) & (a_ext[:, -1] == 0), "collapse_alpha"))
    else:
        held.append(((alpha > 0).all(axis=1) & (alpha <= 1).all(axis=1) & (a_ext[:, -1] == 1), "prune_alpha"))
    T_exp, _ = affine_from_scales_many(targets, a_ext, np.zeros_like(a_ext), c)  # T does not depend on the shift
    held.append((np.abs(T - T_exp).max(axis=(1, 2)) <= _T_ATOL, "closed_form"))
    pbar = completed_specs(targets, c)
    lhs = pbar + pbar @ T  # Pbar(I + T)
    held.append(((np.abs(lhs - a_ext[:, :, None] * pbar).max(axis=(1, 2)) <= _T_ATOL), "algebra"))
    lower = upper = None
    if manifest.mode == "prune":
        lower = np.array([r.lower for r in recs], dtype=np.float64).reshape(len(recs), c - 1)
        upper = np.array([r.upper for r in recs], dtype=np.float64).reshape(len(recs), c - 1)
        held.append(((lower <= upper).all(axis=1), "bounds_order"))
    new_lo, new_hi = patched_rows(manifest.mode, targets, alpha, lower, upper, params.t[lo:hi])
    held.append(((new_hi <= manifest.q_upper).all(axis=1) & (new_lo >= manifest.q_lower).all(axis=1), "spec"))

    table = ~np.vstack([mask for mask, _ in held])  # (checks, records): True where a check fails
    if not table.any():
        return
    j = int(table.any(axis=0).argmax())  # first failing record ...
    check = held[int(table[:, j].argmax())][1]  # ... and its first failing check
    k, rec = lo + j, recs[j]
    where = f"{source}: record {k} (target {rec.target})"
    messages = {
        "gamma": f"expected gamma {rec.gamma:.6g} as in the manifest, found {float(params.gamma[k]):.6g}",
        "collapse_alpha": f"collapse expects alpha = 0 on every row, found {list(rec.alpha)}",
        "prune_alpha": f"prune expects 0 < alpha <= 1 and mean scale 1, found {list(rec.alpha)}",
        "closed_form": f"graph T differs from the closed form of its alpha by more than {_T_ATOL:g}",
        "algebra": f"P(I+T) = diag(alpha) P does not hold within {_T_ATOL:g}",
        "bounds_order": f"bounds expected lower <= upper, found {rec.lower} / {rec.upper}",
        "spec": f"patched rows expected inside [{manifest.q_lower:g}, {manifest.q_upper:g}], "
        f"found [{float(np.nanmin(new_lo[j])):.6g}, {float(np.nanmax(new_hi[j])):.6g}]",
    }
    raise CertificateError(f"{where}: {messages[check]}")


# ----------------------------------------------------------------------------- the ordered pipeline
def _run(
    path_or_patch: PathLike | PatchFile, base: BaseGraph, policy: DevicePolicy, report: PatchReport | None
) -> VerifiedPatch:
    source = Path(path_or_patch).name if not isinstance(path_or_patch, PatchFile) else "patch"
    results = report.checks if report is not None else []

    def ran(name: str, detail: str) -> None:
        results.append(CheckResult(name, "pass", detail))

    try:
        patch = path_or_patch if isinstance(path_or_patch, PatchFile) else read_patch_file(path_or_patch)
        m = patch.manifest
        if report is not None:
            report.manifest = m
        ran("format", f"format {m.format} v{m.format_version}, {len(m.records)} records, mode {m.mode}")
        ran("integrity", f"patch.onnx sha256 {m.graph_sha256[:16]}... matches ({m.graph_bytes} bytes)")
        check_binding(m, base, source)
        ran("binding", f"base sha256 {base.sha256[:16]}... matches; tensors {[g.name for g in m.gated]} present")
        model, params = check_structure(patch, source)
        suppress = params if isinstance(params, SuppressParams) else None
        if suppress is not None:
            params = no_records(m)
            ran("structure", f"canonical suppression graph of classes {suppress.classes.tolist()}")
        else:
            ran("structure", f"canonical gated-affine graph over {m.gated_size} gated values, {params.n_records} gates")
        check_locality(m, params, base, policy, source)
        ran("locality", f"Relu inputs {[g.name for g in m.gated]}, step 2^{m.gate_step_log2} (base card); "
                        f"gate width <= {float(params.gate_width.max(initial=0.0)):.3g} (policy {policy.max_gate_width:g})")
        if suppress is not None:
            check_suppression(m, suppress, source, policy)
            kind = "an affine margin >= " if suppress.affine else ""
            ran("certificate", f"classes {m.suppress['classes']} below the best other class by > {kind}{m.suppress['margin']:g} "
                               "on every input (by construction)")
        else:
            check_certificate(m, params, policy, source)
            ran("certificate", f"{len(m.records)} records: target wins with rows in [{m.q_lower:g}, {m.q_upper:g}] on each region")
    except PatchVerificationError as exc:
        if report is not None:
            # A container-level failure may come from the integrity step (digest) or the format step.
            name = exc.check if exc.check in CHECKS else "format"
            if name == "integrity" and not results:
                results.append(CheckResult("format", "pass", "container and manifest are well formed"))
            results.append(CheckResult(name, "fail", str(exc)))
            done = {r.name for r in results}
            results.extend(CheckResult(n, "skipped", "an earlier check failed") for n in CHECKS if n not in done)
        raise
    verified = VerifiedPatch(source=source, manifest=m, model=model, params=params, suppress=suppress)
    if report is not None:
        report.verified = verified
    return verified


def verify_patch(path_or_patch: PathLike | PatchFile, base: BaseGraph, policy: DevicePolicy = DEFAULT_POLICY) -> VerifiedPatch:
    """Run every per-file check; raise the first failure as a :class:`PatchVerificationError` subclass."""
    return _run(path_or_patch, base, policy, None)


def certify_patch(path: PathLike, base: BaseGraph, policy: DevicePolicy = DEFAULT_POLICY) -> PatchReport:
    """Run every per-file check and return the verdicts without raising (for ``prune-edge certify``)."""
    report = PatchReport(source=str(path))
    try:
        _run(path, base, policy, report)
    except PatchVerificationError:
        pass
    return report


def check_patch_set(patches: Sequence[VerifiedPatch], policy: DevicePolicy = DEFAULT_POLICY) -> None:
    """Checks over every patch a device runs together: each patch once, the policy's totals, and no
    two records with different targets on one region (:mod:`.interference`)."""
    seen: dict[str, str] = {}
    for vp in patches:
        pid = vp.manifest.patch_id
        if pid in seen:
            raise InterferenceError(f"{vp.source}: patch {pid} is also given as {seen[pid]}; expected each patch once")
        seen[pid] = vp.source
    if not len(patches) <= policy.max_patches:
        raise LocalityError(f"{len(patches)} patches, the device policy allows at most {policy.max_patches}")
    total = sum(len(vp.manifest.records) for vp in patches)
    if not total <= policy.max_records_total:
        raise LocalityError(f"{total} records over {len(patches)} patches, the device policy allows at most {policy.max_records_total}")
    check_suppressions(patches)
    check_interference([vp.record_set() for vp in patches if vp.params.n_records])


def check_suppressions(patches: Sequence[VerifiedPatch]) -> None:
    """A device applies every suppression after the gated correction (:mod:`.compose`), so a record
    whose target is a suppressed class would lose its certificate (its target could never win): such
    a set is refused, as is one that suppresses every class."""
    suppressors = [vp for vp in patches if vp.suppress is not None]
    if not suppressors:
        return
    by_class: dict[int, str] = {}
    for vp in suppressors:
        for k in vp.suppress.classes.tolist():
            by_class.setdefault(int(k), vp.source)
    c = suppressors[0].manifest.n_classes
    if len(by_class) >= c:
        raise InterferenceError(f"suppressions of {len(suppressors)} patches cover all {c} classes; expected a class left to predict")
    for vp in patches:
        for r, rec in enumerate(vp.manifest.records):
            if rec.target in by_class:
                raise InterferenceError(
                    f"record {r} of {vp.source} (target {rec.target}) targets class {rec.target}, which "
                    f"{by_class[rec.target]} suppresses: expected no record to target a suppressed class"
                )
