"""The reference GE prototypes our IR definitions are compared with.

For an op CANN defines, torchair's generated raw-op builder
(``torchair._ge_concrete_graph.auto_generated_ge_raw_ops.<OpType>``) is the reference. Its
docstrings are not (MoeUpdateExpert's names both outputs ``balanced_expert_ids``,
MoeDistributeCombineAddRmsNorm's lacks ``residual_x`` and ``gamma``); what it emits is. The builder
is run in a scratch GE graph with its required inputs and attrs:

* a builder that hands torchair an ``IrDef`` (``ge_op(..., ir=...)``) is read from that ``IrDef``:
  inputs with kinds, attrs with defaults, outputs;
* any other builder is read from the node it emits (input and output names in order, with the
  optional inputs its signature hides emitted empty) and from its signature (``Optional[Tensor]``
  inputs are optional; keyword-only parameters are the attrs, in order, with their defaults).

For the two ops only CANN defines (no raw op), the REG_OP text transcribed from SPEC §6.1 is the
reference, parsed the same way.
"""
from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from typing import Any

from moe_fusion.ge_plugin.ir import IrDef
from moe_fusion.op_protos import GeAttr

# SPEC §6.1, GE REG_OPs of the BMM pair ([K] ops-transformer op_graph/*_proto.h).
SPEC_REG_OPS = {
    "AlltoAllAllGatherBatchMatMul": """REG_OP(AlltoAllAllGatherBatchMatMul)
    .INPUT(x, TensorType({DT_FLOAT16, DT_BF16}))
    .INPUT(weight, TensorType({DT_FLOAT16, DT_BF16}))
    .OPTIONAL_INPUT(bias, TensorType({DT_FLOAT16, DT_FLOAT, DT_BF16}))
    .OUTPUT(y1, TensorType({DT_FLOAT16, DT_BF16}))
    .OUTPUT(y2, TensorType({DT_FLOAT16, DT_BF16}))
    .OUTPUT(y3, TensorType({DT_FLOAT16, DT_BF16}))
    .REQUIRED_ATTR(group_ep, String)
    .REQUIRED_ATTR(group_tp, String)
    .REQUIRED_ATTR(ep_world_size, Int)
    .REQUIRED_ATTR(tp_world_size, Int)
    .ATTR(x_shard_type, Int, 0)
    .ATTR(act_type, Int, 0)
    .ATTR(transpose_weight, Bool, false)
    .ATTR(output_y2_flag, Bool, false)
    .ATTR(output_y3_flag, Bool, false)
    .OP_END_FACTORY_REG(AlltoAllAllGatherBatchMatMul)""",
    "BatchMatMulReduceScatterAlltoAll": """REG_OP(BatchMatMulReduceScatterAlltoAll)
    .INPUT(x, TensorType({DT_FLOAT16, DT_BF16}))
    .INPUT(weight, TensorType({DT_FLOAT16, DT_BF16}))
    .OPTIONAL_INPUT(bias, TensorType({DT_FLOAT16, DT_FLOAT, DT_BF16}))
    .OUTPUT(y, TensorType({DT_FLOAT16, DT_BF16}))
    .REQUIRED_ATTR(group_ep, String)
    .REQUIRED_ATTR(group_tp, String)
    .REQUIRED_ATTR(ep_world_size, Int)
    .REQUIRED_ATTR(tp_world_size, Int)
    .ATTR(y_shard_type, Int, 0)
    .ATTR(transpose_weight, Bool, false)
    .OP_END_FACTORY_REG(BatchMatMulReduceScatterAlltoAll)""",
}

_KINDS = {"INPUT": "required", "OPTIONAL_INPUT": "optional", "DYNAMIC_INPUT": "dynamic"}
_ATTR_TYPES = {"Int": "Int", "Float": "Float", "Bool": "Bool", "String": "Str", "ListInt": "ListInt",
               "ListFloat": "ListFloat", "ListBool": "ListBool", "ListString": "ListStr", "Type": "DataType"}


@dataclass(frozen=True)
class RegOp:
    """What a REG_OP text declares."""

    inputs: tuple[tuple[str, str], ...]          # (name, kind)
    outputs: tuple[str, ...]
    attrs: tuple[GeAttr, ...]


def _literal(text: str, attr_type: str) -> Any:
    text = text.strip()
    if attr_type == "Str":
        return text.strip('"')
    if attr_type == "Bool":
        return {"true": True, "false": False}[text]
    return float(text) if attr_type == "Float" else int(text)


def parse_reg_op(text: str) -> RegOp:
    """Parse REG_OP text (as in torchair's raw-op docstrings and CANN's *_proto.h)."""
    inputs, outputs, attrs = [], [], []
    for macro, body in re.findall(r"\.([A-Z_]+)\(([^()]*(?:\([^()]*\)[^()]*)*)\)", text):
        name, *rest = [part.strip() for part in body.split(",", 1)]
        if macro in _KINDS:
            inputs.append((name, _KINDS[macro]))
        elif macro in ("OUTPUT", "DYNAMIC_OUTPUT"):
            outputs.append(name)
        elif macro == "REQUIRED_ATTR":
            attrs.append(GeAttr(name, _ATTR_TYPES[rest[0]], None, True))
        elif macro == "ATTR":
            attr_type, default = [part.strip() for part in rest[0].split(",", 1)]
            attrs.append(GeAttr(name, _ATTR_TYPES[attr_type], _literal(default, _ATTR_TYPES[attr_type])))
    return RegOp(tuple(inputs), tuple(outputs), tuple(attrs))


def spec_ir_def(op_type: str) -> IrDef:
    """The IR definition SPEC §6.1 gives for an op torchair has no raw op for."""
    reg = parse_reg_op(SPEC_REG_OPS[op_type])
    return IrDef(op_type, reg.inputs, reg.attrs, reg.outputs)


_PY_ATTR_TYPES = {"int": "Int", "float": "Float", "bool": "Bool", "str": "Str", "typing.List[int]": "ListInt"}
_DUMMY_ATTRS = {"Int": 1, "Float": 1.0, "Bool": True, "Str": "g", "ListInt": [1]}
_IR_INPUT_KINDS = {0: "required", 1: "optional", 2: "dynamic"}   # torchair IrElement values


def _annotation(p: inspect.Parameter) -> str:
    return p.annotation.__name__ if isinstance(p.annotation, type) else str(p.annotation)


def _from_ir(op_type: str, ir: Any) -> IrDef:
    """An IrDef from torchair's own ``compat_ir.IrDef`` (the ``ir=`` argument of ``ge_op``)."""
    inputs = tuple((name, _IR_INPUT_KINDS[kind]) for kind, name, _ in ir.indexed_inputs)
    attrs = []
    for kind, name, default in ir.indexed_attrs:
        if kind == 3:   # IrElement.RequireAttr: "default" is the attr builder
            attrs.append(GeAttr(name, default.cls, None, True))
        else:
            attrs.append(GeAttr(name, default.cls, default.value))
    return IrDef(op_type, inputs, tuple(attrs), tuple(name for _, name, _ in ir.indexed_outputs))


def torchair_ir_def(op_type: str) -> IrDef:
    """The IR definition of torchair's raw-op builder for ``op_type`` (see the module docstring)."""
    from torchair._ge_concrete_graph import auto_generated_ge_raw_ops as raw_ops
    from torchair.ge._ge_graph import Data, DataType, GeGraph

    builder = getattr(raw_ops, op_type)
    params = inspect.signature(builder).parameters.values()
    tensors = [p for p in params if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
    optional = {p.name for p in tensors if _annotation(p).startswith("typing.Optional")}
    attrs = tuple(GeAttr(p.name, _PY_ATTR_TYPES[_annotation(p)],
                         None if p.default is inspect.Parameter.empty else p.default,
                         p.default is inspect.Parameter.empty)
                  for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY
                  and p.name not in ("dependencies", "node_name"))
    captured = []

    def capture_ir(*args: Any, ir: Any = None, **kwargs: Any) -> Any:
        captured.append(ir)
        return original(*args, ir=ir, **kwargs)

    original = raw_ops.ge_op
    raw_ops.ge_op = capture_ir
    try:
        with GeGraph() as graph:
            given = [None if p.name in optional else
                     Data(index=i, dtype=DataType.DT_FLOAT, shape=[1], placement="NPU") for i, p in enumerate(tensors)]
            builder(*given, **{a.name: _DUMMY_ATTRS[a.type] for a in attrs if a.required})
            node = graph.op[-1]
    finally:
        raw_ops.ge_op = original
    if captured and captured[0] is not None:
        return _from_ir(op_type, captured[0])
    names = [p.name for p in tensors]
    inputs = tuple((d.name, "optional" if d.name in optional or d.name not in names else "required")
                   for d in node.input_desc)
    return IrDef(op_type, inputs, attrs, tuple(d.name for d in node.output_desc))
