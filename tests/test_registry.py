"""Every registered operator has all the pieces of the op contract (DESIGN.md)."""
import importlib

import pytest
import torch
from torch.library import opcheck

import moe_fusion
from moe_fusion.kernels import KERNELS
from moe_fusion.op_protos import PROTOS

OP_NAMES = sorted(PROTOS)


def _cases(name):
    return importlib.import_module(f"cases.{name}").opcheck_cases()


@pytest.mark.parametrize("name", OP_NAMES)
def test_operator_has_every_piece(name):
    proto = PROTOS[name]
    assert proto.name == name and proto.ge_type and proto.schema.startswith("(")
    op = getattr(torch.ops.moe_fusion, name).default
    assert str(op._schema).startswith(f"moe_fusion::{name}(")
    assert torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "Meta"), "no fake kernel"
    assert torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CompositeExplicitAutograd"), "no reference kernel"
    assert name in KERNELS
    assert callable(getattr(moe_fusion, name)), "no public function"
    assert len(_cases(name)) >= 3, "fewer than 3 opcheck cases"


@pytest.mark.parametrize("name", OP_NAMES)
def test_opcheck(name):
    op = getattr(torch.ops.moe_fusion, name).default
    for args, kwargs in _cases(name):
        opcheck(op, args, kwargs)


def test_schemas_are_torch_npus():
    """Schemas parse back to the torch_npu argument names, in order (SPEC §2, §5, §7)."""
    expected = {
        "npu_moe_re_routing": ["tokens", "expert_token_num_per_rank", "per_token_scales", "expert_token_num_type",
                               "idx_type", "tokens_dtype"],
        "npu_moe_update_expert": ["expert_ids", "eplb_table", "expert_scales", "pruning_threshold", "active_mask",
                                  "local_rank_id", "world_size", "balance_mode"],
        "npu_ffn": ["x", "weight1", "weight2", "activation", "expert_tokens", "expert_tokens_index", "bias1", "bias2",
                    "scale", "offset", "deq_scale1", "deq_scale2", "antiquant_scale1", "antiquant_scale2",
                    "antiquant_offset1", "antiquant_offset2", "inner_precise", "output_dtype"],
        "npu_ffn_grouped": ["x", "weight1", "weight2", "activation", "expert_tokens", "bias1", "bias2",
                            "inner_precise", "tokens_index_flag"],
        "npu_alltoall_allgather_bmm": ["x", "weight", "group_ep", "group_ep_worldsize", "group_tp", "group_tp_worldsize",
                                       "bias", "shard_type", "act_type", "need_allgather_out",
                                       "need_activation_feature"],
        "npu_bmm_reducescatter_alltoall": ["x", "weight", "group_ep", "group_ep_worldsize", "group_tp",
                                           "group_tp_worldsize", "bias", "shard_type"],
        "npu_moe_distribute_dispatch_v2": [
            "x", "expert_ids", "group_ep", "ep_world_size", "ep_rank_id", "moe_expert_num", "scales", "x_active_mask",
            "expert_scales", "elastic_info", "performance_info", "group_tp", "tp_world_size", "tp_rank_id",
            "expert_shard_type", "shared_expert_num", "shared_expert_rank_num", "quant_mode", "global_bs",
            "expert_token_nums_type", "comm_alg", "zero_expert_num", "copy_expert_num", "const_expert_num", "y_dtype",
            "x_dtype", "scales_dtype"],
        "npu_moe_distribute_combine_v2": [
            "expand_x", "expert_ids", "assist_info_for_combine", "ep_send_counts", "expert_scales", "group_ep",
            "ep_world_size", "ep_rank_id", "moe_expert_num", "tp_send_counts", "x_active_mask", "expand_scales",
            "shared_expert_x", "elastic_info", "ori_x", "const_expert_alpha_1", "const_expert_alpha_2",
            "const_expert_v", "performance_info", "group_tp", "tp_world_size", "tp_rank_id", "expert_shard_type",
            "shared_expert_num", "shared_expert_rank_num", "global_bs", "comm_quant_mode", "comm_alg",
            "zero_expert_num", "copy_expert_num", "const_expert_num"],
        "npu_moe_distribute_combine_add_rms_norm": [
            "expand_x", "expert_ids", "expand_idx", "ep_send_counts", "expert_scales", "residual_x", "gamma",
            "group_ep", "ep_world_size", "ep_rank_id", "moe_expert_num", "tp_send_counts", "x_active_mask",
            "activation_scale", "weight_scale", "group_list", "expand_scales", "shared_expert_x", "elastic_info",
            "ori_x", "const_expert_alpha_1", "const_expert_alpha_2", "const_expert_v", "group_tp", "tp_world_size",
            "tp_rank_id", "expert_shard_type", "shared_expert_num", "shared_expert_rank_num", "global_bs",
            "out_dtype", "comm_quant_mode", "group_list_type", "comm_alg", "norm_eps", "zero_expert_num",
            "copy_expert_num", "const_expert_num"],
    }
    for name, arg_names in expected.items():
        schema = getattr(torch.ops.moe_fusion, name).default._schema
        assert [a.name for a in schema.arguments] == arg_names
