"""MoeUpdateExpert / ``npu_moe_update_expert`` (SPEC §2).

Maps each token's logical top-k experts to physical expert instances through ``eplb_table``
(load balancing), and optionally prunes low-weight experts.

``expert_ids`` ``(BS, K)`` int32/int64; ``eplb_table`` ``(N_log, F)`` int32 with rows
``[count, inst_0, ..., inst_{F-2}]``; ``expert_scales`` ``(BS, K)`` fp32/fp16/bf16;
``pruning_threshold`` ``(K,)`` or ``(1, K)`` fp32; ``active_mask`` ``(BS,)`` bool.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from ..errors import fail
from ..targets import is_device_target
from ._proto import (INT32_MAX, GeAttr, GeInput, GeOutput, OpProto, OutSpec, require, require_dim,
                     require_dtype, require_in, require_range, require_shape, shape_of)

NAME = "npu_moe_update_expert"
SCHEMA = (
    "(Tensor expert_ids, Tensor eplb_table, *, Tensor? expert_scales=None, Tensor? pruning_threshold=None, "
    "Tensor? active_mask=None, int local_rank_id=-1, int world_size=-1, int balance_mode=0) -> (Tensor, Tensor)"
)
# Device (A3 tiling) limits, SPEC §2.4.
MAX_BS, MAX_K, MAX_LOGICAL_EXPERTS, MAX_WORLD, MAX_F_MODE1 = 512, 16, 1024, 768, 769
# Every target, balance_mode 0: world_size sizes nothing but enters the replica pick
# local_rank_id // ceil(world_size / count), computed in int32 by the device and the ONNX body:
# world_size <= 2**16 (more ranks than any cluster has; the device's own bound is 768), and the
# ceil-division numerator world_size + count - 1 with count <= F - 1 must stay in int32, which bounds F
# (only a stride-0 table can be that wide).
PORTABLE_MAX_WORLD = 2**16


@dataclass(frozen=True)
class UpdateExpertConfig:
    """A validated ``npu_moe_update_expert`` call. Sizes are SymInts at trace time."""

    num_tokens: Any             # BS, rows of expert_ids
    top_k: Any                  # K, columns of expert_ids
    num_logical: Any            # N_log, rows of eplb_table
    table_width: Any            # F = 1 + the most replicas a row can list
    ids_dtype: torch.dtype      # expert_ids' dtype, also balanced_expert_ids'
    balance_mode: int
    local_rank_id: int
    world_size: int


def validate(expert_ids: torch.Tensor, eplb_table: torch.Tensor, *, expert_scales: Optional[torch.Tensor] = None,
             pruning_threshold: Optional[torch.Tensor] = None, active_mask: Optional[torch.Tensor] = None,
             local_rank_id: int = -1, world_size: int = -1, balance_mode: int = 0) -> UpdateExpertConfig:
    """Structural rules (SPEC §2.4) for the current target; returns the call's config.

    Messages are built only on failure (``if not ...: fail``): this runs on every eager call.
    """
    require_dim(NAME, "expert_ids", expert_ids, (2,))
    require_dtype(NAME, "expert_ids", expert_ids, (torch.int32, torch.int64))
    require_dim(NAME, "eplb_table", eplb_table, (2,))
    require_dtype(NAME, "eplb_table", eplb_table, (torch.int32,))
    bs, k = expert_ids.shape
    n_logical, f = eplb_table.shape
    if not bs > 0:
        fail(NAME, "expert_ids", "must have BS > 0 rows", f"shape {shape_of(expert_ids)}")
    if not k > 0:
        fail(NAME, "expert_ids", "must have K > 0 columns", f"shape {shape_of(expert_ids)}")
    if not n_logical > 0:
        fail(NAME, "eplb_table", "must have at least one logical expert row", f"shape {shape_of(eplb_table)}")
    # Column 0 is the replica count; at least one instance column must follow it.
    if not f > 1:
        fail(NAME, "eplb_table", "must have F > 1 columns ([count, instances...])", f"shape {shape_of(eplb_table)}")
    require_in(NAME, "balance_mode", balance_mode, (0, 1))
    if balance_mode == 0:
        # Mode 0 picks a replica from the rank's position in the world.
        require(world_size >= 1, NAME, "world_size", "must be >= 1 when balance_mode == 0", world_size)
        require(world_size <= PORTABLE_MAX_WORLD, NAME, "world_size",
                f"must be <= {PORTABLE_MAX_WORLD} when balance_mode == 0 (int32 replica arithmetic)", world_size)
        if not world_size + f - 2 <= INT32_MAX:
            fail(NAME, "eplb_table", f"must have F <= {INT32_MAX + 2 - world_size} columns when balance_mode == 0 "
                 "(world_size + F - 2 must fit int32)", f"shape {shape_of(eplb_table)}")
        require_range(NAME, "local_rank_id", local_rank_id, 0, world_size - 1)
    if expert_scales is not None or pruning_threshold is not None or active_mask is not None:
        _validate_pruning_inputs(bs, k, expert_scales, pruning_threshold, active_mask)
    if is_device_target():
        require(bs <= MAX_BS, NAME, "expert_ids", f"BS must be in [1, {MAX_BS}]", f"BS={bs}")
        require(k <= MAX_K, NAME, "expert_ids", f"K must be in [1, {MAX_K}]", f"K={k}")
        require(k <= n_logical, NAME, "expert_ids", f"K must be <= eplb_table.size(0)={n_logical}", f"K={k}")
        require(n_logical <= MAX_LOGICAL_EXPERTS, NAME, "eplb_table",
                f"must have at most {MAX_LOGICAL_EXPERTS} rows", f"shape {shape_of(eplb_table)}")
        if balance_mode == 0:
            require(2 <= world_size <= MAX_WORLD, NAME, "world_size", f"must be in [2, {MAX_WORLD}]", world_size)
            require(f <= world_size + 1, NAME, "eplb_table", f"must have F <= world_size + 1 = {world_size + 1} columns",
                    f"shape {shape_of(eplb_table)}")
        else:
            require(f <= MAX_F_MODE1, NAME, "eplb_table", f"must have F <= {MAX_F_MODE1} columns", f"shape {shape_of(eplb_table)}")
    return UpdateExpertConfig(num_tokens=bs, top_k=k, num_logical=n_logical, table_width=f, ids_dtype=expert_ids.dtype,
                              balance_mode=balance_mode, local_rank_id=local_rank_id, world_size=world_size)


def _validate_pruning_inputs(bs, k, expert_scales, pruning_threshold, active_mask) -> None:
    given = tuple(name for name, t in (("expert_scales", expert_scales), ("pruning_threshold", pruning_threshold),
                                       ("active_mask", active_mask)) if t is not None)
    # The kernel knows three configurations only (SPEC §2.4 "tailorCfg").
    allowed = ((), ("expert_scales", "pruning_threshold"), ("expert_scales", "pruning_threshold", "active_mask"))
    require(given in allowed, NAME, "expert_scales/pruning_threshold/active_mask",
            "must be given as none, {expert_scales, pruning_threshold} or all three", "{" + ", ".join(given) + "}")
    if expert_scales is not None:
        require_dtype(NAME, "expert_scales", expert_scales, (torch.float32, torch.float16, torch.bfloat16))
        require_shape(NAME, "expert_scales", expert_scales, (bs, k))
    if pruning_threshold is not None:
        require_dtype(NAME, "pruning_threshold", pruning_threshold, (torch.float32,))
        require(tuple(pruning_threshold.shape) in ((k,), (1, k)), NAME, "pruning_threshold",
                f"must have shape ({k},) or (1, {k})", f"shape {shape_of(pruning_threshold)}")
    if active_mask is not None:
        require_dtype(NAME, "active_mask", active_mask, (torch.bool,))
        require_shape(NAME, "active_mask", active_mask, (bs,))


def validate_values(config: UpdateExpertConfig, flat_ids: torch.Tensor, replica_count: torch.Tensor) -> torch.Tensor:
    """Ids index ``eplb_table`` rows; counts of the rows tokens use index its instance columns.

    ``flat_ids`` ``(BS*K,)`` the expert ids, ``replica_count`` ``(N_log,)`` int32 eplb_table's column
    0. One host read covers both ranges; the used rows are looked at only when some row's count is
    out of range (a row no token uses may hold any count). Returns the counts to map: column 0
    itself, or clamped into ``[1, F-1]`` when an unused row's count is out of range.
    """
    n_logical, f = config.num_logical, config.table_width
    id_low, id_high, count_low, count_high = torch.stack((*torch.aminmax(flat_ids),
                                                           *torch.aminmax(replica_count))).tolist()
    if id_low < 0 or id_high >= n_logical:
        fail(NAME, "expert_ids", f"values must be in [0, {n_logical})", id_low if id_low < 0 else id_high)
    if count_low >= 1 and count_high <= f - 1:
        return replica_count
    used_counts = replica_count.index_select(0, flat_ids)
    bad_counts = (used_counts < 1) | (used_counts > f - 1)
    if bool(bad_counts.any()):
        fail(NAME, "eplb_table", f"replica counts (column 0) of used experts must be in [1, {f - 1}]",
             used_counts[bad_counts][0].item())
    return replica_count.clamp(1, f - 1)


def infer_shape(config: UpdateExpertConfig) -> tuple[OutSpec, ...]:
    """``balanced_expert_ids`` ``(BS, K)`` (expert_ids dtype), ``balanced_active_mask`` ``(BS, K)`` bool."""
    shape = (config.num_tokens, config.top_k)
    return (OutSpec(shape, config.ids_dtype), OutSpec(shape, torch.bool))


PROTO: OpProto[UpdateExpertConfig] = OpProto(
    name=NAME,
    schema=SCHEMA,
    ge_type="MoeUpdateExpert",
    ge_inputs=(
        GeInput("expert_ids", ("DT_INT32", "DT_INT64")),
        GeInput("eplb_table", ("DT_INT32",)),
        GeInput("expert_scales", ("DT_BF16", "DT_FLOAT16", "DT_FLOAT"), "optional"),
        GeInput("pruning_threshold", ("DT_FLOAT",), "optional"),
        GeInput("active_mask", ("DT_BOOL",), "optional"),
    ),
    ge_attrs=(GeAttr("local_rank_id", "Int", -1), GeAttr("world_size", "Int", -1), GeAttr("balance_mode", "Int", 0)),
    ge_outputs=(GeOutput("balanced_expert_ids", ("DT_INT32", "DT_INT64")), GeOutput("balanced_active_mask", ("DT_BOOL",))),
    validate=validate,
    infer_shape=infer_shape,
    targets=frozenset({"portable", "A3"}),
)
