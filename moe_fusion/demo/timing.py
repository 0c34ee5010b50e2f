"""Timing that says how sure it is: interleaved repeats, their spread, and a noise verdict.

Shared by the demo and the benchmark scripts. A kernel and its baseline are timed alternately
(``interleave``: one call of each per repeat, the order rotated every repeat), so drift of a
busy machine hits both alike; repeat ``i`` of the kernel and repeat ``i`` of the baseline form a
pair. ``Comparison`` summarizes the pairs:

* the spread of each side: min / median / max over the repeats;
* the ratio: the median over repeats of kernel / baseline of the same repeat;
* its interval: the distribution-free confidence interval of that median from order statistics
  (``median_interval``): the k-th smallest and k-th largest paired ratio, k as large as keeps the
  coverage ``1 - 2 P(Binomial(n, 1/2) < k)`` at or above 95 % (at 7 repeats that is min..max of
  the ratios, 98 %; at 20, the 6th to the 15th, 96 %);
* the verdict: the difference is *inside the noise* when that interval contains 1 (the same rule
  as a two-sided sign test at the interval's level); a target ``ratio <= t`` is ``ok`` or
  ``MISSED`` by the median ratio, marked ``(within noise)`` when ``t`` lies inside the interval.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.distributed as dist

LEVEL = 0.95   # the confidence the intervals aim for

Timer = Callable[[Callable[[], object]], float]


def wall_seconds(fn: Callable[[], object]) -> float:
    """Seconds one call of ``fn`` takes (this process only)."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def synced_seconds(fn: Callable[[], object]) -> float:
    """Seconds one call of ``fn`` takes on the slowest rank, every rank starting at a barrier (call
    on every rank of the default group)."""
    dist.barrier()
    return _over_ranks(wall_seconds(fn), dist.ReduceOp.MAX)


def group_cpu_seconds(fn: Callable[[], object]) -> float:
    """CPU seconds (user + system, every thread: gloo's and the store's included) one call of ``fn``
    costs the whole default group: the sum over its ranks, every rank starting at a barrier (call
    on every rank). Where the ranks outnumber the cores, the wall time follows this sum; waiting in
    a collective costs none of it (contention for the cores and their caches still inflates it)."""
    dist.barrier()
    start = time.process_time()
    fn()
    return _over_ranks(time.process_time() - start, dist.ReduceOp.SUM)


def _over_ranks(seconds: float, op: dist.ReduceOp) -> float:
    """``seconds`` of this rank reduced with ``op`` over the default group (call on every rank)."""
    reduced = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(reduced, op=op)
    return reduced.item()


def interleave(fns: Sequence[Callable[[], object]], repeats: int, warmup: int = 1,
               timer: Timer = wall_seconds) -> list[tuple[float, ...]]:
    """``repeats`` timings of each of ``fns`` (one tuple per function), after ``warmup`` untimed
    calls of each. Every repeat calls every function once, starting one further along each repeat
    (A B, B A, A B, ... for two)."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    samples: list[list[float]] = [[] for _ in fns]
    for repeat in range(repeats):
        for i in range(len(fns)):
            index = (repeat + i) % len(fns)
            samples[index].append(timer(fns[index]))
    return [tuple(s) for s in samples]


@dataclass(frozen=True)
class Interval:
    """A confidence interval and its coverage (the probability it holds the true median)."""

    low: float
    high: float
    coverage: float

    def __contains__(self, value: float) -> bool:
        return self.low <= value <= self.high

    def format(self, digits: int = 3) -> str:
        return f"[{self.low:.{digits}f}, {self.high:.{digits}f}]"


def median_interval(samples: Sequence[float], level: float = LEVEL) -> Interval:
    """The distribution-free confidence interval of the median of ``samples``: the k-th smallest
    to the k-th largest sample, with the largest k whose coverage ``1 - 2 P(Binomial(n, 1/2) < k)``
    is at least ``level``; min..max (k = 1, with its lower coverage) when no k reaches it."""
    ordered = sorted(samples)
    n = len(ordered)
    if not n:
        raise ValueError("median_interval: no samples")

    def coverage(k: int) -> float:
        return 1.0 - 2.0 * sum(math.comb(n, j) for j in range(k)) / 2.0 ** n

    k = 1
    while k + 1 <= (n + 1) // 2 and coverage(k + 1) >= level:
        k += 1
    return Interval(ordered[k - 1], ordered[n - k], coverage(k))


def spread(samples: Sequence[float], scale: float = 1e3) -> str:
    """``min/median/max`` of ``samples`` times ``scale`` (seconds to ms by default), to at least
    three significant digits of the median."""
    values = [v * scale for v in (min(samples), statistics.median(samples), max(samples))]
    magnitude = math.floor(math.log10(abs(values[1]))) + 1 if values[1] else 1
    decimals = max(0, 3 - magnitude)
    return "/".join(f"{v:.{decimals}f}" for v in values)


@dataclass(frozen=True)
class Comparison:
    """Timings of a kernel and its baseline, paired by repeat (``interleave``'s two tuples)."""

    kernel: tuple[float, ...]
    baseline: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.kernel) != len(self.baseline) or not self.kernel:
            raise ValueError(f"Comparison: {len(self.kernel)} kernel and {len(self.baseline)} baseline samples; "
                             "give one pair per repeat")

    @property
    def ratios(self) -> tuple[float, ...]:
        """kernel / baseline of each repeat."""
        return tuple(k / b for k, b in zip(self.kernel, self.baseline))

    @property
    def ratio(self) -> float:
        """The median of the paired ratios."""
        return statistics.median(self.ratios)

    @property
    def interval(self) -> Interval:
        """The confidence interval of ``ratio`` (``median_interval``)."""
        return median_interval(self.ratios)

    def inside_noise(self) -> bool:
        """True when the interval of the ratio contains 1: no difference is shown."""
        return 1.0 in self.interval

    def noise_verdict(self, kernel: str = "kernel") -> str:
        """``"<kernel> faster"``, ``"<kernel> slower"`` or ``"inside the noise"``."""
        if self.inside_noise():
            return "inside the noise"
        return f"{kernel} {'faster' if self.interval.high < 1.0 else 'slower'}"

    def target_verdict(self, target: float) -> str:
        """``ok`` or ``MISSED`` for the target ``ratio <= target`` (judged on the median ratio),
        with ``(within noise)`` when the target lies inside the interval."""
        verdict = "ok" if self.ratio <= target else "MISSED"
        return f"{verdict} (within noise)" if target in self.interval else verdict

    def format_ratio(self, digits: int = 3) -> str:
        """``ratio [low, high]``."""
        return f"{self.ratio:.{digits}f} {self.interval.format(digits)}"


def compare(kernel: Callable[[], object], baseline: Callable[[], object], repeats: int, warmup: int = 1,
            timer: Timer = wall_seconds) -> Comparison:
    """Time ``kernel`` and ``baseline`` interleaved (``interleave``) and pair the repeats."""
    k, b = interleave((kernel, baseline), repeats, warmup, timer)
    return Comparison(k, b)
