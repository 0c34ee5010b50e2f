"""Variants of the demo MoE layers, and a routing skew.

The functional-collective forms (``torch.distributed._functional_collectives``) must fuse like the
``out=`` forms of the demo. The others are small changes a user could make whose semantics
dispatch_v2/combine_v2 do not have (or cannot be proven to have), which the passes must refuse:
experts placed round robin, the reduce_scatter on another group (the same ranks, another name), a
token weight that is not the plain top-k weight.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from moe_fusion.demo.moe_layers import AllGatherEPMoE, CapacityAllToAllMoE


class _Variant(AllGatherEPMoE):
    """``AllGatherEPMoE.forward`` with the expert id, the token weight and the reduce group as hooks."""

    def expert_id(self, i: int) -> int:
        return self.first_expert + i

    def token_weight(self, gathered_w: torch.Tensor, gathered_ids: torch.Tensor, e: int) -> torch.Tensor:
        return (gathered_w * (gathered_ids == e)).sum(dim=-1, keepdim=True)

    def reduce_group(self) -> dist.ProcessGroup:
        return self.group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.route(x)
        weights = weights.to(x.dtype)
        gathered_x = x.new_empty((self.ep * x.size(0), x.size(1)))
        dist.all_gather_into_tensor(gathered_x, x, group=self.group)
        gathered_ids = ids.new_empty((self.ep * ids.size(0), ids.size(1)))
        dist.all_gather_into_tensor(gathered_ids, ids, group=self.group)
        gathered_w = weights.new_empty((self.ep * weights.size(0), weights.size(1)))
        dist.all_gather_into_tensor(gathered_w, weights, group=self.group)
        out = torch.zeros_like(gathered_x)
        for i, expert in enumerate(self.experts):
            out = out + expert(gathered_x) * self.token_weight(gathered_w, gathered_ids, self.expert_id(i))
        y = x.new_empty(x.shape)
        dist.reduce_scatter_tensor(y, out, group=self.reduce_group())
        return self.add_shared(y, x)


class StridedAllGatherMoE(_Variant):
    """Rank ``r`` holds experts ``r, r + W, ...`` (round robin): not dispatch_v2's contiguous placement."""

    def expert_id(self, i: int) -> int:
        return self.ep_rank + i * self.ep


class TwoGroupAllGatherMoE(_Variant):
    """Reduce-scatters over a second group of the same ranks."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.other_group = dist.new_group(dist.get_process_group_ranks(self.group))

    def reduce_group(self) -> dist.ProcessGroup:
        return self.other_group


class UnweightedAllGatherMoE(_Variant):
    """Weights every routed expert by 1 instead of its top-k weight."""

    def token_weight(self, gathered_w: torch.Tensor, gathered_ids: torch.Tensor, e: int) -> torch.Tensor:
        return (gathered_ids == e).any(dim=-1, keepdim=True).to(gathered_w.dtype)


class SquaredWeightAllGatherMoE(_Variant):
    """Squares the top-k weight: a formula of the weight, not the weight."""

    def token_weight(self, gathered_w: torch.Tensor, gathered_ids: torch.Tensor, e: int) -> torch.Tensor:
        return (gathered_w * (gathered_ids == e)).sum(dim=-1, keepdim=True) ** 2


class FuncolAllGatherMoE(AllGatherEPMoE):
    """``AllGatherEPMoE`` with functional collectives (no out= buffers)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.route(x)
        gathered_x = funcol.all_gather_tensor(x, 0, self.group)
        gathered_ids = funcol.all_gather_tensor(ids, 0, self.group)
        gathered_w = funcol.all_gather_tensor(weights.to(x.dtype), 0, self.group)
        out = torch.zeros_like(gathered_x)
        for i, expert in enumerate(self.experts):
            out = out + expert(gathered_x) * (gathered_w * (gathered_ids == self.first_expert + i)).sum(-1, keepdim=True)
        return self.add_shared(funcol.reduce_scatter_tensor(out, "sum", 0, self.group), x)


class FuncolCapacityMoE(CapacityAllToAllMoE):
    """``CapacityAllToAllMoE`` with functional all_to_alls and a per-expert loop over ``select``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.route(x)
        capacity = self.capacity(x.size(0))
        combine = self.combine_weights(weights, ids, capacity)
        dispatched = torch.einsum("sec,sm->ecm", combine.bool().to(x.dtype), x)
        received = funcol.all_to_all_single(dispatched, None, None, self.group)
        received = received.reshape(self.ep, self.local_experts, capacity, x.size(1))
        outputs = [expert(received[:, i].reshape(-1, x.size(1))).reshape(self.ep, capacity, x.size(1))
                   for i, expert in enumerate(self.experts)]
        expert_out = torch.stack(outputs, dim=1).reshape(self.num_experts, capacity, x.size(1))
        returned = funcol.all_to_all_single(expert_out, None, None, self.group)
        return self.add_shared(torch.einsum("sec,ecm->sm", combine.to(x.dtype), returned), x)


LAYERS = {"funcol-allgather": FuncolAllGatherMoE, "funcol-capacity": FuncolCapacityMoE,"allgather": AllGatherEPMoE, "capacity": CapacityAllToAllMoE, "strided": StridedAllGatherMoE,
          "two-groups": TwoGroupAllGatherMoE, "unweighted": UnweightedAllGatherMoE,
          "squared-weight": SquaredWeightAllGatherMoE}


def skew_gate(layer: AllGatherEPMoE | CapacityAllToAllMoE) -> None:
    """Make (nearly) every token with positive features choose experts 0..K-1: all on EP rank 0."""
    with torch.no_grad():
        for k in range(layer.top_k):
            layer.gate.weight[k] += 2.0 / (k + 1)


def tokens(rank: int, num: int, hidden: int, dtype: torch.dtype, routing: str) -> torch.Tensor:
    """Rank-specific tokens; ``routing="skewed"`` makes them positive so the skewed gate wins."""
    x = torch.randn(num, hidden, generator=torch.Generator().manual_seed(100 + rank))
    return (x.abs() if routing == "skewed" else x).to(dtype)
