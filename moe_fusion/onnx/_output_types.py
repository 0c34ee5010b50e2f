"""Element types of each GE node's outputs, from its input types and attrs (ONNX ``TensorProto``
enums; 0 where an input the rule needs is absent or untyped). Mirrors the protos' ``infer_shape``
dtype rules (SPEC §2.2, §3.3, §4.2, §5.2, §6.2, §7.2)."""
from __future__ import annotations

from typing import Any, Callable

from onnx import TensorProto as T

Types = dict[str, int]


def _ffn(i: Types, a: dict[str, Any]) -> list[int]:
    if i.get("x") == T.INT8:
        return [T.BFLOAT16 if a["output_dtype"] == 1 else T.FLOAT16]
    return [i.get("x", 0)]


def _dispatch(i: Types, a: dict[str, Any]) -> list[int]:
    expand_x = i.get("x", 0) if a["quant_mode"] == 0 else T.INT8
    return [expand_x, T.FLOAT, T.INT32, T.INT64, T.INT32, T.INT32, T.FLOAT]


RULES: dict[str, Callable[[Types, dict[str, Any]], list[int]]] = {
    "npu_moe_re_routing": lambda i, a: [i.get("tokens", 0), i.get("per_token_scales", T.FLOAT), T.INT32,
                                        i.get("expert_token_num_per_rank", 0)],
    "npu_moe_update_expert": lambda i, a: [i.get("expert_ids", 0), T.BOOL],
    "npu_ffn": _ffn,
    "npu_ffn_grouped": _ffn,
    "npu_alltoall_allgather_bmm": lambda i, a: [i.get("x", 0)] * 3,
    "npu_bmm_reducescatter_alltoall": lambda i, a: [i.get("x", 0)],
    "npu_moe_distribute_dispatch_v2": _dispatch,
    "npu_moe_distribute_combine_v2": lambda i, a: [i.get("expand_x", 0)],
    "npu_moe_distribute_combine_add_rms_norm": lambda i, a: [i.get("expand_x", 0), T.FLOAT, i.get("expand_x", 0)],
}


def output_types(op_name: str, input_types: Types, attrs: dict[str, Any]) -> list[int]:
    """Output element types of ``op_name``'s GE node, in GE output order."""
    return RULES[op_name](input_types, attrs)
