"""THREAT_MODEL.md cites a test for every attack; each cited test must exist and be collected by pytest
(not skipped away at import, not renamed), so the map from attacks to evidence cannot rot."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CITATION = re.compile(r"tests/(test_\w+\.py)::(test_\w+)")


def _attack_rows(text: str) -> list[str]:
    """The rows of the attacks table (lines starting with '| <number> |')."""
    return [line for line in text.splitlines() if re.match(r"^\|\s*\d+\s*\|", line)]


def _collected(files: set[str], session_items) -> set[str]:
    """``file::function`` of every test pytest collects in ``files``: taken from this session when it
    collected them (the full suite), else from ``pytest --collect-only`` on just those files."""
    seen = {item.nodeid.split("[")[0].replace("tests/", "", 1) for item in session_items}
    missing = {f for f in files if not any(s.startswith(f + "::") for s in seen)}
    if missing:
        res = subprocess.run(
            [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
             *[f"tests/{f}" for f in sorted(missing)]],
            cwd=ROOT, capture_output=True, text=True, timeout=600,
        )
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
        seen |= {line.split("[")[0].replace("tests/", "", 1) for line in res.stdout.splitlines() if "::" in line}
    return seen


def test_every_attack_cites_a_collected_test(request):
    text = (ROOT / "THREAT_MODEL.md").read_text()
    rows = _attack_rows(text)
    assert len(rows) >= 15, "expected the attacks table"
    for row in rows:
        assert CITATION.search(row), f"attack without a cited test: {row[:80]}"
    cited = {f"{f}::{t}" for f, t in CITATION.findall(text)}
    collected = _collected({c.split("::")[0] for c in cited}, request.session.items)
    absent = sorted(c for c in cited if c not in collected)
    assert not absent, f"THREAT_MODEL.md cites tests that pytest does not collect: {absent}"


def test_the_issue_attacks_are_all_covered():
    """The attacks issue 12 lists, each named in the table."""
    table = "\n".join(_attack_rows((ROOT / "THREAT_MODEL.md").read_text())).lower()
    for word in ("another base", "tampered", "truncated", "edited graph", "backdoor outside the gates", "rollback",
                 "freeze", "mix-and-match", "endless data", "key not in root", "revoked", "ships no patch",
                 "misses the point"):
        assert word in table, word
