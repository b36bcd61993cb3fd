"""Deletion requests: which training points (split indices) to forget."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .runtime.errors import RequestError
from .runtime.fileio import PathLike, atomic_write_bytes


def read_forget_ids(path: PathLike, n_train: int) -> np.ndarray:
    """Parse a file of training-split indices, one per line ('#' comments and blank lines allowed).

    Refuses an empty request, non-integers, duplicates and out-of-range ids with one line that names
    the file and line, before any work starts.
    """
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise RequestError(f"{p}: cannot read forget ids ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise RequestError(f"{p}: expected a text file of integer ids, found binary data") from None
    ids: list[int] = []
    seen: dict[int, int] = {}
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            value = int(line)
        except ValueError:
            raise RequestError(f"{p}:{lineno}: expected an integer training index, found {line!r}") from None
        if not 0 <= value < n_train:
            raise RequestError(f"{p}:{lineno}: expected an index in [0, {n_train}), found {value}")
        if value in seen:
            raise RequestError(f"{p}:{lineno}: id {value} is a duplicate of line {seen[value]}")
        seen[value] = lineno
        ids.append(value)
    if not ids:
        raise RequestError(f"{p}: expected at least one training index, found none")
    return np.array(ids, dtype=np.int64)


def random_forget_ids(n_train: int, count: int, seed: int) -> np.ndarray:
    """``count`` distinct random training indices (deterministic by seed)."""
    if not 0 < count <= n_train:
        raise RequestError(f"expected 1..{n_train} points to forget, found {count}")
    return np.sort(np.random.default_rng(seed).choice(n_train, size=count, replace=False)).astype(np.int64)


def write_forget_ids(path: PathLike, ids: np.ndarray) -> None:
    """One id per line, the format :func:`read_forget_ids` reads (written atomically)."""
    atomic_write_bytes(path, ("\n".join(str(int(i)) for i in ids) + "\n").encode())
