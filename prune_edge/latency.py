"""Latency of onnxruntime sessions, measured the same way for base and base+patches."""

from __future__ import annotations

import time

import numpy as np


def compare_latency(
    base_model, patched_model, x: np.ndarray, blocks: int = 30, block: int = 25, min_seconds: float = 1.0
) -> dict[str, float]:
    """Latency of ``base_model.logits(x)`` against ``patched_model.logits(x)``.

    The two alternate in blocks of ``block`` calls, so both see the same machine noise while each
    runs warm (as a device would, serving one model); the first calls after each switch are dropped.
    ``ratio`` is the median over rounds of (patched block median / base block median): pairing blocks
    that ran seconds apart cancels the slow drifts of a shared machine that a ratio of global medians
    keeps. ``base_ms`` and ``patched_ms`` are each side's median call time."""
    fns = (lambda: base_model.logits(x), lambda: patched_model.logits(x))
    times: tuple[list[float], list[float]] = ([], [])
    ratios = []
    start = time.perf_counter()
    rounds = 0
    while rounds < blocks or time.perf_counter() - start < min_seconds:
        medians = []
        for fn, acc in zip(fns, times):
            this = []
            for i in range(block):
                t0 = time.perf_counter()
                fn()
                if i >= 3:
                    this.append(time.perf_counter() - t0)
            acc.extend(this)
            medians.append(float(np.median(this)))
        ratios.append(medians[1] / medians[0])
        rounds += 1
        if rounds >= 20 * blocks:
            break
    base_ms, patched_ms = (float(np.median(t) * 1e3) for t in times)
    return {"batch": int(len(x)), "base_ms": base_ms, "patched_ms": patched_ms, "ratio": float(np.median(ratios)),
            "rounds": rounds}
