"""Combine's weighted sum as one compiled loop (``moe_fusion/kernels/_slot_sum.py``) equals SPEC §4.3's
sum bit for bit: alone against a loop written from the SPEC, and inside combine_v2 on gloo ranks
against the round-trip oracle (``test_moe_distribute_fuzz``'s cases, checked by its ``check_case``).
The size threshold is lowered to 0 so that small calls take the compiled loop."""
from __future__ import annotations

import pytest
import torch

from moe_fusion.kernels import _slot_sum
from moe_fusion.launch import run_ranks
from test_moe_distribute_fuzz import Case, check_case, run_case


def spec_sum(rows: torch.Tensor, pos: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """SPEC §4.3 step 3 per token: ``acc = 0``; for each of the ``K`` weighted slots in order,
    ``acc = acc + f32(row) * w``; then each shared-expert slot (those past ``K``) ``acc = acc + f32(row)``."""
    k = weights.size(1)
    out = torch.empty((pos.size(1), rows.size(1)), dtype=weights.dtype)
    for i in range(pos.size(1)):
        acc = torch.zeros(rows.size(1), dtype=weights.dtype)
        for j in range(pos.size(0)):
            row = rows[pos[j, i]].to(weights.dtype)
            acc = acc + (row * weights[i, j] if j < k else row)
        out[i] = acc
    return out


def bits(t: torch.Tensor) -> torch.Tensor:
    """The IEEE bit patterns (a -0.0 differs from a 0.0)."""
    return t.view({torch.float32: torch.int32, torch.float64: torch.int64}[t.dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_compiled_sum_is_the_spec_sum_bit_for_bit(monkeypatch, dtype):
    monkeypatch.setattr(_slot_sum, "MIN_ELEMENTS", 0)
    gen = torch.Generator().manual_seed(0)
    bs, slots, h = 24, 3, 67                                     # an odd H: the vector loop's tail
    rows = (torch.randn(bs * slots + 5, h, generator=gen) * 100).to(dtype)
    rows[::7] = -0.0                                             # signed zeros through the sum
    pos = torch.randperm(rows.size(0), generator=gen)[:bs * slots].view(slots, bs)
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    weights = torch.rand(bs, slots - 1, generator=gen, dtype=wide) - 0.5   # the last slot: a shared expert's
    got = _slot_sum.fused_slot_sum(rows, pos, weights)
    assert got is not None, "the compiled loop was not taken"
    assert got.dtype == wide and torch.equal(bits(got), bits(spec_sum(rows, pos, weights)))


def test_small_calls_and_other_devices_keep_the_aten_sum():
    rows, pos, weights = torch.zeros(4, 8), torch.zeros(2, 2, dtype=torch.int64), torch.ones(2, 2)
    assert _slot_sum.fused_slot_sum(rows, pos, weights) is None          # under MIN_ELEMENTS
    assert _slot_sum.fused_slot_sum(rows.to("meta"), pos, weights) is None


# Every slot a received row (the compiled loop's case), and one with a 2-D mask (ATen's), in worlds of 3 and 4.
CASES = {
    3: [Case(world=3, seed=11, h=1025, dtype="fp32", k=2, bs=(5, 3, 4), m=6),
        Case(world=3, seed=12, h=64, dtype="bf16", k=3, bs=(4, 4, 4), m=6, shared_ranks=1, shared_x=True),
        Case(world=3, seed=13, h=33, dtype="fp16", k=2, bs=(3, 0, 2), m=6, mask="2d")],
    4: [Case(world=4, seed=14, h=256, dtype="bf16", k=4, bs=(6, 6, 6, 6), m=8),
        Case(world=4, seed=15, h=9, dtype="fp32", k=2, bs=(2, 5, 0, 1), m=8, expert_scales_to_dispatch=True)],
}


def _rank(rank: int, world: int, cases: list[Case]) -> tuple[list[dict], bool]:
    _slot_sum.MIN_ELEMENTS = 0
    return [run_case(case, rank) for case in cases], _slot_sum._compiled is not None


@pytest.mark.parametrize("world", sorted(CASES))
def test_combine_through_the_compiled_sum_equals_the_oracle(world):
    results = run_ranks(world, _rank, CASES[world], timeout=300, pg_timeout=120)
    assert all(compiled for _, compiled in results), "no rank took the compiled loop"
    for i, case in enumerate(CASES[world]):
        check_case(case, [results[r][0][i] for r in range(world)])
