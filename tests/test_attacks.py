"""Patch files built the way an attacker who knows format 3 would build them: the canonical graph of
chosen parameters (``build_patch_graph``), an edited manifest with the graph digest updated and the
patch id re-derived, packed with ``pack``. Every container, digest and structure check passes on
them; each one is refused by the check that owns what it abuses, through ``prune-edge certify``
(exit 3, one line on stderr naming the check) and through ``PatchedModel``. The honest chain passes
the same checks, and ``verify-sample`` tells covered from uncovered points."""

from __future__ import annotations

import copy
import dataclasses
import json
import re

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import helper, numpy_helper

pytest.importorskip("torch")

from prune_edge.cli import main  # noqa: E402
from prune_edge.runtime import (  # noqa: E402
    CHECKS,
    BaseGraph,
    DevicePolicy,
    PatchedModel,
    PatchVerificationError,
    ProbeError,
    certify_patch,
    pack,
    read_patch_file,
    verify_patch,
)
from prune_edge.runtime.compose import compose  # noqa: E402
from prune_edge.runtime.fileio import sha256_bytes  # noqa: E402
from prune_edge.runtime.manifest import GatedTensor, Manifest, Record, derive_patch_id  # noqa: E402
from prune_edge.runtime.model import make_session  # noqa: E402
from prune_edge.runtime.patchgraph import (  # noqa: E402
    PREFIX,
    PatchParams,
    affine_from_scales_many,
    build_patch_graph,
    extract_params,
    form_of,
    quantize,
    selection_neurons,
    sign_pattern,
)
from prune_edge.runtime.verify import VerifiedPatch  # noqa: E402

EXIT_VERIFY = 3


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def base(mlp_bundle) -> BaseGraph:
    return BaseGraph.load(mlp_bundle.onnx_path)


@pytest.fixture(scope="module")
def honest(patches) -> dict[str, tuple[Manifest, PatchParams]]:
    """The honest 20-point patches' manifests and graph parameters: the attacker's raw material."""
    return {mode: unchecked_parts(path) for mode, (path, _) in patches.items()}


@pytest.fixture(scope="module")
def probe_file(mlp_bundle, tmp_path_factory):
    """The device's own inputs for ``certify --probe``: the test split."""
    path = tmp_path_factory.mktemp("probe") / "x_test.npy"
    np.save(path, mlp_bundle.dataset.x_test)
    return path


@pytest.fixture(scope="module")
def record0_point(base, patches, mlp_bundle, forget_ids) -> int:
    """The training id of the forgotten point on which the honest prune patch's record 0 acts."""
    model = PatchedModel(base.path, [patches["prune"][0]], base=base)
    cover = model.coverage(mlp_bundle.dataset.x_train[forget_ids])
    (rows,) = np.nonzero((cover.record == 0) & cover.covered)
    assert len(rows) == 1
    return int(forget_ids[rows[0]])


# ----------------------------------------------------------------------------- building attacks
def unchecked_parts(path) -> tuple[Manifest, PatchParams]:
    """A file's manifest and the parameters its graph carries, read without the device's checks
    (format and digest only)."""
    pf = read_patch_file(path)
    m = pf.manifest
    return m, extract_params(onnx.load_from_string(pf.graph_bytes), len(m.records), m.gated_size, m.n_classes, m.form)


def forge(path, like: Manifest, params: PatchParams, records=None, gated=None, **changes):
    """Write the file an attacker would: the canonical graph of ``params`` (gating on ``gated``, its
    form the cheapest exact one), ``like``'s manifest with ``records``/``changes``, the gate step
    taken from the graph, digest and size of the new graph, and the patch id re-derived."""
    gated = tuple(gated or like.gated)
    form = form_of(params)
    graph = build_patch_graph(gated, like.logits_name, params, like.base_opset, like.base_ir_version, form)
    data = graph.SerializeToString()
    m = dataclasses.replace(
        like, records=tuple(records or like.records), gated=gated, form=form, gate_step_log2=params.scale_log2,
        graph_sha256=sha256_bytes(data), graph_bytes=len(data), **changes,
    )
    m = dataclasses.replace(m, patch_id=derive_patch_id(m.to_json()))
    path.write_bytes(pack(m, data))
    assert read_patch_file(path).manifest == m  # a well-formed file: format and integrity pass
    return path


def collapse_records(targets, gammas, n_classes: int, q_upper: float) -> tuple[list[Record], np.ndarray, np.ndarray]:
    """Valid collapse records (every patched row at q_upper - 0.01) and their tables T = -I, t."""
    targets = [int(k) for k in targets]
    gammas = np.asarray(gammas, np.float32)
    beta = np.full((len(targets), n_classes - 1), q_upper - 0.01)
    T, t = affine_from_scales_many(targets, np.zeros((len(targets), n_classes)), np.column_stack([beta, np.zeros(len(targets))]), n_classes)
    zeros = (0.0,) * (n_classes - 1)
    records = [
        Record(target=k, gamma=float(g), alpha=zeros, mean_scale=0.0, lower=None, upper=None, points=1)
        for k, g in zip(targets, gammas)
    ]
    return records, T, t


def collapse_patch(path, like: Manifest, signs, targets, gammas, gated=None, scale_log2: int | None = None):
    """A collapse patch of one record per sign row (``like``: a collapse manifest to edit)."""
    records, T, t = collapse_records(targets, gammas, like.n_classes, like.q_upper)
    step = like.gate_step_log2 if scale_log2 is None else scale_log2
    params = PatchParams(signs=signs, gamma=[r.gamma for r in records], T=T, t=t, scale_log2=step)
    return forge(path, like, params, records, gated=gated)


def unchecked(path) -> VerifiedPatch:
    """A patch as a runtime without checks would take it."""
    m, params = unchecked_parts(path)
    return VerifiedPatch(path.name, m, onnx.load_from_string(read_patch_file(path).graph_bytes), params)


def composed(base: BaseGraph, vps, x: np.ndarray, expose_gates: bool = False) -> list[np.ndarray]:
    """Outputs of the base composed with ``vps``, no set check: logits (and acting gate, record)."""
    model = compose(base.model, vps, expose_gates=expose_gates).model
    return make_session(model.SerializeToString()).run(None, {base.input_name: x})


# ----------------------------------------------------------------------------- running the device
def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def certify(base: BaseGraph, paths, *options):
    return cli("certify", "--base", base.path, *[a for p in paths for a in ("--patch", p)], *options)


def one_error_line(result) -> str:
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one error line on stderr, found {lines}"
    return lines[0]


def assert_refused(base: BaseGraph, paths, check: str, match: str, *options, policy: DevicePolicy | None = None):
    """``certify`` exits 3 with one stderr line naming ``check``; PatchedModel raises that check.
    A per-file refusal also shows every earlier check passing in the (last) file's report."""
    result = certify(base, paths, *options)
    assert result.exit_code == EXIT_VERIFY, (result.exit_code, result.stdout, result.stderr)
    line = one_error_line(result)
    assert f"refused ({check}): " in line and re.search(match, line), line
    model = None
    with pytest.raises(PatchVerificationError, match=match) as info:
        model = PatchedModel(base.path, list(paths), base=base, policy=policy or DevicePolicy())
    assert model is None and info.value.check == check
    if not line.startswith("error: patch set refused"):
        report = certify_patch(paths[-1], base, policy or DevicePolicy())
        i = CHECKS.index(check)
        assert [(c.name, c.status) for c in report.checks[: i + 1]] == [(n, "pass") for n in CHECKS[:i]] + [(check, "fail")]
    return line


def assert_certified(base: BaseGraph, paths, *options) -> dict:
    result = certify(base, paths, "--json", *options)
    assert result.exit_code == 0, (result.stdout, result.stderr)
    doc = json.loads(result.stdout)
    assert doc["passed"] is True and result.stderr == ""
    return doc


# ----------------------------------------------------------------------------- a) gate step
@pytest.mark.parametrize("shift,kind", [(1, "coarser"), (-10, "finer")])
def test_gate_step_not_the_base_cards_refused(base, honest, tmp_path, shift, kind):
    """Graph delta and manifest gate.step_log2 changed consistently (structure passes): the step is
    the base card's, not the author's."""
    m, p = honest["collapse"]
    card_step = base.card.gate_step_log2
    path = forge(tmp_path / "step.pepatch", m, dataclasses.replace(p, scale_log2=card_step + shift))
    assert read_patch_file(path).manifest.gate_step_log2 == card_step + shift
    match = rf"gate step expected 2\^{card_step} \(base card\), found 2\^{card_step + shift} \({kind}\)"
    assert_refused(base, [path], "locality", match)


# ----------------------------------------------------------------------------- b) gated tensors
def test_gate_on_post_relu_tensor_refused(base, honest, tmp_path):
    """Gating on ``relu`` (the ReLU's output, never negative): the tensor exists (binding passes), and
    a record with all-positive signs would be open on every input; it is not a Relu input."""
    m, _ = honest["collapse"]
    relu = GatedTensor("relu", (256,))
    assert base.tensor_shapes()["relu"] == relu.shape
    path = collapse_patch(tmp_path / "relu.pepatch", m, np.ones((1, 256)), [m.records[0].target], [2.0], gated=[relu])
    assert_refused(base, [path], "locality", r"gates on \['relu'\], expected a suffix of the base's Relu inputs \['preact_0', 'preact_1'\]")


def test_gate_on_first_relu_input_alone_refused(base, honest, tmp_path):
    """Gating on ``preact_0`` alone: a Relu input, but not a suffix of them (the suffix ends with the
    last hidden layer), so the interference check's suffix argument would not hold."""
    m, p = honest["collapse"]
    first = m.gated[0]
    assert first.name == "preact_0"
    path = collapse_patch(tmp_path / "preact0.pepatch", m, p.signs[:, : first.size], [r.target for r in m.records],
                          p.gamma, gated=[first])
    assert_refused(base, [path], "locality", r"gates on \['preact_0'\], expected a suffix")


# ----------------------------------------------------------------------------- c) gate width
def test_wide_gate_refused_by_policy_then_by_probe(base, honest, tmp_path, probe_file, mlp_bundle):
    m, p = honest["collapse"]
    path = forge(tmp_path / "wide.pepatch", m, dataclasses.replace(p, gamma=np.full(len(m.records), 1e-4, np.float32)),
                 [dataclasses.replace(r, gamma=float(np.float32(1e-4))) for r in m.records])
    assert_refused(base, [path], "locality", r"record 0 gate width 1/gamma = 1e\+04, the device policy allows at most 1")
    # a device that allows wide gates accepts it by its per-file and set checks ...
    assert_certified(base, [path], "--max-gate-width", "1e5")
    # ... and its own inputs show what such a gate does: open on every input whose signs on the selection
    # values are some record's (a third of the test images here)
    wide = DevicePolicy(max_gate_width=1e5)
    result = certify(base, [path], "--max-gate-width", "1e5", "--probe", probe_file)
    assert result.exit_code == EXIT_VERIFY, (result.stdout, result.stderr)
    line = one_error_line(result)
    n = len(mlp_bundle.dataset.x_test)
    assert re.search(rf"patch set refused \(probe\): gates open on \d+ of {n} probe inputs", line), line
    model = PatchedModel(base.path, [path], base=base, policy=wide)
    covered = model.coverage(mlp_bundle.dataset.x_test).covered
    # exactly the inputs whose signs on the selection values are some record's (format 8: nowhere else)
    z = gated_values(base, mlp_bundle.dataset.x_test)[:, -m.gated_size:]
    a = selection_neurons(p.signs)
    matched = ((z[:, None, a] >= 0) == (p.signs[None, :, a] > 0)).all(axis=2).any(axis=1)
    np.testing.assert_array_equal(covered, matched)
    assert covered.mean() > 0.2
    with pytest.raises(ProbeError, match=r"the device allows at most 1\.0%") as info:
        model.probe(mlp_bundle.dataset.x_test, 0.01)
    assert info.value.check == "probe"


# ----------------------------------------------------------------------------- d) record counts
def test_too_many_records_in_one_patch_refused(base, honest, tmp_path):
    """5,000 records (the honest patterns tiled, 10% of the signs flipped at random so every pattern
    differs): past max_records_per_patch (4096)."""
    m, p = honest["collapse"]
    reps = -(-5000 // len(m.records))
    rng = np.random.default_rng(0)
    signs = np.tile(p.signs, (reps, 1))[:5000] * rng.choice(np.array([-1, 1], np.int8), size=(5000, p.signs.shape[1]), p=[0.1, 0.9])
    assert len(np.unique(signs, axis=0)) == 5000
    targets = np.tile([r.target for r in m.records], reps)[:5000]
    path = collapse_patch(tmp_path / "many.pepatch", m, signs, targets, np.tile(p.gamma, reps)[:5000])
    assert_refused(base, [path], "locality", r"5000 records, the device policy allows at most 4096 per patch")


def test_records_past_the_policy_total_refused(base, chain, tmp_path):
    """Two honest patches, 40 records together, against a policy file allowing 39 in total."""
    policy = DevicePolicy(max_records_total=39)
    policy_file = tmp_path / "policy.json"
    policy_file.write_text(json.dumps({"max_records_total": 39}))
    paths = [chain["first"], chain["second"]]
    assert_certified(base, paths)
    assert_refused(base, paths, "locality", r"40 records over 2 patches, the device policy allows at most 39",
                   "--policy", policy_file, policy=policy)


# ----------------------------------------------------------------------------- e) inside one patch
def test_records_sharing_a_region_inside_one_patch_refused(base, honest, mlp_bundle, record0_point, tmp_path):
    """Two records with the same pattern and different targets: each is certified alone (every
    per-file check passes), but only one acts on the shared region, so the other's certificate is
    false there; the set check (run on a single patch too) refuses it."""
    m, p = honest["prune"]
    target = m.records[0].target
    other = (target + 1) % m.n_classes
    path = collapse_patch(tmp_path / "twins.pepatch", honest["collapse"][0], p.signs[[0, 0]], [target, other], p.gamma[[0, 0]])
    assert certify_patch(path, base).passed
    assert_refused(base, [path], "interference", r"record 1 of twins\.pepatch \(target \d\) gates the region of record 0 of "
                                                 r"twins\.pepatch \(target \d\): expected regions .* disjoint")
    # the break is real: on the shared region record 0 acts (first on ties), record 1's target loses
    x = mlp_bundle.dataset.x_train[[record0_point]]
    assert composed(base, [unchecked(path)], x)[0].argmax(1).tolist() == [target]


# ----------------------------------------------------------------------------- f) undoing a patch
@pytest.mark.parametrize("suffix", [False, True], ids=["same-tensors", "last-layer-only"])
def test_patch_that_undoes_another_refused(base, honest, patches, mlp_bundle, record0_point, tmp_path, suffix):
    """A 1-record collapse patch on record 0's pattern (all Relu inputs, or the last layer's part of
    it only) whose target is the forgotten point's true label: certified alone, refused together
    with the patch it undoes."""
    m, p = honest["prune"]
    ds = mlp_bundle.dataset
    true_label = int(ds.y_train[record0_point])
    assert true_label != m.records[0].target
    gated = m.gated[1:] if suffix else m.gated
    signs = p.signs[:1, p.signs.shape[1] - sum(g.size for g in gated):]
    undo = collapse_patch(tmp_path / "undo.pepatch", honest["collapse"][0], signs, [true_label], p.gamma[:1], gated=gated)
    assert_certified(base, [undo])
    first = patches["prune"][0]
    assert_refused(base, [first, undo], "interference",
                   rf"record 0 of undo\.pepatch \(target {true_label}\) gates the region of record 0 of {first.name}")
    # Without the set check the attack is real when the undo patch comes first: both gates are equally
    # open on the point (same pattern, same gamma) and TopK takes the first on ties, so the undo
    # record acts and the true label comes back. Given after the patch it undoes, it loses the tie.
    x = ds.x_train[[record0_point]]
    vp_first, vp_undo = verify_patch(first, base), verify_patch(undo, base)
    assert composed(base, [vp_first], x)[0].argmax(1).tolist() == [m.records[0].target]
    assert composed(base, [vp_undo, vp_first], x)[0].argmax(1).tolist() == [true_label]
    assert composed(base, [vp_first, vp_undo], x)[0].argmax(1).tolist() == [m.records[0].target]


def gated_values(base: BaseGraph, x: np.ndarray) -> np.ndarray:
    """(N, M) the base's Relu inputs on ``x``, flattened and concatenated as a full-suffix gate reads them."""
    names = [g.name for g in base.card.relu_inputs]
    tapped = copy.deepcopy(base.model)
    tapped.graph.output.extend(helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in names)
    outs = make_session(tapped.SerializeToString()).run(names, {base.input_name: x})
    return np.concatenate([o.reshape(len(x), -1) for o in outs], axis=1)


def test_patch_that_undoes_another_on_its_nearly_dead_units(base, honest, patches, mlp_bundle, record0_point, tmp_path):
    """The undo patch of the test above, its pattern changed only on the units whose pre-activation at
    the point is closest to 0 (the default MLP has a dead unit at about -3.6e-11 on every input): the
    set passes as disjoint, but the gate reads those units exactly as the ReLU does, so the undo
    record is never fully open where the honest one is, and the forgotten point keeps a label other
    than its own, whichever order the device runs the patches in (or the set is refused)."""
    m, p = honest["prune"]
    ds = mlp_bundle.dataset
    x = ds.x_train[[record0_point]]
    true_label = int(ds.y_train[record0_point])
    z = gated_values(base, x)
    np.testing.assert_array_equal(np.sign(quantize(z, m.gate_step_log2)), sign_pattern(z))  # no slack to exploit
    slack = np.argsort(np.abs(z[0]))[:2]
    assert np.abs(z[0, slack[0]]) < 1e-6
    signs = p.signs[:1].copy()
    signs[0, slack] = -signs[0, slack]
    undo = collapse_patch(tmp_path / "undo.pepatch", honest["collapse"][0], signs, [true_label], p.gamma[:1])
    first = patches["prune"][0]
    for order in ([first, undo], [undo, first]):
        result = certify(base, order)
        if result.exit_code == 0:
            labels = PatchedModel(base.path, order, base=base).predict(x).tolist()
            assert labels != [true_label], f"set certified and the forgotten point is back on {true_label} (slack neurons {slack.tolist()})"
        else:
            assert result.exit_code == EXIT_VERIFY and "refused (interference)" in one_error_line(result)


# ----------------------------------------------------------------------------- g) unbounded numbers
def _huge_t(p):
    t = p.t.copy()
    t[0, 0] = 1e30
    return {"t": t}


def _inf_t(p):
    t = p.t.copy()
    t[0, 0] = np.inf
    return {"t": t}


def _nan_t(p):
    t = p.t.copy()
    t[1, 0] = np.nan
    return {"t": t}


def _huge_T(p):
    T = p.T.copy()
    T[0] = np.float32(3e38)  # T f overflows float32 for any logits beyond 1.1 in magnitude
    return {"T": T}


UNBOUNDED = {
    "t-1e30": ("collapse", _huge_t, r"record 0 has \|t\| up to 1e\+30 or a non-finite entry, the device policy allows at most 10000", False),
    "t-inf": ("collapse", _inf_t, r"record 0 has \|t\| up to inf or a non-finite entry", True),
    "t-nan": ("collapse", _nan_t, r"record 1 has \|t\| up to .* or a non-finite entry", True),
    "T-huge": ("prune", _huge_T, r"record 0 has \|T\| up to 3e\+38 or a non-finite entry, the device policy allows at most 16", True),
}


@pytest.mark.parametrize("case", list(UNBOUNDED))
def test_unbounded_parameters_refused(base, honest, mlp_bundle, forget_ids, tmp_path, case):
    mode, change, match, non_finite = UNBOUNDED[case]
    m, p = honest[mode]
    path = forge(tmp_path / f"{case}.pepatch", m, dataclasses.replace(p, **change(p)))
    assert_refused(base, [path], "locality", match)
    if non_finite:  # what the caps prevent: composed unchecked, logits stop being numbers
        out = composed(base, [unchecked(path)], mlp_bundle.dataset.x_train[forget_ids])[0]
        assert not np.isfinite(out).all()


# ----------------------------------------------------------------------------- h) the honest chain
def test_selection_that_does_not_separate_the_records_refused(base, patches, mlp_bundle, forget_ids, monkeypatch, tmp_path):
    """Format 6 selects the acting record by the signs of a few gated values, and its certificate needs
    those values to tell every two records' patterns apart (then on a record's region that record is
    selected, gate 1). An attacker's graph selecting on one value only, the honest patch's own records,
    re-hashed with a re-derived id: run as it stands, it selects the wrong record on forget points (their
    gate below 1, the certified change gone), and the structure check refuses it, in both modes (the
    device recomputes the selection values from the signs it verified)."""
    from prune_edge.runtime import patchgraph

    x = mlp_bundle.dataset.x_train[forget_ids]
    z = gated_values(base, x)
    for mode in ("prune", "collapse"):
        m, params = unchecked_parts(patches[mode][0])
        assert len(patchgraph.selection_neurons(params.signs)) > 1
        with monkeypatch.context() as mp:
            mp.setattr(patchgraph, "selection_neurons", lambda signs: np.array([0], np.int64))
            graph = build_patch_graph(m.gated, m.logits_name, params, m.base_opset, m.base_ir_version, m.form)
        # the attacker's graph, run as it stands on the forget points' own gated values
        tapped = copy.deepcopy(graph)
        tapped.graph.output.append(helper.make_tensor_value_info(PREFIX + "gate_max", onnx.TensorProto.FLOAT, None))
        feeds = {m.logits_name: np.zeros((len(x), m.n_classes), np.float32)}
        at = z.shape[1] - m.gated_size
        for g in m.gated:
            feeds[g.name] = z[:, at : at + g.size].reshape(len(x), *g.shape)
            at += g.size
        gate = make_session(tapped.SerializeToString()).run([PREFIX + "gate_max"], feeds)[0]
        assert (gate < 1).sum() >= len(x) // 2, "one value cannot select the right record for most points"
        honest_gate = composed(base, [unchecked(patches[mode][0])], x, expose_gates=True)[-2]
        assert (honest_gate == 1).all()
        evil = forge_graph(tmp_path / f"select-one-{mode}.pepatch", m, graph)
        assert_refused(base, [evil], "structure", "not the canonical gated-affine graph")


def test_match_condition_inverted_refused(base, patches, mlp_bundle, forget_ids, tmp_path):
    """Format 8 keeps the best-scoring record's gate only where its signs on the selection values are the
    input's, and 0 elsewhere. An attacker's graph that fills the other inputs with gate 1 instead (the
    canonical graph with the Where's 0 replaced by 1), the honest patch's own records, re-hashed with a
    re-derived id: run as it stands it rewrites the logits of retained training points the honest graph
    leaves bit for bit, and the structure check refuses it, in both modes."""
    x = mlp_bundle.dataset.x_train
    z = gated_values(base, x)
    keep = np.setdiff1d(np.arange(len(x)), forget_ids)
    for mode in ("prune", "collapse"):
        m, params = unchecked_parts(patches[mode][0])
        honest = build_patch_graph(m.gated, m.logits_name, params, m.base_opset, m.base_ir_version, m.form)
        evil = copy.deepcopy(honest)
        at = next(i for i, n in enumerate(evil.graph.node) if n.op_type == "Where")
        where = evil.graph.node[at]
        assert where.input[2] == PREFIX + "zero"
        where.input[2] = PREFIX + "one"
        feeds = {m.logits_name: np.zeros((len(x), m.n_classes), np.float32)}
        start = z.shape[1] - m.gated_size
        for g in m.gated:
            feeds[g.name] = z[:, start : start + g.size].reshape(len(x), *g.shape)
            start += g.size
        out_h, out_e = (make_session(g.SerializeToString()).run(None, feeds)[0] for g in (honest, evil))
        assert (out_h[keep] == 0).all(), "the honest graph leaves every retained point's logits as they are"
        changed = (out_h[keep] != out_e[keep]).any(axis=1)
        assert changed.mean() > 0.5, "gate 1 wherever no record has the input's signs on A (two thirds of them here)"
        path = forge_graph(tmp_path / f"inverted-match-{mode}.pepatch", m, evil)
        assert_refused(base, [path], "structure", "not the canonical gated-affine graph")


def test_lookup_form_in_a_file_refused(base, patches, mlp_bundle, tmp_path):
    """The device's own lookup form (a trie of the records' signs) is not what a file may carry: a device
    builds the trie from the signs it verified. The honest patch's graph rebuilt in that form, and the same
    with a trie that sends every sign string without a record to record 0 (so record 0's gate would act
    wherever it opens), re-hashed with a re-derived id: both are refused by the structure check."""
    x = mlp_bundle.dataset.x_test
    z = gated_values(base, x)
    m, params = unchecked_parts(patches["collapse"][0])
    honest = build_patch_graph(m.gated, m.logits_name, params, m.base_opset, m.base_ir_version, m.form)
    lookup = build_patch_graph(m.gated, m.logits_name, params, m.base_opset, m.base_ir_version, m.form, lookup=True)
    evil = copy.deepcopy(lookup)
    levels = [i.name for i in evil.graph.initializer if i.name.startswith(PREFIX + "g0_trie") and i.name[-1].isdigit()]
    last = max(levels, key=lambda name: int(name[len(PREFIX + "g0_trie"):]))
    tensor = next(i for i in evil.graph.initializer if i.name == last)
    table = numpy_helper.to_array(tensor).copy()
    table[table == 0] = 1  # no record -> record 0 (+1)
    tensor.CopyFrom(numpy_helper.from_array(table, last))
    feeds = {m.logits_name: np.zeros((len(x), m.n_classes), np.float32)}
    start = z.shape[1] - m.gated_size
    for g in m.gated:
        feeds[g.name] = z[:, start : start + g.size].reshape(len(x), *g.shape)
        start += g.size
    out_h = make_session(honest.SerializeToString()).run(None, feeds)[0]
    hit = PREFIX + "g0_hit"  # record + 1 looked up per input, 0: none
    tapped = [copy.deepcopy(g) for g in (lookup, evil)]
    for g in tapped:
        g.graph.output.append(helper.make_tensor_value_info(hit, onnx.TensorProto.INT32, None))
    (out_l, hit_l), (_, hit_e) = (make_session(g.SerializeToString()).run(None, feeds) for g in tapped)
    assert out_l.tobytes() == out_h.tobytes()
    assert (hit_l == 0).mean() > 0.5 and (hit_e > 0).all()  # the forged trie sends every input to a record
    for name, graph in (("lookup", lookup), ("forged-trie", evil)):
        path = forge_graph(tmp_path / f"{name}.pepatch", m, graph)
        assert_refused(base, [path], "structure", "patch graph: expected initializer 'pe_g0_signs_packed', found none")


def test_honest_chain_passes_with_probe(base, chain, probe_file, mlp_bundle):
    doc = assert_certified(base, [chain["first"], chain["second"]], "--probe", probe_file)
    assert [(s["name"], s["status"]) for s in doc["set"]] == [("interference", "pass"), ("probe", "pass")]
    assert all(c["status"] == "pass" for patch in doc["patches"] for c in patch["checks"])
    model = PatchedModel(base.path, [chain["first"], chain["second"]], base=base)
    assert model.probe(mlp_bundle.dataset.x_test, 0.01) <= 0.01


# ----------------------------------------------------------------------------- i) verify-sample
def _verify_sample(base, chain, mlp_bundle, tmp_path, index: int):
    sample = tmp_path / f"sample{index}.npy"
    np.save(sample, mlp_bundle.dataset.x_train[index])
    return cli("verify-sample", "--base", base.path, "--patch", chain["first"], "--patch", chain["second"],
               "--sample", sample, "--label", int(mlp_bundle.dataset.y_train[index]))


def test_verify_sample_outside_every_request_is_not_covered(base, chain, mlp_bundle, forget_ids, second_ids, tmp_path):
    requested = set(map(int, forget_ids)) | set(map(int, second_ids))
    index = next(i for i in range(len(mlp_bundle.dataset.x_train)) if i not in requested)
    result = _verify_sample(base, chain, mlp_bundle, tmp_path, index)
    assert result.exit_code == 1, (result.stdout, result.stderr)
    assert "not covered" in result.stdout and "no patch: every gate is closed" in result.stdout


def test_verify_sample_on_a_forgotten_point_names_its_record(base, chain, mlp_bundle, record0_point, tmp_path):
    result = _verify_sample(base, chain, mlp_bundle, tmp_path, record0_point)
    first = read_patch_file(chain["first"]).manifest
    assert f"patch {first.patch_id} record 0 (gate " in result.stdout, result.stdout
    assert f"target {first.records[0].target})" in result.stdout


def test_verify_sample_on_a_forgotten_point_is_forgotten(base, chain, mlp_bundle, record0_point, tmp_path):
    result = _verify_sample(base, chain, mlp_bundle, tmp_path, record0_point)
    assert "gate 1.000" in result.stdout and re.search(r"status\s+forgotten", result.stdout), result.stdout
    assert result.exit_code == 0


# ----------------------------------------------------------------------------- class suppression
@pytest.fixture(scope="module")
def suppression(mlp_bundle, tmp_path_factory):
    """An honest class-3 suppression patch and its manifest: the attacker's raw material."""
    from prune_edge.suppress import build_class_suppression

    path = tmp_path_factory.mktemp("suppress") / "class3.pepatch"
    build_class_suppression(mlp_bundle, [3], path, ledger=path.parent / "ledger", evaluate=False)
    return path, read_patch_file(path).manifest


def forge_graph(path, like: Manifest, graph: onnx.ModelProto, **changes):
    """The file an attacker would write: ``graph`` (any graph) as the patch graph, ``like``'s manifest
    with ``changes``, digest, size and patch id updated (format and integrity pass)."""
    data = graph.SerializeToString()
    m = dataclasses.replace(like, graph_sha256=sha256_bytes(data), graph_bytes=len(data), **changes)
    m = dataclasses.replace(m, patch_id=derive_patch_id(m.to_json()))
    path.write_bytes(pack(m, data))
    assert read_patch_file(path).manifest == m
    return path


def suppression_graph(like: Manifest, classes, margin) -> onnx.ModelProto:
    from prune_edge.runtime.patchgraph import SuppressParams, build_suppress_graph

    params = SuppressParams(np.array(classes), np.full(len(classes), margin, np.float32))
    return build_suppress_graph(like.logits_name, params, like.n_classes, like.base_opset, like.base_ir_version)


def test_honest_suppression_passes(base, suppression):
    assert_certified(base, [suppression[0]])


def test_suppression_graph_that_touches_another_logit_refused(base, suppression, mlp_bundle, tmp_path):
    """The canonical graph with its Where replaced by the capped tensor itself (every logit capped,
    class 5's too): the structure check refuses it; without checks it would change other logits."""
    path, m = suppression
    graph = suppression_graph(m, [3], 1.0)
    where = next(n for n in graph.graph.node if n.op_type == "Where")
    edited = copy.deepcopy(graph)
    node = next(n for n in edited.graph.node if n.name == where.name)
    node.op_type, node.input[:] = "Identity", [where.input[1]]
    evil = forge_graph(tmp_path / "all-capped.pepatch", m, edited)
    # run on its own (as a runtime without checks would), it lowers logits other than 3
    f = PatchedModel(base.path, base=base).logits(mlp_bundle.dataset.x_test)
    out = make_session(edited.SerializeToString()).run(None, {m.logits_name: f})[0]
    assert (out[:, [0, 1, 2, 4, 5, 6, 7, 8, 9]] != f[:, [0, 1, 2, 4, 5, 6, 7, 8, 9]]).any()
    assert_refused(base, [evil], "structure", "not the canonical suppression graph")
    # the same graph also capping class 5 (a valid suppression of [3, 5]) under a manifest naming [3]
    wider = forge_graph(tmp_path / "wider.pepatch", m, suppression_graph(m, [3, 5], 1.0))
    assert_refused(base, [wider], "certificate", r"graph suppresses classes \[3, 5\], its manifest says \[3\]")


@pytest.mark.parametrize("classes, margin, match", [
    ([3], -1.0, "margin expected > 0"),
    ([3], 0.0, "margin expected > 0"),
])
def test_suppression_without_a_positive_margin_refused(base, suppression, tmp_path, classes, margin, match):
    """Graph and manifest agree on the margin (structure passes); a margin <= 0 would let class 3 tie or
    win: the certificate check refuses it."""
    _, m = suppression
    evil = forge_graph(tmp_path / "margin.pepatch", m, suppression_graph(m, classes, margin),
                             suppress={"classes": classes, "margin": margin})
    assert_refused(base, [evil], "certificate", match)


@pytest.mark.parametrize("manifest_classes, graph_classes, match", [
    ([12], [3], r"classes expected in \[0, 10\)"),
    ([5], [3], r"graph suppresses classes \[3\], its manifest says \[5\]"),
    ([3, 3], [3], "sorted, distinct"),
    (list(range(10)), list(range(9)), "fewer than 10"),
])
def test_suppression_of_the_wrong_class_refused(base, suppression, tmp_path, manifest_classes, graph_classes, match):
    _, m = suppression
    evil = forge_graph(tmp_path / "k.pepatch", m, suppression_graph(m, graph_classes, 1.0),
                             suppress={"classes": manifest_classes, "margin": 1.0})
    assert_refused(base, [evil], "certificate", match)


def test_suppression_of_a_class_a_record_targets_refused(base, suppression, patches, mlp_bundle, tmp_path):
    """A chain whose point records target class K, then a suppression of K: the record's certificate
    (its target wins) cannot hold after the suppression, so the set is refused (interference)."""
    from prune_edge.suppress import build_class_suppression

    point = patches["prune"][0]
    k = read_patch_file(point).manifest.records[0].target
    evil = tmp_path / "sup.pepatch"
    build_class_suppression(mlp_bundle, [k], evil, ledger=tmp_path / "ledger", evaluate=False)
    assert_certified(base, [evil])
    assert_refused(base, [point, evil], "interference", "to target a suppressed class")


def test_suppression_with_records_or_gates_refused_by_format(suppression, honest):
    _, m = suppression
    doc = m.to_json()
    doc["records"] = honest["collapse"][0].to_json()["records"][:1]
    with pytest.raises(PatchVerificationError, match=r"records: expected no records in mode 'suppress'"):
        Manifest.from_json(doc)
    doc = m.to_json()
    doc["form"] = "collapse"
    with pytest.raises(PatchVerificationError, match="'suppress' exactly in mode 'suppress'"):
        Manifest.from_json(doc)
    doc = honest["collapse"][0].to_json()
    doc["suppress"] = {"classes": [3], "margin": 1.0}
    with pytest.raises(PatchVerificationError, match="absent outside mode 'suppress'"):
        Manifest.from_json(doc)


# ----------------------------------------------------------------------------- affine suppression margin
@pytest.fixture(scope="module")
def affine_suppression(mlp_bundle, tmp_path_factory):
    """An honest class-3 suppression whose margin follows the input (weights fitted by hand on a
    synthetic target, so no model is trained): the attacker's raw material."""
    from prune_edge.suppress import build_class_suppression
    from prune_edge.targets import fit_affine_suppression

    ds = mlp_bundle.dataset
    ids = np.flatnonzero(ds.y_train == 3)
    f = PatchedModel(mlp_bundle.onnx_path).logits(ds.x_train[ids]).astype(np.float64)
    without = f.copy()
    without[:, 3] = np.delete(f, 3, axis=1).max(1) - (6.0 + 0.5 * f[:, 3])
    aff = fit_affine_suppression(f, without, ds.y_train[ids], [3], 16.0, 1e4)
    path = tmp_path_factory.mktemp("affine") / "class3-affine.pepatch"
    build_class_suppression(mlp_bundle, [3], path, ledger=path.parent / "ledger", evaluate=False, affine=aff)
    return path, read_patch_file(path).manifest


def affine_graph(like: Manifest, weights, bias, floor=1.0) -> onnx.ModelProto:
    from prune_edge.runtime.patchgraph import SuppressParams, build_suppress_graph

    params = SuppressParams(np.array([3]), np.array([floor], np.float32), np.asarray(weights, np.float32).reshape(1, -1),
                            np.asarray(bias, np.float32).reshape(1))
    return build_suppress_graph(like.logits_name, params, like.n_classes, like.base_opset, like.base_ir_version)


def _affine_doc(m: Manifest, weights=None, bias=None, margin=None) -> dict:
    a = m.suppress["affine"]
    return {"classes": [3], "margin": m.suppress["margin"] if margin is None else margin,
            "affine": {"weights": a["weights"] if weights is None else [list(map(float, weights))],
                       "bias": a["bias"] if bias is None else [float(bias)]}}


def test_honest_affine_suppression_passes(base, affine_suppression):
    assert_certified(base, [affine_suppression[0]])
    assert "affine" in affine_suppression[1].suppress and len(affine_suppression[1].suppress["affine"]["weights"][0]) == 10


def test_affine_weights_differing_from_the_manifest_refused(base, affine_suppression, tmp_path):
    """The graph's weights (or bias) one float32 step away from the manifest's: refused by name."""
    _, m = affine_suppression
    w = np.array(m.suppress["affine"]["weights"][0], np.float32)
    b = np.float32(m.suppress["affine"]["bias"][0])
    w2 = w.copy()
    w2[5] = np.nextafter(w2[5], np.float32(np.inf))
    evil = forge_graph(tmp_path / "w.pepatch", m, affine_graph(m, w2, b))
    assert_refused(base, [evil], "certificate", r"graph affine margin differs from its manifest in 1 numbers")
    evil = forge_graph(tmp_path / "b.pepatch", m, affine_graph(m, w, b - 40))
    assert_refused(base, [evil], "certificate", r"graph affine margin differs from its manifest in 1 numbers")
    # an affine graph under a manifest with a constant margin, and the reverse
    evil = forge_graph(tmp_path / "c.pepatch", m, affine_graph(m, w, b), suppress={"classes": [3], "margin": 1.0})
    assert_refused(base, [evil], "certificate", "graph has an affine margin, its manifest says a constant margin")
    evil = forge_graph(tmp_path / "d.pepatch", m, suppression_graph(m, [3], 1.0))
    assert_refused(base, [evil], "certificate", "graph has a constant margin, its manifest says an affine margin")


@pytest.mark.parametrize("floor", [0.0, -5.0])
def test_affine_floor_not_positive_refused(base, affine_suppression, tmp_path, floor):
    """m_min <= 0 in graph and manifest alike (structure passes): m_K(x) could reach 0 or below, so
    class 3 could tie or win: the certificate refuses it."""
    _, m = affine_suppression
    a = m.suppress["affine"]
    evil = forge_graph(tmp_path / "f.pepatch", m, affine_graph(m, a["weights"][0], a["bias"][0], floor),
                             suppress=_affine_doc(m, margin=floor))
    assert_refused(base, [evil], "certificate", "margin expected > 0")


def test_affine_max_clamp_removed_refused(base, affine_suppression, mlp_bundle, tmp_path):
    """The canonical graph with its Max (the floor m_min) bypassed, under a bias of -60 that graph and
    manifest agree on: run alone it lets class 3 win (a negative margin lifts 3 above the best other
    class); the structure check refuses it."""
    _, m = affine_suppression
    a = m.suppress["affine"]
    graph = affine_graph(m, a["weights"][0], -60.0)
    edited = copy.deepcopy(graph)
    node = next(n for n in edited.graph.node if n.op_type == "Max")
    node.op_type, node.input[:] = "Identity", [node.input[0]]
    evil = forge_graph(tmp_path / "nomax.pepatch", m, edited, suppress=_affine_doc(m, bias=-60.0))
    f = PatchedModel(base.path, base=base).logits(mlp_bundle.dataset.x_test)
    out = make_session(edited.SerializeToString()).run(None, {m.logits_name: f})[0]
    assert (out.argmax(1) == 3).any()
    assert_refused(base, [evil], "structure", "not the canonical suppression graph")


def test_affine_non_finite_weights_refused(base, affine_suppression, tmp_path):
    """NaN or inf weights: in the graph (manifest finite) the certificate refuses them before comparing;
    in the manifest the format check does (JSON numbers must be finite)."""
    _, m = affine_suppression
    a = m.suppress["affine"]
    for bad in (np.nan, np.inf):
        w = np.array(a["weights"][0], np.float32)
        w[2] = bad
        evil = forge_graph(tmp_path / f"g{bad}.pepatch", m, affine_graph(m, w, a["bias"][0]))
        assert_refused(base, [evil], "certificate", "expected finite, found NaN or inf in the graph")
    doc = m.to_json()
    doc["suppress"]["affine"]["weights"][0][2] = float("nan")
    with pytest.raises(PatchVerificationError, match=r"suppress.affine.weights\[0\]: expected finite numbers"):
        Manifest.from_json(doc)
    doc = m.to_json()
    doc["suppress"]["affine"]["bias"] = []
    with pytest.raises(PatchVerificationError, match=r"suppress.affine.bias: expected a list of 1 numbers"):
        Manifest.from_json(doc)


def test_affine_weights_outside_policy_refused(base, affine_suppression, tmp_path):
    """|w| = 100 is refused under the default policy (max_abs_T 16) and accepted by a device whose policy
    allows it; |w| = 1e30 under a policy allowing it is still refused: C |w| 2^64 would overflow."""
    _, m = affine_suppression
    a = m.suppress["affine"]
    w = np.array(a["weights"][0], np.float32)
    w[0] = 100.0
    evil = forge_graph(tmp_path / "big.pepatch", m, affine_graph(m, w, a["bias"][0]), suppress=_affine_doc(m, weights=w))
    assert_refused(base, [evil], "certificate", r"\|w\| <= 16 and \|b\| <= 10000 expected \(device policy\), found 100")
    verify_patch(evil, base, DevicePolicy(max_abs_T=128.0))
    w[0] = 1e30
    huge = forge_graph(tmp_path / "huge.pepatch", m, affine_graph(m, w, a["bias"][0]), suppress=_affine_doc(m, weights=w))
    policy_file = tmp_path / "policy.json"
    policy_file.write_text(json.dumps({"max_abs_T": 1e31}))
    assert_refused(base, [huge], "certificate", "could overflow float32", "--policy", policy_file,
                   policy=DevicePolicy(max_abs_T=1e31))
