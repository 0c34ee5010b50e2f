"""GE converters of AlltoAllAllGatherBatchMatMul and BatchMatMulReduceScatterAlltoAll (SPEC §6.1).

CANN defines both ops (REG_OP), torchair has no raw op for them. The weight reaches GE as the
logical ``(E/ep, K, N)`` tensor torchair materialized, so ``transpose_weight`` is false (as in
MindSpeed's converters).
"""
from __future__ import annotations

from typing import Any

from ._emit import Args, converter, emit


def _group_attrs(a: Args) -> dict[str, Any]:
    return {"group_ep": a["group_ep"], "group_tp": a["group_tp"], "ep_world_size": a["group_ep_worldsize"],
            "tp_world_size": a["group_tp_worldsize"], "transpose_weight": False}


@converter("npu_alltoall_allgather_bmm")
def alltoall_allgather_bmm(a: Args) -> Any:
    """``shard_type`` is ``x_shard_type``; ``need_allgather_out`` / ``need_activation_feature``
    are ``output_y2_flag`` / ``output_y3_flag`` (GE then produces y2 / y3, else empty tensors)."""
    return emit("AlltoAllAllGatherBatchMatMul", inputs={"x": a["x"], "weight": a["weight"], "bias": a["bias"]},
                attrs={**_group_attrs(a), "x_shard_type": a["shard_type"], "act_type": a["act_type"],
                       "output_y2_flag": a["need_allgather_out"], "output_y3_flag": a["need_activation_feature"]})


@converter("npu_bmm_reducescatter_alltoall")
def bmm_reducescatter_alltoall(a: Args) -> Any:
    """``shard_type`` is ``y_shard_type``."""
    return emit("BatchMatMulReduceScatterAlltoAll", inputs={"x": a["x"], "weight": a["weight"], "bias": a["bias"]},
                attrs={**_group_attrs(a), "y_shard_type": a["shard_type"]})
