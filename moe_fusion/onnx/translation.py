"""``custom_translation_table`` entries for ``torch.onnx.export(..., dynamo=True)``.

Each ``torch.ops.moe_fusion.<op>.default`` becomes ONE node ``DOMAIN::<GE op type>`` with the GE
inputs in GE order (an absent optional input is an empty name; trailing absent ones are left
out, as ONNX allows), every GE attr set explicitly with its ONNX type (schema in ``_schema``),
and every GE output declared (the node has as many outputs as the GE op, whatever the torch op
returns). The functions are traced by the exporter (plain Python, no ``@onnxscript.script``), so
no return annotations are involved; the output count comes from the registered schema. The
inputs and attrs are the ones the GE converters emit: both read ``op_protos.ge_mapping``.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from onnxscript.values import Opset

from ..meta import op_overload
from ..op_protos import PROTOS, OpProto
from ..op_protos.ge_mapping import to_ge
from ._dtypes import onnx_to_torch
from ._schema import DOMAIN, OPSET_VERSION, register_schemas


def _value_dtype(value: Any) -> torch.dtype:
    """torch dtype of an exporter value (an ``onnx_ir.Value``)."""
    return onnx_to_torch(int(value.dtype))


def bind(proto: OpProto, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Every argument of a call by name (``OpProto.bind``), dtype arguments as torch dtypes."""
    bound = proto.bind(args, dict(kwargs))
    schema = torch._C.parse_schema(f"{proto.qualname}{proto.schema}")
    for arg in schema.arguments:
        if "ScalarType" in str(arg.real_type) and isinstance(bound[arg.name], int):
            bound[arg.name] = onnx_to_torch(bound[arg.name])   # the exporter hands dtypes over as ONNX enums
    return bound


def translation(proto: OpProto) -> Callable[..., Any]:
    """The exporter function for ``proto``'s op: binds the torch call, emits one GE node."""
    opset = Opset(DOMAIN, OPSET_VERSION)

    def translate(*args: Any, **kwargs: Any) -> Any:
        inputs, attrs = to_ge(proto, bind(proto, args, kwargs), _value_dtype)
        outputs = getattr(opset, proto.ge_type)(*inputs.values(), **attrs)
        return _torch_outputs(proto, outputs)

    translate.__name__ = translate.__qualname__ = f"moe_fusion_{proto.name}"
    translate.__doc__ = f"torch.ops.moe_fusion.{proto.name} -> {DOMAIN}::{proto.ge_type}"
    return translate


def _torch_outputs(proto: OpProto, outputs: Any) -> Any:
    """The node's outputs as the torch op returns them (one value, or a tuple)."""
    if not isinstance(outputs, (tuple, list)):
        return outputs
    return outputs[0] if len(outputs) == 1 else tuple(outputs)


def translation_table() -> dict[torch._ops.OpOverload, Callable[..., Any]]:
    """``{torch.ops.moe_fusion.<op>.default: translation}`` for every op in ``PROTOS``; registers
    the ONNX schemas of the custom domain first."""
    register_schemas()
    return {op_overload(name): translation(proto) for name, proto in PROTOS.items()}
