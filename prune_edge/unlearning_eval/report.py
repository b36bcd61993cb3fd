"""Writing an evaluation: ``results.json``, ``report.md`` (mean +- std tables, recipes, machine) and
PNG plots a person reads at a glance: forget vs test accuracy per method, attack ROC curves on log
axes, and cost per method (unlearning seconds, bytes a device downloads)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ..runtime.fileio import atomic_path, atomic_write_bytes

COLUMNS = [
    ("forget_acc", "forget acc", "pct"), ("retain_acc", "retain acc", "pct"), ("test_acc", "test acc", "pct"),
    ("test_acc_retained", "test acc (retained classes)", "pct"), ("agree_forget", "agree retrain (forget)", "pct"), ("agree_test", "agree retrain (test)", "pct"),
    ("loss_auc", "loss-attack AUC", "f3"), ("loss_tpr_1pct", "loss TPR@1%", "pct"),
    ("challenge_acc", "challenge LR acc", "f3"),
    ("lira_auc", "LiRA AUC", "f3"), ("lira_tpr_1pct", "LiRA TPR@1%", "pct"), ("lira_tpr_0.1pct", "LiRA TPR@0.1%", "pct"),
    ("ulira_auc", "U-LiRA AUC", "f3"), ("ulira_tpr_1pct", "U-LiRA TPR@1%", "pct"), ("ulira_tpr_0.1pct", "U-LiRA TPR@0.1%", "pct"),
    ("seconds", "unlearn s", "f2"), ("ship_bytes", "device download (B)", "int"), ("latency_ms", "ORT ms (batch 256)", "f2"),
]


def _fmt(stat: dict[str, Any], kind: str) -> str:
    m, s = stat["mean"], stat["std"]
    if m is None:
        return "n/a"
    if kind == "pct":
        return f"{100 * m:.1f} ± {100 * s:.1f}"
    if kind == "f3":
        return f"{m:.3f} ± {s:.3f}"
    if kind == "f2":
        return f"{m:.2f} ± {s:.2f}"
    return f"{m:,.0f}"


def markdown(results: dict[str, Any], plots: dict[str, str]) -> str:
    cfg = results["config"]
    lines = [
        "# Unlearning evaluation", "",
        f"Dataset `{cfg['dataset']}`, arch `{cfg['arch']}`, {cfg['seeds']} seed(s) (base seed = request seed), "
        f"{results['shadows']['attack']} attacker shadow models (LiRA, online, fixed variance), "
        f"{results['shadows']['calibration']} server fold models calibrating prune-unseen "
        f"(+ {results['shadows'].get('class_calibration', 0)} trained without the class per class request), "
        f"U-LiRA on {results['shadows'].get('ulira', 0)} attacker shadows unlearned by each of "
        f"{', '.join(results['shadows'].get('ulira_methods') or []) or 'no method'}. Mean ± std over seeds. "
        f"Base test accuracy {100 * results['bases']['test_acc']['mean']:.2f} ± {100 * results['bases']['test_acc']['std']:.2f}%.",
        "",
        "Attacks score forgotten training points (members, then unlearned) against points no model saw; AUC 0.5 = "
        "cannot tell, and the goal is retrain's value, not 0.5 or 0. Loss-attack AUC = P(loss of a forget point < loss "
        "of an unseen one). `challenge LR acc` = the NeurIPS 2023 unlearning challenge's logistic regression on "
        "per-sample losses (balanced, 10 stratified splits). Unlearning seconds exclude one-time costs (training the "
        "base, SISA's original constituents, prune-unseen's calibration models). Device download: the whole model "
        "(ONNX) for weight-changing methods, the patch file for PRUNE, the retrained constituents for SISA. "
        "U-LiRA (Hayes et al. 2024): per candidate point, Gaussians over shadows that learnt it and were then "
        "unlearned *by the same method* vs shadows that never saw it; candidates = the forget points plus as many "
        "unseen test points (all test points of the class for class:K), each unlearned in every shadow that trained "
        "on it (n/a: not run for that method).",
        "",
    ]
    for req, r in results["requests"].items():
        lines += [f"## Request `{req}` ({r['forget_points']} forget points; unseen = {r['unseen_points']})", ""]
        head = ["method"] + [c[1] for c in COLUMNS]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "---|" * len(head))
        for m, stats in r["summary"].items():
            lines.append("| " + " | ".join([m] + [_fmt(stats[k], kind) for k, _, kind in COLUMNS]) + " |")
        lines.append("")
        if r["unseen_points"] != "all test points":
            b = r["base_test_acc_retained"]
            lines += [f"Class request: the bar's test-accuracy item compares `test acc (retained classes)` (test points whose "
                      f"label is not a forgotten class) with the base's on the same points, "
                      f"{100 * b['mean']:.2f} ± {100 * b['std']:.2f}%; forgetting a class loses its test images by definition.", ""]
        margins = {m: v for m, v in (r.get("suppression_margins") or {}).items() if v["n"]}
        if margins:
            lines += ["Suppression margins (mean ± std over seeds): " + ", ".join(
                f"{m} {v['mean']:.2f} ± {v['std']:.2f}" for m, v in margins.items()), ""]
        for key, acc in r.items():
            if not key.startswith("acceptance_"):
                continue
            name = key[len("acceptance_"):].replace("_", "-")
            if acc:
                lines += [f"Acceptance ({name} vs retrain, means over seeds):", ""]
                for k, v in acc.items():
                    val = "" if v["value"] is None else f": {v['value']:.4f} vs {v['reference']:.4f}"
                    lines.append(f"- {k}: **{'holds' if v['holds'] else 'does not hold'}**{val}")
                lines.append("")
    cal = results["shadows"].get("calibration_summary") or {}
    if cal:
        lines += ["## prune-unseen calibration", "",
                  "Each point's constant is one model's output on a point it never saw: the out-of-fold model for point "
                  "requests, a model trained without the class for class requests. No test point is used. The "
                  "temperature (fitted against single models' losses on points they never saw; KS distance) is about 1 "
                  "when each point takes one model.", "",
                  "| calibration | models | temperature | KS distance | accuracy on its points |", "|---|---|---|---|---|"]
        for name, c in cal.items():
            acc = c.get("out_accuracy")
            acc = f"{100 * acc:.1f}%" if acc is not None and acc == acc else \
                f"{100 * (1 - c.get('label_is_a_forgotten_class', 0)):.1f}% predicted outside the class"
            lines.append(f"| {name} | {c['shadows']} | {c['scale']:.3f} | {c['ks_distance']:.3f} | {acc} |")
        lines.append("")
    lines += ["## Recipes", ""]
    for m in cfg["methods"]:
        rc = results["recipes"][m]
        lines.append(f"- **{m}** ({rc['paper']}): {rc['recipe']}")
    lines += ["", "## Plots", ""] + [f"- {k}: `{v}`" for k, v in plots.items()]
    mc = results["machine"]
    lines += ["", "## Machine", "", f"{mc['platform']}, {mc['cpus']} CPUs, Python {mc['python']}, torch {mc['torch']}, "
              f"onnxruntime {mc['onnxruntime']}, CUDA {'yes' if mc['cuda'] else 'no'}; whole run {results['total_seconds']:.0f} s "
              f"(shadow models {results['shadows']['seconds_all']:.0f} s)."]
    return "\n".join(lines) + "\n"


def plots(results: dict[str, Any], out: Path) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .metrics import roc_curve

    reqs = list(results["requests"])
    made = {}
    fig, axes = plt.subplots(1, len(reqs), figsize=(6.5 * len(reqs), 5), squeeze=False)
    for ax, req in zip(axes[0], reqs):
        for i, (m, st) in enumerate(results["requests"][req]["summary"].items()):
            x, y = st["forget_acc"], st["test_acc"]
            ax.errorbar(100 * x["mean"], 100 * y["mean"], xerr=100 * x["std"], yerr=100 * y["std"], capsize=3, label=m,
                        **_style(m, i), ms=8, ls="none")
        ax.set(xlabel="forget accuracy (%)", ylabel="test accuracy (%)", title=f"{req}: forget vs test accuracy (mean ± std)")
        ax.legend(fontsize=7, ncol=2)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    made["forget_vs_test"] = _save(fig, out / "forget_vs_test.png", svg=True)
    attacks = ("loss", "lira", "ulira") if any("ulira" in sc for r in reqs for sc in results["requests"][r]["scores_seed0"].values()) \
        else ("loss", "lira")
    titles = {"loss": "loss-threshold", "lira": "LiRA", "ulira": "U-LiRA"}
    fig, axes = plt.subplots(len(attacks), len(reqs), figsize=(6.5 * len(reqs), 5 * len(attacks)), squeeze=False)
    for j, req in enumerate(reqs):
        for i, attack in enumerate(attacks):
            ax = axes[i][j]
            for k, (m, sc) in enumerate(results["requests"][req]["scores_seed0"].items()):
                if attack not in sc:  # (k counts every method, so a method keeps its colour in every panel)
                    continue
                f, t = roc_curve(np.array(sc[attack][0]), np.array(sc[attack][1]))
                st = _style(m, k)
                ax.plot(np.maximum(f, 1e-4), np.maximum(t, 1e-4), label=m, color=st["color"],
                        lw=2.5 if m in ("retrain", "prune-unseen") else 1.1, ls="-" if k < 10 else "--")
            ax.plot([1e-4, 1], [1e-4, 1], "k:", lw=0.8)
            ax.set(xscale="log", yscale="log", xlim=(1e-3, 1), ylim=(1e-3, 1), xlabel="false positive rate",
                   ylabel="true positive rate", title=f"{req}: {titles[attack]} attack (seed 0)")
            ax.legend(fontsize=7)
            ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    made["roc"] = _save(fig, out / "roc.png")
    req = reqs[0]
    st = results["requests"][req]["summary"]
    names = list(st)
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    axes[0].bar(names, [st[m]["seconds"]["mean"] for m in names], yerr=[st[m]["seconds"]["std"] for m in names])
    axes[0].set(yscale="log", ylabel="unlearning seconds (log)", title=f"{req}: time of the unlearning step")
    axes[1].bar(names, [st[m]["ship_bytes"]["mean"] for m in names])
    axes[1].set(yscale="log", ylabel="bytes a device downloads (log)", title=f"{req}: download per request")
    for ax in axes:
        ax.tick_params(axis="x", rotation=45)
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    made["cost"] = _save(fig, out / "cost.png")
    return made


_MARKERS = "osD^vP*Xh<>"


def _style(method: str, i: int) -> dict[str, Any]:
    """A distinct colour and marker per method; retrain in black (the reference)."""
    import matplotlib

    color = "black" if method == "retrain" else matplotlib.colormaps["tab10"](i % 10)
    return {"color": color, "marker": _MARKERS[i % len(_MARKERS)]}


def _save(fig: Any, path: Path, svg: bool = False) -> str:
    """PNG for people; ``svg``: also a text copy next to it (what docs can carry in git, where binaries may not go)."""
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    if svg:
        # text as text (small, searchable), no timestamp: the same results give the same bytes
        with atomic_path(path.with_suffix(".svg")) as tmp, plt.rc_context({"svg.fonttype": "none", "svg.hashsalt": "prune-edge"}):
            fig.savefig(tmp, format="svg", metadata={"Date": None})
    plt.close(fig)
    return str(path)


def _jsonable(o: Any) -> Any:
    if isinstance(o, dict):
        return {str(k): _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (np.floating, np.integer, np.bool_)):
        return o.item()
    return o


def write_report(results: dict[str, Any], out: Path) -> dict[str, str]:
    """results.json, report.md and the PNGs in ``out`` (each written atomically); returns their paths."""
    made = plots(results, out)
    atomic_write_bytes(out / "results.json", (json.dumps(_jsonable(results)) + "\n").encode())
    atomic_write_bytes(out / "report.md", markdown(results, made).encode())
    return {"results": str(out / "results.json"), "report": str(out / "report.md"), **made}


def console_table(results: dict[str, Any]) -> str:
    from ..report import table

    keys = [("forget_acc", "forget", "pct"), ("test_acc", "test", "pct"), ("agree_forget", "agree F", "pct"),
            ("loss_auc", "loss AUC", "f3"), ("challenge_acc", "chal acc", "f3"), ("lira_auc", "LiRA AUC", "f3"),
            ("lira_tpr_1pct", "LiRA@1%", "pct"), ("ulira_auc", "U-LiRA AUC", "f3"), ("ulira_tpr_1pct", "U-LiRA@1%", "pct"), ("seconds", "seconds", "f2"), ("ship_bytes", "bytes", "int")]
    parts = []
    for req, r in results["requests"].items():
        rows = [[m] + [_fmt(st[k], kind) for k, _, kind in keys] for m, st in r["summary"].items()]
        parts.append(f"{req}\n" + table(rows, ["method"] + [k[1] for k in keys]))
    return "\n\n".join(parts)
