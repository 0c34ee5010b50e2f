"""Standard-op ONNX bodies of the local ops, one builder per GE op type (SPEC §2.3, §5.4, §6.3, §7.3).

Each builder writes, into a ``Builder``, the computation of one node specialized to its attrs, the
inputs present and their dtypes, and returns ``{GE output name: value}`` for every GE output. A
node it cannot express raises ``Unsupported`` (the node then has no body); a bad attr raises
``OpValidationError`` naming the GE op, the attr and the value. Matmuls run in fp32 and round to
the storage dtype where the reference kernels round (ONNX ``Cast`` rounds half to even, where
FFN's high-precision cast rounds ties away from zero: results differ on exact ties only).
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import numpy as np
import onnx
from onnx import TensorProto as T
from onnx import numpy_helper

from ..errors import fail
from ..op_protos.alltoall_allgather_bmm import ACT_TYPES
from ..op_protos.ffn import GLU_ACTIVATIONS, PLAIN_ACTIVATIONS
from ._builder import Builder, NodeView

Outputs = dict[str, str]


class Unsupported(Exception):
    """The node has no standard-op body (the message says why); it runs in the reference evaluator."""


def _zero(dtype: type) -> onnx.TensorProto:
    """The ``value`` of a zero-filled ``ConstantOfShape``."""
    return numpy_helper.from_array(np.zeros(1, dtype))


def _choice(view: NodeView, attr: str, allowed: tuple) -> object:
    value = view.attrs[attr]
    if value not in allowed:
        fail(view.op, attr, f"must be one of {allowed}", value)
    return value


# -- MoeReRouting ---------------------------------------------------------------------------------

def re_routing(b: Builder, v: NodeView) -> Outputs:
    """Rank-major blocks -> expert-major blocks. Row ``r`` of source block ``blk`` (the number of
    blocks ending at or before ``r``) goes to ``dst_start[blk] + r - src_start[blk]``; the gather
    index is the inverse permutation. Uses an ``(A, N*E)`` comparison: O(A * N * E) memory."""
    _choice(v, "expert_token_num_type", (1,))
    _choice(v, "idx_type", (0,))
    counts = b("Cast", v.inputs["expert_token_num_per_rank"], to=T.INT64)           # (N, E)
    flat = b("Reshape", counts, b.ints([-1]))
    zero = b.ints([0])
    ends = b("CumSum", flat, zero)
    src_start = b("Sub", ends, flat)
    per_expert = b("ReduceSum", counts, zero, keepdims=0)                           # (E,)
    expert_start = b("Sub", b("CumSum", per_expert, zero), per_expert)
    rank_before = b("Sub", b("CumSum", counts, zero), counts)                       # exclusive over ranks
    dst_start = b("Reshape", b("Add", rank_before, b("Unsqueeze", expert_start, zero)), b.ints([-1]))
    num_rows = b("Slice", b("Shape", v.inputs["tokens"]), zero, b.ints([1]))
    rows = b("Range", b.const(0), b("Squeeze", num_rows, zero), b.const(1))        # (A,)
    ended = b("LessOrEqual", b("Unsqueeze", ends, zero), b("Unsqueeze", rows, b.ints([1])))
    block = b("ReduceSum", b("Cast", ended, to=T.INT64), b.ints([1]), keepdims=0)
    dst = b("Sub", b("Add", b("Gather", dst_start, block), rows), b("Gather", src_start, block))
    index = b("ScatterElements", b("ConstantOfShape", num_rows, value=_zero(np.int64)), dst, rows, axis=0)
    if v.has("per_token_scales"):
        scales = b("Gather", v.inputs["per_token_scales"], index, axis=0)
    else:   # the device leaves it undefined; the reference kernel writes zeros
        scales = b("ConstantOfShape", num_rows, value=_zero(np.float32))
    return {"permute_tokens": b("Gather", v.inputs["tokens"], index, axis=0), "permute_per_token_scales": scales,
            "permute_token_idx": b.cast(index, T.INT32),
            "expert_token_num": b("ReduceSum", v.inputs["expert_token_num_per_rank"], zero, keepdims=0)}


# -- MoeUpdateExpert ------------------------------------------------------------------------------

def update_expert(b: Builder, v: NodeView) -> Outputs:
    """``row = eplb_table[id]``; replica column 1 when ``row[0] == 1``, else ``local_rank_id //
    ceil(world_size / row[0]) + 1`` (mode 0) or ``token % row[0] + 1`` (mode 1). Pruning keeps
    ``scale >= threshold * sum(scales)``; without it the mask is all True. Counts below 1 are
    read as 1 (no division by zero); out-of-range ids or columns fail in ``Gather``."""
    mode = _choice(v, "balance_mode", (0, 1))
    rank, world = v.attrs["local_rank_id"], v.attrs["world_size"]
    if mode == 0 and not (world >= 1 and 0 <= rank < world):
        fail(v.op, "local_rank_id", f"must be in [0, world_size={world}) with world_size >= 1 when balance_mode == 0",
             rank)
    two = b.ints([2])
    ids = v.inputs["expert_ids"]
    rows = b("Cast", b("Gather", v.inputs["eplb_table"], b.cast(ids, T.INT64), axis=0), to=T.INT64)   # (BS, K, F)
    count = b("Gather", rows, b.const(0), axis=2)                                                # (BS, K)
    safe = b("Max", count, b.const(1))
    if mode == 0:
        span = b("Div", b("Add", b.const(world), b("Sub", safe, b.const(1))), safe)            # ceil(W / count)
        column = b("Add", b("Div", b.const(rank), span), b.const(1))
    else:
        token = b("Unsqueeze", b("Range", b.const(0), b("Gather", b("Shape", ids), b.const(0)), b.const(1)),
                  b.ints([1]))
        column = b("Add", b("Mod", token, safe), b.const(1))
    column = b("Where", b("Equal", count, b.const(1)), b.const(1), column)
    chosen = b("Squeeze", b("GatherElements", rows, b("Unsqueeze", column, two), axis=2), two)
    if v.has("expert_scales") and v.has("pruning_threshold"):
        scales = b.f32(v.inputs["expert_scales"])
        total = b("ReduceSum", scales, b.ints([1]), keepdims=1)
        threshold = b("Reshape", b.f32(v.inputs["pruning_threshold"]), b.ints([1, -1]))
        mask = b("GreaterOrEqual", scales, b("Mul", threshold, total))
        if v.has("active_mask"):
            mask = b("And", mask, b("Unsqueeze", v.inputs["active_mask"], b.ints([1])))
    else:
        mask = b("Expand", b.const(True, np.bool_), b("Shape", ids))
    return {"balanced_expert_ids": b.cast(chosen, v.elem_types["expert_ids"]), "balanced_active_mask": mask}


# -- FFN ------------------------------------------------------------------------------------------

def _activation(b: Builder, name: str, h: str) -> str:
    """SPEC §5.4 activations on fp32 ``h``: GELU is the tanh form, fastgelu ``z*sigmoid(1.702z)``."""
    if name in ("relu", "reglu"):
        return b("Relu", h)
    if name in ("silu", "swiglu"):
        return b("Mul", h, b("Sigmoid", h))
    if name == "fastgelu":
        return b("Mul", h, b("Sigmoid", b("Mul", h, b.scalar_f(1.702))))
    inner = b("Mul", b.scalar_f(math.sqrt(2 / math.pi)),
              b("Add", h, b("Mul", b.scalar_f(0.044715), b("Mul", h, b("Mul", h, h)))))
    return b("Mul", b("Mul", b.scalar_f(0.5), h), b("Add", b.scalar_f(1.0), b("Tanh", inner)))


def _ffn_activation(b: Builder, name: str, h: str, n1: int) -> str:
    if name not in GLU_ACTIVATIONS:
        return _activation(b, name, h)
    half = n1 // 2   # left * f(right), left = the first N1/2 columns (SPEC §9 #14)
    left = b("Slice", h, b.ints([0]), b.ints([half]), b.ints([-1]))
    right = b("Slice", h, b.ints([half]), b.ints([n1]), b.ints([-1]))
    return b("Mul", left, _activation(b, name, right))


def _unpack_int4(b: Builder, packed: str) -> str:
    """uint8 ``(..., N/2)`` -> int values ``(..., N)`` as fp32 (``moe_fusion.int4`` layout)."""
    low = b.f32(b("BitwiseAnd", packed, b.const(15, np.uint8)))
    high = b.f32(b("BitShift", packed, b.const(4, np.uint8), direction="RIGHT"))
    pairs = b("Concat", b("Unsqueeze", low, b.ints([-1])), b("Unsqueeze", high, b.ints([-1])), axis=-1)
    shape = b("Concat", b("Slice", b("Shape", packed), b.ints([0]), b.ints([-1])), b.ints([-1]), axis=0)
    values = b("Reshape", pairs, shape)
    return b("Sub", values, b("Mul", b.scalar_f(16.0), b.f32(b("GreaterOrEqual", values, b.scalar_f(8.0)))))


def _ffn_weight(b: Builder, v: NodeView, idx: int, store: int) -> str:
    """fp32 weight ``idx`` (1 or 2): plain, or ``(W + offset) * scale`` rounded to the x dtype, as the
    kernel rounds it: after the sum and after the product for fp16, once for bf16."""
    w = v.inputs[f"weight{idx}"]
    if not v.has(f"antiquant_scale{idx}"):
        return b.f32(w)
    values = _unpack_int4(b, w) if v.elem_types[f"weight{idx}"] == T.UINT8 else b.f32(w)
    scale, offset = b.f32(v.inputs[f"antiquant_scale{idx}"]), b.f32(v.inputs[f"antiquant_offset{idx}"])
    w_rank, s_rank = len(v.shapes[f"weight{idx}"]), len(v.shapes[f"antiquant_scale{idx}"])
    if s_rank == w_rank:   # per-group (..., G, N): repeat each group over its K/G rows
        k, groups = v.dim(f"weight{idx}", -2), v.dim(f"antiquant_scale{idx}", -2)
        lead = list(v.shapes[f"weight{idx}"][:-2])
        n = v.dim(f"antiquant_scale{idx}", -1)
        expand = lambda t: b("Reshape", b("Expand", b("Unsqueeze", t, b.ints([-2])),  # noqa: E731
                                          b.ints([*[d or 1 for d in lead], groups, k // groups, n])),
                             b.ints([*[d or -1 for d in lead], k, n]))
        scale, offset = expand(scale), expand(offset)
    else:
        scale, offset = b("Unsqueeze", scale, b.ints([-2])), b("Unsqueeze", offset, b.ints([-2]))
    shifted = b("Add", values, offset)
    if store == T.FLOAT16:
        shifted = b.round_to(shifted, store)
    return b.round_to(b("Mul", shifted, scale), store)


def ffn(b: Builder, v: NodeView) -> Outputs:
    """``y = act(x @ W1 + b1) @ W2 + b2`` per expert segment (``Split`` by the counts; rows past
    the counted ones are zero), in fp32, for float and antiquant (int8/int4 weights) modes. Quant
    mode (int8 x) has no body: its uint64 deq scales carry fp32 bits, which no standard op reads."""
    store = v.elem_types["x"]
    if store == T.INT8:
        raise Unsupported("FFN quant mode (int8 x): runs in the reference evaluator")
    activation = str(v.attrs["activation"]).lower()
    if activation not in PLAIN_ACTIVATIONS + GLU_ACTIVATIONS:
        fail(v.op, "activation", f"must be one of {PLAIN_ACTIVATIONS + GLU_ACTIVATIONS}", repr(v.attrs["activation"]))
    _choice(v, "inner_precise", (0, 1))
    flag = _choice(v, "tokens_index_flag", (0, 1))
    # fp16 mm1 and activation: inner_precise=1, and fp16 antiquant whatever inner_precise (the kernel's rule)
    fp16_intermediate = store == T.FLOAT16 and (v.attrs["inner_precise"] == 1 or v.has("antiquant_scale1"))
    w1, w2 = _ffn_weight(b, v, 1, store), _ffn_weight(b, v, 2, store)
    n1 = v.dim("weight1", -1) * (2 if v.elem_types["weight1"] == T.UINT8 else 1)
    k1 = v.dim("weight1", -2)
    x = b.f32(b("Reshape", v.inputs["x"], b.ints([-1, k1])))
    b1 = b.f32(v.inputs["bias1"]) if v.has("bias1") else None
    b2 = b.f32(v.inputs["bias2"]) if v.has("bias2") else None

    def expert(rows: str, pick: Callable[[Optional[str]], Optional[str]]) -> str:
        h = b("MatMul", rows, pick(w1))
        if b1 is not None:
            h = b("Add", h, pick(b1))
        if fp16_intermediate:
            h = b.round_to(h, T.FLOAT16)
        act = b.round_to(_ffn_activation(b, activation, h, n1), store)
        y = b("MatMul", act, pick(w2))
        return y if b2 is None else b("Add", y, pick(b2))

    if v.has("expert_tokens"):
        num = v.dim("weight1", 0)
        tokens = v.inputs["expert_tokens"]
        if flag:   # cumulative ends -> counts
            tokens = b("Sub", tokens, b("Concat", b.ints([0]), b("Slice", tokens, b.ints([0]), b.ints([-1])), axis=0))
        # One more segment for the rows the counts leave (npu_ffn_grouped: zeros; npu_ffn: none).
        num_rows = b("Slice", b("Shape", x), b.ints([0]), b.ints([1]))
        rest = b("Sub", num_rows, b("ReduceSum", tokens, b.ints([0]), keepdims=1))
        *segments, tail = b("Split", x, b("Concat", tokens, rest, axis=0), axis=0, outputs=num + 1)
        parts = [expert(seg, lambda t, e=e: None if t is None else b("Gather", t, b.const(e), axis=0))
                 for e, seg in enumerate(segments)]
        n2 = v.dim("weight2", -1) * (2 if v.elem_types["weight2"] == T.UINT8 else 1)
        zeros = b("ConstantOfShape", b("Concat", b("Slice", b("Shape", tail), b.ints([0]), b.ints([1])), b.ints([n2]),
                                       axis=0), value=_zero(np.float32))
        y = b("Concat", *parts, zeros, axis=0)
    else:
        y = expert(x, lambda t: t)
    shape = b("Concat", b("Slice", b("Shape", v.inputs["x"]), b.ints([0]), b.ints([-1])), b.ints([-1]), axis=0)
    return {"y": b.cast(b("Reshape", y, shape), store)}


# -- BMM pair, world of one rank -----------------------------------------------------------------

def _world_of_one(v: NodeView) -> None:
    for attr in ("ep_world_size", "tp_world_size"):
        if v.attrs[attr] != 1:
            raise Unsupported(f"{v.op} with {attr}={v.attrs[attr]}: a standard-op body exists for a world of one rank")


def _bmm_bias(b: Builder, v: NodeView, y: str, store: int) -> str:
    """fp32 ``y`` rounded, plus the bias in fp32, rounded (SPEC §6.3 precision)."""
    y = b.round_to(y, store)
    if v.has("bias"):
        bias = b.f32(v.inputs["bias"])
        if len(v.shapes["bias"]) == 2:
            bias = b("Unsqueeze", bias, b.ints([1]))
        y = b.round_to(b("Add", y, bias), store)
    return y


def alltoall_allgather_bmm(b: Builder, v: NodeView) -> Outputs:
    """ep = tp = 1: no exchange, ``y2 = x``, ``y3 = x @ weight (+ bias)``, ``y1 = act(y3)``
    (act_type 1 is the erf GELU of the golden). Unrequested y2/y3 are ``(0, 0, 0)``."""
    _world_of_one(v)
    act = _choice(v, "act_type", tuple(ACT_TYPES.values()))
    _choice(v, "x_shard_type", (0, 1))
    if v.attrs["output_y3_flag"] and act == 0:
        fail(v.op, "output_y3_flag", "must be 0 when act_type is 0", v.attrs["output_y3_flag"])
    store = v.elem_types["x"]
    y3 = _bmm_bias(b, v, b("MatMul", b.f32(v.inputs["x"]), b.f32(v.inputs["weight"])), store)
    y1 = y3
    if act == 1:
        y1 = b("Mul", b("Mul", b.scalar_f(0.5), y3),
               b("Add", b.scalar_f(1.0), b("Erf", b("Mul", y3, b.scalar_f(1 / math.sqrt(2))))))
    elif act:
        y1 = _activation(b, {2: "silu", 3: "relu", 4: "fastgelu"}[act], y3)
    empty = lambda t: b("Slice", t, b.ints([0, 0, 0]), b.ints([0, 0, 0]))  # noqa: E731  (0, 0, 0), t's dtype
    x = v.inputs["x"]
    y3_out = b.cast(y3, store)
    return {"y1": b.cast(y1, store), "y2": b("Identity", x) if v.attrs["output_y2_flag"] else empty(x),
            "y3": y3_out if v.attrs["output_y3_flag"] else empty(y3_out)}


def bmm_reducescatter_alltoall(b: Builder, v: NodeView) -> Outputs:
    """ep = tp = 1: ``y = x @ weight`` rounded, ``+ bias`` in fp32, rounded."""
    _world_of_one(v)
    _choice(v, "y_shard_type", (0, 1))
    store = v.elem_types["x"]
    y = _bmm_bias(b, v, b("MatMul", b.f32(v.inputs["x"]), b.f32(v.inputs["weight"])), store)
    return {"y": b.cast(y, store)}


BODIES: dict[str, Callable[[Builder, NodeView], Outputs]] = {
    "MoeReRouting": re_routing,
    "MoeUpdateExpert": update_expert,
    "FFN": ffn,
    "AlltoAllAllGatherBatchMatMul": alltoall_allgather_bmm,
    "BatchMatMulReduceScatterAlltoAll": bmm_reducescatter_alltoall,
}
