"""The benchmark measures what it says, side by side, and writes its table, JSON and plot."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")

from prune_edge.bench import LOAD_REPEATS, format_table, run_bench  # noqa: E402


def test_bench_small_run(tmp_path, mlp_base, monkeypatch):
    import numpy as np

    import prune_edge.bench as bench_module
    from prune_edge.runtime import read_patch_file

    monkeypatch.setattr(bench_module, "GOAL_PATCH_COUNTS", (3,))  # exercise the one-thread goal rows cheaply
    out = tmp_path / "bench"
    r = run_bench(out, points=2, latency_patches=(3,), base_dir=mlp_base, progress=False, sweep_gate_layers=("all",))
    saved = json.loads((out / "bench.json").read_text())
    assert saved["retrain_seconds"] == r["retrain_seconds"] > 0
    assert saved["bound_gap"] == r["bound_gap"] and saved["chain"] == r["chain"]
    assert (out / "bench.png").stat().st_size > 10_000
    assert list(r["builds"]) == ["collapse", "prune (dual bounds)", "prune (exact LPs)", "prune (dual bounds), gate last:1"]
    for label, b in r["builds"].items():
        # the ratio is computed from the two measured times, not asserted into being
        assert b["speedup_vs_retrain"] == pytest.approx(r["retrain_seconds"] / b["build_seconds"])
        assert 0 < b["patch_to_base"] < 0.01
    dual, exact = r["builds"]["prune (dual bounds)"], r["builds"]["prune (exact LPs)"]
    assert dual["bounds"] == "dual" and exact["bounds"] == "exact" and r["builds"]["collapse"]["bounds"] is None
    assert exact["lp_solves"] == 2 * exact["records"] * 9  # two LPs per row, nine rows per record
    assert dual["lp_solves"] == 0 and dual["records"] == exact["records"] == 2
    # The bound gap, recomputed from the two patch files: dual upper bounds are sound, so never below
    # the LP optimum (both are rounded up to 0.1 the same way, which keeps that order). Compared on the
    # bound that sets each record's (common) shift, its largest; every row is sound all the same.
    gap = r["bound_gap"]
    up = [np.array([rec.upper for rec in read_patch_file(b["path"]).manifest.records]) for b in (dual, exact)]
    assert (up[0] >= up[1] - 1e-5).all()
    assert gap["compared"] == "largest per record"
    up = [u.max(axis=1) for u in up]
    rel = (up[0] - up[1]) / np.maximum(1.0, np.abs(up[1]))
    assert gap["rows"] == rel.size == 2
    assert gap["median"] == pytest.approx(float(np.median(rel))) and gap["max"] == pytest.approx(float(rel.max()))
    assert gap["min"] == pytest.approx(float(rel.min())) and gap["min"] >= -1e-5
    assert gap["equal"] == pytest.approx(float(np.mean(up[0] == up[1]))) and gap["max_abs"] == pytest.approx(float((up[0] - up[1]).max()))
    assert gap["dual_vs_exact_speedup"] == pytest.approx(exact["build_seconds"] / dual["build_seconds"])
    # The chain: 10 patches, each built --after the ones before it, checked and loaded together.
    chain = r["chain"]
    manifests = [read_patch_file(out / f"chain-{i}.pepatch").manifest for i in range(10)]
    assert chain["patches"] == 10 and chain["records"] == sum(len(m.records) for m in manifests)
    for i, m in enumerate(manifests):
        assert m.chain == {"position": i, "after": [p.patch_id for p in manifests[:i]], "replaces": []}
    assert chain["set_check_seconds"] > 0 and chain["load_seconds"] > 0
    rows = {(l["patches"], l["batch"], l["mode"], l["threads"]) for l in r["latency"]}
    assert rows == {(3, 1, "collapse", "default"), (3, 256, "collapse", "default"), (3, 256, "collapse", 1),
                    (chain["records"], 256, "chain of 10 collapse", "default"),
                    (2, 1, "prune", "default"), (2, 256, "prune", "default"),
                    (2, 1, "prune product form", "default"), (2, 256, "prune product form", "default")}
    assert all(l["base_ms"] > 0 and l["patched_ms"] > 0 for l in r["latency"])
    assert r["goals"]["prune_speedup"] == 1.0 and r["goals"]["dual_vs_exact"] == 8.0
    table = format_table(r)
    assert "retrain without forget set" in table and "goal >= 1000x" in table
    # the figures carry the CPU facts they depend on (int8 dot product for the gate, bf16 for the ascent)
    cpu = r["machine"]["cpu"]
    assert set(cpu) == {"model", "capability", "int8_dot_product", "bf16_products"} and cpu["model"]
    assert f"int8 dot product {'yes' if cpu['int8_dot_product'] else 'no'}" in table
    assert "dual bounds vs exact LPs" in table and "goal >= 8x" in table
    assert "device: check 10 patches" in table and "3 collapse records, gate all, 1 thread" in table
    [load] = r["device_load"]
    assert load["patches"] == 3 and load["gate_layers"] == "all" and load["repeats"] == LOAD_REPEATS >= 7
    assert saved["device_load"] == r["device_load"]
    for row in r["device_load"]:
        # checks + compose + session, timed in the same iterations as the checks alone: never less
        assert 0 < row["verify_seconds"] <= row["load_seconds"]
    assert "device load of a 3-point patch" in table and "checks + compose + session" in table
    _assert_readable_plot(r)


def _assert_readable_plot(r: dict) -> None:
    """bench.png as a reader needs it: tick labels apart, goal lines labelled, values on the bars."""
    import matplotlib.pyplot as plt
    import numpy as np

    from prune_edge.bench import _figure, _seconds

    fig = _figure(r)
    try:
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        builds, latency = fig.axes
        labels = [t for t in builds.get_xticklabels() if t.get_text()]
        assert len(labels) == 1 + len(r["builds"])
        theta = np.deg2rad(labels[0].get_rotation())
        if theta == 0:
            boxes = [t.get_window_extent(renderer) for t in labels]
            assert all(a.x1 < b.x0 for a, b in zip(boxes, boxes[1:]))
        else:
            # Parallel slanted labels: each fills a strip as wide as its unrotated height, and the strips
            # of neighbours are (tick spacing x sin(angle)) apart.
            heights = []
            for t in labels:
                t.set_rotation(0)
                heights.append(t.get_window_extent(renderer).height)
                t.set_rotation(np.rad2deg(theta))
            ticks = builds.transData.transform([(x, 1.0) for x in builds.get_xticks()])[:, 0]
            assert np.diff(ticks).min() * np.sin(theta) >= max(heights)
        secs = [r["retrain_seconds"]] + [b["build_seconds"] for b in r["builds"].values()]
        assert [t.get_text() for t in builds.texts] == [_seconds(s) for s in secs]
        goals = [line.get_label() for ax in (builds, latency) for line in ax.get_lines() if "goal" in line.get_label()]
        assert len(goals) == 4 and any("1000x faster than retrain" in g for g in goals)
        assert any(f"<= {r['goals']['latency_ratio_256_100']:g}x" in g for g in goals)
        assert latency.get_xlabel().startswith("records per patch") and "point patches" not in latency.get_xlabel()
        assert [t.get_text() for t in latency.texts]  # ratios written at the points
    finally:
        plt.close(fig)


@pytest.mark.parametrize("sizes, match", [("1,x", "comma-separated integers"), ("5,0", "sizes >= 1, found 0")])
def test_bench_refuses_bad_sweep_sizes_before_any_work(tmp_path, sizes, match):
    from click.testing import CliRunner

    from prune_edge.cli import main

    out = tmp_path / "bench"
    result = CliRunner().invoke(main, ["bench", "--latency-patches", sizes, "--out", str(out)])
    assert result.exit_code == 2 and match in result.output
    assert not out.exists()  # refused before training or writing anything
