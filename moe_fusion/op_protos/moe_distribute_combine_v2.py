"""MoeDistributeCombineV2 / ``npu_moe_distribute_combine_v2`` (SPEC §4).

The inverse route of dispatch: expert-side rows ``expand_x`` ``(max(T,1)*A, H)`` go back to the
token's rank (after a TP reduce-scatter), where each token's rows are summed with its
``expert_scales`` ``(BS, K)`` fp32 weights (shared experts unweighted), plus the zero/copy/const
experts computed locally from ``ori_x``. Output ``(BS, H)`` in the ``expand_x`` dtype.

``validate_combine`` holds the rules shared with ``npu_moe_distribute_combine_add_rms_norm``.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..targets import get_target, is_device_target
from ._proto import (GeAttr, GeInput, GeOutput, OpProto, OutSpec, require, require_dim, require_dtype, require_in,
                     require_same_dtype, require_shape, shape_of)
from .moe_distribute_common import (ASSIST_ROW_STRIDE, DEVICE_X_DTYPES, PORTABLE_SCALE_DTYPES, SCALE_DTYPES, X_DTYPES,
                                    DistConfig, check_dist_attrs)

NAME = "npu_moe_distribute_combine_v2"
SCHEMA = (
    "(Tensor expand_x, Tensor expert_ids, Tensor assist_info_for_combine, Tensor ep_send_counts, "
    "Tensor expert_scales, str group_ep, int ep_world_size, int ep_rank_id, int moe_expert_num, *, "
    "Tensor? tp_send_counts=None, Tensor? x_active_mask=None, Tensor? expand_scales=None, "
    "Tensor? shared_expert_x=None, Tensor? elastic_info=None, Tensor? ori_x=None, "
    "Tensor? const_expert_alpha_1=None, Tensor? const_expert_alpha_2=None, Tensor? const_expert_v=None, "
    "Tensor? performance_info=None, str group_tp=\"\", int tp_world_size=0, int tp_rank_id=0, "
    "int expert_shard_type=0, int shared_expert_num=1, int shared_expert_rank_num=0, int global_bs=0, "
    "int comm_quant_mode=0, str comm_alg=\"\", int zero_expert_num=0, int copy_expert_num=0, "
    "int const_expert_num=0) -> Tensor"
)
COMM_QUANT_NONE, COMM_QUANT_INT8 = 0, 2


def validate_combine(op: str, expand_x: torch.Tensor, expert_ids: torch.Tensor, assist_info: torch.Tensor,
                     ep_send_counts: torch.Tensor, expert_scales: torch.Tensor, group_ep: str, ep_world_size: int,
                     ep_rank_id: int, moe_expert_num: int, *, assist_arg: str, device_x_dtypes: tuple,
                     tp_send_counts: Optional[torch.Tensor] = None, x_active_mask: Optional[torch.Tensor] = None,
                     expand_scales: Optional[torch.Tensor] = None, shared_expert_x: Optional[torch.Tensor] = None,
                     elastic_info: Optional[torch.Tensor] = None, ori_x: Optional[torch.Tensor] = None,
                     const_expert_alpha_1: Optional[torch.Tensor] = None,
                     const_expert_alpha_2: Optional[torch.Tensor] = None,
                     const_expert_v: Optional[torch.Tensor] = None, performance_info: Optional[torch.Tensor] = None,
                     group_tp: str = "", tp_world_size: int = 0, tp_rank_id: int = 0, expert_shard_type: int = 0,
                     shared_expert_num: int = 1, shared_expert_rank_num: int = 0, global_bs: int = 0,
                     comm_quant_mode: int = 0, comm_alg: str = "", zero_expert_num: int = 0,
                     copy_expert_num: int = 0, const_expert_num: int = 0) -> DistConfig:
    """SPEC §4.4 rules common to both combine ops; ``assist_arg`` names the assist-info argument.
    Returns the resolved config (both combine ops' config)."""
    require_dim(op, "expand_x", expand_x, (2,))
    require_dtype(op, "expand_x", expand_x, device_x_dtypes if is_device_target() else X_DTYPES)
    require_dim(op, "expert_ids", expert_ids, (2,))
    require_dtype(op, "expert_ids", expert_ids, (torch.int32,))
    require_dim(op, assist_arg, assist_info, (1,))
    require_dtype(op, assist_arg, assist_info, (torch.int32,))
    require_dim(op, "ep_send_counts", ep_send_counts, (1,))
    require_dtype(op, "ep_send_counts", ep_send_counts, (torch.int32,))
    bs, k = expert_ids.shape
    h = expand_x.size(1)
    require_dtype(op, "expert_scales", expert_scales, SCALE_DTYPES if is_device_target() else PORTABLE_SCALE_DTYPES)
    require_shape(op, "expert_scales", expert_scales, (bs, k))
    cfg = check_dist_attrs(
        op, bs=bs, k=k, h=h, dtype=expand_x.dtype, group_ep=group_ep, world=ep_world_size, rank=ep_rank_id,
        moe_experts=moe_expert_num, group_tp=group_tp, tp_world=tp_world_size, tp_rank=tp_rank_id,
        expert_shard_type=expert_shard_type, shared_num=shared_expert_num, shared_ranks=shared_expert_rank_num,
        global_bs=global_bs, comm_alg=comm_alg, zero_experts=zero_expert_num, copy_experts=copy_expert_num,
        const_experts=const_expert_num, x_active_mask=x_active_mask, elastic_info=elastic_info,
        performance_info=performance_info)
    # The own row count is the last entry of this rank's part of the prefix sums.
    require(ep_send_counts.size(0) >= cfg.recv_slots, op, "ep_send_counts",
            f"must have at least {cfg.recv_slots} entries ({'W' if cfg.is_shared_rank else 'W * L'})",
            f"shape {shape_of(ep_send_counts)}")
    if tp_send_counts is not None or tp_world_size == 2:
        # The TP reduce-scatter needs both ranks' row counts (pass dispatch's tp_recv_counts).
        require(tp_send_counts is not None, op, "tp_send_counts", "is required when tp_world_size == 2", None)
        require_dtype(op, "tp_send_counts", tp_send_counts, (torch.int32,))
        require_shape(op, "tp_send_counts", tp_send_counts, (tp_world_size,))
    if expand_scales is not None:
        require_dim(op, "expand_scales", expand_scales, (1,))
        require_dtype(op, "expand_scales", expand_scales, (torch.float32,))
    elif get_target() == "A2":
        require(comm_alg != "hierarchy", op, "expand_scales", "is required with comm_alg 'hierarchy' on A2", None)
    if shared_expert_x is not None:
        require_same_dtype(op, "shared_expert_x", shared_expert_x, "expand_x", expand_x)
        require_dim(op, "shared_expert_x", shared_expert_x, (2, 3))
        sx = shared_expert_x
        require(sx.size(-1) == h and (sx.size(0) if sx.dim() == 2 else sx.size(0) * sx.size(1)) == bs, op,
                "shared_expert_x", f"must have shape ({bs}, {h}) or (a, b, {h}) with a * b = {bs}",
                f"shape {shape_of(sx)}")
        if is_device_target():
            require(shared_expert_rank_num == 0, op, "shared_expert_x",
                    "must be None when shared_expert_rank_num > 0 (the kernel rule, SPEC §9 #5)", "a tensor")
    specials = {"copy_expert_num": copy_expert_num, "const_expert_num": const_expert_num}
    if ori_x is not None or copy_expert_num or const_expert_num:
        needed_by = ", ".join(f"{n}={v}" for n, v in specials.items() if v) or "given"
        require(ori_x is not None, op, "ori_x", "is required when copy_expert_num or const_expert_num > 0", needed_by)
        require_same_dtype(op, "ori_x", ori_x, "expand_x", expand_x)
        require_shape(op, "ori_x", ori_x, (bs, h))
    _validate_const_experts(op, expand_x, const_expert_num, h, const_expert_alpha_1, const_expert_alpha_2,
                            const_expert_v)
    require_in(op, "comm_quant_mode", comm_quant_mode, (COMM_QUANT_NONE, COMM_QUANT_INT8))
    if comm_quant_mode == COMM_QUANT_INT8:
        # Int8 comm quant applies to the EP return only; the TP reduce-scatter is unquantized.
        require(tp_world_size < 2, op, "comm_quant_mode", "must be 0 when tp_world_size == 2", comm_quant_mode)
        if get_target() == "A2":
            require(comm_alg == "hierarchy", op, "comm_quant_mode", "must be 0 on A2 unless comm_alg is 'hierarchy'",
                    comm_quant_mode)
    if is_device_target():
        _validate_device_sizes(op, cfg, expand_x, assist_info, assist_arg, ep_send_counts)
    return cfg


def _validate_const_experts(op, expand_x, q, h, alpha1, alpha2, v) -> None:
    """``alpha_1/2`` ``(Q,)`` (the kernel's scalar per expert) or ``(Q, H)`` (the docs' form, applied
    elementwise, SPEC §9 #4); ``v`` ``(Q, H)``; all three required when ``Q > 0``."""
    for arg, t in (("const_expert_alpha_1", alpha1), ("const_expert_alpha_2", alpha2), ("const_expert_v", v)):
        if t is None:
            require(q == 0, op, arg, "is required when const_expert_num > 0", None)
            continue
        require_same_dtype(op, arg, t, "expand_x", expand_x)
        shapes = ((q, h),) if arg == "const_expert_v" else ((q,), (q, h))
        require(tuple(t.shape) in shapes, op, arg, "must have shape " + " or ".join(map(str, shapes)),
                f"shape {shape_of(t)}")


def _validate_device_sizes(op, cfg: DistConfig, expand_x, assist_info, assist_arg, ep_send_counts) -> None:
    """A3/A2 tiling size rules (with ``max(T, 1)`` as intended, SPEC §9 #23)."""
    a, tf = cfg.capacity, cfg.tp_factor
    require(expand_x.size(0) >= a * tf, op, "expand_x", f"must have at least max(T, 1) * A = {a * tf} rows",
            f"shape {shape_of(expand_x)}")
    require(assist_info.size(0) >= a * ASSIST_ROW_STRIDE, op, assist_arg,
            f"must have at least A * {ASSIST_ROW_STRIDE} = {a * ASSIST_ROW_STRIDE} entries",
            f"shape {shape_of(assist_info)}")
    require(ep_send_counts.size(0) >= cfg.recv_slots * tf, op, "ep_send_counts",
            f"must have at least {cfg.recv_slots * tf} entries", f"shape {shape_of(ep_send_counts)}")


def validate(expand_x: torch.Tensor, expert_ids: torch.Tensor, assist_info_for_combine: torch.Tensor,
             ep_send_counts: torch.Tensor, expert_scales: torch.Tensor, group_ep: str, ep_world_size: int,
             ep_rank_id: int, moe_expert_num: int, **kwargs: object) -> DistConfig:
    """Every structural rule of SPEC §4.4 for the current target; returns the resolved config."""
    return validate_combine(NAME, expand_x, expert_ids, assist_info_for_combine, ep_send_counts, expert_scales,
                            group_ep, ep_world_size, ep_rank_id, moe_expert_num, assist_arg="assist_info_for_combine",
                            device_x_dtypes=DEVICE_X_DTYPES, **kwargs)


def infer_shape(config: DistConfig) -> tuple[OutSpec, ...]:
    """``(BS, H)`` in the expand_x dtype."""
    return (OutSpec((config.num_tokens, config.hidden), config.dtype),)


_XS = ("DT_BF16", "DT_FLOAT16", "DT_INT32")
GE_INPUTS_HEAD = (
    GeInput("expand_x", _XS),
    GeInput("expert_ids", ("DT_INT32",)),
    GeInput("assist_info_for_combine", ("DT_INT32",)),
    GeInput("ep_send_counts", ("DT_INT32",)),
    GeInput("expert_scales", ("DT_FLOAT",)),
)
GE_INPUTS_TAIL = (
    GeInput("tp_send_counts", ("DT_INT32",), "optional"),
    GeInput("x_active_mask", ("DT_BOOL",), "optional"),
    GeInput("activation_scale", ("DT_FLOAT",), "optional"),
    GeInput("weight_scale", ("DT_FLOAT",), "optional"),
    GeInput("group_list", ("DT_INT64",), "optional"),
    GeInput("expand_scales", ("DT_FLOAT",), "optional"),
    GeInput("shared_expert_x", _XS, "optional"),
    GeInput("elastic_info", ("DT_INT32",), "optional"),
    GeInput("ori_x", _XS, "optional"),
    GeInput("const_expert_alpha_1", _XS, "optional"),
    GeInput("const_expert_alpha_2", _XS, "optional"),
    GeInput("const_expert_v", _XS, "optional"),
)
GE_ATTRS_HEAD = (
    GeAttr("group_ep", "Str", required=True), GeAttr("ep_world_size", "Int", required=True),
    GeAttr("ep_rank_id", "Int", required=True), GeAttr("moe_expert_num", "Int", required=True),
    GeAttr("group_tp", "Str", ""), GeAttr("tp_world_size", "Int", 0), GeAttr("tp_rank_id", "Int", 0),
    GeAttr("expert_shard_type", "Int", 0), GeAttr("shared_expert_num", "Int", 1),
    GeAttr("shared_expert_rank_num", "Int", 0), GeAttr("global_bs", "Int", 0), GeAttr("out_dtype", "Int", 0),
    GeAttr("comm_quant_mode", "Int", 0), GeAttr("group_list_type", "Int", 0), GeAttr("comm_alg", "Str", ""),
)
GE_ATTRS_SPECIAL = (GeAttr("zero_expert_num", "Int", 0), GeAttr("copy_expert_num", "Int", 0),
                    GeAttr("const_expert_num", "Int", 0))

PROTO: OpProto[DistConfig] = OpProto(
    name=NAME,
    schema=SCHEMA,
    ge_type="MoeDistributeCombineV2",
    ge_inputs=GE_INPUTS_HEAD + GE_INPUTS_TAIL + (GeInput("performance_info", ("DT_INT64",), "optional"),),
    ge_attrs=GE_ATTRS_HEAD + GE_ATTRS_SPECIAL,
    ge_outputs=(GeOutput("x", ("DT_BF16", "DT_FLOAT16")),),
    validate=validate,
    infer_shape=infer_shape,
    communicates=True,
)
