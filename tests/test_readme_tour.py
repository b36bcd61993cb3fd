"""README's "A tour of the commands", run as written (issue 14): a newcomer copies it into a shell in an
empty folder and every command succeeds, the samples it writes are what it says, and verify-sample
finds the forgotten training image forgotten under the label the tour gives."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

README = Path(__file__).resolve().parents[1] / "README.md"
SKIPPED = ("prune-edge bench",)  # minutes of benchmarking: tests/test_bench.py covers it


def tour_commands() -> list[str]:
    """The shell lines of the tour's bash block, comments and blank lines included (bash ignores them)."""
    text = README.read_text()
    section = text[text.index("## A tour of the commands"):]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, "README's tour has no bash block"
    return block.group(1).splitlines()


def test_readme_tour_runs_as_written(tmp_path):
    lines = tour_commands()
    kept = [l for l in lines if not l.startswith(SKIPPED)]
    assert len(kept) == len(lines) - 1, "the tour should run everything but bench"
    script = "set -euo pipefail\n" + "\n".join(kept) + "\n"
    bindir = str(Path(sys.executable).parent)  # the prune-edge script of this environment
    env = {**os.environ, "PATH": bindir + os.pathsep + os.environ.get("PATH", "")}
    result = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-3000:]}"

    # the samples are what the tour states: float32 (1, 1, 28, 28) in [0, 1], with the labels it prints
    for line in kept:
        m = re.match(r"prune-edge dataset sample (\S+) (.*)--out (\S+)\s+#.*prints label (\d+)", line)
        if not m:
            continue
        x = np.load(tmp_path / m.group(3))
        assert x.dtype == np.float32 and x.shape == (1, 1, 28, 28) and 0.0 <= x.min() <= x.max() <= 1.0
        split = "test" if "--split test" in m.group(2) else "train"
        index = int(re.search(r"--index (\d+)", m.group(2)).group(1))
        from prune_edge.data import load_dataset

        ds = load_dataset(m.group(1))
        assert int(getattr(ds, f"y_{split}")[index]) == int(m.group(4)), line
        assert np.array_equal(x[0], getattr(ds, f"x_{split}")[index])
    assert "status" in result.stdout and "forgotten" in result.stdout
    # verify-sample's --label is the label the tour printed for mine.npy
    label = re.search(r"--sample mine.npy --label (\d+)", "\n".join(kept)).group(1)
    assert re.search(rf"--index 12 --out mine.npy\s+#.*prints label {label}\b", "\n".join(kept))
