"""``prune-edge bench-update``: what one update costs a device, step by step, through a real TUF repository.

For each chain length n (default 1 and 100): n collapse patches of one point each are built on the
base, each ``--after`` the ones before it (a real chain), published into a fresh repository served
over HTTP on 127.0.0.1, and a fresh device updates through it. Reported per update (median of
``repeats`` fresh devices): metadata verification (root, timestamp, snapshot, targets, the index and
target lookups), download, certify (every per-file check plus the set checks), install (staging,
fsync, rename, switch); then a second update with nothing new (metadata only). Table on stdout,
``bench_update.json`` and ``bench_update.png`` in --out. Needs the server extra (patch building) and
the update extra (tuf).
"""

from __future__ import annotations

import functools
import http.server
import json
import platform
import statistics
import tempfile
import threading
from pathlib import Path
from typing import Any, Sequence

from ..report import table
from ..runtime.fileio import atomic_write_bytes
from . import publish as pub
from ..runtime import state as st
from .update import update

PHASES = ("metadata_s", "download_s", "certify_s", "install_s")


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: Any) -> None:
        pass


def serve(folder: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    """A static server for ``folder`` on an ephemeral loopback port; returns it and its URL."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(folder)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, f"http://127.0.0.1:{httpd.server_address[1]}"


def build_chain(base_dir: Path, n: int, out: Path, seed: int = 0, progress: bool = True) -> list[Path]:
    """``n`` one-point collapse patches, each built after all the ones before it."""
    from tqdm import tqdm

    from ..basedir import load_base
    from ..requests import random_forget_ids
    from ..synth import SynthConfig
    from ..unlearn import build_point_patch

    bundle = load_base(base_dir)
    ids = random_forget_ids(len(bundle.dataset.x_train), n, seed=seed)
    files: list[Path] = []
    for i in tqdm(range(n), desc=f"chain of {n}", disable=not progress):
        path = out / f"p{i:04d}.pepatch"
        build_point_patch(bundle, ids[i:i + 1], SynthConfig(mode="collapse", seed=seed + i), path, device="cpu",
                          progress=False, evaluate=False, after=files, ledger=out / "ledger")
        files.append(path)
    return files


def measure(base_onnx: Path, patches: Sequence[Path], work: Path, repeats: int = 3) -> dict[str, Any]:
    """Publish ``patches`` and time ``repeats`` fresh devices updating through HTTP on loopback."""
    keys = {role: [work / "keys" / f"{role}.pem"] for role in pub.ROLES}
    for files in keys.values():
        pub.generate_key(files[0])
    repo = work / "repo"
    pub.init_repo(repo, keys)
    online = {r: keys[r] for r in ("targets", "snapshot", "timestamp")}
    pub.publish(repo, online, base_onnx, list(patches))
    httpd, url = serve(repo)
    runs, again = [], []
    try:
        for r in range(repeats):
            state = st.provision(work / f"device{r}", repo / "metadata" / "1.root.json", base_onnx)
            first = update(state, url + "/metadata/", url + "/targets/")
            if not first["changed"] or len(first["patches"]) != len(patches):
                raise RuntimeError(f"expected {len(patches)} patches installed, found {first['patches']}")
            runs.append(first["times"])
            again.append(update(state, url + "/metadata/", url + "/targets/")["times"])
    finally:
        httpd.shutdown()
        httpd.server_close()
    med = {k: statistics.median(t[k] for t in runs) for k in PHASES}
    med_again = {k: statistics.median(t[k] for t in again) for k in PHASES}
    return {"patches": len(patches), "bytes": sum(p.stat().st_size for p in patches), "first_update": med,
            "no_change_update": med_again, "repeats": repeats}


def run_bench(base_dir: Path, out: Path, sizes: Sequence[int] = (1, 100), repeats: int = 3,
              progress: bool = True) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-update-") as tmp:
        chain = build_chain(base_dir, max(sizes), Path(tmp), progress=progress)
        for n in sizes:
            rows.append(measure(base_dir / "base.onnx", chain[:n], Path(tmp) / f"n{n}", repeats))
    doc = {"machine": {"platform": platform.platform(), "python": platform.python_version()},
           "command": f"prune-edge bench-update --base {base_dir} --sizes {','.join(map(str, sizes))} --repeats {repeats}",
           "results": rows}
    atomic_write_bytes(out / "bench_update.json", (json.dumps(doc, indent=1) + "\n").encode())
    _plot(rows, out / "bench_update.png")
    doc["table"] = table(
        [(r["patches"], r["bytes"], *(f"{1000 * r['first_update'][k]:.1f}" for k in PHASES),
          f"{1000 * sum(r['no_change_update'].values()):.1f}") for r in rows],
        header=("patches", "bytes", "metadata ms", "download ms", "certify ms", "install ms", "no-change update ms"),
    )
    return doc


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    labels = [f"{r['patches']} patch{'es' if r['patches'] > 1 else ''}" for r in rows]
    bottom = [0.0] * len(rows)
    for k in PHASES:
        vals = [1000 * r["first_update"][k] for r in rows]
        ax.bar(labels, vals, bottom=bottom, label=k.replace("_s", ""))
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_ylabel("ms per update (median)")
    ax.set_title("Device cost of one update through TUF")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
