"""GE converters of the MoE communication ops: MoeDistributeDispatchV2, MoeDistributeCombineV2,
MoeDistributeCombineAddRmsNorm (SPEC §3.1, §4.1). Group names pass through as strings (HCCL
communicator names on an NPU); converters never resolve them."""
from __future__ import annotations

from typing import Any

from torchair import ge

from ._emit import Args, converter, emit, pick

_SPECIAL_EXPERT_ATTRS = ("zero_expert_num", "copy_expert_num", "const_expert_num")
_COMBINE_ATTRS = ("group_ep", "ep_world_size", "ep_rank_id", "moe_expert_num", "group_tp", "tp_world_size",
                  "tp_rank_id", "expert_shard_type", "shared_expert_num", "shared_expert_rank_num", "global_bs",
                  "comm_quant_mode", "comm_alg") + _SPECIAL_EXPERT_ATTRS
_COMBINE_OPTIONAL_INPUTS = ("tp_send_counts", "x_active_mask", "expand_scales", "shared_expert_x", "elastic_info",
                            "ori_x", "const_expert_alpha_1", "const_expert_alpha_2", "const_expert_v")


@converter("npu_moe_distribute_dispatch_v2")
def moe_distribute_dispatch_v2(a: Args) -> Any:
    """Pass-through, plus the ``y_dtype`` attr: the GE dtype of ``expand_x``, int8 when
    ``quant_mode != 0``, else the dtype of ``x``. The fp8/fp4 dtype overrides (``y_dtype``,
    ``x_dtype``, ``scales_dtype`` arguments) are rejected at trace time and never reach GE."""
    attrs = pick(a, "group_ep", "ep_world_size", "ep_rank_id", "moe_expert_num", "group_tp", "tp_world_size",
                 "tp_rank_id", "expert_shard_type", "shared_expert_num", "shared_expert_rank_num", "quant_mode",
                 "global_bs", "expert_token_nums_type", "comm_alg", *_SPECIAL_EXPERT_ATTRS)
    attrs["y_dtype"] = a["x"].dtype if a["quant_mode"] == 0 else ge.DataType.DT_INT8
    return emit("MoeDistributeDispatchV2", attrs=attrs, inputs=pick(
        a, "x", "expert_ids", "scales", "x_active_mask", "expert_scales", "elastic_info", "performance_info"))


@converter("npu_moe_distribute_combine_v2")
def moe_distribute_combine_v2(a: Args) -> Any:
    """Pass-through. The GE prototype keeps three V1 inputs the torch op lacks
    (``activation_scale``, ``weight_scale``, ``group_list``: left empty) and two attrs
    (``out_dtype``, ``group_list_type``: 0, as torch_npu sets them)."""
    inputs = pick(a, "expand_x", "expert_ids", "assist_info_for_combine", "ep_send_counts", "expert_scales",
                  *_COMBINE_OPTIONAL_INPUTS, "performance_info")
    return emit("MoeDistributeCombineV2", inputs=inputs,
                attrs={**pick(a, *_COMBINE_ATTRS), "out_dtype": 0, "group_list_type": 0})


@converter("npu_moe_distribute_combine_add_rms_norm")
def moe_distribute_combine_add_rms_norm(a: Args) -> Any:
    """Pass-through; the torch argument ``expand_idx`` is the GE input ``assist_info``."""
    inputs = {"assist_info": a["expand_idx"], **pick(
        a, "expand_x", "expert_ids", "ep_send_counts", "expert_scales", "residual_x", "gamma", "activation_scale",
        "weight_scale", "group_list", *_COMBINE_OPTIONAL_INPUTS)}
    return emit("MoeDistributeCombineAddRmsNorm", inputs=inputs,
                attrs=pick(a, *_COMBINE_ATTRS, "out_dtype", "group_list_type", "norm_eps"))
