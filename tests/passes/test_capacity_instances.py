"""``moe_capacity_a2a``'s guards evaluate the block; past ``FULL_SIZE_LIMIT`` they run on a reduced
instance (batch sizes divided by a common factor), so their cost does not grow with the batch.
Both instances must fuse the capacity layer and refuse look-alikes whose defect only an
evaluation shows (a scaled einsum, swapped expert outputs, a gating that shares slots), and a
layer fused through the reduced instance must compute what the unfused one does (real ranks)."""
from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch._dynamo.backends.common import aot_autograd
from torch._inductor.decomposition import select_decomp_table
from torch.testing._internal.distributed.fake_pg import FakeStore

from moe_fusion.demo.moe_layers import CapacityAllToAllMoE
from moe_fusion.launch import run_ranks
from moe_fusion.passes import FusionReport, backend, capacity_a2a, run_fusion_passes

from moe_dispatch_combine_variants import tokens
from test_moe_dispatch_combine_patterns import post_grad

WORLD, EXPERTS, HIDDEN = 2, 8, 16
SMALL, LARGE = 8, 384     # tokens: S*E*C = 512 (the graph's own sizes), 1.2M (a reduced instance)


class _CapacityVariant(CapacityAllToAllMoE):
    """The capacity layer with a changed dispatch input or expert output order."""

    scale = 1.0                              # the dispatch einsum reads ``scale * x``
    order: tuple[int, ...] | None = None     # local experts' outputs in this order (None: their own)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.route(x)
        capacity = self.capacity(x.size(0))
        combine = self.combine_weights(weights, ids, capacity)
        dispatched = torch.einsum("sec,sm->ecm", combine.bool().to(x.dtype), x * self.scale)
        received = torch.empty_like(dispatched)
        dist.all_to_all_single(received, dispatched, group=self.group)
        received = received.view(self.ep, self.local_experts, capacity, x.size(1))
        outputs = [expert(chunk.reshape(-1, x.size(1))).view(self.ep, 1, capacity, x.size(1))
                   for expert, chunk in zip(self.experts, received.chunk(self.local_experts, dim=1))]
        if self.order is not None:
            outputs = [outputs[i] for i in self.order]
        expert_out = torch.cat(outputs, dim=1).view(self.num_experts, capacity, x.size(1))
        returned = torch.empty_like(expert_out)
        dist.all_to_all_single(returned, expert_out, group=self.group)
        return torch.einsum("sec,ecm->sm", combine.to(x.dtype), returned)


class ScaledDispatch(_CapacityVariant):
    """The dispatch einsum reads ``2 * x``: still multilinear, but not ``einsum(mask, x)``."""

    scale = 2.0


class SwappedOutputs(_CapacityVariant):
    """Local experts 0 and 1 send their outputs back in each other's place."""

    order = (1, 0, 2, 3)


class SharedSlot(CapacityAllToAllMoE):
    """Every token takes slot 0 of its experts: tokens overwrite each other (not one-slot routing)."""

    def combine_weights(self, weights: torch.Tensor, ids: torch.Tensor, capacity: int) -> torch.Tensor:
        gates = weights.unsqueeze(-1) * F.one_hot(ids, self.num_experts)                      # (S, K, E)
        slot = torch.zeros_like(ids)
        return torch.einsum("ske,skc->sec", gates, F.one_hot(slot, capacity).to(gates.dtype))


@pytest.fixture(scope="module")
def group():
    assert not dist.is_initialized(), "another test left a default process group"
    dist.init_process_group("fake", store=FakeStore(), rank=1, world_size=WORLD)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


def _report(layer_type: type, num_tokens: int) -> FusionReport:
    layer = layer_type(HIDDEN, 24, EXPERTS, 2, ep_group=dist.group.WORLD, seed=5)
    gm = post_grad(layer, torch.randn(num_tokens, HIDDEN))
    return run_fusion_passes(gm.graph, passes=["moe_capacity_a2a"])


def test_sizes_straddle_the_limit():
    assert SMALL * EXPERTS * SMALL <= capacity_a2a.FULL_SIZE_LIMIT < LARGE * EXPERTS * LARGE


@pytest.mark.parametrize("num_tokens", [SMALL, LARGE])
def test_capacity_layer_fuses(group, num_tokens):
    report = _report(CapacityAllToAllMoE, num_tokens)
    assert [e.pattern for e in report.fused()] == ["moe_capacity_a2a"], report.format()


@pytest.mark.parametrize("num_tokens", [SMALL, LARGE])
@pytest.mark.parametrize("layer_type, reason", [
    (ScaledDispatch, "is not einsum('sec,sm->ecm')"),
    (SwappedOutputs, "do not all go through one expert FFN and back to their place"),
    (SharedSlot, "a slot holds two tokens"),
])
def test_look_alikes_refused(group, num_tokens, layer_type, reason):
    report = _report(layer_type, num_tokens)
    assert not report.fused(), report.format()
    assert any(reason in e.detail for e in report.refused("moe_capacity_a2a")), report.format()


def test_guard_cost_does_not_grow_with_the_batch(group, monkeypatch):
    """The tensors the guards evaluate are as large at 2048 tokens (E*C*S = 34M mask elements;
    21 s and 1.2 GB of guards before reduced instances) as at 384 tokens."""
    largest: dict[int, int] = {}
    evaluate = capacity_a2a.evaluate

    def spy(nodes, env, **kwargs):
        evaluate(nodes, env, **kwargs)
        largest[num_tokens] = max([largest.get(num_tokens, 0)]
                                  + [v.numel() for v in env.values() if isinstance(v, torch.Tensor)])

    monkeypatch.setattr(capacity_a2a, "evaluate", spy)
    for num_tokens in (LARGE, 2048):
        layer = CapacityAllToAllMoE(HIDDEN, 24, EXPERTS, 2, ep_group=dist.group.WORLD, seed=5)
        report = run_fusion_passes(_graph_only(layer, num_tokens).graph, passes=["moe_capacity_a2a"])
        assert report.fused(), report.format()
    assert largest[2048] == largest[LARGE] < LARGE * EXPERTS * LARGE, largest


def _graph_only(layer: torch.nn.Module, num_tokens: int):
    """The post-grad graph without running it (the layer itself needs GBs at 2048 tokens)."""
    graphs = []

    class Captured(Exception):
        pass

    def capture(gm, example_inputs):
        graphs.append(gm)
        raise Captured

    torch._dynamo.reset()
    with torch.no_grad(), pytest.raises(Exception, match="Captured"):
        torch.compile(layer, backend=aot_autograd(fw_compiler=capture, decompositions=select_decomp_table()),
                      fullgraph=True, dynamic=False)(torch.randn(num_tokens, HIDDEN))
    return graphs[0]


def _fused_vs_eager(rank: int, world: int) -> dict[str, Any]:
    layer = CapacityAllToAllMoE(HIDDEN, 24, 2 * world, 2, ep_group=dist.group.WORLD, seed=5, shared_expert=True)
    x = tokens(rank, 320, HIDDEN, torch.float32, "balanced")
    report = FusionReport()
    torch._dynamo.reset()
    with torch.no_grad():
        eager = layer(x)
        fused = torch.compile(layer, backend=backend(report=report, compiler="eager"), fullgraph=True, dynamic=False)(x)
    return {"max_diff": float((fused - eager).abs().max()), "fused": [e.pattern for e in report.fused()]}


def test_a_reduced_instance_resizes_the_integral_floats_of_size_arithmetic():
    """DeepSpeed's top-2 capacity is ``ceil(2.0 * (S / E))`` with ``S / E`` a Python float in the
    graph: a reduced instance divides it with the tokens, else the capacity the routing compares
    against would not be its table's (the block was refused at 512 tokens and H=1024)."""
    from moe_fusion.passes.evaluate import reduced_instance

    instance = reduced_instance((512, 128, 1024), (8, 4, 2, 2), 16)     # S, C, H; E, W, L, K
    assert instance.factor == 8
    assert instance.size(64.0) == 8.0                                    # S / E, tokens per expert
    assert (instance.size(128), instance.size(128.0), instance.size(1024.0)) == (16, 16.0, 128.0)
    assert [instance.size(v) for v in (8.0, 3.0, 0.5, 1.0)] == [8.0, 3.0, 0.5, 1.0]   # fixed, not sizes


def test_fused_through_a_reduced_instance_equals_eager():
    assert 320 * 4 * 320 > capacity_a2a.FULL_SIZE_LIMIT
    for result in run_ranks(WORLD, _fused_vs_eager, timeout=300):
        assert "moe_capacity_a2a" in result["fused"], result
        assert result["max_diff"] < 1e-5, result
