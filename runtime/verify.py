"""Checks a device runs on a patch file before it is trusted, in a fixed order.

``format -> integrity -> binding -> structure -> certificate``. Each check only runs if the ones
before it passed, and no ONNX byte is parsed before the graph's digest matched the manifest.
:func:`verify_patch` raises the first failure (for use); :func:`certify_patch` returns a report with
every check's verdict (for inspection and the ``certify`` command).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from .base import BaseGraph
from .errors import (
    CertificateError,
    IncompatibleBaseError,
    PatchVerificationError,
    StructureError,
)
from .fileio import PathLike
from .manifest import Manifest
from .patchfile import PatchFile, read_patch_file
from .patchgraph import PatchParams, affine_from_scales_many, build_patch_graph, completed_specs, extract_params

CHECKS = ("format", "integrity", "binding", "structure", "certificate")
# float32 storage of T and t: algebra holds to ~1e-7 relative; this leaves room for large logits.
_ALGEBRA_RTOL = 1e-5
_CERT_BLOCK_VALUES = 1 << 20  # records per certificate block: about this many values in each (block, C, C)


@dataclass(frozen=True)
class VerifiedPatch:
    """A patch that passed every check: safe to compose with the base it is bound to."""

    source: str
    manifest: Manifest
    model: onnx.ModelProto
    params: PatchParams


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
    params = extract_params(model, m.prefix, len(m.records), m.gated_size, m.n_classes, m.form)
    try:
        canonical = build_patch_graph(m.prefix, m.gated, m.logits_name, params, m.base_opset, m.base_ir_version, m.form)
    except ValueError as exc:
        raise StructureError(f"{source}: no canonical patch graph exists for this manifest: {exc}") from None
    if model != canonical:
        raise StructureError(f"{source}: patch graph is not the canonical gated-affine graph: {_first_difference(canonical, model)}")
    return model, params


def _first_difference(expected: onnx.ModelProto, found: onnx.ModelProto) -> str:
    eg, fg = expected.graph, found.graph
    e_ops, f_ops = [n.op_type for n in eg.node], [n.op_type for n in fg.node]
    if e_ops != f_ops:
        return f"expected {len(e_ops)} nodes {e_ops[-4:]} at the end, found {len(f_ops)} nodes {f_ops[-4:]}"
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


def check_certificate(manifest: Manifest, params: PatchParams, source: str) -> None:
    """Every record's numbers carry its certificate: T and t follow from (alpha, beta) by PRUNE's
    closed form, P(I+T) = diag(alpha) P and P t = beta hold for the stored tensors, and the stored
    region bounds mapped through alpha, beta lie inside [q_lower, q_upper].

    Records are checked in blocks with array operations (a 1000-point patch is checked in
    milliseconds, not a Python loop per record); the error names the first failing record and its
    first failing check, as a record-by-record reading would.
    """
    c = manifest.n_classes
    block = max(1, _CERT_BLOCK_VALUES // (c * c))  # keeps the (block, C, C) arrays small
    for lo in range(0, len(manifest.records), block):
        _check_certificate_block(manifest, params, lo, min(len(manifest.records), lo + block), source)


def _check_certificate_block(manifest: Manifest, params: PatchParams, lo: int, hi: int, source: str) -> None:
    c = manifest.n_classes
    recs = manifest.records[lo:hi]
    targets = np.array([r.target for r in recs], dtype=np.int64)
    alpha = np.array([r.alpha for r in recs], dtype=np.float64).reshape(len(recs), c - 1)
    beta = np.array([r.beta for r in recs], dtype=np.float64).reshape(len(recs), c - 1)
    a_ext = np.column_stack([alpha, [r.mean_scale for r in recs]])
    b_ext = np.column_stack([beta, [r.mean_shift for r in recs]])
    gamma = params.gamma[lo:hi].astype(np.float64)
    T = params.T[lo:hi].astype(np.float64)
    t = params.t[lo:hi].astype(np.float64)

    # Each check is a (records,) mask of passes, in the order a record is read. Written as what must
    # hold (never as a violation test), so a NaN anywhere fails: NaN compares false.
    held: list[tuple[np.ndarray, str]] = []
    held.append((np.isclose(gamma, [r.gamma for r in recs], rtol=1e-6, atol=0), "gamma"))
    if manifest.mode == "collapse":
        held.append(((alpha == 0).all(axis=1) & (a_ext[:, -1] == 0), "collapse_alpha"))
    else:
        held.append(((alpha > 0).all(axis=1) & (alpha <= 1).all(axis=1) & (a_ext[:, -1] == 1), "prune_alpha"))
    T_exp, t_exp = affine_from_scales_many(targets, a_ext, b_ext, c)
    scale = 1.0 + np.abs(t_exp).max(axis=1)
    held.append(
        ((np.abs(T - T_exp).max(axis=(1, 2)) <= _ALGEBRA_RTOL) & (np.abs(t - t_exp).max(axis=1) <= _ALGEBRA_RTOL * scale),
         "closed_form")
    )
    pbar = completed_specs(targets, c)
    lhs = pbar + pbar @ T  # P(I + T)
    algebra = (np.abs(lhs - a_ext[:, :, None] * pbar).max(axis=(1, 2)) <= _ALGEBRA_RTOL) & (
        np.abs(np.einsum("pij,pj->pi", pbar, t) - b_ext).max(axis=1) <= _ALGEBRA_RTOL * scale
    )
    held.append((algebra, "algebra"))
    if manifest.mode == "prune":
        lower = np.array([r.lower for r in recs], dtype=np.float64).reshape(len(recs), c - 1)
        upper = np.array([r.upper for r in recs], dtype=np.float64).reshape(len(recs), c - 1)
        held.append(((lower <= upper).all(axis=1), "bounds_order"))
        new_lo, new_hi = alpha * lower + beta, alpha * upper + beta
    else:
        new_lo = new_hi = beta
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
        "closed_form": "graph T, t differ from the closed form of its alpha, beta",
        "algebra": "P(I+T) = diag(alpha) P or P t = beta does not hold",
        "bounds_order": f"bounds expected lower <= upper, found {rec.lower} / {rec.upper}",
        "spec": f"patched rows expected inside [{manifest.q_lower:g}, {manifest.q_upper:g}], "
        f"found up to {float(new_hi[j].max()):.6g}",
    }
    raise CertificateError(f"{where}: {messages[check]}")


# ----------------------------------------------------------------------------- the ordered pipeline
def _run(path_or_patch: PathLike | PatchFile, base: BaseGraph, report: PatchReport | None) -> VerifiedPatch:
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
        ran("structure", f"canonical gated-affine graph over {m.gated_size} gated values, {params.n_records} gates")
        check_certificate(m, params, source)
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
    return VerifiedPatch(source=source, manifest=m, model=model, params=params)


def verify_patch(path_or_patch: PathLike | PatchFile, base: BaseGraph) -> VerifiedPatch:
    """Run every check; raise the first failure as a :class:`PatchVerificationError` subclass."""
    return _run(path_or_patch, base, None)


def certify_patch(path: PathLike, base: BaseGraph) -> PatchReport:
    """Run every check and return the verdicts without raising (for ``prune-edge certify``)."""
    report = PatchReport(source=str(path))
    try:
        _run(path, base, report)
    except PatchVerificationError:
        pass
    return report
