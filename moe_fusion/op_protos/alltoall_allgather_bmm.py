"""AlltoAllAllGatherBatchMatMul / ``npu_alltoall_allgather_bmm`` (SPEC §6), and the rules it
shares with its reverse ``npu_bmm_reducescatter_alltoall``.

All-to-all of ``x`` over the EP group, all-gather over the TP group, then a batch matmul per
local expert (+ bias, + activation). With ``ep``/``tp`` the group sizes and ``shard_type`` 0
(gather on H) or 1 (gather on C):

* ``x`` ``(E, C, H/tp)`` (shard 0) or ``(E, C/tp, H)`` (shard 1); fp16/bf16 (fp32 portable)
* ``weight`` ``(E/ep, H, M/tp)``, x's dtype; any strides. aclnn's "transposed weight" is the
  transpose view of a contiguous ``(E/ep, M/tp, H)`` tensor: it has the same logical shape and
  the same meaning, so the op takes it as is; ``transpose_weight(weight)`` derives the GE attr.
* ``bias`` ``(E/ep, 1, M/tp)`` or ``(E/ep, M/tp)``: fp16 for fp16 x, fp32 for bf16/fp32 x
* ``y1``, ``y3`` ``(E/ep, ep*C, M/tp)``, ``y2`` ``(E/ep, ep*C, H)`` (``ep*C`` rows in both shard
  types); ``y2``/``y3`` are ``(0, 0, 0)`` unless requested.

GE attrs differ in name from the torch schema: ``ep_world_size = group_ep_worldsize``,
``tp_world_size = group_tp_worldsize``, ``x_shard_type = shard_type``, ``output_y2_flag =
need_allgather_out``, ``output_y3_flag = need_activation_feature``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Union

import torch

from ..targets import get_target, is_device_target
from ._proto import (PORTABLE_FLOATS, float_bias_dtype, GeAttr, GeInput, GeOutput, OpProto, OutSpec, dtype_name, require, require_dim,
                     require_dtype, require_in, shape_of)

NAME = "npu_alltoall_allgather_bmm"
SCHEMA = (
    "(Tensor x, Tensor weight, str group_ep, int group_ep_worldsize, str group_tp, int group_tp_worldsize, *, "
    "Tensor? bias=None, int shard_type=0, int act_type=0, bool need_allgather_out=False, "
    "bool need_activation_feature=False) -> (Tensor, Tensor, Tensor)"
)
# act_type codes; the public wrapper also takes these names, case-insensitively (MindSpeed).
ACT_TYPES = {"none": 0, "gelu": 1, "silu": 2, "relu": 3, "fastgelu": 4}
DEVICE_WORLD_SIZES = (2, 4, 8, 16, 32)
# Every target: a group of more than 32 ranks exists on no device (SPEC §6.4), and the group sizes
# multiply output rows (y1/y2/y3 have ep * C rows; shard_type 1 gathers tp * (C / tp)), so the portable
# target keeps the device's largest value as its bound.
MAX_WORLD_SIZE = DEVICE_WORLD_SIZES[-1]
DEVICE_MAX_EXPERTS, DEVICE_MAX_LOCAL_EXPERTS, DEVICE_MAX_DIM = 512, 32, 65535
MAX_GROUP_NAME = 127
TARGETS = frozenset({"portable", "A3"})   # A3 only on device (SPEC §6.5)


@dataclass(frozen=True)
class AllGatherBmmConfig:
    """A validated ``npu_alltoall_allgather_bmm`` call. Sizes are SymInts at trace time."""

    ep: int                     # group_ep_worldsize
    tp: int                     # group_tp_worldsize
    shard_type: int             # 0 gathers H, 1 gathers C
    local_experts: Any          # E/ep
    rows: Any                   # ep*C rows of y1/y2/y3 per local expert
    hidden: Any                 # H
    cols: Any                   # M/tp
    dtype: torch.dtype          # x's (and every output's) dtype
    act_type: int
    need_allgather_out: bool
    need_activation_feature: bool


def act_type_code(act_type: Union[int, str]) -> int:
    """The op-level int for an ``act_type`` given as an int or a case-insensitive name."""
    if isinstance(act_type, str):
        require(act_type.lower() in ACT_TYPES, NAME, "act_type",
                "must be one of ('None', 'GeLu', 'SiLu', 'ReLu', 'FastGeLu') (case-insensitive) or 0..4", repr(act_type))
        return ACT_TYPES[act_type.lower()]
    return act_type


def transpose_weight(weight: torch.Tensor) -> bool:
    """True when ``weight`` is the transpose view of a contiguous tensor (aclnn's
    ``IsTransposeLastTwoDims``): the GE ``transpose_weight`` attr, read from a FakeTensor's strides."""
    if weight.dim() != 3 or weight.is_contiguous():
        return False
    _, rows, cols = weight.shape
    return weight.stride(1) == 1 and weight.stride(2) == rows and weight.stride(0) == rows * cols


def validate_common(op: str, x: torch.Tensor, weight: torch.Tensor, group_ep: str, ep: int, group_tp: str, tp: int,
                    shard_type: int) -> None:
    """Rules both BMM ops share: ranks, dtypes, group names, world sizes, shard type, non-empty dims."""
    device = is_device_target()
    require_dim(op, "x", x, (3,))
    require_dim(op, "weight", weight, (3,))
    require_dtype(op, "x", x, (torch.float16, torch.bfloat16) + (() if device else PORTABLE_FLOATS))
    require(weight.dtype == x.dtype, op, "weight", f"dtype must equal x's ({dtype_name(x.dtype)})", dtype_name(weight.dtype))
    for arg, name in (("group_ep", group_ep), ("group_tp", group_tp)):
        require(isinstance(name, str) and 1 <= len(name) <= MAX_GROUP_NAME, op, arg,
                f"must be a group name of 1 to {MAX_GROUP_NAME} characters", repr(name))
    # aclnn rejects equal names (SPEC §6.4); enforced on every target so portable code stays valid on A3.
    require(group_ep != group_tp, op, "group_tp", "must differ from group_ep", repr(group_tp))
    for arg, size in (("group_ep_worldsize", ep), ("group_tp_worldsize", tp)):
        if device:
            require(size in DEVICE_WORLD_SIZES, op, arg, f"must be one of {DEVICE_WORLD_SIZES} on {get_target()}", size)
        else:
            require(size >= 1, op, arg, "must be >= 1", size)
            require(size <= MAX_WORLD_SIZE, op, arg, f"must be <= {MAX_WORLD_SIZE}", size)
    require_in(op, "shard_type", shard_type, (0, 1))
    for arg, t in (("x", x), ("weight", weight)):
        require(all(d > 0 for d in t.shape), op, arg, "must have no zero-size dim", f"shape {shape_of(t)}")


def validate_experts(op: str, experts: Any, local_experts: Any) -> None:
    """Device limits on ``E`` and ``E/ep`` (the ``E % ep`` rule is a shape rule of each op)."""
    if is_device_target():
        require(2 <= experts <= DEVICE_MAX_EXPERTS, op, "x", f"expert count E must be in [2, {DEVICE_MAX_EXPERTS}] "
                f"on {get_target()}", f"E={experts}")
        require(local_experts <= DEVICE_MAX_LOCAL_EXPERTS, op, "weight",
                f"local expert count E/ep must be <= {DEVICE_MAX_LOCAL_EXPERTS} on {get_target()}", f"E/ep={local_experts}")


def validate_dim_limit(op: str, arg: str, what: str, value: Any) -> None:
    """Device limit on H and M/tp (``<= 65535``)."""
    if is_device_target():
        require(value <= DEVICE_MAX_DIM, op, arg, f"{what} must be <= {DEVICE_MAX_DIM} on {get_target()}", value)


def validate_bias(op: str, bias: Optional[torch.Tensor], x: torch.Tensor, local_experts: Any, cols: Any) -> None:
    """``bias`` ``(E/ep, 1, cols)`` or ``(E/ep, cols)``; fp16 for fp16 x, fp32 for bf16 (and fp32) x,
    fp64 for fp64 x (portable)."""
    if bias is None:
        return
    require_dim(op, "bias", bias, (2, 3))
    want = float_bias_dtype(x.dtype)
    require(bias.dtype == want, op, "bias", f"dtype must be {dtype_name(want)} for {dtype_name(x.dtype)} x",
            dtype_name(bias.dtype))
    shape = (local_experts, 1, cols) if bias.dim() == 3 else (local_experts, cols)
    require(tuple(bias.shape) == shape, op, "bias", f"must have shape {shape}", f"shape {shape_of(bias)}")


def validate(x: torch.Tensor, weight: torch.Tensor, group_ep: str, group_ep_worldsize: int, group_tp: str,
             group_tp_worldsize: int, *, bias: Optional[torch.Tensor] = None, shard_type: int = 0, act_type: int = 0,
             need_allgather_out: bool = False, need_activation_feature: bool = False) -> AllGatherBmmConfig:
    """SPEC §6.4 for the forward op; returns the call's config. Raises OpValidationError."""
    ep, tp = group_ep_worldsize, group_tp_worldsize
    validate_common(NAME, x, weight, group_ep, ep, group_tp, tp, shard_type)
    require_in(NAME, "act_type", act_type, tuple(range(5)))
    # y3 is the pre-activation bmm output: without an activation there is none (aclnn 161002).
    require(not need_activation_feature or act_type != 0, NAME, "need_activation_feature",
            "must be False when act_type is 0 (no activation)", need_activation_feature)
    experts, local = x.size(0), weight.size(0)
    require(local * ep == experts, NAME, "weight", f"must have E/ep = x.size(0) / {ep} experts in dim 0 (x has E={experts})",
            f"shape {shape_of(weight)}")
    validate_experts(NAME, experts, local)
    hidden = weight.size(1)
    if shard_type == 0:
        require(x.size(2) * tp == hidden, NAME, "weight", f"dim 1 must be H = x.size(2) * tp = {x.size(2) * tp} "
                "(shard_type 0 gathers H)", f"shape {shape_of(weight)}")
    else:
        require(x.size(2) == hidden, NAME, "weight", f"dim 1 must be H = x.size(2) = {x.size(2)} (shard_type 1 gathers C)",
                f"shape {shape_of(weight)}")
    validate_dim_limit(NAME, "weight", "H (dim 1)", hidden)
    validate_dim_limit(NAME, "weight", "M/tp (dim 2)", weight.size(2))
    validate_bias(NAME, bias, x, local, weight.size(2))
    return AllGatherBmmConfig(ep=ep, tp=tp, shard_type=shard_type, local_experts=local,
                              rows=x.size(1) * ep * (tp if shard_type == 1 else 1), hidden=hidden, cols=weight.size(2),
                              dtype=x.dtype, act_type=act_type, need_allgather_out=need_allgather_out,
                              need_activation_feature=need_activation_feature)


def infer_shape(config: AllGatherBmmConfig) -> tuple[OutSpec, ...]:
    """``y1`` ``(E/ep, rows, M/tp)``, ``y2`` ``(E/ep, rows, H)``, ``y3`` like y1 (``rows = ep*C``), in
    x's dtype; y2/y3 are ``(0, 0, 0)`` unless requested."""
    local, rows, dtype = config.local_experts, config.rows, config.dtype
    return (
        OutSpec((local, rows, config.cols), dtype),
        OutSpec((local, rows, config.hidden) if config.need_allgather_out else (0, 0, 0), dtype),
        OutSpec((local, rows, config.cols) if config.need_activation_feature else (0, 0, 0), dtype),
    )


_FLOAT = ("DT_FLOAT16", "DT_BF16")
GROUP_ATTRS = (GeAttr("group_ep", "Str", required=True), GeAttr("group_tp", "Str", required=True),
               GeAttr("ep_world_size", "Int", required=True), GeAttr("tp_world_size", "Int", required=True))
PROTO: OpProto[AllGatherBmmConfig] = OpProto(
    name=NAME,
    schema=SCHEMA,
    ge_type="AlltoAllAllGatherBatchMatMul",
    ge_inputs=(GeInput("x", _FLOAT), GeInput("weight", _FLOAT),
               GeInput("bias", ("DT_FLOAT16", "DT_FLOAT", "DT_BF16"), "optional")),
    ge_attrs=GROUP_ATTRS + (GeAttr("x_shard_type", "Int", 0), GeAttr("act_type", "Int", 0),
                            GeAttr("transpose_weight", "Bool", False), GeAttr("output_y2_flag", "Bool", False),
                            GeAttr("output_y3_flag", "Bool", False)),
    ge_outputs=(GeOutput("y1", _FLOAT), GeOutput("y2", _FLOAT), GeOutput("y3", _FLOAT)),
    validate=validate,
    infer_shape=infer_shape,
    targets=TARGETS,
    communicates=True,
)
