"""Small file helpers shared by every layer: atomic writes and digests.

A crash or a refused input must never leave a half-written model, patch or array behind, so every
writer goes through :func:`atomic_write_bytes` (temp file in the same folder, fsync, rename).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Iterator, Union

PathLike = Union[str, "os.PathLike[str]"]


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: PathLike) -> str:
    """Hex sha256 of a file, streamed so large bases do not need to fit in memory twice."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def current_umask() -> int:
    """The process umask, read without changing it where the OS tells (Linux), else set and restored."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path: PathLike, folder: bool = False) -> None:
    """Give a file or folder made by ``mkstemp``/``mkdtemp`` (always 0600/0700) the mode a plain
    ``open``/``mkdir`` would have given it, so outputs follow the user's umask like any other tool's."""
    os.chmod(path, (0o777 if folder else 0o666) & ~current_umask())


@contextlib.contextmanager
def atomic_path(path: PathLike, secret: bool = False) -> Iterator[Path]:
    """Yield a temp path beside ``path``; rename it onto ``path`` only if the block succeeds.

    The result gets the user's umask like any file they create, unless ``secret`` (then 0600)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        if secret:
            os.chmod(tmp_path, 0o600)
        else:
            apply_umask(tmp_path)
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_bytes(path: PathLike, data: bytes, secret: bool = False) -> Path:
    """Write ``data`` to ``path`` atomically and return the path (mode 0600 if ``secret``)."""
    with atomic_path(path, secret=secret) as tmp:
        tmp.write_bytes(data)
    return Path(path)
