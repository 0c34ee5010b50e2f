"""Between a torch call of ``torch.ops.moe_fusion.<op>`` and its GE node (SPEC §2.1–§7.1).

``to_node`` turns the bound torch arguments into the GE inputs and attrs, named and ordered as
the proto's GE prototype (the same mapping the GE converters apply); ``to_torch`` is its inverse,
used by the runtimes that execute a node with the torch reference kernel. Mostly a GE name is the
torch name; the differences are listed per op in ``SPECS``:

* renamed inputs/attrs (``expand_idx`` -> ``assist_info``, ``shard_type`` -> ``x_shard_type``, ...);
* GE attrs fixed by torch_npu's converters (``transpose_weight=False``, ``out_dtype=0``, ...);
* torch arguments GE has no slot for, which must keep their default (fp8/fp4 dtype overrides);
* FFN: the ``expert_tokens``/``expert_tokens_index`` int list becomes the int64 GE input
  ``expert_tokens`` plus ``tokens_index_flag``; ``output_dtype`` becomes GE's 0 (fp16) / 1 (bf16)
  / -1 (not int8 x); ``inner_precise=None`` is 0.
* ``npu_ffn_grouped`` (counts as a tensor) is the same GE ``FFN`` with ``output_dtype=-1``;
  ``proto_for_node`` tells which torch op an ``FFN`` node is a call of;
* dispatch: attr ``y_dtype`` is the GE ``DataType`` of ``expand_x`` (int8 with ``quant_mode != 0``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

import torch

from ..errors import fail
from ..op_protos import PROTOS, OpProto
from ._dtypes import GE_DATATYPE, onnx_to_torch

Values = dict[str, Any]


@dataclass(frozen=True)
class OpMapping:
    """How one op's torch arguments and GE slots correspond (see the module docstring)."""

    renames: Mapping[str, str] = field(default_factory=dict)     # torch name -> GE name
    fixed_attrs: Mapping[str, Any] = field(default_factory=dict)  # GE attr -> the only value torch_npu emits
    torch_only: tuple[str, ...] = ()                               # torch args without a GE slot (default only)
    # Extra GE attrs derived from the torch call, and their inverse, for FFN and dispatch.
    derive: Optional[Callable[[Values, Callable[[Any], torch.dtype]], Values]] = None
    underive: Optional[Callable[[str, Values, Values, Values], None]] = None
    # For ops sharing a GE op type: whether a node (its GE inputs) is a call of this op.
    accepts: Optional[Callable[[Values], bool]] = None


# -- FFN ------------------------------------------------------------------------------------------

_FFN_QUANT_OUT = {torch.float16: 0, torch.bfloat16: 1}


def _ffn_derive(a: Values, dtype_of: Callable[[Any], torch.dtype]) -> Values:
    counts, ends = a.pop("expert_tokens"), a.pop("expert_tokens_index")
    out_dtype = a.pop("output_dtype")
    tokens = ends if ends else counts
    return {
        "expert_tokens": list(tokens) if tokens else None,
        "tokens_index_flag": bool(ends),
        "inner_precise": a.pop("inner_precise") or 0,
        "output_dtype": _FFN_QUANT_OUT.get(out_dtype, -1) if dtype_of(a["x"]) == torch.int8 else -1,
    }


def _ffn_underive(ge_type: str, inputs: Values, attrs: Values, kwargs: Values) -> None:
    tokens = inputs.pop("expert_tokens")
    flag = attrs.pop("tokens_index_flag")
    out_code = attrs.pop("output_dtype")
    _check_choice(ge_type, "output_dtype", out_code, (-1, 0, 1))
    _check_choice(ge_type, "tokens_index_flag", flag, (0, 1))
    values = None if tokens is None else [int(v) for v in tokens.reshape(-1).tolist()]
    kwargs["expert_tokens_index" if flag else "expert_tokens"] = values
    kwargs["inner_precise"] = attrs.pop("inner_precise")
    kwargs["output_dtype"] = {0: torch.float16, 1: torch.bfloat16}.get(out_code)


def _ffn_grouped_derive(a: Values, dtype_of: Callable[[Any], torch.dtype]) -> Values:
    return {"inner_precise": a.pop("inner_precise") or 0}


def _ffn_grouped_underive(ge_type: str, inputs: Values, attrs: Values, kwargs: Values) -> None:
    kwargs["inner_precise"] = attrs.pop("inner_precise")


def _ffn_grouped_accepts(inputs: Values) -> bool:
    """A float-mode FFN of a 2-D x with a counts tensor (quant/antiquant and N-D x are npu_ffn's
    only; where both ops apply, counts covering every row, they agree)."""
    float_inputs = {"x", "weight1", "weight2", "expert_tokens", "bias1", "bias2"}
    return (inputs["expert_tokens"] is not None and inputs["x"].dim() == 2
            and all(v is None for k, v in inputs.items() if k not in float_inputs))


# -- dispatch -------------------------------------------------------------------------------------

def _expand_x_dtype(x_dtype: torch.dtype, quant_mode: int) -> torch.dtype:
    return x_dtype if quant_mode == 0 else torch.int8


def _dispatch_derive(a: Values, dtype_of: Callable[[Any], torch.dtype]) -> Values:
    return {"y_dtype": GE_DATATYPE[_expand_x_dtype(dtype_of(a["x"]), a["quant_mode"])]}


def _dispatch_underive(ge_type: str, inputs: Values, attrs: Values, kwargs: Values) -> None:
    y_dtype = attrs.pop("y_dtype")
    expected = GE_DATATYPE[_expand_x_dtype(inputs["x"].dtype, attrs["quant_mode"])]
    if y_dtype != expected:
        fail(ge_type, "y_dtype", f"must be {expected} (the GE DataType of expand_x for this x and quant_mode)", y_dtype)


_BMM = {"group_ep_worldsize": "ep_world_size", "group_tp_worldsize": "tp_world_size"}
_COMBINE_V1_SLOTS = {"out_dtype": 0, "group_list_type": 0}

SPECS: dict[str, OpMapping] = {
    "npu_moe_re_routing": OpMapping(torch_only=("tokens_dtype",)),
    "npu_moe_update_expert": OpMapping(),
    "npu_ffn": OpMapping(derive=_ffn_derive, underive=_ffn_underive),
    "npu_ffn_grouped": OpMapping(fixed_attrs={"output_dtype": -1}, derive=_ffn_grouped_derive,
                                 underive=_ffn_grouped_underive, accepts=_ffn_grouped_accepts),
    "npu_alltoall_allgather_bmm": OpMapping(
        renames={**_BMM, "shard_type": "x_shard_type", "need_allgather_out": "output_y2_flag",
                 "need_activation_feature": "output_y3_flag"},
        fixed_attrs={"transpose_weight": False}),
    "npu_bmm_reducescatter_alltoall": OpMapping(renames={**_BMM, "shard_type": "y_shard_type"},
                                                fixed_attrs={"transpose_weight": False}),
    "npu_moe_distribute_dispatch_v2": OpMapping(torch_only=("y_dtype", "x_dtype", "scales_dtype"),
                                                derive=_dispatch_derive, underive=_dispatch_underive),
    "npu_moe_distribute_combine_v2": OpMapping(fixed_attrs=_COMBINE_V1_SLOTS),
    "npu_moe_distribute_combine_add_rms_norm": OpMapping(renames={"expand_idx": "assist_info"}),
}


def _check_choice(op: str, attr: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        fail(op, attr, f"must be one of {allowed}", value)


def bind(proto: OpProto, args: tuple, kwargs: Mapping[str, Any]) -> Values:
    """Every argument of a call by name (``OpProto.bind``), dtype arguments as torch dtypes."""
    bound = proto.bind(args, dict(kwargs))
    schema = torch._C.parse_schema(f"{proto.qualname}{proto.schema}")
    for arg in schema.arguments:
        if "ScalarType" in str(arg.real_type) and isinstance(bound[arg.name], int):
            bound[arg.name] = onnx_to_torch(bound[arg.name])   # the exporter hands dtypes over as ONNX enums
    return bound


def to_node(proto: OpProto, bound: Values, dtype_of: Callable[[Any], torch.dtype]) -> tuple[Values, Values]:
    """``(inputs, attrs)`` of the GE node for a bound torch call: ``inputs`` maps every GE input
    name to its value or None (absent optional), in GE order; ``attrs`` every GE attr to a value."""
    spec = SPECS[proto.name]
    a = dict(bound)
    for name in spec.torch_only:
        if a.pop(name) is not None:
            raise ValueError(f"{proto.name}: {name} has no GE counterpart and must be None")
    derived = spec.derive(a, dtype_of) if spec.derive else {}
    ge = {spec.renames.get(k, k): v for k, v in a.items()}
    ge.update(derived)
    ge.update(spec.fixed_attrs)
    inputs = {i.name: ge.pop(i.name, None) for i in proto.ge_inputs}
    attrs = {at.name: ge.pop(at.name) for at in proto.ge_attrs}
    leftover = [k for k, v in ge.items() if v is not None]
    if leftover:
        raise ValueError(f"{proto.name}: arguments {leftover} have no GE slot")
    return inputs, attrs


def to_torch(proto: OpProto, inputs: Values, attrs: Values) -> Values:
    """Keyword arguments of ``torch.ops.moe_fusion.<op>`` for a GE node's inputs (tensors or None)
    and attrs. Fixed attrs must hold their only value; errors name the GE op and attr."""
    spec = SPECS[proto.name]
    inputs, attrs = dict(inputs), dict(attrs)
    for name, value in spec.fixed_attrs.items():
        seen = attrs.pop(name)
        if seen != value:
            fail(proto.ge_type, name, f"must be {value!r} (the only value torch_npu emits)", seen)
    kwargs: Values = {}
    if spec.underive:
        spec.underive(proto.ge_type, inputs, attrs, kwargs)
    back = {ge: t for t, ge in spec.renames.items()}
    schema_args = {a.name for a in getattr(torch.ops.moe_fusion, proto.name).default._schema.arguments}
    for name, value in {**inputs, **attrs}.items():
        torch_name = back.get(name, name)
        if torch_name in schema_args:
            kwargs[torch_name] = value
        elif value is not None:   # a GE-only input (combine's V1 slots) given a tensor
            fail(proto.ge_type, name, "must be absent (no torch counterpart)", "a tensor")
    return kwargs


def proto_of_ge_type(ge_type: str) -> OpProto:
    """The first proto whose GE op type is ``ge_type`` (protos sharing a GE op type share its
    prototype: inputs, attrs, outputs)."""
    for proto in PROTOS.values():
        if proto.ge_type == ge_type:
            return proto
    raise KeyError(ge_type)


def proto_for_node(ge_type: str, inputs: Values) -> OpProto:
    """The op a node of ``ge_type`` with these GE inputs (None when absent) is a call of: among
    the protos sharing the GE op type, the first whose mapping ``accepts`` it, else the first
    without an ``accepts`` rule (``npu_ffn_grouped`` for a float FFN with counts, else ``npu_ffn``)."""
    protos = [p for p in PROTOS.values() if p.ge_type == ge_type]
    for proto in protos:
        if SPECS[proto.name].accepts is not None and SPECS[proto.name].accepts(inputs):
            return proto
    return next(p for p in protos if SPECS[p.name].accepts is None)
