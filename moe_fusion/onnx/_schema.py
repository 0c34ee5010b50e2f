"""ONNX operator schemas of the custom domain, one per proto (``onnx.defs.register_schema``).

Inputs, outputs and attributes are the proto's GE prototype, in GE order: optional GE inputs are
ONNX optional inputs, attribute types follow the GE attr types (``Bool`` is an INT 0/1, ONNX has
no boolean attribute), defaults are the GE defaults and GE-required attrs are required. Each
input and output has its own type parameter whose allowed types are the GE dtypes plus fp32
wherever GE takes fp16/bf16 (and int64/fp32 deq scales beside uint64), since the portable
target's reference kernels accept those too.
"""
from __future__ import annotations

from typing import Any, Sequence

import onnx
from onnx import defs, helper

from ..op_protos import PROTOS, OpProto
from ._dtypes import GE_TO_ONNX_TYPE
from ._output_types import output_types

DOMAIN = "ai.moe_fusion"
OPSET_VERSION = 1

_ATTR_TYPES = {"Int": defs.OpSchema.AttrType.INT, "Bool": defs.OpSchema.AttrType.INT,
               "Float": defs.OpSchema.AttrType.FLOAT, "Str": defs.OpSchema.AttrType.STRING,
               "ListInt": defs.OpSchema.AttrType.INTS}


def onnx_types(ge_dtypes: Sequence[str]) -> list[str]:
    """ONNX type strings for GE dtypes, widened as the portable target allows (module docstring)."""
    types = [GE_TO_ONNX_TYPE[d] for d in ge_dtypes if d in GE_TO_ONNX_TYPE]
    if {"DT_FLOAT16", "DT_BF16"} & set(ge_dtypes):
        types.append("tensor(float)")
    if "DT_UINT64" in ge_dtypes:
        types += ["tensor(int64)", "tensor(float)"]
    return list(dict.fromkeys(types))


def _attr_default(name: str, ge_type: str, value: Any) -> onnx.AttributeProto:
    return helper.make_attribute(name, int(value) if ge_type == "Bool" else value)


def op_schema(proto: OpProto) -> defs.OpSchema:
    """The ONNX schema of ``proto``'s GE node in ``DOMAIN``."""
    param = defs.OpSchema.FormalParameter
    optional = defs.OpSchema.FormalParameterOption.Optional
    inputs = [param(i.name, f"T_{i.name}", param_option=optional) if i.kind == "optional" else
              param(i.name, f"T_{i.name}") for i in proto.ge_inputs]
    outputs = [param(o.name, f"T_out_{o.name}") for o in proto.ge_outputs]
    constraints = [(f"T_{i.name}", onnx_types(i.dtypes), "") for i in proto.ge_inputs]
    constraints += [(f"T_out_{o.name}", onnx_types(o.dtypes), "") for o in proto.ge_outputs]
    attributes = [
        defs.OpSchema.Attribute(a.name, _ATTR_TYPES[a.type], "", required=True) if a.required or a.default is None
        else defs.OpSchema.Attribute(a.name, _attr_default(a.name, a.type, a.default), "")
        for a in proto.ge_attrs
    ]
    doc = f"moe_fusion {proto.name} (torch.ops.moe_fusion.{proto.name}) as the GE op {proto.ge_type}."
    schema = defs.OpSchema(proto.ge_type, DOMAIN, OPSET_VERSION, doc, inputs=inputs, outputs=outputs,
                           type_constraints=constraints, attributes=attributes)
    schema.set_type_and_shape_inference_function(lambda ctx: _infer_types(proto, ctx))
    return schema


def _infer_types(proto: OpProto, ctx: Any) -> None:
    """Output element types from the input types and attrs (``_output_types``); shapes are left to
    the exporter's value infos."""
    input_types = {i.name: ctx.get_input_type(n).tensor_type.elem_type
                   for n, i in enumerate(proto.ge_inputs) if n < ctx.get_num_inputs() and ctx.has_input(n)}
    attrs = {}
    for a in proto.ge_attrs:
        attr = ctx.get_attribute(a.name)
        attrs[a.name] = a.default if attr is None else helper.get_attribute_value(attr)
    for n, elem_type in enumerate(output_types(proto.name, input_types, attrs)):
        if elem_type and n < ctx.get_num_outputs():
            out = onnx.TypeProto()
            out.tensor_type.elem_type = elem_type
            ctx.set_output_type(n, out)


def register_schemas() -> None:
    """Register every proto's schema with ``onnx.defs`` (idempotent)."""
    for proto in PROTOS.values():
        if not defs.has(proto.ge_type, OPSET_VERSION, DOMAIN):
            defs.register_schema(op_schema(proto))
