"""BatchMatMulReduceScatterAlltoAll / ``npu_bmm_reducescatter_alltoall`` (SPEC §6): the reverse
(and exact adjoint) of ``npu_alltoall_allgather_bmm``.

Batch matmul per local expert, reduce-scatter (sum) over the TP group, + bias, then all-to-all
over the EP group. With ``ep``/``tp`` the group sizes and ``shard_type`` 0 (scatter on H) or 1
(scatter on C):

* ``x`` ``(E/ep, ep*C, M/tp)`` (shard 1: ``ep*C`` rows with ``C % tp == 0``); fp16/bf16 (fp32 portable)
* ``weight`` ``(E/ep, M/tp, H)``, x's dtype; any strides (aclnn's transposed weight is the
  transpose view of a contiguous ``(E/ep, H, M/tp)`` tensor, same logical shape)
* ``bias`` ``(E/ep, 1, H/tp)``/``(E/ep, H/tp)`` (shard 0) or ``(E/ep, 1, H)``/``(E/ep, H)`` (shard 1)
* ``y`` ``(E, C, H/tp)`` (shard 0) or ``(E, C/tp, H)`` (shard 1)

GE attrs: ``ep_world_size``, ``tp_world_size``, ``y_shard_type = shard_type``, ``transpose_weight``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from ._proto import GeAttr, GeInput, GeOutput, OpProto, OutSpec, require, shape_of
from .alltoall_allgather_bmm import (GROUP_ATTRS, TARGETS, validate_bias, validate_common, validate_dim_limit,
                                     validate_experts)

NAME = "npu_bmm_reducescatter_alltoall"
SCHEMA = (
    "(Tensor x, Tensor weight, str group_ep, int group_ep_worldsize, str group_tp, int group_tp_worldsize, *, "
    "Tensor? bias=None, int shard_type=0) -> Tensor"
)


@dataclass(frozen=True)
class ReduceScatterBmmConfig:
    """A validated ``npu_bmm_reducescatter_alltoall`` call. Sizes are SymInts at trace time."""

    ep: int                     # group_ep_worldsize
    tp: int                     # group_tp_worldsize
    shard_type: int             # 0 scatters H, 1 scatters C
    local_experts: Any          # E/ep
    rows: Any                   # ep*C, rows of x per local expert
    hidden: Any                 # H
    dtype: torch.dtype          # x's (and y's) dtype


def validate(x: torch.Tensor, weight: torch.Tensor, group_ep: str, group_ep_worldsize: int, group_tp: str,
             group_tp_worldsize: int, *, bias: Optional[torch.Tensor] = None,
             shard_type: int = 0) -> ReduceScatterBmmConfig:
    """SPEC §6.4 for the reverse op; returns the call's config. Raises OpValidationError."""
    ep, tp = group_ep_worldsize, group_tp_worldsize
    validate_common(NAME, x, weight, group_ep, ep, group_tp, tp, shard_type)
    local = x.size(0)
    require(weight.size(0) == local, NAME, "weight", f"must have E/ep = x.size(0) = {local} experts in dim 0",
            f"shape {shape_of(weight)}")
    validate_experts(NAME, local * ep, local)
    require(weight.size(1) == x.size(2), NAME, "weight", f"dim 1 must be M/tp = x.size(2) = {x.size(2)}",
            f"shape {shape_of(weight)}")
    validate_dim_limit(NAME, "weight", "M/tp (dim 1)", weight.size(1))
    hidden, rows = weight.size(2), x.size(1)
    validate_dim_limit(NAME, "weight", "H (dim 2)", hidden)
    if shard_type == 0:
        require(hidden % tp == 0, NAME, "weight", f"dim 2 (H) must be a multiple of tp={tp} (shard_type 0 scatters H)",
                f"shape {shape_of(weight)}")
        require(rows % ep == 0, NAME, "x", f"dim 1 must be ep*C, a multiple of ep={ep}", f"shape {shape_of(x)}")
    else:
        require(rows % (ep * tp) == 0, NAME, "x", f"dim 1 must be ep*C with C % tp == 0, a multiple of ep*tp={ep * tp} "
                "(shard_type 1 scatters C)", f"shape {shape_of(x)}")
    validate_bias(NAME, bias, x, local, hidden // tp if shard_type == 0 else hidden)
    return ReduceScatterBmmConfig(ep=ep, tp=tp, shard_type=shard_type, local_experts=local, rows=rows, hidden=hidden,
                                  dtype=x.dtype)


def infer_shape(config: ReduceScatterBmmConfig) -> tuple[OutSpec, ...]:
    """``y`` ``(E, C, H/tp)`` (shard 0) or ``(E, C/tp, H)`` (shard 1), x's dtype."""
    ep, tp, hidden = config.ep, config.tp, config.hidden
    experts, c = config.local_experts * ep, config.rows // ep
    shape = (experts, c, hidden // tp) if config.shard_type == 0 else (experts, c // tp, hidden)
    return (OutSpec(shape, config.dtype),)


_FLOAT = ("DT_FLOAT16", "DT_BF16")
PROTO: OpProto[ReduceScatterBmmConfig] = OpProto(
    name=NAME,
    schema=SCHEMA,
    ge_type="BatchMatMulReduceScatterAlltoAll",
    ge_inputs=(GeInput("x", _FLOAT), GeInput("weight", _FLOAT),
               GeInput("bias", ("DT_FLOAT16", "DT_FLOAT", "DT_BF16"), "optional")),
    ge_attrs=GROUP_ATTRS + (GeAttr("y_shard_type", "Int", 0), GeAttr("transpose_weight", "Bool", False)),
    ge_outputs=(GeOutput("y", _FLOAT),),
    validate=validate,
    infer_shape=infer_shape,
    targets=TARGETS,
    communicates=True,
)
