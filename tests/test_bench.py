"""The benchmark measures what it says, side by side, and writes its table, JSON and plot."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")

from prune_edge.bench import format_table, run_bench  # noqa: E402


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
    # the LP optimum (up to the 1e-6 outward rounding of both).
    gap = r["bound_gap"]
    up = [np.array([rec.upper for rec in read_patch_file(b["path"]).manifest.records]) for b in (dual, exact)]
    rel = (up[0] - up[1]) / np.maximum(1.0, np.abs(up[1]))
    assert gap["rows"] == rel.size == 2 * 9
    assert gap["median"] == pytest.approx(float(np.median(rel))) and gap["max"] == pytest.approx(float(rel.max()))
    assert gap["min"] == pytest.approx(float(rel.min())) and gap["min"] >= -1e-5
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
                    (2, 1, "prune", "default"), (2, 256, "prune", "default")}
    assert all(l["base_ms"] > 0 and l["patched_ms"] > 0 for l in r["latency"])
    assert r["goals"]["prune_speedup"] == 1.0 and r["goals"]["dual_vs_exact"] == 8.0
    table = format_table(r)
    assert "retrain without forget set" in table and "goal >= 1000x" in table
    assert "dual bounds vs exact LPs" in table and "goal >= 8x" in table
    assert "device: check 10 patches" in table and "3 collapse records, gate all, 1 thread" in table
    [load] = r["device_load"]
    assert load["patches"] == 3 and 0 < load["verify_seconds"] and 0 < load["load_seconds"]
    assert "device load of a 3-point patch" in table


@pytest.mark.parametrize("sizes, match", [("1,x", "comma-separated integers"), ("5,0", "sizes >= 1, found 0")])
def test_bench_refuses_bad_sweep_sizes_before_any_work(tmp_path, sizes, match):
    from click.testing import CliRunner

    from prune_edge.cli import main

    out = tmp_path / "bench"
    result = CliRunner().invoke(main, ["bench", "--latency-patches", sizes, "--out", str(out)])
    assert result.exit_code == 2 and match in result.output
    assert not out.exists()  # refused before training or writing anything
