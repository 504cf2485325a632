"""Timing helpers shared by the speed benchmarks (a script puts ``benchmarks/`` on ``sys.path`` and imports ``harness.timing``).

Machines here are shared and noisy, so methods are always timed *interleaved* (round-robin after one
warm-up call each): a slow drift of the machine's load then hits every method alike, and ratios taken within
one run stay meaningful even when absolute times do not.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Literal


def time_once(fn: Callable[[], object], device: str = "cpu") -> float:
    """Wall seconds of one call; on a GPU, queued work is synchronised before and after."""
    sync = None
    if device == "cuda":
        import torch

        sync = torch.cuda.synchronize
        sync()
    start = time.perf_counter()
    fn()
    if sync is not None:
        sync()
    return time.perf_counter() - start


def interleaved_times(
    fns: dict[str, Callable[[], object]], repeats: int, *, device: str = "cpu",
    reduce: Literal["min", "median"] = "min", warmup: bool = True,
) -> dict[str, float]:
    """Seconds per function over ``repeats`` round-robin rounds: the best (``min``) or the ``median`` call."""
    if warmup:
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(time_once(fn, device))
    pick = min if reduce == "min" else statistics.median
    return {name: float(pick(ts)) for name, ts in times.items()}
