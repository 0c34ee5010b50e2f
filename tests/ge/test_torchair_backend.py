"""``moe_fusion.torchair_backend()`` end to end: ``torch.compile`` of the unfused DeepSpeed-style
demo layer (fake process group: rank 0 of EP=2 x TP=2) on CPU tensors runs dynamo, torchair's AOT
and the fusion passes up to the GE graph, whose text dump holds the fused ops for target A3,
wired to each other, with no collective left of the fused parts. One compile per model.

The demo gate's ``F.one_hot`` traces to ``aten._assert_async`` range checks, which torchair has no
GE converter for: a user pre-pass drops them (it runs after the fusion passes, which also tests
that a pre-pass already in the config is kept).
"""
from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from ge_graphs import (attrs, compile_ge_graph, compile_training_ge_graphs, data_shape, node, nodes, output_dtypes,
                       wiring)

import moe_fusion
from moe_fusion.demo.deepspeed_layer import DeepSpeedMoE
from moe_fusion.demo.moe_layers import TrainableAllGatherEPMoE
from moe_fusion.ge_plugin.ir import check_op_def
from moe_fusion.passes import FusionReport

TOKENS, H, M, E = 8, 16, 32, 4          # A3: H <= 65535, M/tp <= 65535, E/ep = 2 <= 32, ep = tp = 2
COLLECTIVES = ("HcomAllToAll", "HcomAllToAllV", "HcomAllGather", "HcomAllGatherV", "HcomReduceScatter",
               "HcomReduceScatterV")


def drop_async_asserts(gm: torch.fx.GraphModule, example_inputs: list, config: Any) -> None:
    """A torchair pre-pass removing ``aten._assert_async`` checks (no GE converter) and what only they used."""
    for n in list(gm.graph.nodes):
        if n.op == "call_function" and n.target is torch.ops.aten._assert_async.msg:
            gm.graph.erase_node(n)
    gm.graph.eliminate_dead_code()
    gm.recompile()


class SharedExpertMoE(torch.nn.Module):
    """The demo layer plus a dense shared-expert MLP (H -> 4H -> H, tanh GELU), summed."""

    def __init__(self, moe: DeepSpeedMoE, dtype: torch.dtype) -> None:
        super().__init__()
        self.moe = moe
        self.up, self.down = torch.nn.Linear(H, 4 * H, dtype=dtype), torch.nn.Linear(4 * H, H, dtype=dtype)
        self.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.moe(x) + self.down(F.gelu(self.up(x), approximate="tanh"))


def compile_fused(torchair, model: torch.nn.Module, x: torch.Tensor, tmp_path) -> tuple[Any, FusionReport]:
    """The GE graph of ``model(x)`` compiled with ``moe_fusion.torchair_backend`` (A3), and its
    report. Static shapes, also when other tests compiled the demo layer at other sizes before."""
    report = FusionReport()

    def make_backend(config):
        config.post_grad_custom_pre_pass = drop_async_asserts
        return moe_fusion.torchair_backend(config, report=report)

    with torch.no_grad(), torch._dynamo.config.patch(automatic_dynamic_shapes=False):
        graph = compile_ge_graph(torchair, model, (x,), tmp_path, make_backend)
    return graph, report


@pytest.mark.parametrize("shard,dtype,activation,shard_type,act_type", [
    ("capacity", torch.bfloat16, "gelu", 1, 1),
    ("hidden", torch.float16, "relu", 0, 3),
])
def test_deepspeed_layer_becomes_the_bmm_pair(torchair, fake_world, tmp_path, shard, dtype, activation, shard_type,
                                              act_type):
    ep_group, tp_group = fake_world
    layer = DeepSpeedMoE(H, M, E, ep_group=ep_group, tp_group=tp_group, shard=shard, activation=activation, dtype=dtype)
    graph, report = compile_fused(torchair, layer, torch.randn(TOKENS, H).to(dtype), tmp_path)

    assert [e.pattern for e in report.fused()] == ["alltoall_allgather_bmm", "bmm_reducescatter_alltoall"]
    forward, reverse = node(graph, "AlltoAllAllGatherBatchMatMul"), node(graph, "BatchMatMulReduceScatterAlltoAll")
    for op in (forward, reverse):
        check_op_def(op)
    assert wiring(reverse)["x"] == f"{forward.name}:0"
    assert data_shape(graph, wiring(forward)["weight"]) == [E // 2, H, M // 2]
    assert data_shape(graph, wiring(reverse)["weight"]) == [E // 2, M // 2, H]
    groups = {"group_ep": ep_group.group_name, "ep_world_size": 2, "group_tp": tp_group.group_name,
              "tp_world_size": 2, "transpose_weight": False}
    assert attrs(forward) == {**groups, "x_shard_type": shard_type, "act_type": act_type, "output_y2_flag": False,
                              "output_y3_flag": False}
    assert attrs(reverse) == {**groups, "y_shard_type": shard_type}
    dt = {torch.bfloat16: "DT_BF16", torch.float16: "DT_FLOAT16"}[dtype]
    assert output_dtypes(forward)[0] == output_dtypes(reverse)[0] == dt
    # Left: the combine's all-reduce over TP (capacity) or all-gather of H columns (hidden).
    left = {op.type for op in graph.op if op.type.startswith("Hcom")}
    assert left == ({"HcomAllReduce"} if shard == "capacity" else {"HcomAllGather"})
    assert len(nodes(graph, "HcomAllGather")) == (shard == "hidden")


def test_shared_expert_mlp_becomes_ffn(torchair, fake_world, tmp_path, monkeypatch):
    # GE compiles the fused ops to CANN's kernels: the cost gate, which leaves bf16 FFNs unfused
    # under inductor on CPUs that multiply bf16 natively, never applies here.
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    ep_group, tp_group = fake_world
    moe = DeepSpeedMoE(H, M, E, ep_group=ep_group, tp_group=tp_group, dtype=torch.bfloat16)
    model = SharedExpertMoE(moe, torch.bfloat16)
    x = torch.randn(TOKENS, H).bfloat16()
    graph, report = compile_fused(torchair, model, x, tmp_path)

    assert sorted(e.pattern for e in report.fused()) == ["alltoall_allgather_bmm", "bmm_reducescatter_alltoall", "ffn"]
    forward, reverse = node(graph, "AlltoAllAllGatherBatchMatMul"), node(graph, "BatchMatMulReduceScatterAlltoAll")
    ffn = node(graph, "FFN")
    check_op_def(ffn)
    assert wiring(reverse)["x"] == f"{forward.name}:0"
    assert attrs(ffn) == {"activation": "gelu", "inner_precise": 0, "output_dtype": -1, "tokens_index_flag": False}
    f = wiring(ffn)
    assert data_shape(graph, f["x"]) == [TOKENS, H] and f["bias1"] and f["bias2"] and f["expert_tokens"] == ""
    assert output_dtypes(ffn) == ["DT_BF16"]
    assert not [op.type for op in graph.op if op.type in COLLECTIVES]
    # The shared expert's matmuls are gone; the gate's stays.
    assert report.ops_after["aten.addmm.default"] == report.ops_after["aten.mm.default"] - 1 == 0


def test_config_keeps_one_fusion_pre_pass_and_the_users(torchair):
    def user_pass(gm, example_inputs, config):
        pass

    config = torchair.CompilerConfig()
    config.post_grad_custom_pre_pass = user_pass
    moe_fusion.torchair_backend(config)
    moe_fusion.torchair_backend(config, target="portable")
    installed = config.post_grad_custom_pre_pass.value
    assert installed is not user_pass and installed.user_pass is user_pass


class TanhMLP(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = torch.nn.Linear(H, 4 * H), torch.nn.Linear(4 * H, H)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x), approximate="tanh"))


MATMULS = ("MatMul", "MatMulV2", "BatchMatMul", "BatchMatMulV2")


def compile_training(torchair, model: torch.nn.Module, x: torch.Tensor, tmp_path, target: str) -> tuple:
    """``(forward, backward, report)``: the GE graphs of a training step of ``model(x)`` compiled
    with ``moe_fusion.torchair_backend``."""
    report = FusionReport()

    def make_backend(config):
        config.post_grad_custom_pre_pass = drop_async_asserts
        return moe_fusion.torchair_backend(config, target=target, report=report)

    with torch._dynamo.config.patch(automatic_dynamic_shapes=False):
        forward, backward = compile_training_ge_graphs(torchair, model, (x,), tmp_path, make_backend)
    return forward, backward, report


def test_training_step_graphs_hold_the_fused_ffn_and_its_backward(torchair, tmp_path):
    """Parameters that require grad: the graph is fused before torchair's AOT autograd, instead of
    refused for its saved intermediates. The forward GE graph holds the FFN node and no matmul; the
    backward graph holds the formula's matmuls and returns the five gradients."""
    forward, backward, report = compile_training(torchair, TanhMLP(), torch.randn(TOKENS, H, requires_grad=True),
                                                 tmp_path, "portable")
    assert [e.pattern for e in report.fused()] == ["ffn"], report.format()
    assert len(nodes(forward, "FFN")) == 1
    assert not [op.type for op in forward.op if op.type in MATMULS]
    assert not nodes(backward, "FFN")
    # dx, dW1, dW2, the activation's gradient, and h recomputed: five matmuls.
    assert len([op for op in backward.op if op.type in MATMULS]) == 5
    assert len([i for i in node(backward, "NetOutput").input if not i.startswith("^")]) == 5   # x, W1, b1, W2, b2


def test_training_step_refuses_a_block_whose_backward_ge_cannot_run(torchair, fake_world, tmp_path):
    """The AllGather-EP block would need ``npu_ffn_grouped``'s backward, which has no GE operator: in
    a training step the block is refused with that reason (in inference it fuses), its expert FFNs
    still fuse, and both graphs convert, the collectives' adjoints in the backward."""
    ep_group, _ = fake_world
    layer = TrainableAllGatherEPMoE(1024, 64, 4, 2, ep_group=ep_group, shared_expert=True, dtype=torch.float16)
    x = torch.randn(TOKENS, 1024, dtype=torch.float16, requires_grad=True)
    forward, backward, report = compile_training(torchair, layer, x, tmp_path, "A3")

    refused = [e for e in report.events if e.pattern == "moe_allgather_ep" and not e.fused]
    assert refused and "npu_ffn_grouped" in refused[0].detail and "no GE operator" in refused[0].detail, report.format()
    assert len(nodes(forward, "FFN")) == 3                       # two local experts and the shared one
    assert {op.type for op in forward.op if op.type.startswith("Hcom")} == {"HcomAllGather", "HcomReduceScatter"}
    assert not nodes(backward, "FFN")
    # The all-gathers' adjoints are reduce-scatters and the reduce-scatter's an all-gather.
    assert {op.type for op in backward.op if op.type.startswith("Hcom")} == {"HcomAllGather", "HcomReduceScatter"}


@pytest.mark.parametrize("target,fuses", [("portable", True), ("A3", False)])
def test_hf_batched_mm_experts_build_a_ge_graph(torchair, tmp_path, target, fuses):
    """HF's batched_mm experts, rewritten into a sort, npu_ffn_grouped and the inverse permutation:
    every op of the rewrite has a GE converter (a non-stable Sort, Range, SearchSorted), so the graph
    builds. A3's FFN has no GLU with experts: refused there, with the op's reason."""
    pytest.importorskip("transformers")
    from integration.test_hf_transformers import make_block

    block = make_block("mixtral", "batched_mm", hidden=16, inner=32).to(torch.float16)
    report = FusionReport()
    with torch.no_grad():
        graph = compile_ge_graph(torchair, block, (torch.randn(2, 6, 16).half(),), tmp_path,
                                 make_backend=lambda config: moe_fusion.torchair_backend(config, target, report=report))
    types = [op.type for op in graph.op]
    if fuses:
        assert [e.detail.split(",")[0] for e in report.fused("ffn")] == ["npu_ffn_grouped(swiglu"], report.format()
        assert types.count("FFN") == 1 and "Sort" in types and "SearchSorted" in types
        assert attrs(node(graph, "FFN"))["tokens_index_flag"] is True
        assert "BatchMatMulV2" not in types and "BatchMatMul" not in types
    else:
        assert not report.fused() and "FFN" not in types
        assert any("swiglu is not supported with experts on A2/A3" in e.detail for e in report.refused("ffn"))
