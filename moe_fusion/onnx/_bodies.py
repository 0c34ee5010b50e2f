"""Standard-op ONNX bodies of the local ops, one builder per GE op type (SPEC §2.3, §5.4, §6.3, §7.3).

Each builder writes, into a ``Builder``, the computation of one node that passed
``_checks.check_node`` (so its attrs, input types and declared shapes are ones the op accepts),
specialized to its attrs, the inputs present and their dtypes, and returns ``{GE output name:
value}`` for every GE output. A node it cannot express raises ``Unsupported`` (the node then has
no body). A body's size does not depend on any attr or dim: experts are iterations of a ``Loop``.

Rules on tensor contents (counts, ids, replica counts) are checked inside the bodies, at run
time, by ``Builder.guard``: a run whose values the reference kernel rejects fails in a node named
``moe_fusion check: <op>: <rule>``, before any output is computed from them. Matmuls run in fp32
and round to the storage dtype where the reference kernels round (ONNX ``Cast`` rounds half to
even, where FFN's high-precision cast rounds ties away from zero: results differ on exact ties only).
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import numpy as np
import onnx
from onnx import TensorProto as T
from onnx import helper, numpy_helper

from ..op_protos.ffn import GLU_ACTIVATIONS
from ._builder import TO_END, Builder, NodeView, Unsupported

Outputs = dict[str, str]
INT32_MAX = 2 ** 31 - 1


def _zero(dtype: type) -> onnx.TensorProto:
    """The ``value`` of a zero-filled ``ConstantOfShape``."""
    return numpy_helper.from_array(np.zeros(1, dtype))


# -- MoeReRouting ---------------------------------------------------------------------------------

def re_routing(b: Builder, v: NodeView) -> Outputs:
    """Rank-major blocks -> expert-major blocks, in O(A + N*E) memory. Row ``r`` of source block
    ``blk`` goes to ``dst_start[blk] + r - src_start[blk]``, where ``blk`` is the number of blocks
    ending at or before ``r`` (a cumulative histogram of the block ends); the gather index is the
    inverse permutation. Checked at run time: every count in ``[0, A]`` and their sum ``A`` (so no
    sum wraps), and ``A <= 2**31 - 1`` (``permute_token_idx`` is int32)."""
    counts = b("Cast", v.inputs["expert_token_num_per_rank"], to=T.INT64)           # (N, E)
    zero = b.ints([0])
    num_rows = b("Slice", b("Shape", v.inputs["tokens"]), zero, b.ints([1]))       # (1,) A
    rows_total = b("Squeeze", num_rows, zero)
    ok = b.all_of(b.none_outside(counts, b.const(0), rows_total),
                  b("Equal", b("ReduceSum", counts, keepdims=0), rows_total),
                  b("LessOrEqual", rows_total, b.const(INT32_MAX)))
    counts = b.guard(counts, ok, f"{v.op}: expert_token_num_per_rank entries must be in [0, A] and sum to "
                                 f"A = tokens.size(0) <= {INT32_MAX}")
    flat = b("Reshape", counts, b.ints([-1]))                                       # (N*E,) source block order
    ends = b("CumSum", flat, zero)
    src_start = b("Sub", ends, flat)
    per_expert = b("ReduceSum", counts, zero, keepdims=0)                           # (E,)
    expert_start = b("Sub", b("CumSum", per_expert, zero), per_expert)
    rank_before = b("Sub", b("CumSum", counts, zero), counts)                       # exclusive over ranks
    dst_start = b("Reshape", b("Add", rank_before, b("Unsqueeze", expert_start, zero)), b.ints([-1]))
    rows = b("Range", b.const(0), rows_total, b.const(1))                           # (A,)
    # ends lie in [0, A]: a histogram over A + 1 slots, cumulated, counts the ends <= r.
    slots = b("ConstantOfShape", b("Add", num_rows, b.ints([1])), value=_zero(np.int64))
    histogram = b("ScatterElements", slots, ends, b("Expand", b.const(1), b("Shape", ends)), axis=0, reduction="add")
    block = b("Slice", b("CumSum", histogram, zero), zero, num_rows)                # (A,)
    dst = b("Sub", b("Add", b("Gather", dst_start, block), rows), b("Gather", src_start, block))
    index = b("ScatterElements", b("ConstantOfShape", num_rows, value=_zero(np.int64)), dst, rows, axis=0)
    if v.has("per_token_scales"):
        scales = v.inputs["per_token_scales"]
        # A longer (A + k,) would gather without error: the op's (A,) rule, at run time for a symbolic A.
        scales = b.guard(scales, b("Equal", b.dim_of(scales, 0), rows_total), f"{v.op}: per_token_scales must have "
                         "shape (A,) = (tokens.size(0),)")
        scales = b("Gather", scales, index, axis=0)
    else:   # the device leaves it undefined; the reference kernel writes zeros
        scales = b("ConstantOfShape", num_rows, value=_zero(np.float32))
    return {"permute_tokens": b("Gather", v.inputs["tokens"], index, axis=0), "permute_per_token_scales": scales,
            "permute_token_idx": b.cast(index, T.INT32),
            "expert_token_num": b("ReduceSum", v.inputs["expert_token_num_per_rank"], zero, keepdims=0)}


# -- MoeUpdateExpert ------------------------------------------------------------------------------

def _update_expert_shapes(b: Builder, v: NodeView, ids: str) -> str:
    """Bool scalar: the op's shape rules that relate symbolic dims, at run time (broadcasting would
    otherwise take a (1, K) scale or a (1,) mask for BS rows): ``BS, K > 0``, ``expert_scales``
    ``(BS, K)``, ``pruning_threshold`` of K entries, ``active_mask`` ``(BS,)``."""
    shape = b("Shape", ids)
    checks = [b.none_outside(shape, b.const(1), b.const(2 ** 62))]
    if v.has("expert_scales"):
        checks.append(b("Equal", b("ReduceSum", b.cast(b("Equal", b("Shape", v.inputs["expert_scales"]), shape),
                                                        T.INT64), keepdims=0), b.const(2)))
    if v.has("pruning_threshold"):
        checks.append(b("Equal", b("Size", v.inputs["pruning_threshold"]), b.dim_of(ids, 1)))
    if v.has("active_mask"):
        checks.append(b("Equal", b.dim_of(v.inputs["active_mask"], 0), b.dim_of(ids, 0)))
    return b.all_of(*checks)


def update_expert(b: Builder, v: NodeView) -> Outputs:
    """``row = eplb_table[id]``; replica column 1 when ``row[0] == 1``, else ``local_rank_id //
    ceil(world_size / row[0]) + 1`` (mode 0; ``ceil(W / c)`` as ``(W - 1) // c + 1``, which cannot
    overflow for any int64 ``W >= 1``) or ``token % row[0] + 1`` (mode 1). Pruning keeps ``scale >=
    threshold * sum(scales)``; without it the mask is all True. Checked at run time: ids in
    ``[0, N_log)`` and the replica counts of the rows they use in ``[1, F-1]``."""
    two = b.ints([2])
    table = v.inputs["eplb_table"]
    ids = b.cast(v.inputs["expert_ids"], T.INT64)
    ids = b.guard(ids, _update_expert_shapes(b, v, ids), f"{v.op}: expert_ids must be (BS, K) with BS, K > 0, "
                  "expert_scales (BS, K), pruning_threshold K entries and active_mask (BS,)")
    ids = b.guard(ids, b.none_outside(ids, b.const(0), b("Sub", b.dim_of(table, 0), b.const(1))),
                  f"{v.op}: expert_ids values must be in [0, N_log = eplb_table.size(0))")
    rows = b("Cast", b("Gather", table, ids, axis=0), to=T.INT64)                               # (BS, K, F)
    count = b("Gather", rows, b.const(0), axis=2)                                               # (BS, K)
    count = b.guard(count, b.none_outside(count, b.const(1), b("Sub", b.dim_of(table, 1), b.const(1))),
                    f"{v.op}: eplb_table replica counts (column 0) of used experts must be in [1, F-1]")
    if v.attrs["balance_mode"] == 0:   # the proto holds 0 <= local_rank_id < world_size here
        span = b("Add", b("Div", b.const(v.attrs["world_size"] - 1), count), b.const(1))       # ceil(W / count)
        column = b("Add", b("Div", b.const(v.attrs["local_rank_id"]), span), b.const(1))
    else:
        token = b("Unsqueeze", b("Range", b.const(0), b.dim_of(ids, 0), b.const(1)), b.ints([1]))
        column = b("Add", b("Mod", token, count), b.const(1))
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


def _ffn_activation(b: Builder, name: str, h: str) -> str:
    if name not in GLU_ACTIVATIONS:
        return _activation(b, name, h)
    # left * f(right), left = the first N1/2 columns (SPEC §9 #14)
    half = b("Unsqueeze", b("Div", b.dim_of(h, -1), b.const(2)), b.ints([0]))
    left = b("Slice", h, b.ints([0]), half, b.ints([-1]))
    right = b("Slice", h, half, b.ints([TO_END]), b.ints([-1]))
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


def _ffn_counts(b: Builder, v: NodeView, num_rows: str) -> str:
    """FFN's ``(E,)`` int64 rows per expert, from counts or cumulative ends (``tokens_index_flag``),
    checked at run time as the reference kernel checks them: E entries (weight1's experts), each
    count (and end) in ``[0, M]``, together ``M`` rows (``npu_ffn``) or at most ``M``
    (``npu_ffn_grouped``, whose rows past the counted ones are zero). Entries in ``[0, M]`` keep
    every sum far from wrapping (``E <= 2**16``, ``M <= 2**40``)."""
    tokens = v.inputs["expert_tokens"]
    zero = b.const(0)
    checks = [b("Equal", b.dim_of(tokens, 0), b.dim_of(v.inputs["weight1"], 0)),
              b.none_outside(tokens, zero, num_rows)]
    if v.attrs["tokens_index_flag"]:   # cumulative ends -> counts; non-decreasing ends give counts >= 0
        tokens = b("Sub", tokens, b("Concat", b.ints([0]), b("Slice", tokens, b.ints([0]), b.ints([-1])), axis=0))
        checks.append(b.none_outside(tokens, zero, num_rows))
    total = b("ReduceSum", tokens, keepdims=0)
    exact = v.torch_op == "npu_ffn"
    checks.append(b("Equal" if exact else "LessOrEqual", total, num_rows))
    cover = "cover the M rows of x" if exact else "cover at most the M rows of x"
    return b.guard(tokens, b.all_of(*checks),
                   f"{v.op}: expert_tokens must hold weight1.size(0) non-negative counts (non-decreasing ends with "
                   f"tokens_index_flag) that {cover}")


def ffn(b: Builder, v: NodeView) -> Outputs:
    """``y = act(x @ W1 + b1) @ W2 + b2`` in fp32, for float and antiquant (int8/int4 weights)
    modes; with experts, one ``Loop`` iteration per expert over its row segment (rows past the
    counted ones are zero). Quant mode (int8 x) has no body: its uint64 deq scales carry fp32
    bits, which no standard op reads."""
    store = v.elem_types["x"]
    if store == T.INT8:
        raise Unsupported("FFN quant mode (int8 x): runs in the reference evaluator")
    activation = v.attrs["activation"].lower()
    # fp16 mm1 and activation: inner_precise=1, and fp16 antiquant whatever inner_precise (the kernel's rule)
    fp16_intermediate = store == T.FLOAT16 and (v.attrs["inner_precise"] == 1 or v.has("antiquant_scale1"))
    w1, w2 = _ffn_weight(b, v, 1, store), _ffn_weight(b, v, 2, store)
    x_shape = b("Shape", v.inputs["x"])
    lead = b("Slice", x_shape, b.ints([0]), b.ints([-1]))
    # Explicit sizes, no -1: a -1 is ambiguous when M or K1 is 0.
    x = b.f32(b("Reshape", v.inputs["x"], b("Concat", b("ReduceProd", lead, keepdims=1),
                                            b("Slice", x_shape, b.ints([-1]), b.ints([TO_END])), axis=0)))  # (M, K1)
    b1 = b.f32(v.inputs["bias1"]) if v.has("bias1") else None
    b2 = b.f32(v.inputs["bias2"]) if v.has("bias2") else None

    def expert(bb: Builder, rows: str, pick: Callable[[Optional[str]], Optional[str]]) -> str:
        h = bb("MatMul", rows, pick(w1))
        if b1 is not None:
            h = bb("Add", h, pick(b1))
        if fp16_intermediate:
            h = bb.round_to(h, T.FLOAT16)
        act = bb.round_to(_ffn_activation(bb, activation, h), store)
        y = bb("MatMul", act, pick(w2))
        return y if b2 is None else bb("Add", y, pick(b2))

    if len(v.shapes["weight1"]) == 3:   # experts (the op's rule: 3-D weights exactly when counts are given)
        num_rows = b.dim_of(x, 0)
        counts = _ffn_counts(b, v, num_rows)
        zero = b.ints([0])
        ends = b("CumSum", counts, zero)
        starts = b("Sub", ends, counts)

        def one_expert(bb: Builder, e: str, carried: list[str]) -> list[str]:
            segment = bb("Slice", x, bb("Unsqueeze", bb("Gather", starts, e), zero),
                         bb("Unsqueeze", bb("Gather", ends, e), zero), zero)
            pick = lambda t: None if t is None else bb("Gather", t, e, axis=0)  # noqa: E731
            return [bb("SequenceInsert", carried[0], expert(bb, segment, pick))]

        parts_type = helper.make_sequence_type_proto(helper.make_tensor_type_proto(T.FLOAT, None))
        (parts,) = b.loop(b.dim_of(counts, 0), [(b("SequenceEmpty", dtype=T.FLOAT), parts_type)], one_expert)
        counted = b("ConcatFromSequence", parts, axis=0)                              # (sum(counts), N2)
        rest = b("Sub", num_rows, b("ReduceSum", counts, keepdims=0))
        zeros = b("ConstantOfShape", b("Concat", b("Unsqueeze", rest, zero), b("Slice", b("Shape", counted),
                                                                                b.ints([1]), b.ints([2])), axis=0),
                  value=_zero(np.float32))
        y = b("Concat", counted, zeros, axis=0)
    else:
        y = expert(b, x, lambda t: t)
    shape = b("Concat", lead, b("Slice", b("Shape", y), b.ints([-1]), b.ints([TO_END])), axis=0)
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
    act = v.attrs["act_type"]
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
