"""README points only at files that are in the repository (issue 14): every link and every file path it
names in backticks exists, and nothing refers to a folder outside the checkout."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "THREAT_MODEL.md", ROOT / "models" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TOP = {p.name for p in ROOT.iterdir()} - {".git", ".venv"}


def named_paths(text: str) -> set[str]:
    """Repository paths a reader is told to open: markdown link targets that are not URLs, and backticked
    tokens that start at a top-level entry of the repository and end in a file suffix, and any
    backticked upper-case ``*.md`` such as ``THREAT_MODEL.md`` (a document meant to be in the repository;
    lower-case names like ``report.md`` are files commands write)."""
    links = {m for m in re.findall(r"\]\(([^)\s]+)\)", text) if not re.match(r"[a-z]+://", m)}
    ticks = {m for m in re.findall(r"`([\w./-]+\.(?:py|md|toml|sh|json))`", text)
             if m.split("/")[0] in TOP or ("/" not in m and m.endswith(".md") and m[:-3].isupper())}
    return links | ticks


def test_readme_names_only_files_that_exist():
    for doc in DOCS:
        text = doc.read_text()
        assert "../" not in text, f"{doc.name} refers to a folder outside the repository"
        missing = sorted(p for p in named_paths(text) if not (ROOT / p.split("#")[0]).exists())
        assert not missing, f"{doc.name} names files that are not in the repository: {missing}"


def test_the_check_sees_the_files_it_should():
    """The extraction is not vacuous: README's own references to the method note and the policy are found."""
    found = named_paths((ROOT / "README.md").read_text())
    assert {"docs/method.md", "runtime/policy.py", "examples/two_sessions.py", "THREAT_MODEL.md"} <= found
