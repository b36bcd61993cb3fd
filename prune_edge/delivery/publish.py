"""Publishing (server): a TUF repository of bases, base cards and patches, kept with python-tuf's Metadata API.

Layout of a repository folder (what a static web server serves)::

    repo.json                       expiry per role (days); no key material, ever
    metadata/<N>.root.json          every root version (devices walk the chain to follow rotations)
    metadata/<N>.targets.json       consistent snapshots: a device fetches exactly the versions the
    metadata/<N>.snapshot.json      timestamp and snapshot name, so metadata cannot be mixed
    metadata/timestamp.json
    targets/<dir>/<sha256>.<name>   target files, named by their hash (never overwritten)

Targets, each with a ``custom["prune_edge"]`` block the device cross-checks against the file itself:
``bases/<base sha256>/base.onnx`` and ``.../base.card.json``; ``patches/<patch id>.pepatch`` (base
sha256, chain position, the ids it comes after and replaces, records); and ``index/<base sha256>.json``,
the ordered list of patches a device on that base runs (a patch named in another's ``replaces`` leaves
it). Keys are Ed25519 private keys in PEM files the operator names on each command; a key file inside
the repository folder is refused, so nothing signs with a key the repository host holds.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

from cryptography.hazmat.primitives.serialization import load_pem_private_key
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata, MetaFile, Root, Snapshot, TargetFile, Targets, Timestamp
from tuf.api.serialization.json import JSONSerializer

from ..runtime.base import BaseGraph
from ..runtime.basecard import card_path_for
from ..runtime.errors import InputError
from ..runtime.fileio import PathLike, atomic_write_bytes
from ..runtime.patchfile import read_patch_file
from ..runtime.policy import DEFAULT_POLICY, DevicePolicy
from ..runtime.verify import check_patch_set, verify_patch

ROLES = ("root", "targets", "snapshot", "timestamp")
REPO_FORMAT = "prune-edge-tuf-repo/1"
# Short-lived roles are re-signed often by an online key; root rarely, offline. A device refuses any
# metadata past its expiry, so a frozen mirror is noticed within the timestamp's lifetime.
DEFAULT_EXPIRES_DAYS = {"root": 365, "targets": 90, "snapshot": 7, "timestamp": 1}
CUSTOM = "prune_edge"
_SERIALIZER = JSONSerializer(compact=False)


# ----------------------------------------------------------------------------- keys
def generate_key(path: PathLike) -> str:
    """Write a new Ed25519 private key (PEM, PKCS8, mode 0600) to ``path``; return its key id."""
    p = Path(path)
    if p.exists():
        raise InputError(f"{p}: expected a new key file, found an existing file (never overwritten)")
    signer = CryptoSigner.generate_ed25519()
    p.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(signer.private_bytes)
    return signer.public_key.keyid


def load_signer(path: PathLike, repo: PathLike | None = None) -> CryptoSigner:
    """An Ed25519 signer from a PEM key file the operator names (never one inside ``repo``)."""
    p = Path(path)
    if repo is not None and Path(repo).resolve() in p.resolve().parents:
        raise InputError(f"{p}: key files must live outside the repository folder (its host must not hold keys)")
    try:
        key = load_pem_private_key(p.read_bytes(), None)
    except OSError as exc:
        raise InputError(f"{p}: cannot read key file ({exc.strerror or exc})") from None
    except (ValueError, TypeError) as exc:
        raise InputError(f"{p}: expected an unencrypted PEM private key, found {exc}") from None
    try:
        return CryptoSigner(key)
    except ValueError as exc:
        raise InputError(f"{p}: expected an Ed25519 key, found {exc}") from None


# ----------------------------------------------------------------------------- repository files
def _utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0)


def _meta_dir(repo: Path) -> Path:
    return repo / "metadata"


def _config(repo: Path) -> dict[str, Any]:
    try:
        doc = json.loads((repo / "repo.json").read_text())
    except FileNotFoundError:
        raise InputError(f"{repo}: expected a repository made by 'prune-edge repo init', found no repo.json") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"{repo / 'repo.json'}: expected JSON, found {exc}") from None
    if doc.get("format") != REPO_FORMAT:
        raise InputError(f"{repo / 'repo.json'}: expected format {REPO_FORMAT!r}, found {doc.get('format')!r}")
    return doc


def _write(repo: Path, name: str, md: Metadata) -> None:
    atomic_write_bytes(_meta_dir(repo) / name, md.to_bytes(_SERIALIZER))


def _load(repo: Path, name: str) -> Metadata:
    return Metadata.from_file(str(_meta_dir(repo) / name))


def root_versions(repo: PathLike) -> list[int]:
    return sorted(int(p.name.split(".")[0]) for p in _meta_dir(Path(repo)).glob("*.root.json"))


def current(repo: PathLike) -> dict[str, Metadata]:
    """The newest root, and the targets/snapshot/timestamp the current timestamp names."""
    r = Path(repo)
    _config(r)
    ts = _load(r, "timestamp.json")
    snap = _load(r, f"{ts.signed.snapshot_meta.version}.snapshot.json")
    targets = _load(r, f"{snap.signed.meta['targets.json'].version}.targets.json")
    return {"root": _load(r, f"{root_versions(r)[-1]}.root.json"), "targets": targets, "snapshot": snap, "timestamp": ts}


def _expiry(config: Mapping[str, Any], role: str, now: datetime) -> datetime:
    return now + timedelta(days=float(config["expires_days"][role]))


def _sign(md: Metadata, role: str, root: Root, key_files: Sequence[PathLike], repo: Path, append: bool = False) -> None:
    """Sign with each key file, after checking it is a key of ``role`` in ``root``; then demand the
    role's threshold is met (the device would refuse anything less)."""
    if not append:
        md.signatures.clear()
    for f in key_files:
        signer = load_signer(f, repo)
        keyid = signer.public_key.keyid
        if keyid not in root.roles[role].keyids:
            raise InputError(f"{f}: key {keyid[:16]}... is not a {role} key of root v{root.version}")
        md.sign(signer, append=True)
    result = root.get_verification_result(role, md.signed_bytes, md.signatures)
    if not result.verified:
        raise InputError(f"{role}: signed by {len(result.signed)} of the {result.threshold} keys root v{root.version} "
                         f"requires; name more --key {role}=FILE")


def _roll(repo: Path, root: Root, config: Mapping[str, Any], keys: Mapping[str, Sequence[PathLike]],
          targets: Targets, prev_snapshot: int, prev_timestamp: int, now: datetime, bump: bool = True) -> dict[str, int]:
    """Sign and write new targets, snapshot and timestamp (in that order: a device reading the old
    timestamp meanwhile still finds every file it names)."""
    for role in ("targets", "snapshot", "timestamp"):
        if not keys.get(role):
            raise InputError(f"publishing needs the {role} key: --key {role}=FILE")
    targets.version += int(bump)
    targets.expires = _expiry(config, "targets", now)
    t_md = Metadata(targets)
    _sign(t_md, "targets", root, keys["targets"], repo)
    snapshot = Snapshot(version=prev_snapshot + 1, expires=_expiry(config, "snapshot", now),
                        meta={"targets.json": MetaFile(version=targets.version)})
    s_md = Metadata(snapshot)
    _sign(s_md, "snapshot", root, keys["snapshot"], repo)
    s_bytes = s_md.to_bytes(_SERIALIZER)
    timestamp = Timestamp(version=prev_timestamp + 1, expires=_expiry(config, "timestamp", now),
                          snapshot_meta=MetaFile.from_data(snapshot.version, s_bytes, ["sha256"]))
    ts_md = Metadata(timestamp)
    _sign(ts_md, "timestamp", root, keys["timestamp"], repo)
    _write(repo, f"{targets.version}.targets.json", t_md)
    atomic_write_bytes(_meta_dir(repo) / f"{snapshot.version}.snapshot.json", s_bytes)
    _write(repo, "timestamp.json", ts_md)  # last: the switch for every device
    return {"targets": targets.version, "snapshot": snapshot.version, "timestamp": timestamp.version}


def _check_keys(keys: Mapping[str, Sequence[PathLike]]) -> None:
    unknown = sorted(set(keys) - set(ROLES))
    if unknown:
        raise InputError(f"--key: expected roles from {list(ROLES)}, found {unknown}")


# ----------------------------------------------------------------------------- commands
def init_repo(repo: PathLike, keys: Mapping[str, Sequence[PathLike]], thresholds: Mapping[str, int] | None = None,
              expires_days: Mapping[str, float] | None = None, now: datetime | None = None) -> dict[str, Any]:
    """Create an empty repository: root v1 naming each role's keys and threshold, empty targets."""
    r = Path(repo)
    _check_keys(keys)
    if (r / "repo.json").exists() or (_meta_dir(r).exists() and any(_meta_dir(r).iterdir())):
        raise InputError(f"{r}: expected a new repository folder, found an existing repository")
    missing = [role for role in ROLES if not keys.get(role)]
    if missing:
        raise InputError(f"repo init needs keys for every role, missing {missing} (--key ROLE=FILE)")
    days = {**DEFAULT_EXPIRES_DAYS, **(expires_days or {})}
    thresholds = {role: 1 for role in ROLES} | dict(thresholds or {})
    for role, t in thresholds.items():
        if role not in ROLES or not 1 <= t <= len(keys[role]):
            raise InputError(f"threshold {role}={t}: expected a role with 1 <= threshold <= its {len(keys.get(role, []))} keys")
    now = now or _utcnow()
    config = {"format": REPO_FORMAT, "expires_days": days}
    root = Root(expires=_expiry(config, "root", now), consistent_snapshot=True)
    for role in ROLES:
        for f in keys[role]:
            root.add_key(load_signer(f, r).public_key, role)
        root.roles[role].threshold = thresholds[role]
    root_md = Metadata(root)
    _sign(root_md, "root", root, keys["root"], r)
    _meta_dir(r).mkdir(parents=True, exist_ok=True)
    (r / "targets").mkdir(exist_ok=True)
    _write(r, "1.root.json", root_md)
    versions = _roll(r, root, config, keys, Targets(version=1, expires=_expiry(config, "targets", now)), 0, 0, now,
                     bump=False)
    atomic_write_bytes(r / "repo.json", (json.dumps(config, indent=1) + "\n").encode())
    return {"repo": str(r), "root_version": 1, **versions,
            "keys": {role: list(root.roles[role].keyids) for role in ROLES}}


def _add_target(repo: Path, targets: Targets, path: str, data: bytes, custom: dict[str, Any]) -> TargetFile:
    tf = TargetFile.from_data(path, data, ["sha256"])
    tf.unrecognized_fields["custom"] = {CUSTOM: custom}
    d, _, name = path.rpartition("/")
    atomic_write_bytes(repo / "targets" / d / f"{tf.hashes['sha256']}.{name}", data)
    targets.targets[path] = tf
    return tf


def _index_path(base_sha256: str) -> str:
    return f"index/{base_sha256}.json"


def publish(repo: PathLike, keys: Mapping[str, Sequence[PathLike]], base: PathLike | None = None,
            patches: Sequence[PathLike] = (), *, check: bool = True, policy: DevicePolicy = DEFAULT_POLICY,
            now: datetime | None = None) -> dict[str, Any]:
    """Add a base (and its card) and patches for it, then re-sign targets, snapshot and timestamp.

    With ``check`` (the CLI always), each patch must pass every certify check against the base and the
    new set the set checks, before anything is signed: the server never signs what a device refuses.
    With no base and no patch this only renews the metadata (a fresh timestamp: devices notice a
    repository that stops doing this)."""
    r = Path(repo)
    _check_keys(keys)
    config = _config(r)
    cur = current(r)
    root: Root = cur["root"].signed
    targets: Targets = cur["targets"].signed
    now = now or _utcnow()
    added: list[str] = []
    if patches and base is None:
        raise InputError("--patch needs --base: a patch is published for the base it is bound to")
    if base is not None:
        graph = BaseGraph.load(base)
        card = card_path_for(base)
        graph.card  # the card must exist and describe this base
        sha = graph.sha256
        _add_target(r, targets, f"bases/{sha}/base.onnx", graph.data, {"kind": "base", "base_sha256": sha})
        _add_target(r, targets, f"bases/{sha}/base.card.json", Path(card).read_bytes(), {"kind": "card", "base_sha256": sha})
        index_tf = targets.targets.get(_index_path(sha))
        entries: list[dict[str, Any]] = []
        if index_tf is not None:
            d, _, name = index_tf.path.rpartition("/")
            entries = json.loads((r / "targets" / d / f"{index_tf.hashes['sha256']}.{name}").read_text())["patches"]
        files = []
        for p in patches:
            pf = read_patch_file(p)
            m = pf.manifest
            if m.base_sha256 != sha:
                raise InputError(f"{p}: bound to base {m.base_sha256[:16]}..., not the given base {sha[:16]}...")
            files.append((p, pf, m))
        if check:
            verified = [verify_patch(p, graph, policy) for p, _, _ in files]
            new_ids = {m.patch_id for _, _, m in files}
            replaced = {rid for _, _, m in files for rid in m.chain["replaces"]}
            kept = [e for e in entries if e["patch_id"] not in replaced and e["patch_id"] not in new_ids]
            old = [verify_patch(r / "targets" / "patches" / e["stored"], graph, policy) for e in kept]
            check_patch_set(old + verified, policy)
        for p, pf, m in files:
            path = f"patches/{m.patch_id}.pepatch"
            custom = {"kind": "patch", "patch_id": m.patch_id, "base_sha256": m.base_sha256,
                      "position": m.chain["position"], "after": m.chain["after"], "replaces": m.chain["replaces"],
                      "records": len(m.records)}
            tf = _add_target(r, targets, path, Path(p).read_bytes(), custom)
            replaced = set(m.chain["replaces"])
            entries = [e for e in entries if e["patch_id"] not in replaced and e["patch_id"] != m.patch_id]
            entries.append({"patch_id": m.patch_id, "path": path, "position": m.chain["position"],
                            "stored": f"{tf.hashes['sha256']}.{m.patch_id}.pepatch"})
            for rid in replaced:  # a replaced patch is withdrawn: no device may fetch it any more
                targets.targets.pop(f"patches/{rid}.pepatch", None)
            added.append(m.patch_id)
        entries.sort(key=lambda e: e["position"])  # stable: publication order within a position
        index = {"format": "prune-edge-index/1", "base_sha256": sha, "patches": entries}
        _add_target(r, targets, _index_path(sha), (json.dumps(index, indent=1, sort_keys=True) + "\n").encode(),
                    {"kind": "index", "base_sha256": sha})
    versions = _roll(r, root, config, keys, targets, cur["snapshot"].signed.version, cur["timestamp"].signed.version, now)
    return {"repo": str(r), "added": added, **versions}


def rotate_root(repo: PathLike, root_keys: Sequence[PathLike], new_keys: Mapping[str, Sequence[PathLike]],
                keys: Mapping[str, Sequence[PathLike]] | None = None, thresholds: Mapping[str, int] | None = None,
                now: datetime | None = None) -> dict[str, Any]:
    """Write root v(N+1) that gives each role in ``new_keys`` exactly those keys (revoking its old
    ones), signed by a threshold of root vN's keys and, when root's own keys change, of the new ones
    too (the device demands both). Then, if an online role changed, re-sign targets, snapshot and
    timestamp with ``keys`` (the new key for a rotated role), so no device sees a gap."""
    r = Path(repo)
    _check_keys(new_keys)
    _check_keys(keys or {})
    config = _config(r)
    cur = current(r)
    old_root: Root = cur["root"].signed
    root = Root.from_dict(json.loads(json.dumps(old_root.to_dict())))
    now = now or _utcnow()
    for role, files in new_keys.items():
        if not files:
            continue
        for keyid in list(root.roles[role].keyids):
            root.revoke_key(keyid, role)
        for f in files:
            root.add_key(load_signer(f, r).public_key, role)
    for role, t in (thresholds or {}).items():
        root.roles[role].threshold = t
    for role in ROLES:
        if not 1 <= root.roles[role].threshold <= len(root.roles[role].keyids):
            raise InputError(f"threshold {role}={root.roles[role].threshold}: expected 1..{len(root.roles[role].keyids)}")
    root.version += 1
    root.expires = _expiry(config, "root", now)
    md = Metadata(root)
    old_signers = [f for f in root_keys if load_signer(f, r).public_key.keyid in old_root.roles["root"].keyids]
    _sign(md, "root", old_root, old_signers, r)  # the old root's threshold ...
    if new_keys.get("root"):
        _sign(md, "root", root, new_keys["root"], r, append=True)  # ... and the new one's
    else:
        _sign(md, "root", root, old_signers, r, append=True)
    resign = any(new_keys.get(role) for role in ("targets", "snapshot", "timestamp"))
    signing = {role: list(new_keys.get(role) or (keys or {}).get(role, [])) for role in ("targets", "snapshot", "timestamp")}
    if resign and not all(signing.values()):  # checked before anything is written
        missing = [role for role, f in signing.items() if not f]
        raise InputError(f"rotating an online role re-signs targets, snapshot and timestamp: name --key for {missing}")
    _write(r, f"{root.version}.root.json", md)
    out: dict[str, Any] = {"repo": str(r), "root_version": root.version,
                           "rotated": sorted(role for role, f in new_keys.items() if f)}
    if resign:
        out.update(_roll(r, root, config, signing, cur["targets"].signed, cur["snapshot"].signed.version,
                         cur["timestamp"].signed.version, now))
    return out
