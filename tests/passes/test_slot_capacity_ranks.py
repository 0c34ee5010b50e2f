"""The slot form of the capacity all-to-all MoE (``capacity_slots``), written by hand the way
DeepSpeed 0.19 writes it, on 2 gloo ranks, and look-alikes that must not fuse: a second choice that
does not mask the first (a token may pick one expert twice: dispatch_v2 needs distinct ids), slot
positions that let two routes share a row (the scatter overwrites one: no dispatch computes that),
and the A2 target (its protos refuse the block with their reason). Under inductor the cost gate
leaves a static capacity with few rows per route unfused (``cost.refuse_unpadded_slot_block``) and
fuses a roomier one and a capacity read from the data. Each compiled layer equals the eager one: the
fused block and the refused ones (whose expert FFNs still fuse alone) within fp32 rounding."""
from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F

import moe_fusion
from moe_fusion.launch import run_ranks
from moe_fusion.passes import FusionReport

HIDDEN, FFN, EXPERTS, TOKENS, WORLD = 16, 24, 4, 12, 2
SLOWER = "slower here than the unfused code"
VARIANTS = {  # name -> (target, compiler, refusal reason expected, or None when it fuses)
    "deepspeed-like": ("portable", "eager", None),
    "repeated-choice": ("portable", "eager", "does not mask the earlier choices"),
    "shared-rows": ("portable", "eager", "two kept routes share a row"),
    "capacity-drops": ("portable", "eager", None),
    "A2-target": ("A2", "eager", "invalid on target A2"),
    # Under inductor the cost gate weighs the dispatch table's rows per route (E * C / (S * K)):
    "capacity-drops-inductor": ("portable", "inductor", SLOWER),       # 16 rows for 24 routes
    "roomy-capacity-inductor": ("portable", "inductor", None),         # 48 rows for 24 routes
    "deepspeed-like-inductor": ("portable", "inductor", None),         # capacity from the data: not gated
}
CAPACITIES = {"capacity-drops": 4, "capacity-drops-inductor": 4, "roomy-capacity-inductor": 12}


class SlotMoE(torch.nn.Module):
    """Top-2 argmax routing, slot dispatch over an all-to-all, ReLU expert FFNs, slot combine."""

    def __init__(self, variant: str, rank: int) -> None:
        super().__init__()
        self.variant = variant
        torch.manual_seed(0)
        self.gate = torch.nn.Linear(HIDDEN, EXPERTS, bias=False)
        torch.manual_seed(1 + rank)
        local = EXPERTS // WORLD
        self.fc1 = torch.nn.ModuleList(torch.nn.Linear(HIDDEN, FFN) for _ in range(local))
        self.fc2 = torch.nn.ModuleList(torch.nn.Linear(FFN, HIDDEN) for _ in range(local))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s, h, e = x.shape[0], x.shape[1], EXPERTS
        logits = self.gate(x)
        gates = F.softmax(logits, dim=1)
        first = torch.argmax(gates, dim=1)
        mask1 = F.one_hot(first, e)
        if self.variant == "repeated-choice":
            second = torch.argmax(logits * 2.0, dim=1)          # the same expert again
        else:
            second = torch.argmax(logits.masked_fill(mask1.bool(), float("-inf")), dim=1)
        mask2 = F.one_hot(second, e)
        loc1 = torch.cumsum(mask1, 0) - 1
        loc2 = torch.cumsum(mask2, 0) - 1
        if self.variant != "shared-rows":                        # second choices after the first ones
            loc2 = loc2 + mask1.sum(0, keepdim=True)
        if self.variant in CAPACITIES:
            capacity = CAPACITIES[self.variant]
            mask1 = mask1 * (loc1 < capacity)
            mask2 = mask2 * (loc2 < capacity)
        else:
            counts = funcol.all_reduce((mask1 + mask2).sum(0).max(), "max", dist.group.WORLD)
            capacity = int(counts)
        g1, g2 = (gates * mask1).sum(1), (gates * mask2).sum(1)
        ids = torch.stack([torch.where(mask1.any(1), first, -1), torch.where(mask2.any(1), second, -1)])
        loc = torch.stack([(loc1 * mask1).sum(1), (loc2 * mask2).sum(1)])
        slots = torch.where(ids >= 0, ids * capacity + loc, torch.full_like(ids, e * capacity))
        source = torch.full([e * capacity + 1], s, dtype=torch.long).scatter(
            0, slots.flatten(), torch.arange(s).expand(2, s).flatten())
        dispatched = torch.cat([x, x.new_zeros(1, h)])[source[:-1]].view(e, capacity, h)
        received = funcol.all_to_all_single(dispatched, None, None, dist.group.WORLD)
        rows = received.view(WORLD, len(self.fc1), capacity, h)
        outs = [self.fc2[i](torch.relu(self.fc1[i](rows[:, i]))).unsqueeze(1) for i in range(len(self.fc1))]
        returned = funcol.all_to_all_single(torch.cat(outs, 1).reshape(e, capacity, h), None, None,
                                            dist.group.WORLD)
        table = torch.cat([returned.view(e * capacity, h), x.new_zeros(1, h)])
        picked = table[slots.flatten()].view(2, s, h)
        return (picked * torch.stack([g1, g2]).unsqueeze(-1)).sum(0)


def _run(rank: int, world: int) -> dict[str, Any]:
    results = {}
    for name, (target, compiler, _) in VARIANTS.items():
        layer = SlotMoE(name, rank)
        x = torch.randn(TOKENS, HIDDEN, generator=torch.Generator().manual_seed(50 + rank))
        report = FusionReport()
        torch._dynamo.reset()
        with torch.no_grad():
            eager = layer(x)
            fused = moe_fusion.compile(layer, target=target, report=report, compiler=compiler)(x)
        results[name] = {"eager": eager, "fused": fused,
                         "events": [(e.pattern, e.fused, e.detail) for e in report.events if e.pattern ==
                                    "moe_capacity_a2a"]}
    return results


@pytest.fixture(scope="module")
def ranks() -> list[dict[str, Any]]:
    return run_ranks(WORLD, _run, timeout=300)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_slot_block_fuses_only_when_exact(ranks, name):
    refusal = VARIANTS[name][2]
    for rank, result in enumerate(ranks):
        case = result[name]
        assert len(case["events"]) == 1, case["events"]
        _, fused, detail = case["events"][0]
        assert fused if refusal is None else (not fused and refusal in detail), detail
        torch.testing.assert_close(case["fused"], case["eager"], rtol=1e-5, atol=1e-5)
