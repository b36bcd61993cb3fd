"""A/B in one process: the latency of the base with patches composed in the lookup form (what a device runs,
the default) and in the patch file's product form (``PatchedModel(screen=False)``), alternating, with the
outputs compared bit for bit on the whole embedded dataset first (docs/sets.md, "Format 8").

    python scripts/ab_gate_forms.py BASE_DIR PATCH [PATCH ...] [--rounds 5] [--batches 256,1] [--threads 0,1]
        [--extra NAME=MODEL.onnx ...] [--json OUT.json]

``--extra`` adds already composed models (e.g. one composed by an older release) to the same rotation; its
outputs are compared with the lookup form's too. Threads 0 means onnxruntime's default (all cores).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import onnx

from prune_edge.basedir import load_base
from prune_edge.latency import compare_latency
from prune_edge.runtime.model import PatchedModel, make_session


class Session:
    """A plain onnxruntime session with ``logits(x)``, as compare_latency calls it."""

    def __init__(self, model: onnx.ModelProto, threads: int | None):
        self.session = make_session(model.SerializeToString(), threads, None)
        self.name = self.session.get_inputs()[0].name

    def logits(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.name: x})[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("base")
    ap.add_argument("patches", nargs="+")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batches", default="256,1")
    ap.add_argument("--threads", default="0,1")
    ap.add_argument("--extra", action="append", default=[], help="NAME=composed.onnx, measured in the same rotation")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    b = load_base(args.base)
    models = {
        "lookup": PatchedModel(b.onnx_path, args.patches).model,
        "product": PatchedModel(b.onnx_path, args.patches, screen=False).model,
    }
    for item in args.extra:
        name, path = item.split("=", 1)
        models[name] = onnx.load(path)
    x_all = np.concatenate([b.dataset.x_train, b.dataset.x_test]).astype(np.float32)
    ref = Session(models["lookup"], None).logits(x_all)
    checks = {}
    for name, model in models.items():
        out = Session(model, None).logits(x_all)
        checks[name] = {"rows_differing": int((out != ref).any(axis=1).sum()),
                        "labels_differing": int((out.argmax(1) != ref.argmax(1)).sum())}
        print(f"{name}: rows differing from the lookup form {checks[name]['rows_differing']} of {len(x_all)}, "
              f"labels {checks[name]['labels_differing']}; {len(model.graph.node)} nodes")
    rows = []
    for batch in (int(v) for v in args.batches.split(",")):
        x = b.dataset.x_test[:batch].astype(np.float32)
        for threads in (int(v) or None for v in args.threads.split(",")):
            base = Session(onnx.load(b.onnx_path), threads)
            sessions = {name: Session(model, threads) for name, model in models.items()}
            ratios: dict[str, list[float]] = {name: [] for name in sessions}
            for rnd in range(args.rounds):
                order = list(sessions) if rnd % 2 == 0 else list(sessions)[::-1]
                for name in order:
                    ratios[name].append(compare_latency(base, sessions[name], x, blocks=10)["ratio"])
            row = {"batch": batch, "threads": threads or "default",
                   **{name: {"median": float(np.median(v)), "min": float(min(v)), "max": float(max(v))} for name, v in ratios.items()}}
            rows.append(row)
            print(f"batch {batch:4d} threads {str(threads or 'all'):4s} " + "  ".join(
                f"{name} {np.median(v):.3f}x ({min(v):.2f}-{max(v):.2f})" for name, v in ratios.items()), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"patches": args.patches, "checks": checks, "latency": rows}, indent=2))


if __name__ == "__main__":
    main()
