"""Updating (device): fetch through tuf.ngclient, certify every patch, switch the active set atomically.

Order, each step only after the one before it succeeded:
1. metadata: ``tuf.ngclient`` walks root versions from the root shipped with the device (following
   rotations), then timestamp, snapshot, targets: signatures against root's keys and thresholds,
   versions never lower than the device has seen (rollback), expiry (freeze), the exact versions and
   hashes the role above names (mix-and-match), sizes capped before reading (endless data);
2. targets: the index of the device's base, then each patch it lists, downloaded into a staging
   folder unless the active set already holds the same bytes (only what changed is fetched); each
   file's length and sha256 must be the signed ones, and its ``custom`` fields must be its manifest's;
3. certify: every check of ``prune-edge certify`` against the device's own base, card and policy,
   then the set checks (interference, totals) over the whole new set;
4. install: :func:`.state.commit_set` (rename of the staging folder, then of ``active.json``).
Any failure leaves the previous set active (or the base alone), records why in ``last_update.json``
and raises :class:`UpdateRefused` (exit 3) or :class:`UpdateUnavailable` (exit 1).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from tuf.api import exceptions as tuf_exc
from tuf.ngclient import Updater, UpdaterConfig

from ..runtime.base import BaseGraph
from ..runtime.errors import PatchVerificationError, PruneEdgeError
from ..runtime.fileio import PathLike
from ..runtime.verify import check_patch_set, verify_patch
from ..runtime import state as st

INDEX_MAX_BYTES = 1 << 20


class UpdateRefused(PatchVerificationError):
    """The repository served something the device must not trust; nothing was installed."""

    check = "delivery"

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class UpdateUnavailable(PruneEdgeError):
    """The repository could not be reached or read; nothing was installed."""

    reason = "unavailable"


def _classify(exc: BaseException) -> str:
    """A short name of the attack (or fault) a tuf error stands for, for the report and the tests."""
    if isinstance(exc, tuf_exc.ExpiredMetadataError):
        return "freeze"
    if isinstance(exc, tuf_exc.BadVersionNumberError):
        return "rollback"
    if isinstance(exc, tuf_exc.UnsignedMetadataError):
        return "signature"
    if isinstance(exc, tuf_exc.LengthOrHashMismatchError):
        return "mismatch"
    if isinstance(exc, tuf_exc.DownloadLengthMismatchError):
        return "length"
    if isinstance(exc, tuf_exc.RepositoryError):
        return "metadata"
    return "unavailable"


@contextlib.contextmanager
def _locked(state: Path) -> Iterator[None]:
    """One updater per state folder at a time (ngclient's cache is single-instance)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX: no concurrent updaters expected
        yield
        return
    with open(state / ".lock", "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise UpdateUnavailable(f"{state}: another update is running on this state folder") from None
        yield


def _metadata_info(tuf_dir: Path) -> dict[str, Any]:
    """Version and expiry of each top-level role the updater now trusts (from its cache)."""
    out = {}
    for role in ("root", "timestamp", "snapshot", "targets"):
        try:
            signed = json.loads((tuf_dir / f"{role}.json").read_bytes())["signed"]
            out[role] = {"version": signed["version"], "expires": signed["expires"]}
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return out


def _custom(info: Any) -> dict[str, Any]:
    custom = info.custom if isinstance(info.custom, dict) else {}
    block = custom.get("prune_edge")
    return block if isinstance(block, dict) else {}


def _read_index(path: Path, base_sha256: str) -> list[dict[str, Any]]:
    try:
        doc = json.loads(path.read_text())
        entries = doc["patches"]
        ok = doc["base_sha256"] == base_sha256 and isinstance(entries, list) and all(
            isinstance(e, dict) and isinstance(e.get("path"), str) and isinstance(e.get("patch_id"), str)
            and e["path"] == f"patches/{e['patch_id']}.pepatch" for e in entries)
    except (OSError, ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        raise UpdateRefused("index", f"index of base {base_sha256[:16]}...: expected a list of patches for this base")
    return entries


def update(state: PathLike, metadata_url: str, targets_url: str, *, fetcher: Any = None) -> dict[str, Any]:
    """Run one update of a provisioned state folder; return what happened and what each step cost.

    Raises :class:`UpdateRefused` or :class:`UpdateUnavailable` (after recording why) on failure;
    the active set is then the one before the call."""
    s = st.require_provisioned(state)
    with _locked(s):
        t0 = time.perf_counter()
        times: dict[str, float] = {}
        staging: Path | None = None
        try:
            active = st.read_active(s)
            graph = BaseGraph.load(s / st.BASE, s / st.CARD)
            graph.card  # the device's own card must describe its base
            policy = active.policy()
            (s / st.TUF_DIR).mkdir(exist_ok=True)
            updater = Updater(str(s / st.TUF_DIR), metadata_url, target_base_url=targets_url, fetcher=fetcher,
                              config=UpdaterConfig(app_user_agent="prune-edge"), bootstrap=(s / st.TRUST_ROOT).read_bytes())
            updater.refresh()
            index_info = updater.get_targetinfo(f"index/{graph.sha256}.json")
            infos = []
            staging = st.new_staging(s)
            if index_info is not None:
                if index_info.length > INDEX_MAX_BYTES or _custom(index_info).get("kind") != "index":
                    raise UpdateRefused("index", f"{index_info.path}: expected an index target of at most {INDEX_MAX_BYTES} bytes")
                updater.download_target(index_info, filepath=str(staging / "index.json"))
                for e in _read_index(staging / "index.json", graph.sha256):
                    info = updater.get_targetinfo(e["path"])
                    if info is None:
                        raise UpdateRefused("index", f"{e['path']}: listed in the index, not in the signed targets")
                    infos.append(info)
            times["metadata_s"] = time.perf_counter() - t0

            t1 = time.perf_counter()
            have = {p["sha256"]: active.folder / p["file"] for p in active.doc.get("patches", [])} if active.folder else {}
            files, downloaded, reused = [], 0, 0
            for i, info in enumerate(infos):
                custom = _custom(info)
                dst = staging / f"{i:04d}-{custom.get('patch_id')}.pepatch"
                if not st._PATCH_FILE.fullmatch(dst.name) or custom.get("kind") != "patch":
                    raise UpdateRefused("index", f"{info.path}: expected custom fields of a patch target, found {custom!r:.80}")
                old = have.get(info.hashes.get("sha256", ""))
                if old is not None and updater.find_cached_target(info, str(old)):
                    shutil.copyfile(old, dst)  # the same verified bytes: not fetched again
                    reused += 1
                else:
                    updater.download_target(info, filepath=str(dst))
                    downloaded += 1
                files.append((info, custom, dst))
            times["download_s"] = time.perf_counter() - t1

            t2 = time.perf_counter()
            verified = []
            for info, custom, dst in files:
                vp = verify_patch(dst, graph, policy)
                m = vp.manifest
                said = (custom.get("patch_id"), custom.get("base_sha256"), custom.get("position"), custom.get("replaces"))
                if said != (m.patch_id, m.base_sha256, m.chain["position"], m.chain["replaces"]):
                    raise UpdateRefused("custom", f"{info.path}: signed custom fields {said!r:.120} differ from the patch's manifest")
                verified.append(vp)
            check_patch_set(verified, policy)
            times["certify_s"] = time.perf_counter() - t2

            t3 = time.perf_counter()
            meta = _metadata_info(s / st.TUF_DIR)
            entries = [{"file": dst.name, "patch_id": custom["patch_id"], "position": custom["position"],
                        "replaces": custom["replaces"], "records": len(vp.manifest.records),
                        "sha256": info.hashes["sha256"], "length": info.length, "target": info.path}
                       for (info, custom, dst), vp in zip(files, verified)]
            digest = hashlib.sha256(json.dumps([e["sha256"] for e in entries]).encode()).hexdigest()
            # The active set on storage is not trusted: unchanged only if every file was reused after
            # its bytes matched the signed hash, and the list is the signed one, in order.
            changed = downloaded > 0 or [e["sha256"] for e in entries] != [p.get("sha256") for p in active.doc.get("patches", [])]
            name = active.name
            if changed:
                doc = {"format": st.SET_FORMAT, "base_sha256": graph.sha256, "digest": digest, "patches": entries,
                       "metadata": meta, "installed": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
                name = st.commit_set(s, staging, doc)
                staging = None
            times["install_s"] = time.perf_counter() - t3
        except PatchVerificationError as exc:
            reason = exc.reason if isinstance(exc, UpdateRefused) else f"certify:{exc.check}"
            _refuse(s, reason, str(exc))
            raise (exc if isinstance(exc, UpdateRefused) else UpdateRefused(reason, f"patch refused ({exc.check}): {exc}")) from None
        except (tuf_exc.RepositoryError, tuf_exc.DownloadLengthMismatchError) as exc:
            _refuse(s, _classify(exc), f"{type(exc).__name__}: {exc}")
            raise UpdateRefused(_classify(exc), f"{_classify(exc)}: {type(exc).__name__}: {exc}") from None
        except (tuf_exc.DownloadError, OSError) as exc:
            _refuse(s, "unavailable", f"{type(exc).__name__}: {exc}")
            raise UpdateUnavailable(f"repository unavailable: {type(exc).__name__}: {exc}") from None
        finally:
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
    result = {"ok": True, "changed": changed, "active_set": name, "patches": [e["patch_id"] for e in entries],
              "downloaded": downloaded, "reused": reused, "metadata": meta, "times": times,
              "time": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
    st.record_outcome(s, {k: result[k] for k in ("ok", "changed", "active_set", "time", "downloaded", "reused", "metadata")})
    return result


def _refuse(state: Path, reason: str, message: str) -> None:
    """Record why the update failed; the active set is untouched."""
    active = None
    with contextlib.suppress(PruneEdgeError):
        active = st.read_active(state).name
    st.record_outcome(state, {"ok": False, "reason": reason, "message": message[:500], "active_set": active,
                              "time": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")})
