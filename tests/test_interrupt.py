"""Ctrl-C during `build-patch --bounds exact`: a real SIGINT to a real process (issue 14, item 1).

The LPs run in forked workers; an interrupt used to leave the parent waiting on them, or (on a second
Ctrl-C) exit with an atexit traceback and leave them running under PID 1. Now: exit 130 within
seconds, one line on stderr, no patch file and no worker left behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from prune_edge.requests import write_forget_ids

N_IDS = 40  # enough regions that the LPs run for several seconds


def _children(pid: int) -> set[int]:
    """Pids whose parent is ``pid`` (from /proc, so no psutil needed)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            # /proc/PID/stat: "pid (comm) state ppid ..."; comm may hold spaces, so split after ')'.
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.add(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    """Whether ``pid`` still runs (a zombie awaiting its reaper counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc").is_dir() or sys.platform != "linux", reason="needs Linux /proc and fork")
def test_sigint_during_exact_lps_exits_130_and_leaves_nothing(mlp_base, tmp_path):
    forget = tmp_path / "forget.txt"
    write_forget_ids(forget, list(range(N_IDS)))
    out = tmp_path / "p.pepatch"
    proc = subprocess.Popen(
        [sys.executable, "-m", "prune_edge.cli", "build-patch", "--base", str(mlp_base), "--forget", str(forget),
         "--bounds", "exact", "--device", "cpu", "--out", str(out), "--json"],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        # A shell's background job inherits SIGINT ignored; the CLI must see it as a terminal user would.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        workers: set[int] = set()
        deadline = time.monotonic() + 120
        while not workers and proc.poll() is None and time.monotonic() < deadline:
            workers = _children(proc.pid)
            time.sleep(0.05)
        assert workers, "the LP workers never started"
        time.sleep(1.0)  # well inside the LPs: every worker is busy in HiGHS
        workers |= _children(proc.pid)
        assert proc.poll() is None, "the build finished before the interrupt; raise N_IDS"

        start = time.monotonic()
        os.kill(proc.pid, signal.SIGINT)
        time.sleep(0.2)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGINT)  # an impatient second Ctrl-C must not hang or add a traceback
        _, err = proc.communicate(timeout=5)
        elapsed = time.monotonic() - start
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    assert proc.returncode == 130, err
    assert elapsed < 5
    assert "Traceback" not in err and "Aborted" not in err
    assert err.strip().splitlines() == ["interrupted"]
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["forget.txt"]  # no temp file, no request record
    time.sleep(0.2)
    assert not [pid for pid in workers if _alive(pid)], "LP workers outlived the interrupted build"
