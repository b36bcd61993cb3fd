"""The server's record of deletion requests: which training ids each patch forgets, and the salt.

A patch file carries only the Merkle root of the salted commitments of the ids it forgets (see
``runtime.merkle``); the ids themselves and the salt that opens the commitments are what a data
holder's request and an auditor need, and what must never reach a device. :func:`id_proof` gives one
data holder what proves their id is in a patch (their salt and audit path), and no other id. They live here, in a ledger folder on the server
(default: ``ledger/`` inside the base folder), one JSON file per patch, readable by the server's
operator only (folder 0700, files 0600, whatever the umask). Nothing in the ledger is written beside
a patch file, so shipping a folder of patches cannot ship the requests with it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

from .runtime.errors import RequestError
from .runtime.fileio import PathLike, atomic_write_bytes
from .runtime.merkle import ids_root, inclusion_proof

LEDGER_DIRNAME = "ledger"
ENTRY_SUFFIX = ".request.json"
LEDGER_FORMAT = "prune-edge-ledger/1"


def default_ledger(base_dir: PathLike) -> Path:
    """The ledger of a base folder: requests are bound to the base their patches are bound to."""
    return Path(base_dir) / LEDGER_DIRNAME


def entry_path(ledger: PathLike, patch_id: str) -> Path:
    return Path(ledger) / f"{patch_id}{ENTRY_SUFFIX}"


def _secret_dir(path: Path) -> None:
    """Create ``path`` (and parents) and make the ledger folder itself private: it holds the salts."""
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)


def record_request(ledger: PathLike, entry: dict[str, Any]) -> Path:
    """Write one patch's request record atomically (0600) and return its path.

    ``entry`` must name the ``patch_id``; an existing record for the same id is replaced (the id is
    derived from the patch's content, so the same id means the same patch)."""
    folder = Path(ledger)
    _secret_dir(folder)
    doc = {"format": LEDGER_FORMAT, **entry}
    return atomic_write_bytes(entry_path(folder, entry["patch_id"]), (json.dumps(doc, indent=1) + "\n").encode(), secret=True)


def read_entry(path: PathLike) -> dict[str, Any]:
    """One ledger record, checked to be a ledger record (a clear error names the file otherwise)."""
    p = Path(path)
    try:
        doc = json.loads(p.read_text())
    except FileNotFoundError:
        raise RequestError(f"{p}: expected a ledger record, found no file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RequestError(f"{p}: expected a ledger record (JSON), found {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != LEDGER_FORMAT:
        raise RequestError(f"{p}: expected format {LEDGER_FORMAT!r}, found {doc.get('format') if isinstance(doc, dict) else type(doc).__name__}")
    return doc


def lookup(ledger: PathLike, patch_id: str) -> dict[str, Any]:
    """The record of ``patch_id`` (raises ``RequestError`` naming the ledger if there is none)."""
    return read_entry(entry_path(ledger, patch_id))


def entries(ledger: PathLike) -> Iterator[dict[str, Any]]:
    """Every record in the ledger, oldest chain position first (then by patch id): the per-base index
    of what has been forgotten, which a new request is checked against."""
    folder = Path(ledger)
    if not folder.is_dir():
        return iter(())
    docs = [read_entry(p) for p in sorted(folder.glob(f"*{ENTRY_SUFFIX}"))]
    return iter(sorted(docs, key=lambda d: (d.get("chain", {}).get("position", 0), d["patch_id"])))


def forgotten_ids(ledger: PathLike) -> dict[int, str]:
    """Training id -> the patch id that forgets it (first in chain order), over the whole ledger."""
    out: dict[int, str] = {}
    for doc in entries(ledger):
        for i in doc.get("ids", []):
            out.setdefault(int(i), doc["patch_id"])
    return out


def id_proof(ledger: PathLike, patch_id: str, i: int) -> dict[str, Any]:
    """An inclusion proof that training id ``i`` is among the ids patch ``patch_id`` forgets: the id,
    the request's salt, the root the manifest carries and the audit path (``runtime.merkle.verify_id``
    checks it). It reveals the salt of that request, so it goes to the data holder of ``i`` only.
    Raises ``RequestError`` naming the patch if the id is not in its request."""
    doc = lookup(ledger, patch_id)
    ids = [int(x) for x in doc.get("ids", [])]
    if "id_salt" not in doc or int(i) not in ids:
        raise RequestError(f"ledger record {patch_id}: expected id {i} among its {len(ids)} point ids, found it absent")
    salt = bytes.fromhex(doc["id_salt"])
    return {"patch_id": patch_id, "id": int(i), "salt": doc["id_salt"], "root": ids_root(ids, salt),
            **inclusion_proof(ids, salt, int(i))}
