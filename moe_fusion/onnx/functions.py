"""Attach standard-op function bodies to the custom nodes of an exported model, so that a runtime
without the custom ops (onnxruntime) runs it as is.

The exporter inlines onnxscript functions, so bodies are added after export: for each top-level
node of ``DOMAIN`` whose op has a builder in ``_bodies.BODIES``, a ``FunctionProto`` in ``DOMAIN``
with the node's op type is added to ``model.functions`` and the node's ``overload`` names it. A
body is specialized to the node (attrs, inputs present, dtypes), so the overload is a digest of
what it was built from; nodes with the same digest share one function. Attrs are validated while
building (``OpValidationError`` naming the GE op, the attr and the value).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
import onnx
from onnx import helper

from ..op_protos.ge_mapping import proto_of_ge_type
from ._bodies import BODIES, Unsupported
from ._builder import Builder, NodeView
from ._schema import DOMAIN


@dataclass(frozen=True)
class Skipped:
    """A custom node left without a body, and why (it runs in the reference evaluator only)."""

    node: str
    op_type: str
    reason: str


def _value_types(model: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    graph = model.graph
    types = {v.name: v.type for v in (*graph.input, *graph.value_info, *graph.output)}
    for init in graph.initializer:
        types[init.name] = helper.make_tensor_type_proto(init.data_type, list(init.dims))
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and [a.name for a in node.attribute] == ["value"]:
            tensor = node.attribute[0].t
            types[node.output[0]] = helper.make_tensor_type_proto(tensor.data_type, list(tensor.dims))
    return types


def node_view(node: onnx.NodeProto, types: dict[str, onnx.TypeProto]) -> NodeView:
    """The ``NodeView`` of a custom node: GE names for its inputs, attrs with defaults, input types."""
    proto = proto_of_ge_type(node.op_type)
    inputs = {i.name: (node.input[n] or None) if n < len(node.input) else None for n, i in enumerate(proto.ge_inputs)}
    given = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    attrs = {a.name: given.get(a.name, a.default) for a in proto.ge_attrs}
    attrs = {k: v.decode() if isinstance(v, bytes) else v for k, v in attrs.items()}
    elem_types, shapes = {}, {}
    for name, value in inputs.items():
        if value is None:
            continue
        if value not in types:
            raise ValueError(f"{node.op_type}: input {name!r} ({value!r}) has no type in the model "
                             "(run onnx.shape_inference first)")
        tensor = types[value].tensor_type
        elem_types[name] = tensor.elem_type
        shapes[name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim)
    return NodeView(node.op_type, inputs, attrs, elem_types, shapes)


def _overload(view: NodeView) -> str:
    key = repr((view.op, sorted(view.attrs.items()), sorted((k, v is not None) for k, v in view.inputs.items()),
                sorted(view.elem_types.items()), sorted(view.shapes.items())))
    return "b" + hashlib.sha1(key.encode()).hexdigest()[:12]


def _function(view: NodeView, node: onnx.NodeProto, overload: str, opset: int) -> onnx.FunctionProto:
    proto = proto_of_ge_type(view.op)
    builder = Builder()
    # Inside the body an input is its formal name, the GE name; absent inputs are never read.
    formal_view = replace(view, inputs={name: name if value else None for name, value in view.inputs.items()})
    for name, value in BODIES[view.op](builder, formal_view).items():
        builder.output(value, name)
    formal = [i.name for i in proto.ge_inputs][:len(node.input)]
    return helper.make_function(DOMAIN, view.op, formal, [o.name for o in proto.ge_outputs], builder.nodes,
                                [helper.make_opsetid("", opset)], overload=overload)


def attach_functions(model: onnx.ModelProto) -> list[Skipped]:
    """Give every top-level custom node it can a standard-op body (in place). Returns the nodes
    left without one. Raises ``OpValidationError`` for a node with an invalid attr."""
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    types = _value_types(model)
    existing = {(f.domain, f.name, f.overload) for f in model.functions}
    skipped = []
    for node in model.graph.node:
        if node.domain != DOMAIN:
            continue
        if node.op_type not in BODIES:
            skipped.append(Skipped(node.name, node.op_type, "communication op: runs in the reference evaluator"))
            continue
        view = node_view(node, types)
        overload = _overload(view)
        if (DOMAIN, node.op_type, overload) not in existing:
            try:
                model.functions.append(_function(view, node, overload, opset))
            except Unsupported as why:
                skipped.append(Skipped(node.name, node.op_type, str(why)))
                continue
            existing.add((DOMAIN, node.op_type, overload))
        node.overload = overload
    if model.ir_version < 10:   # node overloads exist from IR version 10
        model.ir_version = 10
    return skipped
