"""A/B in one process: a set request built with --tighten largest (default), --tighten all and --shift common,
alternating, with a retrain of the base without the points in each round; then what each does to the forget
points' logits through onnxruntime (docs/sets.md, "Tightening only each region's largest bound").

    python scripts/ab_tighten.py BASE_DIR OUT_DIR [--sizes 200,1000] [--rounds 3]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from prune_edge.basedir import load_base
from prune_edge.requests import random_forget_ids
from prune_edge.runtime.model import PatchedModel
from prune_edge.sets import SetConfig, build_set_patch
from prune_edge.synth import SynthConfig
from prune_edge.train import fit

CONFIGS = {"tighten largest": {}, "tighten all": {"tighten": "all"}, "shift common": {"shift": "common"}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("base")
    ap.add_argument("out", type=Path)
    ap.add_argument("--sizes", default="200,1000")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    b = load_base(args.base)
    ds = b.dataset
    args.out.mkdir(parents=True, exist_ok=True)
    names = list(CONFIGS)
    for size in (int(v) for v in args.sizes.split(",")):
        ids = random_forget_ids(len(ds.x_train), size, 0)
        keep = np.setdiff1d(np.arange(len(ds.x_train)), ids)
        times: dict[str, list[float]] = {n: [] for n in [*names, "retrain"]}
        reports = {}
        for rnd in range(args.rounds):
            _, st = fit(ds.x_train[keep], ds.y_train[keep], ds.n_classes, b.train_config, device="cpu", progress=False)
            times["retrain"].append(st["training_seconds"])
            for name in names if rnd % 2 == 0 else names[::-1]:
                path = args.out / f"set{size}-{name.replace(' ', '-')}.pepatch"
                r = build_set_patch(b, ids, SynthConfig(mode="prune", seed=0, **CONFIGS[name]), path,
                                    SetConfig(strategy="points"), device="cpu", progress=False, ledger=args.out / "ledger")
                times[name].append(r["build_seconds"])
                reports[name] = (path, r)
        retrain = float(np.median(times["retrain"]))
        print(f"{size} points: retrain median {retrain:.2f} s (runs {np.round(times['retrain'], 2).tolist()})")
        x = ds.x_train[ids]
        for name in names:
            path, r = reports[name]
            model = PatchedModel(b.onnx_path, [path])
            z, f = model.logits(x).astype(np.float64), model.base_logits(x).astype(np.float64)
            top2 = np.sort(z, axis=1)[:, -2:]
            acc = {k: round(v["after"], 4) for k, v in r["evaluation"]["accuracy"].items()}
            t = float(np.median(times[name]))
            print(f"  {name:16s} build {t:.2f} s = {t / retrain:.2f}x retrain; {r['patch_bytes']} B; accuracy {acc}; "
                  f"target margin median {np.median(top2[:, 1] - top2[:, 0]):.1f}; "
                  f"largest logit change median {np.median(np.abs(z - f).max(axis=1)):.1f}")


if __name__ == "__main__":
    main()
