"""``prune-edge bench``: cost of PRUNE patches against retraining, measured side by side in one run.

Reports (table on stdout, ``bench.json`` and ``bench.png`` in --out):
- build seconds per request (prune and collapse) vs retraining the same base without the forget set
  (same seed and recipe, same machine, same process); prune with the default dual bounds and with
  exact HiGHS LPs on the same request, and the gap between their bounds;
- the device cost of checking a chain of patches together (10 patches of 20 points, each built
  ``--after`` the ones before it) and of running it;
- patch bytes vs base bytes;
- onnxruntime latency of base vs base+patches at batch 1 and 256 for several patch sizes.
Goals (from the issue) are printed beside the measurements; nothing here is hard-coded.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import click
import numpy as np

from .report import table
from .runtime.fileio import atomic_path, atomic_write_bytes

GOALS = {
    "collapse_speedup": 1000.0,
    "prune_speedup": 1.0,  # the certificate issue: the default prune build faster than retraining
    "dual_vs_exact": 8.0,
    "patch_to_base_20": 0.01,
    "latency_ratio_256_100": 1.25,
    "latency_ratio_256_1000": 2.0,
}
GOAL_PATCH_COUNTS = (100, 1000)  # the latency sweep sizes that have a goal (batch 256)
LOAD_REPEATS = 7  # device-load timings per patch size (median)


def cpu_features() -> dict[str, Any]:
    """The CPU facts the figures depend on most, recorded with them. The gate's uint8 x int8 product
    runs several times faster with an int8 dot-product unit (VNNI, AMX) than with AVX2 alone (500
    records at batch 256, one thread: 67 us on an AMX machine, 552 us on an AVX2-only EPYC), and the
    dual ascent's products use bfloat16 only where the CPU multiplies it natively (AVX512-BF16, AMX;
    prune_edge.bounds): the same request builds 2-3x faster there. Ratios from two machines are not
    comparable without these lines."""
    import torch

    model = platform.processor()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), model)
    except OSError:
        pass
    cpu = getattr(torch, "cpu", None)
    has = lambda name: bool(getattr(cpu, name, lambda: False)())  # noqa: E731
    return {
        "model": model,
        "capability": torch.backends.cpu.get_cpu_capability(),
        "int8_dot_product": has("_is_vnni_supported") or has("_is_amx_tile_supported"),
        "bf16_products": has("_is_avx512_bf16_supported") or has("_is_amx_tile_supported"),
    }


def run_bench(
    out: Path,
    points: int = 20,
    latency_patches: tuple[int, ...] = (1, 20, 100, 1000),
    seed: int = 0,
    device: str = "auto",
    base_dir: Path | None = None,
    progress: bool = True,
    sweep_gate_layers: tuple[str, ...] = ("all", "last:1"),
    threads: int | None = None,
    sets: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run every measurement and return the JSON-able results."""
    import onnxruntime as ort
    import torch

    from .basedir import load_base, train_base
    from .latency import compare_latency
    from .requests import random_forget_ids
    from .regions import parse_gate_layers
    from .runtime.model import PatchedModel
    from .runtime.patchfile import read_patch_file
    from .runtime.verify import check_patch_set, verify_patch
    from .synth import SynthConfig
    from .train import fit
    from .unlearn import build_point_patch

    out.mkdir(parents=True, exist_ok=True)
    if base_dir is None:
        base_dir = out / "base-mlp"
        train_base("mnist5k", "mlp", base_dir, seed=seed, device=device, progress=progress)
    bundle = load_base(base_dir)
    ds = bundle.dataset
    ids = random_forget_ids(len(ds.x_train), points, seed)
    keep = np.setdiff1d(np.arange(len(ds.x_train)), ids)

    # Retrain from scratch without the forget set: the gold standard and the cost to beat.
    _, retrain_stats = fit(ds.x_train[keep], ds.y_train[keep], ds.n_classes, bundle.train_config, device=device,
                           progress=progress, desc="retrain")
    retrain_seconds = retrain_stats["training_seconds"]

    # A server keeps the training set's pass through the base and its violation index in memory (see
    # prune_edge.activations): paid once per base and gate start layer, reported apart from the
    # per-request build.
    t0 = time.perf_counter()
    for gate_layers in {"all", "last:1", *sweep_gate_layers}:
        bundle.activations.view(parse_gate_layers(gate_layers, bundle.net.n_hidden)).build_index(progress=progress)
    cache_seconds = time.perf_counter() - t0

    builds: dict[str, Any] = {}
    kinds = (("collapse", "all", "dual"), ("prune", "all", "dual"), ("prune", "all", "exact"), ("prune", "last:1", "dual"))
    for mode, gate_layers, bounds in kinds:
        label = mode if mode == "collapse" else f"{mode} ({'dual bounds' if bounds == 'dual' else 'exact LPs'})"
        label += "" if gate_layers == "all" else f", gate {gate_layers}"
        path = out / (f"forget{points}-{mode}{'' if gate_layers == 'all' else '-' + gate_layers.replace(':', '')}"
                      f"{'-exact' if bounds == 'exact' else ''}.pepatch")
        # A collapse build takes about a millisecond, so one timing is mostly scheduler noise: report
        # the median of several (dual prune builds take a fraction of a second: the median of 5; exact ones, one run).
        runs = []
        for _ in range(11 if mode == "collapse" else 5 if bounds == "dual" else 1):
            t0 = time.perf_counter()
            config = SynthConfig(mode=mode, gate_layers=gate_layers, seed=seed, bounds=bounds)
            report = build_point_patch(bundle, ids, config, path, device=device, progress=progress, evaluate=False)
            runs.append((report["build_seconds"], time.perf_counter() - t0, report))
        build_seconds, wall, report = sorted(runs, key=lambda r: r[0])[len(runs) // 2]
        builds[label] = {
            "mode": mode,
            "gate_layers": gate_layers,
            "bounds": bounds if mode == "prune" else None,
            "path": str(path),
            "build_seconds": build_seconds,
            "synthesis_seconds": report["synthesis"]["build_seconds"],  # the rest is packaging the file
            "build_runs": len(runs),
            "wall_seconds_with_io": wall,
            "speedup_vs_retrain": retrain_seconds / build_seconds,
            "patch_bytes": report["patch_bytes"],
            "patch_to_base": report["patch_to_base"],
            "records": report["records"],
            "lp_solves": report["synthesis"]["lp_solves"],
            "lp_seconds": report["synthesis"]["lp_seconds"],
        }

    # The same prune request with dual bounds and with exact LPs: time ratio and the bounds' gap, on the
    # bounds tightened to the end: each record's largest by default (rows clearly below it stop early by
    # design, --tighten largest), every row with --tighten all.
    dual, exact = builds["prune (dual bounds)"], builds["prune (exact LPs)"]
    uppers = [np.array([r.upper for r in read_patch_file(b["path"]).manifest.records]) for b in (dual, exact)]
    compared = "every row" if SynthConfig().tighten == "all" else "largest per record"
    if compared != "every row":
        uppers = [u.max(axis=1) for u in uppers]
    gap = (uppers[0] - uppers[1]) / np.maximum(1.0, np.abs(uppers[1]))
    # Read from the manifests, so as stored: both rounded up to 0.1 (prune_edge.synth._round_outward)
    bound_gap = {"median": float(np.median(gap)), "max": float(gap.max()), "min": float(gap.min()),
                 "rows": int(gap.size), "compared": compared, "equal": float(np.mean(uppers[0] == uppers[1])),
                 "max_abs": float(np.max(uppers[0] - uppers[1])),
                 "dual_vs_exact_speedup": exact["build_seconds"] / dual["build_seconds"]}

    # A device running a chain: 10 patches of `points` points, each built --after the ones before it.
    chain_paths: list[Path] = []
    for i in range(10):
        path = out / f"chain-{i}.pepatch"
        build_point_patch(bundle, random_forget_ids(len(ds.x_train), points, seed + 1000 + i),
                          SynthConfig(mode="collapse", seed=seed + i), path, device=device, progress=False,
                          evaluate=False, after=chain_paths)
        chain_paths.append(path)
    verified = [verify_patch(p, bundle.graph) for p in chain_paths]
    t_set = []
    for _ in range(5):
        t0 = time.perf_counter()
        check_patch_set(verified)
        t_set.append(time.perf_counter() - t0)
    t_load = []
    for _ in range(3):
        t0 = time.perf_counter()
        chain_model = PatchedModel(bundle.onnx_path, chain_paths, threads=threads)
        t_load.append(time.perf_counter() - t0)
    chain = {"patches": len(chain_paths), "records": chain_model.n_records,
             "set_check_seconds": float(np.median(t_set)), "load_seconds": float(np.median(t_load))}

    base_model = PatchedModel(bundle.onnx_path, threads=threads)
    base_one_thread = PatchedModel(bundle.onnx_path, threads=1) if threads is None else None
    latency = []
    device_load = []
    # The sweep uses collapse patches (no LP, so 1000 points build in a second); their graph form has
    # three more small nodes than prune's "shift" form, so prune patches of the same size are cheaper.
    for gate_layers in sweep_gate_layers:
        for count in latency_patches:
            count = min(count, len(ds.x_train))
            path = out / f"latency-{count}-{gate_layers.replace(':', '')}.pepatch"
            build_point_patch(bundle, random_forget_ids(len(ds.x_train), count, seed + count),
                              SynthConfig(mode="collapse", gate_layers=gate_layers, seed=seed), path, device=device,
                              progress=False, evaluate=False)
            # What a device pays once per patch file: the checks alone, and the checks + compose + session
            # of the same iteration (the base graph is already loaded). Timing both in one loop and summing
            # makes each load >= its checks, so the medians keep that order (one load is tens of
            # milliseconds: a median of 7, not of a noisy few).
            verify_times, load_times = [], []
            for _ in range(LOAD_REPEATS):
                t0 = time.perf_counter()
                checked = verify_patch(path, bundle.graph)
                t1 = time.perf_counter()
                patched = PatchedModel(bundle.onnx_path, [checked], threads=threads, base=bundle.graph)
                t2 = time.perf_counter()
                verify_times.append(t1 - t0)
                load_times.append((t1 - t0) + (t2 - t1))
            device_load.append({"patches": count, "gate_layers": gate_layers, "repeats": LOAD_REPEATS,
                                "verify_seconds": float(np.median(verify_times)),
                                "load_seconds": float(np.median(load_times))})
            for batch in (1, 256):
                row = compare_latency(base_model, patched, ds.x_test[:batch])
                latency.append({"patches": count, "mode": "collapse", "gate_layers": gate_layers,
                                "threads": threads or "default", **row})
            if threads is None and count in GOAL_PATCH_COUNTS:
                # The goal rows again on one onnxruntime thread (many devices run one): on a small shared
                # machine the multi-threaded figures carry most of the run-to-run noise.
                row = compare_latency(base_one_thread, PatchedModel(bundle.onnx_path, [path], threads=1), ds.x_test[:256])
                latency.append({"patches": count, "mode": "collapse", "gate_layers": gate_layers, "threads": 1, **row})
    row = compare_latency(base_model, chain_model, ds.x_test[:256])
    latency.append({"patches": chain["records"], "mode": f"chain of {chain['patches']} collapse", "gate_layers": "all",
                    "threads": threads or "default", **row})
    prune_model = PatchedModel(bundle.onnx_path, [out / f"forget{points}-prune.pepatch"], threads=threads)
    # The same patch composed in the patch file's product form (PatchedModel(screen=False), the same
    # outputs): a little cheaper where inputs come one at a time, dearer for batches (docs/sets.md, "Format 8").
    direct_model = PatchedModel(bundle.onnx_path, prune_model.patches, threads=threads, screen=False)
    for mode, model in (("prune", prune_model), ("prune product form", direct_model)):
        for batch in (1, 256):
            row = compare_latency(base_model, model, ds.x_test[:batch])
            latency.append({"patches": points, "mode": mode, "gate_layers": "all", "threads": threads or "default", **row})

    results = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpus": os.cpu_count(),
            "cpu": cpu_features(),
            "torch": torch.__version__,
            "onnxruntime": ort.__version__,
            "device": retrain_stats["device"],
            "onnxruntime_threads": threads or "default",
        },
        "base": {"path": str(base_dir), "bytes": bundle.onnx_path.stat().st_size,
                 "training_seconds_card": bundle.card["training"]["training_seconds"]},
        "points": points,
        "retrain_seconds": retrain_seconds,
        "activation_cache_seconds": cache_seconds,
        "builds": builds,
        "bound_gap": bound_gap,
        "chain": chain,
        "latency": latency,
        "device_load": device_load,
        "goals": GOALS,
    }
    if sets is not None:
        # issue "sets": set/class/stream requests, both strategies (prune_edge.sets_bench); own plot
        from .sets_bench import plot_sets, run_sets_bench

        results["sets"] = run_sets_bench(bundle, out / "sets", seed=seed, device=device, progress=progress,
                                         threads=threads, **sets)
        plot_sets(results["sets"], out / "sets.png")
    atomic_write_bytes(out / "bench.json", (json.dumps(results, indent=2) + "\n").encode())
    _plot(results, out / "bench.png")
    return results


def _figure(results: dict[str, Any]) -> Any:
    """The two panels of bench.png: build seconds against retraining, and latency against patch size,
    each with its goals drawn in and its values written on it (a reader should not need the table)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 5))
    names = ["retrain"] + [m.replace(" (", "\n(").replace(", gate", "\ngate") for m in results["builds"]]
    secs = [results["retrain_seconds"]] + [b["build_seconds"] for b in results["builds"].values()]
    bars = ax1.bar(names, secs, color=["#888", "#2a7", "#27a", "#a72", "#7ad"][: len(names)])
    ax1.bar_label(bars, labels=[_seconds(s) for s in secs], fontsize=7, padding=2)
    # Multi-line names side by side overlap at any readable size: slant them, anchored at the bar.
    ax1.tick_params(axis="x", labelsize=7)
    plt.setp(ax1.get_xticklabels(), rotation=30, ha="right", rotation_mode="anchor")
    ax1.set_yscale("log")
    ax1.set_ylabel("build seconds per request (log)")
    ax1.set_title(f"Forgetting {results['points']} points: build vs retrain")
    goals = results["goals"]
    for key, mode, color in (("collapse_speedup", "collapse", "#2a7"), ("prune_speedup", "prune", "#27a")):
        ax1.axhline(results["retrain_seconds"] / goals[key], color=color, ls=":", lw=1,
                    label=f"goal: {mode} >= {goals[key]:g}x faster than retrain")
    ax1.margins(y=0.15)
    ax1.legend(fontsize=7, loc="upper right")

    for batch, marker in ((1, "o"), (256, "s")):
        for gl, style in (("all", "-"), ("last:1", "--")):
            rows = [r for r in results["latency"] if r["batch"] == batch and r["mode"] == "collapse" and r["gate_layers"] == gl
                    and r["threads"] != 1]
            if rows:
                xs, ys = [r["patches"] for r in rows], [r["ratio"] for r in rows]
                ax2.plot(xs, ys, style, marker=marker, label=f"batch {batch}, gate {gl}")
                if batch == 256:  # the batch the goals are for; "all" written above its points, "last:1" below
                    for x, y in zip(xs, ys):
                        ax2.annotate(f"{y:.2f}x", (x, y), textcoords="offset points", xytext=(0, 6 if gl == "all" else -12),
                                     ha="center", fontsize=7)
    ax2.axhline(1.0, color="#888", lw=0.8)
    for count, key, color in ((100, "latency_ratio_256_100", "#a72"), (1000, "latency_ratio_256_1000", "#a27")):
        ax2.axhline(goals[key], color=color, ls=":", lw=1, label=f"goal: batch 256, {count} records <= {goals[key]:g}x")
    ax2.set_xscale("log")
    ax2.set_xlabel("records per patch (one per forgotten point, log)")
    ax2.set_ylabel("latency ratio: base + patch / base")
    ax2.set_title("onnxruntime latency")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _seconds(s: float) -> str:
    """A bar's value, short: 3 significant digits in s or ms."""
    return f"{s:.3g} s" if s >= 1 else f"{1e3 * s:.3g} ms"


def _plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig = _figure(results)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def format_table(r: dict[str, Any]) -> str:
    g = r["goals"]
    rows = []
    cpu = r.get("machine", {}).get("cpu")
    if cpu:
        yes = lambda v: "yes" if v else "no"  # noqa: E731
        rows.append(("machine", f"{r['machine']['cpus']} cpus, {cpu['capability']}",
                     f"{cpu['model']}; int8 dot product {yes(cpu['int8_dot_product'])}, bf16 products {yes(cpu['bf16_products'])}"))
    rows += [("retrain without forget set", f"{r['retrain_seconds']:.3f} s", ""),
            ("once per base: training set through the base + violation index (kept)", f"{r['activation_cache_seconds']:.3f} s",
             f"{r['activation_cache_seconds'] / r['retrain_seconds']:.3f}x of one retrain")]
    for label, b in r["builds"].items():
        goal = g[f"{b['mode']}_speedup"] if b.get("bounds") != "exact" else None
        rows.append((f"build {label} patch ({r['points']} points)", f"{b['build_seconds']:.3f} s",
                     f"{b['speedup_vs_retrain']:.2f}x of retrain" + (f" (goal >= {goal:g}x)" if goal else "")))
    bg = r["bound_gap"]
    rows.append(("prune: dual bounds vs exact LPs, same request", f"{bg['dual_vs_exact_speedup']:.1f}x faster",
                 f"goal >= {g['dual_vs_exact']:g}x"))
    rows.append((f"prune: dual upper bounds vs the LP optimum, as stored (up to 0.1), {bg['compared']}",
                 f"{100 * bg['equal']:.0f}% equal, max +{bg['max_abs']:.1f}",
                 f"relative median {100 * bg['median']:.2f}%, max {100 * bg['max']:.1f}%; {bg['rows']} bounds"))
    ch = r["chain"]
    rows.append((f"device: check {ch['patches']} patches ({ch['records']} records) together (interference, totals)",
                 f"{1e3 * ch['set_check_seconds']:.2f} ms", ""))
    rows.append(("device: load the chain (verify each, check the set, compose, session)",
                 f"{1e3 * ch['load_seconds']:.1f} ms", ""))
    for label, b in r["builds"].items():
        rows.append((f"{label} patch bytes", f"{b['patch_bytes']} B",
                     f"{100 * b['patch_to_base']:.2f}% of base {r['base']['bytes']} B (goal <= {100 * g['patch_to_base_20']:g}%)"))
    for l in r["latency"]:
        goal = {100: g["latency_ratio_256_100"], 1000: g["latency_ratio_256_1000"]}.get(l["patches"]) if l["batch"] == 256 else None
        one = ", 1 thread" if l["threads"] == 1 else ""
        rows.append((f"latency batch {l['batch']}, {l['patches']} {l['mode']} records, gate {l['gate_layers']}{one}",
                     f"{l['base_ms']:.3f} -> {l['patched_ms']:.3f} ms",
                     f"{l['ratio']:.2f}x" + (f" (goal <= {goal:g}x)" if goal else "")))
    for d in r.get("device_load", []):
        rows.append((f"device load of a {d['patches']}-point patch, gate {d['gate_layers']}: checks; checks + compose + session",
                     f"{1e3 * d['verify_seconds']:.1f} ms; {1e3 * d['load_seconds']:.1f} ms", ""))
    if "sets" in r:
        from .sets_bench import format_sets_rows

        rows += format_sets_rows(r["sets"])
    return table(rows, header=("measurement", "value", "ratio"))


def _positive_ints(text: str, hint: str) -> tuple[int, ...]:
    """A comma-separated list of sizes >= 1 (a usage error naming the option otherwise)."""
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter("expected comma-separated integers", param_hint=hint) from None
    if any(v < 1 for v in values):
        raise click.BadParameter(f"expected sizes >= 1, found {min(values)}", param_hint=hint)
    return values


@click.command()
@click.option("--out", default="bench-out", show_default=True, type=click.Path(file_okay=False))
@click.option("--base", "base_dir", default=None, type=click.Path(file_okay=False),
              help="Existing base folder (default: train the mnist5k MLP into --out).")
@click.option("--points", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--latency-patches", default="1,20,100,1000", show_default=True, help="Patch sizes for the latency sweep.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None, help="onnxruntime intra-op threads (default: all cores).")
@click.option("--sets/--no-sets", "with_sets", default=True, show_default=True,
              help="Also measure set, class and stream requests with both strategies (prune_edge.sets_bench).")
@click.option("--sets-sizes", default="200,1000", show_default=True, help="Random set request sizes.")
@click.option("--sets-class", type=click.IntRange(min=0), default=3, show_default=True, help="Class to forget.")
@click.option("--sets-mode", type=click.Choice(["prune", "collapse"]), default="prune", show_default=True)
@click.option("--json", "as_json", is_flag=True)
def bench(out: str, base_dir: str | None, points: int, latency_patches: str, seed: int, device: str, threads: int | None,
          with_sets: bool, sets_sizes: str, sets_class: int, sets_mode: str, as_json: bool) -> None:
    """Benchmark patches against retraining: build time, bytes, onnxruntime latency (table, JSON, plot)."""
    from .cli_common import require as _require

    _require(base_dir, "a base folder (from `prune-edge train-base`)", folder=True)  # bad input: exit 1
    # checked before the minutes of work that come before the sweeps
    sizes = _positive_ints(latency_patches, "--latency-patches")
    set_sizes = _positive_ints(sets_sizes, "--sets-sizes")
    sets = {"sizes": set_sizes, "forget_class": sets_class, "mode": sets_mode} if with_sets else None
    results = run_bench(Path(out), points, sizes, seed, device, Path(base_dir) if base_dir else None, progress=not as_json,
                        threads=threads, sets=sets)
    if as_json:
        click.echo(json.dumps(results, indent=2))
    else:
        click.echo(format_table(results))
        click.echo(f"\nwrote {Path(out) / 'bench.json'} and {Path(out) / 'bench.png'}", err=True)
