"""MoeDistributeDispatchV2 / ``npu_moe_distribute_dispatch_v2`` (SPEC §3).

Sends each token to the ranks of its top-k experts over the EP group (optionally quantizing it to
int8 per copy), then all-gathers over the TP group. Inputs: ``x`` ``(BS, H)`` bf16/fp16 (fp32 on
the portable target), ``expert_ids`` ``(BS, K)`` int32; outputs sized by the receive capacity ``A``
(``moe_distribute_common.recv_capacity``), exactly as torch_npu's Meta function sizes them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from ..errors import fail
from ..targets import get_target, is_device_target
from ._proto import (INT32_MAX, GeAttr, GeInput, GeOutput, OpProto, OutSpec, require, require_dim, require_dtype,
                     require_in, require_shape)
from .moe_distribute_common import ASSIST_ROW_STRIDE, DEVICE_X_DTYPES, X_DTYPES, DistConfig, check_dist_attrs

NAME = "npu_moe_distribute_dispatch_v2"
SCHEMA = (
    "(Tensor x, Tensor expert_ids, str group_ep, int ep_world_size, int ep_rank_id, int moe_expert_num, *, "
    "Tensor? scales=None, Tensor? x_active_mask=None, Tensor? expert_scales=None, Tensor? elastic_info=None, "
    "Tensor? performance_info=None, str group_tp=\"\", int tp_world_size=0, int tp_rank_id=0, "
    "int expert_shard_type=0, int shared_expert_num=1, int shared_expert_rank_num=0, int quant_mode=0, "
    "int global_bs=0, int expert_token_nums_type=1, str comm_alg=\"\", int zero_expert_num=0, "
    "int copy_expert_num=0, int const_expert_num=0, int? y_dtype=None, int? x_dtype=None, int? scales_dtype=None) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
)
QUANT_NONE, QUANT_DYNAMIC = 0, 2


@dataclass(frozen=True)
class DispatchConfig:
    """A validated ``npu_moe_distribute_dispatch_v2`` call: this rank's ``DistConfig`` and the
    dispatch-only attrs that shape the outputs."""

    dist: DistConfig
    quant_mode: int                 # 0 or 2 (dynamic int8)
    expert_scales: bool             # expert_scales given (expand_scales is then (A,), not (0,))
    expert_token_nums_type: int     # 1 counts, 0 inclusive prefix sums

    @property
    def out_dtype(self) -> torch.dtype:
        """``expand_x``'s dtype: x's, int8 with ``quant_mode`` 2."""
        return self.dist.dtype if self.quant_mode == QUANT_NONE else torch.int8


def validate(x: torch.Tensor, expert_ids: torch.Tensor, group_ep: str, ep_world_size: int, ep_rank_id: int,
             moe_expert_num: int, *, scales: Optional[torch.Tensor] = None,
             x_active_mask: Optional[torch.Tensor] = None, expert_scales: Optional[torch.Tensor] = None,
             elastic_info: Optional[torch.Tensor] = None, performance_info: Optional[torch.Tensor] = None,
             group_tp: str = "", tp_world_size: int = 0, tp_rank_id: int = 0, expert_shard_type: int = 0,
             shared_expert_num: int = 1, shared_expert_rank_num: int = 0, quant_mode: int = 0, global_bs: int = 0,
             expert_token_nums_type: int = 1, comm_alg: str = "", zero_expert_num: int = 0,
             copy_expert_num: int = 0, const_expert_num: int = 0, y_dtype: Optional[int] = None,
             x_dtype: Optional[int] = None, scales_dtype: Optional[int] = None) -> DispatchConfig:
    """Every structural rule of SPEC §3.5 for the current target; returns the resolved config."""
    require_dim(NAME, "x", x, (2,))
    require_dim(NAME, "expert_ids", expert_ids, (2,))
    require_dtype(NAME, "x", x, DEVICE_X_DTYPES if is_device_target() else X_DTYPES)
    require_dtype(NAME, "expert_ids", expert_ids, (torch.int32,))
    bs, h = x.shape
    k = expert_ids.size(1)
    require(expert_ids.size(0) == bs, NAME, "expert_ids", f"must have BS = x.size(0) = {bs} rows",
            f"shape {tuple(expert_ids.shape)}")
    # fp8/hifloat8/fp4/MX variants (Ascend950) are out of scope (SPEC §3.1).
    for arg, value in (("y_dtype", y_dtype), ("x_dtype", x_dtype), ("scales_dtype", scales_dtype)):
        require(value is None, NAME, arg, "must be None (fp8/fp4 variants are not supported)", value)
    require_in(NAME, "expert_token_nums_type", expert_token_nums_type, (0, 1))
    cfg = check_dist_attrs(
        NAME, bs=bs, k=k, h=h, dtype=x.dtype, group_ep=group_ep, world=ep_world_size, rank=ep_rank_id,
        moe_experts=moe_expert_num, group_tp=group_tp, tp_world=tp_world_size, tp_rank=tp_rank_id,
        expert_shard_type=expert_shard_type, shared_num=shared_expert_num, shared_ranks=shared_expert_rank_num,
        global_bs=global_bs, comm_alg=comm_alg, zero_experts=zero_expert_num, copy_experts=copy_expert_num,
        const_experts=const_expert_num, x_active_mask=x_active_mask, elastic_info=elastic_info,
        performance_info=performance_info)
    # 1 is static quant, which the device rejects ("cannot support static quant now").
    require_in(NAME, "quant_mode", quant_mode, (QUANT_NONE, QUANT_DYNAMIC))
    if scales is not None:
        require(quant_mode == QUANT_DYNAMIC, NAME, "scales", "must be None unless quant_mode == 2 (smooth quant)",
                f"quant_mode={quant_mode}")
        require_dtype(NAME, "scales", scales, (torch.float32,))
        require_shape(NAME, "scales", scales, (cfg.n_shared + moe_expert_num, h))
    if expert_scales is not None:
        require_dtype(NAME, "expert_scales", expert_scales, (torch.float32,))
        require_shape(NAME, "expert_scales", expert_scales, (bs, k))
        # ep_recv_counts then also holds the hierarchy metadata: an int32-indexed buffer.
        entries = ep_recv_entries(cfg, True)
        if not entries <= INT32_MAX:
            fail(NAME, "expert_scales", f"must keep ep_recv_counts (W * L + global_bs_real * 2 * K * (W // 8) entries) "
                 f"<= {INT32_MAX}", f"{int(entries)} entries")
    elif get_target() == "A2":
        require(comm_alg != "hierarchy", NAME, "expert_scales", "is required with comm_alg 'hierarchy' on A2", None)
    return DispatchConfig(dist=cfg, quant_mode=quant_mode, expert_scales=expert_scales is not None,
                          expert_token_nums_type=expert_token_nums_type)


def ep_recv_entries(cfg: DistConfig, expert_scales: bool) -> Any:
    """Length of ``ep_recv_counts`` (torch_npu's Meta, SPEC §3.2)."""
    w = cfg.world
    if expert_scales:
        # A2/A3 Meta appends the hierarchy reduce metadata (and drops the TP factor).
        return w * cfg.meta_local_experts + cfg.global_bs * 2 * cfg.top_k * (w // 8)
    return w * cfg.meta_local_experts * (cfg.tp_world if cfg.tp_world == 2 else 1)


def infer_shape(config: DispatchConfig) -> tuple[OutSpec, ...]:
    """torch_npu's Meta shapes (SPEC §3.2) with ``A`` from the validated config."""
    cfg = config.dist
    bs, k, h = cfg.num_tokens, cfg.top_k, cfg.hidden
    a, tp = cfg.capacity, cfg.tp_world
    ep_counts = ep_recv_entries(cfg, config.expert_scales)
    return (
        OutSpec((a * cfg.tp_factor, h), config.out_dtype),                            # expand_x
        OutSpec((a * tp,) if tp == 2 else (a,), torch.float32),                       # dynamic_scales
        OutSpec((torch.sym_max(bs * k, a * ASSIST_ROW_STRIDE),), torch.int32),        # assist_info_for_combine
        OutSpec((cfg.meta_local_experts,), torch.int64),                              # expert_token_nums
        OutSpec((ep_counts,), torch.int32),                                           # ep_recv_counts
        OutSpec((tp,), torch.int32),                                                  # tp_recv_counts
        OutSpec((a,) if config.expert_scales else (0,), torch.float32),               # expand_scales
    )


PROTO: OpProto[DispatchConfig] = OpProto(
    name=NAME,
    schema=SCHEMA,
    ge_type="MoeDistributeDispatchV2",
    ge_inputs=(
        GeInput("x", ("DT_BF16", "DT_FLOAT16")),
        GeInput("expert_ids", ("DT_INT32",)),
        GeInput("scales", ("DT_FLOAT",), "optional"),
        GeInput("x_active_mask", ("DT_BOOL",), "optional"),
        GeInput("expert_scales", ("DT_FLOAT",), "optional"),
        GeInput("elastic_info", ("DT_INT32",), "optional"),
        GeInput("performance_info", ("DT_INT64",), "optional"),
    ),
    ge_attrs=(
        GeAttr("group_ep", "Str", required=True), GeAttr("ep_world_size", "Int", required=True),
        GeAttr("ep_rank_id", "Int", required=True), GeAttr("moe_expert_num", "Int", required=True),
        GeAttr("group_tp", "Str", ""), GeAttr("tp_world_size", "Int", 0), GeAttr("tp_rank_id", "Int", 0),
        GeAttr("expert_shard_type", "Int", 0), GeAttr("shared_expert_num", "Int", 1),
        GeAttr("shared_expert_rank_num", "Int", 0), GeAttr("quant_mode", "Int", 0), GeAttr("global_bs", "Int", 0),
        GeAttr("expert_token_nums_type", "Int", 1), GeAttr("comm_alg", "Str", ""),
        GeAttr("zero_expert_num", "Int", 0), GeAttr("copy_expert_num", "Int", 0),
        GeAttr("const_expert_num", "Int", 0), GeAttr("y_dtype", "Int", 0),
    ),
    ge_outputs=(
        GeOutput("expand_x", ("DT_BF16", "DT_INT8", "DT_FLOAT16", "DT_FLOAT8_E5M2", "DT_FLOAT8_E4M3FN", "DT_HIFLOAT8")),
        GeOutput("dynamic_scales", ("DT_FLOAT", "DT_FLOAT8_E8M0")),
        GeOutput("expand_idx", ("DT_INT32",)),
        GeOutput("expert_token_nums", ("DT_INT64",)),
        GeOutput("ep_recv_count", ("DT_INT32",)),
        GeOutput("tp_recv_count", ("DT_INT32",)),
        GeOutput("expand_scales", ("DT_FLOAT",)),
    ),
    validate=validate,
    infer_shape=infer_shape,
    communicates=True,
)
