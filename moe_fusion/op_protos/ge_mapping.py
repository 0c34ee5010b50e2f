"""Between a call of ``torch.ops.moe_fusion.<op>`` and its GE node: the one table (SPEC §2.1–§7.1).

Both consumers read it: the GE converters (``moe_fusion.ge_plugin.converters``) emit the node
``to_ge`` describes, the ONNX translation writes the same node in its custom domain, and the
ONNX reference evaluator runs a node through ``to_torch``, the inverse. Mostly a GE input or
attr is the torch argument of the same name; ``GE_MAPPINGS`` lists, per op, the exceptions:

* renamed inputs/attrs (``expand_idx`` -> ``assist_info``, ``shard_type`` -> ``x_shard_type``, ...);
* GE attrs torch_npu's converters fix (``transpose_weight=False``, combine's ``out_dtype=0``, ...);
* torch arguments GE has no slot for, which must be None (the fp8/fp4 dtype overrides);
* GE slots derived from the call (``Derived``): FFN's ``expert_tokens``/``expert_tokens_index``
  int list becomes the int64 input ``expert_tokens`` plus ``tokens_index_flag``, ``output_dtype``
  becomes GE's 0 (fp16) / 1 (bf16) / -1 (x's dtype, and always for a float x), ``inner_precise``
  None is 0; dispatch's ``y_dtype`` attr is the GE ``DataType`` of ``expand_x``;
* ``npu_ffn`` and ``npu_ffn_grouped`` share the GE type ``FFN``: ``proto_for_node`` tells which
  op a node is a call of (``accepts``).

A call GE cannot express (an int8 x with ``output_dtype`` float32, both expert lists given)
raises the ``OpValidationError`` the op's own validation raises, in every consumer alike.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

import torch

from . import PROTOS
from ._proto import OpProto, require, require_in

Values = dict[str, Any]
DtypeOf = Callable[[Any], torch.dtype]   # the torch dtype of a consumer's tensor value

# GE ``ge::DataType`` enum values (graph/types.h), for attrs that carry a dtype.
GE_DATATYPE: dict[torch.dtype, int] = {
    torch.float32: 0, torch.float16: 1, torch.int8: 2, torch.int32: 3, torch.uint8: 4, torch.int64: 9,
    torch.uint64: 10, torch.bool: 12, torch.bfloat16: 27,
}


@dataclass(frozen=True)
class Derived:
    """GE slots computed from a call rather than passed through, and the way back.

    ``to_ge(bound, dtype_of)`` returns the ``produces`` slots from the bound torch call;
    ``to_torch(ge_type, slots)`` returns the ``consumes`` arguments from every GE input and attr
    of a node (raising ``OpValidationError`` for a value no torch call yields). The arguments in
    ``consumes`` and the slots in ``produces`` do not pass through."""

    consumes: tuple[str, ...]
    produces: tuple[str, ...]
    to_ge: Callable[[Values, DtypeOf], Values]
    to_torch: Callable[[str, Values], Values]


@dataclass(frozen=True)
class GeMapping:
    """How one op's torch arguments and GE slots correspond (see the module docstring)."""

    renames: Mapping[str, str] = field(default_factory=dict)      # torch name -> GE name
    fixed_attrs: Mapping[str, Any] = field(default_factory=dict)  # GE attr -> the only value torch_npu emits
    torch_only: tuple[str, ...] = ()                                # torch args without a GE slot (None only)
    derived: Optional[Derived] = None
    # GE inputs the torch call gives as an int list: a GE converter makes them an int64 Const (ONNX's
    # exporter does so itself, from the input's type constraint).
    int_list_inputs: tuple[str, ...] = ()
    # For ops sharing a GE op type: whether a node (its GE inputs, torch tensors or None) is a call of this op.
    accepts: Optional[Callable[[Values], bool]] = None


# -- FFN ------------------------------------------------------------------------------------------

# FFN's output_dtype attr for an int8 x, by the torch output_dtype (-1: GE's default, fp16).
_FFN_OUTPUT_DTYPE_CODES: dict[Optional[torch.dtype], int] = {None: -1, torch.float16: 0, torch.bfloat16: 1}


def _given(tokens: Any) -> bool:
    """An expert list with entries, or a consumer's tensor (torchair packs a list holding SymInts
    into one). An empty list means no experts, as in the proto."""
    if isinstance(tokens, (list, tuple)):
        return len(tokens) > 0
    return tokens is not None


def _ffn_to_ge(a: Values, dtype_of: DtypeOf) -> Values:
    """FFN's ``expert_tokens`` input, ``tokens_index_flag``, ``inner_precise`` and ``output_dtype``."""
    counts, ends = a["expert_tokens"], a["expert_tokens_index"]
    # GE has one expert_tokens input: no encoding for both (the same rule as the op's validate).
    require(not (_given(counts) and _given(ends)), "npu_ffn", "expert_tokens/expert_tokens_index",
            "must not both be given", "both")
    output_dtype = -1   # y in x's dtype: a float x ignores output_dtype (SPEC §5.1)
    if dtype_of(a["x"]) == torch.int8:
        # Only fp16/bf16 have a GE code (the same rule and message as the op's validate).
        require_in("npu_ffn", "output_dtype", a["output_dtype"], tuple(_FFN_OUTPUT_DTYPE_CODES))
        output_dtype = _FFN_OUTPUT_DTYPE_CODES[a["output_dtype"]]
    tokens = ends if _given(ends) else counts if _given(counts) else None
    return {"expert_tokens": tokens, "tokens_index_flag": _given(ends), "inner_precise": a["inner_precise"] or 0,
            "output_dtype": output_dtype}


def _ffn_to_torch(ge_type: str, s: Values) -> Values:
    """npu_ffn's expert list (counts or ends, by the flag), ``inner_precise`` and ``output_dtype``."""
    codes = {code: dtype for dtype, code in _FFN_OUTPUT_DTYPE_CODES.items()}
    require_in(ge_type, "output_dtype", s["output_dtype"], tuple(codes))
    require_in(ge_type, "tokens_index_flag", s["tokens_index_flag"], (0, 1))
    tokens = s["expert_tokens"]
    values = None if tokens is None else [int(v) for v in tokens.reshape(-1).tolist()]
    return {"expert_tokens_index" if s["tokens_index_flag"] else "expert_tokens": values,
            "inner_precise": s["inner_precise"], "output_dtype": codes[s["output_dtype"]]}


def _inner_precise_to_ge(a: Values, dtype_of: DtypeOf) -> Values:
    """``inner_precise`` None is 0, as in the eager wrapper."""
    return {"inner_precise": a["inner_precise"] or 0}


def _inner_precise_to_torch(ge_type: str, s: Values) -> Values:
    """``inner_precise`` as the attr holds it."""
    return {"inner_precise": s["inner_precise"]}


def _ffn_grouped_accepts(inputs: Values) -> bool:
    """A float-mode FFN of a 2-D x with a counts tensor (quant/antiquant and N-D x are npu_ffn's
    only; where both ops apply, counts covering every row, they agree)."""
    float_inputs = {"x", "weight1", "weight2", "expert_tokens", "bias1", "bias2"}
    return (inputs["expert_tokens"] is not None and inputs["x"].dim() == 2
            and all(v is None for k, v in inputs.items() if k not in float_inputs))


# -- dispatch -------------------------------------------------------------------------------------

def _expand_x_datatype(x_dtype: torch.dtype, quant_mode: int) -> int:
    """GE ``DataType`` of dispatch's ``expand_x``: int8 when quantizing, else x's dtype."""
    return GE_DATATYPE[x_dtype if quant_mode == 0 else torch.int8]


def _dispatch_to_ge(a: Values, dtype_of: DtypeOf) -> Values:
    """Dispatch's ``y_dtype`` attr."""
    return {"y_dtype": _expand_x_datatype(dtype_of(a["x"]), a["quant_mode"])}


def _dispatch_to_torch(ge_type: str, s: Values) -> Values:
    """Nothing: ``y_dtype`` follows from x and ``quant_mode``, and must agree with them."""
    expected = _expand_x_datatype(s["x"].dtype, s["quant_mode"])
    require(s["y_dtype"] == expected, ge_type, "y_dtype",
            f"must be {expected} (the GE DataType of expand_x for this x and quant_mode)", s["y_dtype"])
    return {}


_BMM_RENAMES = {"group_ep_worldsize": "ep_world_size", "group_tp_worldsize": "tp_world_size"}

GE_MAPPINGS: dict[str, GeMapping] = {
    "npu_moe_re_routing": GeMapping(torch_only=("tokens_dtype",)),
    "npu_moe_update_expert": GeMapping(),
    "npu_ffn": GeMapping(
        derived=Derived(consumes=("expert_tokens", "expert_tokens_index", "inner_precise", "output_dtype"),
                        produces=("expert_tokens", "tokens_index_flag", "inner_precise", "output_dtype"),
                        to_ge=_ffn_to_ge, to_torch=_ffn_to_torch),
        int_list_inputs=("expert_tokens",)),
    "npu_ffn_grouped": GeMapping(
        fixed_attrs={"output_dtype": -1},
        derived=Derived(consumes=("inner_precise",), produces=("inner_precise",), to_ge=_inner_precise_to_ge,
                        to_torch=_inner_precise_to_torch),
        accepts=_ffn_grouped_accepts),
    "npu_alltoall_allgather_bmm": GeMapping(
        renames={**_BMM_RENAMES, "shard_type": "x_shard_type", "need_allgather_out": "output_y2_flag",
                 "need_activation_feature": "output_y3_flag"},
        fixed_attrs={"transpose_weight": False}),   # torchair hands GE the logical (E/ep, K, N) weight
    "npu_bmm_reducescatter_alltoall": GeMapping(renames={**_BMM_RENAMES, "shard_type": "y_shard_type"},
                                                fixed_attrs={"transpose_weight": False}),
    "npu_moe_distribute_dispatch_v2": GeMapping(
        torch_only=("y_dtype", "x_dtype", "scales_dtype"),
        derived=Derived(consumes=(), produces=("y_dtype",), to_ge=_dispatch_to_ge, to_torch=_dispatch_to_torch)),
    # The V2 GE prototype keeps V1's out_dtype/group_list_type attrs (and three inputs, left empty).
    "npu_moe_distribute_combine_v2": GeMapping(fixed_attrs={"out_dtype": 0, "group_list_type": 0}),
    "npu_moe_distribute_combine_add_rms_norm": GeMapping(renames={"expand_idx": "assist_info"}),
}


def _schema_arguments(proto: OpProto) -> list[str]:
    """The torch argument names of ``proto``'s op, in schema order."""
    return [a.name for a in torch._C.parse_schema(f"{proto.qualname}{proto.schema}").arguments]


def to_ge(proto: OpProto, bound: Values, dtype_of: DtypeOf) -> tuple[Values, Values]:
    """``(inputs, attrs)`` of the GE node for a bound torch call (``OpProto.bind``): ``inputs`` maps
    every GE input name to its value or None (absent optional), ``attrs`` every GE attr to a plain
    value, both in GE order. ``dtype_of`` gives the torch dtype of a tensor value of the caller."""
    mapping = GE_MAPPINGS[proto.name]
    for name in mapping.torch_only:
        require(bound[name] is None, proto.name, name, "must be None (GE has no counterpart)", bound[name])
    derived = mapping.derived
    skipped = set(mapping.torch_only) | set(derived.consumes if derived else ())
    slots = {mapping.renames.get(k, k): v for k, v in bound.items() if k not in skipped}
    slots.update(derived.to_ge(bound, dtype_of) if derived else {})
    slots.update(mapping.fixed_attrs)
    return ({i.name: slots.get(i.name) for i in proto.ge_inputs},
            {a.name: slots[a.name] for a in proto.ge_attrs})


def to_torch(proto: OpProto, inputs: Values, attrs: Values) -> Values:
    """Keyword arguments of ``torch.ops.moe_fusion.<op>`` for a GE node's inputs (torch tensors or
    None) and attrs. A value no torch call yields (a fixed attr changed, a GE-only input given, a
    derived attr out of range) raises ``OpValidationError`` naming the GE op and the slot."""
    mapping = GE_MAPPINGS[proto.name]
    slots = {**inputs, **attrs}
    for name, value in mapping.fixed_attrs.items():
        require(slots[name] == value, proto.ge_type, name, f"must be {value!r} (the only value torch_npu emits)",
                slots[name])
    derived = mapping.derived
    kwargs = derived.to_torch(proto.ge_type, slots) if derived else {}
    skipped = set(mapping.fixed_attrs) | set(derived.produces if derived else ())
    torch_name = {ge: t for t, ge in mapping.renames.items()}
    arguments = set(_schema_arguments(proto))
    for name, value in slots.items():
        if name in skipped:
            continue
        if torch_name.get(name, name) in arguments:
            kwargs[torch_name.get(name, name)] = value
        else:   # a GE-only input (combine's V1 slots, FFN's quant inputs for npu_ffn_grouped)
            require(value is None, proto.ge_type, name, "must be absent (no torch counterpart)", "a tensor")
    return kwargs


def proto_of_ge_type(ge_type: str) -> OpProto:
    """The first proto whose GE op type is ``ge_type`` (protos sharing a GE op type share its
    prototype: inputs, attrs, outputs)."""
    for proto in PROTOS.values():
        if proto.ge_type == ge_type:
            return proto
    raise KeyError(ge_type)


def proto_for_node(ge_type: str, inputs: Values) -> OpProto:
    """The op a node of ``ge_type`` with these GE inputs (torch tensors, None when absent) is a
    call of: among the protos sharing the GE op type, the first whose mapping ``accepts`` it, else
    the first without an ``accepts`` rule (``npu_ffn_grouped`` for a float FFN with counts, else
    ``npu_ffn``)."""
    protos = [p for p in PROTOS.values() if p.ge_type == ge_type]
    for proto in protos:
        accepts = GE_MAPPINGS[proto.name].accepts
        if accepts is not None and accepts(inputs):
            return proto
    return next(p for p in protos if GE_MAPPINGS[p.name].accepts is None)
