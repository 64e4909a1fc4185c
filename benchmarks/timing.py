"""Run-time comparisons for the benchmarks: interleaved rounds, medians."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def interleaved_medians(
    fns: dict[str, Callable], args, rounds: int, *, warm_up: bool = True
) -> dict[str, float]:
    """{name: median seconds of ``fn(*args)``}, timed in interleaved rounds (each round calls
    every function once, in order), so that drift and noise on the machine hit them alike.
    ``warm_up``: one untimed call of each first (first-call costs are not what is compared)."""
    if warm_up:
        for fn in fns.values():
            fn(*args)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn(*args)
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}
