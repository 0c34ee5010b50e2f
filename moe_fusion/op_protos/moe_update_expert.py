"""MoeUpdateExpert / ``npu_moe_update_expert`` (SPEC §2).

Maps each token's logical top-k experts to physical expert instances through ``eplb_table``
(load balancing), and optionally prunes low-weight experts.

``expert_ids`` ``(BS, K)`` int32/int64; ``eplb_table`` ``(N_log, F)`` int32 with rows
``[count, inst_0, ..., inst_{F-2}]``; ``expert_scales`` ``(BS, K)`` fp32/fp16/bf16;
``pruning_threshold`` ``(K,)`` or ``(1, K)`` fp32; ``active_mask`` ``(BS,)`` bool.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..targets import is_device_target
from ._proto import (GeAttr, GeInput, GeOutput, OpProto, OutSpec, require, require_dim,
                     require_dtype, require_in, require_range, require_shape, shape_of)

NAME = "npu_moe_update_expert"
SCHEMA = (
    "(Tensor expert_ids, Tensor eplb_table, *, Tensor? expert_scales=None, Tensor? pruning_threshold=None, "
    "Tensor? active_mask=None, int local_rank_id=-1, int world_size=-1, int balance_mode=0) -> (Tensor, Tensor)"
)
# Device (A3 tiling) limits, SPEC §2.4.
MAX_BS, MAX_K, MAX_LOGICAL_EXPERTS, MAX_WORLD, MAX_F_MODE1 = 512, 16, 1024, 768, 769


def validate(expert_ids: torch.Tensor, eplb_table: torch.Tensor, *, expert_scales: Optional[torch.Tensor] = None,
             pruning_threshold: Optional[torch.Tensor] = None, active_mask: Optional[torch.Tensor] = None,
             local_rank_id: int = -1, world_size: int = -1, balance_mode: int = 0) -> None:
    require_dim(NAME, "expert_ids", expert_ids, (2,))
    require_dtype(NAME, "expert_ids", expert_ids, (torch.int32, torch.int64))
    require_dim(NAME, "eplb_table", eplb_table, (2,))
    require_dtype(NAME, "eplb_table", eplb_table, (torch.int32,))
    bs, k = expert_ids.shape
    n_logical, f = eplb_table.shape
    require(bs > 0, NAME, "expert_ids", "must have BS > 0 rows", f"shape {shape_of(expert_ids)}")
    require(k > 0, NAME, "expert_ids", "must have K > 0 columns", f"shape {shape_of(expert_ids)}")
    require(n_logical > 0, NAME, "eplb_table", "must have at least one logical expert row", f"shape {shape_of(eplb_table)}")
    # Column 0 is the replica count; at least one instance column must follow it.
    require(f > 1, NAME, "eplb_table", "must have F > 1 columns ([count, instances...])", f"shape {shape_of(eplb_table)}")
    require_in(NAME, "balance_mode", balance_mode, (0, 1))
    if balance_mode == 0:
        # Mode 0 picks a replica from the rank's position in the world.
        require(world_size >= 1, NAME, "world_size", "must be >= 1 when balance_mode == 0", world_size)
        require_range(NAME, "local_rank_id", local_rank_id, 0, world_size - 1)
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


def validate_values(expert_ids: torch.Tensor, eplb_table: torch.Tensor, **_: object) -> None:
    """Ids index ``eplb_table`` rows; counts of the rows tokens use index its instance columns."""
    n_logical, f = eplb_table.shape
    low, high = (int(v) for v in torch.aminmax(expert_ids))
    if low < 0 or high >= n_logical:
        require(False, NAME, "expert_ids", f"values must be in [0, {n_logical})", low if low < 0 else high)
    counts = eplb_table[:, 0]
    low, high = (int(v) for v in torch.aminmax(counts))
    if low >= 1 and high <= f - 1:
        return  # every row is valid: no need to look at which rows are used
    used_counts = counts.index_select(0, expert_ids.reshape(-1))
    bad_counts = (used_counts < 1) | (used_counts > f - 1)
    if bool(bad_counts.any()):
        require(False, NAME, "eplb_table", f"replica counts (column 0) of used experts must be in [1, {f - 1}]",
                used_counts[bad_counts][0].item())


def infer_shape(expert_ids: torch.Tensor, eplb_table: torch.Tensor, **_: object) -> tuple[OutSpec, ...]:
    shape = tuple(expert_ids.shape)
    return (OutSpec(shape, expert_ids.dtype), OutSpec(shape, torch.bool))


PROTO = OpProto(
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
    validate_values=validate_values,
    targets=frozenset({"portable", "A3"}),
)
