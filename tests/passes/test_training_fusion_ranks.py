"""Compiled training steps of the expert-parallel layers fuse on real gloo ranks: the AllGather-EP and
the capacity all-to-all layers (dispatch -> grouped FFN -> combine, EP=2), and the DeepSpeed-style
layer (the AG-BMM / BMM-RS pair, EP=2 x TP=2, both shards), written with the differentiable
functional collectives (``*_autograd``; ``dist.*``'s in-place collectives have no autograd, so their
eager step is no reference). The compiled step's output, input gradient and every parameter
gradient equal the unfused eager step's (``pipeline.fuse_before_autograd``), and the backward
graph runs the fused ops too (the pair's formulas are each other)."""
from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist

from moe_fusion.demo.deepspeed_layer import TrainableDeepSpeedMoE
from moe_fusion.demo.moe_layers import CapacityAllToAllMoE, TrainableAllGatherEPMoE, TrainableCapacityAllToAllMoE
from moe_fusion.demo.run import ep_tp_groups
from moe_fusion.launch import run_ranks
from moe_fusion.passes import FusionReport, MoeFusionGraphPass, backend
from moe_fusion.passes.context import count_ops

from moe_dispatch_combine_variants import tokens
from step_results import named_step_results

HIDDEN, FFN_HIDDEN, TOKENS = 16, 24, 8
CASES = {  # name -> (layer, expected fused pattern, compiler)
    "allgather": (TrainableAllGatherEPMoE, "moe_allgather_ep", "eager"),
    "capacity": (TrainableCapacityAllToAllMoE, "moe_capacity_a2a", "eager"),
    "capacity-inductor": (TrainableCapacityAllToAllMoE, "moe_capacity_a2a", "inductor"),
}
WORLD = 2


def _run(rank: int, world: int) -> dict[str, Any]:
    results = {}
    for name, (layer_type, _, compiler) in CASES.items():
        layer = layer_type(HIDDEN, FFN_HIDDEN, 2 * world, 2, ep_group=dist.group.WORLD, seed=5, shared_expert=True)
        x = tokens(rank, TOKENS, HIDDEN, torch.float32, "balanced")
        eager = named_step_results(layer, layer, x, True)
        report = FusionReport()
        torch._dynamo.reset()
        fused = torch.compile(layer, backend=backend(report=report, compiler=compiler), fullgraph=True, dynamic=False)
        compiled = named_step_results(layer, fused, x, True)
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


BMM_PAIR = ("moe_fusion.npu_alltoall_allgather_bmm.default", "moe_fusion.npu_bmm_reducescatter_alltoall.default")
DEEPSPEED = {  # name -> (shard, compiler)
    "capacity": ("capacity", "eager"),
    "hidden": ("hidden", "eager"),
    "capacity-inductor": ("capacity", "inductor"),
}


def _run_deepspeed(rank: int, world: int) -> dict[str, Any]:
    ep_group, tp_group = ep_tp_groups(rank, 2, 2)
    graphs: list = []
    call = MoeFusionGraphPass.__call__

    def recording(self, graph):          # every graph the passes see: the trial, the forward, the backward
        call(self, graph)
        graphs.append(count_ops(graph))

    MoeFusionGraphPass.__call__ = recording
    results = {}
    for name, (shard, compiler) in DEEPSPEED.items():
        layer = TrainableDeepSpeedMoE(HIDDEN, FFN_HIDDEN, 4, ep_group=ep_group, tp_group=tp_group, shard=shard, seed=3)
        x = tokens(rank // 2, TOKENS, HIDDEN, torch.float32, "balanced")     # the TP ranks of a group share x
        eager = named_step_results(layer, layer, x, True)
        report = FusionReport()
        torch._dynamo.reset()
        graphs.clear()
        fused = torch.compile(layer, backend=backend(report=report, compiler=compiler), fullgraph=True, dynamic=False)
        compiled = named_step_results(layer, fused, x, True)
        results[name] = {"eager": eager, "compiled": compiled, "fused": sorted({e.pattern for e in report.fused()}),
                         "refused": [(e.pattern, e.detail) for e in report.refused()],
                         "backward": {op: graphs[-1][op] for op in BMM_PAIR}}
    return results


@pytest.fixture(scope="module")
def deepspeed_ranks() -> list[dict[str, Any]]:
    return run_ranks(4, _run_deepspeed, timeout=400)


@pytest.mark.parametrize("name", list(DEEPSPEED))
def test_deepspeed_style_training_step_fuses_the_bmm_pair(deepspeed_ranks, name):
    for rank, result in enumerate(deepspeed_ranks):
        case = result[name]
        assert case["fused"] == ["alltoall_allgather_bmm", "bmm_reducescatter_alltoall"], (rank, case["refused"])
        # The backward of AG-BMM is a BMM-RS and vice versa: both run in the backward graph.
        assert all(count >= 1 for count in case["backward"].values()), (rank, case["backward"])
        assert len(case["eager"]) == 7    # output, x, wg, w1, w2, b1, b2
        for key, want in case["eager"].items():
            torch.testing.assert_close(case["compiled"][key], want, rtol=2e-5, atol=2e-5, msg=f"rank {rank} {key}")


def _in_place_collectives(rank: int, world: int) -> dict[str, Any]:
    """The capacity layer written with ``dist.all_to_all_single(out, x)`` (no autograd in eager: its
    eager step is no reference), trained with only its expert FFNs fused, against plain AOT autograd."""
    layer = CapacityAllToAllMoE(HIDDEN, FFN_HIDDEN, 2 * world, 2, ep_group=dist.group.WORLD, seed=5)
    x = tokens(rank, TOKENS, HIDDEN, torch.float32, "balanced")
    torch._dynamo.reset()
    plain = named_step_results(layer, torch.compile(layer, backend="aot_eager", fullgraph=True, dynamic=False), x,
                               True)
    report = FusionReport()
    torch._dynamo.reset()
    ffn_only = backend(passes=["ffn"], report=report, compiler="eager")
    fused = named_step_results(layer, torch.compile(layer, backend=ffn_only, fullgraph=True, dynamic=False), x, True)
    return {"plain": plain, "fused": fused, "patterns": sorted({e.pattern for e in report.fused()})}


def test_in_place_collectives_train_like_plain_aot_when_only_the_ffns_fuse():
    """Functionalization turns the out= collective's hand-over into ``aten.copy``, which has no
    autograd formula: before, this compile failed ("derivative for aten::copy is not implemented")."""
    for rank, result in enumerate(run_ranks(WORLD, _in_place_collectives, timeout=400)):
        assert result["patterns"] == ["ffn"], rank
        assert set(result["plain"]) == set(result["fused"])
        for key, want in result["plain"].items():
            torch.testing.assert_close(result["fused"][key], want, rtol=2e-5, atol=2e-5, msg=f"rank {rank} {key}")
