"""End-to-end tier: ``torch.compile(model, backend=torchair.get_npu_backend(cfg))`` on CPU tensors
runs dynamo, AOT and torchair up to the GE graph, whose text dump parses back into a GE
``GraphDef`` holding the fused ops, wired to each other. One compile per model."""
from __future__ import annotations

import pytest
import torch
from ge_graphs import attrs, compile_ge_graph, data_shape, node, output_dtypes, wiring

from moe_fusion.ge_plugin.ir import check_op_def

M, BS, H, K = 4, 5, 16, 2          # experts, tokens, hidden size, top-k


def moe_layer(x, expert_ids, expert_scales, w1, w2):
    """dispatch_v2 → FFN → combine_v2, one FFN over all received rows (2-D weights)."""
    expand_x, _, assist_info, _, ep_recv_counts, tp_recv_counts, _ = torch.ops.moe_fusion.npu_moe_distribute_dispatch_v2(
        x, expert_ids, "ep_group", 1, 0, M, global_bs=BS)
    y = torch.ops.moe_fusion.npu_ffn(expand_x, w1, w2, "fastgelu", inner_precise=1)
    return torch.ops.moe_fusion.npu_moe_distribute_combine_v2(
        y, expert_ids, assist_info, ep_recv_counts, expert_scales, "ep_group", 1, 0, M, tp_send_counts=tp_recv_counts,
        global_bs=BS)


def grouped_moe_layer(x, expert_ids, expert_scales, w1, w2):
    """dispatch_v2 → grouped FFN → combine_v2: the per-expert row counts stay on the device."""
    expand_x, _, assist_info, expert_token_nums, ep_recv_counts, tp_recv_counts, _ = (
        torch.ops.moe_fusion.npu_moe_distribute_dispatch_v2(x, expert_ids, "ep_group", 1, 0, M, global_bs=BS))
    y = torch.ops.moe_fusion.npu_ffn_grouped(expand_x, w1, w2, "fastgelu", expert_tokens=expert_token_nums,
                                             inner_precise=1)
    return torch.ops.moe_fusion.npu_moe_distribute_combine_v2(
        y, expert_ids, assist_info, ep_recv_counts, expert_scales, "ep_group", 1, 0, M, tp_send_counts=tp_recv_counts,
        global_bs=BS)


@pytest.mark.parametrize("layer,w_lead", [(moe_layer, ()), (grouped_moe_layer, (M,))], ids=["ffn", "ffn_grouped"])
def test_moe_layer_is_dispatch_ffn_combine(torchair, tmp_path, layer, w_lead):
    g = torch.Generator().manual_seed(0)
    expert_ids = torch.stack([torch.randperm(M, generator=g)[:K] for _ in range(BS)]).int()
    inputs = (torch.randn(BS, H, generator=g).bfloat16(), expert_ids, torch.rand(BS, K, generator=g),
              torch.randn(*w_lead, H, 32, generator=g).bfloat16(), torch.randn(*w_lead, 32, H, generator=g).bfloat16())
    graph = compile_ge_graph(torchair, layer, inputs, tmp_path)

    dispatch, ffn = node(graph, "MoeDistributeDispatchV2"), node(graph, "FFN")
    combine = node(graph, "MoeDistributeCombineV2")
    for op in (dispatch, ffn, combine):
        check_op_def(op)
    d, f, c = wiring(dispatch), wiring(ffn), wiring(combine)
    assert data_shape(graph, d["x"]) == [BS, H]
    assert f["x"] == f"{dispatch.name}:0"
    assert f["expert_tokens"] == (f"{dispatch.name}:3" if w_lead else "")
    assert (data_shape(graph, f["weight1"]), data_shape(graph, f["weight2"])) == ([*w_lead, H, 32], [*w_lead, 32, H])
    assert c["expand_x"] == f"{ffn.name}:0"
    assert c["expert_ids"] == d["expert_ids"]
    assert (c["assist_info_for_combine"], c["ep_send_counts"], c["tp_send_counts"]) == (
        f"{dispatch.name}:2", f"{dispatch.name}:4", f"{dispatch.name}:5")
    assert data_shape(graph, c["expert_scales"]) == [BS, K]
    assert node(graph, "NetOutput").input[0] == f"{combine.name}:0"

    assert {k: attrs(dispatch)[k] for k in ("group_ep", "ep_world_size", "ep_rank_id", "moe_expert_num", "global_bs",
                                            "y_dtype")} == {
        "group_ep": "ep_group", "ep_world_size": 1, "ep_rank_id": 0, "moe_expert_num": M, "global_bs": BS,
        "y_dtype": torchair.ge.DataType.DT_BF16}
    assert attrs(ffn) == {"activation": "fastgelu", "inner_precise": 1, "output_dtype": -1, "tokens_index_flag": False}
    assert attrs(combine)["group_ep"] == "ep_group" and attrs(combine)["global_bs"] == BS
    assert output_dtypes(dispatch)[0] == output_dtypes(ffn)[0] == output_dtypes(combine)[0] == "DT_BF16"


def local_ops(tokens, counts, expert_ids, eplb_table, x, w1, w2):
    """Each local op once; FFN consumes MoeReRouting's permuted tokens."""
    permuted, _, token_idx, _ = torch.ops.moe_fusion.npu_moe_re_routing(tokens, counts, expert_token_num_type=1)
    balanced_ids, _ = torch.ops.moe_fusion.npu_moe_update_expert(expert_ids, eplb_table, local_rank_id=1,
                                                                  world_size=2)
    y = torch.ops.moe_fusion.npu_ffn(permuted, w1, w2, "silu", expert_tokens=[3, 5])
    return y * 2, token_idx, balanced_ids, torch.ops.moe_fusion.npu_ffn(x, w1[0], w2[0], "relu")


def test_local_ops_appear_with_their_attrs(torchair, tmp_path):
    g = torch.Generator().manual_seed(0)
    table = torch.tensor([[2, 0, 1], [1, 2, 0], [2, 3, 1], [1, 3, 0]], dtype=torch.int32)
    inputs = (torch.randn(8, 16, generator=g).half(), torch.tensor([[2, 1], [3, 2]], dtype=torch.int32),
              torch.randint(0, 4, (3, 2), generator=g), table, torch.randn(4, 16, generator=g).half(),
              torch.randn(2, 16, 8, generator=g).half(), torch.randn(2, 8, 16, generator=g).half())
    graph = compile_ge_graph(torchair, local_ops, inputs, tmp_path)

    re_routing, update = node(graph, "MoeReRouting"), node(graph, "MoeUpdateExpert")
    ffns = sorted((op for op in graph.op if op.type == "FFN"), key=lambda op: attrs(op)["activation"])
    for op in (re_routing, update, *ffns):
        check_op_def(op)
    assert attrs(re_routing) == {"expert_token_num_type": 1, "idx_type": 0}
    assert wiring(re_routing)["per_token_scales"] == ""
    assert attrs(update) == {"local_rank_id": 1, "world_size": 2, "balance_mode": 0}
    assert output_dtypes(update) == ["DT_INT64", "DT_BOOL"]
    plain, experts = ffns                   # "relu", "silu"
    assert wiring(experts)["x"] == f"{re_routing.name}:0"
    assert attrs(experts) == {"activation": "silu", "inner_precise": 0, "output_dtype": -1, "tokens_index_flag": False}
    assert wiring(plain)["expert_tokens"] == "" and data_shape(graph, wiring(plain)["x"]) == [4, 16]
    assert output_dtypes(plain) == output_dtypes(experts) == ["DT_FLOAT16"]
