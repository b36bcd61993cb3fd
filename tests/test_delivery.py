"""Delivery through TUF (issue 12): a real HTTP server on 127.0.0.1 serving a repository published with
``prune_edge.delivery.publish``, and a device updating through it with ``tuf.ngclient``.

Every attack is played for real: the server (the repository host or a network attacker between it and
the device) serves what the attacker chooses, built with our own publisher, the real keys where the
attack needs a compromised key and a foreign key where it needs one that root does not know. After
each refusal the device must still run its previous set (checked through ``PatchedModel.from_state``
and onnxruntime), and nothing refused may be left on disk.
"""

from __future__ import annotations

import dataclasses
import http.server
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("tuf")

from tuf.api.metadata import Metadata, MetaFile, Snapshot, Timestamp  # noqa: E402

from prune_edge.cli import main  # noqa: E402
from prune_edge.delivery import publish as pub  # noqa: E402
from prune_edge.runtime import state as st  # noqa: E402
from prune_edge.delivery.update import UpdateRefused, update  # noqa: E402
from prune_edge.runtime import InputError, PatchedModel, PatchVerificationError, pack, read_patch_file  # noqa: E402
from prune_edge.runtime.manifest import derive_patch_id  # noqa: E402


# ----------------------------------------------------------------------------- a real server
class Server:
    """A static file server on 127.0.0.1 (an ephemeral port) in a thread, with hooks an attacker uses:
    ``override[url_path] = bytes`` serves other bytes, ``= "endless"`` streams forever, and
    ``stall[url_path] = event`` sends half the file then waits for the event (a slow link)."""

    def __init__(self, root: Path):
        self.root = root
        self.override: dict[str, object] = {}
        self.stall: dict[str, threading.Event] = {}
        self.started: dict[str, threading.Event] = {}
        self.requests: list[str] = []
        self.sent: dict[str, int] = {}
        server = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *a, **kw):
                super().__init__(*a, directory=str(server.root), **kw)

            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_GET(self):  # noqa: N802
                path = self.path.split("?")[0]
                server.requests.append(path)
                if path in server.started:
                    server.started[path].set()
                value = server.override.get(path)
                if value == "endless":
                    return self._endless(path)
                if isinstance(value, bytes):
                    return self._send(path, value)
                if path in server.stall:
                    return self._stalled(path)
                return super().do_GET()

            def _send(self, path, data):
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                server.sent[path] = len(data)

            def _endless(self, path):
                self.send_response(200)
                self.end_headers()  # no Content-Length: the body never ends
                chunk = b"\0" * 65536
                server.sent[path] = 0
                try:
                    while server.sent[path] < 1 << 30:
                        self.wfile.write(chunk)
                        server.sent[path] += len(chunk)
                except OSError:  # the client hung up: what it must do
                    pass

            def _stalled(self, path):
                data = (server.root / path.lstrip("/")).read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data[: len(data) // 2])
                self.wfile.flush()
                server.stall[path].wait(60)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    @property
    def metadata_url(self) -> str:
        return self.url + "/metadata/"

    @property
    def targets_url(self) -> str:
        return self.url + "/targets/"

    def close(self) -> None:
        for ev in self.stall.values():
            ev.set()
        self.httpd.shutdown()
        self.httpd.server_close()


# ----------------------------------------------------------------------------- fixtures
ROLES = pub.ROLES


@pytest.fixture(scope="module")
def keyfiles(tmp_path_factory) -> dict[str, Path]:
    """Key files outside any repository: one per role, spares for rotation, and a rogue key."""
    d = tmp_path_factory.mktemp("keys")
    out = {}
    for name in (*ROLES, "root2", "timestamp2", "rogue"):
        out[name] = d / f"{name}.pem"
        pub.generate_key(out[name])
    return out


def online(keyfiles) -> dict[str, list[Path]]:
    return {r: [keyfiles[r]] for r in ("targets", "snapshot", "timestamp")}


@pytest.fixture()
def repo(tmp_path, keyfiles) -> Path:
    r = tmp_path / "repo"
    pub.init_repo(r, {role: [keyfiles[role]] for role in ROLES})
    return r


@pytest.fixture()
def server(repo):
    s = Server(repo)
    yield s
    s.close()


@pytest.fixture()
def device(tmp_path, repo, mlp_bundle) -> Path:
    """A state folder provisioned as at the factory: root v1, the base and its card, default policy."""
    return st.provision(tmp_path / "state", repo / "metadata" / "1.root.json", mlp_bundle.onnx_path)


def _update(device, server):
    return update(device, server.metadata_url, server.targets_url)


def _refused(device, server) -> str:
    with pytest.raises(UpdateRefused) as info:
        _update(device, server)
    assert st.last_update(device)["ok"] is False
    assert not list((device / st.SETS).glob(st.STAGING_PREFIX + "*")), "a refused update left its staging folder"
    return info.value.reason


def _assert_runs(device, mlp_bundle, patch_files) -> None:
    """The device's active set is exactly ``patch_files`` and serves their logits through onnxruntime."""
    active = st.read_active(device)
    ids = [read_patch_file(p).manifest.patch_id for p in patch_files]
    assert [p["patch_id"] for p in active.doc.get("patches", [])] == ids
    x = mlp_bundle.dataset.x_test[:64]
    expected = PatchedModel(mlp_bundle.onnx_path, list(patch_files)).logits(x)
    np.testing.assert_array_equal(PatchedModel.from_state(device).logits(x), expected)


def _served_path(repo: Path, target: str) -> str:
    """The URL path of a target as the device requests it (consistent snapshot: hash-prefixed name)."""
    tf = pub.current(repo)["targets"].signed.targets[target]
    d, _, name = target.rpartition("/")
    return f"/targets/{d}/{tf.hashes['sha256']}.{name}"


def _patch_target(patch) -> str:
    return f"patches/{read_patch_file(patch).manifest.patch_id}.pepatch"


# ----------------------------------------------------------------------------- the normal path
def test_normal_update_installs_then_fetches_only_what_changed(repo, server, device, keyfiles, mlp_bundle, chain):
    first, second = chain["first"], chain["second"]
    pub.publish(repo, online(keyfiles), mlp_bundle.onnx_path, [first])
    out = _update(device, server)
    assert out["changed"] and out["downloaded"] == 1 and out["reused"] == 0
    _assert_runs(device, mlp_bundle, [first])

    # nothing new: the metadata is checked, no target is fetched, the set stays
    server.requests.clear()
    out = _update(device, server)
    assert not out["changed"] and not any(p.startswith("/targets/patches/") for p in server.requests)

    pub.publish(repo, online(keyfiles), mlp_bundle.onnx_path, [second])
    server.requests.clear()
    out = _update(device, server)
    assert out["changed"] and out["downloaded"] == 1 and out["reused"] == 1
    assert _served_path(repo, _patch_target(first)) not in server.requests
    _assert_runs(device, mlp_bundle, [first, second])

    res = CliRunner().invoke(main, ["status", "--state", str(device), "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    assert [p["patch_id"] for p in doc["patches"]] == out["patches"]
    ts = doc["metadata"]["timestamp"]
    assert ts["version"] == pub.current(repo)["timestamp"].signed.version and datetime.fromisoformat(ts["expires"].replace("Z", "+00:00")) > datetime.now(timezone.utc)


# ----------------------------------------------------------------------------- freshness and rollback
def test_expired_timestamp_refused(repo, server, device, keyfiles, mlp_bundle, chain):
    """Freeze: the repository (or a mirror) keeps serving metadata past its expiry."""
    pub.publish(repo, online(keyfiles), mlp_bundle.onnx_path, [chain["first"]])
    _update(device, server)
    past = datetime.now(timezone.utc) - timedelta(days=2)  # signed two days ago: the 1-day timestamp expired
    pub.publish(repo, online(keyfiles), mlp_bundle.onnx_path, [chain["second"]], now=past)
    assert _refused(device, server) == "freeze"
    _assert_runs(device, mlp_bundle, [chain["first"]])


def _resign(md: Metadata, keyfile: Path) -> bytes:
    md.sign(pub.load_signer(keyfile))
    return md.to_bytes()


@pytest.mark.parametrize("replayed", ["all", "snapshot", "targets"])
def test_replayed_older_metadata_refused(repo, server, device, keyfiles, mlp_bundle, chain, replayed):
    """Rollback: the device saw version N; it is served version N-1 (validly signed then), either all
    of it, or a fresh timestamp naming the older snapshot, or a fresh snapshot naming older targets
    (the last two need the online keys: a compromised timestamp or snapshot key)."""
    pub.publish(repo, online(keyfiles), mlp_bundle.onnx_path, [chain["first"]])
    old = {p.name: p.read_bytes() for p in (repo / "metadata").iterdir()}
    pub.publish(repo, online(keyfiles), mlp_bundle.onnx_path, [chain["second"]])
    _update(device, server)
    cur = pub.current(repo)
    ts_v, snap_v, tgt_v = (cur[r].signed.version for r in ("timestamp", "snapshot", "targets"))
    expires = datetime.now(timezone.utc) + timedelta(days=1)
    if replayed == "all":
        server.override["/metadata/timestamp.json"] = old["timestamp.json"]
    elif replayed == "snapshot":
        snap_old = old[f"{snap_v - 1}.snapshot.json"]
        ts = Timestamp(version=ts_v + 1, expires=expires, snapshot_meta=MetaFile.from_data(snap_v - 1, snap_old, ["sha256"]))
        server.override["/metadata/timestamp.json"] = _resign(Metadata(ts), keyfiles["timestamp"])
    else:
        snap = Snapshot(version=snap_v + 1, expires=expires, meta={"targets.json": MetaFile(version=tgt_v - 1)})
        snap_bytes = _resign(Metadata(snap), keyfiles["snapshot"])
        ts = Timestamp(version=ts_v + 1, expires=expires, snapshot_meta=MetaFile.from_data(snap_v + 1, snap_bytes, ["sha256"]))
        server.override[f"/metadata/{snap_v + 1}.snapshot.json"] = snap_bytes
        server.override["/metadata/timestamp.json"] = _resign(Metadata(ts), keyfiles["timestamp"])
    assert _refused(device, server) == "rollback"
    _assert_runs(device, mlp_bundle, [chain["first"], chain["second"]])


def test_mix_and_match_refused(repo, server, device, keyfiles, mlp_bundle, chain):
    """Another validly signed patch (the chain's second, published for the same base) served in place
    of the one the metadata names; then an older, validly signed targets file served under the name of
    the current one."""
    pub.publish(repo, online(keyfiles), mlp_bundle.onnx_path, [chain["first"]])
    pub.publish(repo, online(keyfiles), mlp_bundle.onnx_path, [chain["second"]])
    tgt_v = pub.current(repo)["targets"].signed.version
    server.override[f"/metadata/{tgt_v}.targets.json"] = (repo / "metadata" / f"{tgt_v - 1}.targets.json").read_bytes()
    assert _refused(device, server) == "rollback"  # the version snapshot names, not the one served
    assert not st.read_active(device).name  # nothing installed: still the base alone

    server.override.clear()
    server.override[_served_path(repo, _patch_target(chain["first"]))] = Path(chain["second"]).read_bytes()
    assert _refused(device, server) == "mismatch"
    assert not st.read_active(device).name


def test_endless_target_cut_off_at_its_signed_length(repo, server, device, keyfiles, mlp_bundle, chain):
    """Endless data: the patch URL streams without end; the download stops just past the signed length."""
    pub.publish(repo, online(keyfiles), mlp_bundle.onnx_path, [chain["first"]])
    path = _served_path(repo, _patch_target(chain["first"]))
    server.override[path] = "endless"
    t0 = time.monotonic()
    assert _refused(device, server) == "length"
    time.sleep(0.2)  # let the server notice the hang-up
    assert server.sent[path] < 64 << 20, f"the device read on: {server.sent[path]} bytes sent"
    assert time.monotonic() - t0 < 60
    assert not st.read_active(device).name


def test_metadata_signed_by_a_key_not_in_root_refused(repo, server, device, keyfiles, mlp_bundle, chain):
    pub.publish(repo, online(keyfiles), mlp_bundle.onnx_path, [chain["first"]])
    _update(device, server)
    ts = Metadata.from_file(str(repo / "metadata" / "timestamp.json"))
    ts.signed.version += 1
    server.override["/metadata/timestamp.json"] = _resign(ts, keyfiles["rogue"])
    assert _refused(device, server) == "signature"
    _assert_runs(device, mlp_bundle, [chain["first"]])


def test_root_rotation_followed_and_the_revoked_key_refused(repo, server, device, keyfiles, mlp_bundle, chain):
    """Root v2 replaces the root and timestamp keys (signed by old and new root keys); the device,
    shipped with v1, follows it; timestamp metadata signed by the revoked key is refused after."""
    pub.publish(repo, online(keyfiles), mlp_bundle.onnx_path, [chain["first"]])
    _update(device, server)
    stale_ts = Metadata.from_file(str(repo / "metadata" / "timestamp.json"))
    res = CliRunner().invoke(main, [
        "repo", "rotate-root", str(repo), "--root-key", str(keyfiles["root"]),
        "--new-key", f"root={keyfiles['root2']}", "--new-key", f"timestamp={keyfiles['timestamp2']}",
        "--key", f"targets={keyfiles['targets']}", "--key", f"snapshot={keyfiles['snapshot']}", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["root_version"] == 2
    pub.publish(repo, {**online(keyfiles), "timestamp": [keyfiles["timestamp2"]]}, mlp_bundle.onnx_path, [chain["second"]])
    out = _update(device, server)
    assert out["metadata"]["root"]["version"] == 2 and out["changed"]
    _assert_runs(device, mlp_bundle, [chain["first"], chain["second"]])
    # the old timestamp key, revoked by root v2, signs a newer timestamp: refused
    stale_ts.signed.version = out["metadata"]["timestamp"]["version"] + 1
    server.override["/metadata/timestamp.json"] = _resign(stale_ts, keyfiles["timestamp"])
    assert _refused(device, server) == "signature"
    # the old root key alone can no longer sign a root v3
    with pytest.raises(InputError, match="root: signed by 0 of the 1 keys"):
        pub.rotate_root(repo, [keyfiles["root"]], {"timestamp": [keyfiles["timestamp"]]}, online(keyfiles))


# ----------------------------------------------------------------------------- certify on the device
def _forged(patch: Path, out: Path) -> Path:
    """The honest patch with record 0's mean-row scale moved by 0.5 (patch id re-derived, graph unchanged):
    well formed, validly signed once published, and false: its certificate does not hold."""
    pf = read_patch_file(patch)
    m = pf.manifest
    rec = dataclasses.replace(m.records[0], mean_scale=m.records[0].mean_scale + 0.5)
    m = dataclasses.replace(m, records=(rec, *m.records[1:]))
    m = dataclasses.replace(m, patch_id=derive_patch_id(m.to_json()))
    out.write_bytes(pack(m, pf.graph_bytes))
    return out


def test_patch_failing_certify_is_never_installed(repo, server, device, keyfiles, mlp_bundle, chain, tmp_path):
    """A dishonest owner (or a stolen targets key) signs a patch whose certificate is false: the
    server-side publish refuses it, the signed repository cannot make the device take it."""
    pub.publish(repo, online(keyfiles), mlp_bundle.onnx_path, [chain["first"]])
    _update(device, server)
    bad = _forged(chain["second"], tmp_path / "forged.pepatch")
    res = CliRunner().invoke(main, ["repo", "publish", str(repo), "--base", str(mlp_bundle.onnx_path), "--patch", str(bad),
                                    *[f"--key={r}={f[0]}" for r, f in online(keyfiles).items()]])
    assert res.exit_code == 3, res.output
    pub.publish(repo, online(keyfiles), mlp_bundle.onnx_path, [bad], check=False)  # signed anyway
    assert _refused(device, server) == "certify:certificate"
    bad_id = read_patch_file(bad).manifest.patch_id
    assert not any(bad_id in p.name for p in (device / st.SETS).rglob("*"))
    _assert_runs(device, mlp_bundle, [chain["first"]])
    res = CliRunner().invoke(main, ["update", "--state", str(device), "--metadata-url", server.metadata_url,
                                    "--targets-url", server.targets_url])
    assert res.exit_code == 3
    assert "certify:certificate" in res.output and "still active: set-" in res.output


# ----------------------------------------------------------------------------- crash safety
def _kill_when(proc: subprocess.Popen, reached, what: str, settle: float = 0.0, timeout: float = 120) -> None:
    """SIGKILL a real update process once ``reached()`` is true (it must still be running then)."""
    try:
        deadline = time.monotonic() + timeout
        while not reached():
            assert proc.poll() is None, f"the update ended before {what}: {proc.stderr.read().decode()}"
            assert time.monotonic() < deadline, f"the update never reached {what}"
        time.sleep(settle)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_update_killed_midway_leaves_the_previous_set(repo, server, device, keyfiles, mlp_bundle, chain):
    """A real ``prune-edge update`` process, SIGKILLed while it downloads the new patch (the server
    sent half of it): the previous set stays active and usable; the next update completes."""
    pub.publish(repo, online(keyfiles), mlp_bundle.onnx_path, [chain["first"]])
    _update(device, server)
    pub.publish(repo, online(keyfiles), mlp_bundle.onnx_path, [chain["second"]])
    path = _served_path(repo, _patch_target(chain["second"]))
    server.stall[path], server.started[path] = threading.Event(), threading.Event()
    proc = subprocess.Popen(
        [sys.executable, "-m", "prune_edge.cli", "update", "--state", str(device), "--metadata-url",
         server.metadata_url, "--targets-url", server.targets_url],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    _kill_when(proc, lambda: server.started[path].wait(0.2), "the download", settle=0.3)  # it holds half the file then
    server.stall[path].set()
    assert list((device / st.SETS).glob(st.STAGING_PREFIX + "*")), "expected the killed update's staging folder"
    _assert_runs(device, mlp_bundle, [chain["first"]])
    del server.stall[path]
    out = _update(device, server)
    assert out["changed"]
    assert not list((device / st.SETS).glob(st.STAGING_PREFIX + "*"))
    _assert_runs(device, mlp_bundle, [chain["first"], chain["second"]])


# A real `prune-edge update` whose install step stops at its Nth directory fsync (1: the staging folder holds
# set.json; 2: it is renamed to a set, active.json not yet switched; 3: active.json switched), so the test can
# SIGKILL it at exactly that point. Only the pause is added; the update's own code runs unchanged.
_PAUSING_UPDATE = """
import os, sys, time
from pathlib import Path
import prune_edge.runtime.state as st
from prune_edge.cli import main

stop, marker, real, calls = int(os.environ["KILL_AT"]), Path(os.environ["KILL_MARKER"]), st._fsync_dir, [0]

def paused(path):
    real(path)
    calls[0] += 1
    if calls[0] == stop:
        marker.write_text(str(path))
        time.sleep(120)

st._fsync_dir = paused
sys.argv = ["prune-edge", *sys.argv[1:]]
main()
"""


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
@pytest.mark.parametrize("stop, switched", [(1, False), (2, False), (3, True)], ids=["staged", "renamed", "switched"])
def test_update_killed_during_install_leaves_one_whole_set(repo, server, device, keyfiles, mlp_bundle, chain, tmp_path,
                                                           stop, switched):
    """SIGKILL inside the install step itself, at each of its durable points: the device runs either the
    previous set or the new one, whole (never a mix, never nothing), and the next update completes."""
    pub.publish(repo, online(keyfiles), mlp_bundle.onnx_path, [chain["first"]])
    _update(device, server)
    pub.publish(repo, online(keyfiles), mlp_bundle.onnx_path, [chain["second"]])
    script, marker = tmp_path / "pausing_update.py", tmp_path / "paused"
    script.write_text(_PAUSING_UPDATE)
    proc = subprocess.Popen(
        [sys.executable, str(script), "update", "--state", str(device), "--metadata-url", server.metadata_url,
         "--targets-url", server.targets_url],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "KILL_AT": str(stop), "KILL_MARKER": str(marker)},
    )
    _kill_when(proc, lambda: marker.exists() or time.sleep(0.05), "its install step")
    _assert_runs(device, mlp_bundle, [chain["first"], chain["second"]] if switched else [chain["first"]])
    _update(device, server)
    _assert_runs(device, mlp_bundle, [chain["first"], chain["second"]])
    assert not list((device / st.SETS).glob(st.STAGING_PREFIX + "*"))


def test_storage_edits_refused_then_repaired(repo, server, device, keyfiles, mlp_bundle, chain):
    """Someone with the device's storage: a flipped byte in an installed patch is refused when the
    model loads (``from_state`` verifies again); a patch dropped from the active set (to bring a
    forgotten point back) is put back by the next update, because the signed index is the truth."""
    pub.publish(repo, online(keyfiles), mlp_bundle.onnx_path, [chain["first"], chain["second"]])
    _update(device, server)
    first = st.read_active(device).patches[0]
    data = bytearray(first.read_bytes())
    data[len(data) // 2] ^= 1
    first.write_bytes(bytes(data))
    with pytest.raises(PatchVerificationError):
        PatchedModel.from_state(device)
    out = _update(device, server)
    assert out["changed"] and out["downloaded"] == 1 and out["reused"] == 1
    _assert_runs(device, mlp_bundle, [chain["first"], chain["second"]])

    active = st.read_active(device)
    doc = dict(active.doc, patches=active.doc["patches"][1:])
    (active.folder / "set.json").write_text(json.dumps(doc))
    assert len(PatchedModel.from_state(device).patches) == 1  # storage alone cannot tell
    out = _update(device, server)
    assert out["changed"]
    _assert_runs(device, mlp_bundle, [chain["first"], chain["second"]])


def test_key_files_inside_the_repository_refused(repo, keyfiles, tmp_path, mlp_bundle):
    inside = repo / "targets" / "timestamp.pem"
    shutil.copy(keyfiles["timestamp"], inside)
    res = CliRunner().invoke(main, ["repo", "publish", str(repo), "--key", f"targets={keyfiles['targets']}",
                                    "--key", f"snapshot={keyfiles['snapshot']}", "--key", f"timestamp={inside}"])
    assert res.exit_code == 1 and "outside the repository" in res.output
