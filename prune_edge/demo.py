"""``prune-edge demo``: the whole pipeline on the embedded mnist5k data, end to end."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from .basedir import load_base, train_base
from .latency import compare_latency
from .report import pct, table
from .requests import random_forget_ids, write_forget_ids
from .runtime.fileio import atomic_write_bytes
from .runtime.model import PatchedModel
from .runtime.verify import certify_patch
from .synth import SynthConfig
from .unlearn import build_point_patch


def run_demo(out: Path, points: int = 20, mode: str = "prune", seed: int = 0, device: str = "auto", progress: bool = True) -> dict[str, Any]:
    """Train the default base, forget ``points`` random training points, certify and compose the
    patch on the device path, and return the figures plus a printable table."""
    def log(msg: str) -> None:
        if progress:
            print(msg, file=sys.stderr)

    out.mkdir(parents=True, exist_ok=True)
    base_dir = out / "base-mlp"
    log(f"[1/5] training the default base (mnist5k, mlp, seed {seed}) into {base_dir}")
    train_base("mnist5k", "mlp", base_dir, seed=seed, device=device, progress=progress)
    bundle = load_base(base_dir)
    ids = random_forget_ids(len(bundle.dataset.x_train), points, seed)
    write_forget_ids(out / "forget.txt", ids)
    patch = out / f"forget{points}-{mode}.pepatch"
    log(f"[2/5] building a {mode} patch for {points} random training points")
    report = build_point_patch(bundle, ids, SynthConfig(mode=mode, seed=seed), patch, device=device, progress=progress)
    log("[3/5] certifying the patch on the device path (no torch)")
    cert = certify_patch(patch, bundle.graph)
    if not cert.passed:
        raise RuntimeError(f"the demo's own patch failed certification: {cert.failure}")
    log("[4/5] composing base + patch with onnxruntime and measuring latency")
    base_model, patched = PatchedModel(bundle.onnx_path), PatchedModel(bundle.onnx_path, [patch])
    x_test = bundle.dataset.x_test
    latency = [compare_latency(base_model, patched, x_test[:b]) for b in (1, 256)]
    ev = report["evaluation"]
    acc, loc = ev["accuracy"], ev["locality"]
    rows = [
        ("forget accuracy", pct(acc["forget"]["before"]), pct(acc["forget"]["after"])),
        ("retain accuracy", pct(acc["retain"]["before"]), pct(acc["retain"]["after"])),
        ("test accuracy", pct(acc["test"]["before"]), pct(acc["test"]["after"])),
        ("retain logits unchanged", "", f"{loc['retain']['unchanged']}/{loc['retain']['points']}"),
        ("test logits unchanged", "", f"{loc['test']['unchanged']}/{loc['test']['points']}"),
        ("forget points on target", "", f"{ev['forget_to_target']}/{ev['forget_patched_here']}"),
        ("seconds (train base | build patch)", f"{report['base_training_seconds']:.2f}", f"{report['build_seconds']:.2f}"),
        ("bytes (base | patch)", str(report["base_bytes"]), f"{report['patch_bytes']} ({pct(report['patch_to_base'])})"),
    ]
    rows += [(f"latency ms, batch {l['batch']} (base | patched)", f"{l['base_ms']:.3f}", f"{l['patched_ms']:.3f} ({l['ratio']:.2f}x)") for l in latency]
    rows += [("certify", "", "PASS: " + ", ".join(c.name for c in cert.checks))]
    text = table(rows, header=("", "before / base", "after / patched"))
    result = {"base": str(base_dir), "patch": str(patch), "report": report, "latency": latency, "certify": cert.to_json(), "table": text}
    doc = json.dumps({k: v for k, v in result.items() if k != "table"}, indent=2, default=str) + "\n"
    atomic_write_bytes(out / "demo.json", doc.encode())
    log(f"[5/5] done: {out / 'demo.json'}")
    return result
