"""MoeDistributeCombineAddRmsNorm / ``npu_moe_distribute_combine_add_rms_norm`` (SPEC §4).

Combine (as ``npu_moe_distribute_combine_v2``) fused with a residual add and RmsNorm:
``x = combine + residual_x``; ``y = x / sqrt(mean(x^2) + norm_eps) * gamma``. ``residual_x``
``(BS, 1, H)`` and ``gamma`` ``(H,)`` in the ``expand_x`` dtype (bf16 on A3). Outputs ``y``
``(BS, 1, H)``, ``rstd`` ``(BS, 1, 1)`` fp32, ``x`` ``(BS, 1, H)``. A3 only (and portable).
"""
from __future__ import annotations

from typing import Optional

import torch

from ._proto import GeAttr, GeInput, GeOutput, OpProto, OutSpec, require, require_same_dtype, require_shape
from .moe_distribute_combine_v2 import GE_ATTRS_HEAD, GE_ATTRS_SPECIAL, GE_INPUTS_HEAD, GE_INPUTS_TAIL, validate_combine
from .moe_distribute_common import DistConfig

NAME = "npu_moe_distribute_combine_add_rms_norm"
SCHEMA = (
    "(Tensor expand_x, Tensor expert_ids, Tensor expand_idx, Tensor ep_send_counts, Tensor expert_scales, "
    "Tensor residual_x, Tensor gamma, str group_ep, int ep_world_size, int ep_rank_id, int moe_expert_num, *, "
    "Tensor? tp_send_counts=None, Tensor? x_active_mask=None, Tensor? activation_scale=None, "
    "Tensor? weight_scale=None, Tensor? group_list=None, Tensor? expand_scales=None, "
    "Tensor? shared_expert_x=None, Tensor? elastic_info=None, Tensor? ori_x=None, "
    "Tensor? const_expert_alpha_1=None, Tensor? const_expert_alpha_2=None, Tensor? const_expert_v=None, "
    "str group_tp=\"\", int tp_world_size=0, int tp_rank_id=0, int expert_shard_type=0, int shared_expert_num=1, "
    "int shared_expert_rank_num=0, int global_bs=0, int out_dtype=0, int comm_quant_mode=0, "
    "int group_list_type=0, str comm_alg=\"\", float norm_eps=1e-06, int zero_expert_num=0, "
    "int copy_expert_num=0, int const_expert_num=0) -> (Tensor, Tensor, Tensor)"
)
DEVICE_X_DTYPES = (torch.bfloat16,)


def validate(expand_x: torch.Tensor, expert_ids: torch.Tensor, expand_idx: torch.Tensor,
             ep_send_counts: torch.Tensor, expert_scales: torch.Tensor, residual_x: torch.Tensor,
             gamma: torch.Tensor, group_ep: str, ep_world_size: int, ep_rank_id: int, moe_expert_num: int, *,
             activation_scale: Optional[torch.Tensor] = None, weight_scale: Optional[torch.Tensor] = None,
             group_list: Optional[torch.Tensor] = None, out_dtype: int = 0, group_list_type: int = 0,
             norm_eps: float = 1e-6, **kwargs: object) -> DistConfig:
    """SPEC §4.4: the combine rules plus residual_x/gamma and the reserved arguments; returns the
    resolved config."""
    cfg = validate_combine(NAME, expand_x, expert_ids, expand_idx, ep_send_counts, expert_scales, group_ep,
                           ep_world_size, ep_rank_id, moe_expert_num, assist_arg="expand_idx",
                           device_x_dtypes=DEVICE_X_DTYPES, **kwargs)
    # Reserved quantized-FFN inputs of the V1 prototype: no semantics are defined for them.
    for arg, t in (("activation_scale", activation_scale), ("weight_scale", weight_scale), ("group_list", group_list)):
        require(t is None, NAME, arg, "must be None (reserved)", "a tensor")
    for arg, value in (("out_dtype", out_dtype), ("group_list_type", group_list_type)):
        require(value == 0, NAME, arg, "must be 0 (reserved)", value)
    bs, h = cfg.num_tokens, cfg.hidden
    require_same_dtype(NAME, "residual_x", residual_x, "expand_x", expand_x)
    require_shape(NAME, "residual_x", residual_x, (bs, 1, h))
    require_same_dtype(NAME, "gamma", gamma, "expand_x", expand_x)
    require_shape(NAME, "gamma", gamma, (h,))
    return cfg


def infer_shape(config: DistConfig) -> tuple[OutSpec, ...]:
    """``y`` ``(BS, 1, H)``, ``rstd`` ``(BS, 1, 1)`` fp32 (fp64 for fp64 expand_x, portable), ``x``
    ``(BS, 1, H)``; y and x in the expand_x dtype."""
    bs, h, dtype = config.num_tokens, config.hidden, config.dtype
    rstd_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    return (OutSpec((bs, 1, h), dtype), OutSpec((bs, 1, 1), rstd_dtype), OutSpec((bs, 1, h), dtype))


_BF16 = ("DT_BF16",)


def _bf16_only(ge_input: GeInput) -> GeInput:
    """The fused op takes bf16 wherever combine_v2 takes bf16/fp16/int32 activations."""
    return GeInput(ge_input.name, _BF16, ge_input.kind) if "DT_BF16" in ge_input.dtypes else ge_input
PROTO: OpProto[DistConfig] = OpProto(
    name=NAME,
    schema=SCHEMA,
    ge_type="MoeDistributeCombineAddRmsNorm",
    ge_inputs=tuple(_bf16_only(i) for i in GE_INPUTS_HEAD[:2] + (GeInput("assist_info", ("DT_INT32",)),)
                    + GE_INPUTS_HEAD[3:] + (GeInput("residual_x", _BF16), GeInput("gamma", _BF16)) + GE_INPUTS_TAIL),
    ge_attrs=GE_ATTRS_HEAD + (GeAttr("norm_eps", "Float", 1e-6),) + GE_ATTRS_SPECIAL,
    ge_outputs=(GeOutput("y", _BF16), GeOutput("rstd", ("DT_FLOAT",)), GeOutput("x", _BF16)),
    validate=validate,
    infer_shape=infer_shape,
    targets=frozenset({"portable", "A3"}),
    communicates=True,
)
