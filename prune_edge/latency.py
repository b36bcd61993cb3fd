"""Latency of onnxruntime sessions, measured the same way for base and base+patches."""

from __future__ import annotations

import time
from typing import Callable

import numpy as np


def median_ms(fn: Callable[[], object], repeats: int = 30, warmup: int = 3, min_seconds: float = 0.2) -> float:
    """Median wall time of ``fn()`` in milliseconds (at least ``repeats`` runs and ``min_seconds``)."""
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < repeats or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if len(times) >= 10 * repeats:
            break
    return float(np.median(times) * 1e3)


def compare_latency(base_model, patched_model, x: np.ndarray, repeats: int = 30) -> dict[str, float]:
    """Median latency of ``base_model.logits(x)`` and ``patched_model.logits(x)``, interleaved in
    rounds so machine noise hits both alike; returns ms and their ratio."""
    base_times, patched_times = [], []
    for _ in range(3):
        base_times.append(median_ms(lambda: base_model.logits(x), repeats))
        patched_times.append(median_ms(lambda: patched_model.logits(x), repeats))
    base_ms, patched_ms = float(np.median(base_times)), float(np.median(patched_times))
    return {"batch": int(len(x)), "base_ms": base_ms, "patched_ms": patched_ms, "ratio": patched_ms / base_ms}
