"""What the benchmark scripts share: their argument parser, and one table of kernel-vs-baseline rows
that prints each side's spread, the ratio with its confidence interval, and whether its target
was met, or, without a target, whether the difference is outside the noise (the statistics are
``moe_fusion.demo.timing``'s)."""
from __future__ import annotations

import argparse
from typing import NamedTuple, Optional

from moe_fusion.__main__ import Parser
from moe_fusion.demo.timing import Comparison, compare, spread

__all__ = ["Row", "argument_parser", "compare", "print_table"]


class Row(NamedTuple):
    """One benchmark case: its timings and its target (``ratio <= target``), if it has one."""

    case: str
    timing: Comparison
    target: Optional[float]


def argument_parser(doc: str) -> argparse.ArgumentParser:
    """The CLI's parser (``python -m moe_fusion``'s: one-line errors, exit status 2, every default in
    ``--help``) with ``doc`` as its description."""
    return Parser(description=doc)


def print_table(rows: list[Row], unit: str = "ms") -> None:
    """Print the rows (timings in ``unit``, as the timer measured them), then what the columns mean
    and how sure the intervals are."""
    width = max([len("case")] + [len(row.case) for row in rows])
    kernel, baseline = f"kernel {unit} min/med/max", f"baseline {unit} min/med/max"
    print(f"{'case':{width}s} {kernel:>24s} {baseline:>26s} "
          f"{'ratio [interval]':>22s} {'target':>7s}  verdict")
    for row in rows:
        t = row.timing
        target = f"<={row.target:.2f}" if row.target is not None else "-"
        print(f"{row.case:{width}s} {spread(t.kernel):>24s} {spread(t.baseline):>26s} {t.format_ratio():>22s} "
              f"{target:>7s}  {t.target_verdict(row.target) if row.target is not None else t.noise_verdict()}")
    coverages = {len(row.timing.ratios): row.timing.interval.coverage for row in rows}
    coverage = ", ".join(f"{c:.1%} at {n} repeats" for n, c in sorted(coverages.items()))
    print(f"ratio: median over interleaved repeats of kernel/baseline of the same repeat; interval: its "
          f"distribution-free confidence interval ({coverage}); verdict: a target met (ok) or MISSED by the "
          "median ratio, '(within noise)' when the target lies inside the interval; without a target, "
          "'inside the noise' when the interval holds 1")

