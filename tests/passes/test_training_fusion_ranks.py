"""Compiled training steps of the expert-parallel layers fuse on real gloo ranks: the AllGather-EP and
the capacity all-to-all layers (dispatch -> grouped FFN -> combine, EP=2), written with the
differentiable functional collectives (``*_autograd``; ``dist.*``'s in-place collectives have no
autograd, so their eager step is no reference). The compiled step's output, input gradient and
every parameter gradient equal the unfused eager step's (``pipeline.fuse_before_autograd``)."""
from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist

import torch.distributed._functional_collectives as funcol

from moe_fusion.demo.moe_layers import AllGatherEPMoE, CapacityAllToAllMoE
from moe_fusion.launch import run_ranks
from moe_fusion.passes import FusionReport, backend

from moe_dispatch_combine_variants import tokens

HIDDEN, FFN_HIDDEN, TOKENS = 16, 24, 8


class TrainableAllGatherMoE(AllGatherEPMoE):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.route(x)
        gathered_x = funcol.all_gather_tensor_autograd(x, 0, self.group)
        gathered_ids = funcol.all_gather_tensor(ids, 0, self.group)
        gathered_w = funcol.all_gather_tensor_autograd(weights.to(x.dtype), 0, self.group)
        out = torch.zeros_like(gathered_x)
        for i, expert in enumerate(self.experts):
            token_weight = (gathered_w * (gathered_ids == self.first_expert + i)).sum(dim=-1, keepdim=True)
            out = out + expert(gathered_x) * token_weight
        return self.add_shared(funcol.reduce_scatter_tensor_autograd(out, "sum", 0, self.group), x)


class TrainableCapacityMoE(CapacityAllToAllMoE):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.route(x)
        capacity = self.capacity(x.size(0))
        combine = self.combine_weights(weights, ids, capacity)
        dispatched = torch.einsum("sec,sm->ecm", combine.bool().to(x.dtype), x)
        received = funcol.all_to_all_single_autograd(dispatched, None, None, self.group)
        received = received.view(self.ep, self.local_experts, capacity, x.size(1))
        outputs = [expert(chunk.reshape(-1, x.size(1))).view(self.ep, 1, capacity, x.size(1))
                   for expert, chunk in zip(self.experts, received.chunk(self.local_experts, dim=1))]
        expert_out = torch.cat(outputs, dim=1).view(self.num_experts, capacity, x.size(1))
        returned = funcol.all_to_all_single_autograd(expert_out, None, None, self.group)
        return self.add_shared(torch.einsum("sec,ecm->sm", combine.to(x.dtype), returned), x)


CASES = {  # name -> (layer, expected fused pattern, compiler)
    "allgather": (TrainableAllGatherMoE, "moe_allgather_ep", "eager"),
    "capacity": (TrainableCapacityMoE, "moe_capacity_a2a", "eager"),
    "capacity-inductor": (TrainableCapacityMoE, "moe_capacity_a2a", "inductor"),
}
WORLD = 2


def _step(layer: torch.nn.Module, run: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """One step of ``run`` (``layer`` or its compiled form): output and gradients by name."""
    x = x.clone().requires_grad_()
    out = run(x)
    (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
    grads = {"out": out.detach(), "x": x.grad}
    grads.update({name: p.grad.clone() for name, p in layer.named_parameters() if p.grad is not None})
    layer.zero_grad(set_to_none=True)
    return grads


def _run(rank: int, world: int) -> dict[str, Any]:
    results = {}
    for name, (layer_type, _, compiler) in CASES.items():
        layer = layer_type(HIDDEN, FFN_HIDDEN, 2 * world, 2, ep_group=dist.group.WORLD, seed=5, shared_expert=True)
        x = tokens(rank, TOKENS, HIDDEN, torch.float32, "balanced")
        eager = _step(layer, layer, x)
        report = FusionReport()
        torch._dynamo.reset()
        compiled = _step(layer, torch.compile(layer, backend=backend(report=report, compiler=compiler),
                                              fullgraph=True, dynamic=False), x)
        results[name] = {"eager": eager, "compiled": compiled, "fused": sorted({e.pattern for e in report.fused()}),
                         "refused": [(e.pattern, e.detail) for e in report.refused()]}
    return results


@pytest.fixture(scope="module")
def ranks() -> list[dict[str, Any]]:
    return run_ranks(WORLD, _run, timeout=400)


@pytest.mark.parametrize("name", list(CASES))
def test_training_step_fuses_and_equals_eager(ranks, name):
    pattern = CASES[name][1]
    for rank, result in enumerate(ranks):
        case = result[name]
        assert pattern in case["fused"], (rank, case["fused"], case["refused"])
        assert set(case["eager"]) == set(case["compiled"])
        assert len(case["eager"]) > 3     # output, x and the layer's parameters
        for key, want in case["eager"].items():
            torch.testing.assert_close(case["compiled"][key], want, rtol=2e-5, atol=2e-5, msg=f"rank {rank} {key}")
