"""Attach standard-op function bodies to the custom nodes of an exported model, so that a runtime
without the custom ops (onnxruntime) runs it as is.

The exporter inlines onnxscript functions, so bodies are added after export: every top-level node
of ``DOMAIN`` first passes ``_checks.check_node`` on its declared types, shapes and attrs (the
checks the reference evaluator runs on the arrays): a node its op rejects raises
``OpValidationError`` naming the op, the attr or input and the value, and the model is left
unchanged. Then each node whose op has a builder in ``_bodies.BODIES`` gets a ``FunctionProto``
in ``DOMAIN`` with the node's op type, added to ``model.functions``, and the node's ``overload``
names it. A body is specialized to the node (attrs, inputs present, dtypes, static dims), so the
overload is a digest of what it was built from; nodes with the same digest share one function.

Bounded work: a body loops over experts (ONNX ``Loop``) instead of unrolling them, so its size
does not depend on an attr or a dim: every body has fewer than 400 nodes (those of ``Loop``
bodies included), so ``attach_functions`` adds at most that many per custom node.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from typing import Optional

import onnx
from onnx import helper

from ..errors import fail
from ..op_protos import PROTOS
from ..op_protos.ge_mapping import proto_of_ge_type
from ._bodies import BODIES
from ._builder import Builder, NodeView, Unsupported
from ._checks import CheckedNode, Declared, check_node, declared_of
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


def declared_inputs(node: onnx.NodeProto, types: dict[str, onnx.TypeProto]) -> dict[str, Optional[Declared]]:
    """Each GE input of a custom node (by GE name): its declared type and dims, None when absent.
    An input without a declared tensor type of known rank is an ``OpValidationError``."""
    if node.op_type not in {p.ge_type for p in PROTOS.values()}:
        fail(node.op_type, "op type", f"must be an op of the {DOMAIN} domain", repr(node.op_type))
    proto = proto_of_ge_type(node.op_type)
    declared: dict[str, Optional[Declared]] = {}
    for n, spec in enumerate(proto.ge_inputs):
        value = node.input[n] if n < len(node.input) else ""
        declared[spec.name] = declared_of(types.get(value)) if value else None
        if value and declared[spec.name] is None:
            fail(node.op_type, spec.name, "must have a declared tensor type and rank in the model "
                 "(run onnx.shape_inference first)", repr(value))
    return declared


def node_view(node: onnx.NodeProto, declared: dict[str, Optional[Declared]], checked: CheckedNode) -> NodeView:
    """The ``NodeView`` of a checked custom node."""
    inputs = {name: node.input[n] if item is not None else None for n, (name, item) in enumerate(declared.items())}
    present = {name: item for name, item in declared.items() if item is not None}
    return NodeView(node.op_type, checked.proto.name, inputs, checked.attrs,
                    {name: item.elem_type for name, item in present.items()},
                    {name: item.shape for name, item in present.items()})


def _overload(view: NodeView) -> str:
    key = repr((view.op, sorted(view.attrs.items()), sorted((k, v is not None) for k, v in view.inputs.items()),
                sorted(view.elem_types.items()), sorted(view.shapes.items())))
    return "b" + hashlib.sha1(key.encode()).hexdigest()[:12]


def _function(view: NodeView, node: onnx.NodeProto, overload: str, opset: int) -> onnx.FunctionProto:
    proto = proto_of_ge_type(view.op)
    builder = Builder()
    # Inside the body an input is its formal name, the GE name, checked against its declared shape
    # (the one check_node judged: a value_info may misstate an intermediate's shape); absent inputs
    # are never read.
    present = [name for name, value in view.inputs.items() if value]
    ok = builder.all_of(*[builder.has_shape(name, view.shapes[name]) for name in present])
    declared = ", ".join(f"{name} {view.shapes[name]}" for name in present)
    checked = builder.guard_all(present, ok, f"{view.op}: inputs must have their declared shapes (None: any "
                                             f"size): {declared}")
    formal_view = replace(view, inputs={name: dict(zip(present, checked)).get(name) for name in view.inputs})
    for name, value in BODIES[view.op](builder, formal_view).items():
        builder.output(value, name)
    formal = [i.name for i in proto.ge_inputs][:len(node.input)]
    return helper.make_function(DOMAIN, view.op, formal, [o.name for o in proto.ge_outputs], builder.nodes,
                                [helper.make_opsetid("", opset)], overload=overload)


def _default_opset(model: onnx.ModelProto) -> int:
    """The model's default-domain opset, one the bodies are written for (the exporter's range)."""
    from .export import MAX_OPSET, MIN_OPSET   # export imports this module

    versions = [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")]
    if len(versions) != 1 or not MIN_OPSET <= versions[0] <= MAX_OPSET:
        raise ValueError(f"moe_fusion.onnx.attach_functions: the model must import the default ONNX domain once, "
                         f"at opset {MIN_OPSET}..{MAX_OPSET} (the bodies' ops), got {versions or 'none'}")
    return versions[0]


def attach_functions(model: onnx.ModelProto) -> list[Skipped]:
    """Give every top-level custom node it can a standard-op body (in place). Returns the nodes
    left without one (communication ops, FFN quant mode, a world of more than one rank, a dim a
    body needs left symbolic). Raises ``OpValidationError`` for a node its op rejects, before
    changing the model (module docstring); ``ValueError`` for a default-domain opset outside the
    exporter's range."""
    opset = _default_opset(model)
    types = _value_types(model)
    nodes = [node for node in model.graph.node if node.domain == DOMAIN]
    checked = []
    for node in nodes:
        declared = declared_inputs(node, types)
        checked.append((node, declared, check_node(node, declared)))
    existing = {(f.domain, f.name, f.overload) for f in model.functions}
    skipped, overloads = [], {}
    for node, declared, result in checked:
        if node.op_type not in BODIES:
            skipped.append(Skipped(node.name, node.op_type, "communication op: runs in the reference evaluator"))
            continue
        view = node_view(node, declared, result)
        overload = _overload(view)
        if (DOMAIN, node.op_type, overload) not in existing:
            try:
                model.functions.append(_function(view, node, overload, opset))
            except Unsupported as why:
                skipped.append(Skipped(node.name, node.op_type, str(why)))
                continue
            existing.add((DOMAIN, node.op_type, overload))
        overloads[id(node)] = overload
    for node in nodes:
        if id(node) in overloads:
            node.overload = overloads[id(node)]
    if model.ir_version < 10:   # node overloads exist from IR version 10
        model.ir_version = 10
    return skipped
