"""The patch-file container: a zip holding exactly ``manifest.json`` and ``patch.onnx``.

Reading follows a fixed order and trusts nothing early (python-tuf style): size cap, container,
member names and sizes, manifest JSON and format version, then the graph digest. ONNX bytes are parsed
only after their sha256 matched the manifest (that happens in :mod:`.verify`).
"""

from __future__ import annotations

import io
import json
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from .errors import IntegrityError, PatchFormatError
from .fileio import PathLike, sha256_bytes
from .manifest import FORMAT_VERSION, Manifest

MANIFEST_NAME = "manifest.json"
GRAPH_NAME = "patch.onnx"
PATCH_SUFFIX = ".pepatch"
MAX_PATCH_BYTES = 64 << 20
MAX_MANIFEST_BYTES = 16 << 20
# Fixed zip timestamp: the same patch content always gives the same file bytes.
_ZIP_TIME = (2020, 1, 1, 0, 0, 0)
# zlib levels, part of the canonical encoding (see unpack). The graph: level 1, measured on 20-point
# patches 8-10x faster than level 6 (whose lazy matching is slow on sign tables; ~0.3 ms of a ~3 ms
# collapse build) for files 10-15% larger; its bulk is the bit-packed signs, which no level shrinks
# much (200 points: 5% at level 6). The manifest: level 6, 16% smaller than level 1 on a 200-point prune
# manifest (11.9 -> 10.0 KB of decimal bounds) for ~1 ms.
_DEFLATE_LEVEL = 1
_MANIFEST_DEFLATE_LEVEL = 6


@dataclass(frozen=True)
class PatchFile:
    """A patch file whose container, manifest and graph digest have been checked."""

    manifest: Manifest
    graph_bytes: bytes
    signatures: tuple[dict, ...]
    size: int


def pack(manifest: Manifest, graph_bytes: bytes, signatures: list[dict] | None = None) -> bytes:
    """Serialise a patch file. Deterministic for a given manifest and graph."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=_DEFLATE_LEVEL) as zf:
        for name, data, level in (
            (MANIFEST_NAME, json.dumps(manifest.envelope(signatures), sort_keys=True, separators=(",", ":")).encode(),
             _MANIFEST_DEFLATE_LEVEL),
            (GRAPH_NAME, graph_bytes, _DEFLATE_LEVEL),
        ):
            info = zipfile.ZipInfo(name, date_time=_ZIP_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, data, compresslevel=level)
    return buf.getvalue()


def unpack(data: bytes, source: str = "patch") -> PatchFile:
    """Check a patch file's container, manifest and graph digest; return its parts."""
    if len(data) > MAX_PATCH_BYTES:
        raise PatchFormatError(f"{source}: expected at most {MAX_PATCH_BYTES} bytes, found {len(data)}")
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, OSError, ValueError, zlib.error, NotImplementedError) as exc:
        raise PatchFormatError(f"{source}: expected a patch file (zip container), found unreadable bytes ({exc})") from None
    with zf:
        infos = zf.infolist()
        names = [i.filename for i in infos]
        if sorted(names) != sorted([MANIFEST_NAME, GRAPH_NAME]):
            raise PatchFormatError(f"{source}: expected exactly members {[MANIFEST_NAME, GRAPH_NAME]}, found {names}")
        caps = {MANIFEST_NAME: MAX_MANIFEST_BYTES, GRAPH_NAME: MAX_PATCH_BYTES}
        for info in infos:
            if info.file_size > caps[info.filename] or info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                raise PatchFormatError(
                    f"{source}: member {info.filename} expected <= {caps[info.filename]} bytes stored or deflated, "
                    f"found {info.file_size} bytes with compression {info.compress_type}"
                )
        try:
            manifest_raw = zf.read(MANIFEST_NAME)
            graph = zf.read(GRAPH_NAME)
        except (zipfile.BadZipFile, OSError, ValueError, EOFError, RuntimeError, zlib.error, NotImplementedError) as exc:
            raise PatchFormatError(f"{source}: container is corrupt ({exc})") from None
    try:
        envelope = json.loads(manifest_raw.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, json.JSONDecodeError, ValueError) as exc:
        raise PatchFormatError(f"{source}: {MANIFEST_NAME} expected valid JSON, found {exc}") from None
    except RecursionError:
        # json's scanner recurses per nesting level; the format nests 5 deep
        raise PatchFormatError(f"{source}: {MANIFEST_NAME} expected JSON nested a few levels, found nesting too deep to read") from None
    if not isinstance(envelope, dict) or set(envelope) != {"signed", "signatures"}:
        found = sorted(envelope) if isinstance(envelope, dict) else type(envelope).__name__
        raise PatchFormatError(f"{source}: {MANIFEST_NAME} expected keys ['signatures', 'signed'], found {found}")
    signatures = envelope["signatures"]
    if not isinstance(signatures, list) or signatures:
        # The slot exists from format 1 on; signed patches need a trust store (a later format).
        raise PatchFormatError(
            f"{source}: expected an empty signatures list in format {FORMAT_VERSION}, found {signatures!r:.60}"
        )
    try:
        manifest = Manifest.from_json(envelope["signed"])
    except PatchFormatError as exc:
        raise PatchFormatError(f"{source}: {exc}") from None
    if len(graph) != manifest.graph_bytes or sha256_bytes(graph) != manifest.graph_sha256:
        raise IntegrityError(
            f"{source}: {GRAPH_NAME} expected sha256 {manifest.graph_sha256[:16]}... ({manifest.graph_bytes} bytes), "
            f"found {sha256_bytes(graph)[:16]}... ({len(graph)} bytes)"
        )
    # One patch, one byte string: zip fields the reader would otherwise ignore (timestamps, padding,
    # trailing junk) must be exactly what the writer produces.
    if pack(manifest, graph, signatures) != data:
        raise PatchFormatError(f"{source}: expected the canonical container encoding, found extra or altered zip fields")
    return PatchFile(manifest=manifest, graph_bytes=graph, signatures=tuple(signatures), size=len(data))


def _reject_constant(name: str) -> None:
    raise ValueError(f"non-finite number {name}")


def read_patch_file(path: PathLike) -> PatchFile:
    """Read and check a patch file from disk (size-capped before reading it whole)."""
    p = Path(path)
    try:
        size = p.stat().st_size
        if size > MAX_PATCH_BYTES:
            raise PatchFormatError(f"{p.name}: expected at most {MAX_PATCH_BYTES} bytes, found {size}")
        data = p.read_bytes()
    except OSError as exc:
        raise PatchFormatError(f"{p.name}: cannot read patch file ({exc.strerror or exc})") from None
    return unpack(data, source=p.name)
