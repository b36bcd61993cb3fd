"""The device's state folder: what is installed and which set is active, readable without ``tuf``.

Layout (every path relative to the state folder)::

    trust/root.json       the trusted root shipped with the device (the updater's bootstrap; never
                          replaced by an update: newer roots are followed and cached under tuf/)
    base/base.onnx        the device's base model and its card; every patch is checked against them
    base/base.card.json
    policy.json           the device policy (optional; the default policy otherwise)
    tuf/                  tuf.ngclient's metadata cache (root history, timestamp, snapshot, targets)
    sets/<name>/          one installed set: set.json and its patch files, never changed once renamed
    sets/.staging-*       a set being built; left over only by a killed update, removed by the next
    active.json           {"format": ..., "set": "<name>"}: the active set, replaced by one rename
    last_update.json      the outcome of the last update attempt (ok, or why it was refused)

Switching sets is all or nothing: a new set is written in full into a staging folder, fsynced and
renamed to ``sets/<name>``; then ``active.json`` is replaced atomically. A crash before that rename
leaves the previous set active; after it, the new one. ``active.json`` absent means the base alone.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import InputError
from .fileio import PathLike, atomic_write_bytes
from .policy import DEFAULT_POLICY, DevicePolicy

ACTIVE_FORMAT = "prune-edge-state-active/1"
SET_FORMAT = "prune-edge-state-set/1"
TRUST_ROOT = Path("trust") / "root.json"
BASE = Path("base") / "base.onnx"
CARD = Path("base") / "base.card.json"
POLICY = Path("policy.json")
TUF_DIR = Path("tuf")
SETS = Path("sets")
ACTIVE = Path("active.json")
LAST_UPDATE = Path("last_update.json")
STAGING_PREFIX = ".staging-"
_SET_NAME = re.compile(r"^set-[0-9]{6}-[0-9a-f]{12}$")
_PATCH_FILE = re.compile(r"^[0-9]{4}-[0-9a-f]{32}\.pepatch$")


@dataclass(frozen=True)
class ActiveSet:
    """What the device runs now: its base, card, policy and the active set's patches, in order."""

    state: Path
    name: str | None  # None: no set installed, the base alone
    doc: dict[str, Any]  # set.json ({} for the base alone)

    @property
    def base(self) -> Path:
        return self.state / BASE

    @property
    def card(self) -> Path:
        return self.state / CARD

    @property
    def folder(self) -> Path | None:
        return None if self.name is None else self.state / SETS / self.name

    @property
    def patches(self) -> list[Path]:
        """The patch files of the active set, in the order they are applied."""
        if self.folder is None:
            return []
        return [self.folder / p["file"] for p in self.doc["patches"]]

    def policy(self) -> DevicePolicy:
        path = self.state / POLICY
        return DevicePolicy.load(path) if path.exists() else DEFAULT_POLICY


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: expected {what}, found no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise InputError(f"{path}: expected {what} (JSON), found {exc}") from None


def require_provisioned(state: PathLike) -> Path:
    """The state folder, if it holds a trusted root and a base with its card (else one clear error)."""
    s = Path(state)
    for rel, what in ((TRUST_ROOT, "the trusted root shipped with the device"), (BASE, "the device's base model"),
                      (CARD, "the base card")):
        if not (s / rel).is_file():
            raise InputError(f"{s / rel}: expected {what}; provision the state folder first "
                             f"(prune-edge update --root ROOT.json --base BASE.onnx ...)")
    return s


def provision(state: PathLike, root_json: PathLike, base_onnx: PathLike, card: PathLike | None = None,
              policy: PathLike | None = None) -> Path:
    """Put the trusted root, the base (and its card) and the policy into a new state folder.

    An already provisioned folder is left alone unless the same files are given again: the trust
    anchor and the base are the device's, not something an update may change."""
    s = Path(state)
    card = Path(card) if card is not None else Path(base_onnx).with_name(Path(base_onnx).stem + ".card.json")
    pairs = [(Path(root_json), TRUST_ROOT), (Path(base_onnx), BASE), (card, CARD)]
    if policy is not None:
        pairs.append((Path(policy), POLICY))
    for src, rel in pairs:
        if not src.is_file():
            raise InputError(f"{src}: expected a file to provision {rel}, found none")
        dst = s / rel
        data = src.read_bytes()
        if dst.exists():
            if dst.read_bytes() != data:
                raise InputError(f"{dst}: already provisioned with other content; a new trust anchor or base "
                                 f"needs a new state folder")
            continue
        atomic_write_bytes(dst, data)
    if policy is not None:
        DevicePolicy.load(s / POLICY)  # a bad policy is the operator's input error, now
    return s


def read_active(state: PathLike) -> ActiveSet:
    """The active set of a provisioned state folder (the base alone when none was installed)."""
    s = require_provisioned(state)
    if not (s / ACTIVE).exists():
        return ActiveSet(s, None, {})
    doc = _read_json(s / ACTIVE, "the active-set pointer")
    if not isinstance(doc, dict) or doc.get("format") != ACTIVE_FORMAT or not _SET_NAME.fullmatch(str(doc.get("set"))):
        raise InputError(f"{s / ACTIVE}: expected {{'format': {ACTIVE_FORMAT!r}, 'set': 'set-...'}}, found {doc!r:.80}")
    name = doc["set"]
    set_doc = _read_json(s / SETS / name / "set.json", "the active set's set.json")
    entries = set_doc.get("patches") if isinstance(set_doc, dict) else None
    if set_doc.get("format") != SET_FORMAT or not isinstance(entries, list) or not all(
        isinstance(p, dict) and _PATCH_FILE.fullmatch(str(p.get("file"))) for p in entries
    ):
        raise InputError(f"{s / SETS / name / 'set.json'}: expected a {SET_FORMAT} document, found {set_doc!r:.80}")
    return ActiveSet(s, name, set_doc)


def last_update(state: PathLike) -> dict[str, Any] | None:
    path = Path(state) / LAST_UPDATE
    return _read_json(path, "the last update's outcome") if path.exists() else None


def record_outcome(state: PathLike, doc: dict[str, Any]) -> None:
    atomic_write_bytes(Path(state) / LAST_UPDATE, (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode())


def new_staging(state: PathLike) -> Path:
    """A fresh staging folder; leftovers of a killed update are removed first (never a set in use)."""
    sets = Path(state) / SETS
    sets.mkdir(parents=True, exist_ok=True)
    for old in sets.glob(STAGING_PREFIX + "*"):
        shutil.rmtree(old, ignore_errors=True)
    path = sets / f"{STAGING_PREFIX}{os.getpid()}-{time.time_ns()}"
    path.mkdir()
    return path


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit_set(state: PathLike, staging: Path, doc: dict[str, Any], keep: int = 2) -> str:
    """Write ``set.json``, rename the staging folder to a set, then switch ``active.json`` to it.

    The switch is the one ``os.replace`` of ``active.json``: before it the previous set is active,
    after it the new one. Sets beyond the ``keep`` newest are removed afterwards."""
    s = Path(state)
    for f in staging.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    atomic_write_bytes(staging / "set.json", (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode())
    _fsync_dir(staging)
    existing = sorted(p.name for p in (s / SETS).iterdir() if _SET_NAME.fullmatch(p.name))
    serial = int(existing[-1][4:10]) + 1 if existing else 1
    name = f"set-{serial:06d}-{doc['digest'][:12]}"
    os.rename(staging, s / SETS / name)
    _fsync_dir(s / SETS)
    atomic_write_bytes(s / ACTIVE, (json.dumps({"format": ACTIVE_FORMAT, "set": name}) + "\n").encode())
    _fsync_dir(s)
    for old in existing[: max(0, len(existing) + 1 - keep)]:
        shutil.rmtree(s / SETS / old, ignore_errors=True)
    return name


def status(state: PathLike) -> dict[str, Any]:
    """What ``prune-edge status`` prints: base, active set and its patches, metadata versions and expiry."""
    active = read_active(state)
    from ..runtime.fileio import sha256_file

    doc = active.doc
    last = last_update(state)
    # the metadata the device last verified (a successful check refreshes it even if nothing changed)
    metadata = last["metadata"] if last and last.get("ok") and last.get("metadata") else doc.get("metadata", {})
    return {
        "state": str(active.state),
        "base_sha256": sha256_file(active.base),
        "active_set": active.name,
        "patches": [{k: p.get(k) for k in ("patch_id", "position", "records", "sha256", "length", "replaces")}
                    for p in doc.get("patches", [])],
        "metadata": metadata,
        "installed": doc.get("installed"),
        "last_update": last,
    }
