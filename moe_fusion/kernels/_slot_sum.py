"""Combine's weighted sum over the received rows as one generated loop (CPU, large calls).

``combine_sum`` adds each token's slot rows in fixed slot order, a rounded multiply then a rounded
add per slot (SPEC §4.3). As ATen ops that is a gather, a widening copy, a multiply and an add per
slot and token block, each a pass over the block. Inductor fuses the same expression into one loop
over the tokens that reads every row once, keeping the SPEC's order and roundings: its C++ is
built with ``-ffp-contract=off`` (no fused multiply-add) and it does not reassociate the adds, so
the sum is bit-identical to the ATen ops' (``tests/test_slot_sum.py``).

The loop is compiled on the first large call (seconds, then cached by inductor on disk), so it is
taken only from ``MIN_ELEMENTS`` accumulated elements on, and only on CPU. Where inductor cannot
compile (no C++ compiler), the ATen ops run instead, with one warning.
"""
from __future__ import annotations

import warnings
from typing import Callable, Optional

import torch

Tensor = torch.Tensor

# From this many accumulated elements (tokens x slots x H) on, the compiled loop is taken: there the
# ATen passes cost milliseconds per call (about 2 ns per element here, the loop about a quarter of
# that), so the one compile per process (seconds; inductor's disk cache shortens later ones) is
# repaid within a training or serving run; below it, per-call overheads dominate either way.
MIN_ELEMENTS = 1 << 20

_compiled: Optional[Callable[[Tensor, Tensor, Tensor], Tensor]] = None
_unavailable = False


def _sum_slots(rows: Tensor, pos: Tensor, weights: Tensor) -> Tensor:
    """``(BS, H)`` in ``weights``' dtype: ``acc = 0``, then for ``j`` in order
    ``acc = acc + rows[pos[j]] * weights[:, j]`` (the row widened first). ``rows`` ``(R, H)`` any
    float dtype, ``pos`` ``(J, BS)`` int64 rows of each slot, ``weights`` ``(BS, J)`` fp32 or fp64."""
    acc = torch.zeros((pos.size(1), rows.size(1)), dtype=weights.dtype, device=rows.device)
    for j in range(pos.size(0)):
        acc = acc + rows[pos[j]].to(weights.dtype) * weights[:, j:j + 1]
    return acc


def fused_slot_sum(rows: Tensor, pos: Tensor, weights: Tensor) -> Optional[Tensor]:
    """``_sum_slots`` as one compiled loop, or None where it does not apply (not CPU, too small, or
    inductor unavailable): the caller then sums with ATen ops. ``weights`` ``(BS, K)`` weigh the
    first ``K`` slots of ``pos``; the slots after them (shared experts) are added unweighted, as a
    weight of 1, which multiplies exactly."""
    global _compiled, _unavailable
    if _unavailable or rows.device.type != "cpu" or pos.numel() * rows.size(1) < MIN_ELEMENTS:
        return None
    if _compiled is None:
        _compiled = torch.compile(_sum_slots, dynamic=True, fullgraph=True)
    unweighted = weights.new_ones((weights.size(0), pos.size(0) - weights.size(1)))
    try:
        with torch.no_grad():
            return _compiled(rows, pos, torch.cat([weights, unweighted], dim=1))
    except Exception as error:      # noqa: BLE001  (no C++ toolchain here: the ATen passes compute the same sum)
        _unavailable = True
        warnings.warn(f"moe_fusion: combine's weighted sum runs as ATen ops (inductor could not compile it: "
                      f"{type(error).__name__}: {error})", RuntimeWarning, stacklevel=2)
        return None
