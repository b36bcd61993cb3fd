"""The benchmark measures what it says, side by side, and writes its table, JSON and plot."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")

from prune_edge.bench import format_table, run_bench  # noqa: E402


def test_bench_small_run(tmp_path, mlp_base, monkeypatch):
    import prune_edge.bench as bench_module

    monkeypatch.setattr(bench_module, "GOAL_PATCH_COUNTS", (3,))  # exercise the one-thread goal rows cheaply
    out = tmp_path / "bench"
    r = run_bench(out, points=2, latency_patches=(3,), base_dir=mlp_base, progress=False, sweep_gate_layers=("all",))
    saved = json.loads((out / "bench.json").read_text())
    assert saved["retrain_seconds"] == r["retrain_seconds"] > 0
    assert (out / "bench.png").stat().st_size > 10_000
    for label, b in r["builds"].items():
        # the ratio is computed from the two measured times, not asserted into being
        assert b["speedup_vs_retrain"] == pytest.approx(r["retrain_seconds"] / b["build_seconds"])
        assert 0 < b["patch_to_base"] < 0.01
    assert r["builds"]["prune"]["lp_solves"] == 2 * 2 * 9  # two points, two LPs per row, nine rows
    rows = {(l["patches"], l["batch"], l["mode"], l["threads"]) for l in r["latency"]}
    assert rows == {(3, 1, "collapse", "default"), (3, 256, "collapse", "default"), (3, 256, "collapse", 1),
                    (2, 1, "prune", "default"), (2, 256, "prune", "default")}
    assert all(l["base_ms"] > 0 and l["patched_ms"] > 0 for l in r["latency"])
    table = format_table(r)
    assert "retrain without forget set" in table and "goal >= 1000x" in table
    assert "3 collapse patches, gate all, 1 thread" in table
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
