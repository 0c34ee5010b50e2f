"""Ratio timing for noisy 2-core machines: interleave the two functions, take medians."""
from __future__ import annotations

import statistics
import time
from typing import Callable


def median_ratio(kernel: Callable[[], object], baseline: Callable[[], object], repeats: int = 7,
                 warmup: int = 1) -> tuple[float, float, float]:
    """(kernel median s, baseline median s, ratio of medians), the two timed alternately."""
    for _ in range(warmup):
        kernel()
        baseline()
    k_times, b_times = [], []
    for _ in range(repeats):
        for fn, times in ((kernel, k_times), (baseline, b_times)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    k, b = statistics.median(k_times), statistics.median(b_times)
    return k, b, k / b


def print_table(rows: list[tuple[str, float, float, float, str]]) -> None:
    """rows of (case, kernel s, baseline s, ratio, target)."""
    print(f"{'case':58s} {'kernel ms':>10s} {'baseline ms':>12s} {'ratio':>7s}  target")
    for case, k, b, ratio, target in rows:
        print(f"{case:58s} {k * 1e3:10.3f} {b * 1e3:12.3f} {ratio:7.3f}  {target}")
