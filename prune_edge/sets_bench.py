"""The set, class and stream rows of ``prune-edge bench`` (issue "sets"), measured side by side.

For each request size: retrain without the points (same seed and recipe), then both strategies of
:mod:`.sets` on the same request: build seconds, records, bytes, accuracies before/after through
onnxruntime, and how many points end certified (in the region of an acting record) or forgotten
without a certificate. For a whole class: the same, plus agreement of test predictions and per-class
test accuracy against the model retrained without the class. A stream of requests built ``--after``
each other, checked after every step, then compacted. Latency of base + a set patch at batch 256.
Nothing here is asserted: the goals are printed beside the measured values.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .report import table

SET_GOALS = {
    "forget_accuracy_max": 0.02,
    "drop_pp_200": 0.5,
    "drop_pp_1000": 1.0,
    "build_vs_retrain_200": 1.0,  # build time below one retraining
    "build_vs_retrain_1000": 3.0,
    "patch_to_base": 0.02,
    "class_test_accuracy_max": 0.05,
    "other_class_drop_pp": 1.0,
    "latency_ratio_256_500": 1.5,
}
STRATEGY_NAMES = ("points", "representatives")
CLASS_STRATEGY_NAMES = ("suppress", *STRATEGY_NAMES)  # a class request also has the suppression patch


def _retrain(bundle, keep: np.ndarray, device: str, progress: bool):
    from .train import fit

    ds = bundle.dataset
    net, stats = fit(ds.x_train[keep], ds.y_train[keep], ds.n_classes, bundle.train_config, device=device,
                     progress=progress, desc="retrain")
    return net, stats["training_seconds"]


def _predict_torch(net, x: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return net(torch.from_numpy(np.ascontiguousarray(x, np.float32))).argmax(1).numpy()


def _build(bundle, ids, strategy: str, path: Path, mode: str, seed: int, device: str, classes=None) -> dict[str, Any]:
    from .sets import SetConfig, build_set_patch
    from .synth import SynthConfig

    config = SynthConfig(mode=mode, seed=seed)
    r = build_set_patch(bundle, ids, config, path, SetConfig(strategy=strategy), device=device, progress=False,
                        classes=classes, ledger=path.parent / "ledger")
    ev, syn = r["evaluation"], r["synthesis"]
    acc = {k: v for k, v in ev["accuracy"].items()}
    return {
        "strategy": strategy, "mode": mode, "path": str(path), "build_seconds": r["build_seconds"],
        "records": r["records"], "patch_bytes": r["patch_bytes"], "patch_to_base": r["patch_to_base"],
        "accuracy": acc,
        "drop_pp": {k: 100 * (acc[k]["before"] - acc[k]["after"]) for k in ("retain", "test")},
        "certified": syn["certified"], "uncertified": len(syn["uncertified_ids"]),
        "forgotten_uncertified": syn["forgotten_uncertified"], "rounds": syn["rounds"],
        "test_gate_touched": ev["locality"]["test"]["gate_touched"],
    }


def run_sets_bench(
    bundle, out: Path, seed: int = 0, device: str = "auto", progress: bool = True,
    sizes: Sequence[int] = (200, 1000), forget_class: int | None = 3, stream: tuple[int, int] = (5, 10),
    latency_points: int = 500, mode: str = "prune", threads: int | None = None,
) -> dict[str, Any]:
    """Every set measurement; JSON-able."""
    from .latency import compare_latency
    from .requests import random_forget_ids
    from .runtime.model import PatchedModel
    from .sets import DEFAULT_STRATEGY, SetConfig, build_set_patch, certified_mask
    from .synth import SynthConfig

    out.mkdir(parents=True, exist_ok=True)
    ds = bundle.dataset
    n = len(ds.x_train)
    res: dict[str, Any] = {"default_strategy": DEFAULT_STRATEGY, "mode": mode, "goals": SET_GOALS, "requests": [],
                           "base_bytes": bundle.onnx_path.stat().st_size}
    for size in sizes:
        ids = random_forget_ids(n, size, seed)
        keep = np.setdiff1d(np.arange(n), ids)
        _, retrain_s = _retrain(bundle, keep, device, progress)
        row = {"points": size, "retrain_seconds": retrain_s, "strategies": {}, "distinct_patterns": distinct_patterns(bundle, ids)}
        for strategy in STRATEGY_NAMES:
            b = _build(bundle, ids, strategy, out / f"set{size}-{strategy}.pepatch", mode, seed, device)
            b["build_vs_retrain"] = b["build_seconds"] / retrain_s
            row["strategies"][strategy] = b
        res["requests"].append(row)

    if forget_class is not None:
        res["class"] = run_class_bench(bundle, out, forget_class, CLASS_STRATEGY_NAMES, mode, seed, device, progress)

    if stream:
        k, m = stream
        ids = random_forget_ids(n, k * m, seed + 17)
        paths: list[Path] = []
        steps = []
        for i in range(k):
            path = out / f"stream-{i}.pepatch"
            t0 = time.perf_counter()
            build_set_patch(bundle, ids[i * m:(i + 1) * m], SynthConfig(mode=mode, seed=seed + i), path, SetConfig(),
                            device=device, progress=False, evaluate=False, after=paths, ledger=out / "ledger")
            build_s = time.perf_counter() - t0
            paths.append(path)
            model = PatchedModel(bundle.onnx_path, paths)  # verifies each file and checks the set
            so_far = ids[: (i + 1) * m]
            signs = bundle.activations.view(0).signs(so_far)
            cert, forgot = certified_mask(model, ds.x_train[so_far], signs, ds.y_train[so_far])
            steps.append({"request": i + 1, "build_seconds": build_s, "points_so_far": int(len(so_far)),
                          "certified": int(cert.sum()), "forgotten": int(forgot.sum())})
        from .exporters.compact import compact_patches
        from .runtime.fileio import atomic_write_bytes
        from .runtime.verify import verify_patch

        t0 = time.perf_counter()
        _, data = compact_patches([verify_patch(p, bundle.graph) for p in paths])
        compact_path = out / "stream-compact.pepatch"
        atomic_write_bytes(compact_path, data)
        compact_s = time.perf_counter() - t0
        merged = PatchedModel(bundle.onnx_path, [compact_path])
        chain = PatchedModel(bundle.onnx_path, paths)
        diff = max(float(np.abs(merged.logits(x) - chain.logits(x)).max()) for x in (ds.x_train, ds.x_test))
        res["stream"] = {"requests": k, "points_each": m, "steps": steps, "compact_seconds": compact_s,
                         "compact_max_abs_logit_diff": diff, "compact_records": merged.n_records,
                         "compact_bytes": len(data), "chain_bytes": sum(p.stat().st_size for p in paths)}

    if latency_points:
        # collapse records (no LP; the same gate work per record as prune's), gated on every layer (the
        # default) and on the last one (fewer gated values per record)
        rows = []
        for gate_layers in ("all", "last:1"):
            path = out / f"latency-set{latency_points}-{gate_layers.replace(':', '')}.pepatch"
            build_set_patch(bundle, random_forget_ids(n, latency_points, seed + 5),
                            SynthConfig(mode="collapse", seed=seed, gate_layers=gate_layers), path, SetConfig(),
                            device=device, progress=False, evaluate=False, ledger=out / "ledger")
            for th in ([threads] if threads else [None, 1]):
                base_model = PatchedModel(bundle.onnx_path, threads=th)
                patched = PatchedModel(bundle.onnx_path, [path], threads=th)
                rows.append({"threads": th or "default", "records": patched.n_records, "gate_layers": gate_layers,
                             **compare_latency(base_model, patched, ds.x_test[:256])})
        res["latency"] = rows
    return res


def run_class_bench(bundle, out: Path, forget_class: int, strategies: Sequence[str] = CLASS_STRATEGY_NAMES,
                    mode: str = "prune", seed: int = 0, device: str = "auto", progress: bool = True) -> dict[str, Any]:
    """A whole-class request with each strategy, against retraining without the class: build, bytes,
    train and per-class test accuracy through onnxruntime, agreement of test predictions with the
    retrained model (and the retrained model's own figures)."""
    from .runtime.model import PatchedModel
    from .suppress import build_class_suppression

    out.mkdir(parents=True, exist_ok=True)
    ds = bundle.dataset
    ids = np.flatnonzero(ds.y_train == forget_class)
    keep = np.flatnonzero(ds.y_train != forget_class)
    retrained, retrain_s = _retrain(bundle, keep, device, progress)
    y_re = _predict_torch(retrained, ds.x_test)
    base_pred = PatchedModel(bundle.onnx_path).predict(ds.x_test)
    cls = {"class": forget_class, "points": int(len(ids)), "retrain_seconds": retrain_s, "strategies": {},
           "distinct_patterns": distinct_patterns(bundle, ids),
           "retrained": _class_figures(y_re, ds.y_test, forget_class, base_pred)}
    cls["retrained"]["agreement_with_base"] = float((y_re == base_pred).mean())
    for strategy in strategies:
        path = out / f"class{forget_class}-{strategy}.pepatch"
        if strategy == "suppress":
            r = build_class_suppression(bundle, [forget_class], path, ledger=out / "ledger", evaluate=False)
            b = {"strategy": "suppress", "mode": "suppress", "path": str(path), "build_seconds": r["build_seconds"],
                 "records": 0, "patch_bytes": r["patch_bytes"], "patch_to_base": r["patch_to_base"]}
        else:
            b = _build(bundle, ids, strategy, path, mode, seed, device, classes=[forget_class])
        b["build_vs_retrain"] = b["build_seconds"] / retrain_s
        model = PatchedModel(bundle.onnx_path, [path])
        pred_test = model.predict(ds.x_test)
        b["class_train_accuracy"] = float((model.predict(ds.x_train[ids]) == forget_class).mean())
        b.update(_class_figures(pred_test, ds.y_test, forget_class, base_pred))
        b["agreement_with_retrained"] = float((pred_test == y_re).mean())
        on_k = ds.y_test == forget_class  # agreement on the class's own test images, and on the rest
        b["agreement_on_class_points"] = float((pred_test[on_k] == y_re[on_k]).mean())
        b["agreement_with_retrained_not_class"] = float((pred_test[~on_k] == y_re[~on_k]).mean())
        cls["strategies"][strategy] = b
    return cls


def distinct_patterns(bundle, ids: np.ndarray) -> dict[str, int]:
    """How many distinct activation patterns (= certified regions needed) the points have, gating every
    hidden layer and gating the last one only: the floor on records of any certified strategy."""
    n_hidden = len(bundle.activations.relu_inputs)
    return {"all": len({r.tobytes() for r in bundle.activations.view(0).signs(ids)}),
            "last:1": len({r.tobytes() for r in bundle.activations.view(n_hidden - 1).signs(ids)})}


def _class_figures(pred: np.ndarray, y: np.ndarray, k: int, base_pred: np.ndarray) -> dict[str, Any]:
    classes = sorted(set(y.tolist()))
    per = {int(c): float((pred[y == c] == c).mean()) for c in classes}
    base = {int(c): float((base_pred[y == c] == c).mean()) for c in classes}
    others = [c for c in classes if c != k]
    return {"class_test_accuracy": per[k], "per_class_test_accuracy": per,
            "max_other_class_drop_pp": max(100 * (base[c] - per[c]) for c in others)}


def format_sets_rows(r: dict[str, Any]) -> list[tuple[str, str, str]]:
    """Rows for the bench table: (measurement, value, goal / ratio)."""
    g = r["goals"]
    rows: list[tuple[str, str, str]] = []
    for req in r["requests"]:
        p = req["points"]
        drop_goal = g["drop_pp_200"] if p <= 200 else g["drop_pp_1000"]
        time_goal = g["build_vs_retrain_200"] if p <= 200 else g["build_vs_retrain_1000"]
        rows.append((f"set {p}: retrain without the points", f"{req['retrain_seconds']:.2f} s", ""))
        if "distinct_patterns" in req:
            d = req["distinct_patterns"]
            rows.append((f"set {p}: distinct patterns (regions needed), gate all; last:1", f"{d['all']}; {d['last:1']}", ""))
        for name, b in req["strategies"].items():
            a = b["accuracy"]
            rows.append((f"set {p}, {name}: build; records; bytes",
                         f"{b['build_seconds']:.2f} s; {b['records']}; {b['patch_bytes']} B",
                         f"{b['build_vs_retrain']:.2f}x retrain (goal < {time_goal:g}x); {100 * b['patch_to_base']:.2f}% of base (goal <= {100 * g['patch_to_base']:g}%)"))
            rows.append((f"set {p}, {name}: forget acc; retain, test drop",
                         f"{100 * a['forget']['after']:.1f}%; {b['drop_pp']['retain']:+.2f}, {b['drop_pp']['test']:+.2f} pp",
                         f"goal <= {100 * g['forget_accuracy_max']:g}%; <= {drop_goal:g} pp"))
            rows.append((f"set {p}, {name}: certified; forgotten uncertified; reported",
                         f"{b['certified']}/{p}; {b['forgotten_uncertified']}; {b['uncertified']}", ""))
    if "class" in r:
        c = r["class"]
        k = c["class"]
        re = c["retrained"]
        rows.append((f"class {k} ({c['points']} train points): retrain without it",
                     f"{c['retrain_seconds']:.2f} s; test acc on {k} {100 * re['class_test_accuracy']:.1f}%",
                     f"other classes max drop {re['max_other_class_drop_pp']:+.2f} pp"))
        for name, b in c["strategies"].items():
            rows.append((f"class {k}, {name}: build; records; bytes",
                         f"{b['build_seconds']:.2f} s; {b['records']}; {b['patch_bytes']} B",
                         f"{b['build_vs_retrain']:.2f}x retrain; {100 * b['patch_to_base']:.2f}% of base"))
            rows.append((f"class {k}, {name}: train acc on {k}; test acc on {k}; other classes max drop",
                         f"{100 * b['class_train_accuracy']:.1f}%; {100 * b['class_test_accuracy']:.1f}%; "
                         f"{b['max_other_class_drop_pp']:+.2f} pp",
                         f"goal 0%; <= {100 * g['class_test_accuracy_max']:g}%; <= {g['other_class_drop_pp']:g} pp"))
            rows.append((f"class {k}, {name}: test agreement with retrained (all; class-{k} images; others)",
                         f"{100 * b['agreement_with_retrained']:.1f}%; {100 * b.get('agreement_on_class_points', float('nan')):.1f}%; "
                         f"{100 * b.get('agreement_with_retrained_not_class', float('nan')):.1f}%",
                         f"base vs retrained {100 * re['agreement_with_base']:.1f}%" if "agreement_with_base" in re else ""))
    if "stream" in r:
        s = r["stream"]
        last = s["steps"][-1]
        held = all(st["certified"] == st["points_so_far"] for st in s["steps"])
        rows.append((f"stream of {s['requests']} requests x {s['points_each']} points (--after)",
                     f"{last['certified']}/{last['points_so_far']} certified, {last['forgotten']} forgotten at the end",
                     "earlier requests held after every step" if held else "an earlier request lost its certificate"))
        rows.append(("compact the stream into one patch",
                     f"{s['compact_records']} records, {s['compact_bytes']} B (chain {s['chain_bytes']} B)",
                     f"max |logit diff| {s['compact_max_abs_logit_diff']:.1e} (goal <= 1e-5)"))
    for lat in r.get("latency", []):
        rows.append((f"latency batch 256, base + {lat['records']}-record set patch, gate {lat.get('gate_layers', 'all')}, "
                     f"threads {lat['threads']}",
                     f"{lat['base_ms']:.3f} -> {lat['patched_ms']:.3f} ms",
                     f"{lat['ratio']:.2f}x (goal <= {g['latency_ratio_256_500']:g}x)"))
    return rows


def format_sets_table(r: dict[str, Any]) -> str:
    return table(format_sets_rows(r), header=("measurement", "value", "goal / ratio"))


def plot_sets(r: dict[str, Any], path: Path) -> None:
    """sets.png: build seconds of each strategy against retraining, per request, values on the bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .runtime.fileio import atomic_path

    groups = [(f"{q['points']} points", q["retrain_seconds"], q["strategies"]) for q in r["requests"]]
    if "class" in r:
        c = r["class"]
        groups.append((f"class {c['class']}", c["retrain_seconds"], c["strategies"]))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    width = 0.2
    colors = {"retrain": "#888", "points": "#27a", "representatives": "#a72", "suppress": "#2a5"}
    seen: set[str] = set()
    for gi, (label, retrain, strategies) in enumerate(groups):
        names = ["retrain", *strategies]
        secs = [retrain, *(b["build_seconds"] for b in strategies.values())]
        for j, (name, s) in enumerate(zip(names, secs)):
            bar = ax.bar(gi + (j - (len(names) - 1) / 2) * width, s, width, color=colors.get(name, "#555"),
                         label=None if name in seen else name)
            seen.add(name)
            ax.bar_label(bar, labels=[f"{s:.3g} s"], fontsize=7, padding=2)
    ax.set_xticks(range(len(groups)), [g[0] for g in groups])
    ax.set_yscale("log")
    ax.set_ylabel("seconds (log)")
    ax.set_title(f"Set requests ({r['mode']}): build per strategy vs retraining the base")
    ax.legend(fontsize=8)
    ax.margins(y=0.2)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def _main(argv: Sequence[str] | None = None) -> None:
    """The class rows alone (seconds instead of the full bench's minutes):
    ``python -m prune_edge.sets_bench BASE_DIR OUT_DIR --class 3 --mode collapse``."""
    import argparse
    import json

    from .basedir import load_base
    from .runtime.fileio import atomic_write_bytes

    ap = argparse.ArgumentParser(prog="python -m prune_edge.sets_bench", description=_main.__doc__)
    ap.add_argument("base_dir")
    ap.add_argument("out_dir")
    ap.add_argument("--class", dest="forget_class", type=int, default=3)
    ap.add_argument("--mode", choices=("prune", "collapse"), default="prune", help="mode of the record strategies")
    ap.add_argument("--strategies", default=",".join(CLASS_STRATEGY_NAMES))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    out = Path(args.out_dir)
    cls = run_class_bench(load_base(args.base_dir), out, args.forget_class, tuple(args.strategies.split(",")), args.mode,
                          args.seed, args.device, progress=False)
    r = {"goals": SET_GOALS, "requests": [], "class": cls, "mode": args.mode}
    atomic_write_bytes(out / "class.json", (json.dumps(cls, indent=2) + "\n").encode())
    print(format_sets_table(r))


if __name__ == "__main__":  # pragma: no cover
    _main()
