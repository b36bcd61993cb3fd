"""Which records of the patches a device runs together could break each other's certificates.

A record's gate is exactly 1 on its linear region (the inputs whose gated pre-activations have its
sign pattern) and below 1 everywhere else, and one selected record acts (:mod:`.patchgraph`): on a
record's region, a record with its very pattern, gate 1, or one of another group whose gate is 1 there
too. So record A's certificate can only be disturbed where another record B's gate is also 1, i.e. where
both regions meet. Gated tensors are always a suffix of the base's Relu inputs (the base card enforces
it), so of two records one gates on a suffix of the other's tensors, and their regions meet exactly
when their patterns agree on that common suffix (then the longer one's region lies inside the
shorter one's). That is an integer comparison, not an LP: exact, and cheap enough for a device.
Where regions meet, the records must share their target (whichever acts, that target wins).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .errors import InterferenceError
from .manifest import GatedTensor


@dataclass(frozen=True)
class RecordSet:
    """The records of one patch as the check needs them."""

    source: str
    gated: tuple[GatedTensor, ...]
    signs: np.ndarray  # int8 (P, M)
    targets: np.ndarray  # int (P,)


@dataclass(frozen=True)
class Conflict:
    first: tuple[str, int, int]  # (source, record, target)
    second: tuple[str, int, int]

    def message(self) -> str:
        (sa, ra, ta), (sb, rb, tb) = self.first, self.second
        return (
            f"record {rb} of {sb} (target {tb}) gates the region of record {ra} of {sa} (target {ta}): "
            "expected regions of records with different targets to be disjoint"
        )


def find_conflicts(sets: Sequence[RecordSet], limit: int = 1) -> list[Conflict]:
    """Up to ``limit`` pairs of records whose regions meet and whose targets differ, in set order."""
    found: list[Conflict] = []
    suffixes = sorted({s.gated for s in sets}, key=len)
    for short in suffixes:
        m = sum(g.size for g in short)
        # every record gating on `short` or on a longer list ending with it, restricted to `short`
        keys, owners = [], []
        for si, s in enumerate(sets):
            if s.gated[len(s.gated) - len(short):] != short or not len(s.signs):
                continue
            keys.append(np.ascontiguousarray(s.signs[:, s.signs.shape[1] - m:]))
            owners.extend((si, r, s.gated == short) for r in range(len(s.signs)))
        if not keys:
            continue
        rows = np.concatenate(keys)
        _, inverse = np.unique(rows.view(np.dtype((np.void, m))).reshape(-1), return_inverse=True)
        order = np.argsort(inverse.reshape(-1), kind="stable")
        inv = inverse.reshape(-1)[order]
        starts = np.flatnonzero(np.r_[True, inv[1:] != inv[:-1]])
        ends = np.r_[starts[1:], len(inv)]
        for a, b in zip(starts, ends):
            if b - a < 2:
                continue
            members = [owners[i] for i in order[a:b]]
            targets = [int(sets[si].targets[r]) for si, r, _ in members]
            if len(set(targets)) == 1 or not any(exact for _, _, exact in members):
                continue  # same target, or only longer records that may still differ before the suffix
            # a record gating exactly on `short` meets every other record of this group
            for i, (si, ri, exact) in enumerate(members):
                for sj, rj, exact_j in members[i + 1 :]:
                    if (exact or exact_j) and targets[i] != int(sets[sj].targets[rj]):
                        found.append(Conflict((sets[si].source, ri, targets[i]), (sets[sj].source, rj, int(sets[sj].targets[rj]))))
                        if len(found) >= limit:
                            return found
    return found


def check_interference(sets: Sequence[RecordSet]) -> None:
    """Raise :class:`InterferenceError` naming the first conflicting pair, if any."""
    conflicts = find_conflicts(sets)
    if conflicts:
        raise InterferenceError(conflicts[0].message())


def meeting_targets(sets: Sequence[RecordSet], gated: tuple[GatedTensor, ...], signs: np.ndarray) -> list[set[int]]:
    """For each new sign row (gating on ``gated``), the targets of the records in ``sets`` whose
    regions meet its region: a new record there must take that target (or cannot exist)."""
    out: list[set[int]] = [set() for _ in range(len(signs))]
    m_new = signs.shape[1] if signs.ndim == 2 else 0
    for s in sets:
        if not len(s.signs):
            continue
        m_old = s.signs.shape[1]
        if s.gated[len(s.gated) - len(gated):] == gated:  # old gates on a longer (or equal) list
            table: dict[bytes, set[int]] = {}
            for row, target in zip(s.signs[:, m_old - m_new:], s.targets):
                table.setdefault(row.tobytes(), set()).add(int(target))
            for i, row in enumerate(signs):
                out[i] |= table.get(np.ascontiguousarray(row).tobytes(), set())
        elif gated[len(gated) - len(s.gated):] == s.gated:  # old gates on a suffix of the new list
            table = {}
            for row, target in zip(s.signs, s.targets):
                table.setdefault(row.tobytes(), set()).add(int(target))
            for i, row in enumerate(signs):
                out[i] |= table.get(np.ascontiguousarray(row[m_new - m_old:]).tobytes(), set())
        else:  # unrelated tensor lists cannot be proven apart here: treat as meeting
            for i in range(len(signs)):
                out[i] |= {int(t) for t in s.targets}
    return out
