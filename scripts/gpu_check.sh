#!/usr/bin/env bash
# One-shot check on a GPU server: train on CUDA, build and certify a patch, run the benchmark.
# Usage (from the repository root, with the server extra importable): OUT=results bash scripts/gpu_check.sh
# Missing wheels (highspy, mlxtend, onnxsim) can be dropped in .whl/ first; they are installed to a temp folder.
set -euo pipefail
OUT=${OUT:-gpu-check-out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "${TMPDIR:-/tmp}/prune-edge-site" .whl/*.whl
  export PYTHONPATH="${TMPDIR:-/tmp}/prune-edge-site":${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
pe() { python3 -m prune_edge.cli "$@"; }
work=$(mktemp -d)
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
nproc >> "$OUT/gpu.txt"
pe train-base --dataset mnist5k --arch mlp --seed 0 --device cuda --out "$work/mlp" --json > "$OUT/card-mlp-cuda.json"
pe train-base --dataset mnist5k --arch cnn --seed 0 --device cuda --out "$work/cnn" --json > "$OUT/card-cnn-cuda.json"
python3 -c "import numpy as np; print('\n'.join(map(str, np.random.default_rng(0).choice(4000, 20, replace=False))))" > "$work/forget.txt"
pe build-patch --base "$work/mlp" --forget "$work/forget.txt" --device cuda --out "$work/mlp.pepatch" --json > "$OUT/build-mlp-cuda.json"
pe build-patch --base "$work/cnn" --forget "$work/forget.txt" --device cuda --out "$work/cnn.pepatch" --json > "$OUT/build-cnn-cuda.json"
pe certify --base "$work/mlp/base.onnx" --patch "$work/mlp.pepatch"
pe certify --base "$work/cnn/base.onnx" --patch "$work/cnn.pepatch"
pe bench --base "$work/mlp" --device cuda --out "$work/bench" > "$OUT/bench-table.txt"
cp "$work/bench/bench.json" "$work/bench/bench.png" "$OUT/"
cat "$OUT/bench-table.txt"
python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
for arch in ("mlp", "cnn"):
    card = json.load(open(f"{out}/card-{arch}-cuda.json"))
    build = json.load(open(f"{out}/build-{arch}-cuda.json"))
    ev = build["evaluation"]
    print(arch, "device", card["training"]["device"], "test acc", card["metrics"]["test_accuracy"],
          "train s", round(card["training"]["training_seconds"], 2), "build s", round(build["build_seconds"], 3),
          "forget after", ev["accuracy"]["forget"]["after"], "retain unchanged",
          ev["locality"]["retain"]["unchanged"], "/", ev["locality"]["retain"]["points"])
PY
